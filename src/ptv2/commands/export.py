"""`ptv2 export RUN --to peft OUT` and `ptv2 import ADAPTER --from peft OUT --like RUN`: trained prompts as PEFT
adapters and back, in PEFT's own formats (adapter_config.json, adapter_model.safetensors).

- prompt.method=ptv2 is PEFT PrefixTuning: one tensor `prompt_embeddings` (P, layers x 2 x heads x head_dim), the
  key/value order ptv2's PrefixEncoder and PEFT share. PEFT passes it as a key/value cache, so its forward numbers
  tokens from P and drops token_type_ids. Where ptv2's prompt differs (trained numbering tokens from 0, or a task
  whose sentence pairs use segment ids) the export says so, and docs/lora.md shows the call that gives ptv2's
  function: the base model with PEFT's prefix as its cache, the segment ids and position ids passed as ptv2 does.
  Rotary decoders: every key is rotated by the angle of position P (`rotated_keys`), for right-padded input.
- prompt.method=lora is PEFT LoRA: the A/B matrices under PEFT's names, the same function under PEFT's forward.
- The task heads go to ptv2_heads.safetensors (PEFT's FEATURE_EXTRACTION model returns hidden states).

The command line is checked before torch loads; OUT is never a file or a link, and an adapter already there is
replaced only with --overwrite. Imports are checked like checkpoints (names, shapes, finite floats).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ptv2.errors import UserError
from ptv2.io import declare
from ptv2.modeling.methods import METHODS, setting_names

HEADS_FILE = "ptv2_heads.safetensors"
ADAPTER_CONFIG, ADAPTER_MODEL = "adapter_config.json", "adapter_model.safetensors"
OUTPUTS = declare("export", HEADS_FILE, ADAPTER_MODEL, ADAPTER_CONFIG), declare("import", "prompt.safetensors")
PEFT_TYPES = ("PREFIX_TUNING", "LORA")
# What a ptv2 prefix needs beyond PeftModel's forward to be ptv2's function (heads-file metadata key -> meaning).
POSITIONS_FROM_ZERO = "position ids from 0 (this prompt was trained so; PEFT numbers tokens from P)"
SEGMENT_IDS = "token_type_ids (this task's sentence pairs use them; PEFT drops them for a prefix)"


def writable_folder(out: Path, holds: tuple[str, ...], overwrite: bool, refuse_runs: bool = False) -> None:
    """OUT may be created or written: not a file, not a link, and not holding `holds` unless overwrite."""
    if out.is_symlink():
        raise UserError(f"{out} is a link; name the real folder to write into")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; name a folder to write into")
    present = [name for name in holds if (out / name).exists()]
    if refuse_runs and (out / "results.json").exists():
        raise UserError(f"{out} is a trained run; its prompt is never replaced: name a new folder")
    if present and not overwrite:
        raise UserError(f"{out} already holds {present[0]}; pass --overwrite to replace it, or name a new folder")


def portable_base(location: str) -> str | None:
    """The backbone as adapter_config.json names it: a hub id, never a folder of this machine (None then)."""
    from ptv2.runs.checkpoint import HUB_ID

    hub_id = HUB_ID.fullmatch(location) and ".." not in location and not Path(location).expanduser().exists()
    return location if hub_id else None


def task_types(saved) -> set[str]:
    members = saved.task.get("members") or {}
    return {str(m.get("type")) for m in members.values()} if members else {str(saved.task.type)}


def prefix_refusal(prompt, config) -> str | None:
    """Why a ptv2 deep prompt has no PEFT PrefixTuning equivalent at all, or None."""
    from ptv2.modeling.injection import family_of

    family = family_of(config)
    if family.injection != "attention_interface":
        return f"{config.model_type}: PEFT's prefix tuning does not run on it (it has no key/value cache)"
    if not isinstance(prompt.length, int):
        return f"prompt.length={list(prompt.length)}: PEFT's prefix tuning has one length for every layer"
    if prompt.get("layers", "all") != "all":
        return f"prompt.layers={prompt.layers}: PEFT's prefix tuning has a prefix on every layer; only all exports"
    if family.causal and family.positions != "rotary":
        return f"{config.model_type} learns absolute positions and has no shifted ptv2 variant to match PEFT's"
    return None


def prefix_notes(saved, config) -> list[str]:
    """What PeftModel's own forward does differently from ptv2 for this prefix (empty: the same function)."""
    from ptv2.modeling.injection import family_of

    family = family_of(config)
    notes = []
    if family.positions not in ("rotary", "relative") and not saved.prompt.get("shift_positions"):
        notes.append(POSITIONS_FROM_ZERO)
    if getattr(config, "type_vocab_size", 0) > 1 and task_types(saved) - {"tagging"}:
        notes.append(SEGMENT_IDS)
    return notes


