"""Methods whose trained part PEFT builds on ptv2's frozen backbone: LoRA (prompt.method=lora) and PEFT's own prefix
tuning (prompt.method=peft_prefix). Heads, data, loop, checkpoints and evaluation stay ptv2's (PromptModel).

- LoRA: `inject_adapter_in_model` replaces the target projections in place (the encoder keeps its class, forward
  and attention function), each W x becoming W x + (alpha / r) B A x with A (r, in), B (out, r); B starts at zero,
  so an untrained adapter is the stock model. Only A and B train.
- PEFT prefix tuning: the encoder is wrapped in PEFT's FEATURE_EXTRACTION model, which prepends P always-visible
  mask columns and passes the prefix as a key/value cache (`past_key_values`). The backbone therefore numbers its
  tokens from P (the official P-Tuning v2 numbering; ptv2 does so with prompt.shift_positions=true) and PEFT drops
  token_type_ids (with a warning). SEQ_CLS / TOKEN_CLS task types are not used: on transformers 5 they look for a
  `past_key_values` argument the encoders' task heads no longer have and refuse (docs/lora.md).

peft is an optional dependency (`pip install 'ptv2[lora]'`): imported only when one of these methods is chosen.
"""

from __future__ import annotations

from torch import nn

from ptv2.errors import UserError
from ptv2.modeling.injection import family_of


def require_peft(method_name: str):
    """The peft module, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError(
            f"prompt.method={method_name} needs PEFT, which is not installed: pip install 'ptv2[lora]'"
        ) from None
    return peft


def lora_targets(prompt_cfg, config) -> list[str]:
    """prompt.target_modules, or the backbone family's default (injection.FAMILIES: the one per-family table)."""
    chosen = prompt_cfg.get("target_modules")
    return [str(name) for name in chosen] if chosen else list(family_of(config).lora_targets)


def add_lora(encoder: nn.Module, prompt_cfg) -> nn.Module:
    """`encoder` with LoRA matrices in its target projections (in place). Call after freezing the encoder: the new
    matrices are the only parameters that train."""
    peft = require_peft("lora")
    targets = lora_targets(prompt_cfg, encoder.config)
    config = peft.LoraConfig(
        r=int(prompt_cfg.r),
        lora_alpha=float(prompt_cfg.alpha),
        lora_dropout=float(prompt_cfg.dropout),
        target_modules=targets,
        bias="none",
    )
    try:
        return peft.inject_adapter_in_model(config, encoder)
    except ValueError as error:  # no module matches a target name
        raise UserError(
            f"prompt.target_modules={targets} does not fit backbone {encoder.config.model_type} "
            f"({str(error).splitlines()[0][:160]}); name its attention projections, "
            f"e.g. {list(family_of(encoder.config).lora_targets)}"
        ) from None


def add_peft_prefix(encoder: nn.Module, prompt_cfg) -> nn.Module:
    """PEFT's prefix-tuning model around `encoder`: forward(input_ids, attention_mask, ...) -> the encoder's output
    with prompt.length prefix key/values on every layer. prompt.projection=mlp is PEFT's prefix_projection (an MLP
    of hidden width prompt.projection_dim). PEFT freezes the encoder and initialises the prefix itself."""
    peft = require_peft("peft_prefix")
    config = peft.PrefixTuningConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=int(prompt_cfg.length),
        prefix_projection=prompt_cfg.projection == "mlp",
        encoder_hidden_size=int(prompt_cfg.projection_dim),
    )
    return peft.get_peft_model(encoder, config)


def peft_prefix_refusal(prompt_cfg, backbone_cfg, heads: set[str], backbone_config) -> str | None:
    """Why prompt.method=peft_prefix cannot run this configuration (one line with the fix), or None.

    Measured with transformers 5.25 / peft 0.21.2 on tiny random models: BERT, RoBERTa, ELECTRA, GPT-2, Llama,
    Mistral, Qwen2/3, Gemma, GLM and GLM-4 run; DeBERTa-v2 fails inside attention (it has no cache)."""
    if family_of(backbone_config).injection == "deberta":
        return "PEFT passes its prefix as a key/value cache, which DeBERTa-v2 does not have; use prompt=ptv2"
    if "lm" in heads:
        return (
            "task.head=lm generates through a cache of its own, which PEFT's prefix cache would join; use prompt=ptv2"
        )
    if backbone_cfg.get("gradient_checkpointing"):
        return (
            "backbone.gradient_checkpointing=true drops the key/value cache, and PEFT's prefix with it; "
            "set backbone.gradient_checkpointing=false"
        )
    if backbone_cfg.get("dtype", "float32") != "float32":
        return (
            f"backbone.dtype={backbone_cfg.dtype}: PEFT's float32 prefix meets {backbone_cfg.dtype} keys in the "
            "cache and attention refuses mixed dtypes; use backbone.dtype=float32 with trainer.precision=bf16"
        )
    if prompt_cfg.get("layers", "all") != "all":
        layers = prompt_cfg.layers
        return f"prompt.layers={layers}: PEFT's prefix tuning has a prefix on every layer; set prompt.layers=all"
    if prompt_cfg.get("dropout", 0.0) > 0:
        return f"prompt.dropout={prompt_cfg.dropout}: PEFT's prefix tuning has no prefix dropout; set prompt.dropout=0"
    return None
