"""What every command shares: build a run's model and data from its config, batch, take a training step, predict
and evaluate. `ptv2 train` is the loop around these; eval, predict, serving and bench reuse them as they are.

A run trains one prompt on one dataset, or on several ("members" of a multi-task config) with one head each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from ptv2.checks import validate
from ptv2.config import task_members
from ptv2.data import LengthGroupedBatches, Split, prepare_split, sorted_batches, timed
from ptv2.errors import UserError
from ptv2.modeling import backbone
from ptv2.modeling.heads import LanguageModelHead, VerbalizerHead
from ptv2.modeling.model import PromptModel
from ptv2.modeling.packing import chunked, packed_hidden
from ptv2.progress import FEW_BATCHES, epoch_progress
from ptv2.tasks import TASK_TYPES, TaskType, task_type


@dataclass
class Member:
    """One dataset of a run: its head name, task config, task type module and prepared splits."""

    name: str
    task: DictConfig
    kind: TaskType
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


def make_collate(kind: TaskType, tokenizer, pad_to: int | None = None, split: Split | None = None):
    """Batches of features; pad_to right-pads the token dimension to a fixed length (trainer.pad_to_max_length).
    When the split has cached hidden states (split.frozen, set once the run has built them), each batch carries its
    rows' as `frozen_hidden`: {layer they enter: (B, L, hidden)}."""
    per_token = getattr(kind, "PER_TOKEN", ())

    def collate(items: list[dict]) -> dict:
        indices = torch.tensor([item.pop("index") for item in items])
        batch = kind.collate(items, tokenizer)
        padded = pad_to_length(batch, pad_to, tokenizer.pad_token_id, per_token) if pad_to else batch
        frozen = split.frozen if split is not None else None
        if frozen:
            width = padded["input_ids"].shape[1]
            padded["frozen_hidden"] = {layer: states.rows(indices.tolist(), width) for layer, states in frozen.items()}
        return {**padded, "index": indices}

    return collate


def pad_to_length(batch: dict, length: int, pad_id: int, per_token: tuple[str, ...] = ()) -> dict:
    """The (rows, tokens) tensors right-padded to `length`: every batch as long as the longest possible, as the
    official scripts padded (padding="max_length"). Only for speed comparisons: results are unchanged.

    per_token: the task type's other keys with one value per token (PER_TOKEN: tagging's labels, padded -100)."""
    fills = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, **dict.fromkeys(per_token, -100)}
    padded = dict(batch)
    for key, fill in fills.items():
        tensor = batch.get(key)
        if torch.is_tensor(tensor) and tensor.shape[1] < length:
            padded[key] = torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=fill)
    return padded


def train_loaders(cfg: DictConfig, members: list[Member], tokenizer) -> dict[str, DataLoader]:
    """Per member, its training batches: length-grouped (trainer.group_by_length), reshuffled every epoch from
    trainer.seed + epoch (`loader.batch_sampler.set_epoch`)."""
    loaders = {}
    for member in members:
        features = member.splits["train"].features
        lengths = feature_lengths(member.kind, features)
        batches = LengthGroupedBatches(lengths, cfg.trainer.batch_size, cfg.trainer.seed, cfg.trainer.group_by_length)
        pad_to = member.task.max_length if cfg.trainer.pad_to_max_length else None
        collate = make_collate(member.kind, tokenizer, pad_to, member.splits["train"])
        loaders[member.name] = DataLoader(IndexedFeatures(features), batch_sampler=batches, collate_fn=collate)
    return loaders


def feature_lengths(kind: TaskType, features) -> list[int]:
    """Token count of each feature, as its task type counts it (multiple choice: its longest choice)."""
    return [kind.feature_length(ids) for ids in features["input_ids"]]


