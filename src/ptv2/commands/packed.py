"""Packed sweeps: train a group of prompt jobs on ONE frozen backbone, in one process (`hydra/launcher=packed`).

This module decides which jobs may share a backbone (group_key, unpacked_reason) and gives each job of a group the
files a separate job writes (its lock, its log, its FAILED marker); the training itself is ptv2.loop's, the same
loop `ptv2 train` runs for one job. There every training batch (B rows) goes through the backbone as K x B rows:
block k is job k's copy of the batch with job k's own prefix, drawn with job k's own prompt dropout
(`jobs_per_forward` blocks per forward: all of them on a GPU, one at a time on a CPU, see
modeling.packing.default_jobs_per_forward). Prompts of different lengths or layer sets are zero-padded to the
longest one and the padded columns hidden from attention, so they get exactly zero weight. Rows never interact in
an encoder, so the sum of the K losses has, for each job's prompt and head, exactly that job's own gradient.

What may differ inside a group is in PER_JOB_KEYS; jobs that differ in anything else (task, backbone, data, batch
size, epochs, max length, method, seed, ...) go to different groups (`group_key`). A job whose loss turns NaN ends
alone with its FAILED marker; the others go on. A killed group resumes (trainer.resume=true) from its last group
save, every job at the same step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ptv2 import loop
from ptv2.checks import frozen_cache_refusal
from ptv2.config import PER_JOB, flat_keys, has_role, keys_with, task_members
from ptv2.errors import UserError
from ptv2.frozen import position_shift
from ptv2.loop import Job, fail
from ptv2.modeling import backbone
from ptv2.modeling.injection import config_dropout
from ptv2.modeling.methods import method, mixable
from ptv2.runs import resume as training_state
from ptv2.runs import rundir, session

log = logging.getLogger("ptv2")

# Settings a job of a group may have its own value for (config.PER_JOB: they live in its prompt, head, optimizer and
# scheduler, or only in its bookkeeping). Every other setting is shared by the group (it decides the backbone, the
# data and the batches).
PER_JOB_KEYS = keys_with(PER_JOB)


def unpacked_reason(cfg: DictConfig) -> str | None:
    """Why a job cannot share a backbone with others (it then runs as an ordinary job), or None."""
    row = method(cfg.prompt.method)
    if row.mixes_in_batch and row.pack_refusal:
        return f"prompt.method={row.name} {row.pack_refusal}"
    if not row.mixes_in_batch:
        packing = ", ".join(name for name in mixable() if method(name).packs)
        return f"prompt.method={row.name} changes the backbone or its input; only {packing} pack"
    if cfg.trainer.precision == "fp16":
        return "trainer.precision=fp16 scales the loss with one scaler per optimizer; use bf16 or no"
    heads = {task.get("head", "linear") for _, task in task_members(cfg.task)}
    shared_heads = sorted(heads & {"verbalizer", "lm"})
    if row.trains_backbone_heads and shared_heads:
        return f"a {row.name} {' and '.join(shared_heads)} head trains the backbone's LM head, shared by the jobs"
    return None


def group_key(cfg: DictConfig) -> str | None:
    """The settings a job shares with every job of its group (as JSON), or None when it must run alone. With the
    frozen cache on, jobs that can use it (no prompt at layer 0) and jobs that cannot go to different groups: one
    job prompting layer 0 would leave the whole group without the cache."""
    if unpacked_reason(cfg):
        return None
    flat = flat_keys(OmegaConf.to_container(cfg, resolve=True))
    shared = {k: v for k, v in flat.items() if not has_role(k, PER_JOB_KEYS)}
    # jobs that number their tokens from different prompt lengths (shift_positions) cannot share one cache either
    shared["frozen cache"] = (True, position_shift(cfg)) if frozen_cacheable(cfg) else (False, 0)
    return repr(sorted(shared.items()))


def frozen_cacheable(cfg: DictConfig) -> bool:
    """Whether the job could train from the frozen cache (trainer.cache_frozen not false, and nothing refuses it)."""
    setting = cfg.trainer.get("cache_frozen", "auto")
    if setting is False:
        return False
    try:
        config = _backbone_config(json.dumps(OmegaConf.to_container(cfg.backbone)))
        if setting == "auto" and config_dropout(config):  # auto caches only without dropout
            return False
        return frozen_cache_refusal(cfg, config) is None
    except (UserError, ValueError, TypeError):  # a backbone or prompt.layers that is wrong fails in its own job
        return False


@functools.lru_cache(maxsize=8)
def _backbone_config(backbone_cfg: str):
    return backbone.load_config(OmegaConf.create(json.loads(backbone_cfg)))


def groups(keys: list[str | None], max_pack: int) -> list[list[int]]:
    """Job indices grouped by key (first appearance order), each group cut to at most max_pack; None: alone."""
    by_key: dict[str, list[int]] = {}
    alone = []
    for index, key in enumerate(keys):
        (by_key.setdefault(key, []) if key is not None else alone).append(index)
    packed = [same[i : i + max_pack] for same in by_key.values() for i in range(0, len(same), max_pack)]
    return sorted([*packed, *([i] for i in alone)], key=lambda group: group[0])


# ----------------------------------------------------------------------------------------------- jobs


def new_job(cfg: DictConfig, run_dir: Path, hydra: DictConfig, num: int) -> Job:
    """A sweep job of a packed group; hydra: its Hydra config ({"hydra": ...}), current while its folder, tracker
    or failure record is written."""
    return Job(cfg, run_dir, num, scope=lambda: current(hydra, num))


class JobFilter(logging.Filter):
    """On a job's log file: lets through the records of that job and those of the whole group (no `job`
    attribute). On the ptv2 logger (tag=True): marks every record as the job's."""

    def __init__(self, num: int, tag: bool = False):
        super().__init__()
        self.num, self.tag = num, tag

    def filter(self, record: logging.LogRecord) -> bool:
        if self.tag:
            record.job = self.num
        return getattr(record, "job", self.num) == self.num


