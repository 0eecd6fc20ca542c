"""The `ptv2` command: `ptv2 <command> [Hydra overrides]`.

One piece, as it is the only place that talks to the user before a command runs: the argument clean-up, the checks
that must come before Hydra writes anything, and the translation of every error into one line.

Commands that run experiments are Hydra applications over the config tree in conf/ (shipped as ptv2.conf), so
every one of them takes overrides, `--help`, `--cfg job` and `-m/--multirun`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptv2 import __version__, config
from ptv2.commands.job_hooks import HOOKS
from ptv2.config import check_added_keys, check_launcher, check_values, unknown_key_hint
from ptv2.errors import UserError, short_line
from ptv2.runs import rundir, summary

log = logging.getLogger("ptv2")
CONFIG_PATH = "pkg://ptv2.conf"
failed_jobs: list[str] = []
sweep_jobs: dict[str, int] = {}  # sweep folder -> jobs started in it (the line that ends a multirun)
job_error: Exception | None = None  # an error raised inside a job reaches main as it is (not a config mistake)
# Run folders named on the command line that existed before this start, with the names they held: a refused start
# leaves them as they were.
preexisting_run_dirs: dict[Path, set[str]] = {}


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
    except rundir.AlreadyFinished as note:  # a resume of a finished run: nothing to do, the folder as it was
        print(f"ptv2: {note}", file=sys.stderr)
        return None
    except UserError as error:
        if not sweeping:
            print(f"ptv2: error: {short_line(error)}", file=sys.stderr)
            if lock is not None:
                lock.release()
            if not isinstance(error, rundir.RunDirInUse):  # another run's folder (maybe being written): untouched
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


# What a start writes before the command's own checks (layers, data) can refuse it: removed again on a refusal
# (and Hydra's <command>.log: train.log, eval.log, ...).
START_FILES = (rundir.LOCK_FILE, "config.yaml", ".hydra")


def discard_unused_run_dir(run_dir: Path) -> None:
    """A refused start leaves nothing behind: Hydra made the run folder and train.log, open_job the lock, config.yaml
    and .hydra/, before a layer or data check refused the run. Only those are removed, and only when the folder
    holds nothing else this start made (a run that got as far as a state or a checkpoint keeps everything); what
    was there before this start stays, and a folder that existed before stays."""
    before = preexisting_run_dirs.get(run_dir.absolute())
    if not run_dir.is_dir() or run_dir.is_symlink():
        return
    names = {path.name for path in run_dir.iterdir()}
    made = names - (before or set())
    if not all(name in START_FILES or name.endswith(".log") for name in made):
        return
    for name in made:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if before is None:
        try:
            run_dir.rmdir()
        except OSError:  # something appeared meanwhile: leave it
            pass


def process_owns_run_dir() -> bool:
    """Whether this process writes the run directory: every process but the non-main ones of a multi-process launch
    (`accelerate launch`/torchrun set RANK and WORLD_SIZE). A RANK alone (left in the environment) does not make a
    process a follower: it still locks and checks the folder."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers; "
            "unset them, or let the launcher (accelerate launch, torchrun) set them"
        ) from None
    return rank == 0 or world <= 1


def open_job(cfg: DictConfig, run_dir: Path, command: str) -> rundir.RunLock | None:
    """Every value checked, the run directory locked and checked, the config written; the caller releases the lock."""
    resolved(cfg)
    check_values(cfg)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:  # counted for the line that ends the sweep (packed jobs too)
            sweep_dir = str(Path(hydra_cfg.sweep.dir).absolute())
            sweep_jobs[sweep_dir] = sweep_jobs.get(sweep_dir, 0) + 1
        check_added_keys(list(hydra_cfg.overrides.task), set(hydra_cfg.runtime.choices))
        check_launcher(hydra_cfg.launcher)
    if not process_owns_run_dir():
        # The main process locks and writes the folder; this one still refuses a folder it may not train into.
        rundir.refuse_finished_resume(cfg, run_dir, command)
        rundir.check_reuse(cfg, run_dir, command, read_only=True)
        return None
    return rundir.open_run_dir(cfg, run_dir, command)


