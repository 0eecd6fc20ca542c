"""`ptv2 bench`: train-step time, eval throughput and peak memory of each prompt method, against fine-tuning.

Every method runs on the same backbone, batch shape, precision and dropout settings, on synthetic batches of random
token ids at full length (no padding, so no method profits from shorter batches). A train step is what `ptv2 train`
does per batch: forward, loss, backward, gradient clipping, AdamW step, zero_grad. With `bench.isolate=true` (the
default) each method runs in its own Python process, so its peak memory (RSS on the CPU, max_memory_allocated on a
GPU) is its own and not the high-water mark of an earlier method.

No tokenizer and no data are needed: with `backbone.random_init=true` a folder holding only config.json will do.
This module imports neither the data pipeline nor the trackers, so it runs where only torch, transformers, hydra
and omegaconf are installed.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptv2.commands.measure import (
    Clock,
    autocast_for,
    build_model,
    device_name,
    make_step,
    peak_memory,
    resolve_device,
    summary,
    synthetic_batch,
)
from ptv2.config import BenchRunConfig, over_schema
from ptv2.errors import UserError
from ptv2.io import declare, write_json, write_text
from ptv2.modeling.methods import BASELINE, method
from ptv2.modeling.model import PromptModel

log = logging.getLogger("ptv2")
OUTPUTS = declare(
    "bench",
    "config.yaml",
    ".hydra/*.yaml",
    "bench.log",
    "bench.json",
    "variant_*.yaml",
    "variant_*.json",
    "profile_*.txt",
    "bench_*.err",
)


# ----------------------------------------------------------------------------------------------- configuration


def method_overrides(name: str) -> dict:
    """The config a `prompt=<method>` group option sets: {"prompt": {...}} plus any global keys (optimizer.lr)."""
    path = resources.files("ptv2.conf") / "prompt" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"bench.methods: unknown method '{name}'")
    text = path.read_text()
    values = OmegaConf.to_container(OmegaConf.create(text)) or {}  # OmegaConf reads 2e-5 as a float; PyYAML not
    values.pop("defaults", None)  # the method's settings schema: applied by variant_config
    return values if "@package _global_" in text else {"prompt": values}


def variant_config(cfg: DictConfig, name: str) -> DictConfig:
    """The run config of one method: the command's own prompt config for its own method, otherwise the method's
    group option over the schema defaults; then the bench's prompt length, frozen dtype and sequence length."""
    variant = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if name != cfg.prompt.method:
        overrides = method_overrides(name)
        variant.prompt = OmegaConf.merge(OmegaConf.structured(method(name).settings), overrides.pop("prompt"))
        variant.merge_with(overrides)
    bench = cfg.bench
    if bench.prompt_length is not None and method(name).has_prompt:
        variant.prompt.length = bench.prompt_length
    if bench.frozen_dtype is not None and method(name).frozen:
        variant.backbone.dtype = bench.frozen_dtype
    variant.task.max_length = bench.seq_length
    return variant


# ----------------------------------------------------------------------------------------------- measuring


