"""One command's life in its run folder, for every command that writes one (train, a packed group's jobs, eval,
predict, bench): values checked → folder locked and checked → config recorded → work → results, FAILED, or the
folder as it was.

`run_job` is what each Hydra application calls for its job; the packed launcher calls `open_job` and `fail_job` for
each job of a group and `objective` for what it hands back to the sweeper. A sweep's closing line comes from
`SweepSummary`, a Hydra callback that reads the sweep folder in the process that started the sweep, so it counts the
jobs of every launcher (joblib's and SLURM's run elsewhere).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptv2.checks import check_values
from ptv2.config import check_added_keys, check_launcher
from ptv2.errors import UserError, short_line
from ptv2.runs import rundir, summary

log = logging.getLogger("ptv2")


class Outcome:
    """What the jobs of this process's command ended as, for `ptv2` to print and exit with (main may run several
    times in one process: the tests call it in-process, so `reset` starts each command afresh)."""

    failed: list[str] = []  # "job N (folder)" of each failed sweep job
    sweeps: dict[str, tuple[int, int]] = {}  # sweep folder -> (jobs, failed), from SweepSummary
    job_error: Exception | None = None  # an error raised inside a single run reaches main as it is
    # Run folders named on the command line that existed before this start, with the names they held: a refused
    # start leaves them as they were.
    preexisting: dict[Path, set[str]] = {}

    @classmethod
    def reset(cls, named_run_dirs: list[Path] = ()) -> None:
        cls.failed, cls.sweeps, cls.job_error = [], {}, None
        cls.preexisting = {path: {p.name for p in path.iterdir()} for path in named_run_dirs if path.is_dir()}


def resolved(cfg: DictConfig) -> None:
    """Every interpolation of the config resolves (`${oc.env:NAME}` of an unset variable, a missing key), else one
    line naming it."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise UserError(f"the config does not resolve: {str(error).splitlines()[0]}") from None


