"""Faults injected into a ptv2 process of a test's (forked_ptv2 installs them in the child from its environment):
a signal after a training step, a kill inside a group save. ptv2 itself has no kill switch; it calls its
loop.STEP_CALLBACKS and resume.SAVE_CALLBACKS, and these are what the tests put there.

  PTV2_DIE_AT_STEP=N [PTV2_DIE_SIGNAL=KILL|TERM|INT]   the signal after step N (its save, if one was due, done)
  PTV2_DIE_AT_SAVE=N                                    SIGKILL after the Nth file a group save wrote or renamed
"""

from __future__ import annotations

import os
import signal

DIE_AT_STEP, DIE_SIGNAL, DIE_AT_SAVE = "PTV2_DIE_AT_STEP", "PTV2_DIE_SIGNAL", "PTV2_DIE_AT_SAVE"


def install(env: dict[str, str]) -> None:
    from ptv2 import loop
    from ptv2.runs import resume

    if DIE_AT_STEP in env:
        at, name = int(env[DIE_AT_STEP]), env.get(DIE_SIGNAL, "KILL")

        def after_step(step: int) -> None:
            if step == at:
                os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

        loop.STEP_CALLBACKS.append(after_step)
    if DIE_AT_SAVE in env:
        at, written = int(env[DIE_AT_SAVE]), [0]

        def after_file(_count: int) -> None:  # counted over every group save of the process
            written[0] += 1
            if written[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)

        resume.SAVE_CALLBACKS.append(after_file)
