"""Examples from a task's reader, tokenized once and cached on disk, batched with dynamic padding.

A reader is a module of this package named by `task.reader` with `load(task, split) -> list[dict]` that reads
either the hub (`task.hub`) or local files (`task.data_dir`) into the task type's canonical examples, and
`local_files(task) -> {format: {split: [file names]}}`: the names by which a data folder's files and their format
are found (optionally `sniff_format(path)` for a file the user named; see files.local_split).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import os
import pkgutil
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from omegaconf import OmegaConf, open_dict

from ptv2.data.files import local_split
from ptv2.errors import UserError, unknown
from ptv2.io import write_text

log = logging.getLogger("ptv2")
datasets.disable_progress_bars()  # tokenization is timed and logged instead


@dataclass
class Split:
    """One split: canonical examples and their tokenized features (one or more features per example)."""

    name: str
    examples: list[dict]
    features: datasets.Dataset
    total: int | None = None  # the split's examples before trainer.limit_* cut it (None: not cut)
    frozen: dict | None = None  # {layer: frozen.FrozenStates}: its cached hidden states when the run caches them


def readers() -> list[str]:
    """Modules of this package with a `load(task, split)`: the values task.reader takes."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(name for name in names if hasattr(importlib.import_module(f"{__name__}.{name}"), "load"))


def reader(name: str):
    """The reader module `task.reader` names, or one line listing the readers."""
    if name not in (known := readers()):
        raise unknown("task.reader", name, known)
    return importlib.import_module(f"{__name__}.{name}")


def reader_hook(task, job: str):
    """The function `job` (`metrics` or `write_predictions`) of the task's reader, or None when the reader leaves
    that job to the task type. A reader owns what is specific to its datasets (official metrics, leaderboard files),
    so the generic task types never ask which dataset they serve."""
    name = task.get("reader")
    if name not in readers():
        return None
    return getattr(reader(name), job, None)


def load_examples(task, split: str) -> list[dict]:
    reader_module = reader(task.reader)
    try:
        examples = reader_module.load(task, split)
    except UnicodeDecodeError as error:  # any reader's text files: name the file and line
        raise UserError(_not_utf8(task, split, error)) from None
    except OSError as error:  # unreadable file, I/O error: the reader's open() names the file
        where = error.filename or task.get("data_dir") or "the data"
        raise UserError(
            f"cannot read {where} ({error.strerror or error}); check the file and its permissions"
        ) from None
    if not examples:
        source = task.data_dir or task.hub.get("path")
        raise UserError(f"the {split} split of task {task.name} ({source}) has no examples; check the data files")
    return examples


def _not_utf8(task, split: str, error: UnicodeDecodeError) -> str:
    """The place of the first byte that is not UTF-8 in the split's file: `file:line: ...`."""
    try:
        path = Path(task.data_dir).expanduser() / with_local_file(task, split).files[split]
        data = path.read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as found:
        line = data.count(b"\n", 0, found.start) + 1
        return (
            f"{path}:{line}: byte 0x{data[found.start]:02x} is not UTF-8 text ({found.reason}); save the file as UTF-8"
        )
    except Exception:  # no single local file to point at (hub data, a reader with several files)
        pass
    return f"the {split} data of task {task.name} is not UTF-8 text ({error.reason}); save its files as UTF-8"


def with_local_file(task, split: str):
    """`task` with `format` and `files[split]` set to the file its data folder holds for `split` (found by the
    reader's `local_files` names unless task.files / task.format say; see files.local_split), so the cache key covers
    the file read; `task` itself without task.data_dir."""
    if not task.get("data_dir"):
        return task
    found = reader(task.reader)
    fmt, path = local_split(task, split, found.local_files(task), getattr(found, "sniff_format", None))
    if not (task.get("files") or {}).get(split):
        log.info("task %s, %s split: %s (format %s)", task.name, split, path, fmt)
    resolved = OmegaConf.merge(task, {})  # a copy: the run's config keeps what the user gave
    with open_dict(resolved):
        resolved.format = fmt
        resolved.files[split] = path.name
    return resolved