def build(cfg: DictConfig, splits_of):
    """Tokenizer, members (task type + prepared splits each) and model for a config; shared by train and eval.

    splits_of(task) -> the split names to prepare for a member task (None entries are skipped).

    Label names missing from a task config are derived from its training data and written into the config, so
    the run's config.yaml and checkpoint record them.
    """
    backbone_config, tokenizer = load_backbone(cfg)
    members, prep_seconds = prepare_members(cfg, tokenizer, splits_of)
    encoder, parts = load_encoder(cfg, backbone_config)
    return tokenizer, members, prep_seconds, prompt_model(cfg, members, encoder, tokenizer, parts)


def prepare_members(cfg: DictConfig, tokenizer, splits_of) -> tuple[list[Member], dict[str, float]]:
    """(members with their prepared splits, preparation seconds per member/split): `build` without the model (a
    packed sweep group prepares the data once for all its jobs)."""
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
    return members, prep_seconds


def load_backbone(cfg: DictConfig):
    """(the backbone's HF config, its tokenizer); the run config is checked against the backbone first."""
    backbone_config = backbone.load_config(cfg.backbone)
    validate(cfg, backbone_config)
    return backbone_config, backbone.load_tokenizer(cfg.backbone)


def load_encoder(cfg: DictConfig, backbone_config):
    """(encoder, the backbone's head parts the run's heads read: pooler, MLM head)."""
    head_kinds = {task.get("head", "linear") for _, task in task_members(cfg.task)}
    return backbone.load_with_heads(cfg.backbone, backbone_config, head_kinds)


def prompt_model(cfg: DictConfig, members: list[Member], encoder, tokenizer, parts) -> PromptModel:
    """The run's PromptModel on a loaded encoder: its prompt method and one head per member."""
    heads = {m.name: head_spec(m, tokenizer, parts) for m in members}
    return PromptModel(encoder, cfg.prompt, heads=heads, head_dropout=cfg.task.head_dropout)


def head_spec(member: Member, tokenizer, parts: backbone.BackboneHeads):
    """PromptModel's head for a member: (head class, label count) for a linear head, (head class, label count,
    pooler) for a pooler head, or a VerbalizerHead on the backbone's MLM head reading `task.options.verbalizer`
    (one word per label; multiple choice: one word, whose logit scores each choice)."""
    task, head_class = member.task, member.kind.HEAD
    kind = task.get("head", "linear")  # configs saved before task.head existed have linear heads
    if kind not in member.kind.HEAD_KINDS:
        admitting = [name for name in TASK_TYPES if kind in task_type(name).HEAD_KINDS]
        raise UserError(f"task.head={kind} works for task types {', '.join(admitting)}, not {task.type}")
    if kind == "pooler":
        if parts.pooler is None:
            raise UserError(
                f"task.head=pooler: backbone {tokenizer.name_or_path} has no pooler (ELECTRA and DeBERTa have none); "
                "use task.head=linear"
            )
        return head_class, len(task.labels), parts.pooler
    if kind == "lm":
        if not parts.causal:
            raise UserError(f"task.type=generation needs a decoder backbone; {tokenizer.name_or_path} is an encoder")
        return LanguageModelHead(parts.lm_head)
    if kind != "verbalizer":
        return head_class, len(task.labels)
    if tokenizer.mask_token_id is None and not parts.causal:
        raise UserError(f"task.head=verbalizer needs a backbone with a mask token; {tokenizer.name_or_path} has none")
    words = [str(word) for word in (task.options.get("verbalizer") or [])]
    expected = member.kind.VERBALIZER_WORDS or len(task.labels)
    if len(words) != expected:
        wanted = "one word" if expected == 1 else f"{expected} words, one per label of {list(task.labels)}"
        raise UserError(f"task {member.name}: task.options.verbalizer={words} needs {wanted}")
    return VerbalizerHead(parts.lm_head, backbone.label_word_ids(tokenizer, words, f"task {member.name}"))


