"""Examples from a task's reader, tokenized once and cached on disk, batched with dynamic padding.

A reader is a module of this package named by `task.reader` with `load(task, split) -> list[dict]` that reads
either the hub (`task.hub`) or local files (`task.data_dir`) into the task type's canonical examples, and
`local_files(task) -> {format: {split: [file names]}}`: the names by which a data folder's files and their format
are found (optionally `sniff_format(path)` for a file the user named; see io.local_split).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from omegaconf import OmegaConf, open_dict

from ptv2.data.io import local_split
from ptv2.errors import UserError

log = logging.getLogger("ptv2")
datasets.disable_progress_bars()  # tokenization is timed and logged instead


@dataclass
class Split:
    """One split: canonical examples and their tokenized features (one or more features per example)."""

    name: str
    examples: list[dict]
    features: datasets.Dataset


def load_examples(task, split: str) -> list[dict]:
    reader = importlib.import_module(f"ptv2.data.{task.reader}")
    examples = reader.load(task, split)
    if not examples:
        source = task.data_dir or task.hub.get("path")
        raise UserError(f"the {split} split of task {task.name} ({source}) has no examples; check the data files")
    return examples


def with_local_file(task, split: str):
    """`task` with `format` and `files[split]` set to the file its data folder holds for `split` (found by the
    reader's `local_files` names unless task.files / task.format say; see io.local_split), so the cache key covers
    the file read; `task` itself without task.data_dir."""
    if not task.get("data_dir"):
        return task
    reader = importlib.import_module(f"ptv2.data.{task.reader}")
    fmt, path = local_split(task, split, reader.local_files(task), getattr(reader, "sniff_format", None))
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


EXAMPLES_FILE = "ptv2_examples.pickle"  # canonical examples of a cached split, next to its features


def cache_dir(configured: str | None) -> Path:
    return Path(configured or os.environ.get("PTV2_CACHE") or Path.home() / ".cache" / "ptv2").expanduser()


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
        "version": 2,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_dir(cache_root) / "features" / f"{task.name}-{split}-{key}"
    if (path / EXAMPLES_FILE).exists():
        examples = pickle.loads((path / EXAMPLES_FILE).read_bytes())
        return Split(split, examples, datasets.load_from_disk(str(path)))
    examples = load_examples(task, split)
    if limit:
        examples = examples[:limit]
    if path.exists():  # features cached by an older version, without their examples
        return Split(split, examples, datasets.load_from_disk(str(path)))
    rows = datasets.Dataset.from_list(examples)
    features = rows.map(
        lambda batch: task_type.encode(batch, tokenizer, task), batched=True, remove_columns=rows.column_names
    )
    partial = path.with_name(path.name + f".tmp{os.getpid()}")
    features.save_to_disk(str(partial))
    (partial / EXAMPLES_FILE).write_bytes(pickle.dumps(examples))
    if path.exists():  # another job of a sweep finished the same features first
        shutil.rmtree(partial)
    else:
        os.replace(partial, path)
    return Split(split, examples, datasets.load_from_disk(str(path)))


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Shuffled batches of similar-length features (less padding), reshuffled every epoch from a seeded generator.

    Features are shuffled, cut into windows of 50 batches, sorted by length inside each window, then the batches
    are shuffled again, so every epoch sees a different, reproducible order.
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
