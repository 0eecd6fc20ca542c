"""File and hub readers shared by every task: they fail with one line naming the file, line and field."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ptv2 import hub
from ptv2.errors import UserError, shown_list


def data_folder(data_dir: str | Path) -> Path:
    """`task.data_dir`, checked to be a folder."""
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise UserError(f"task.data_dir={directory} is not a directory: pass the folder that holds the task's files")
    return directory


def not_a_file(path: Path) -> str | None:
    """Why an existing name in a data folder is not a readable data file (a folder, a FIFO, a broken symbolic link,
    unreadable), or None: a split file that is there but unusable is named with the reason, never as missing."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if path.exists() and not path.is_file():
        kind = "a FIFO" if stat.S_ISFIFO(path.stat().st_mode) else "not a regular file"
        return f"{path} is {kind}"
    if path.is_file() and not os.access(path, os.R_OK):
        return f"{path} is not readable (permission denied)"
    return None


def split_file(data_dir: str | Path, filename: str) -> Path:
    """Path of one split's file inside `task.data_dir`, checked to exist and be a readable file."""
    directory = data_folder(data_dir)
    path = directory / filename
    reason = not_a_file(path)
    if reason:
        raise UserError(f"{reason}; put the split's data file there or point task.data_dir elsewhere")
    if not path.is_file():
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise UserError(
            f"missing split file {path} (the folder holds: {present}); add it or point task.data_dir elsewhere"
        )
    return path


def local_split(task: Any, split: str, accepted: dict[str, dict[str, list[str]]], sniff=None) -> tuple[str, Path]:
    """(format, path) of one split's file in `task.data_dir`.

    `accepted` is what the task's reader reads: {format: {split: [file names]}}, formats in order of preference.
    `task.files[split]` and `task.format`, when set, are used as they are; otherwise the file is the one accepted
    name of the split the folder holds, and its format the first that lists it. A file named in `task.files` but
    not in `accepted` gets its format from its extension, then from `sniff(path) -> format | None` (a reader's
    look at the content). Where the folder leaves a choice, the one-line error names the overrides that settle it.
    """
    name = task.get("name")
    chosen = task.get("format")
    if chosen and chosen not in accepted:
        raise UserError(f"task {name}: task.format={chosen} is unknown; this task reads {', '.join(accepted)}")
    formats = {chosen: accepted[chosen]} if chosen else accepted
    explicit = (task.get("files") or {}).get(split)
    if explicit:
        path = split_file(task.get("data_dir"), explicit)
        return chosen or _format_of(path, formats, sniff, f"task {name}: task.files.{split}={explicit}"), path
    data_dir = data_folder(task.get("data_dir"))
    held = {p.name for p in data_dir.iterdir() if p.is_file()}
    found: dict[str, str] = {}  # file name -> its format (the first format listing it)
    for fmt, splits in formats.items():
        for filename in splits.get(split, []):
            if filename in held:
                found.setdefault(filename, fmt)
    if len(found) == 1:
        ((filename, fmt),) = found.items()
        return fmt, data_dir / filename
    if found:
        options = (
            [f"task.format={fmt}" for fmt in dict.fromkeys(found.values())]
            if len(set(found.values())) == len(found)
            else [f"task.files.{split}={filename}" for filename in found]
        )
        held_text = " and ".join(f"{filename} ({fmt})" for filename, fmt in found.items())
        raise UserError(f"task {name}: {data_dir} holds several {split} files, {held_text}; add {' or '.join(options)}")
    for filename in [name for splits in formats.values() for name in splits.get(split, [])]:
        reason = not_a_file(data_dir / filename)
        if reason:  # the split's file is there, but cannot be read: say so rather than "no file"
            raise UserError(
                f"task {name}: {reason}; put the {split} data file there or name another: task.files.{split}=FILE"
            )
    expected = "; ".join(f"{', '.join(splits[split])} ({fmt})" for fmt, splits in formats.items() if splits.get(split))
    known = sorted({name for splits in formats.values() for name in splits})
    if not expected and known:  # no reader file name for it: a split this task does not have (split=nope)
        raise UserError(f"task {name}: '{split}' is not one of its splits; use one of {', '.join(known)}")
    raise UserError(
        f"task {name}: no {split} file in {data_dir} (it holds: {', '.join(sorted(held)) or 'nothing'}); "
        f"expected {expected or 'none for this split'}; or name it: task.files.{split}=FILE"
    )