def eval_loader(member: Member, split: str, tokenizer, accelerator: Accelerator, batch_size: int):
    """Batches of a split's features for evaluation, sorted by length for speed; each batch carries its rows'
    feature indices ("index"), so outputs go back in feature order."""
    features = member.splits[split].features
    loader = DataLoader(
        IndexedFeatures(features),
        batch_sampler=sorted_batches(feature_lengths(member.kind, features), batch_size),
        collate_fn=make_collate(member.kind, tokenizer, split=member.splits[split]),
    )
    return accelerator.prepare_data_loader(loader)


def forward_group(models: list, modules: list, batch: dict, head: str | None, loss: bool = False) -> list[torch.Tensor]:
    """Each model's head output for one batch (its loss when `loss`). One model runs its own forward; several models
    on one frozen encoder share ONE backbone forward of K x B rows, block k with model k's prompt and dropout
    (packing.packed_hidden). Rows never interact in an encoder, so each block is exactly its model's computation.
    models: as accelerate prepared them (device placement, mixed precision, several processes); modules: the
    PromptModels inside them (extract_model_from_parallel, taken once by the caller: it walks the model)."""
    if len(models) == 1:
        return [models[0](batch, head=head, loss=True) if loss else models[0](batch, head=head)]
    blocks = packed_hidden(modules[0].encoder, modules, batch)
    outputs = [module.head_for(head)(hidden, batch) for module, hidden in zip(modules, blocks, strict=True)]
    if loss:
        return [module.head_for(head).loss(output, batch) for module, output in zip(modules, outputs, strict=True)]
    return outputs


@torch.inference_mode()
def predict_group(
    models: list,
    member: Member,
    split: str,
    tokenizer,
    accelerator: Accelerator,
    batch_size: int,
    per_forward: int = 1,
    progress: bool = False,
) -> list[list]:
    """Each model's outputs of every feature of a split, in feature order (batches are sorted by length for speed);
    per_forward models share one backbone forward (forward_group). The one evaluation path of train, eval and
    predict, for one model or a packed group. With `progress` (eval and predict; training has its epoch lines), a
    bar on a terminal or a line per tenth of the split elsewhere, for a split of more than FEW_BATCHES batches."""
    for model in models:
        model.eval()
    modules = [extract_model_from_parallel(model) for model in models]
    loader = eval_loader(member, split, tokenizer, accelerator, batch_size)
    ordered = [[None] * len(member.splits[split].features) for _ in models]
    enabled = progress and accelerator.is_main_process and len(loader) > FEW_BATCHES
    for batch in epoch_progress(loader, len(loader), f"{member.name} {split}", enabled, unit="batches"):
        if hasattr(member.kind, "generate"):  # generation: greedy decoding, one model at a time
            results = [member.kind.generate(module, batch, member, tokenizer) for module in modules]
        else:
            results = []
            for chunk in chunked(list(range(len(models))), per_forward):
                with accelerator.autocast():
                    outputs = forward_group([models[i] for i in chunk], [modules[i] for i in chunk], batch, member.name)
                results += [member.kind.outputs(output, batch) for output in outputs]
        for rows, result in zip(ordered, results, strict=True):
            index = batch["index"]
            if accelerator.num_processes > 1:
                # Ragged outputs (per-token: (B, L) tag ids, (B, L, 2) span logits) are padded to one width (a no-op
                # for (B, labels) scores); repeated rows that even out the last batches across processes carry an
                # index already seen and simply overwrite it.
                result = accelerator.pad_across_processes(result, dim=1, pad_index=0) if result.dim() >= 2 else result
                result, index = accelerator.gather((result, index))
            for row, i in zip(result.cpu().numpy(), index.tolist(), strict=True):
                rows[i] = row
    return ordered


def predict(model, member: Member, split: str, tokenizer, accelerator: Accelerator, batch_size: int, progress=False):
    """Outputs of every feature of a split for one model, in feature order."""
    return predict_group([model], member, split, tokenizer, accelerator, batch_size, progress=progress)[0]


