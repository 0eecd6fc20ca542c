"""The values of a command's config, checked before a run writes anything: every numeric and enumerated setting
(check_values, for every command's config and again for a checkpoint's; a prompt method's settings against the
ranges beside its fields), then what needs the backbone's HF config (validate: a layer the backbone lacks,
positions past its table, what the frozen cache and PEFT's methods cannot do). The first problem ends the command
with one line naming the key, its value and what it admits.
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import ListConfig, OmegaConf

from ptv2.config import HEADS, prompt_key_problem, task_members
from ptv2.errors import UserError, unknown
from ptv2.modeling.methods import METHODS, method
from ptv2.schema import COUNT, POSITIVE, PROBABILITY, SOME_COUNT, Range

NAME = re.compile(r"[A-Za-z0-9_.-]+")  # names that become parts of file and folder names
DTYPES = ("float32", "bfloat16", "float16")  # torch's names (modeling.backbone takes torch.<name>)


RANGES = {
    "backbone.dropout": Range(0, 1, high_open=True, optional=True),
    "backbone.attention_dropout": Range(0, 1, high_open=True, optional=True),
    "task.max_length": Range(8, integer=True),  # room for the special tokens and some text
    "task.head_dropout": PROBABILITY,
    "optimizer.lr": Range(0),  # 0 freezes the trained parameters (a check, a continuation at equal weights)
    "optimizer.weight_decay": Range(0),
    "optimizer.eps": POSITIVE,
    "optimizer.momentum": Range(0),
    "scheduler.warmup_ratio": Range(0, 1),
    "scheduler.gamma": Range(0, 1, low_open=True),
    "trainer.epochs": COUNT,
    "trainer.max_steps": SOME_COUNT,
    "trainer.batch_size": COUNT,
    "trainer.eval_batch_size": COUNT,
    "trainer.max_grad_norm": Range(0),  # 0 turns clipping off
    "trainer.seed": Range(0, 2**32 - 1, integer=True),  # numpy's seed range
    "trainer.limit_train": SOME_COUNT,
    "trainer.limit_eval": SOME_COUNT,
    "trainer.save_every_steps": SOME_COUNT,
    "trainer.early_stopping_patience": SOME_COUNT,
    "logger.init_timeout": POSITIVE,
    "bench.batch_size": COUNT,
    "bench.seq_length": Range(8, integer=True),
    "bench.prompt_length": SOME_COUNT,
    "bench.warmup_steps": Range(0, integer=True),
    "bench.steps": COUNT,
    "bench.eval_batches": COUNT,
    "bench.eval_batch_size": SOME_COUNT,
    "bench.threads": SOME_COUNT,
    "bench.pack": SOME_COUNT,
    "bench.jobs_per_forward": SOME_COUNT,
    "bench.cache_layers": SOME_COUNT,
    "bench.cache_examples": COUNT,
    "bench.prompts": COUNT,
    "bench.connections": COUNT,
    "bench.requests": COUNT,
    "bench.resident": COUNT,
    "serve.port": Range(1, 65535, integer=True),
    "serve.max_batch": COUNT,
    "serve.max_wait_ms": Range(0, 10000),
    "serve.max_tokens": COUNT,
    "serve.max_records": COUNT,
    "serve.max_body_bytes": Range(1024, integer=True),
    "serve.threads": SOME_COUNT,
    "serve.shutdown_seconds": Range(0),
}
CHOICES = {
    "backbone.dtype": DTYPES,
    "backbone.attention": ("sdpa", "eager"),
    "task.head": HEADS,
    "trainer.precision": ("no", "bf16", "fp16"),
    "trainer.cache_frozen": ("auto", True, False),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "bench.device": ("auto", "cpu", "cuda"),
    "bench.frozen_dtype": (None, *DTYPES),
}
NAMES = ("backbone.name", "task.name", "task.eval_split", "task.test_split", "split")  # test_split may be null
_ABSENT = object()


MAX_NAME = 100  # characters: a name is one part of file names that also hold other names (255 bytes at most)


def check_name(key: str, value: Any) -> None:
    """A name that becomes part of a file or folder name: letters, digits, `_`, `.`, `-`; never `.` or `..`; at
    most MAX_NAME characters."""
    if not (isinstance(value, str) and NAME.fullmatch(value) and value not in (".", "..")):
        raise UserError(
            f"{key}={str(value)[:MAX_NAME]!r} is not a valid name: use letters, digits, '_', '.' and '-' only "
            "(it names files)"
        )
    if len(value) > MAX_NAME:
        raise UserError(
            f"{key}={value[:40]}... is {len(value)} characters long; use at most {MAX_NAME} (it names files and "
            "folders)"
        )


BLEU_TOKENIZERS = ("none", "zh", "13a", "intl", "char", "ja-mecab", "ko-mecab", "spm", "flores101", "flores200")


def check_generation(shown: str, task) -> None:
    """A generation task's options (tasks/generation.py), checked before any data is read: an answer of at least one
    token besides the end token, room left for the prompt, a decoding budget of at least one token, a BLEU
    tokenizer sacrebleu knows (an unknown one would end the run at the first evaluation)."""
    options = task.get("options") or {}
    target = options.get("max_target_length", 64)
    if not Range(2, integer=True).admits(target):
        raise UserError(
            f"{shown}options.max_target_length={target} is out of range; use an integer >= 2 (the answer's tokens "
            "and its end token: 1 leaves every answer empty)"
        )
    max_length = task.get("max_length")
    if isinstance(max_length, int) and max_length - target < 4:
        raise UserError(
            f"{shown}max_length={max_length} leaves no room for a prompt next to {shown}options.max_target_length="
            f"{target}; raise the one or lower the other"
        )
    new_tokens = options.get("max_new_tokens")
    if not SOME_COUNT.admits(new_tokens):
        raise UserError(f"{shown}options.max_new_tokens={new_tokens} is out of range; use {SOME_COUNT}")
    tokenize = options.get("bleu_tokenize", "13a")
    if tokenize not in BLEU_TOKENIZERS:
        raise unknown(f"{shown}options.bleu_tokenize", tokenize, BLEU_TOKENIZERS)


def check_data_dir(shown: str, data_dir: str) -> None:
    """A task's data folder is there (checked before torch loads, and before any job of a sweep starts)."""
    if not Path(data_dir).expanduser().is_dir():
        raise UserError(f"{shown}data_dir={data_dir} is not a directory: pass the folder that holds the task's files")


