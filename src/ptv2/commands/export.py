"""`ptv2 export RUN --to peft OUT`: a trained ptv2 deep prompt as a PEFT PrefixTuning adapter.

OUT gets adapter_config.json and adapter_model.safetensors (PEFT's own file names and layout: one tensor
`prompt_embeddings`, (P, layers x 2 x heads x head_dim), the key/value order ptv2's PrefixEncoder and PEFT share),
which `PeftModel.from_pretrained(AutoModel.from_pretrained(BACKBONE), OUT)` loads; and ptv2_heads.safetensors,
the task heads (PEFT's FEATURE_EXTRACTION model returns hidden states; a linear head on them gives ptv2's logits).

Only where the two are the same function: PEFT passes the prefix as a key/value cache, so the backbone numbers its
tokens from P. ptv2 does the same with prompt.shift_positions=true; without it, a backbone with learned absolute
positions (BERT, RoBERTa, ELECTRA, GPT-2) is a different model, and the export is refused. Rotary decoders match once
every prefix key is rotated by the angle of position P (`rotated_keys`), for right-padded input (PEFT numbers a left-
padded row's tokens from its padding on). DeBERTa-v2 cannot run PEFT's prefix at all.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ptv2.errors import UserError
from ptv2.modeling.injection import encoder_shape, family_of
from ptv2.modeling.peft_methods import require_peft
from ptv2.runs import checkpoint

HEADS_FILE = "ptv2_heads.safetensors"


def refusal(prompt, config) -> str | None:
    """Why a ptv2 prompt (prompt config, backbone HF config) has no PEFT PrefixTuning equivalent, or None."""
    family = family_of(config)
    if prompt.method != "ptv2":
        return f"prompt.method={prompt.method}: only ptv2 deep prompts export as PEFT prefix tuning"
    if family.injection != "attention_interface":
        return f"{config.model_type}: PEFT's prefix tuning does not run on it (it has no key/value cache)"
    if not isinstance(prompt.length, int):
        return f"prompt.length={list(prompt.length)}: PEFT's prefix tuning has one length for every layer"
    if prompt.get("layers", "all") != "all":
        return (
            f"prompt.layers={prompt.layers}: PEFT's prefix tuning has a prefix on every layer; only layers=all exports"
        )
    if family.positions != "rotary" and not prompt.get("shift_positions"):
        fix = "retrain with prompt.shift_positions=true" if not family.causal else "GPT-2 has no shifted ptv2 variant"
        return (
            f"{config.model_type} learns absolute positions: PEFT numbers tokens from P, this prompt was trained "
            f"numbering them from 0, so the two are different models; {fix}"
        )
    return None


def rotated_keys(prefix: torch.Tensor, config, inverse: bool = False) -> torch.Tensor:
    """A rotary decoder's ptv2 prefix (P, layers x 2 x heads x head_dim) as PEFT's: every key rotated by position P.

    ptv2 gives the prefix keys no rotation and numbers tokens from 0; PEFT's cache holds keys as they are and numbers
    tokens from P. Rotations compose, R(P + i) q . R(P) k = R(i) q . k, so keys rotated by P give every score ptv2's.
    The family's own rotary table and apply_rotary_pos_emb do the rotation (partial and interleaved ones included).
    inverse: rotate by -P instead (a PEFT prefix back to ptv2's).
    """
    length = prefix.shape[0]
    layers, heads, head_dim = encoder_shape(config)
    module = importlib.import_module(MODEL_MAPPING[type(config)].__module__)
    rotary_class = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    key_values = prefix.float().view(length, layers, 2, heads, head_dim).clone()
    keys = key_values[:, :, 0].permute(1, 2, 0, 3)  # (layers as batch, heads, P, head_dim)
    cos, sin = rotary_class(config=config)(keys, torch.full((layers, length), -length if inverse else length))
    key_values[:, :, 0] = module.apply_rotary_pos_emb(keys, keys, cos, sin)[1].permute(2, 0, 1, 3)
    return key_values.view_as(prefix).to(prefix.dtype)


def export_peft(ckpt: str, out: Path, backbone: str | None = None) -> Path:
    """Write the PEFT adapter of checkpoint `ckpt` into `out`; backbone: the backbone hub id or folder when the
    checkpoint's was a local folder. Returns `out`."""
    peft = require_peft("ptv2 export --to peft")
    path = checkpoint.resolve(ckpt)
    metadata = checkpoint.read_metadata(path)
    saved = checkpoint.stored_config(path)
    location = backbone or saved.backbone.get("name_or_path")
    if not location:
        raise UserError(f"{path} was trained on the local backbone folder {metadata['backbone']}; pass --backbone DIR")
    config = AutoConfig.from_pretrained(location, revision=None if backbone else saved.backbone.get("revision"))
    if checkpoint.backbone_hash(config) != metadata["backbone_hash"]:
        raise UserError(f"{path} was trained on backbone {metadata['backbone']}, not {location}; pass --backbone")
    problem = refusal(saved.prompt, config)
    if problem:
        raise UserError(f"cannot export {path} to PEFT: {problem}")

    tensors = load_file(str(path))
    # The MLP reparameterization only shapes training: its output (stored folded) is the prefix itself.
    prefix = tensors.get(checkpoint.FOLDED_KEY, tensors.get("prompt.embedding.weight"))
    layers, heads, head_dim = encoder_shape(config)
    if prefix is None or tuple(prefix.shape) != (saved.prompt.length, layers * 2 * heads * head_dim):
        raise UserError(f"{path} holds no ptv2 prefix of length {saved.prompt.length} for this backbone; refused")
    if family_of(config).positions == "rotary":
        prefix = rotated_keys(prefix, config)
    out.mkdir(parents=True, exist_ok=True)
    peft.PrefixTuningConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=saved.prompt.length,
        num_layers=layers,
        num_attention_heads=heads,
        token_dim=heads * head_dim,  # PEFT reshapes each layer's key/value to (heads, token_dim / heads)
        base_model_name_or_path=metadata["backbone"],
        inference_mode=True,
    ).save_pretrained(str(out))
    save_file({"prompt_embeddings": prefix.contiguous()}, str(out / "adapter_model.safetensors"))
    head_tensors = {name: t.contiguous() for name, t in tensors.items() if name.startswith("heads.")}
    head_info = {"task": metadata["task"], "labels": metadata["labels"], "from": str(path)}
    save_file(head_tensors, str(out / HEADS_FILE), metadata=head_info)
    return out


