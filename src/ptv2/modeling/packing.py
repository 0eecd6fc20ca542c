"""Several prompt models on ONE frozen encoder in one forward: block k of the rows carries model k's prefix.

The packed step of packed sweeps (commands/packed.py) and of `ptv2 bench bench.pack=K`; torch only (no data
pipeline), so the benchmark runs where only torch, transformers, hydra and omegaconf are installed.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ptv2.modeling.injection import Prefix, position_ids, run_encoder
from ptv2.modeling.model import PromptModel
from ptv2.modeling.prompts import PrefixEncoder


def pack_prefixes(prefixes: list[Prefix | None]) -> Prefix | None:
    """One prefix for K blocks of rows: {layer: (key, value[, visible])} with key/value (K*B, heads, P_max, head_dim)
    holding block k's own prefix (zero-padded), visible (K*B, P_max) True on its real columns only. The mask is left
    out when every block has the same length on the same layers (nothing to hide). None when no block has one."""
    present = [p for p in prefixes if p]
    if not present:
        return None
    sample = next(iter(present[0].values()))[0]
    count = sample.shape[0]  # rows per block
    lengths = [next(iter(p.values()))[0].shape[2] if p else 0 for p in prefixes]
    layers = sorted({layer for p in present for layer in p})
    longest = max(lengths)
    if len(present) == len(prefixes) and len(set(lengths)) == 1 and all(sorted(p) == layers for p in present):
        return {layer: tuple(torch.cat([p[layer][i] for p in prefixes]) for i in (0, 1)) for layer in layers}
    _, heads, _, head_dim = sample.shape
    packed = {}
    for layer in layers:
        keys, values, visible = [], [], []
        for prefix, length in zip(prefixes, lengths, strict=True):
            if prefix and layer in prefix:
                key, value = prefix[layer]
                keys.append(F.pad(key, (0, 0, 0, longest - length)))
                values.append(F.pad(value, (0, 0, 0, longest - length)))
                shown = torch.arange(longest, device=sample.device) < length
            else:  # this job has no prompt on this layer: its rows see no prefix column here
                keys.append(sample.new_zeros(count, heads, longest, head_dim))
                values.append(sample.new_zeros(count, heads, longest, head_dim))
                shown = torch.zeros(longest, dtype=torch.bool, device=sample.device)
            visible.append(shown.expand(count, longest))
        packed[layer] = (torch.cat(keys), torch.cat(values), torch.cat(visible))
    return packed


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
