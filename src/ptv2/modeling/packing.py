"""Several prompt models on ONE frozen encoder in one forward: block k of the rows carries model k's prefix.

The packed step of packed sweeps (commands/packed.py) and of `ptv2 bench bench.pack=K`; torch only (no data
pipeline), so the benchmark runs where only torch, transformers, hydra and omegaconf are installed.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ptv2.modeling.injection import Gate, Prefix, position_ids, run_encoder, run_encoder_from
from ptv2.modeling.model import PromptModel, cached_start
from ptv2.modeling.prompts import PrefixEncoder


def pack_prefixes(prefixes: list[Prefix | None]) -> Prefix | None:
    """One prefix for K blocks of rows: {layer: (key, value[, visible[, gate]])} with key/value (K*B, heads, P_max,
    head_dim) holding block k's own prefix (zero-padded), visible (K*B, P_max) True on its real columns only, and,
    when some block's prefix is gated (APT), one gate giving each block its own job's weights (see mixed_gate). The
    mask is left out when every block has the same lengths on the same layers (nothing to hide). P_max is per layer
    (per-layer prompt lengths). None when no block has a prefix."""
    present = [p for p in prefixes if p]
    if not present:
        return None
    sample = next(iter(present[0].values()))[0]
    count = sample.shape[0]  # rows per block
    layers = sorted({layer for p in present for layer in p})
    same = len(present) == len(prefixes) and all(sorted(p) == layers for p in present)
    same = same and all(len({p[layer][0].shape[2] for p in present}) == 1 for layer in layers)
    _, heads, _, head_dim = sample.shape
    packed = {}
    for layer in layers:
        longest = max(p[layer][0].shape[2] for p in present if layer in p)
        keys, values, visible, gates = [], [], [], []
        for k, prefix in enumerate(prefixes):
            block = slice(k * count, (k + 1) * count)
            if prefix and layer in prefix:
                key, value, *rest = prefix[layer]
                length = key.shape[2]
                keys.append(F.pad(key, (0, 0, 0, longest - length)) if length < longest else key)
                values.append(F.pad(value, (0, 0, 0, longest - length)) if length < longest else value)
                shown = torch.arange(longest, device=sample.device) < length
                if len(rest) > 1 and rest[1] is not None:
                    gates.append((rest[1], block, length))
            else:  # this job has no prompt on this layer: its rows see no prefix column here
                keys.append(sample.new_zeros(count, heads, longest, head_dim))
                values.append(sample.new_zeros(count, heads, longest, head_dim))
                shown = torch.zeros(longest, dtype=torch.bool, device=sample.device)
            visible.append(shown.expand(count, longest))
        entry = (torch.cat(keys), torch.cat(values), None if same else torch.cat(visible))
        if gates:
            entry = (*entry, mixed_gate(gates, longest))
        packed[layer] = entry if len(entry) > 3 or entry[2] is not None else entry[:2]
    return packed


def mixed_gate(parts: list[tuple[Gate, slice | torch.Tensor, int]], longest: int) -> Gate:
    """One gate for rows that carry different prompts: parts are (gate, rows, P) of each gated prompt; its rows
    (a slice or index tensor) get that gate's (rows, P) weights on their first P columns, every other weight is 1
    (ungated prompts, and padded columns, which the visible mask hides anyway)."""

    def gate(hidden: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        weights = torch.ones(hidden.shape[0], longest, device=hidden.device)
        for own, rows, length in parts:
            weights[rows, :length] = own(hidden[rows], None if real is None else real[rows]).to(weights.dtype)
        return weights

    return gate


def packed_hidden(encoder, models: list[PromptModel], batch: dict) -> list[torch.Tensor]:
    """The encoder's last hidden states for each model's copy of the batch, from ONE forward of K x B rows:
    [(B, L, hidden)] * K, block k computed with model k's prompt (and its dropout, in training mode)."""
    rows = batch["input_ids"].shape[0]
    count = len(models)
    inputs = {
        key: batch[key].repeat(count, 1)
        for key in ("input_ids", "attention_mask", "token_type_ids")
        if batch.get(key) is not None
    }
    if any(model.shift_positions for model in models):
        shifts = [model.prompt.length if model.shift_positions else 0 for model in models]
        blocks = [position_ids(encoder.config, batch["attention_mask"], shift) for shift in shifts]
        if blocks[0] is not None:  # None: relative positions, nothing to number
            inputs["position_ids"] = torch.cat(blocks)
    prefixes = [model.prompt(rows) if isinstance(model.prompt, PrefixEncoder) else None for model in models]
    start = cached_start(batch.get("frozen_hidden"), min(model.lowest_layer for model in models))
    if start is not None:  # the frozen cache's hidden states, one copy per block
        hidden = batch["frozen_hidden"][start].repeat(count, 1, 1)
        return list(run_encoder_from(encoder, pack_prefixes(prefixes), start, hidden, **inputs).split(rows))
    return list(run_encoder(encoder, pack_prefixes(prefixes), **inputs).split(rows))


def default_jobs_per_forward(device: torch.device, jobs: int) -> int:
    """How many jobs' blocks share one backbone forward when the launcher does not say: all of them on a GPU, where
    one job's batch leaves most of the device idle and K x B rows cost little more time than B; one on a CPU, whose
    matmuls are already saturated by one batch, so larger ones only add memory (measured on MiniLM, K=4, batch 32:
    1.13x the sequential time, 2.8x the memory; docs/sweeps.md, "Packed sweeps"). The jobs still share the backbone's
    weights, the data and each step's batch."""
    return jobs if device.type == "cuda" else 1


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
