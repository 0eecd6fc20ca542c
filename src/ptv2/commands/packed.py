"""Packed sweeps: train a group of prompt jobs on ONE frozen backbone, in one process (`hydra/launcher=packed`).

Every training batch (B rows) goes through the backbone as K x B rows: block k is job k's copy of the batch with
job k's own prefix, drawn with job k's own prompt dropout (`jobs_per_forward` blocks per forward: all of them on a
GPU, one at a time on a CPU, see modeling.packing.default_jobs_per_forward). Prompts of different lengths or layer
sets are zero-padded to the longest one and the padded columns hidden from attention (the serving path's mask), so
they get exactly zero weight. Rows never interact in an encoder, so the sum of the K losses has, for each job's
prompt and head, exactly that job's own gradient; each job then clips, steps its own optimizer and scheduler, keeps
its own best epoch, checkpoint, training state, results.json, log and W&B run in its own job folder: the files a
separate job writes. Evaluation batches are packed the same way.

What may differ inside a group is in PER_JOB_KEYS; jobs that differ in anything else (task, backbone, data, batch
size, epochs, max length, method, seed, ...) go to different groups (`group_key`). A job whose loss turns NaN ends
alone with its FAILED marker; the others go on. A killed group resumes (trainer.resume=true) each job from its own
state; a job whose state is ahead of another's waits until the group's batches reach it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ptv2 import engine
from ptv2.commands.train import end_epoch, epoch_line, results_of, total_steps
from ptv2.config import flat_keys, task_members, validate
from ptv2.errors import UserError
from ptv2.io import write_json
from ptv2.modeling import backbone
from ptv2.modeling.methods import method, mixable
from ptv2.modeling.model import PromptModel
from ptv2.modeling.packing import chunked, default_jobs_per_forward, packed_hidden
from ptv2.optim import make_optimizer, make_scheduler
from ptv2.runs import checkpoint
from ptv2.runs import resume as training_state
from ptv2.runs.progress import epoch_progress
from ptv2.runs.resume import Progress
from ptv2.runs.tracking import Tracker

log = logging.getLogger("ptv2")

# Settings a job of a group may have its own value for: they live in its prompt, head, optimizer and scheduler, or
# only in its bookkeeping. Every other setting is shared by the group (it decides the backbone, the data and the
# batches).
PER_JOB_KEYS = (
    "prompt.length",
    "prompt.layers",
    "prompt.projection",
    "prompt.projection_dim",
    "prompt.dropout",
    "prompt.init_std",
    "prompt.init_from",
    "prompt.shift_positions",  # each block of rows gets its own position ids
    "task.head_dropout",
    "optimizer.",
    "scheduler.",
    "trainer.max_grad_norm",
    "trainer.early_stopping_patience",
    "trainer.save_checkpoint",
    "logger.",
)


def unpacked_reason(cfg: DictConfig) -> str | None:
    """Why a job cannot share a backbone with others (it then runs as an ordinary job), or None."""
    row = method(cfg.prompt.method)
    if not row.mixes_in_batch:
        return f"prompt.method={row.name} changes the backbone or its input; only {', '.join(mixable())} pack"
    if cfg.trainer.precision == "fp16":
        return "trainer.precision=fp16 scales the loss with one scaler per optimizer; use bf16 or no"
    heads = {task.get("head", "linear") for _, task in task_members(cfg.task)}
    if row.trains_backbone_heads and "verbalizer" in heads:
        return f"a {row.name} verbalizer trains the backbone's MLM head, which the jobs would share"
    return None


def group_key(cfg: DictConfig) -> str | None:
    """The settings a job shares with every job of its group (as JSON), or None when it must run alone."""
    if unpacked_reason(cfg):
        return None
    flat = flat_keys(OmegaConf.to_container(cfg, resolve=True))
    shared = {k: v for k, v in flat.items() if not k.startswith(PER_JOB_KEYS)}
    return repr(sorted(shared.items()))


def groups(keys: list[str | None], max_pack: int) -> list[list[int]]:
    """Job indices grouped by key (first appearance order), each group cut to at most max_pack; None: alone."""
    by_key: dict[str, list[int]] = {}
    alone = []
    for index, key in enumerate(keys):
        (by_key.setdefault(key, []) if key is not None else alone).append(index)
    packed = [same[i : i + max_pack] for same in by_key.values() for i in range(0, len(same), max_pack)]
    return sorted([*packed, *([i] for i in alone)], key=lambda group: group[0])


# ----------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One sweep job of a packed group: its config, folder, Hydra record, and everything its training carries."""

    cfg: DictConfig
    run_dir: Path
    hydra: DictConfig  # {"hydra": ...}: the job's Hydra config, current while its folder or tracker is written
    num: int
    lock: object = None
    report: object = None  # report(error, cfg, run_dir, num): a failed job's log line, failed list, FAILED marker
    model: PromptModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    schedule_unit: str = "step"
    train_step: engine.TrainStep | None = None  # clipping, optimizer and per-step scheduler steps
    tracker: Tracker | None = None
    counts: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    start: tuple[int, int] = (0, 0)  # (epoch, batches done) where its own training (re)starts
    rng: dict | None = None
    error: Exception | None = None
    results: dict | None = None

    @property
    def running(self) -> bool:
        return self.error is None and self.results is None

    def log(self, message: str, *args) -> None:
        log.info(message, *args, extra={"job": self.num})


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
def current(job: Job):
    """Inside: the job's Hydra config is HydraConfig (what its folder record and W&B run read) and ptv2's log lines
    go to its log only."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job.hydra)
    tag = JobFilter(job.num, tag=True)
    log.addFilter(tag)
    try:
        yield
    finally:
        log.removeFilter(tag)
        HydraConfig.instance().cfg = saved


@contextlib.contextmanager
def job_logs(jobs: list[Job]):
    """Each job's <name>.log in its own folder (what Hydra's job logging writes for a separate job): the group's
    shared lines and the job's own."""
    root = logging.getLogger()
    handlers = []
    for job in jobs:
        handler = logging.FileHandler(job.run_dir / f"{job.hydra.hydra.job.name}.log")
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