def record_failure(error: Exception, cfg: DictConfig, run_dir: Path, job_num) -> None:
    """A failed sweep job (the sweep goes on): its error in the log (one line for a user error, else the traceback),
    its entry in the failed list, its FAILED marker; a folder that is another run's is left as it is."""
    if isinstance(error, rundir.AlreadyFinished):  # not a failure; printed, not logged: its log stays as it was
        print(f"ptv2: job {job_num}: {error}", file=sys.stderr)
        return
    if isinstance(error, UserError):
        log.error(f"ptv2: error: {short_line(error)}")
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
    HOOKS.update(open_job=open_job, record_failure=record_failure, objective=objective)
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
    "serve": ("ptv2.commands.serve:run", "serve", "serve trained prompts over HTTP, batched on one backbone"),
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


# Hydra's flags that take a value (argparse): `--cfg job`, `-p trainer`, ...; `--info` takes one of INFO_TOPICS.
VALUE_FLAGS = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
VALUE_FLAGS += ("--experimental-rerun",)
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def flags_first(args: list[str]) -> list[str]:
    """Hydra's flags (with their values) before the overrides: Hydra's argparse stops reading overrides at the first
    flag, so `ptv2 train task=rte -m` or an override ptv2 appends after `--cfg job` (the official preset) would be
    refused as "unrecognized arguments". The order of the overrides is kept (the last one of a key wins); a flag
    without its value goes last, so that argparse does not take an override for it."""
    flags, overrides, lacking = split_flags(args)
    return [*flags, *overrides, *lacking]