def check_files(shown: str, task) -> None:
    """task.files holds file names inside task.data_dir, never paths: a path is refused with the split into the two
    settings (it would otherwise be looked up, and reported missing, inside the data folder). A data folder that is
    not there is refused here, before torch loads (and before any job of a sweep starts)."""
    data_dir = task.get("data_dir")
    if isinstance(data_dir, str) and data_dir:
        check_data_dir(shown, data_dir)
    for split, name in (task.get("files") or {}).items():
        if name is not None and (not isinstance(name, str) or "/" in name or name in ("", ".", "..")):
            path = Path(str(name)).expanduser()
            named = "/" in str(name) and path.name not in ("", ".", "..")
            fix = f"task.data_dir={path.parent} {shown}files.{split}={path.name}" if named else "a file name"
            raise UserError(
                f"{shown}files.{split}={name} is not a file name: task.files names files inside task.data_dir "
                f"(now {task.get('data_dir')}); pass {fix}"
            )


def check_head(shown: str, task) -> None:
    """task.head is one the task type admits (checked again by the engine, here before a backbone is loaded)."""
    from ptv2.tasks import TASK_TYPES, task_type

    kind = task.get("head", "linear")
    if task.get("type") in TASK_TYPES and kind in HEADS:
        admitted = task_type(task.type).HEAD_KINDS
        if kind not in admitted:
            raise UserError(
                f"{shown}head={kind} does not fit {shown}type={task.type}; use {shown}head={' or '.join(admitted)}"
            )


