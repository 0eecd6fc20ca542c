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
    return None


# ----------------------------------------------------------------------------------- PEFT's adapter file formats
# ptv2 checkpoint names <-> PEFT adapter_model.safetensors names (PEFT drops the adapter name when it saves).
LORA_PREFIX = ("encoder.", "base_model.model.")
LORA_ADAPTER_NAME = (".default.", ".")


def lora_to_peft(tensors: dict) -> dict:
    """A ptv2 LoRA checkpoint's adapter tensors under the names PEFT saves them with."""
    ours, theirs = LORA_PREFIX
    return {
        theirs + name[len(ours) :].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): t
        for name, t in tensors.items()
        if name.startswith(ours) and (".lora_A.default." in name or ".lora_B.default." in name)
    }


def lora_from_peft(tensors: dict) -> dict:
    """PEFT's LoRA adapter tensors under ptv2's checkpoint names (the inverse of lora_to_peft)."""
    ours, theirs = LORA_PREFIX
    renamed = {}
    for name, tensor in tensors.items():
        if not name.startswith(theirs) or not (".lora_A." in name or ".lora_B." in name):
            raise UserError(f"{name} is not a LoRA A/B matrix of the base model; only plain LoRA adapters import")
        name = name[len(theirs) :].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        renamed[ours + name] = tensor
    return renamed


def lora_expected_shapes(config, targets: list[str], r: int) -> dict[str, tuple[int, int]]:
    """ptv2 name -> shape of every LoRA A and B matrix that `targets` at rank r give the backbone of `config`
    (built on the meta device: no weights, no memory)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    shapes = {}
    for path, module in model.named_modules():
        if not any(path == t or path.endswith("." + t) for t in targets):
            continue
        if hasattr(module, "in_features"):
            fan_in, fan_out = module.in_features, module.out_features
        elif hasattr(module, "nx"):  # GPT-2's Conv1D: weight (in, out)
            fan_in, fan_out = module.nx, module.nf
        else:
            continue
        shapes[f"encoder.{path}.lora_A.default.weight"] = (r, fan_in)
        shapes[f"encoder.{path}.lora_B.default.weight"] = (fan_out, r)
    return shapes


def checked_tensors(tensors: dict, expected: dict[str, tuple], where: str) -> dict:
    """`tensors` when they are exactly the expected names, each a finite floating tensor of its expected shape;
    else one line naming the first that is not (the checks a checkpoint from elsewhere gets)."""
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        name = (unexpected or missing)[0]
        what = "unexpected" if unexpected else "missing"
        raise UserError(
            f"{where}: {what} tensor {name} ({len(unexpected)} unexpected, {len(missing)} missing); refused"
        )
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise UserError(f"{where}: {name} holds {tensor.dtype} numbers, not floating point ones; refused")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise UserError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}; refused"
            )
        if not tensor.isfinite().all():
            raise UserError(f"{where}: {name} holds NaN or infinite values; refused")
    return tensors


def rotated_keys(prefix, config, inverse: bool = False):
    """A rotary decoder's ptv2 prefix (P, layers x 2 x heads x head_dim) as PEFT's: every key rotated by position P.

    ptv2 gives the prefix keys no rotation and numbers tokens from 0; PEFT's cache holds keys as they are and numbers
    tokens from P. Rotations compose, R(P + i) q . R(P) k = R(i) q . k, so keys rotated by P give every score ptv2's.
    The family's own rotary table and apply_rotary_pos_emb do the rotation (partial and interleaved ones included).
    inverse: rotate by -P instead (a PEFT prefix back to ptv2's).
    """
    import importlib

    import torch
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from ptv2.modeling.injection import encoder_shape

    length = prefix.shape[0]
    layers, heads, head_dim = encoder_shape(config)
    module = importlib.import_module(MODEL_MAPPING[type(config)].__module__)
    rotary_class = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    key_values = prefix.float().view(length, layers, 2, heads, head_dim).clone()
    keys = key_values[:, :, 0].permute(1, 2, 0, 3)  # (layers as batch, heads, P, head_dim)
    cos, sin = rotary_class(config=config)(keys, torch.full((layers, length), -length if inverse else length))
    key_values[:, :, 0] = module.apply_rotary_pos_emb(keys, keys, cos, sin)[1].permute(2, 0, 1, 3)
    return key_values.view_as(prefix).to(prefix.dtype)