def fail(job: Job, error: Exception) -> None:
    """End one job as a failed sweep job (log line, failed list, FAILED marker: job.report); the group goes on."""
    job.error = error
    if job.tracker is not None:
        job.tracker.finish()
    with current(job):
        job.report(error, job.cfg, job.run_dir, job.num)


def train_group(jobs: list[Job], jobs_per_forward: int | None, open_job, report) -> None:
    """Train every job of a group; each ends with `results` (written to its folder) or `error` (reported).

    jobs_per_forward: how many jobs' blocks share one backbone forward (None: packing.default_jobs_per_forward).
    open_job(cfg, run_dir, command) -> lock, report(error, cfg, run_dir, job number): what the command line does
    for every job before it runs and when it fails (cli.open_job, cli.record_failure; passed in by the launcher,
    as the cli sits above the commands)."""
    for job in jobs:
        job.report = report
        try:
            with current(job):
                job.lock = open_job(job.cfg, job.run_dir, "train")
        except Exception as error:
            fail(job, error)
    opened = [job for job in jobs if job.running]
    with job_logs(opened):
        try:
            if opened:
                log.info("packed group of %d jobs: %s", len(opened), ", ".join(str(job.num) for job in opened))
                _train(opened, jobs_per_forward)
        except Exception as error:  # a failure of the whole group (data, backbone): every job still running fails
            for job in opened:
                if job.running:
                    fail(job, error)
        finally:
            for job in jobs:
                if job.lock is not None:
                    job.lock.release()


# ----------------------------------------------------------------------------------------------- the loop


