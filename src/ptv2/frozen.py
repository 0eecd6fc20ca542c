"""The frozen cache (`trainer.cache_frozen`): the hidden states entering the lowest prompted layer, once per example.

The layers below the lowest prompted layer k see no prompt and never change, so with no dropout in them an
example's hidden states entering layer k are the same at every epoch. They are computed once per split (eval mode,
no prefix), stored beside the tokenized-data cache as safetensors, and every later batch reads them back
(engine.make_collate adds them as `frozen_hidden`); the model runs from layer k on (injection.run_encoder_from).
A linear probe prompts no layer: its cache is the encoder's output, and training runs the heads alone.

The key covers everything the hidden states depend on: the token ids themselves (so the tokenizer, max length and
data), where the tokens are numbered from (prompt.shift_positions), the backbone's config and a hash of the weights
below layer k, k, the weights' dtype, the attention function and the autocast precision. An entry that fits in a
quarter of the free memory is read into memory; a larger one is memory-mapped and each batch reads its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ptv2.checks import frozen_cache_refusal, lowest_prompted_layer
from ptv2.data import cache_dir, sorted_batches
from ptv2.engine import IndexedFeatures, Member, feature_lengths, make_collate
from ptv2.io import atomic_write
from ptv2.modeling.injection import encoder_shape, hidden_entering, layer_stack, shifted_position_ids
from ptv2.modeling.methods import method

log = logging.getLogger("ptv2")
CACHE_VERSION = 1
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
PADDING_READ = {"span"}  # task types whose loss reads the padded positions too (see padded_width)


@dataclass
class Plan:
    """Whether a run (or a packed group) trains from cached hidden states, and why: `layers` are the layers they
    enter, each job's lowest prompted layer (empty: not cached); `dropout` the largest dropout rate below the highest
    of them (which a cached run does not apply)."""

    layers: tuple[int, ...]
    reason: str
    dropout: float = 0.0
    shift: int = 0  # prompt.shift_positions: the tokens are numbered from this prompt length on

    def record(self) -> dict:
        """results.json's `frozen_cache`."""
        return {"layers": list(self.layers), "reason": self.reason, "dropout_in_cached_layers": self.dropout}


def position_shift(cfg) -> int:
    """Where a job numbers its tokens from: its prompt length with prompt.shift_positions (as the official code did),
    else 0. The embeddings below the prompt depend on it, so the cache does too."""
    shifted = cfg.prompt.get("shift_positions") and method(cfg.prompt.method).prompt == "prefix"
    return int(cfg.prompt.length) if shifted else 0


def dropout_below(encoder: torch.nn.Module, layer: int) -> float:
    """The largest dropout rate the embeddings and the layers below `layer` apply in training: dropout modules and
    the decoders' attention_dropout rates (a float the attention function reads)."""
    holder, name = layer_stack(encoder)
    above = {id(m) for block in list(getattr(holder, name))[layer:] for m in block.modules()}
    rates = [0.0]
    for module in encoder.modules():
        if id(module) in above:
            continue
        if isinstance(module, torch.nn.Dropout):
            rates.append(module.p)
        elif isinstance(getattr(module, "attention_dropout", None), float):
            rates.append(module.attention_dropout)
    return max(rates)


def plan(cfgs: list, backbone_config, encoder: torch.nn.Module, train_features: int | None = None) -> Plan:
    """The cache of a group of jobs on one backbone (a single run is a group of one): the hidden states entering each
    job's lowest prompted layer k, all from one forward per batch when it is built; each job trains from its own k
    (jobs that share one backbone forward, from the lowest k among them). `auto` caches only where it is exact (no
    dropout below the highest k) and where it is worth it: a run that ends (trainer.max_steps) before one pass over
    its `train_features` would pay for more of the cache than it reads."""
    setting, trainer = cfgs[0].trainer.get("cache_frozen", "auto"), cfgs[0].trainer
    if setting is False:
        return Plan((), "trainer.cache_frozen=false")
    steps = trainer.max_steps
    if setting == "auto" and train_features and steps and steps * trainer.batch_size < train_features:
        return Plan((), f"not cached: trainer.max_steps={steps} ends the run before one pass over the training data")
    for cfg in cfgs:
        if refusal := frozen_cache_refusal(cfg, backbone_config):
            return Plan((), f"not cached: {refusal}")
    shifts = {position_shift(cfg) for cfg in cfgs}
    if len(shifts) > 1:
        return Plan((), "not cached: the jobs number their tokens from different prompt lengths (shift_positions)")
    num_layers = encoder_shape(backbone_config)[0]
    layers = tuple(sorted({lowest_prompted_layer(cfg.prompt, num_layers) for cfg in cfgs}))
    layer = layers[-1]
    dropout = dropout_below(encoder, layer)
    if dropout and setting == "auto":
        return Plan(
            (),
            f"not cached: {below(layer)} apply dropout {dropout:g} (trainer.cache_frozen=true caches them without it)",
            dropout,
            shifts.pop(),
        )
    entering = ", ".join("the encoder's output" if k == num_layers else f"layer {k}" for k in layers)
    without = f", without their dropout {dropout:g}" if dropout else " (no dropout there: exact)"
    reason = f"cached: the hidden states entering {entering} of {num_layers}, computed once per example{without}"
    return Plan(layers, reason, dropout, shifts.pop())


