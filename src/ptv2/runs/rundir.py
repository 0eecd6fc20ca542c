"""Run directories: unique default names, one writer at a time, and no finished run replaced by accident.

Every Hydra command (train, eval, predict, bench) opens its run directory through `open_run_dir` before it writes
anything there: it takes a lock on the folder (a second run aimed at the same folder is refused while the first
writes it), refuses a folder that already holds a finished run unless `trainer.resume` continues it or
`trainer.overwrite=true` replaces it, checks a resume before touching the folder, and only then writes
`config.yaml` and `.hydra/` (Hydra's own copy is switched off in conf/train.yaml: `hydra.output_subdir: null`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import secrets
import shutil
import socket
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ptv2.errors import UserError
from ptv2.io import write_text

# The training state's subfolder (resume.STATE_DIR, test_first_hour checks they agree): named here so that checking a
# run folder, which every start does before its config errors can show, imports no torch; resume is imported where
# a resume is checked.
STATE_DIR = "state"

LOCK_FILE = ".ptv2.lock"
# What a finished (or interrupted) run leaves: a folder holding one of these is not written into silently.
RUN_OUTPUTS = ("results.json", "prompt.safetensors", STATE_DIR, "eval.json", "predict.json", "bench.json")
# What `ptv2 train trainer.overwrite=true` removes before it starts, so a crash never leaves the old run's results
# beside the new run's config.
TRAIN_OUTPUTS = ("results.json", "prompt.safetensors", STATE_DIR, "FAILED", "history.json")


class RunDirInUse(UserError):
    """The run directory holds another run (finished or still writing): refused, nothing written."""


class AlreadyFinished(UserError):
    """A resume (trainer.resume=true/auto) aimed at a run that already finished: nothing to do, nothing written."""


# Subfolders ptv2 writes into: a link planted there (or at the top of the run folder) would carry writes elsewhere.
WRITTEN_SUBFOLDERS = (".hydra", STATE_DIR)


def link_problem(run_dir: Path) -> str | None:
    """Why ptv2 may not write into `run_dir` because of a symbolic link, or None. A run folder received from someone
    else may hold links (config.yaml -> ~/.bashrc); ptv2 never writes through one: a link at the top of the folder,
    in .hydra/ or in state/ is refused, as is a run folder that is itself a dangling link."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        return (
            f"the run directory {run_dir} is a symbolic link to {os.readlink(run_dir)}, which does not exist; "
            "remove the link or pass hydra.run.dir=DIR with a real folder"
        )
    if not run_dir.is_dir():
        return None
    folders = [run_dir, *(run_dir / name for name in WRITTEN_SUBFOLDERS if (run_dir / name).is_dir())]
    for folder in folders:
        try:
            links = sorted(entry.name for entry in folder.iterdir() if entry.is_symlink())
        except OSError:
            continue  # unreadable: the lock or the write that needs it says so
        if links:
            where = Path(folder.name) / links[0] if folder != run_dir else Path(links[0])
            return (
                f"{run_dir} holds a symbolic link ({where} -> {os.readlink(folder / links[0])}) where ptv2 writes; "
                "ptv2 never writes through links in a run folder: remove it (or copy the run with cp -rL) and retry"
            )
    return None


def unique_now() -> str:
    """`${unique_now:}` in conf/: the start time and 6 random hex digits, so runs started in the same second (on
    one machine or many) get different default folders. Registered with use_cache: one value per run (and per
    sweep: Hydra copies the cache into every job's config)."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}-{secrets.token_hex(3)}"


def finished_outputs(folder: Path) -> list[str]:
    """What a run left in `folder` that a new start must not replace silently (a state folder counts once it holds
    a state: a run killed before its first save left nothing to lose)."""
    found = [name for name in RUN_OUTPUTS if (Path(folder) / name).exists()]
    state = Path(folder) / STATE_DIR
    if STATE_DIR in found and state.is_dir() and not state.is_symlink() and not any(state.iterdir()):
        found.remove(STATE_DIR)
    return found


class RunLock:
    """An exclusive flock on <run dir>/.ptv2.lock for as long as a run writes the folder; the kernel drops it when
    the process ends in any way (SIGKILL included), so a crashed run never leaves a stale lock (a killed run leaves
    the file, unlocked; a released lock removes it). The holder's name is written into the file only by claim(),
    once the folder is known to be this run's."""

    def __init__(self, run_dir: Path, tries: int = 3):
        self.path = Path(run_dir) / LOCK_FILE
        for _ in range(tries):
            self._acquire(run_dir)
            if self._still_ours():
                return
            # The holder removed the file as it released it, between our open and our lock: lock the new one.
            self.handle.close()
        raise RunDirInUse(f"{run_dir} is being opened and closed by other ptv2 runs; retry")

    def _still_ours(self) -> bool:
        """Whether the locked file is still the one at self.path (a releasing holder removes it)."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.handle.fileno()).st_ino
        except OSError:
            return False

    def _acquire(self, run_dir: Path) -> None:
        try:
            # O_NOFOLLOW: a link planted as the lock file is refused, never opened (and never created through).
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            raise UserError(self._open_failure(run_dir, error)) from None
        self.handle = os.fdopen(descriptor, "r+")
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

    def _open_failure(self, run_dir: Path, error: OSError) -> str:
        """One line naming why the lock file cannot be opened: a link, a folder, another user's file, no access."""
        if error.errno == errno.ELOOP:
            return f"{self.path} is a symbolic link; ptv2 never writes through links in a run folder: remove it"
        if self.path.is_dir():
            return f"{self.path} is a folder, not ptv2's lock file: remove it (rmdir {self.path}) and retry"
        if error.errno in (errno.EACCES, errno.EPERM) and self.path.exists():
            owner = self.path.stat().st_uid
            if owner != os.getuid():
                try:
                    name = pwd.getpwuid(owner).pw_name
                except KeyError:
                    name = f"uid {owner}"
                return (
                    f"{self.path} belongs to another user ({name}): the run folder is theirs; choose another "
                    "hydra.run.dir"
                )
        return f"cannot write into the run directory {run_dir} ({error.strerror}); choose another hydra.run.dir"

    def claim(self) -> None:
        """Write the holder (pid and host) into the lock file, for a second run's refusal to name."""
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        """Remove the lock file (a finished run's folder holds only what the run wrote), then unlock."""
        if not self.handle.closed:
            if self._still_ours():
                self.path.unlink(missing_ok=True)
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def refuse_finished_resume(cfg: DictConfig, run_dir: Path, command: str) -> None:
    """A `ptv2 train` that would resume a run which already finished (its results.json is written last) ends with
    AlreadyFinished: there is nothing to continue, and continuing would rewrite its results' timings. The resume is
    checked first, so a changed config is refused as a changed config rather than called finished."""
    from ptv2.runs import resume as state

    run_dir = Path(run_dir)
    if command == "train" and state.source(cfg, run_dir) == run_dir and (run_dir / "results.json").exists():
        state.check(cfg, run_dir)
        raise AlreadyFinished(f"{run_dir} holds a finished run (results.json): nothing to resume, nothing written")


