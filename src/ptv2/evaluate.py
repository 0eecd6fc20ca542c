"""`ptv2 eval ckpt=...`: rebuild the model from a checkpoint's config and evaluate it on one split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from ptv2 import checkpoint
from ptv2.errors import UserError
from ptv2.train import build, evaluate_all

log = logging.getLogger("ptv2")
OWN_KEYS = ("ckpt", "split", "input", "output_dir")  # this command's own keys, not the run's


def checkpoint_config(cfg: DictConfig) -> DictConfig:
    """The checkpoint's run config with this command's `key=value` overrides applied on top."""
    metadata = checkpoint.read_metadata(cfg.ckpt)
    saved = OmegaConf.create(json.loads(metadata["config"]))
    parser = OverridesParser.create()
    for override in parser.parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if key in OWN_KEYS:
            continue
        if "." not in key:
            raise UserError(
                f"'{override.input_line}' would change the {key} group of a trained checkpoint; "
                f"override single keys instead (e.g. {key}.some_key=value)"
            )
        with open_dict(saved):
            OmegaConf.update(saved, key, override.value(), merge=True)
    return saved


def run(cfg: DictConfig, run_dir: Path) -> dict:
    if not cfg.ckpt:
        raise UserError("ptv2 eval needs a checkpoint: ckpt=RUN_DIR (or a prompt.safetensors file)")
    saved = checkpoint_config(cfg)
    split = cfg.split
    set_seed(saved.trainer.seed)  # a random-init backbone (backbone.random_init) is rebuilt as in training
    tokenizer, members, _, model = build(saved, lambda task: [split])
    metadata = checkpoint.load(cfg.ckpt, model)
    accelerator = Accelerator(mixed_precision=saved.trainer.precision, cpu=saved.trainer.cpu)
    model = accelerator.prepare(model)
    metrics = evaluate_all(model, members, lambda member: split, tokenizer, accelerator, saved)
    single = len(members) == 1
    results = {
        "checkpoint": str(checkpoint.resolve(cfg.ckpt)),
        "task": metadata["task"],
        "split": split,
        "examples": {m.name: len(m.splits[split].examples) for m in members},
        "metrics": metrics[members[0].name] if single else metrics,
    }
    checkpoint.atomic_write(run_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    log.info("%s %s: %s", metadata["task"], split, json.dumps(results["metrics"]))
    return results
