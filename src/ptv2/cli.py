"""The `ptv2` command: `ptv2 <command> [Hydra overrides]`.

Commands that run experiments are Hydra applications over the config tree in conf/ (shipped as ptv2.conf), so
every one of them takes overrides, `--help`, `--cfg job` and `-m/--multirun`.
"""

from __future__ import annotations

import importlib
import importlib.resources
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptv2 import __version__, config
from ptv2.config import check_values
from ptv2.errors import UserError
from ptv2.runs import rundir

log = logging.getLogger("ptv2")
CONFIG_PATH = "pkg://ptv2.conf"
failed_jobs: list[str] = []
job_error: Exception | None = None  # an error raised inside a job reaches main as it is (not a config mistake)
# Run folders named on the command line that existed before this start: a refused start leaves them as they were.
preexisting_run_dirs: set[Path] = set()


def resolved(cfg: DictConfig) -> None:
    """Every interpolation of the config resolves (`${oc.env:NAME}` of an unset variable, a missing key), else one
    line naming it."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise UserError(f"the config does not resolve: {str(error).splitlines()[0]}") from None


def _job(function, cfg: DictConfig, command: str):
    """Run one job; a user error ends a single run with one line and exit code 2, and fails only its own job
    in a sweep (the sweep goes on and `ptv2` exits non-zero at the end).

    Before anything is written: every value is checked, the run directory is locked and checked (no finished run
    replaced, a resume checked first); then config.yaml and .hydra/ are written and the command runs."""
    global job_error
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    lock = None
    try:
        lock = open_job(cfg, run_dir, command)
        return objective(function(cfg, run_dir))
    except UserError as error:
        if not sweeping:
            print(f"ptv2: error: {error}", file=sys.stderr)
            if lock is None:
                discard_unused_run_dir(run_dir)
            sys.exit(2)
        record_failure(error, cfg, run_dir, hydra_cfg.job.num)
    except Exception as error:
        if not sweeping:
            job_error = error  # a failure inside the job: a traceback, not a config mistake
            raise
        record_failure(error, cfg, run_dir, hydra_cfg.job.num)
    finally:
        if lock is not None:
            lock.release()
    return None


def discard_unused_run_dir(run_dir: Path) -> None:
    """A start refused by ptv2's checks leaves no folder behind: Hydra made the run folder and an empty train.log
    before the checks ran. Anything else in it, or a folder that existed before this start, stays."""
    if run_dir.absolute() in preexisting_run_dirs or not run_dir.is_dir():
        return
    log_file = run_dir / "train.log"
    if [path.name for path in run_dir.iterdir()] == [log_file.name] and log_file.stat().st_size == 0:
        log_file.unlink()
        run_dir.rmdir()


def open_job(cfg: DictConfig, run_dir: Path, command: str) -> rundir.RunLock | None:
    """Every value checked, the run directory locked and checked, the config written; the caller releases the lock."""
    resolved(cfg)
    check_values(cfg)
    # Under `accelerate launch` every process runs the job; the main one (RANK 0) owns the run directory.
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return rundir.open_run_dir(cfg, run_dir, command)


def record_failure(error: Exception, cfg: DictConfig, run_dir: Path, job_num) -> None:
    """A failed sweep job (the sweep goes on): its error in the log (one line for a user error, else the traceback),
    its entry in the failed list, its FAILED marker; a folder that is another run's is left as it is."""
    if isinstance(error, UserError):
        log.error(f"ptv2: error: {error}")
    else:
        log.error("job %s failed:\n%s", job_num, "".join(traceback.format_exception(error)))
    if isinstance(error, rundir.RunDirInUse):
        failed_jobs.append(f"job {job_num} ({run_dir}: in use)")
        return
    failed_jobs.append(f"job {job_num} ({run_dir})")
    rundir.mark_failed(cfg, run_dir)