def below(layer: int) -> str:
    return f"the embeddings and layers 0-{layer - 1}" if layer > 1 else "the embeddings and layer 0"


class FrozenStates:
    """The cached hidden states of one split: feature i's tokens are rows offsets[i]:offsets[i+1] of `hidden`
    (tokens, hidden size), in memory or memory-mapped."""

    def __init__(self, layer: int, path: Path, in_memory: bool):
        self.layer, self.path = layer, path
        if in_memory:
            tensors = load_file(str(path))
            self.offsets, self._hidden, self._file = tensors["offsets"], tensors["hidden"], None
        else:
            self._file = safe_open(str(path), framework="pt")
            self.offsets, self._hidden = self._file.get_tensor("offsets"), None

    def _tokens(self, start: int, end: int) -> torch.Tensor:
        if self._hidden is not None:
            return self._hidden[start:end]
        return self._file.get_slice("hidden")[start:end]

    def rows(self, indices: list[int], length: int) -> torch.Tensor:
        """(B, length, hidden) for the features `indices` of a right-padded batch; padded positions not cached are
        zeros (no real token attends to them)."""
        parts = [self._tokens(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        batch = parts[0].new_zeros(len(parts), length, parts[0].shape[-1])
        for row, part in enumerate(parts):
            batch[row, : part.shape[0]] = part[:length]
        return batch


def readable(path: Path, features: int) -> bool:
    """Whether `path` holds a whole cache entry for `features` features; a damaged one (truncated, foreign) is
    removed with a warning, so it is built again."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as entry:
            offsets, tokens = entry.get_tensor("offsets"), entry.get_slice("hidden").get_shape()[0]
        if offsets.shape != (features + 1,) or int(offsets[-1]) != tokens:
            raise ValueError("its offsets do not fit the split")
        return True
    except Exception as error:  # safetensors' and the OS's errors of a damaged file: all mean "build it again"
        log.warning("the frozen cache entry %s is unreadable (%s); building it again", path, str(error)[:160])
        path.unlink(missing_ok=True)
        return False


def weights_hash(encoder: torch.nn.Module, layer: int) -> str:
    """sha256 of every weight and buffer the hidden states entering `layer` depend on (all but the layers above)."""
    holder, name = layer_stack(encoder)
    above = {id(t) for module in list(getattr(holder, name))[layer:] for t in [*module.parameters(), *module.buffers()]}
    digest = hashlib.sha256()
    for key, tensor in sorted({**dict(encoder.named_parameters()), **dict(encoder.named_buffers())}.items()):
        if id(tensor) in above:
            continue
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_hash(features) -> str:
    """sha256 of the token columns of a split's features (their values and lengths, in order)."""
    digest = hashlib.sha256()
    for key in TOKEN_KEYS:
        if key in features.column_names:
            column = features.data.column(key).combine_chunks()
            digest.update(key.encode())
            digest.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
            digest.update(column.flatten().to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def free_memory() -> int:
    """Bytes of memory free now (what the operating system reports available)."""
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def prepare(
    encoder: torch.nn.Module,
    members: list[Member],
    tokenizer,
    plan: Plan,
    cfg,
    device: torch.device,
    autocast,
) -> dict[str, FrozenStates]:
    """The cached hidden states of every prepared split of every member, built where missing (and logged with their
    size), set as each split's `frozen`; returns them by "member/split"."""
    common = {
        "version": CACHE_VERSION,
        "shift": plan.shift,
        "config": encoder.config.to_json_string(use_diff=False),
        "dtype": str(next(encoder.parameters()).dtype),
        "attention": encoder.config._attn_implementation,
        "precision": cfg.trainer.precision,
    }
    weights = {layer: weights_hash(encoder, layer) for layer in plan.layers}
    folder = cache_dir(cfg.trainer.cache_dir) / "frozen"
    found = {}
    for member in members:
        for split_name, split in member.splits.items():
            tokens = tokens_hash(split.features), padded_width(member)
            paths = {}
            for layer in plan.layers:
                key = {**common, "layer": layer, "weights": weights[layer], "tokens": tokens}
                digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
                paths[layer] = folder / f"{member.task.name}-{split_name}-k{layer}-{digest}.safetensors"
            started = time.perf_counter()
            missing = [layer for layer, path in paths.items() if not readable(path, len(split.features))]
            if missing:  # every missing layer from one bottom forward per batch
                computed = compute(encoder, member, split_name, tokenizer, missing, plan.shift, cfg, device, autocast)
                for layer, tensors in computed.items():
                    atomic_write(paths[layer], lambda temporary, tensors=tensors: temporary.write_bytes(save(tensors)))
            seconds = time.perf_counter() - started
            split.frozen = {}
            for layer, path in paths.items():
                size = path.stat().st_size
                in_memory = size <= free_memory() // 4
                states = FrozenStates(layer, path, in_memory)
                split.frozen[layer] = found[f"{member.name}/{split_name}/{layer}"] = states
                log.info(
                    "frozen cache %s/%s, layer %d: %d examples, %.1f MB %s in %.1f s (%s) %s",
                    member.name,
                    split_name,
                    layer,
                    len(split.features),
                    size / 1e6,
                    "built" if layer in missing else "read",
                    seconds,
                    "in memory" if in_memory else "memory-mapped",
                    path,
                )
    return found


@torch.inference_mode()
def padded_width(member: Member) -> int | None:
    """task.max_length for the task types whose loss reads padded positions too (span: a softmax over every
    position of a row), whose hidden states are then cached up to that length; None: real tokens only (every other
    head reads real tokens, and padded keys get no attention)."""
    return member.task.max_length if member.task.type in PADDING_READ else None


def compute(encoder, member: Member, split: str, tokenizer, layers: list[int], shift: int, cfg, device, autocast):
    """{layer: {"hidden": (tokens, hidden size), "offsets": (features + 1,)}} of one split, in feature order: the
    encoder in eval mode, no prefix, batches sorted by length, tokens numbered from `shift`."""
    features = member.splits[split].features
    lengths = feature_lengths(member.kind, features)
    width = padded_width(member)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([width or length for length in lengths], dtype=torch.long).cumsum(0)
    # Batches collated by hand, not by a DataLoader, whose iterator draws a seed from torch's generator: building the
    # cache must leave the run's random numbers as they were.
    rows, collate = IndexedFeatures(features), make_collate(member.kind, tokenizer, pad_to=width)
    loader = (collate(rows.__getitems__(indices)) for indices in sorted_batches(lengths, cfg.trainer.eval_batch_size))
    hidden: dict[int, torch.Tensor] = {}
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in loader:
            inputs = {key: batch[key].to(device) for key in TOKEN_KEYS if batch.get(key) is not None}
            positions = shifted_position_ids(encoder.config, inputs["attention_mask"], shift)
            if positions is not None:
                inputs["position_ids"] = positions
            with autocast():
                states = hidden_entering(encoder, layers, **inputs)
            for layer, entering in states.items():
                entering = entering.cpu()
                if layer not in hidden:
                    hidden[layer] = entering.new_empty(int(offsets[-1]), entering.shape[-1])
                for row, index in enumerate(batch["index"].tolist()):
                    start, end = int(offsets[index]), int(offsets[index + 1])
                    hidden[layer][start:end] = entering[row, : end - start]
    finally:
        encoder.train(was_training)
    return {layer: {"hidden": tensor.contiguous(), "offsets": offsets} for layer, tensor in hidden.items()}
