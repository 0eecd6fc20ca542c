"""Prompt-only checkpoints: prompt module + heads in safetensors, with the metadata needed to rebuild the model.

A checkpoint is a few MB for a frozen-backbone method (the whole model only for full fine-tuning). Its metadata
holds the resolved run config, the backbone id and a hash of its config, the task and its label names, and the
ptv2 version; with the MLP reparameterization it also stores the folded prefix, so inference needs no MLP.

A checkpoint may come from elsewhere, so its metadata is read as data (`stored_config`): what defines the model is
taken from it, never a path on the machine that trained it (data and cache folders, a local backbone folder), no
`${...}` in it is ever resolved, and the names that become file names are checked (checks.check_values).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import pwd
import re
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ptv2 import __version__
from ptv2.config import COMMAND, PATH, TrainConfig, has_role, keys_with
from ptv2.errors import UserError
from ptv2.io import write_safetensors
from ptv2.modeling.methods import METHODS, setting_names

FILENAME = "prompt.safetensors"
FOLDED_KEY = "prompt.folded"
METADATA_KEYS = ("backbone", "backbone_hash", "task", "method", "labels", "config")
# Paths on the machine that trained a checkpoint: never taken from it (the command that loads it gives its own).
PATH_KEYS = keys_with(PATH)
TASK_PATH_KEYS = ("data_dir", "files")  # per task and multi-task member: the files are found in the given data_dir
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")  # owner/name, no path syntax


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
    write_safetensors(path, tensors, metadata)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or the checkpoint inside a run directory."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise UserError(
            f"ckpt={path} is not a checkpoint: pass ckpt=RUN_DIR or a {FILENAME} file (a list only to ptv2 predict)"
        )
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / FILENAME
    if path.parent.is_dir() and not os.access(path.parent, os.R_OK | os.X_OK):
        raise UserError(f"cannot read the folder {path.parent} (permission denied): {_whose(path.parent)}")
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: pass a {FILENAME} file or the run directory that holds one")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path} (permission denied): {_whose(path)}")
    return path


def _whose(path: Path) -> str:
    """What to do about a file or folder this user may not read: name its owner."""
    owner = path.stat().st_uid
    if owner == os.getuid():
        return f"it is yours: chmod u+r {path}"
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = f"uid {owner}"
    return f"it belongs to {name}: ask them to share it (chmod a+r) or to copy it for you"


def read_metadata(path: str | Path) -> dict:
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a readable safetensors checkpoint ({error}); re-create it by training"
        ) from None
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise UserError(f"{path} has no ptv2 metadata ({', '.join(missing)} missing): it was not written by ptv2")
    return metadata


def _literal(value):
    """A value of stored metadata with every `${` escaped, so OmegaConf reads it back as the same text and never
    resolves it (`\\${` is OmegaConf's escape; backslashes right before it are doubled to stay backslashes)."""
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_literal(item) for item in value]
    if isinstance(value, str) and "${" in value:
        return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", value)
    return value


@functools.cache  # conf/ and the installed packages do not change while ptv2 runs
def _packaged_backbone(name: str) -> str | None:
    """name_or_path of the packaged backbone option `name` (conf/backbone/<name>.yaml) on this machine, or None."""
    from ptv2.checks import NAME
    from ptv2.config import register

    entry = importlib.resources.files("ptv2.conf") / "backbone" / f"{name}.yaml"
    if not NAME.fullmatch(name) or not entry.is_file():
        return None
    register()  # the resolvers its name_or_path uses (asset, package_path)
    return str(OmegaConf.load(str(entry)).name_or_path)


def backbone_label(backbone) -> str:
    """How a run's backbone is named in its log, results.json and `ptv2 table`: the option's name, or
    `name@FOLDER` when backbone.name_or_path points elsewhere than the packaged option does (another model in the
    option's place must not pass for it)."""
    packaged = _packaged_backbone(backbone.name)
    if packaged is None or _same_folder(str(backbone.name_or_path), packaged):
        return str(backbone.name)
    return f"{backbone.name}@{Path(str(backbone.name_or_path).rstrip('/')).name}"


def _same_folder(given: str, packaged: str) -> bool:
    """The option's own model named another way (relative, through a link, a trailing slash) is still the option."""
    if given == packaged:
        return True
    return Path(given).expanduser().exists() and Path(given).expanduser().resolve() == Path(packaged).resolve()


def trained_data_hint(path: str | Path) -> str:
    """The end of a data error of eval/predict without task.data_dir: the folder the checkpoint was trained on, to
    pass again (stored_config never takes a checkpoint's paths), or "" when it trained on the hub copy."""
    try:
        raw = json.loads(read_metadata(resolve(path))["config"])
        data_dir = raw["task"].get("data_dir")
    except Exception:  # an unreadable config is reported by stored_config
        return ""
    if not isinstance(data_dir, str) or not data_dir:
        return ""
    return (
        f"; the checkpoint was trained on task.data_dir={data_dir}: add task.data_dir={data_dir} to the command "
        "(ptv2 never takes a path from a checkpoint)"
    )


