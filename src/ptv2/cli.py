"""The `ptv2` command: `ptv2 <command> [Hydra overrides]`.

Commands that run experiments are Hydra applications over the config tree in conf/ (shipped as ptv2.conf), so
every one of them takes overrides, `--help`, `--cfg job` and `-m/--multirun`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ptv2 import __version__
from ptv2.config import register
from ptv2.errors import UserError

log = logging.getLogger("ptv2")
CONFIG_PATH = "pkg://ptv2.conf"
failed_jobs: list[str] = []


def _job(function, cfg: DictConfig):
    """Run one job; a user error ends a single run with one line and exit code 2, and fails only its own job
    in a sweep (the sweep goes on and `ptv2` exits non-zero at the end)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        return objective(function(cfg, run_dir))
    except UserError as error:
        message = f"ptv2: error: {error}"
        if not sweeping:
            print(message, file=sys.stderr)
            sys.exit(2)
        log.error(message)
    except Exception:
        if not sweeping:
            raise
        log.error("job %s failed:\n%s", hydra_cfg.job.num, traceback.format_exc())
    failed_jobs.append(f"job {hydra_cfg.job.num} ({run_dir})")
    (run_dir / "FAILED").write_text("see the job's log\n")
    return None


def objective(result):
    """What a job hands back to Hydra's sweeper: a results dict becomes its selection value ("best_value", the dev
    metric that picked the best epoch), the float that optimizing sweepers (hydra/sweeper=optuna) maximize; the
    basic sweeper ignores it. Anything else passes through; a failed job returns None, which Optuna records as FAIL."""
    if isinstance(result, dict) and "best_value" in result:
        return float(result["best_value"])
    return result


def hydra_app(config_name: str, run):
    """A Hydra application over conf/<config_name>.yaml whose job calls run(cfg, run_dir)."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def app(cfg: DictConfig):
        return _job(run, cfg)

    return app


# name -> (target "module:function", Hydra config name or None for a plain argv command, one-line help).
# A Hydra command's target is run(cfg, run_dir); a plain command's target is main(argv) -> exit code.
COMMANDS = {
    "train": ("ptv2.train:run", "train", "train a prompt (or a baseline) on a task; keeps the best dev epoch"),
    "eval": ("ptv2.evaluate:run", "eval", "evaluate a trained checkpoint (ckpt=RUN_DIR_OR_FILE) on a split"),
    "predict": ("ptv2.predict:run", "predict", "write prediction / submission files of checkpoints"),
    "bench": ("ptv2.bench:run", "bench", "time train steps, eval throughput and peak memory per prompt method"),
    "table": ("ptv2.table:main", None, "collect results.json of runs/sweeps into a Markdown table, CSV and plots"),
}


def unwritable_run_dir(args: list[str]) -> str | None:
    """Why the run directory named on the command line (hydra.run.dir / hydra.sweep.dir, else ./outputs) cannot be
    created, or None. Checked up front: Hydra would fail with a traceback when it creates the folder."""
    if any(arg in ("-h", "--help", "-c", "--cfg", "--info", "--hydra-help") for arg in args):
        return None
    key = "hydra.sweep.dir=" if ("-m" in args or "--multirun" in args) else "hydra.run.dir="
    path = Path(next((arg[len(key) :] for arg in args if arg.startswith(key)), "outputs")).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return None
    what = "not a folder" if not existing.is_dir() else "not writable"
    return f"cannot create the run directory {path}: {existing} is {what}; pass {key}DIR with a writable DIR"


def usage() -> str:
    lines = [f"ptv2 {__version__}: P-Tuning v2 experiments", "", "usage: ptv2 <command> [overrides] [--help]", ""]
    lines += [f"  {name:<8}{text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "ptv2 <command> --help shows the command's config groups and options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    function = getattr(importlib.import_module(module_name), function_name)
    if config_name is None:
        return function(argv[1:])
    problem = unwritable_run_dir(argv[1:])
    if problem:
        print(f"ptv2: error: {problem}", file=sys.stderr)
        return 2
    register()
    sys.argv = [f"ptv2 {command}", *argv[1:]]
    hydra_app(config_name, function)()
    if failed_jobs:
        print(f"ptv2: {len(failed_jobs)} job(s) failed: {'; '.join(failed_jobs)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