def _build(jobs: list[Job], accelerator: Accelerator):
    """Data once, the backbone once, then each job's PromptModel on it, initialised exactly as its separate run
    would be (each job starts from the RNG state the backbone left, as a separate run builds its model there)."""
    backbone_config = backbone.load_config(jobs[0].cfg.backbone)
    for job in jobs:  # the checks that need the backbone, per job (a prompt layer it lacks fails that job alone)
        try:
            validate(job.cfg, backbone_config)
        except UserError as error:
            fail(job, error)
    jobs = [job for job in jobs if job.running]
    if not jobs:
        return None
    cfg = jobs[0].cfg
    set_seed(cfg.trainer.seed)
    tokenizer = backbone.load_tokenizer(cfg.backbone)  # the config is loaded and checked above
    members, prep_seconds = engine.prepare_members(cfg, tokenizer, lambda t: ["train", t.eval_split, t.test_split])
    for job in jobs[1:]:  # the label names derived from the data, into every job's config
        with open_dict(job.cfg):
            job.cfg.task.labels = cfg.task.labels
            if cfg.task.members:
                job.cfg.task.members = cfg.task.members
    encoder, parts = engine.load_encoder(cfg, backbone_config)
    built = training_state.rng_states()
    for job in jobs:
        training_state.set_rng_states(built)
        job.model = engine.prompt_model(job.cfg, members, encoder, tokenizer, parts)
        try:
            if job.cfg.prompt.init_from:
                checkpoint.load(job.cfg.prompt.init_from, job.model, strict_heads=False)
        except UserError as error:
            fail(job, error)
        job.model.to(accelerator.device)
        job.counts = job.model.parameter_counts()
    return encoder, tokenizer, members, prep_seconds


def _loaders(cfg: DictConfig, members, tokenizer, accelerator):
    loaders = engine.train_loaders(cfg, members, tokenizer)
    samplers = {name: loader.batch_sampler for name, loader in loaders.items()}  # reshuffled every epoch
    return samplers, {name: accelerator.prepare_data_loader(loader) for name, loader in loaders.items()}


def _save_state(job: Job, epoch: int, batches_done: int) -> None:
    job.progress.epoch, job.progress.batches_done = epoch, batches_done
    training_state.save(job.run_dir, job.model, job.optimizer, job.scheduler, job.cfg, job.progress)


@torch.inference_mode()
def predict(encoder, jobs: list[Job], member, split, tokenizer, accelerator, batch_size, per_forward) -> list[list]:
    """engine.predict for K jobs at once: each eval batch through the backbone as K x B rows (per_forward jobs at a
    time)."""
    for job in jobs:
        job.model.eval()
    loader = engine.eval_loader(member, split, tokenizer, accelerator, batch_size)
    ordered = [[None] * len(member.splits[split].features) for _ in jobs]
    for batch in loader:
        outputs = []
        for chunk in chunked(jobs, per_forward):
            with accelerator.autocast():
                blocks = packed_hidden(encoder, [job.model for job in chunk], batch)
                outputs += [
                    member.kind.outputs(job.model.head_for(member.name)(hidden, batch), batch)
                    for job, hidden in zip(chunk, blocks, strict=True)
                ]
        for rows, result in zip(ordered, outputs, strict=True):
            for row, i in zip(result.cpu().numpy(), batch["index"].tolist(), strict=True):
                rows[i] = row
    return ordered


def _evaluate(encoder, jobs, members, split_of, tokenizer, accelerator, cfg, per_forward) -> list[dict]:
    """{member: metrics} per job, as engine.evaluate_all computes them for one."""
    metrics = [{} for _ in jobs]
    for member in members:
        split = split_of(member)
        batch_size = cfg.trainer.eval_batch_size
        outputs = predict(encoder, jobs, member, split, tokenizer, accelerator, batch_size, per_forward)
        for values, rows in zip(metrics, outputs, strict=True):
            values[member.name] = member.kind.metrics(member.task, member.splits[split], rows)
    return metrics