def _settings(cfg, key: str):
    """(shown key, value) of a setting the config holds: task.* for the task and for each multi-task member."""
    group, _, rest = key.partition(".")
    nodes = [("", cfg)]
    if group == "task" and cfg.get("task") is not None:
        members = task_members(cfg.task) if cfg.task.get("members") else []
        nodes = [(f"task.members.{name}.", member) for name, member in members] or [("task.", cfg.task)]
        key = rest
    for prefix, node in nodes:
        value = OmegaConf.select(node, key, default=_ABSENT)
        if value is not _ABSENT:
            yield prefix + key, value


def check_values(cfg) -> None:
    """Every numeric and enumerated setting of a run config against RANGES, CHOICES, NAMES and the chosen prompt
    method's settings; the first bad one ends the run with one line naming the key, its value and what it admits.
    Keys a config lacks (an older checkpoint's) are skipped; a multi-task config is checked member by member."""
    from ptv2.optim import OPTIMIZERS, SCHEDULERS
    from ptv2.tasks import TASK_TYPES

    if cfg.get("prompt") is not None:
        check_prompt(cfg.prompt)
    for key, allowed in RANGES.items():
        for shown, value in _settings(cfg, key):
            if not allowed.admits(value):
                raise UserError(f"{shown}={value} is out of range; use {allowed}")
    tables = {"task.type": TASK_TYPES, "optimizer.name": tuple(OPTIMIZERS), "scheduler.name": tuple(SCHEDULERS)}
    for key, allowed in {**CHOICES, **tables}.items():
        for shown, value in _settings(cfg, key):
            if value not in allowed:
                raise unknown(shown, value, allowed)
    for shown, value in _settings(cfg, "task.reader"):
        from ptv2.data import readers  # imports torch and datasets: after the checks that need neither

        if value not in (known := readers()):
            raise unknown(shown, value, known)
    for key in NAMES:
        for shown, value in _settings(cfg, key):
            if value is not None or key != "task.test_split":
                check_name(shown, value)
    for name in (cfg.task.get("members") or {}) if cfg.get("task") is not None else ():
        check_name(f"task.members.{name}", name)
    if cfg.get("task") is not None:
        members = task_members(cfg.task) if cfg.task.get("members") else [(None, cfg.task)]
        for name, task in members:
            shown = f"task.members.{name}." if name else "task."
            check_head(shown, task)
            check_files(shown, task)
            if task.get("type") == "generation":
                check_generation(shown, task)
    modules = OmegaConf.select(cfg, "prompt.target_modules", default=None)
    if modules is not None and len(modules) == 0:  # would otherwise fall back to the family's default
        raise UserError(
            "prompt.target_modules=[] names no module; leave it out for the backbone family's default, or list the "
            "modules (e.g. prompt.target_modules=[query,value])"
        )
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None)
    if betas is not None and (len(betas) != 2 or not all(PROBABILITY.admits(beta) for beta in betas)):
        raise UserError(f"optimizer.betas={list(betas)} is out of range; use two numbers in [0, 1)")
    for top in OmegaConf.select(cfg, "bench.cache", default=None) or []:
        if not COUNT.admits(top):
            raise UserError(f"bench.cache: {top} is not a layer count; give top:K depths as [K, ...] with K {COUNT}")
    for name in OmegaConf.select(cfg, "bench.methods", default=None) or []:
        if name not in METHODS:
            raise UserError(f"bench.methods: {name} is unknown; choose from {', '.join(METHODS)}")


def check_prompt(prompt) -> None:
    """prompt.*: a known method, only keys its settings have (a key of another method is refused, naming the methods
    that have it), each value within what its field admits, the prompt length (check_prompt_length)."""
    name = prompt.get("method")
    if name not in METHODS:
        raise unknown("prompt.method", name, METHODS)
    composed = OmegaConf.get_type(prompt)  # the settings the composition started from (prompt=NAME)
    if is_dataclass(composed) and composed is not method(name).settings:
        chosen = next((other for other, row in METHODS.items() if row.settings is composed), "another method")
        raise UserError(
            f"prompt.method={name} renames prompt={chosen}'s settings; choose the method with prompt={name} instead"
        )
    for key in prompt:
        if problem := prompt_key_problem(str(key), name):
            raise UserError(problem)
    for item in fields(method(name).settings):
        allowed, value = item.metadata.get("admits"), prompt.get(item.name, item.default)
        if item.name == "length" and isinstance(value, (list, ListConfig)):
            continue  # per-layer lengths: check_prompt_length
        if isinstance(allowed, Range) and not allowed.admits(value):
            method_named = f" for prompt.method={name}" if item.name == "length" else ""
            raise UserError(f"prompt.{item.name}={value} is out of range{method_named}; use {allowed}")
        if isinstance(allowed, tuple) and value not in allowed:
            raise unknown(f"prompt.{item.name}", value, allowed)
    check_prompt_length(prompt)


