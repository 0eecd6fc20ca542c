"""What the command line does for every job of a sweep (open it, record its failure, hand its result to the sweeper),
for the packed launcher, which sits below the cli and never imports it: cli.register fills HOOKS.

Kept here rather than on the launcher class: Hydra's plugin scan (of an installed wheel) executes the launcher's
module again, which would make a new class without them.
"""

HOOKS: dict = {}  # "open_job", "record_failure", "objective"