def stored_config(path: str | Path) -> DictConfig:
    """The run config a checkpoint carries, read as data: parsed JSON with every `${...}` kept as text, the keys
    that are paths on the training machine (PATH_KEYS; each task's data_dir and files) cleared, a backbone that
    was a local folder replaced by the packaged backbone option of the same name (or cleared: the caller then
    needs backbone.name_or_path), a hub dataset checked to be a hub id."""
    path = resolve(path)
    try:
        raw = json.loads(read_metadata(path)["config"])
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        saved = OmegaConf.create(_literal(raw))
    except Exception as error:  # malformed JSON, or a structure OmegaConf cannot hold
        raise UserError(f"{path}: the stored run config is unreadable ({str(error).splitlines()[0]})") from None
    if OmegaConf.to_container(saved, resolve=True) != raw:
        raise UserError(f"{path}: the stored run config holds text that cannot be kept literally; re-create it")
    _own_prompt_settings(saved)
    defaults = OmegaConf.structured(TrainConfig)
    for key in PATH_KEYS:
        if OmegaConf.select(saved, key) is not None:
            OmegaConf.update(saved, key, OmegaConf.select(defaults, key), force_add=True)
    tasks = [saved.task, *(saved.task.get("members") or {}).values()] if saved.get("task") is not None else []
    for task in tasks:
        for key in TASK_PATH_KEYS:
            if key in task:
                task[key] = {} if key == "files" else None
        hub = str((task.get("hub") or {}).get("path") or "")
        if hub and (not HUB_ID.fullmatch(hub) or ".." in hub):
            raise UserError(f"{path}: task.hub.path={hub!r} is not a hub dataset id (owner/name); refused")
    _check_names(saved, path)
    _check_stored_values(saved, path)
    location = str(OmegaConf.select(saved, "backbone.name_or_path", default="") or "")
    if location and (not HUB_ID.fullmatch(location) or ".." in location):
        OmegaConf.update(saved, "backbone.name_or_path", _packaged_backbone(str(saved.backbone.get("name"))))
    tokenizer = str(OmegaConf.select(saved, "backbone.tokenizer", default="") or "")
    if tokenizer and (not HUB_ID.fullmatch(tokenizer) or ".." in tokenizer):  # a folder: never the checkpoint's
        OmegaConf.update(saved, "backbone.tokenizer", None)
    return saved


def _own_prompt_settings(saved: DictConfig) -> None:
    """Checkpoints written while one prompt schema held every method's keys carry keys their method never read
    (a ptv2 run's LoRA rank): only the method's own settings are kept."""
    name = OmegaConf.select(saved, "prompt.method")
    if name in METHODS and OmegaConf.is_dict(saved.prompt):
        own = set(setting_names(name))
        for key in [key for key in saved.prompt if key not in own]:
            del saved.prompt[key]


def _check_names(saved: DictConfig, path: Path) -> None:
    """The stored names that become file and folder names (task, members, backbone), checked before any is used."""
    from ptv2.checks import check_name

    names = {key: OmegaConf.select(saved, key) for key in ("task.name", "backbone.name")}
    members = OmegaConf.select(saved, "task.members") or {}
    names.update({f"task.members.{name}": name for name in members})
    names.update({f"task.members.{name}.name": member.get("name") for name, member in members.items()})
    try:
        for key, value in names.items():
            if value is not None:
                check_name(key, value)
    except UserError as error:
        raise UserError(f"{path}: {error}; refused") from None


def _check_stored_values(saved: DictConfig, path: Path) -> None:
    """Every stored value checked (checks.check_values) before a command seeds, loads a backbone or builds a model
    from it: a crafted prompt length would allocate until the machine gives out, a seed past numpy's range or a
    head that does not fit the task type would fail deep inside."""
    from ptv2.checks import check_values

    try:
        check_values(saved)
    except UserError as error:
        raise UserError(f"{path}: the stored run config is refused: {error}") from None


def require_backbone(saved: DictConfig, path: str | Path) -> None:
    """One line when a stored config's backbone was a local folder that no packaged option replaces and the command
    named none (backbone.name_or_path=DIR)."""
    if not OmegaConf.select(saved, "backbone.name_or_path"):
        trained = read_metadata(path)["backbone"]
        raise UserError(
            f"{resolve(path)} was trained on the local backbone folder {trained}; folders are not taken from "
            "checkpoints: pass backbone.name_or_path=DIR"
        )


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
    unplaced = [name for name in unknown if not name.startswith("heads.")]
    if unplaced and not strict_heads:  # prompt.init_from: another task's heads may stay behind, never its prompt
        raise UserError(
            f"{path} holds {metadata['method']} tensors this model has no place for ({', '.join(unplaced[:3])}); "
            "prompt.init_from takes a run of the same prompt method"
        )
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


# ----------------------------------------------------------------------------------------------- eval / predict
OWN_KEYS = keys_with(COMMAND)  # this command's own keys, not the run's
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
    saved = stored_config(cfg.ckpt)  # data only: no paths from the checkpoint, nothing resolved
    parser = OverridesParser.create()
    for override in parser.parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if has_role(key, OWN_KEYS):
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
    require_backbone(saved, cfg.ckpt)
    return saved