def check_prompt_length(prompt) -> None:
    """prompt.length: a list (per-layer lengths) only for deep prompts, each >= 1, without the official-style position
    shift (which moves every token by one P)."""
    length = prompt.get("length")
    if isinstance(length, (list, ListConfig)):
        shown = list(length)
        if method(prompt.method).prompt != "prefix":
            deep = ", ".join(name for name, row in METHODS.items() if row.prompt == "prefix")
            raise UserError(
                f"prompt.length={shown} is a list (one length per prompted layer), which only deep prompts take "
                f"({deep}); give prompt.method={prompt.method} one number"
            )
        if not shown or not all(COUNT.admits(value) for value in shown):
            raise UserError(f"prompt.length={shown}: every per-layer length must be {COUNT}")
        if prompt.get("shift_positions"):
            raise UserError(
                f"prompt.shift_positions=true moves tokens by one prompt length, and prompt.length={shown} has "
                "several; set prompt.shift_positions=false or give one number"
            )


def _prompted_layer_count(layers, num_layers: int) -> int:
    """How many layers prompt.layers names (already validated)."""
    if isinstance(layers, str):
        return num_layers if layers == "all" else int(layers.partition(":")[2])
    return len(set(layers))


def validate(cfg, backbone_config) -> None:
    """check_values, then the checks that need the backbone's config; raise UserError with one clear line."""
    from ptv2.modeling.injection import encoder_shape, family_of, positions_used
    from ptv2.modeling.methods import parse_layers

    check_values(cfg)
    prompt = cfg.prompt
    num_layers = encoder_shape(backbone_config)[0]
    layers = prompt.get("layers", "all")
    try:
        side, count = parse_layers(layers)
    except (ValueError, TypeError):
        side, count = "invalid", 0
    if side in ("invalid", "top", "bottom") and not 1 <= count <= num_layers:
        raise UserError(
            f"prompt.layers={layers} is invalid; use all, top:K or bottom:K with 1 <= K <= {num_layers}, "
            "or a list of layer indices"
        )
    if side == "list":
        bad = [layer for layer in count if not 0 <= layer < num_layers]
        if bad or not count:
            raise UserError(
                f"prompt.layers={list(layers)}: the backbone has layers 0..{num_layers - 1} "
                f"(bad: {bad or 'empty list'})"
            )

    length = prompt.get("length")
    if isinstance(length, (list, ListConfig)) and len(length) != (count := _prompted_layer_count(layers, num_layers)):
        raise UserError(
            f"prompt.length={list(length)} has {len(length)} lengths for the {count} layers of "
            f"prompt.layers={layers if isinstance(layers, str) else list(layers)}; give one per prompted layer"
        )
    chosen = method(prompt.method)
    for shown, kind in _settings(cfg, "task.type"):
        if kind == "generation" and not chosen.generation:
            raise UserError(
                f"prompt.method={prompt.method} cannot train for generation ({shown}=generation): its prompt reads the "
                "whole sequence, which token-by-token decoding never has; use prompt.method=ptv2"
            )

    if prompt.get("shift_positions") and family_of(backbone_config).causal:
        raise UserError(
            "prompt.shift_positions=true is for encoders; decoders number their tokens from 0 after the prefix "
            "(set prompt.shift_positions=false)"
        )
    task = cfg.task
    if chosen.peft:
        _check_peft_method(cfg, backbone_config)
    if cfg.trainer.get("cache_frozen") is True and (refusal := frozen_cache_refusal(cfg, backbone_config)):
        raise UserError(f"trainer.cache_frozen=true cannot hold: {refusal}; use trainer.cache_frozen=auto or false")
    # Input prompts occupy positions like tokens; the official-style shift moves every token by P, and PEFT's
    # prefix (a key/value cache) always does.
    shifted = (chosen.prompt == "prefix" and prompt.get("shift_positions")) or chosen.peft == "prefix"
    shift = prompt.length if shifted else 0
    extra = prompt.length if chosen.input_prompt else 0
    needed = positions_used(backbone_config, task.max_length + extra, shift)
    available = backbone_config.max_position_embeddings
    if needed > available:
        raise UserError(
            f"prompt length {prompt.length} + task.max_length {task.max_length} needs {needed} positions but the "
            f"backbone has {available}; lower task.max_length or prompt.length"
            + (" or set prompt.shift_positions=false" if shift and chosen.prompt == "prefix" else "")
        )


