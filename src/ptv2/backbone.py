"""Load a backbone encoder and its tokenizer from the hub or a local folder, ready to take prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from ptv2 import injection
from ptv2.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _not_loadable(what: str, cfg, error: Exception) -> UserError:
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return UserError(
        f"could not load the {what} of backbone '{cfg.name_or_path}' ({reason}); "
        "offline, pass a local Hugging Face model folder with backbone.name_or_path=DIR"
    )


def load_config(cfg) -> PretrainedConfig:
    """The backbone's HF config with ptv2's dropout overrides applied (validated family)."""
    location = str(cfg.name_or_path)
    if location.startswith(("/", ".", "~")) and not Path(location).expanduser().is_dir():
        raise UserError(f"backbone.name_or_path={location} is not a folder; pass a local Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except (OSError, ValueError) as error:
        raise _not_loadable("config", cfg, error) from None
    injection.family_of(config)
    if cfg.dropout is not None:
        config.hidden_dropout_prob = cfg.dropout
    if cfg.attention_dropout is not None:
        config.attention_probs_dropout_prob = cfg.attention_dropout
    return config


def load_tokenizer(cfg):
    try:
        return AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except (OSError, ValueError) as error:
        raise _not_loadable("tokenizer", cfg, error) from None


def load_encoder(cfg, config: PretrainedConfig | None = None) -> torch.nn.Module:
    """The bare encoder (no pooler, no task head) that accepts per-layer prefixes."""
    config = config or load_config(cfg)
    family = injection.family_of(config)
    # DeBERTa-v2 only has its own eager attention; the others get the prefix-aware SDPA function.
    attention = injection.ATTENTION_KEY if family.injection == "attention_interface" else "eager"
    options = {"attn_implementation": attention, "dtype": DTYPES[cfg.dtype]}
    if cfg.random_init:
        encoder = AutoModel.from_config(config, **options)
    else:
        try:
            encoder = AutoModel.from_pretrained(cfg.name_or_path, config=config, revision=cfg.revision, **options)
        except (OSError, ValueError) as error:
            raise _not_loadable("weights", cfg, error) from None
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # heads read token states; an unused pooler would only inflate parameter counts
    injection.prepare_encoder(encoder)
    return encoder
