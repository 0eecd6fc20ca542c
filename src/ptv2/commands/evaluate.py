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

from ptv2.engine import build, evaluate_all
from ptv2.errors import UserError
from ptv2.io import write_json
from ptv2.runs import checkpoint

log = logging.getLogger("ptv2")
OWN_KEYS = ("ckpt", "split", "input", "output_dir")  # this command's own keys, not the run's
# Groups that change neither the model nor its inputs: a group option passed out of habit (logger=none,
# trainer=smoke) is taken from this command's config. The trainer's seed stays the checkpoint's: it rebuilds a
# random-init backbone (backbone.random_init) exactly as in training.
COMMAND_GROUPS = ("trainer", "logger", "optimizer", "scheduler")
# Groups that define the model or its inputs: accepted only when they name what the checkpoint already has.
MODEL_GROUPS = {"backbone": "name", "task": "name", "prompt": "method"}


def checkpoint_config(cfg: DictConfig) -> DictConfig:
    """The checkpoint's run config with this command's overrides applied on top: `key=value` overrides as they are,
    harmless groups (COMMAND_GROUPS) from this command's config; a group that would change the trained model (another
    backbone, task, prompt method, a preset or an experiment) is refused. Paths are never the checkpoint's (see
    checkpoint.stored_config): task.data_dir, trainer.cache_dir come from this command."""
    saved = checkpoint.stored_config(cfg.ckpt)  # data only: no paths from the checkpoint, nothing resolved
    parser = OverridesParser.create()
    for override in parser.parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if key in OWN_KEYS:
            continue
        if key in COMMAND_GROUPS:
            with open_dict(saved):
                seed = saved.get("trainer", {}).get("seed")
                saved[key] = cfg[key]
                if key == "trainer" and seed is not None:
                    saved.trainer.seed = seed
            continue
        if key in MODEL_GROUPS and OmegaConf.select(saved, f"{key}.{MODEL_GROUPS[key]}") == cfg[key][MODEL_GROUPS[key]]:
            continue  # names the checkpoint's own backbone / task / method: nothing changes
        if "." not in key:
            trained = OmegaConf.select(saved, f"{key}.{MODEL_GROUPS[key]}") if key in MODEL_GROUPS else None
            raise UserError(
                f"'{override.input_line}' would change the {key} group of a trained checkpoint"
                + (f" (trained with {key}={trained})" if trained is not None else "")
                + f"; override single keys instead (e.g. {key}.some_key=value)"
            )
        with open_dict(saved):
            OmegaConf.update(saved, key, override.value(), merge=True)
    checkpoint.require_backbone(saved, cfg.ckpt)
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
    write_json(run_dir / "eval.json", results)
    log.info("%s %s: %s", metadata["task"], split, json.dumps(results["metrics"]))
    return results