def evaluate_group(
    models: list, members: list[Member], split_of, tokenizer, accelerator, cfg, per_forward=1, progress=False
):
    """[{member: metrics}] per model."""
    metrics = [{} for _ in models]
    for member in members:
        split = split_of(member)
        batch_size = cfg.trainer.eval_batch_size
        outputs = predict_group(models, member, split, tokenizer, accelerator, batch_size, per_forward, progress)
        for values, rows in zip(metrics, outputs, strict=True):
            values[member.name] = member.kind.metrics(member.task, member.splits[split], rows)
    return metrics


def evaluate_all(model, members: list[Member], split_of, tokenizer, accelerator, cfg, progress=False):
    return evaluate_group([model], members, split_of, tokenizer, accelerator, cfg, progress=progress)[0]


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


def interleaved(loaders: dict[str, DataLoader], seed: int, epoch: int):
    """Yield (member name, batch): every batch of every loader once, members interleaved in a seeded order."""
    schedule = [name for name, loader in loaders.items() for _ in range(len(loader))]
    order = torch.randperm(len(schedule), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for position in order if len(loaders) > 1 else range(len(schedule)):
        name = schedule[position]
        yield name, next(iterators[name])


class TrainStep:
    """One model's part of a training step: its backward pass, then `update()`: clip its gradients, step its
    optimizer (and a per-step scheduler), clear its gradients. With an accelerator the backward pass and clipping go
    through it (mixed precision, several processes). `train_step` below runs the whole step for one or more."""

    def __init__(
        self, model, optimizer, *, max_grad_norm: float, scheduler=None, accelerator: Accelerator | None = None
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm, self.accelerator = max_grad_norm, accelerator
        self.module = extract_model_from_parallel(model)  # the PromptModel inside, taken once (it walks the model)
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss) if self.accelerator else loss.backward()

    def update(self) -> None:
        if self.max_grad_norm:
            clip = self.accelerator.clip_grad_norm_ if self.accelerator else torch.nn.utils.clip_grad_norm_
            clip(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_step(
    steps: list[TrainStep],
    batch: dict,
    head: str | None,
    *,
    per_forward: int = 1,
    autocast=contextlib.nullcontext,
    rejected=None,
    mark=None,
) -> list[float | None]:
    """One optimizer step of each model on the same batch, the step of `ptv2 train`, of a packed group (one model is
    a group of one) and of `ptv2 bench`: per_forward models' forward (forward_group) and backward at a time, then
    each model's own update. Returns each model's loss; None where it was not finite: rejected(index, loss) is told
    before any update, and that model takes no step (its parameters stay those of its last good step).
    mark(phase), if given, is called after each phase ("forward", "backward", "update"), for bench's timings."""
    values: list[float | None] = [None] * len(steps)
    stepped: list[tuple[int, torch.Tensor]] = []
    for chunk in chunked(list(range(len(steps))), per_forward):
        with autocast():
            chunk_steps = [steps[i] for i in chunk]
            losses = forward_group([s.model for s in chunk_steps], [s.module for s in chunk_steps], batch, head, True)
        mark and mark("forward")
        finite = torch.isfinite(torch.stack([loss.detach() for loss in losses])).tolist()  # one sync per chunk
        good = [(i, loss) for i, loss, ok in zip(chunk, losses, finite, strict=True) if ok]
        for i, loss, ok in zip(chunk, losses, finite, strict=True):
            if not ok and rejected is not None:
                rejected(i, loss)
        if good:
            total = good[0][1] if len(good) == 1 else torch.stack([loss for _, loss in good]).sum()
            steps[good[0][0]].backward(total)  # each model's parameters get exactly their own loss's gradient
            stepped += good
        mark and mark("backward")
    numbers = torch.stack([loss.detach() for _, loss in stepped]).tolist() if stepped else []  # one sync for all
    for (i, _), number in zip(stepped, numbers, strict=True):
        steps[i].update()
        values[i] = number
    mark and mark("update")
    return values