def state_bytes(model: PromptModel, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of gradients and optimizer state after a step: only trainable parameters may hold either."""
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    frozen_state = [p for p in optimizer.state if not p.requires_grad]
    if frozen_grads or frozen_state:
        raise AssertionError(f"frozen weights hold gradients or optimizer state: {frozen_grads[:3]}")
    optimizer_state = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return {"optimizer_state_bytes": optimizer_state}


class Variant:
    """One method ready to step: its config, model, synthetic batch and train-step function."""

    def __init__(self, cfg: DictConfig):
        bench = cfg.bench
        self.cfg, self.device = cfg, resolve_device(bench.device)
        torch.manual_seed(cfg.trainer.seed)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model = build_model(cfg, self.device)
        self.batch = synthetic_batch(self.model.encoder.config, bench.batch_size, bench.seq_length, self.device, 0)
        self.step, self.optimizer = make_step(self.model, cfg, self.device)
        self.phases: list[tuple[float, float, float]] = []

    def figures(self, peak: int | None, profile_path: Path | None) -> dict:
        """Everything measured about this variant (call after its timed steps)."""
        cfg, bench, model = self.cfg, self.cfg.bench, self.model
        memory = state_bytes(model, self.optimizer)
        if profile_path is not None:
            write_profile(self.step, self.batch, self.device, profile_path)
        eval_size = bench.eval_batch_size or cfg.trainer.eval_batch_size
        eval_batch = synthetic_batch(model.encoder.config, eval_size, bench.seq_length, self.device, 1)
        eval_seconds = time_eval(model, cfg, eval_batch, self.device, bench.eval_batches)
        counts = model.parameter_counts()
        step_time = summary([sum(p) for p in self.phases])
        return {
            "method": cfg.prompt.method,
            "prompt_length": cfg.prompt.length if method(cfg.prompt.method).has_prompt else 0,
            "backbone_dtype": cfg.backbone.dtype,
            "trainable_params": counts["trainable_params"],
            "total_params": counts["total_params"],
            "step_seconds": step_time,
            "forward_seconds": statistics.median(p[0] for p in self.phases),
            "backward_seconds": statistics.median(p[1] for p in self.phases),
            "optimizer_seconds": statistics.median(p[2] for p in self.phases),
            "train_examples_per_second": bench.batch_size / step_time["median"],
            "eval_examples_per_second": eval_size * bench.eval_batches / eval_seconds,
            "peak_memory_bytes": peak,
            "memory_kind": ("cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss") if peak else None,
            **memory,
            "device": device_name(self.device),
        }


def time_steps(variants: list[Variant], warmup: int, steps: int) -> None:
    """Warm-up, then timed steps taken round-robin across variants, so a change of machine load during the
    measurement hits every variant alike (the ratios stay honest on a shared machine)."""
    for variant in variants:
        variant.model.train()
        for _ in range(warmup):
            variant.step(variant.batch)
    for _ in range(steps):
        for variant in variants:
            variant.phases.append(variant.step(variant.batch))


def measure(cfg: DictConfig, profile_path: Path | None = None) -> dict:
    """Time one method in this process (its peak memory is the process's); returns its figures."""
    if cfg.bench.threads:
        torch.set_num_threads(cfg.bench.threads)
    variant = Variant(cfg)
    time_steps([variant], cfg.bench.warmup_steps, cfg.bench.steps)
    return variant.figures(peak_memory(variant.device), profile_path)


def measure_together(cfgs: list[DictConfig], run_dir: Path, profile: bool) -> dict[str, dict]:
    """All methods in this process with interleaved steps; peak memory is not per method here, so it is None."""
    bench = cfgs[0].bench
    if bench.threads:
        torch.set_num_threads(bench.threads)
    variants = [Variant(cfg) for cfg in cfgs]
    time_steps(variants, bench.warmup_steps, bench.steps)
    return {
        v.cfg.prompt.method: v.figures(None, run_dir / f"profile_{v.cfg.prompt.method}.txt" if profile else None)
        for v in variants
    }


@torch.inference_mode()
def time_eval(model: PromptModel, cfg: DictConfig, batch: dict, device: torch.device, batches: int) -> float:
    """Seconds for `batches` eval forwards (after one warm-up), under inference_mode as `ptv2 train` evaluates."""
    model.eval()
    clock = Clock(device)
    with autocast_for(cfg, device):
        model(batch, head="bench")
        start = clock.now()
        for _ in range(batches):
            model(batch, head="bench")
        return clock.now() - start


def write_profile(step, batch: dict, device: torch.device, path: Path) -> None:
    """torch.profiler table of three train steps, sorted by self time: where the step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(3):
            step(batch)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    write_text(path, profiler.key_averages().table(sort_by=sort, row_limit=40))


# ----------------------------------------------------------------------------------------------- the command


def measure_isolated(variant: DictConfig, work_dir: Path, profile: bool) -> dict:
    """measure() in a fresh Python process; a failure (e.g. out of memory) is reported, not raised."""
    method = variant.prompt.method
    config_path, result_path = work_dir / f"variant_{method}.yaml", work_dir / f"variant_{method}.json"
    write_text(config_path, OmegaConf.to_yaml(variant))
    command = [sys.executable, "-m", "ptv2.commands.bench", str(config_path), str(result_path)]
    if profile:
        command.append(str(work_dir / f"profile_{method}.txt"))
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        # One line here; the worker's whole output (a traceback, if any) goes to a file beside bench.json.
        lines = finished.stderr.strip().splitlines() or [f"exit code {finished.returncode}, no output"]
        error_path = work_dir / f"bench_{method}.err"
        write_text(error_path, finished.stderr)
        reason = lines[-1].removeprefix("ptv2: error: ")
        log.error("bench of %s failed: %s (details in %s)", method, reason, error_path.name)
        return {"method": method, "error": reason}
    return json.loads(result_path.read_text())


def with_ratios(results: dict[str, dict]) -> dict[str, dict]:
    """Adds ratios against fine-tuning of the same run (step time and memory: lower is better; eval: higher)."""
    base = results.get(BASELINE)
    if not base or "error" in base:
        return results
    for figures in results.values():
        if "error" in figures:
            continue
        figures["step_ratio"] = figures["step_seconds"]["median"] / base["step_seconds"]["median"]
        if figures["peak_memory_bytes"] and base["peak_memory_bytes"]:
            figures["memory_ratio"] = figures["peak_memory_bytes"] / base["peak_memory_bytes"]
        figures["eval_throughput_ratio"] = figures["eval_examples_per_second"] / base["eval_examples_per_second"]
    return results


def table(results: dict[str, dict]) -> str:
    def ratio(figures: dict, key: str) -> str:
        return f"{figures[key]:.2f}" if key in figures else "-"

    def memory(size: int | None) -> str:
        return f"{size / 2**30:.2f} GiB" if size else "- (isolate=false)"

    header = (
        "| method | trainable | step s (min-max) | step ratio | fwd / bwd / opt s | eval ex/s | peak mem | mem ratio |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for name, f in results.items():
        if "error" in f:
            lines.append(f"| {name} | failed: {f['error']} |")
            continue
        step = f["step_seconds"]
        lines.append(
            f"| {name} | {f['trainable_params']:,} | {step['median']:.3f} ({step['min']:.3f}-{step['max']:.3f}) "
            f"| {ratio(f, 'step_ratio')} | {f['forward_seconds']:.3f} / {f['backward_seconds']:.3f} / "
            f"{f['optimizer_seconds']:.3f} | {f['eval_examples_per_second']:.1f} "
            f"| {memory(f['peak_memory_bytes'])} | {ratio(f, 'memory_ratio')} |"
        )
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    bench = cfg.bench
    if bench.serve:  # `ptv2 bench serve`: an HTTP load test of ptv2 serve
        from ptv2.commands import serve_bench

        return serve_bench.run(cfg, run_dir)
    if bench.pack:  # packed sweeps: K jobs on one backbone vs one after another
        from ptv2.commands import pack_bench

        return pack_bench.run(cfg, variant_config(cfg, cfg.prompt.method), run_dir)
    if bench.cache:  # the frozen cache: top:K cached vs uncached
        from ptv2.commands import cache_bench

        return cache_bench.run(variant_config(cfg, cfg.prompt.method), run_dir)
    if not bench.methods:
        raise UserError("bench.methods is empty")
    if bench.device == "cuda" and not torch.cuda.is_available():  # before a worker per method finds out
        raise UserError("bench.device=cuda but no CUDA device is visible; use bench.device=auto or cpu")
    variants = [variant_config(cfg, name) for name in dict.fromkeys(bench.methods)]
    if bench.isolate:
        results = {}
        for variant in variants:
            log.info("bench: %s", variant.prompt.method)
            results[variant.prompt.method] = measure_isolated(variant, run_dir, bench.profile)
    else:
        try:
            results = measure_together(variants, run_dir, bench.profile)
        except UserError:
            raise
        except Exception as error:  # one process for all: one failure ends them all
            raise UserError(
                f"bench (isolate=false) failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}; "
                "bench.isolate=true measures each method in its own process"
            ) from None
    results = with_ratios(results)
    measured = next((f for f in results.values() if "device" in f), {})
    report = {
        "device": measured.get("device"),
        "torch": torch.__version__,
        "backbone": cfg.backbone.name,
        "settings": {
            **OmegaConf.to_container(bench, resolve=True),
            "precision": cfg.trainer.precision,
            "backbone_dtype": cfg.backbone.dtype,
            "hidden_dropout": cfg.backbone.dropout,
            "attention_dropout": cfg.backbone.attention_dropout,
        },
        "methods": results,
    }
    write_json(run_dir / "bench.json", report)
    text = table(results)
    print(
        f"{cfg.backbone.name} on {report['device']}, batch {bench.batch_size} x length {bench.seq_length}, "
        f"precision {cfg.trainer.precision}\n{text}"
    )
    log.info("bench results in %s", run_dir / "bench.json")
    failed = {name: figures["error"] for name, figures in results.items() if "error" in figures}
    if failed and len(failed) == len(results):  # nothing measured: the command failed
        listed = "; ".join(f"{name}: {error}" for name, error in failed.items())
        raise UserError(f"every method failed ({listed}); the details are in {run_dir}/bench_<method>.err")
    return report


def _worker(argv: list[str]) -> None:
    """python -m ptv2.commands.bench VARIANT.yaml RESULT.json [PROFILE.txt]: measure one method in this process."""
    # Over the schema, so keys the config lacks get their defaults and the worker sees typed values.
    cfg = over_schema(OmegaConf.load(argv[0]), BenchRunConfig)
    profile = Path(argv[2]) if len(argv) > 2 else None
    try:
        figures = measure(cfg, profile)
    except UserError as error:  # one line for the parent to report, no traceback
        print(f"ptv2: error: {error}", file=sys.stderr)
        sys.exit(2)
    write_json(Path(argv[1]), figures)


if __name__ == "__main__":
    _worker(sys.argv[1:])