def _train(jobs: list[Job], jobs_per_forward: int | None) -> None:
    started = time.perf_counter()
    cfg = jobs[0].cfg  # every setting the loop reads from it is shared by the group (group_key)
    accelerator = Accelerator(mixed_precision=cfg.trainer.precision, cpu=cfg.trainer.cpu)
    built = _build(jobs, accelerator)
    if built is None:
        return
    encoder, tokenizer, members, prep_seconds = built
    per_forward = jobs_per_forward or default_jobs_per_forward(accelerator.device, len(jobs))
    log.info("%d job(s) per backbone forward (hydra.launcher.jobs_per_forward)", per_forward)
    samplers, loaders = _loaders(cfg, members, tokenizer, accelerator)
    steps = total_steps(cfg, loaders)
    labels = {m.name: list(m.task.labels) for m in members}
    for job in [j for j in jobs if j.running]:
        job.optimizer = make_optimizer(job.cfg, (p for p in job.model.parameters() if p.requires_grad))
        job.scheduler, job.schedule_unit = make_scheduler(job.cfg, job.optimizer, steps)
        job.train_step = engine.TrainStep(
            job.model,
            job.optimizer,
            max_grad_norm=job.cfg.trainer.max_grad_norm,
            scheduler=job.scheduler if job.schedule_unit == "step" else None,
        )
        try:
            resumed = training_state.restore(job.cfg, job.run_dir, job.model, job.optimizer, job.scheduler)
        except UserError as error:
            fail(job, error)
            continue
        if resumed:
            job.progress, job.rng = resumed.progress, resumed.rng
            job.start = (job.progress.epoch, job.progress.batches_done)
        (job.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(job.cfg, resolve=True))
        with current(job):
            job.tracker = Tracker(job.cfg, job.run_dir, concurrent=True)
        job.tracker.summary(job.counts)
        job.log(
            "%s on %s with %s: %d of %d parameters trainable (%.3f%%); packed with %d other job(s)",
            job.cfg.task.name,
            job.cfg.backbone.name,
            job.cfg.prompt.method,
            job.counts["trainable_params"],
            job.counts["total_params"],
            job.counts["trainable_percent"],
            len(jobs) - 1,
        )

    def running() -> list[Job]:
        return [job for job in jobs if job.running]

    def finish(done: list[Job], stopped_early: bool) -> None:
        tested = [m for m in members if m.task.test_split]
        test = [{} for _ in done]
        if tested and done:  # tagging protocol: the test score of the best dev epoch
            for job in done:
                job.model.load_state_dict(job.progress.best_state, strict=False)
            split = lambda m: m.task.test_split  # noqa: E731
            test = _evaluate(encoder, done, tested, split, tokenizer, accelerator, cfg, per_forward)
        for job, scores in zip(done, test, strict=True):
            progress = job.progress
            extra = {**job.counts, "stopped_early": stopped_early}
            results = results_of(job.cfg, members, progress, extra, prep_seconds, scores if tested else None)
            results["wall_time_seconds"] = time.perf_counter() - started
            job.tracker.summary({**engine.flatten("best", members, progress.best), "best_epoch": progress.best_epoch})
            job.tracker.finish()
            write_json(job.run_dir / "results.json", results)
            job.results = results
            best = (cfg.task.metric, progress.best_value, progress.best_epoch, job.run_dir)
            job.log("best %s=%.4f at epoch %d; results in %s", *best)

    if not running():
        return
    start = min(job.start for job in running())
    stop = training_state.StopRequests().install()
    try:
        loop = (encoder, members, samplers, loaders, tokenizer, accelerator, labels, cfg, per_forward)
        _loop(running, finish, start, stop, *loop)
    finally:
        stop.uninstall()
    finish(running(), stopped_early=False)


