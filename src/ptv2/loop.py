"""The training loop: one or more jobs that share a frozen backbone, the data and its batch order.

`ptv2 train` hands it one job; the packed launcher (commands/packed.py) a group of jobs that differ only in what
lives in their prompts, heads, optimizers and bookkeeping. Either way the same code builds the data and the
backbone once, takes every step (engine.train_step: a job's own forward for one job, K x B rows in one backbone
forward for several), evaluates (engine.evaluate_group), keeps each job's best epoch, checkpoint, training state,
results.json and W&B run in its own folder, and applies one set of rules: early stopping, max_steps, save_every_steps,
a non-finite loss, SIGTERM/SIGINT, the test score at the best dev epoch.

A job whose loss turns non-finite ends alone (the others go on); a job resumed from its saved state joins the
group's batches where its state left off. A group's states are saved together (runs.resume.save_group), so a kill
between two jobs' saves never leaves them at different steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from ptv2 import engine, frozen
from ptv2.checks import validate
from ptv2.errors import UserError
from ptv2.io import write_json, write_text
from ptv2.modeling import backbone
from ptv2.modeling.packing import default_jobs_per_forward
from ptv2.optim import make_optimizer, make_scheduler
from ptv2.progress import epoch_progress
from ptv2.runs import checkpoint, summary
from ptv2.runs import resume as training_state
from ptv2.runs.resume import Progress
from ptv2.runs.tracking import Tracker

log = logging.getLogger("ptv2")
HISTORY_FILE = "history.json"  # the epochs so far, one record each (results.json's history once the run ends)


@dataclass
class Job:
    """One run of a group: its config and folder, and everything its training carries."""

    cfg: DictConfig
    run_dir: Path
    num: int = 0
    scope: Callable = contextlib.nullcontext  # inside: the job's Hydra config and log (a packed group's job)
    report: Callable | None = None  # report(error, cfg, run_dir, num): a sweep job's log line and FAILED marker
    model: torch.nn.Module | None = None  # as accelerate prepared it
    module: torch.nn.Module | None = None  # the PromptModel itself
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    schedule_unit: str = "step"
    step: engine.TrainStep | None = None
    tracker: Tracker | None = None
    counts: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    start: tuple[int, int] = (0, 0)  # (epoch, batches done) where its training (re)starts
    rng: dict | None = None
    error: Exception | None = None
    results: dict | None = None
    tag: str = ""  # "job N: " in a packed group of several

    @property
    def running(self) -> bool:
        return self.error is None and self.results is None

    def log(self, message: str, *args) -> None:
        """A line of this job's: in a packed group it names the job, as the group's lines share the console."""
        log.info(f"{self.tag}{message}", *args, extra={"job": self.num})


# Called with the step reached after each training step (and its save, if one was due): where a test injects a
# kill or a signal (tests/faults.py).
STEP_CALLBACKS: list = []


def fail(job: Job, error: Exception) -> None:
    """End one job with an error (the others go on); the caller of `train` raises or reports it."""
    job.error = error
    if job.tracker is not None:
        job.tracker.finish()
    if job.report is not None:
        with job.scope():
            job.report(error, job.cfg, job.run_dir, job.num)


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run: a sweep job by its sweep again (it finds its folder), a run by its folder."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"run the same sweep again with hydra.sweep.dir={Path(run_dir).parent} trainer.resume=true"
    return f"continue with trainer.resume={run_dir}"


def train(jobs: list[Job], jobs_per_forward: int | None = None, started: float | None = None) -> None:
    """Train every job; each ends with `results` (also written to its folder) or `error`.

    Jobs share every setting the loop reads from jobs[0].cfg (the packed launcher groups them so). Errors of the
    whole group (data, backbone) are raised; a job's own (its config against the backbone, its resume state, its
    loss) end that job alone. jobs_per_forward: jobs per backbone forward (None: packing.default_jobs_per_forward).
    """
    Group(jobs, jobs_per_forward, started or time.perf_counter()).fit()


class Group:
    """The shared half of a training run: accelerator, data, backbone, batches; each job's half is its Job."""

    def __init__(self, jobs: list[Job], jobs_per_forward: int | None, started: float):
        self.jobs, self.started = jobs, started
        self.cfg = cfg = jobs[0].cfg  # every setting read from it is the group's (commands.packed.group_key)
        self.accelerator = Accelerator(mixed_precision=cfg.trainer.precision, cpu=cfg.trainer.cpu)
        self.per_forward = jobs_per_forward or default_jobs_per_forward(self.accelerator.device, len(jobs))
        for job in jobs if len(jobs) > 1 else []:
            job.tag = f"job {job.num}: "

    def running(self) -> list[Job]:
        return [job for job in self.jobs if job.running]

    # ------------------------------------------------------------------------------------------- build

    def build(self) -> bool:
        """Data once, the backbone once, then each job's PromptModel on it, initialised exactly as a separate run's
        would be (each job starts from the RNG state the backbone left). False when no job is left."""
        cfg, accelerator = self.cfg, self.accelerator
        backbone_config = backbone.load_config(cfg.backbone)
        for job in self.jobs:  # the checks that need the backbone, per job (a prompt layer it lacks ends it alone)
            try:
                validate(job.cfg, backbone_config)
            except UserError as error:
                fail(job, error)
        if not self.running():
            return False
        set_seed(cfg.trainer.seed)
        self.tokenizer = backbone.load_tokenizer(cfg.backbone)
        splits = lambda task: ["train", task.eval_split, task.test_split]  # noqa: E731
        self.members, self.prep_seconds = engine.prepare_members(cfg, self.tokenizer, splits)
        for job in self.running()[1:]:  # the label names derived from the data, into every job's config
            with open_dict(job.cfg):
                job.cfg.task.labels = cfg.task.labels
                if cfg.task.members:
                    job.cfg.task.members = cfg.task.members
        encoder, parts = engine.load_encoder(cfg, backbone_config)
        self.encoder, self.backbone_config = encoder, backbone_config
        built = training_state.rng_states()
        for job in self.running():
            training_state.set_rng_states(built)
            job.module = engine.prompt_model(job.cfg, self.members, encoder, self.tokenizer, parts)
            try:
                if job.cfg.prompt.init_from:
                    checkpoint.load(job.cfg.prompt.init_from, job.module, strict_heads=False)
            except UserError as error:
                fail(job, error)
            job.counts = job.module.parameter_counts()
        loaders = engine.train_loaders(cfg, self.members, self.tokenizer)
        self.samplers = {name: loader.batch_sampler for name, loader in loaders.items()}  # reshuffled every epoch
        self.loaders = {name: accelerator.prepare_data_loader(loader) for name, loader in loaders.items()}
        self.labels = {m.name: list(m.task.labels) for m in self.members}
        return bool(self.running())

    def set_up(self, job: Job) -> None:
        """The job's optimizer, scheduler, step and tracker; its saved state when it resumes; its config file."""
        cfg, accelerator = job.cfg, self.accelerator
        optimizer = make_optimizer(cfg, (p for p in job.module.parameters() if p.requires_grad))
        job.model, job.optimizer = accelerator.prepare(job.module, optimizer)
        job.scheduler, job.schedule_unit = make_scheduler(cfg, job.optimizer, self.total_steps())
        scheduler = job.scheduler if job.schedule_unit == "step" else None
        job.step = engine.TrainStep(
            job.model,
            job.optimizer,
            max_grad_norm=cfg.trainer.max_grad_norm,
            scheduler=scheduler,
            accelerator=accelerator,
        )
        resumed = training_state.restore(cfg, job.run_dir, job.module, job.optimizer, job.scheduler)
        if resumed:
            job.progress, job.rng = resumed.progress, resumed.rng
            job.start = (job.progress.epoch, job.progress.batches_done)
        # Again, now with the label names derived from the training data; only after the resume check, so a refused
        # resume leaves the folder's config as it was.
        if accelerator.is_main_process:
            write_text(job.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        with job.scope():
            job.tracker = Tracker(cfg, job.run_dir, enabled=accelerator.is_main_process, concurrent=len(self.jobs) > 1)
        job.tracker.summary(job.counts)
        others = f"; packed with {len(self.jobs) - 1} other job(s)" if len(self.jobs) > 1 else ""
        job.log(
            "%s on %s with %s: %d of %d parameters trainable (%.3f%%); data prepared in %s%s",
            cfg.task.name,
            checkpoint.backbone_label(cfg.backbone),
            cfg.prompt.method,
            job.counts["trainable_params"],
            job.counts["total_params"],
            job.counts["trainable_percent"],
            ", ".join(f"{k} {v:.2f}s" for k, v in self.prep_seconds.items()),
            others,
        )

    def cache_frozen(self) -> None:
        """trainer.cache_frozen: the hidden states entering the group's lowest prompted layer, computed once per
        example of every split (frozen.py) on the prepared encoder, which then runs from that layer on."""
        jobs = self.running()
        features = sum(len(member.splits["train"].features) for member in self.members)
        self.frozen_plan = frozen.plan([job.cfg for job in jobs], self.backbone_config, self.encoder, features)
        log.info("frozen layers: %s", self.frozen_plan.reason)
        if self.frozen_plan.layers:
            autocast, device = self.accelerator.autocast, self.accelerator.device
            frozen.prepare(self.encoder, self.members, self.tokenizer, self.frozen_plan, self.cfg, device, autocast)

    def total_steps(self) -> int:
        """The optimizer steps of the whole run (the scheduler's horizon): every batch of every epoch, or max_steps."""
        steps = sum(len(loader) for loader in self.loaders.values()) * self.cfg.trainer.epochs
        return min(steps, self.cfg.trainer.max_steps) if self.cfg.trainer.max_steps else steps

    # ------------------------------------------------------------------------------------------- the loop

    def fit(self) -> None:
        if not self.build():
            return
        if len(self.jobs) > 1:
            log.info("%d job(s) per backbone forward (hydra.launcher.jobs_per_forward)", self.per_forward)
        for job in self.running():
            try:
                self.set_up(job)
            except UserError as error:
                fail(job, error)
        if not self.running():
            return
        self.cache_frozen()
        stop = training_state.StopRequests().install()  # SIGTERM/SIGINT: save the state, then stop
        try:
            self.epochs(stop)
        finally:
            stop.uninstall()
        self.finish(self.running(), stopped_early=False)

    def epochs(self, stop) -> None:
        cfg = self.cfg
        start = min(job.start for job in self.running())
        for epoch in range(start[0], cfg.trainer.epochs):
            # Checked before the epoch rather than after the last one, so a resumed job stops where it had stopped.
            self.finish([job for job in self.running() if self.patience_over(job, epoch)], stopped_early=True)
            if not self.running():
                return
            epoch_started = time.perf_counter()  # the epoch's training time is logged apart from its evaluation
            for job in self.running():
                job.model.train()
                if job.start < (epoch, 1):  # a job resumed inside this epoch keeps the losses it saved
                    job.progress.losses = []
            for sampler in self.samplers.values():
                sampler.set_epoch(epoch)
            batches, done = engine.interleaved(self.loaders, cfg.trainer.seed, epoch), 0
            if epoch == start[0]:
                # Same batch order as the interrupted run: skip its finished batches, then take its RNG states (the
                # data iterators draw from the torch generator when they start).
                done = start[1]
                for _ in range(done):
                    next(batches)
                rng = next((job.rng for job in self.running() if job.start == start and job.rng), None)
                if rng:
                    training_state.set_rng_states(rng)
            bar = epoch_progress(  # a bar on a terminal, a log line per tenth of the epoch elsewhere
                batches,
                total=sum(len(x) for x in self.loaders.values()),
                desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}",
                enabled=cfg.trainer.progress and self.accelerator.is_main_process,
                initial=done,
            )
            for name, batch in bar:
                active = [job for job in self.running() if (epoch, done) >= job.start and not self.at_max_steps(job)]
                if active:
                    self.step(active, name, batch, epoch, done)
                done += 1
                every = cfg.trainer.save_every_steps
                if active and every and any(job.progress.step % every == 0 for job in active if job.running):
                    self.save_states(epoch, done)
                if active:
                    # Each job's own recent loss (a packed group's jobs named by number), never a mean across jobs.
                    recent = {job.num: np.mean(job.progress.losses[-20:]) for job in active if job.progress.losses}
                    if len(self.jobs) == 1:
                        bar.set_postfix(loss=f"{next(iter(recent.values())):.4f}" if recent else "-")
                    else:
                        bar.set_postfix(loss=" ".join(f"job{num}={value:.4f}" for num, value in recent.items()) or "-")
                    for callback in STEP_CALLBACKS:
                        callback(max(job.progress.step for job in active))
                if stop.signal_name:
                    self.save_states(epoch, done)
                    for job in self.running():
                        where = job.run_dir / training_state.STATE_DIR
                        message = f"stopped by {stop.signal_name} at step {job.progress.step}; the training state is"
                        with job.scope():
                            hint = resume_hint(job.run_dir)
                        fail(job, UserError(f"{message} saved in {where}: {hint}"))
                    return
                if all(self.at_max_steps(job) for job in self.running()):
                    break
            train_seconds = time.perf_counter() - epoch_started
            self.end_epoch([job for job in self.running() if job.start[0] <= epoch], epoch, train_seconds)
            if all(self.at_max_steps(job) for job in self.running()):
                return

    def patience_over(self, job: Job, epoch: int) -> bool:
        patience, best_epoch = job.cfg.trainer.early_stopping_patience, job.progress.best_epoch
        if not (patience and best_epoch > 0 and epoch - best_epoch >= patience and job.start[0] <= epoch):
            return False
        metric = job.cfg.task.metric
        job.log("early stopping: no better dev %s in the %d epochs after epoch %d", metric, patience, best_epoch)
        return True

    def at_max_steps(self, job: Job) -> bool:
        return bool(self.cfg.trainer.max_steps) and job.progress.step >= self.cfg.trainer.max_steps

    def step(self, active: list[Job], name: str, batch: dict, epoch: int, done: int) -> None:
        """One optimizer step of every active job; a job whose loss is not finite ends with its state of the last
        good step saved."""

        def rejected(index: int, loss: torch.Tensor) -> None:
            job = active[index]
            self.save_states(epoch, done, [job])  # the parameters are still those of the last good step
            fail(
                job,
                UserError(
                    f"the loss became {loss.item()} at step {job.progress.step + 1} (epoch {epoch + 1}); lower "
                    f"optimizer.lr or use trainer.precision=no; the best checkpoint so far and the training state of "
                    f"step {job.progress.step} are kept in {job.run_dir}"
                ),
            )

        steps = [job.step for job in active]
        autocast = self.accelerator.autocast if len(active) > 1 else contextlib.nullcontext
        rates = [job.optimizer.param_groups[0]["lr"] for job in active]  # this step's (the step moves the schedule)
        values = engine.train_step(
            steps, batch, name, per_forward=self.per_forward, autocast=autocast, rejected=rejected
        )
        for job, value, rate in zip(active, values, rates, strict=True):
            if value is not None:
                job.progress.step += 1
                job.progress.losses.append(value)
                job.tracker.log_step(job.progress.step, value, rate)

    def evaluate(self, jobs: list[Job], split_of) -> list[dict]:
        models = [job.model for job in jobs]
        return engine.evaluate_group(
            models, self.members, split_of, self.tokenizer, self.accelerator, self.cfg, self.per_forward
        )

    def end_epoch(self, ending: list[Job], epoch: int, train_seconds: float) -> None:
        """Per job: its scheduler's epoch step, its dev scores, its record and best epoch, checkpoint and state."""
        for job in ending:
            if job.schedule_unit == "epoch":
                job.scheduler.step()
        if not ending:
            return
        scores = self.evaluate(ending, lambda m: m.task.eval_split)
        for job, metrics in zip(ending, scores, strict=True):
            record, improved = epoch_record(job.progress, self.members, metrics, epoch, train_seconds, job.module)
            job.tracker.log(record, step=job.progress.step)
            job.log(summary.epoch_line(record))
            if self.accelerator.is_main_process:
                # Every finished epoch, readable while the run goes on or after it is stopped (results.json is the
                # record of a finished run only).
                write_json(job.run_dir / HISTORY_FILE, job.progress.history)
                if improved and job.cfg.trainer.save_checkpoint:
                    checkpoint.save(job.run_dir / checkpoint.FILENAME, job.module, job.cfg, self.labels)
        self.save_states(epoch + 1, 0, ending)

    def save_states(self, epoch: int, batches_done: int, jobs: list[Job] | None = None) -> None:
        """The training state of every running job that has reached (epoch, batches_done), saved as one group."""
        jobs = [job for job in (jobs or self.running()) if (epoch, batches_done) >= job.start]
        if not jobs or not self.accelerator.is_main_process:
            return
        for job in jobs:
            job.progress.epoch, job.progress.batches_done = epoch, batches_done
        training_state.save_group(
            [(job.run_dir, job.module, job.optimizer, job.scheduler, job.cfg, job.progress) for job in jobs]
        )

    def finish(self, done: list[Job], stopped_early: bool) -> None:
        """Results of finished jobs: the test scores at their best dev epoch, results.json, the summary line."""
        if not done:
            return
        tested = [m for m in self.members if m.task.test_split]
        test = [None] * len(done)
        if tested:  # tagging protocol: the test score of the best dev epoch
            for job in done:
                job.module.load_state_dict(job.progress.best_state, strict=False)
            test = self.evaluate(done, lambda m: m.task.test_split)
        for job, scores in zip(done, test, strict=True):
            progress = job.progress
            extra = {**job.counts, "stopped_early": stopped_early, "frozen_cache": self.frozen_plan.record()}
            results = summary.results_record(job.cfg, self.members, progress, extra, self.prep_seconds, scores)
            results["wall_time_seconds"] = time.perf_counter() - self.started
            job.tracker.summary(
                {**engine.flatten("best", self.members, progress.best), "best_epoch": progress.best_epoch}
            )
            job.tracker.finish()
            if self.accelerator.is_main_process:
                write_json(job.run_dir / "results.json", results)
                (job.run_dir / "FAILED").unlink(missing_ok=True)  # an earlier attempt's, now resumed to its end
            job.results = results
            job.log(summary.run_line(job.cfg.task, results, job.run_dir))


# ----------------------------------------------------------------------------------------------- records


def epoch_record(progress: Progress, members: list, metrics: dict, epoch: int, train_seconds: float, model):
    """The epoch's history record (appended to progress) and whether it is the best so far; a best epoch's metrics
    and prompt weights are kept in progress (for the test score at the best dev epoch)."""
    record = {
        "epoch": epoch + 1,
        "step": progress.step,
        "train_loss": float(np.mean(progress.losses)) if progress.losses else math.nan,
        "train_seconds": train_seconds,
        **engine.flatten("dev", members, metrics),
    }
    progress.history.append(record)
    value = engine.selection_value(members, metrics)
    improved = value > progress.best_value
    if improved:
        progress.best, progress.best_value, progress.best_epoch = metrics, value, epoch + 1
        progress.best_state = {k: v.detach().clone() for k, v in model.prompt_state_dict().items()}
    return record, improved
