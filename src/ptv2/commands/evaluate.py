"""`ptv2 eval RUN_DIR` (or ckpt=RUN_DIR): rebuild the model from a checkpoint's config and evaluate it on one split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig

from ptv2.engine import build, evaluate_all
from ptv2.errors import UserError
from ptv2.io import declare, write_json
from ptv2.runs import checkpoint, summary
from ptv2.runs.checkpoint import checkpoint_config

log = logging.getLogger("ptv2")
OUTPUTS = declare("eval", "config.yaml", ".hydra/*.yaml", "eval.log", "eval.json")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    if not cfg.ckpt:
        raise UserError("ptv2 eval needs a checkpoint: ckpt=RUN_DIR (or a prompt.safetensors file)")
    saved = checkpoint_config(cfg)
    split = cfg.split
    set_seed(saved.trainer.seed)  # a random-init backbone (backbone.random_init) is rebuilt as in training
    try:
        tokenizer, members, _, model = build(saved, lambda task: [split])
    except UserError as error:
        hint = checkpoint.trained_data_hint(cfg.ckpt) if not saved.task.get("data_dir") else ""
        raise UserError(f"{error}{hint}" if "task.data_dir" in str(error) else str(error)) from None
    metadata = checkpoint.load(cfg.ckpt, model)
    accelerator = Accelerator(mixed_precision=saved.trainer.precision, cpu=saved.trainer.cpu)
    model = accelerator.prepare(model)
    metrics = evaluate_all(model, members, lambda member: split, tokenizer, accelerator, saved, progress=True)
    single = len(members) == 1
    results = {
        "checkpoint": str(checkpoint.resolve(cfg.ckpt)),
        "task": metadata["task"],
        "split": split,
        "examples": {m.name: len(m.splits[split].examples) for m in members},
        "metrics": metrics[members[0].name] if single else metrics,
    }
    path = write_json(run_dir / "eval.json", results)
    unit = summary.unit(saved.task.get("type")) if single else "per member"
    log.info("%s %s: %s (%s)", metadata["task"], split, json.dumps(results["metrics"]), unit)
    log.info("eval.json written to %s", path.absolute())
    return results
