"""`ptv2 train`: config -> data -> model -> training loop -> results in the run directory.

A run trains one prompt on one dataset, or on several ("members" of a multi-task config) with one head each:
every epoch visits each member's batches once, in a seeded random interleaving (sampling proportional to dataset
size), and the best epoch maximises the mean of the members' selection metrics. The pieces (build, step, evaluate)
are the engine's; this module is the loop and its bookkeeping.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ptv2.engine import Member, TrainStep, build, evaluate_all, flatten, interleaved, selection_value, train_loaders
from ptv2.errors import UserError
from ptv2.io import write_json
from ptv2.optim import make_optimizer, make_scheduler
from ptv2.runs import checkpoint
from ptv2.runs import resume as training_state
from ptv2.runs.progress import epoch_progress
from ptv2.runs.resume import Progress
from ptv2.runs.tracking import Tracker

log = logging.getLogger("ptv2")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.perf_counter()
    preset = HydraConfig.get().runtime.choices.get("preset") if HydraConfig.initialized() else None
    if preset:
        log.info("preset %s: the official run's settings, with the command line's overrides on top", preset)
    accelerator = Accelerator(mixed_precision=cfg.trainer.precision, cpu=cfg.trainer.cpu)
    set_seed(cfg.trainer.seed)
    tokenizer, members, prep_seconds, model = build(cfg, lambda task: ["train", task.eval_split, task.test_split])
    if cfg.prompt.init_from:
        checkpoint.load(cfg.prompt.init_from, model, strict_heads=False)
    counts = model.parameter_counts()
    log.info(
        "%s on %s with %s: %d of %d parameters trainable (%.3f%%); data prepared in %s",
        cfg.task.name,
        cfg.backbone.name,
        cfg.prompt.method,
        counts["trainable_params"],
        counts["total_params"],
        counts["trainable_percent"],
        ", ".join(f"{k} {v:.2f}s" for k, v in prep_seconds.items()),
    )

    loaders = train_loaders(cfg, members, tokenizer)
    samplers = {name: loader.batch_sampler for name, loader in loaders.items()}  # reshuffled every epoch
    optimizer = make_optimizer(cfg, (p for p in model.parameters() if p.requires_grad))
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = {name: accelerator.prepare_data_loader(loader) for name, loader in loaders.items()}
    scheduler, schedule_unit = make_scheduler(cfg, optimizer, total_steps(cfg, loaders))
    unwrapped = accelerator.unwrap_model(model)
    step_scheduler = scheduler if schedule_unit == "step" else None
    train_step = TrainStep(
        model, optimizer, max_grad_norm=cfg.trainer.max_grad_norm, scheduler=step_scheduler, accelerator=accelerator
    )

    tracker = Tracker(cfg, run_dir, enabled=accelerator.is_main_process)
    tracker.summary(counts)
    labels = {m.name: list(m.task.labels) for m in members}
    # trainer.resume: restore everything the loop carries; the interrupted epoch is replayed below.
    resumed = training_state.restore(cfg, run_dir, unwrapped, optimizer, scheduler)
    progress = resumed.progress if resumed else Progress()
    start_epoch, skip_batches = progress.epoch, progress.batches_done
    # Again, now with the label names derived from the training data; only after the resume check, so a refused
    # resume leaves the folder's config as it was.
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def save_state(epoch: int, batches_done: int) -> None:
        if accelerator.is_main_process:
            progress.epoch, progress.batches_done = epoch, batches_done
            training_state.save(run_dir, unwrapped, optimizer, scheduler, cfg, progress)

    stop = training_state.StopRequests().install()  # SIGTERM/SIGINT: save the state, then stop
    patience, stopped_early = cfg.trainer.early_stopping_patience, False
    for epoch in range(start_epoch, cfg.trainer.epochs):
        # Checked before the epoch rather than after the last one, so a resumed run stops where it had stopped.
        if patience and progress.best_epoch > 0 and epoch - progress.best_epoch >= patience:
            stopped_early = True
            log.info(
                "early stopping: no better dev %s in the %d epochs after epoch %d",
                cfg.task.metric,
                patience,
                progress.best_epoch,
            )
            break
        epoch_started = time.perf_counter()  # the epoch's training time is logged apart from its evaluation
        model.train()
        for sampler in samplers.values():
            sampler.set_epoch(epoch)
        batches, done = interleaved(loaders, cfg.trainer.seed, epoch), 0
        if resumed and epoch == start_epoch:
            # Same batch order as the interrupted run: skip its finished batches, then take its RNG states (the
            # data iterators draw from the torch generator when they start).
            done = skip_batches
            for _ in range(done):
                next(batches)
            training_state.set_rng_states(resumed.rng)
        else:
            progress.losses = []
        bar = epoch_progress(  # a bar on a terminal, a log line per tenth of the epoch elsewhere
            batches,
            total=sum(len(x) for x in loaders.values()),
            desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}",
            enabled=cfg.trainer.progress and accelerator.is_main_process,
            initial=done,
        )
        for name, batch in bar:
            loss = train_step.loss(batch, name)
            if not torch.isfinite(loss):
                save_state(epoch, done)  # the parameters are still those of the last good step
                step = progress.step
                raise UserError(
                    f"the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); lower optimizer.lr "
                    f"or use trainer.precision=no; the best checkpoint so far and the training state of step {step} "
                    f"are kept in {run_dir}"
                )
            train_step.backward(loss)
            train_step.update()
            progress.step += 1
            done += 1
            progress.losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(progress.losses[-20:]):.4f}")
            if cfg.trainer.save_every_steps and progress.step % cfg.trainer.save_every_steps == 0:
                save_state(epoch, done)
            training_state.maybe_die(progress.step)
            if stop.signal_name:
                save_state(epoch, done)
                raise UserError(
                    f"stopped by {stop.signal_name} at step {progress.step}; the training state is saved in "
                    f"{run_dir / training_state.STATE_DIR}: continue with trainer.resume={run_dir}"
                )
            if cfg.trainer.max_steps and progress.step >= cfg.trainer.max_steps:
                break
        if schedule_unit == "epoch":
            scheduler.step()
        train_seconds = time.perf_counter() - epoch_started

        metrics = evaluate_all(model, members, lambda m: m.task.eval_split, tokenizer, accelerator, cfg)
        record, improved = end_epoch(progress, members, metrics, epoch, train_seconds, unwrapped)
        tracker.log(record, step=progress.step)
        log.info(epoch_line(record))
        if improved and cfg.trainer.save_checkpoint and accelerator.is_main_process:
            checkpoint.save(run_dir / checkpoint.FILENAME, unwrapped, cfg, labels)
        save_state(epoch + 1, 0)
        if cfg.trainer.max_steps and progress.step >= cfg.trainer.max_steps:
            break
    stop.uninstall()

    tested = [m for m in members if m.task.test_split]
    test = None
    if tested:
        # Tagging protocol: the test score of the best dev epoch.
        unwrapped.load_state_dict(progress.best_state, strict=False)
        test = evaluate_all(model, tested, lambda m: m.task.test_split, tokenizer, accelerator, cfg)
    results = results_of(cfg, members, progress, {**counts, "stopped_early": stopped_early}, prep_seconds, test)
    results["wall_time_seconds"] = time.perf_counter() - started
    tracker.summary({**flatten("best", members, progress.best), "best_epoch": progress.best_epoch})
    tracker.finish()
    if accelerator.is_main_process:
        write_json(run_dir / "results.json", results)
        log.info(
            "best %s=%.4f at epoch %d; results in %s",
            cfg.task.metric,
            progress.best_value,
            progress.best_epoch,
            run_dir,
        )
    return results


def total_steps(cfg: DictConfig, loaders: dict) -> int:
    """The optimizer steps of the whole run (the scheduler's horizon): every batch of every epoch, or max_steps."""
    steps = sum(len(loader) for loader in loaders.values()) * cfg.trainer.epochs
    return min(steps, cfg.trainer.max_steps) if cfg.trainer.max_steps else steps


def end_epoch(progress: Progress, members: list[Member], metrics: dict, epoch: int, train_seconds: float, model):
    """The epoch's history record (appended to progress) and whether it is the best so far; a best epoch's metrics
    and prompt weights are kept in progress (for the test score at the best dev epoch)."""
    record = {
        "epoch": epoch + 1,
        "step": progress.step,
        "train_loss": float(np.mean(progress.losses)) if progress.losses else math.nan,
        "train_seconds": train_seconds,
        **flatten("dev", members, metrics),
    }
    progress.history.append(record)
    value = selection_value(members, metrics)
    improved = value > progress.best_value
    if improved:
        progress.best, progress.best_value, progress.best_epoch = metrics, value, epoch + 1
        progress.best_state = {k: v.detach().clone() for k, v in model.prompt_state_dict().items()}
    return record, improved


def epoch_line(record: dict) -> str:
    return f"epoch {record['epoch']}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch")


def results_of(
    cfg: DictConfig, members: list[Member], progress: Progress, extra: dict, prep_seconds: float, test: dict | None
) -> dict:
    """results.json's record (the caller adds the wall time): the epochs, the parameter counts and whatever else
    `extra` holds, the data preparation time, and the test scores at the best dev epoch when a test split is set."""
    results = {**summary(cfg, members, progress), **extra, "data_prep_seconds": prep_seconds}
    if test is not None:
        results["test_at_best"] = test[members[0].name] if len(members) == 1 else test
    return results


def summary(cfg: DictConfig, members: list[Member], progress: Progress) -> dict:
    """What results.json says about the run's epochs: the selection metric, the best epoch and the history."""
    single = len(members) == 1
    return {
        "task": cfg.task.name,
        "backbone": cfg.backbone.name,
        "method": cfg.prompt.method,
        "select_metric": members[0].task.metric if single else {m.name: m.task.metric for m in members},
        "best_epoch": progress.best_epoch,
        "best": progress.best[members[0].name] if single else progress.best,
        "best_value": progress.best_value,
        "final": progress.history[-1],
        "history": progress.history,
        "train_examples": {m.name: len(m.splits["train"].examples) for m in members},
        "steps": progress.step,
    }