def split_flags(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(Hydra's flags with their values, the overrides, the flags given without their value), each in the order
    given. A flag's value is the next argument unless that is an override (it holds "=") or another flag; --info
    takes only one of its topics."""
    flags, overrides, lacking, index = [], [], [], 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-"):  # overrides never do (`~key`, `+key=`, `key=-1`)
            overrides.append(arg)
            continue
        following = args[index] if index < len(args) else None
        if arg not in (*VALUE_FLAGS, "--info"):
            flags.append(arg)
        elif following is not None and "=" not in following and not following.startswith("-"):
            if arg != "--info" or following in INFO_TOPICS:
                flags += [arg, following]
                index += 1
            else:
                lacking.append(arg)
        else:
            lacking.append(arg)
    return flags, overrides, lacking


def exclusive_modes(args: list[str]) -> str | None:
    """A sweep with --cfg, --info or --shell-completion: Hydra's modes exclude each other (it raises a bare
    ValueError)."""
    flags = split_flags(args)[0]
    sweep = [flag for flag in flags if flag in ("-m", "--multirun")]
    other = [flag for flag in flags if flag in ("-c", "--cfg", "-i", "--info", "-sc", "--shell-completion")]
    if sweep and other:
        return f"{sweep[0]} and {other[0]} cannot go together; drop {sweep[0]} to see one job's config"
    return None


def launcher_knobs(args: list[str]) -> str | None:
    """Why a packed launcher knob on the command line is out of range, or None: checked before Hydra starts a sweep
    (each job checks the launcher config again, for values set in a config file)."""
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.launcher.max_pack", "hydra.launcher.jobs_per_forward") and value not in ("null", ""):
            if not (value.isdigit() and int(value) >= 1):
                return f"{key}={value} is out of range; use an integer >= 1 (or null for the default)"
    return None


def linked_run_dir(args: list[str]) -> str | None:
    """Why the run folder named on the command line may not be used because of a symbolic link (rundir.link_problem:
    a dangling link as the folder, a link where ptv2 or Hydra writes), or None. Checked before Hydra opens its
    train.log there, which would append through a link; a sweep's job folders are checked too."""
    for key in ("hydra.run.dir=", "hydra.sweep.dir="):
        given = [arg[len(key) :] for arg in args if arg.startswith(key)]
        if not given:
            continue
        folder = Path(given[-1]).expanduser()
        problem = rundir.link_problem(folder)
        if problem or key == "hydra.run.dir=" or not folder.is_dir() or folder.is_symlink():
            if problem:
                return problem
            continue
        for job in sorted(folder.iterdir()):
            if job.is_dir() and not job.is_symlink():
                problem = rundir.link_problem(job)
                if problem:
                    return problem
    return None


def _choice(args: list[str], group: str, default: str | None) -> str | None:
    """The option chosen for a config group on the command line (the last `group=X` wins), else `default`."""
    chosen = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{group}=")]
    return chosen[-1] if chosen else default


@functools.cache  # conf/ does not change while ptv2 runs
def group_defaults(config_name: str) -> Mapping[str, tuple[str | None, bool]]:
    """{group: (default option, optional)} from the defaults list of conf/<config_name>.yaml."""
    defaults = {}
    for entry in OmegaConf.load(importlib.resources.files("ptv2.conf") / f"{config_name}.yaml").get("defaults", []):
        if isinstance(entry, DictConfig):
            for key, option in entry.items():
                defaults[key.removeprefix("optional ")] = (option, key.startswith("optional "))
    return MappingProxyType(defaults)


def missing_optional_option(config_name: str, args: list[str]) -> str | None:
    """An option of an optional group (preset, arm, experiment: `optional` in the command's defaults) that conf/
    lacks, as a line with the close names. Hydra skips a missing optional option without a word, so a misspelt
    preset would run the defaults."""
    import difflib

    conf = importlib.resources.files("ptv2.conf")
    optional = {group for group, (_, is_optional) in group_defaults(config_name).items() if is_optional}
    for arg in split_flags(args)[1]:
        group, _, value = arg.lstrip("+").partition("=")
        if group not in optional or not value or any(mark in value for mark in "($["):
            continue  # Hydra's sweep functions (glob(...), choice(...)) and interpolations are Hydra's to read
        known = sorted(
            path.name.removesuffix(".yaml") for path in (conf / group).iterdir() if path.name.endswith(".yaml")
        )
        for choice in value.split(","):
            if choice not in (*known, "none", "null"):
                close = difflib.get_close_matches(choice, known, n=2, cutoff=0.6)
                hint = f"did you mean {' or '.join(close)}?" if close else f"the options are in conf/{group}/"
                return f"{group}={choice} is unknown; {hint}"
    return None


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
    defaults = {group: option for group, (option, _) in group_defaults("train").items()}
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
    # Hydra advises `+key=...` for a key the schema lacks: that would add a key nothing reads (check_added_keys
    # refuses it); name the close key instead.
    parts = [part for part in parts if not part.lower().startswith("to append to your config use")]
    line = "; ".join([parts[0], *(part[0].lower() + part[1:] for part in parts[1:])])
    missing = re.search(r"Could not override '([^']+)'", line)
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


# Commands whose run folder may be named positionally, as `ckpt=`: `ptv2 eval RUN_DIR` = `ptv2 eval ckpt=RUN_DIR`.
CHECKPOINT_COMMANDS = ("eval", "predict", "serve")
SAFE_VALUE = re.compile(r"[\w./~-]+")


def positional_checkpoints(args: list[str]) -> tuple[list[str], str | None]:
    """The overrides with run folders/files given positionally turned into `ckpt=` (several: `ckpt=[A,B]`, which
    predict serves on one backbone), or a reason to refuse: a positional and a `ckpt=` together. A value with
    characters Hydra's override grammar does not take bare is quoted."""
    flags, overrides, lacking = split_flags(args)
    positional = [arg for arg in overrides if not arg.startswith(("+", "~")) and "=" not in arg]
    if not positional:
        return args, None
    if any(arg.startswith("ckpt=") for arg in overrides):
        return args, f"{positional[0]} and ckpt= both name the checkpoint; give one of them"
    quoted = [
        path if SAFE_VALUE.fullmatch(path) else "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
        for path in positional
    ]
    value = quoted[0] if len(quoted) == 1 else f"[{','.join(quoted)}]"
    return [*flags, f"ckpt={value}", *(arg for arg in overrides if arg not in positional), *lacking], None


def expanded_sweep(config_name: str, overrides: list[str]) -> list[list[str]] | None:
    """The settings of each job a basic-sweeper multirun starts (the config's sweeper params, then the command
    line's; hydra.* dropped), or None for sweepers that draw their values as they go (Optuna). Raises Hydra's and
    OmegaConf's errors."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    register()  # the schema and resolvers the composition needs (idempotent)
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="ptv2.conf", version_base="1.3"):
            base = compose(config_name=config_name, overrides=fixed, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    if not str(base.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    lines = [f"{key}={value}" for key, value in (base.hydra.sweeper.get("params") or {}).items()] + overrides
    jobs = [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(lines), None) for job in batch]
    return [[arg for arg in job if not arg.lstrip("+").startswith("hydra")] for job in jobs]


def sweep_value_problem(config_name: str, args: list[str]) -> str | None:
    """Every job of a basic-sweeper multirun composed and its values checked before the first job starts: the first
    bad one as a line naming the job's overrides, else None. Sweeps that another sweeper draws (Optuna) or that
    compose only inside Hydra's run (interpolations of hydra:) are left to each job's own check."""
    from hydra import compose, initialize_config_module

    overrides = split_flags(args)[1]
    if any(arg.lstrip("+").startswith("hydra/sweeper=") for arg in overrides):
        return None
    try:
        jobs = expanded_sweep(config_name, overrides)
        if jobs is None:
            return None  # Optuna and the like draw their values as they go
        with initialize_config_module(config_module="ptv2.conf", version_base="1.3"):
            for number, settings in enumerate(jobs):
                cfg = compose(config_name=config_name, overrides=settings)
                try:
                    check_values(cfg)
                except UserError as error:
                    return f"sweep job {number} ({' '.join(settings)}): {short_line(error)}; no job was started"
    except (HydraException, OmegaConfBaseException, ValueError, KeyError):
        return None  # reported as Hydra reports it, or by the job that meets it
    finally:
        GlobalHydra.instance().clear()
    return None


def usage() -> str:
    lines = [f"ptv2 {__version__}: P-Tuning v2 experiments", "", "usage: ptv2 <command> [overrides] [--help]", ""]
    lines += [f"  {name:<8}{text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "ptv2 <command> --help shows the command's config groups and options."]
    return "\n".join(lines)


def command_line(command: str, argv: list[str]) -> tuple[list[str], str | None, str | None]:
    """What Hydra gets for `ptv2 COMMAND ARGV` of a Hydra command: the arguments with flags first, run folders given
    positionally as ckpt= and train's official preset added; the preset's name; or the line refusing the command
    line (checks that need no composition; main then checks the sweep folder and every sweep job's values)."""
    config_name = COMMANDS[command][1]
    args, problem = flags_first(argv), None
    lacking = [arg for arg in args[-1:] if arg in VALUE_FLAGS]  # flags_first puts a flag without its value last
    if lacking:
        what = "job, hydra or all" if lacking[0] in ("-c", "--cfg") else "a value"
        return args, None, f"{lacking[0]} needs {what} after it (e.g. --cfg job)"
    if command == "bench":  # `ptv2 bench serve`: the server's load test
        args = ["bench.serve=true" if arg == "serve" else arg for arg in args]
    if command in CHECKPOINT_COMMANDS:
        args, problem = positional_checkpoints(args)
    problem = problem or unwritable_run_dir(args) or linked_run_dir(args) or launcher_knobs(args)
    problem = problem or missing_optional_option(config_name, args) or exclusive_modes(args)
    if problem:
        return args, None, problem
    if command == "train":
        args, preset = with_official_preset(args)
        return args, preset, None
    return args, None, None


def main(argv: list[str] | None = None) -> int:
    global job_error
    job_error = None
    sweep_jobs.clear()
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
    if config_name is None:
        return getattr(importlib.import_module(module_name), function_name)(argv[1:])

    def function(cfg: DictConfig, run_dir: Path):
        # Imported once the config composed: a mistake in it is reported before torch and transformers load.
        from ptv2.progress import quiet_library_bars

        quiet_library_bars()  # eval and predict load weights without the training loop's import of it
        return getattr(importlib.import_module(module_name), function_name)(cfg, run_dir)

    args, preset, problem = command_line(command, argv[1:])
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
    preexisting_run_dirs.clear()
    preexisting_run_dirs.update({path: {p.name for p in path.iterdir()} for path in named if path.is_dir()})
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
    except ValueError:
        if not failed_jobs or full_error:
            raise
        # Optuna's sweeper asks for the best trial after the last one and raises when every trial failed; the
        # failures, listed below, are the answer.
    for sweep_dir, jobs in sweep_jobs.items():
        print(summary.sweep_line(sweep_dir, jobs, len(failed_jobs)), file=sys.stderr)
    if failed_jobs:
        print(f"ptv2: {len(failed_jobs)} job(s) failed: {'; '.join(failed_jobs)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
