"""`ptv2 bench bench.pack=K`: wall time and peak memory of K prompt jobs trained packed (one backbone, each batch as
K x B rows, as `hydra/launcher=packed` trains them) against the same K jobs run one after another, for the same
number of training steps each.

The K jobs are the command's prompt method (ptv2 or linear_probe) with its settings on the bench's synthetic
batches (bench.batch_size x bench.seq_length, bench.prompt_length); a train step is what `ptv2 train` does per
batch (forward, loss, backward, clipping, AdamW step). Each side runs in its own process, so its peak memory (RSS on
the CPU, max_memory_allocated on a GPU) is its own: the sequential side loads the backbone once per job, as K
separate runs would, and frees it before the next. Timed: bench.steps steps per job after bench.warmup_steps
untimed ones (model building is not timed on either side). On a shared machine the load changes between the two
processes, so the wall-time ratio is taken against the same K jobs stepped one after another in the packed
process, in turn with the packed steps; the sequential process gives the memory of one job at a time.
"""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptv2.commands.measure import (
    Clock,
    autocast_for,
    build_model,
    device_name,
    peak_memory,
    resolve_device,
    synthetic_batch,
)
from ptv2.config import BenchRunConfig, over_schema
from ptv2.engine import TrainStep, train_step
from ptv2.errors import UserError
from ptv2.io import declare, write_json, write_text
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.methods import method, mixable
from ptv2.modeling.model import PromptModel
from ptv2.modeling.packing import default_jobs_per_forward
from ptv2.optim import make_optimizer

log = logging.getLogger("ptv2")
OUTPUTS = declare("bench", "bench.json", "pack_*.yaml", "pack_*.json")


def job_step(models: list[PromptModel], cfg: DictConfig, device: torch.device, per_forward: int = 1):
    """One training step of every model, the step packed sweeps and `ptv2 train` take (engine.train_step): per_forward
    models' blocks per backbone forward and backward, then each model's own update with its own optimizer."""
    steps = [
        TrainStep(
            model,
            make_optimizer(cfg, (p for p in model.parameters() if p.requires_grad)),
            max_grad_norm=cfg.trainer.max_grad_norm,
        )
        for model in models
    ]
    autocast = lambda: autocast_for(cfg, device)  # noqa: E731

    def step(batch: dict) -> None:
        train_step(steps, batch, "bench", per_forward=per_forward, autocast=autocast)

    return step


def timed(step, batch: dict, clock: Clock, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(steps):
        start = clock.now()
        step(batch)
        times.append(clock.now() - start)
    return times


def measure(cfg: DictConfig, mode: str) -> dict:
    """One side in this process: 'packed' (K models on one encoder) or 'sequential' (K jobs one after another)."""
    bench, pack = cfg.bench, cfg.bench.pack
    if bench.threads:
        torch.set_num_threads(bench.threads)
    device = resolve_device(bench.device)
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds, per_forward = [], 1
    if mode == "packed":
        torch.manual_seed(cfg.trainer.seed)
        first = build_model(cfg, device)
        models = [first] + [
            PromptModel(first.encoder, cfg.prompt, {"bench": (ClassificationHead, 2)}, cfg.task.head_dropout).to(device)
            for _ in range(pack - 1)
        ]
        for model in models:
            model.train()
        batch = synthetic_batch(first.encoder.config, bench.batch_size, bench.seq_length, device, 0)
        per_forward = bench.jobs_per_forward or default_jobs_per_forward(device, pack)
        packed_step = job_step(models, cfg, device, per_forward)
        # The same K jobs stepped one after another on this backbone, timed in turn with the packed steps, so a
        # change of machine load hits both alike (the sequential process's own time is load at another moment).
        alone = [job_step([model], cfg, device) for model in models]

        def one_after_another(batch: dict) -> None:
            for step in alone:
                step(batch)

        for step in (packed_step, one_after_another):
            timed(step, batch, clock, bench.warmup_steps, 0)
        turns = [
            timed(step, batch, clock, 0, 1)[0] for _ in range(bench.steps) for step in (packed_step, one_after_another)
        ]
        step_seconds, interleaved = turns[0::2], turns[1::2]
    else:
        for job in range(pack):
            torch.manual_seed(cfg.trainer.seed + job)
            model = build_model(cfg, device).train()  # the backbone loaded again, as a separate run loads it
            batch = synthetic_batch(model.encoder.config, bench.batch_size, bench.seq_length, device, 0)
            step_seconds += timed(job_step([model], cfg, device), batch, clock, bench.warmup_steps, bench.steps)
            del model, batch
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "mode": mode,
        "jobs_per_forward": per_forward,
        **({"sequential_interleaved_seconds": sum(interleaved)} if mode == "packed" else {}),
        "train_seconds": sum(step_seconds),
        "steps_timed": len(step_seconds),
        "peak_memory_bytes": peak_memory(device),
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
        "device": device_name(device),
    }


