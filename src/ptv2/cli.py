"""The `ptv2` command: `ptv2 <command> [Hydra overrides]`.

The one place that talks to the user before a command runs: the table of commands, the command line checked and
completed (ptv2.command_line), and every error of Hydra or OmegaConf translated into one line.

Commands that run experiments are Hydra applications over the config tree in conf/ (shipped as ptv2.conf), so
every one of them takes overrides, `--help`, `--cfg job` and `-m/--multirun`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ptv2 import __version__
from ptv2.command_line import command_line, register, sweep_value_problem
from ptv2.config import prompt_key_problem, unknown_key_hint
from ptv2.modeling.methods import METHODS
from ptv2.runs import rundir, session

log = logging.getLogger("ptv2")
CONFIG_PATH = "pkg://ptv2.conf"


def hydra_app(config_name: str, run):
    """A Hydra application over conf/<config_name>.yaml whose job calls run(cfg, run_dir)."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def app(cfg: DictConfig):
        return session.run_job(run, cfg, config_name)

    return app


# name -> (target "module:function", Hydra config name or None for a plain argv command, one-line help).
# A Hydra command's target is run(cfg, run_dir); a plain command's target is main(argv) -> exit code.
COMMANDS = {
    "train": ("ptv2.commands.train:run", "train", "train a prompt (or a baseline) on a task; keeps the best dev epoch"),
    "eval": ("ptv2.commands.evaluate:run", "eval", "evaluate a trained checkpoint (ckpt=RUN_DIR_OR_FILE) on a split"),
    "predict": ("ptv2.commands.predict:run", "predict", "write prediction / submission files of checkpoints"),
    "bench": (
        "ptv2.commands.bench:run",
        "bench",
        "time train steps, eval throughput and peak memory per prompt method",
    ),
    "serve": ("ptv2.commands.serve:run", "serve", "serve trained prompts over HTTP, batched on one backbone"),
    "export": ("ptv2.commands.export:main", None, "write a trained prompt as a PEFT adapter (RUN --to peft OUT)"),
    "import": ("ptv2.commands.export:import_main", None, "a PEFT prefix adapter as a checkpoint (DIR --from peft OUT)"),
    "table": (
        "ptv2.commands.table:main",
        None,
        "collect results.json of runs/sweeps into a Markdown table, CSV and plots",
    ),
}


def config_error_line(error: Exception) -> str:
    """Hydra's report of a config mistake (unknown option, misspelled key, wrong type, bad override syntax) as one
    line: OmegaConf's cause (key and type) follows the first sentence in parentheses; a list such as "Available
    options in 'task':" with its tab-indented items becomes "available options in 'task': a, b, c"; the config search
    path is dropped."""
    lines = [line.strip() for line in str(error).split("Config search path:")[0].splitlines() if line.strip()]
    header = next((i for i, line in enumerate(lines) if line.endswith(":")), len(lines))
    parts = [line.rstrip(".") for line in lines[:header]]
    if header < len(lines):
        parts.append(f"{lines[header]} {', '.join(lines[header + 1 :])}")
    if isinstance(error.__cause__, OmegaConfBaseException):
        parts[0] += f" ({str(error.__cause__).splitlines()[0]})"
    # Hydra advises `+key=...` for a key the schema lacks: that would add a key nothing reads (check_added_keys
    # refuses it); name the close key instead.
    parts = [part for part in parts if not part.lower().startswith("to append to your config use")]
    line = "; ".join([parts[0], *(part[0].lower() + part[1:] for part in parts[1:])])
    option = re.search(r"Could not find '([\w/-]+)/([^'/]+)'; available options in '[^']+': ([^;]+)", line)
    if option:  # a misspelt option of a group: the close names first
        close = difflib.get_close_matches(option.group(2), option.group(3).split(", "), n=2, cutoff=0.6)
        if close:
            line = f"{option.group(1)}={option.group(2)} is unknown; did you mean {' or '.join(close)}?"
    missing = re.search(r"Could not override '([^']+)'", line)
    settings = getattr(error.__cause__, "object_type", None)
    chosen = next((name for name, row in METHODS.items() if row.settings is settings), None)
    if missing and chosen and missing.group(1).startswith("prompt."):  # a key of another method, or of none
        return prompt_key_problem(missing.group(1), chosen) or line
    if missing and "not in '" in line and not missing.group(1).startswith("hydra."):
        line += f"; {unknown_key_hint(missing.group(1))}"
    if any(marker in line for marker in LEXER_ERRORS):
        line += (
            "; quote a value holding spaces or non-ASCII characters, with the shell's quotes around the whole "
            """override: 'key="a value"'"""
        )
    return line


# Hydra's override lexer and parser reporting an unquoted space or a character it does not take.
LEXER_ERRORS = ("LexerNoViableAltException", "missing EQUAL", "token recognition error", "extraneous input")


def usage() -> str:
    lines = [f"ptv2 {__version__}: P-Tuning v2 experiments", "", "usage: ptv2 <command> [overrides] [--help]", ""]
    lines += [f"  {name:<8}{text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "ptv2 <command> --help shows the command's config groups and options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    session.Outcome.reset()  # main may run several times in one process (the tests call it in-process)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"ptv2: error: unknown command '{command}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target, config_name, _ = COMMANDS[command]
    module_name, function_name = target.split(":")
    if config_name is None:
        return getattr(importlib.import_module(module_name), function_name)(argv[1:])

    def function(cfg: DictConfig, run_dir: Path):
        # Imported once the config composed: a mistake in it is reported before torch and transformers load.
        from ptv2.progress import quiet_library_bars

        quiet_library_bars()  # eval and predict load weights without the training loop's import of it
        return getattr(importlib.import_module(module_name), function_name)(cfg, run_dir)

    args, preset, problem = command_line(command, config_name, argv[1:])
    if problem:
        print(f"ptv2: error: {problem}", file=sys.stderr)
        return 2
    register()
    if preset and not any(arg in ("-h", "--help") for arg in args):
        note = "the official run's settings (explicit overrides win; preset=none turns it off)"
        print(f"ptv2: preset={preset}: {note}", file=sys.stderr)
    problem = rundir.sweep_dir_in_use(args)
    if not problem and ("-m" in args or "--multirun" in args):
        problem = sweep_value_problem(config_name, args)
    if problem:
        print(f"ptv2: error: {problem}", file=sys.stderr)
        return 2
    sys.argv = [f"ptv2 {command}", *args]
    named = [Path(arg.split("=", 1)[1]).expanduser().absolute() for arg in args if arg.startswith("hydra.run.dir=")]
    session.Outcome.reset(named)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for Hydra's tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them: reported below
    GlobalHydra.instance().clear()  # a Hydra app of an earlier call in this process
    try:
        hydra_app(config_name, function)()
    except (HydraException, OmegaConfBaseException) as error:
        if full_error or error is session.Outcome.job_error:
            raise
        print(f"ptv2: error: {config_error_line(error)}; `ptv2 {command} --help` lists the options", file=sys.stderr)
        return 2
    except ValueError:
        if not session.Outcome.failed or full_error:
            raise
        # Optuna's sweeper asks for the best trial after the last one and raises when every trial failed; the
        # failures, listed below, are the answer.
    for line in session.closing_lines():
        print(line, file=sys.stderr)
    return 1 if session.Outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