@contextlib.contextmanager
def current(hydra: DictConfig, num: int):
    """Inside: the job's Hydra config is HydraConfig (what its folder record and W&B run read) and ptv2's log lines
    go to its log only."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(hydra)
    tag = JobFilter(num, tag=True)
    log.addFilter(tag)
    try:
        yield
    finally:
        log.removeFilter(tag)
        HydraConfig.instance().cfg = saved


@contextlib.contextmanager
def job_logs(jobs: list[Job]):
    """Each job's <name>.log in its own folder (what Hydra's job logging writes for a separate job): the group's
    shared lines and the job's own; every line on the console carries its job number."""
    root = logging.getLogger()
    handlers = []
    for job in jobs:
        with job.scope():
            name = HydraConfig.get().job.name
        handler = logging.FileHandler(job.run_dir / f"{name}.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        handler.addFilter(JobFilter(job.num))
        root.addHandler(handler)
        handlers.append(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def settle_group_saves(jobs: list[Job]) -> None:
    """Before any job of a group opens its state: a group save that a kill cut short (the first one included) is
    finished or undone for every job together (runs.resume.settle_group), under each folder's lock, so that no job
    is refused for holding only the pending state and every job resumes from the same point."""
    folders = []
    for job in jobs:
        with contextlib.suppress(UserError):  # a bad trainer.resume ends its job when it opens, with its own line
            source = training_state.source(job.cfg, job.run_dir)
            if source is None and str(job.cfg.trainer.get("resume")).strip().lower() == "auto":
                source = job.run_dir  # auto with no state yet: still one of the group's points to agree on
            if source is not None:  # a job with no state yet counts too: it holds no point the others could keep
                folders.append(source)
    if not any((folder / training_state.STATE_DIR).is_dir() for folder in folders):
        return
    locks = []
    try:
        for folder in folders:
            if folder.is_dir():
                locks.append(rundir.RunLock(folder))
        training_state.settle_group(folders)
    except UserError:  # a folder in use or unreadable: its job says so when it opens
        pass
    finally:
        for lock in locks:
            lock.release()


def train_group(jobs: list[Job], jobs_per_forward: int | None) -> None:
    """Train every job of a group (ptv2.loop.train); each ends with `results` (written to its folder) or `error`
    (recorded in its folder by session.fail_job). Every job's folder is opened (checked, locked, config written)
    before any of them trains."""
    settle_group_saves(jobs)
    locks = []
    for job in jobs:
        job.report = session.fail_job
        try:
            with job.scope():
                locks.append(session.open_job(job.cfg, job.run_dir, "train"))
        except Exception as error:
            fail(job, error)
    opened = [job for job in jobs if job.running]
    with job_logs(opened):
        try:
            if opened:
                log.info("packed group of %d jobs: %s", len(opened), ", ".join(str(job.num) for job in opened))
                loop.train(opened, jobs_per_forward)
        except Exception as error:  # a failure of the whole group (data, backbone): every job still running fails
            for job in opened:
                if job.running:
                    fail(job, error)
        finally:
            for lock in locks:
                if lock is not None:
                    lock.release()