def _format_of(path: Path, formats: dict[str, dict[str, list[str]]], sniff, where: str) -> str:
    """The format of a file named by the user: the first that lists its name, else those sharing its extension,
    narrowed by `sniff`; ambiguous -> an error naming task.format=... for each candidate."""
    if len(formats) == 1:
        return next(iter(formats))
    for fmt, splits in formats.items():
        if any(path.name in names for names in splits.values()):
            return fmt
    candidates = [
        fmt
        for fmt, splits in formats.items()
        if any(Path(filename).suffix == path.suffix for names in splits.values() for filename in names)
    ]
    if len(candidates) != 1 and sniff is not None:
        sniffed = sniff(path)
        if sniffed in formats:
            return sniffed
    if len(candidates) == 1:
        return candidates[0]
    options = " or ".join(f"task.format={fmt}" for fmt in candidates or formats)
    raise UserError(f"{where}: which format is it? add {options}")


# The longest record a JSON-lines file may hold: SuperGLUE's longest (a MultiRC passage with its questions) is tens
# of kB, and a model reads at most task.max_length tokens of it; a larger line is a mistake that would take minutes
# and gigabytes to tokenize.
MAX_RECORD_CHARS = 1_000_000


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-empty line of a JSON-lines file."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(iter(lambda: handle.readline(MAX_RECORD_CHARS + 2), ""), start=1):
            if len(line) > MAX_RECORD_CHARS and not line.endswith("\n") or len(line) > MAX_RECORD_CHARS + 1:
                raise UserError(
                    f"{path}:{line_number}: a record of over {MAX_RECORD_CHARS:,} characters; ptv2 reads records up "
                    "to that size (the model sees task.max_length tokens of it): shorten or split that line"
                )
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}:{line_number}: malformed JSON ({error.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def read_json(path: str | Path) -> Any:
    """Load a whole JSON file, naming the file when it is malformed."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None


def field(record: dict[str, Any], name: str, where: str) -> Any:
    """record[name], or a UserError naming the place (`file:line`) and the missing field."""
    if name not in record:
        present = sorted(key for key, value in record.items() if value is not None)  # not the readers' defaults
        raise UserError(f"{where}: missing field '{name}' (fields present: {', '.join(present)})")
    return record[name]


def label_id(value: Any, labels: list[str], where: str) -> int:
    """Map an official label value (string, bool or int) to its index in `labels`."""
    key = str(value).lower() if isinstance(value, bool) else str(value)
    if key in labels:
        return labels.index(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise UserError(f"{where}: unknown label {value!r}; expected one of {shown_list(labels)}")


LOCAL_DATA = (
    "the task files with task.data_dir=DIR (and, for a hub backbone, a local model with backbone.name_or_path=DIR "
    "or the packaged backbone=minilm)"
)


def load_hub_split(path: str, name: str | None, revision: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a hub dataset (parquet-backed), with an offline hint when it cannot be reached."""
    import datasets

    hub.prepare()
    try:
        dataset = datasets.load_dataset(path, name, revision=revision, split=split)
    except Exception as error:  # the hub client raises many types for 'offline' or 'not found'
        raise UserError(
            f"could not load {path}{'/' + name if name else ''} split '{split}' from the Hugging Face hub "
            f"({hub.reason(error)}); {hub.fixes(LOCAL_DATA, packaged=None)}"
        ) from None
    return list(dataset)


def hub_rows(task: Any, split: str, files: str, default_splits: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """(rows, where) of `split` from the hub copy a task names, for a task without task.data_dir: dataset
    `task.hub` (path, name, revision) at split `task.hub_splits[split]` (else `default_splits[split]`); `where` names
    it in messages. A task that names no hub copy or no such split gets one line; `files` says what task.data_dir
    would hold instead."""
    named = {key: value for key, value in (task.get("hub_splits") or {}).items() if value}
    hub, splits = task.get("hub") or {}, {**(default_splits or {}), **named}
    if not hub.get("path"):
        raise UserError(f"task {task.get('name')}: set task.data_dir=DIR ({files}) or task.hub.path")
    if split not in splits:
        raise UserError(
            f"task {task.get('name')}: no hub split configured for '{split}' (task.hub_splits: {dict(splits)})"
        )
    where = f"hub {hub['path']}{'/' + hub['name'] if hub.get('name') else ''} split {splits[split]}"
    return load_hub_split(hub["path"], hub.get("name"), hub.get("revision"), splits[split]), where


# The JSON-lines readers' file names (instructions, text_pairs), found in task.data_dir unless task.files names one.
JSONL_FILES = {"jsonl": {"train": ["train.jsonl"], "dev": ["dev.jsonl", "val.jsonl"], "test": ["test.jsonl"]}}


def jsonl_records(task: Any, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for every line of a split's JSON-lines file in task.data_dir (JSONL_FILES' names)."""
    if not task.get("data_dir"):
        raise UserError(f"task {task.name}: set task.data_dir=DIR, a folder with train.jsonl and dev.jsonl")
    _, path = local_split(task, split, JSONL_FILES)
    return [(f"{path}:{line}", record) for line, record in read_jsonl(path)]