def check_reuse(cfg: DictConfig, run_dir: Path, command: str, read_only: bool = False) -> None:
    """Refuse to write a run into a folder that holds another one, unless it continues (train with trainer.resume)
    or replaces it (trainer.overwrite=true); a resume is checked (state present, readable, same config) here,
    before anything is written. read_only: the checks alone (a process that does not own the run folder, as the
    non-main processes of a multi-process launch: the main one removes what trainer.overwrite replaces)."""
    from ptv2.runs import resume as state

    refuse_finished_resume(cfg, run_dir, command)
    resuming = command == "train" and state.source(cfg, run_dir) is not None
    if resuming:
        state.check(cfg, run_dir)
    found = finished_outputs(run_dir)
    if not found or (resuming and state.source(cfg, run_dir) == Path(run_dir)):
        return
    if cfg.trainer.get("overwrite"):
        if command == "train" and not read_only:
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
    would have written them before the job; written only once the folder is known to be this run's. Every file is
    written atomically (a link in its place is replaced, never followed)."""
    problem = link_problem(run_dir)
    if problem:
        raise UserError(problem)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    hydra_dir = Path(run_dir) / ".hydra"
    hydra_cfg = HydraConfig.get()
    records = {
        hydra_dir / "config.yaml": OmegaConf.to_yaml(cfg),
        hydra_dir / "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        hydra_dir / "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))),
        Path(run_dir) / "config.yaml": resolved,
    }
    try:
        hydra_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only folder, a file named .hydra
        raise UserError(f"cannot write the run's config into {run_dir} ({error.strerror or error})") from None
    for path, text in records.items():
        write_text(path, text)


def mark_failed(cfg: DictConfig, run_dir: Path, reason: str = "see the job's log") -> None:
    """The FAILED marker of a failed sweep job (read by `ptv2 table`), holding the one-line reason, with the job's
    config and Hydra record when it failed before writing them (a value refused at start-up), so the table can name
    its overrides. A folder holding links gets no record (write_config refuses it); the marker replaces a link of its
    name, never follows it."""
    if not (Path(run_dir) / ".hydra" / "overrides.yaml").exists():
        try:
            write_config(cfg, run_dir)
        except Exception:  # an unresolvable config, a link: the marker alone still says the job failed
            pass
    try:
        write_text(Path(run_dir) / "FAILED", reason.rstrip("\n") + "\n")
    except UserError:  # a read-only or full folder: the failed list printed at the end still names the job
        pass


def open_run_dir(cfg: DictConfig, run_dir: Path, command: str) -> RunLock:
    """Lock the run directory, check it may be written, write the config; the caller releases the lock.

    Checked before anything is written: no link where ptv2 writes, no finished run resumed (AlreadyFinished: the
    folder stays byte-identical, the lock file included)."""
    problem = link_problem(run_dir)
    if problem:
        raise UserError(problem)
    refuse_finished_resume(cfg, run_dir, command)
    lock = RunLock(run_dir)
    try:
        if command == "train":
            from ptv2.runs import resume as state

            source = state.source(cfg, run_dir)
            if source is not None and (source / STATE_DIR).is_dir():
                state.settle_group([source])  # a save cut short (a packed group settles all its jobs first)
        check_reuse(cfg, run_dir, command)
        lock.claim()
        # A sweep job that failed (a SIGTERM, an error) and now starts again: its old FAILED marker would make
        # `ptv2 table` call the job a failure even once it finishes; a new failure writes a new one.
        (Path(run_dir) / "FAILED").unlink(missing_ok=True)
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
