"""Run directories: unique default names, one writer at a time, and no finished run replaced by accident.

Every Hydra command (train, eval, predict, bench) opens its run directory through `open_run_dir` before it writes
anything there: it takes a lock on the folder (a second run aimed at the same folder is refused while the first
writes it), refuses a folder that already holds a finished run unless `trainer.resume` continues it or
`trainer.overwrite=true` replaces it, checks a resume before touching the folder, and only then writes
`config.yaml` and `.hydra/` (Hydra's own copy is switched off in conf/train.yaml: `hydra.output_subdir: null`).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import socket
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ptv2.errors import UserError
from ptv2.runs import resume as state

LOCK_FILE = ".ptv2.lock"
# What a finished (or interrupted) run leaves: a folder holding one of these is not written into silently.
RUN_OUTPUTS = ("results.json", "prompt.safetensors", state.STATE_DIR, "eval.json", "predict.json", "bench.json")
# What `ptv2 train trainer.overwrite=true` removes before it starts, so a crash never leaves the old run's results
# beside the new run's config.
TRAIN_OUTPUTS = ("results.json", "prompt.safetensors", state.STATE_DIR, "FAILED", "history.json")


class RunDirInUse(UserError):
    """The run directory holds another run (finished or still writing): refused, nothing written."""


def unique_now() -> str:
    """`${unique_now:}` in conf/: the start time and 6 random hex digits, so runs started in the same second (on
    one machine or many) get different default folders. Registered with use_cache: one value per run (and per
    sweep: Hydra copies the cache into every job's config)."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}-{secrets.token_hex(3)}"


def finished_outputs(folder: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (Path(folder) / name).exists()]


class RunLock:
    """An exclusive flock on <run dir>/.ptv2.lock for as long as a run writes the folder; the kernel drops it when
    the process ends in any way (SIGKILL included), so a crashed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        try:
            self.handle = open(self.path, "a+")
        except OSError as error:
            raise UserError(f"cannot write into the run directory {run_dir} ({error.strerror})") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunDirInUse(
                f"{run_dir} is being written by another ptv2 run ({holder}); wait for it to end or choose another "
                "hydra.run.dir"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def check_reuse(cfg: DictConfig, run_dir: Path, command: str) -> None:
    """Refuse to write a run into a folder that holds another one, unless it continues (train with trainer.resume)
    or replaces it (trainer.overwrite=true); a resume is checked (state present, readable, same config) here,
    before anything is written."""
    resuming = command == "train" and state.source(cfg, run_dir) is not None
    if resuming:
        state.check(cfg, run_dir)
    found = finished_outputs(run_dir)
    if not found or (resuming and state.source(cfg, run_dir) == Path(run_dir)):
        return
    if cfg.trainer.get("overwrite"):
        if command == "train":
            for name in TRAIN_OUTPUTS:
                target = Path(run_dir) / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return
    hint = "continue it with trainer.resume=true, " if command == "train" and not resuming else ""
    raise RunDirInUse(
        f"{run_dir} already holds a run ({', '.join(found)}); {hint}replace it with trainer.overwrite=true, "
        "or choose another hydra.run.dir"
    )


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml (resolved) and Hydra's record in .hydra/ (config.yaml, hydra.yaml, overrides.yaml), as Hydra
    would have written them before the job; written only once the folder is known to be this run's."""
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    hydra_dir = Path(run_dir) / ".hydra"
    hydra_cfg = HydraConfig.get()
    try:
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, hydra_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), hydra_dir / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), hydra_dir / "overrides.yaml")
        (Path(run_dir) / "config.yaml").write_text(resolved)
    except OSError as error:  # a full disk, a read-only folder
        raise UserError(f"cannot write the run's config into {run_dir} ({error.strerror or error})") from None


def mark_failed(cfg: DictConfig, run_dir: Path) -> None:
    """The FAILED marker of a failed sweep job (read by `ptv2 table`), with the job's config and Hydra record when it
    failed before writing them (a value refused at start-up), so the table can name its overrides."""
    if not (Path(run_dir) / ".hydra" / "overrides.yaml").exists():
        try:
            write_config(cfg, run_dir)
        except Exception:  # an unresolvable config: the marker alone still says the job failed
            pass
    (Path(run_dir) / "FAILED").write_text("see the job's log\n")


def open_run_dir(cfg: DictConfig, run_dir: Path, command: str) -> RunLock:
    """Lock the run directory, check it may be written, write the config; the caller releases the lock."""
    lock = RunLock(run_dir)
    try:
        check_reuse(cfg, run_dir, command)
        write_config(cfg, run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def sweep_dir_in_use(args: list[str]) -> str | None:
    """Why an explicit hydra.sweep.dir on a `-m` command line may not be used, or None: a folder whose job folders
    hold finished runs is refused before Hydra rewrites its multirun.yaml, unless the command resumes or overwrites."""
    key = "hydra.sweep.dir="
    given = [arg[len(key) :] for arg in args if arg.startswith(key)]
    if not given or not ("-m" in args or "--multirun" in args):
        return None
    if any(arg.startswith(("trainer.resume=", "trainer.overwrite=")) and not arg.endswith("=false") for arg in args):
        return None
    folder = Path(given[-1]).expanduser()
    jobs = sorted(p.name for p in folder.iterdir() if p.is_dir() and finished_outputs(p)) if folder.is_dir() else []
    if not jobs:
        return None
    return (
        f"{folder} already holds a sweep (job folders {', '.join(jobs[:5])}{', ...' if len(jobs) > 5 else ''}); "
        "continue it with trainer.resume=true, replace it with trainer.overwrite=true, or choose another "
        "hydra.sweep.dir"
    )