def _loop(
    running, finish, start, stop, encoder, members, samplers, loaders, tokenizer, accelerator, labels, cfg, per_forward
):
    """commands.train.run's epochs for the group: a job takes part in the batches from its own start on."""
    for epoch in range(start[0], cfg.trainer.epochs):
        # Per job, checked before the epoch, so a resumed job stops where it had stopped (as commands.train.run).
        stopping = []
        for job in running():
            patience, best_epoch = job.cfg.trainer.early_stopping_patience, job.progress.best_epoch
            if patience and best_epoch > 0 and epoch - best_epoch >= patience and job.start[0] <= epoch:
                job.log("early stopping: no better dev metric in the %d epochs after epoch %d", patience, best_epoch)
                stopping.append(job)
        finish(stopping, stopped_early=True)
        if not running():
            break
        epoch_started = time.perf_counter()
        for job in running():
            job.model.train()
            if job.start[0] < epoch:
                job.progress.losses = []
        for sampler in samplers.values():
            sampler.set_epoch(epoch)
        batches, done = engine.interleaved(loaders, cfg.trainer.seed, epoch), 0
        if epoch == start[0] and start[1]:
            done = start[1]  # the interrupted epoch's finished batches, skipped as commands.train.run does
            for _ in range(done):
                next(batches)
        if epoch == start[0]:
            rng = next((job.rng for job in running() if job.start == start and job.rng), None)
            if rng:
                training_state.set_rng_states(rng)
        bar = epoch_progress(
            batches,
            total=sum(len(x) for x in loaders.values()),
            desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}",
            enabled=cfg.trainer.progress,
            initial=done,
        )
        for name, batch in bar:
            active = [job for job in running() if (epoch, done) >= job.start]
            if cfg.trainer.max_steps:
                active = [job for job in active if job.progress.step < cfg.trainer.max_steps]
            if active:
                _step(active, name, batch, epoch, done, accelerator, encoder, per_forward)
            done += 1
            for job in active:
                every = cfg.trainer.save_every_steps
                if job.running and every and job.progress.step % every == 0:
                    _save_state(job, epoch, done)
            if active:
                recent = [np.mean(job.progress.losses[-20:]) for job in active if job.progress.losses]
                bar.set_postfix(loss=f"{np.mean(recent):.4f}" if recent else "-")
                training_state.maybe_die(max(job.progress.step for job in active))
            if stop.signal_name:
                for job in running():
                    if (epoch, done) >= job.start:  # a job still waiting for its start keeps its saved state
                        _save_state(job, epoch, done)
                    fail(
                        job,
                        UserError(
                            f"stopped by {stop.signal_name} at step {job.progress.step}; the training state is saved "
                            f"in {job.run_dir / training_state.STATE_DIR}: continue with trainer.resume=true"
                        ),
                    )
                return
            if cfg.trainer.max_steps and all(job.progress.step >= cfg.trainer.max_steps for job in running()):
                break
        train_seconds = time.perf_counter() - epoch_started

        ending = [job for job in running() if job.start[0] <= epoch]
        for job in ending:
            if job.schedule_unit == "epoch":
                job.scheduler.step()
        if not ending:
            continue
        split = lambda m: m.task.eval_split  # noqa: E731
        scores = _evaluate(encoder, ending, members, split, tokenizer, accelerator, cfg, per_forward)
        for job, metrics in zip(ending, scores, strict=True):
            record, improved = end_epoch(job.progress, members, metrics, epoch, train_seconds, job.model)
            job.tracker.log(record, step=job.progress.step)
            job.log(epoch_line(record))
            if improved and job.cfg.trainer.save_checkpoint:
                checkpoint.save(job.run_dir / checkpoint.FILENAME, job.model, job.cfg, labels)
            _save_state(job, epoch + 1, 0)
        if cfg.trainer.max_steps and all(job.progress.step >= cfg.trainer.max_steps for job in running()):
            break


def _step(active: list[Job], name: str, batch: dict, epoch: int, done: int, accelerator, encoder, per_forward) -> None:
    """One optimizer step of every active job: per_forward jobs' blocks per backbone forward and backward."""
    stepped = []
    for chunk in chunked(active, per_forward):
        with accelerator.autocast():
            blocks = packed_hidden(encoder, [job.model for job in chunk], batch)
            losses = [
                job.model.head_for(name).loss(job.model.head_for(name)(hidden, batch), batch)
                for job, hidden in zip(chunk, blocks, strict=True)
            ]
        finite = []
        is_finite = torch.isfinite(torch.stack(losses)).tolist()  # one device sync per chunk, not one per job
        for job, loss, ok in zip(chunk, losses, is_finite, strict=True):
            if ok:
                finite.append((job, loss))
                continue
            _save_state(job, epoch, done)  # the parameters are still those of the last good step
            fail(
                job,
                UserError(
                    f"the loss became {loss.item()} at step {job.progress.step + 1} (epoch {epoch + 1}); lower "
                    f"optimizer.lr or use trainer.precision=no; the best checkpoint so far and the training state of "
                    f"step {job.progress.step} are kept in {job.run_dir}"
                ),
            )
        if finite:
            # Rows never interact in the encoder, so each job's parameters get exactly their own loss's gradient.
            torch.stack([loss for _, loss in finite]).sum().backward()
            stepped += finite
    values = torch.stack([loss for _, loss in stepped]).tolist() if stepped else []  # one sync for all jobs
    for (job, _), value in zip(stepped, values, strict=True):
        job.train_step.update()  # its own clipping, optimizer and per-step scheduler
        job.progress.step += 1
        job.progress.losses.append(value)