def _files_fingerprint(task) -> list:
    """Size and modification time of every local split file, so edited data invalidates the cache."""
    if not task.data_dir:
        return []
    directory = Path(task.data_dir).expanduser()
    return [
        (name, os.stat(p).st_size, os.stat(p).st_mtime_ns)
        for name in task.files.values()
        if name and (p := directory / name).exists()
    ]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    else:
        # Without the truncation/padding state: encoding a split sets it on the backend, so a job that tokenized
        # its train split would otherwise key the dev split differently from a job whose train split was cached.
        # The state is switched off around to_str() and restored (parsing the JSON instead costs ~0.5 s a call).
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            text = backend.to_str()
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
    return hashlib.sha256(f"{type(tokenizer).__name__}{text}".encode()).hexdigest()


# Canonical examples of a cached split, next to its features. JSON, like the features' Arrow files and metadata: a
# cache entry is data only, so a planted or shared one cannot run code when read (the old pickle name is ignored).
EXAMPLES_FILE = "ptv2_examples.json"
TOTAL_FILE = "ptv2_total.json"  # how many examples the split had before a limit cut it
CACHE_VERSION = 4  # in the cache key; 4: a cut split keeps its full size (3: examples as JSON; 2 pickled them)


def cache_dir(configured: str | None) -> Path:
    return Path(configured or os.environ.get("PTV2_CACHE") or Path.home() / ".cache" / "ptv2").expanduser()


def encode_examples(examples: list[dict]) -> str:
    """The examples as JSON; a top-level string field that many examples share (a SQuAD context, a title) is stored
    once in "shared" and referenced by index, which keeps the file small and its parsing fast."""
    shared = {}
    for key in examples[0] if examples else ():
        values = [example.get(key) for example in examples]
        if all(isinstance(value, str) for value in values):
            table = list(dict.fromkeys(values))
            if 2 * len(table) <= len(values):
                shared[key] = table
    index = {key: {value: i for i, value in enumerate(table)} for key, table in shared.items()}
    rows = [{**example, **{key: index[key][example[key]] for key in shared}} for example in examples]
    return json.dumps({"shared": shared, "examples": rows})


def decode_examples(text: str) -> list[dict]:
    """encode_examples' inverse; raises ValueError (or TypeError/IndexError/KeyError) for anything else."""
    enabled = gc.isenabled()
    gc.disable()  # parsing makes many small objects that all live on: collections midway only cost time (~1/3)
    try:
        document = json.loads(text)
    finally:
        if enabled:
            gc.enable()
    shared, rows = document["shared"], document["examples"]
    if not (isinstance(rows, list) and all(isinstance(row, dict) for row in rows)):
        raise ValueError("its examples are not a list of objects")
    for key, table in shared.items():
        for row in rows:
            position = row[key]
            if not isinstance(position, int) or position < 0:
                raise ValueError(f"bad reference in field {key}")
            row[key] = table[position]
    return rows


def _cached(path: Path, split: str) -> Split | None:
    """The split cached at `path`, or None when there is none or it is damaged (truncated, half-deleted, foreign
    files): a damaged entry is removed, so it is rebuilt, with a warning."""
    if not (path / EXAMPLES_FILE).is_file():
        return None
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if any(Path(entry["filename"]).name != entry["filename"] for entry in state["_data_files"]):
            raise ValueError("it names files outside the entry")
        examples = decode_examples((path / EXAMPLES_FILE).read_text(encoding="utf-8"))
        features = datasets.load_from_disk(str(path))
    except Exception as error:  # JSON, Arrow and OS errors of a damaged entry: all mean "rebuild it"
        log.warning("the data cache entry %s is unreadable (%s); rebuilding it", path, str(error).splitlines()[0][:160])
        shutil.rmtree(path, ignore_errors=True)
        return None
    total = json.loads((path / TOTAL_FILE).read_text()) if (path / TOTAL_FILE).is_file() else None
    return Split(split, examples, features, total if isinstance(total, int) else None)