def lowest_prompted_layer(prompt, num_layers: int) -> int:
    """The first layer that sees the prompt: 0 for an input prompt, `num_layers` when nothing is prompted (the linear
    probe: every layer is frozen and sees no prompt)."""
    from ptv2.modeling.methods import parse_layers

    chosen = method(prompt.method)
    if chosen.prompt == "input" or chosen.peft == "prefix":
        return 0
    if chosen.prompt != "prefix":
        return num_layers
    side, count = parse_layers(prompt.layers)
    if side == "top":
        return num_layers - count
    return min(count) if side == "list" else 0


def frozen_cache_refusal(cfg, backbone_config) -> str | None:
    """Why the hidden states entering the lowest prompted layer cannot be cached for this run, or None."""
    from ptv2.modeling.injection import encoder_shape, family_of

    prompt, chosen = cfg.prompt, method(cfg.prompt.method)
    if not chosen.frozen:
        return f"prompt.method={chosen.name} trains the backbone, so no layer gives the same output twice"
    if chosen.prompt == "input":
        return f"prompt.method={chosen.name} puts its prompt into the input, which every layer then sees"
    if chosen.objective:
        return f"prompt.method={chosen.name} trains through an objective of its own that runs the whole backbone"
    if chosen.peft:
        what = "adapts the attention of every layer" if chosen.peft == "lora" else "puts a prefix on every layer"
        return f"prompt.method={chosen.name} {what}, the lowest ones included"
    if family_of(backbone_config).injection != "attention_interface":
        return f"the {backbone_config.model_type} encoder mixes its first layer's output with its input (no layer cut)"
    if len(set(getattr(backbone_config, "layer_types", None) or ())) > 1:
        return "the backbone's layers differ in attention type (layer_types), which its forward reads by position"
    kinds = sorted({task.type for _, task in task_members(cfg.task)} & {"multiple_choice", "generation"})
    if kinds:
        return f"task.type={kinds[0]} runs several sequences per example or decodes token by token"
    layers = prompt.get("layers", "all")
    layers = layers if isinstance(layers, str) else list(layers)
    if lowest_prompted_layer(prompt, encoder_shape(backbone_config)[0]) == 0:
        return f"prompt.layers={layers} prompts layer 0, so no layer lies below the prompt"
    return None


def _check_peft_method(cfg, backbone_config) -> None:
    """A PEFT-built method (lora, peft_prefix): PEFT installed, and (peft_prefix) a configuration PEFT's prefix
    tuning runs on transformers 5 (peft_methods.peft_prefix_refusal says which and why)."""
    from ptv2.modeling.peft_methods import peft_prefix_refusal, require_peft

    chosen = method(cfg.prompt.method)
    require_peft(chosen.name)
    if chosen.peft == "prefix":
        heads = {task.get("head", "linear") for _, task in task_members(cfg.task)}
        problem = peft_prefix_refusal(cfg.prompt, cfg.backbone, heads, backbone_config)
        if problem:
            raise UserError(f"prompt.method=peft_prefix: {problem}")