def import_peft(adapter: Path, like: str, out: Path) -> Path:
    """A PEFT PrefixTuning adapter folder as a ptv2 checkpoint OUT/prompt.safetensors, with the run config, labels
    and heads of the ptv2 run `like` (heads from the adapter's ptv2_heads.safetensors when `ptv2 export` wrote it).
    The inverse of export_peft: the same refusals, rotary keys rotated back by -P. Returns the checkpoint path."""
    require_peft("ptv2 import --from peft")
    path = checkpoint.resolve(like)
    metadata = checkpoint.read_metadata(path)
    saved = checkpoint.stored_config(path)
    try:
        adapter_config = json.loads((adapter / "adapter_config.json").read_text())
        prefix = load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"]
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"{adapter} is not a PEFT prefix-tuning adapter folder ({error}); refused") from None
    if adapter_config.get("peft_type") != "PREFIX_TUNING":
        raise UserError(f"{adapter} holds a {adapter_config.get('peft_type')} adapter; only PREFIX_TUNING imports")
    location = saved.backbone.get("name_or_path") or adapter_config.get("base_model_name_or_path")
    config = AutoConfig.from_pretrained(location)
    problem = refusal(saved.prompt, config)
    if problem:
        raise UserError(f"cannot import into the shape of {path}: {problem}")
    layers, heads, head_dim = encoder_shape(config)
    length = int(adapter_config["num_virtual_tokens"])
    if tuple(prefix.shape) != (length, layers * 2 * heads * head_dim):
        raise UserError(f"{adapter}: prompt_embeddings {tuple(prefix.shape)} do not fit backbone {location}; refused")
    if family_of(config).positions == "rotary":
        prefix = rotated_keys(prefix, config, inverse=True)
    tensors = {name: t for name, t in load_file(str(path)).items() if name.startswith("heads.")}
    if (adapter / HEADS_FILE).is_file():
        tensors.update(load_file(str(adapter / HEADS_FILE)))
    tensors["prompt.embedding.weight"] = prefix.contiguous()
    run_config = json.loads(metadata["config"])
    run_config["prompt"].update(length=length, projection="none")  # the prefix itself: no MLP to rebuild
    out.mkdir(parents=True, exist_ok=True)
    target = out / checkpoint.FILENAME
    save_file(tensors, str(target), metadata={**metadata, "config": json.dumps(run_config)})
    return target


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptv2 import", description="a PEFT prefix adapter as a ptv2 checkpoint")
    parser.add_argument("adapter", help="PEFT PrefixTuning adapter folder (adapter_config.json, adapter_model.*)")
    parser.add_argument("--from", dest="source", choices=["peft"], required=True)
    parser.add_argument("out", help="folder to write prompt.safetensors into")
    parser.add_argument("--like", required=True, help="the ptv2 run whose task, backbone, labels and heads it takes")
    return parser


def import_main(argv: list[str]) -> int:
    args = import_parser().parse_intermixed_args(argv)
    try:
        target = import_peft(Path(args.adapter), args.like.removeprefix("ckpt="), Path(args.out))
    except UserError as error:
        print(f"ptv2: error: {error}", file=sys.stderr)
        return 2
    print(f"ptv2 import: {target}; evaluate with ptv2 eval ckpt={target.parent} task.data_dir=DIR")
    return 0


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptv2 export", description="write a trained ptv2 prompt in another library's format"
    )
    parser.add_argument("ckpt", help="run directory or prompt.safetensors (ckpt=RUN is accepted too)")
    parser.add_argument("--to", choices=["peft"], required=True, help="peft: a PEFT PrefixTuning adapter folder")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--backbone", help="backbone hub id or folder, when the checkpoint's was a local folder")
    return parser


def main(argv: list[str]) -> int:
    args = export_parser().parse_intermixed_args(argv)
    try:
        out = export_peft(args.ckpt.removeprefix("ckpt="), Path(args.out), args.backbone)
    except UserError as error:
        print(f"ptv2: error: {error}", file=sys.stderr)
        return 2
    config = json.loads((out / "adapter_config.json").read_text())
    print(
        f"ptv2 export: {out} (PEFT PrefixTuning, {config['num_virtual_tokens']} virtual tokens; heads in "
        f"{HEADS_FILE}); "
        f"load with PeftModel.from_pretrained(AutoModel.from_pretrained(BACKBONE), '{out}')"
    )
    return 0
