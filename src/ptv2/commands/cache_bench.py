"""`ptv2 bench bench.cache=[K, ...]`: the frozen cache's gain, top:K trained from cached hidden states against the
same top:K run through the whole backbone, on the command's backbone and on a deeper random-init copy of its shape
(bench.cache_layers layers), in one process.

Per shape and K: the median step time of each side (forward, loss, backward, clipping, AdamW; steps taken in turn,
so a change of machine load hits both alike) against the layer-count prediction 3K / (L + 2K) (uncached: L layers
forward and 2K backward; cached: K forward and 2K backward), one epoch of bench.cache_examples synthetic examples on
each side, and the one-time cost of the cache for those examples: its build time and size. Both sides run with no
dropout in the backbone (where trainer.cache_frozen=auto caches, and what makes the two sides the same computation).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptv2.checks import lowest_prompted_layer
from ptv2.commands.measure import Clock, build_model, device_name, make_step, resolve_device, synthetic_batch
from ptv2.io import declare, write_json, write_text
from ptv2.modeling import backbone
from ptv2.modeling.injection import encoder_shape, hidden_entering

OUTPUTS = declare("bench", "bench.json", "*-layers/config.json")  # the random-init deep shape's config


def shapes(cfg: DictConfig, run_dir: Path) -> list[DictConfig]:
    """The command's backbone and, when bench.cache_layers is set, a random-init copy with that many layers (its
    config.json alone, in the bench's folder)."""
    base = OmegaConf.merge(cfg, {"backbone": {"dropout": 0.0, "attention_dropout": 0.0}})
    found = [base]
    depth = cfg.bench.cache_layers
    config = backbone.load_config(cfg.backbone)
    if depth and depth != encoder_shape(config)[0]:
        folder = run_dir / f"{cfg.backbone.name}-{depth}-layers"
        write_text(folder / "config.json", json.dumps({**config.to_dict(), "num_hidden_layers": depth}))
        deep = {"name": f"{cfg.backbone.name}-{depth}L", "name_or_path": str(folder), "random_init": True}
        found.append(OmegaConf.merge(base, {"backbone": deep}))
    return found


def cached_batch(model, batch: dict, layer: int) -> dict:
    """`batch` with the hidden states entering `layer` computed as the cache holds them (eval mode, no prefix)."""
    model.eval()
    with torch.inference_mode():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = hidden_entering(model.encoder, [layer], **inputs)[layer]
    model.train()
    return {**batch, "frozen_hidden": {layer: hidden.clone()}}


def measure_shape(cfg: DictConfig, top: int, device: torch.device) -> dict:
    """Both sides of top:K on one backbone shape."""
    bench = cfg.bench
    variant = OmegaConf.merge(cfg, {"prompt": {"layers": f"top:{top}"}})
    torch.manual_seed(cfg.trainer.seed)
    uncached_model = build_model(variant, device).train()
    torch.manual_seed(cfg.trainer.seed)
    cached_model = build_model(variant, device).train()
    config = uncached_model.encoder.config
    layers = encoder_shape(config)[0]
    layer = lowest_prompted_layer(variant.prompt, layers)
    batch = synthetic_batch(config, bench.batch_size, bench.seq_length, device, 0)
    sides = {"uncached": (make_step(uncached_model, variant, device)[0], batch)}
    sides["cached"] = (make_step(cached_model, variant, device)[0], cached_batch(cached_model, batch, layer))
    for step, side_batch in sides.values():
        for _ in range(bench.warmup_steps):
            step(side_batch)
    times = {name: [] for name in sides}
    for _ in range(bench.steps):
        for name, (step, side_batch) in sides.items():
            times[name].append(sum(step(side_batch)))

    # One epoch of distinct examples on each side, and the cache's one-time cost for them.
    clock = Clock(device)
    count = -(-bench.cache_examples // bench.batch_size)
    batches = [synthetic_batch(config, bench.batch_size, bench.seq_length, device, 10 + i) for i in range(count)]
    start = clock.now()
    cached_batches = [cached_batch(cached_model, b, layer) for b in batches]
    build_seconds = clock.now() - start
    cached_states = [b["frozen_hidden"][layer] for b in cached_batches]
    cache_bytes = sum(states.numel() * states.element_size() for states in cached_states)
    epoch = {}
    for name, side_batches in (("uncached", batches), ("cached", cached_batches)):
        start = clock.now()
        for side_batch in side_batches:
            sides[name][0](side_batch)
        epoch[name] = clock.now() - start
    uncached, cached = (statistics.median(times[name]) for name in ("uncached", "cached"))
    return {
        "backbone": cfg.backbone.name,
        "layers": layers,
        "top": top,
        "cached_from_layer": layer,
        "uncached_step_seconds": uncached,
        "cached_step_seconds": cached,
        "step_ratio": cached / uncached,
        "predicted_ratio": 3 * top / (layers + 2 * top),
        "epoch_examples": count * bench.batch_size,
        "uncached_epoch_seconds": epoch["uncached"],
        "cached_epoch_seconds": epoch["cached"],
        "cache_build_seconds": build_seconds,
        "cache_bytes": cache_bytes,
    }


def run(cfg: DictConfig, run_dir: Path) -> dict:
    bench = cfg.bench
    if bench.threads:
        torch.set_num_threads(bench.threads)
    device = resolve_device(bench.device)
    rows = []
    for shape in shapes(cfg, run_dir):
        layers = encoder_shape(backbone.load_config(shape.backbone))[0]
        for top in bench.cache:
            if top < layers:  # top:L prompts layer 0: nothing to cache
                rows.append(measure_shape(shape, top, device))
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "settings": {**OmegaConf.to_container(bench, resolve=True), "precision": cfg.trainer.precision},
        "prompt_length": cfg.prompt.length,
        "rows": rows,
    }
    write_json(run_dir / "bench.json", report)
    print(table(report, bench))
    return report


def table(report: dict, bench) -> str:
    lines = [
        f"frozen cache on {report['device']}: batch {bench.batch_size} x length {bench.seq_length}, prompt "
        f"{report['prompt_length']}, no backbone dropout; medians of {bench.steps} steps per side, in turn",
        "| backbone | L | top:K | uncached step s | cached step s | cached / uncached | 3K / (L+2K) | epoch s "
        "uncached / cached | cache build s | cache MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['backbone']} | {row['layers']} | {row['top']} | {row['uncached_step_seconds']:.3f} "
            f"| {row['cached_step_seconds']:.3f} | {row['step_ratio']:.2f} | {row['predicted_ratio']:.2f} "
            f"| {row['uncached_epoch_seconds']:.1f} / {row['cached_epoch_seconds']:.1f} "
            f"({row['epoch_examples']} ex.) | {row['cache_build_seconds']:.1f} | {row['cache_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines)