def export_peft(ckpt: str, out: Path, backbone: str | None = None) -> tuple[dict, list[str], str]:
    """Write the PEFT adapter of checkpoint `ckpt` into `out` (checked by the caller). backbone: the backbone hub id
    or folder when the checkpoint's was a local folder. Returns (adapter config, notes on PEFT's forward, the
    backbone it was exported against)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ptv2.io import write_json, write_safetensors
    from ptv2.modeling.injection import encoder_shape, family_of
    from ptv2.modeling.peft_methods import lora_targets, lora_to_peft, require_peft, rotated_keys
    from ptv2.runs import checkpoint

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
    method = saved.prompt.method
    exports = METHODS[method].exports if method in METHODS else None
    exporting = " and ".join(f"{name} (as {row.exports})" for name, row in METHODS.items() if row.exports)
    problem = None if exports else f"prompt.method={method}: only {exporting} export"
    problem = problem or (prefix_refusal(saved.prompt, config) if exports == "prefix" else None)
    if problem:
        raise UserError(f"cannot export {path} to PEFT: {problem}")

    tensors = load_file(str(path))
    common = dict(task_type="FEATURE_EXTRACTION", base_model_name_or_path=portable_base(location), inference_mode=True)
    notes: list[str] = []
    if exports == "lora":
        adapter = lora_to_peft(tensors)
        adapter_config = peft.LoraConfig(
            r=int(saved.prompt.r),
            lora_alpha=float(saved.prompt.alpha),
            lora_dropout=float(saved.prompt.dropout),
            target_modules=lora_targets(saved.prompt, config),
            bias="none",
            **common,
        )
    else:
        # The MLP reparameterization only shapes training: its output (stored folded) is the prefix itself.
        prefix = tensors.get(checkpoint.FOLDED_KEY, tensors.get("prompt.embedding.weight"))
        layers, heads, head_dim = encoder_shape(config)
        if prefix is None or tuple(prefix.shape) != (saved.prompt.length, layers * 2 * heads * head_dim):
            raise UserError(f"{path} holds no ptv2 prefix of length {saved.prompt.length} for this backbone; refused")
        if family_of(config).positions == "rotary":
            prefix = rotated_keys(prefix, config)
        adapter = {"prompt_embeddings": prefix.contiguous()}
        adapter_config = peft.PrefixTuningConfig(
            num_virtual_tokens=saved.prompt.length,
            num_layers=layers,
            num_attention_heads=heads,
            token_dim=heads * head_dim,  # PEFT reshapes each layer's key/value to (heads, token_dim / heads)
            **common,
        )
        notes = prefix_notes(saved, config)
    settings = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.to_dict().items()}
    head_tensors = {name: t.contiguous() for name, t in tensors.items() if name.startswith("heads.")}
    head_info = {
        "task": metadata["task"],
        "labels": metadata["labels"],
        "backbone": str(saved.backbone.get("name")),
        "positions": "from 0" if POSITIONS_FROM_ZERO in notes else "from P",
        "token_type_ids": "kept" if SEGMENT_IDS in notes else "none",
    }
    write_safetensors(out / HEADS_FILE, head_tensors, head_info)
    write_safetensors(out / ADAPTER_MODEL, adapter)
    write_json(out / ADAPTER_CONFIG, settings)  # last: a folder with a config holds a whole adapter
    return settings, notes, location


def read_adapter_config(adapter: Path) -> dict:
    """ADAPTER/adapter_config.json, checked before anything loads: a JSON object of a PEFT type ptv2 imports, with
    its size settings whole numbers >= 1."""
    try:
        settings = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{adapter} is not a PEFT adapter folder ({ADAPTER_CONFIG}: {error}); refused") from None
    if not isinstance(settings, dict):
        raise UserError(f"{adapter / ADAPTER_CONFIG} holds a {type(settings).__name__}, not PEFT's settings; refused")
    kind = settings.get("peft_type")
    if kind not in PEFT_TYPES:
        raise UserError(f"{adapter} holds a {kind} adapter; only {' and '.join(PEFT_TYPES)} import")
    size = "num_virtual_tokens" if kind == "PREFIX_TUNING" else "r"
    value = settings.get(size)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{adapter / ADAPTER_CONFIG}: {size}={value!r} is not a whole number >= 1; refused")
    if kind == "LORA":
        plain = not settings.get("use_dora") and not settings.get("rank_pattern") and not settings.get("alpha_pattern")
        targets = settings.get("target_modules")
        if not plain or settings.get("modules_to_save") or not isinstance(targets, (list, str)) or not targets:
            raise UserError(
                f"{adapter}: only plain LoRA imports (listed target_modules; no DoRA, rank or alpha patterns, "
                "modules_to_save); refused"
            )
        if isinstance(settings.get("lora_alpha"), bool) or not isinstance(settings.get("lora_alpha"), (int, float)):
            raise UserError(f"{adapter / ADAPTER_CONFIG}: lora_alpha={settings.get('lora_alpha')!r} is no number")
    return settings


def import_peft(adapter: Path, settings: dict, like: str, out: Path, backbone: str | None = None) -> Path:
    """A PEFT adapter folder (PrefixTuning or LoRA; `settings` its checked adapter_config.json) as the ptv2
    checkpoint OUT/prompt.safetensors, with the run config, labels and heads of the ptv2 run `like` (heads from
    ADAPTER/ptv2_heads.safetensors when `ptv2 export` wrote it). Returns the checkpoint path."""
    from omegaconf import OmegaConf
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ptv2.io import write_safetensors
    from ptv2.modeling.injection import encoder_shape, family_of
    from ptv2.modeling.peft_methods import (
        checked_tensors,
        lora_expected_shapes,
        lora_from_peft,
        require_peft,
        rotated_keys,
    )
    from ptv2.runs import checkpoint

    require_peft("ptv2 import --from peft")
    path = checkpoint.resolve(like)
    metadata = checkpoint.read_metadata(path)
    saved = checkpoint.stored_config(path)
    # A folder is never taken from a file of elsewhere: not from the checkpoint (stored_config), nor the adapter.
    location = backbone or saved.backbone.get("name_or_path")
    if not location:
        raise UserError(f"--like {like} was trained on a local backbone folder; pass --backbone DIR")
    config = AutoConfig.from_pretrained(location)
    if checkpoint.backbone_hash(config) != metadata["backbone_hash"]:
        raise UserError(f"--like {like} was trained on backbone {metadata['backbone']}, not {location}")
    try:
        adapter_tensors = load_file(str(adapter / ADAPTER_MODEL))
        heads_file = adapter / HEADS_FILE
        if heads_file.is_file():
            with safe_open(str(heads_file), framework="pt") as handle:
                head_info = handle.metadata() or {}
            exported_heads = load_file(str(heads_file))
        else:
            head_info, exported_heads = {}, {}
    except (OSError, SafetensorError, ValueError) as error:
        raise UserError(f"{adapter}: {error}; refused") from None

    run_config = json.loads(metadata["config"])
    if settings["peft_type"] == "PREFIX_TUNING":
        length = settings["num_virtual_tokens"]
        problem = prefix_refusal(OmegaConf.create({"length": length, "layers": "all"}), config)
        if problem:
            raise UserError(f"cannot import {adapter} onto {like}'s backbone: {problem}")
        layers, heads, head_dim = encoder_shape(config)
        shape = (length, layers * 2 * heads * head_dim)
        prefix = checked_tensors(adapter_tensors, {"prompt_embeddings": shape}, str(adapter))["prompt_embeddings"]
        rotary = family_of(config).positions == "rotary"
        if rotary:
            prefix = rotated_keys(prefix, config, inverse=True)
        tensors = {"prompt.embedding.weight": prefix.contiguous()}
        # PEFT numbers tokens from P: so does ptv2 with shift_positions, unless ptv2 exported a prompt trained from 0.
        shift = not rotary and family_of(config).positions != "relative" and head_info.get("positions") != "from 0"
        run_config["prompt"] = settings_of("ptv2", run_config["prompt"])
        run_config["prompt"].update(length=length, layers="all", projection="none", shift_positions=shift)
    else:
        targets = settings["target_modules"]
        targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
        r = settings["r"]
        renamed = lora_from_peft(adapter_tensors)
        tensors = checked_tensors(renamed, lora_expected_shapes(config, targets, r), str(adapter))
        run_config["prompt"] = settings_of("lora", run_config["prompt"])
        run_config["prompt"].update(
            r=r,
            alpha=float(settings["lora_alpha"]),
            dropout=float(settings.get("lora_dropout") or 0.0),
            target_modules=targets,
        )
    own_heads = {name: t for name, t in load_file(str(path)).items() if name.startswith("heads.")}
    if exported_heads:
        expected = {name: tuple(t.shape) for name, t in own_heads.items()}
        own_heads.update(checked_tensors(exported_heads, expected, str(heads_file)))
    tensors.update(own_heads)
    target = out / checkpoint.FILENAME
    write_safetensors(
        target, tensors, {**metadata, "method": run_config["prompt"]["method"], "config": json.dumps(run_config)}
    )
    return target


def settings_of(name: str, like: dict) -> dict:
    """prompt.* of an imported method: its settings' defaults, with the values the run it imports beside had for
    the settings it shares (the init_from of a LoRA run is not carried into a prefix and back)."""
    from omegaconf import OmegaConf

    keys = set(setting_names(name))
    defaults = OmegaConf.to_container(OmegaConf.structured(METHODS[name].settings))
    shared = like if like.get("method") == name else {}
    return {**defaults, **{key: value for key, value in shared.items() if key in keys}, "method": name}


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptv2 import", description="a PEFT adapter as a ptv2 checkpoint")
    parser.add_argument("adapter", help="PEFT adapter folder (PrefixTuning or LoRA: adapter_config.json, ...)")
    parser.add_argument("--from", dest="source", choices=["peft"], required=True)
    parser.add_argument("out", help="folder to write prompt.safetensors into")
    parser.add_argument("--like", required=True, help="the ptv2 run whose task, backbone, labels and heads it takes")
    parser.add_argument("--backbone", help="backbone hub id or folder, when --like RUN's was a local folder")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/prompt.safetensors (never a run's)")
    return parser


def import_main(argv: list[str]) -> int:
    args = import_parser().parse_intermixed_args(argv)
    try:
        adapter, out = Path(args.adapter), Path(args.out)
        settings = read_adapter_config(adapter)
        writable_folder(out, ("prompt.safetensors",), args.overwrite, refuse_runs=True)
        target = import_peft(adapter, settings, args.like.removeprefix("ckpt="), out, args.backbone)
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
    parser.add_argument("--to", choices=["peft"], required=True, help="peft: a PEFT PrefixTuning or LoRA adapter")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--backbone", help="backbone hub id or folder, when the checkpoint's was a local folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in OUT")
    return parser


def main(argv: list[str]) -> int:
    args = export_parser().parse_intermixed_args(argv)
    try:
        out = Path(args.out)
        writable_folder(out, (ADAPTER_CONFIG, ADAPTER_MODEL, HEADS_FILE), args.overwrite)
        settings, notes, location = export_peft(args.ckpt.removeprefix("ckpt="), out, args.backbone)
    except UserError as error:
        print(f"ptv2: error: {error}", file=sys.stderr)
        return 2
    base = settings.get("base_model_name_or_path")
    kind = (
        f"PrefixTuning, {settings['num_virtual_tokens']} virtual tokens"
        if "num_virtual_tokens" in settings
        else (f"LoRA r {settings['r']}")
    )
    print(f"ptv2 export: {out} (PEFT {kind}; heads in {HEADS_FILE}; base model {base or 'not named: a local folder'})")
    loader = f"PeftModel.from_pretrained(AutoModel.from_pretrained({base or location!r}), {str(out)!r})"
    if not notes:
        print(f"  {loader} computes ptv2's function")
    else:
        print(f"  {loader}'s forward is NOT ptv2's function here; it lacks " + "; ".join(notes))
        print(
            "  ptv2's function: the base model with model.get_prompt(batch) as its cache, P ones before the attention "
            "mask, and those ids passed (docs/lora.md, 'The exact call')"
        )
    return 0
