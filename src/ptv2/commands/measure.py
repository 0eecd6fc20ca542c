"""The pieces `ptv2 bench` and `ptv2 bench bench.pack=K` measure with: the device, a synthetic batch, a clock that
waits for the GPU, peak memory, and the model and training step they time (engine.train_step, the step of `ptv2
train`). Imports neither the data pipeline nor the trackers' run code.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ptv2.checks import validate
from ptv2.engine import TrainStep, train_step
from ptv2.errors import UserError
from ptv2.modeling import backbone
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel
from ptv2.optim import make_optimizer

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("bench.device=cuda but no CUDA device is visible")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def synthetic_batch(config, batch_size: int, length: int, device: torch.device, seed: int) -> dict:
    """Random ids (above the usual special-token ids) at full length, and random labels for two classes."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(5, config.vocab_size, (batch_size, length), generator=generator),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    if getattr(config, "type_vocab_size", 0) > 0:
        batch["token_type_ids"] = torch.zeros(batch_size, length, dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


class Clock:
    """Wall time of a phase; waits for the GPU so asynchronous kernels are counted where they run."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def peak_memory(device: torch.device) -> int:
    """Bytes: the process's peak resident set on the CPU (Linux reports KiB), peak allocated tensors on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(cfg: DictConfig, device: torch.device) -> PromptModel:
    config = backbone.load_config(cfg.backbone)
    validate(cfg, config)
    encoder, _ = backbone.load_encoder(cfg.backbone, config)
    model = PromptModel(
        encoder, cfg.prompt, heads={"bench": (ClassificationHead, 2)}, head_dropout=cfg.task.head_dropout
    )
    return model.to(device)


def make_step(model: PromptModel, cfg: DictConfig, device: torch.device):
    """The training step of `ptv2 train` (engine.train_step; no scheduler) as a function of the batch that times its
    three phases: forward, backward, and the update (clipping, optimizer step)."""
    optimizer = make_optimizer(cfg, (p for p in model.parameters() if p.requires_grad))
    steps = [TrainStep(model, optimizer, max_grad_norm=cfg.trainer.max_grad_norm)]
    autocast = lambda: autocast_for(cfg, device)  # noqa: E731
    clock = Clock(device)

    def step(batch: dict) -> tuple[float, float, float]:
        marks = {"start": clock.now()}
        train_step(steps, batch, "bench", autocast=autocast, mark=lambda phase: marks.update({phase: clock.now()}))
        return (
            marks["forward"] - marks["start"],
            marks["backward"] - marks["forward"],
            marks["update"] - marks["backward"],
        )

    return step, optimizer


def autocast_for(cfg: DictConfig, device: torch.device):
    precision = cfg.trainer.precision
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[precision])
