"""Prompt-only checkpoints: prompt module + heads in safetensors, with the metadata needed to rebuild the model.

A checkpoint is a few MB for a frozen-backbone method (the whole model only for full fine-tuning). Its metadata
holds the resolved run config, the backbone id and a hash of its config, the task and its label names, and the
ptv2 version; with the MLP reparameterization it also stores the folded prefix, so inference needs no MLP.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ptv2 import __version__
from ptv2.data.io import atomic_write  # also used by train/evaluate/state as checkpoint.atomic_write
from ptv2.errors import UserError

FILENAME = "prompt.safetensors"
FOLDED_KEY = "prompt.folded"


def backbone_hash(config) -> str:
    """Hash of the backbone's architecture-defining config (a checkpoint only fits the backbone it was made on)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return hashlib.sha256(json.dumps({k: getattr(config, k, None) for k in keys}).encode()).hexdigest()[:16]


def save(path: Path, model, cfg: DictConfig, labels: dict[str, list[str]]) -> None:
    tensors = {name: tensor.contiguous().cpu() for name, tensor in model.prompt_state_dict().items()}
    prompt = getattr(model, "prompt", None)
    if prompt is not None and getattr(prompt, "projection", None) is not None:
        tensors[FOLDED_KEY] = prompt.fold().cpu()
    metadata = {
        "ptv2_version": __version__,
        "backbone": cfg.backbone.name_or_path,
        "backbone_name": cfg.backbone.name,
        "backbone_hash": backbone_hash(model.encoder.config),
        "task": cfg.task.name,
        "method": cfg.prompt.method,
        "labels": json.dumps(labels),
        "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or the checkpoint inside a run directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: pass a {FILENAME} file or the run directory that holds one")
    return path


def read_metadata(path: str | Path) -> dict:
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a readable safetensors checkpoint ({error}); re-create it by training"
        ) from None
    if "config" not in metadata:
        raise UserError(f"{path} has no ptv2 metadata: it was not written by ptv2")
    return metadata


def load(path: str | Path, model, strict_heads: bool = True, use_folded: bool = False) -> dict:
    """Load prompt + heads into `model` (built for the same backbone); returns the checkpoint's metadata.

    use_folded: run the prompt from the stored MLP output instead of recomputing it (inference).
    """
    path = resolve(path)
    metadata = read_metadata(path)
    if metadata["backbone_hash"] != backbone_hash(model.encoder.config):
        raise UserError(
            f"{path} was trained on backbone {metadata['backbone']}, which differs from the one loaded; "
            f"use backbone.name_or_path={metadata['backbone']}"
        )
    tensors = load_file(str(path))
    folded = tensors.pop(FOLDED_KEY, None)
    own = dict(model.named_parameters())
    unknown = [name for name in tensors if name not in own]
    if unknown and strict_heads:
        raise UserError(
            f"{path} does not fit this model (unexpected tensors: {', '.join(unknown[:3])}); "
            f"it holds task {metadata['task']} with method {metadata['method']}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in own:
                if own[name].shape != tensor.shape:
                    raise UserError(
                        f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(own[name].shape)} (different prompt length, layers or labels?)"
                    )
                own[name].copy_(tensor)
    if use_folded and folded is not None:
        model.prompt.folded = folded.to(model.prompt.embedding.weight.device)
    return metadata
