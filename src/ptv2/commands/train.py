"""`ptv2 train`: config -> data -> model -> training loop -> results in the run directory.

A run trains one prompt on one dataset, or on several ("members" of a multi-task config) with one head each:
every epoch visits each member's batches once, in a seeded random interleaving (sampling proportional to dataset
size), and the best epoch maximises the mean of the members' selection metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from ptv2.config import task_members, validate
from ptv2.data import LengthGroupedBatches, Split, prepare_split, sorted_batches, timed
from ptv2.errors import UserError
from ptv2.modeling import backbone
from ptv2.modeling.heads import POOLER_TYPES, VerbalizerHead
from ptv2.modeling.model import PromptModel
from ptv2.runs import checkpoint
from ptv2.runs import resume as training_state
from ptv2.runs.progress import epoch_progress
from ptv2.runs.tracking import Tracker
from ptv2.tasks import task_type

log = logging.getLogger("ptv2")


@dataclass
class Member:
    """One dataset of a run: its head name, task config, task type module and prepared splits."""

    name: str
    task: DictConfig
    kind: object
    splits: dict[str, Split]


class IndexedFeatures(torch.utils.data.Dataset):
    """Tokenized features with their row index, so outputs can be put back in order after sorted batching."""

    def __init__(self, features):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return {**self.features[index], "index": index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.features[indices]  # one Arrow read per batch instead of one per row
        return [{**{k: v[i] for k, v in rows.items()}, "index": index} for i, index in enumerate(indices)]


def make_collate(kind, tokenizer, pad_to: int | None = None):
    """Batches of features; pad_to right-pads the token dimension to a fixed length (trainer.pad_to_max_length)."""

    def collate(items: list[dict]) -> dict:
        indices = torch.tensor([item.pop("index") for item in items])
        batch = kind.collate(items, tokenizer)
        return {**(pad_to_length(batch, pad_to, tokenizer.pad_token_id) if pad_to else batch), "index": indices}

    return collate


def pad_to_length(batch: dict, length: int, pad_id: int) -> dict:
    """Token-aligned (rows, tokens) tensors right-padded to `length`: every batch as long as the longest possible,
    as the official scripts padded (padding="max_length"). Only for speed comparisons: results are unchanged."""
    fills = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    padded = dict(batch)
    for key, fill in fills.items():
        tensor = batch.get(key)
        if torch.is_tensor(tensor) and tensor.dim() == 2 and tensor.shape[1] < length:
            if key == "labels" and tensor.shape != batch["input_ids"].shape:
                continue  # labels that are not per token
            padded[key] = torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=fill)
    return padded


def feature_lengths(features) -> list[int]:
    """Token count of each feature (multiple choice: of its longest choice)."""
    return [max(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids) for ids in features["input_ids"]]


def build(cfg: DictConfig, splits_of):
    """Tokenizer, members (task type + prepared splits each) and model for a config; shared by train and eval.

    splits_of(task) -> the split names to prepare for a member task (None entries are skipped).

    Label names missing from a task config are derived from its training data and written into the config, so
    the run's config.yaml and checkpoint record them.
    """
    backbone_config = backbone.load_config(cfg.backbone)
    validate(cfg, backbone_config)
    tokenizer = backbone.load_tokenizer(cfg.backbone)
    members, prep_seconds = [], {}
    for name, task in task_members(cfg.task):
        kind = task_type(task.type)
        if not task.labels and hasattr(kind, "labels"):
            from ptv2.data import load_examples

            with open_dict(task):
                task.labels = kind.labels(load_examples(task, "train"))
        prepared = {}
        for split in dict.fromkeys(s for s in splits_of(task) if s):
            limit = cfg.trainer.limit_train if split == "train" else cfg.trainer.limit_eval
            prepared[split], prep_seconds[f"{name}/{split}"] = timed(
                prepare_split, task, split, tokenizer, kind, cfg.trainer.cache_dir, limit
            )
        members.append(Member(name, task, kind, prepared))
    if cfg.task.members:  # keep the (label-completed) member configs in the run config
        with open_dict(cfg.task):
            for member in members:
                cfg.task.members[member.name] = member.task
    head_kinds = {m.task.get("head", "linear") for m in members}
    encoder, parts = backbone.load_with_heads(cfg.backbone, backbone_config, head_kinds)
    heads = {m.name: head_spec(m, tokenizer, parts) for m in members}
    model = PromptModel(encoder, cfg.prompt, heads=heads, head_dropout=cfg.task.head_dropout)
    return tokenizer, members, prep_seconds, model


VERBALIZER_TYPES = ("classification", "multiple_choice")


def head_spec(member: Member, tokenizer, parts: backbone.BackboneHeads):
    """PromptModel's head for a member: (task type, label count) for a linear head, (task type, label count,
    pooler) for a pooler head, or a VerbalizerHead on the backbone's MLM head reading `task.options.verbalizer`
    (one word per label; multiple choice: one word, whose logit scores each choice)."""
    task = member.task
    kind = task.get("head", "linear")  # configs saved before task.head existed have linear heads
    if kind == "pooler":
        if task.type not in POOLER_TYPES:
            raise UserError(f"task.head=pooler works for task types {', '.join(POOLER_TYPES)}, not {task.type}")
        if parts.pooler is None:
            raise UserError(
                f"task.head=pooler: backbone {tokenizer.name_or_path} has no pooler (ELECTRA and DeBERTa have none); "
                "use task.head=linear"
            )
        return task.type, len(task.labels), parts.pooler
    if kind != "verbalizer":
        return task.type, len(task.labels)
    if task.type not in VERBALIZER_TYPES:
        raise UserError(f"task.head=verbalizer works for task types {', '.join(VERBALIZER_TYPES)}, not {task.type}")
    if tokenizer.mask_token_id is None:
        raise UserError(f"task.head=verbalizer needs a backbone with a mask token; {tokenizer.name_or_path} has none")
    words = [str(word) for word in (task.options.get("verbalizer") or [])]
    expected = 1 if task.type == "multiple_choice" else len(task.labels)
    if len(words) != expected:
        wanted = "one word" if expected == 1 else f"{expected} words, one per label of {list(task.labels)}"
        raise UserError(f"task {member.name}: task.options.verbalizer={words} needs {wanted}")
    return VerbalizerHead(parts.lm_head, backbone.label_word_ids(tokenizer, words, f"task {member.name}"))


@torch.inference_mode()
def predict(model, member: Member, split: str, tokenizer, accelerator: Accelerator, batch_size: int) -> np.ndarray:
    """Outputs of every feature of a split, in feature order (batches are sorted by length for speed)."""
    model.eval()
    features = member.splits[split].features
    loader = DataLoader(
        IndexedFeatures(features),
        batch_sampler=sorted_batches(feature_lengths(features), batch_size),
        collate_fn=make_collate(member.kind, tokenizer),
    )
    loader = accelerator.prepare_data_loader(loader)
    ordered = [None] * len(features)
    for batch in loader:
        result = member.kind.outputs(model(batch, head=member.name), batch)
        if accelerator.num_processes > 1:
            # Ragged outputs (per-token: (B, L) tag ids, (B, L, 2) span logits) are padded to one width (a no-op
            # for (B, labels) scores); repeated rows that even out the last batches across processes carry an
            # index already seen and simply overwrite it.
            result = accelerator.pad_across_processes(result, dim=1, pad_index=0) if result.dim() >= 2 else result
            result, index = accelerator.gather((result, batch["index"]))
        else:
            index = batch["index"]
        for row, i in zip(result.cpu().numpy(), index.tolist(), strict=True):
            ordered[i] = row
    return ordered


def evaluate(model, member: Member, split: str, tokenizer, accelerator, cfg) -> dict[str, float]:
    outputs = predict(model, member, split, tokenizer, accelerator, cfg.trainer.eval_batch_size)
    return member.kind.metrics(member.task, member.splits[split], outputs)


def evaluate_all(model, members: list[Member], split_of, tokenizer, accelerator, cfg) -> dict[str, dict]:
    return {m.name: evaluate(model, m, split_of(m), tokenizer, accelerator, cfg) for m in members}


def selection_value(members: list[Member], metrics: dict[str, dict]) -> float:
    """The number that picks the best epoch: the selection metric, averaged over members."""
    return float(np.mean([metrics[m.name][m.task.metric] for m in members]))


def flatten(prefix: str, members: list[Member], metrics: dict[str, dict]) -> dict[str, float]:
    """{'dev/accuracy': ...} for one dataset, {'dev/conll03/f1': ...} for several (nested values skipped)."""
    single = len(members) == 1
    return {
        f"{prefix}/{k}" if single else f"{prefix}/{name}/{k}": v
        for name, values in metrics.items()
        for k, v in values.items()
        if isinstance(v, (int, float))
    }


def make_scheduler(cfg, optimizer, total_steps: int):
    """(scheduler, unit): 'step' schedulers advance every optimizer step, 'epoch' ones after every epoch."""
    name = cfg.scheduler.name
    if name == "linear":
        warmup = int(cfg.scheduler.warmup_ratio * total_steps)
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps), "step"
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.scheduler.gamma), "epoch"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), "step"


def interleaved(loaders: dict[str, DataLoader], seed: int, epoch: int):
    """Yield (member name, batch): every batch of every loader once, members interleaved in a seeded order."""
    schedule = [name for name, loader in loaders.items() for _ in range(len(loader))]
    order = torch.randperm(len(schedule), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for position in order if len(loaders) > 1 else range(len(schedule)):
        name = schedule[position]
        yield name, next(iterators[name])


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

    samplers, loaders = {}, {}
    for member in members:
        features = member.splits["train"].features
        samplers[member.name] = LengthGroupedBatches(
            feature_lengths(features), cfg.trainer.batch_size, cfg.trainer.seed, cfg.trainer.group_by_length
        )
        loaders[member.name] = DataLoader(
            IndexedFeatures(features),
            batch_sampler=samplers[member.name],
            collate_fn=make_collate(
                member.kind, tokenizer, member.task.max_length if cfg.trainer.pad_to_max_length else None
            ),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = {name: accelerator.prepare_data_loader(loader) for name, loader in loaders.items()}
    total_steps = sum(len(loader) for loader in loaders.values()) * cfg.trainer.epochs
    if cfg.trainer.max_steps:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    scheduler, schedule_unit = make_scheduler(cfg, optimizer, total_steps)
    unwrapped = accelerator.unwrap_model(model)

    tracker = Tracker(cfg, run_dir, enabled=accelerator.is_main_process)
    tracker.summary(counts)
    history, best, best_value, best_epoch, best_state, step = [], None, -math.inf, -1, None, 0
    labels = {m.name: list(m.task.labels) for m in members}
    # trainer.resume: restore everything the loop carries; the interrupted epoch is replayed below.
    resumed = training_state.restore(cfg, run_dir, unwrapped, optimizer, scheduler)
    start_epoch, losses = 0, []
    if resumed:
        history, best, best_value, best_epoch, best_state, step, losses = (
            resumed[k] for k in ("history", "best", "best_value", "best_epoch", "best_state", "step", "losses")
        )
        start_epoch = resumed["epoch"]
    # Again, now with the label names derived from the training data; only after the resume check, so a refused
    # resume leaves the folder's config as it was.
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def save_state(epoch: int, batches_done: int) -> None:
        if accelerator.is_main_process:
            progress = dict(epoch=epoch, batches_done=batches_done, step=step, losses=losses if batches_done else [])
            progress.update(history=history, best=best, best_value=best_value, best_epoch=best_epoch)
            training_state.save(run_dir, unwrapped, optimizer, scheduler, cfg, {**progress, "best_state": best_state})

    stop = training_state.StopRequests().install()  # SIGTERM/SIGINT: save the state, then stop
    patience, stopped_early = cfg.trainer.early_stopping_patience, False
    for epoch in range(start_epoch, cfg.trainer.epochs):
        # Checked before the epoch rather than after the last one, so a resumed run stops where it had stopped.
        if patience and best_epoch > 0 and epoch - best_epoch >= patience:
            stopped_early = True
            log.info(
                "early stopping: no better dev %s in the %d epochs after epoch %d",
                cfg.task.metric,
                patience,
                best_epoch,
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
            done = resumed["batches_done"]
            for _ in range(done):
                next(batches)
            training_state.set_rng_states(resumed["rng"])
        else:
            losses = []
        bar = epoch_progress(  # a bar on a terminal, a log line per tenth of the epoch elsewhere
            batches,
            total=sum(len(x) for x in loaders.values()),
            desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}",
            enabled=cfg.trainer.progress and accelerator.is_main_process,
            initial=done,
        )
        for name, batch in bar:
            loss = unwrapped.head_for(name).loss(model(batch, head=name), batch)
            if not torch.isfinite(loss):
                save_state(epoch, done)  # the parameters are still those of the last good step
                raise UserError(
                    f"the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); lower optimizer.lr "
                    f"or use trainer.precision=no; the best checkpoint so far and the training state of step {step} "
                    f"are kept in {run_dir}"
                )
            accelerator.backward(loss)
            if cfg.trainer.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.trainer.max_grad_norm)
            optimizer.step()
            if schedule_unit == "step":
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if cfg.trainer.save_every_steps and step % cfg.trainer.save_every_steps == 0:
                save_state(epoch, done)
            training_state.maybe_die(step)
            if stop.signal_name:
                save_state(epoch, done)
                raise UserError(
                    f"stopped by {stop.signal_name} at step {step}; the training state is saved in "
                    f"{run_dir / training_state.STATE_DIR}: continue with trainer.resume={run_dir}"
                )
            if cfg.trainer.max_steps and step >= cfg.trainer.max_steps:
                break
        if schedule_unit == "epoch":
            scheduler.step()
        train_seconds = time.perf_counter() - epoch_started

        metrics = evaluate_all(model, members, lambda m: m.task.eval_split, tokenizer, accelerator, cfg)
        value = selection_value(members, metrics)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "train_seconds": train_seconds,
            **flatten("dev", members, metrics),
        }
        history.append(record)
        tracker.log(record, step=step)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        if value > best_value:
            best, best_value, best_epoch = metrics, value, epoch + 1
            best_state = {k: v.detach().clone() for k, v in unwrapped.prompt_state_dict().items()}
            if cfg.trainer.save_checkpoint and accelerator.is_main_process:
                checkpoint.save(run_dir / checkpoint.FILENAME, unwrapped, cfg, labels)
        save_state(epoch + 1, 0)
        if cfg.trainer.max_steps and step >= cfg.trainer.max_steps:
            break
    stop.uninstall()

    single = len(members) == 1
    results = {
        "task": cfg.task.name,
        "backbone": cfg.backbone.name,
        "method": cfg.prompt.method,
        "select_metric": members[0].task.metric if single else {m.name: m.task.metric for m in members},
        "best_epoch": best_epoch,
        "best": best[members[0].name] if single else best,
        "best_value": best_value,
        "final": history[-1],
        "history": history,
        **counts,
        "train_examples": {m.name: len(m.splits["train"].examples) for m in members},
        "steps": step,
        "stopped_early": stopped_early,  # trainer.early_stopping_patience ended the run before trainer.epochs
        "data_prep_seconds": prep_seconds,
    }
    tested = [m for m in members if m.task.test_split]
    if tested:
        # Tagging protocol: the test score of the best dev epoch.
        unwrapped.load_state_dict(best_state, strict=False)
        test = evaluate_all(model, tested, lambda m: m.task.test_split, tokenizer, accelerator, cfg)
        results["test_at_best"] = test[members[0].name] if single else test
    results["wall_time_seconds"] = time.perf_counter() - started
    tracker.summary({**flatten("best", members, best), "best_epoch": best_epoch})
    tracker.finish()
    if accelerator.is_main_process:
        checkpoint.atomic_write(run_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
        log.info("best %s=%.4f at epoch %d; results in %s", cfg.task.metric, best_value, best_epoch, run_dir)
    return results