def measure_isolated(cfg: DictConfig, mode: str, run_dir: Path) -> dict:
    config_path, result_path = run_dir / f"pack_{mode}.yaml", run_dir / f"pack_{mode}.json"
    write_text(config_path, OmegaConf.to_yaml(cfg))
    finished = subprocess.run(
        [sys.executable, "-m", "ptv2.commands.pack_bench", str(config_path), mode, str(result_path)],
        capture_output=True,
        text=True,
    )
    if finished.returncode != 0:
        lines = finished.stderr.strip().splitlines() or ["(no output)"]
        log.error("pack bench (%s) failed:\n%s", mode, "\n".join(lines[-15:]))
        return {"mode": mode, "error": lines[-1]}
    return json.loads(result_path.read_text())


def run(cfg: DictConfig, variant: DictConfig, run_dir: Path) -> dict:
    """The packed-vs-sequential comparison for `variant` (the command's method, with the bench's sizes)."""
    if not method(variant.prompt.method).packs:
        packing = " or ".join(name for name in mixable() if method(name).packs)
        raise UserError(f"bench.pack: prompt.method={variant.prompt.method} does not pack; use {packing}")
    sides = {mode: measure_isolated(variant, mode, run_dir) for mode in ("sequential", "packed")}
    report = {
        "backbone": cfg.backbone.name,
        "method": variant.prompt.method,
        "pack": cfg.bench.pack,
        "settings": {
            **OmegaConf.to_container(cfg.bench, resolve=True),
            "precision": cfg.trainer.precision,
            "prompt_length": variant.prompt.length,
            "backbone_dtype": variant.backbone.dtype,
        },
        **sides,
    }
    sequential, packed = sides["sequential"], sides["packed"]
    if "error" not in sequential and "error" not in packed:
        # Time: against the same jobs stepped one after another in turn with the packed steps (load-fair);
        # memory: against the sequential process, which holds one job at a time as separate runs would.
        report["wall_ratio"] = packed["train_seconds"] / packed["sequential_interleaved_seconds"]
        report["memory_ratio"] = packed["peak_memory_bytes"] / sequential["peak_memory_bytes"]
    write_json(run_dir / "bench.json", report)
    print(table(report))
    return report


def table(report: dict) -> str:
    bench = report["settings"]
    lines = [
        f"{report['backbone']}, {report['method']}, K={report['pack']} jobs x {bench['steps']} steps, batch "
        f"{bench['batch_size']} x length {bench['seq_length']}, prompt {bench['prompt_length']}, precision "
        f"{bench['precision']}, on {report['packed'].get('device') or report['sequential'].get('device')}",
        "| side | train s | peak memory |",
        "|---|---|---|",
    ]
    for mode in ("sequential", "packed"):
        side = report[mode]
        if "error" in side:
            lines.append(f"| {mode} | failed: {side['error']} | |")
        else:
            lines.append(f"| {mode} | {side['train_seconds']:.2f} | {side['peak_memory_bytes'] / 2**30:.2f} GiB |")
    if "sequential_interleaved_seconds" in report["packed"]:
        seconds = report["packed"]["sequential_interleaved_seconds"]
        lines.append(f"| sequential, in turn with packed | {seconds:.2f} | |")
    if "wall_ratio" in report:
        lines.append(
            f"packed ({report['packed']['jobs_per_forward']} job(s) per forward) / sequential: wall "
            f"{report['wall_ratio']:.2f}x, peak memory {report['memory_ratio']:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ptv2.commands.pack_bench CONFIG.yaml packed|sequential RESULT.json
    config = over_schema(OmegaConf.load(sys.argv[1]), BenchRunConfig)
    write_json(Path(sys.argv[3]), measure(config, sys.argv[2]))