def _cache_folder(root: Path) -> Path:
    """<cache>/features, created and checked to be writable (one line naming the folder otherwise)."""
    folder = root / "features"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot use the data cache {root} ({error.strerror}: {error.filename}); set trainer.cache_dir=DIR "
            "(or PTV2_CACHE) to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot use the data cache {folder} (not writable); set trainer.cache_dir=DIR (or PTV2_CACHE) to a "
            "writable folder"
        )
    return folder


def prepare_split(task, split: str, tokenizer, task_type, cache_root: str | None, limit: int | None = None) -> Split:
    """Read and tokenize one split; tokenized features are cached on disk keyed by everything they depend on.

    The examples are cached beside the features, so a cache hit (every job of a sweep after the first) neither
    reads nor parses the data files: the key already covers their size and modification time.
    """
    task = with_local_file(task, split)
    key_parts = {
        "task": OmegaConf.to_container(task, resolve=True),
        "split": split,
        "limit": limit,
        "files": _files_fingerprint(task),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "encoder": task_type.__name__,
        "version": CACHE_VERSION,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = _cache_folder(cache_dir(cache_root)) / f"{task.name}-{split}-{key}"
    cached = _cached(path, split)
    if cached is not None:
        return cached
    examples = load_examples(task, split)
    total = len(examples) if limit and limit < len(examples) else None
    if limit:
        examples = examples[:limit]
    rows = datasets.Dataset.from_list(examples)
    try:
        features = rows.map(
            lambda batch: task_type.encode(batch, tokenizer, task), batched=True, remove_columns=rows.column_names
        )
    except KeyError as error:  # the reader's examples lack a field the task type encodes: they do not fit
        raise UserError(
            f"task {task.name}: task.type={task.type} needs the field {error} that task.reader={task.reader} does not "
            f"give (its examples hold {', '.join(rows.column_names)}); use the task type its config names"
        ) from None
    text = encode_examples(examples)
    if decode_examples(text) != examples:  # tuples or non-string keys would come back changed: not cached, re-read
        log.warning("the %s examples of task %s do not round-trip through JSON; they are not cached", split, task.name)
        return Split(split, examples, features, total)
    partial = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        features.save_to_disk(str(partial))
        write_text(partial / EXAMPLES_FILE, text)
        if total is not None:
            write_text(partial / TOTAL_FILE, str(total))
        if path.exists():  # another job of a sweep finished the same features first
            shutil.rmtree(partial)
        else:
            os.replace(partial, path)
    except (OSError, UserError) as error:  # a full disk, a cache folder taken away meanwhile
        shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(error, "strerror", None) or error
        raise UserError(
            f"cannot write the data cache entry {path} ({reason}); free some space or set "
            "trainer.cache_dir=DIR (or PTV2_CACHE) to another folder"
        ) from None
    return Split(split, examples, datasets.load_from_disk(str(path)), total)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Shuffled batches of similar-length features (less padding), reshuffled every epoch from a seeded generator.

    Features are shuffled, cut into windows of 50 batches, sorted by length inside each window, then the batches
    are shuffled again, so every epoch sees a different, reproducible order.

    Not transformers' LengthGroupedSampler (get_length_grouped_indices), which draws the same kind of mega-batches
    but is not equal: it shrinks the window below 50 batches on small sets (len // (4 * batch)), swaps the longest
    feature into the first batch, and keeps the batches in window order instead of shuffling them; training orders
    (and so the recorded runs and resumes) would change. Given 50-batch windows it cuts the same batches from the
    same generator draws (tests/test_first_hour.py checks both).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group:
            window = self.batch_size * 50
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        yield from batches

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of features sorted by length (longest first); outputs are put back in order later."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
