"""The command line of a Hydra command before Hydra composes it: what ptv2 checks and rewrites in `ptv2 COMMAND
ARGV` so that a mistake is one line before torch loads or Hydra writes anything (a run folder that cannot be
written or holds links, a misspelt optional option, a sweep whose jobs' values are out of range), and what it adds
(the official preset, run folders given positionally as ckpt=). `register` holds what every Hydra command needs
registered.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import itertools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptv2 import config
from ptv2.checks import check_values
from ptv2.errors import UserError, short_line
from ptv2.runs import rundir

log = logging.getLogger("ptv2")


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
    Plugins.instance().register(PackedLauncher)


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
    # The basic sweeper's expansion, through the override parser's public API: a key's last override wins (in the
    # place of its first), a sweep gives one job per value, and the jobs are the product of the keys' values.
    choices: dict[str, list[str]] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise HydraException(f"{override.input_line}: the basic sweeper takes only lists, range() and choice()")
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    jobs = [list(job) for job in itertools.product(*choices.values())]
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


def command_line(command: str, config_name: str, argv: list[str]) -> tuple[list[str], str | None, str | None]:
    """What Hydra gets for `ptv2 COMMAND ARGV` of a Hydra command: the arguments with flags first, run folders given
    positionally as ckpt= and train's official preset added; the preset's name; or the line refusing the command
    line (checks that need no composition; main then checks the sweep folder and every sweep job's values)."""
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