def register() -> None:
    """What a Hydra command needs registered (idempotent): the schema and conf/'s resolvers (config.register), the
    `${unique_now:}` run-folder resolver, and the packed launcher. Hydra finds launchers by scanning the
    hydra_plugins namespace package, which an editable install (pip install -e) hides from the scan, so ours is
    registered by hand (this also stores its config schema)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.ptv2_packed_launcher.packed_launcher import PackedLauncher

    config.register()
    if not OmegaConf.has_resolver("unique_now"):
        OmegaConf.register_new_resolver("unique_now", rundir.unique_now, use_cache=True)
    PackedLauncher.hooks = (open_job, record_failure, objective)
    Plugins.instance().register(PackedLauncher)


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
        return _job(run, cfg, config_name)

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
    "export": ("ptv2.commands.export:main", None, "write a trained prompt as a PEFT adapter (RUN --to peft OUT)"),
    "import": ("ptv2.commands.export:import_main", None, "a PEFT prefix adapter as a checkpoint (DIR --from peft OUT)"),
    "table": (
        "ptv2.commands.table:main",
        None,
        "collect results.json of runs/sweeps into a Markdown table, CSV and plots",
    ),
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


def _choice(args: list[str], group: str, default: str | None) -> str | None:
    """The option chosen for a config group on the command line (the last `group=X` wins), else `default`."""
    chosen = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{group}=")]
    return chosen[-1] if chosen else default


def with_official_preset(args: list[str]) -> tuple[list[str], str | None]:
    """`ptv2 train` overrides with the official preset of the chosen task x backbone added, and its name.

    A P-Tuning v2 run (the default method) on a task x backbone that has a preset in conf/preset/ gets it, so
    `ptv2 train task=rte backbone=roberta-large` is the official run; overrides on the command line still win.
    `preset=none` turns it off; an explicit preset, another method, an experiment or a sweep over task/backbone
    leave the command as it is.
    """
    if "preset=none" in args:
        return [arg for arg in args if arg != "preset=none"], None
    if any(arg.startswith(("preset=", "+preset=", "experiment=", "+experiment=")) for arg in args):
        return args, None
    conf = importlib.resources.files("ptv2.conf")
    defaults = {}
    for entry in OmegaConf.load(conf / "train.yaml").defaults:  # the groups' default options
        if isinstance(entry, DictConfig):
            defaults.update(entry)
    task, backbone = _choice(args, "task", defaults["task"]), _choice(args, "backbone", defaults["backbone"])
    if _choice(args, "prompt", defaults["prompt"]) != "ptv2" or "," in task + backbone:
        return args, None
    name = f"{task}-{backbone}"
    if not (conf / "preset" / f"{name}.yaml").is_file():
        return args, None
    return [*args, f"preset={name}"], name


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
    return "; ".join([parts[0], *(part[0].lower() + part[1:] for part in parts[1:])])


def usage() -> str:
    lines = [f"ptv2 {__version__}: P-Tuning v2 experiments", "", "usage: ptv2 <command> [overrides] [--help]", ""]
    lines += [f"  {name:<8}{text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "ptv2 <command> --help shows the command's config groups and options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global job_error
    job_error = None
    failed_jobs.clear()  # main may run several times in one process (the tests call it in-process)
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
    args = argv[1:]
    if command == "train":
        args, preset = with_official_preset(args)
        if preset:
            note = "the official run's settings (explicit overrides win; preset=none turns it off)"
            print(f"ptv2: preset={preset}: {note}", file=sys.stderr)
    problem = rundir.sweep_dir_in_use(args)
    if problem:
        print(f"ptv2: error: {problem}", file=sys.stderr)
        return 2
    sys.argv = [f"ptv2 {command}", *args]
    named = [Path(arg.split("=", 1)[1]).expanduser().absolute() for arg in args if arg.startswith("hydra.run.dir=")]
    preexisting_run_dirs.clear()
    preexisting_run_dirs.update(path for path in named if path.exists())
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for Hydra's tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them: reported below
    GlobalHydra.instance().clear()  # a Hydra app of an earlier call in this process
    try:
        hydra_app(config_name, function)()
    except (HydraException, OmegaConfBaseException) as error:
        if full_error or error is job_error:
            raise
        print(f"ptv2: error: {config_error_line(error)}; `ptv2 {command} --help` lists the options", file=sys.stderr)
        return 2
    if failed_jobs:
        print(f"ptv2: {len(failed_jobs)} job(s) failed: {'; '.join(failed_jobs)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