def process_owns_run_dir() -> bool:
    """Whether this process writes the run directory: every process but the non-main ones of a multi-process launch
    (`accelerate launch`/torchrun set RANK and WORLD_SIZE, both or neither). A RANK alone (left in the environment)
    does not make a process a follower: it still locks and checks the folder."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    values = {name: os.environ.get(name) for name in names}
    try:
        rank, world = int(values["RANK"] or 0), int(values["WORLD_SIZE"] or 1)
        int(values["LOCAL_RANK"] or 0)
    except ValueError:
        shown = " / ".join(f"{name}={values[name]!r}" for name in names if values[name] is not None)
        raise UserError(
            f"{shown} are not integers; unset them, or let the launcher (accelerate launch, torchrun) set them"
        ) from None
    if rank < 0 or world < 1 or (world > 1 and rank >= world):
        raise UserError(
            f"RANK={rank} with WORLD_SIZE={world} is no process of the launch (0 <= RANK < WORLD_SIZE); unset them, "
            "or let the launcher (accelerate launch, torchrun) set them"
        )
    if values["LOCAL_RANK"] is not None and values["RANK"] is None:  # torch.distributed would ask for RANK
        raise UserError(
            "LOCAL_RANK is set without RANK: a multi-process launch sets RANK, WORLD_SIZE and LOCAL_RANK together; "
            "unset LOCAL_RANK, or start ptv2 with accelerate launch or torchrun"
        )
    return rank == 0 or world <= 1


def open_job(cfg: DictConfig, run_dir: Path, command: str) -> rundir.RunLock | None:
    """Every value checked, the run directory locked and checked, the config written; the caller releases the lock."""
    resolved(cfg)
    check_values(cfg)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        check_added_keys(list(hydra_cfg.overrides.task), set(hydra_cfg.runtime.choices))
        check_launcher(hydra_cfg.launcher)
    if not process_owns_run_dir():
        # The main process locks and writes the folder; this one still refuses a folder it may not train into.
        rundir.refuse_finished_resume(cfg, run_dir, command)
        rundir.check_reuse(cfg, run_dir, command, read_only=True)
        return None
    return rundir.open_run_dir(cfg, run_dir, command)


def fail_job(error: Exception, cfg: DictConfig, run_dir: Path, job_num) -> None:
    """A failed sweep job (the sweep goes on): its error in its log and in its FAILED marker (one line for a user
    error, else the exception's last line; the traceback in the log), its entry in the failed list; a folder that is
    another run's, or a finished run's, is left as it is."""
    if isinstance(error, rundir.AlreadyFinished):  # not a failure; printed, not logged: its log stays as it was
        print(f"ptv2: job {job_num}: {error}", file=sys.stderr)
        return
    line = short_line(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}".splitlines()[0]
    if (Path(run_dir) / "results.json").exists():  # a finished job (a refused resume): its folder stays as it was
        print(f"ptv2: job {job_num}: error: {line}", file=sys.stderr)
        Outcome.failed.append(f"job {job_num} ({run_dir}: finished before)")
        return
    if isinstance(error, UserError):
        log.error(f"ptv2: error: {line}")
    else:
        log.error("job %s failed:\n%s", job_num, "".join(traceback.format_exception(error)))
    if isinstance(error, rundir.RunDirInUse):
        Outcome.failed.append(f"job {job_num} ({run_dir}: in use)")
        return
    Outcome.failed.append(f"job {job_num} ({run_dir})")
    rundir.mark_failed(cfg, run_dir, line)


# What a start writes before the command's own checks (layers, data) can refuse it: removed again on a refusal
# (and Hydra's <command>.log: train.log, eval.log, ...).
START_FILES = (rundir.LOCK_FILE, "config.yaml", ".hydra")


def discard_unused_run_dir(run_dir: Path) -> None:
    """A refused start leaves nothing behind: Hydra made the run folder and its log, open_job the lock, config.yaml
    and .hydra/, before a layer or data check refused the run. Only those are removed, and only when the folder
    holds nothing else this start made (a run that got as far as a state or a checkpoint keeps everything); what
    was there before this start stays, and a folder that existed before stays."""
    before = Outcome.preexisting.get(Path(run_dir).absolute())
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


def objective(result: Any) -> Any:
    """What a job hands back to Hydra's sweeper: a results dict becomes its selection value ("best_value", the dev
    metric that picked the best epoch), the float that optimizing sweepers (hydra/sweeper=optuna) maximize; the
    basic sweeper ignores it. Anything else passes through; a failed job returns None, which Optuna records as FAIL."""
    if isinstance(result, dict) and "best_value" in result:
        return float(result["best_value"])
    return result


def run_job(function, cfg: DictConfig, command: str) -> Any:
    """Run one job of a Hydra command: function(cfg, run_dir) between opening its folder and releasing it. A user
    error ends a single run with one line and exit code 2 and leaves no trace of the start, and fails only its own
    job in a sweep (the sweep goes on and `ptv2` exits non-zero at the end)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    lock = None
    try:
        lock = open_job(cfg, run_dir, command)
        return objective(function(cfg, run_dir))
    except rundir.AlreadyFinished as note:  # a resume of a finished run: nothing to do, the folder as it was
        print(f"ptv2: {note}", file=sys.stderr)
        _close_log(run_dir)
        return None
    except UserError as error:
        if not sweeping:
            print(f"ptv2: error: {short_line(error)}", file=sys.stderr)
            if lock is not None:
                lock.release()
            _close_log(run_dir)
            if isinstance(error, rundir.RunDirInUse):  # another run's folder (maybe being written): only our log
                remove_own_log(run_dir)
            else:
                discard_unused_run_dir(run_dir)
            sys.exit(2)
        fail_job(error, cfg, run_dir, hydra_cfg.job.num)
    except Exception as error:
        if not sweeping:
            Outcome.job_error = error  # a failure inside the job: a traceback, not a config mistake
            raise
        fail_job(error, cfg, run_dir, hydra_cfg.job.num)
    finally:
        if lock is not None:
            lock.release()
    return None


def remove_own_log(run_dir: Path) -> None:
    """The empty log Hydra made for this start in a folder the user named that holds another run: removed, so that
    folder stays as it was (a log that was there before, or that holds lines, is another run's and stays)."""
    before = Outcome.preexisting.get(Path(run_dir).absolute())
    if before is None or not HydraConfig.initialized():
        return
    log_file = Path(run_dir) / f"{HydraConfig.get().job.name}.log"
    if log_file.name not in before and log_file.is_file() and not log_file.is_symlink():
        if log_file.stat().st_size == 0:
            log_file.unlink()


def _close_log(run_dir: Path) -> None:
    """Close Hydra's log file of this job, so that a refused start can remove it (discard_unused_run_dir)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == Path(run_dir).absolute():
            root.removeHandler(handler)
            handler.close()


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/callbacks): at the end of a multirun, in the process that started it, the jobs
    found in the sweep folder and those that failed (a FAILED marker), for the line that ends the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()] if sweep_dir.is_dir() else []
        for job in jobs:  # a job of another process (joblib, SLURM): its failure was recorded only in its folder
            if (job / "FAILED").exists() and not any(f"({job}" in line for line in Outcome.failed):
                Outcome.failed.append(f"job {job.name} ({job})")
        failed = sum(f"({sweep_dir}{os.sep}" in line for line in Outcome.failed)
        Outcome.sweeps[str(sweep_dir)] = (max(len(jobs), failed), failed)


def closing_lines() -> list[str]:
    """The lines that end a command: each sweep's summary, then the failed jobs."""
    lines = [summary.sweep_line(folder, jobs, failed) for folder, (jobs, failed) in Outcome.sweeps.items()]
    if Outcome.failed:
        lines.append(f"ptv2: {len(Outcome.failed)} job(s) failed: {'; '.join(Outcome.failed)}")
    return lines
