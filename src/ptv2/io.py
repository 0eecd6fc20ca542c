"""Writing files: the one writer of every file ptv2 writes (write a temporary, then rename), and the JSON / JSON
Lines / text writers on top of it.

Every result, checkpoint, state, prediction, table and plot goes through `atomic_write`: a killed run never leaves a
half-written file, a full disk is one line naming the file, a link in the file's place is replaced (never followed),
a link planted between the command's output folder and the file is refused, and a file that is earlier work is kept
unless the user asked to replace it. Each command declares the files it writes (`declare`), so a test can plant a
link at every one of them (tests/test_io.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ptv2.errors import UserError

# command -> the names (glob patterns) of the files it writes into its output folder
OUTPUTS: dict[str, tuple[str, ...]] = {}


def declare(command: str, *names: str) -> tuple[str, ...]:
    """Record the files `command` writes (names or glob patterns, relative to its output folder)."""
    OUTPUTS[command] = tuple(dict.fromkeys((*OUTPUTS.get(command, ()), *names)))
    return names


class Exists(UserError):
    """A file the command would write holds earlier work, and the user did not ask to replace it."""


def write_text(path: str | Path, text: str, **rules) -> Path:
    """`text` as a UTF-8 file (rules: atomic_write's `within` and `keep`)."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), **rules)
    return Path(path)


def write_json(path: str | Path, value: Any, **rules) -> Path:
    """`value` as indented UTF-8 JSON."""
    return write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n", **rules)


def write_jsonl(path: str | Path, rows: Iterable[dict], **rules) -> Path:
    """One JSON object per line, UTF-8."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), **rules)


def link_between(within: Path, path: Path) -> Path | None:
    """The first symbolic link among the folders from `within` (excluded: the user named it) down to `path`'s
    folder, or None."""
    try:
        parts = Path(path).absolute().relative_to(Path(within).absolute()).parts[:-1]
    except ValueError:
        return None
    folder = Path(within).absolute()
    for part in parts:
        folder = folder / part
        if folder.is_symlink():
            return folder
    return None


def refuse_links(within: Path, path: Path) -> None:
    """One line when a symbolic link stands in a folder between `within` and `path` (see link_between)."""
    link = link_between(within, path)
    if link is not None:
        raise UserError(
            f"{link} is a symbolic link (to {os.readlink(link)}); ptv2 never writes through links: remove it and retry"
        )


def atomic_write(path: str | Path, write: Callable[[Path], Any], within: Path | None = None, keep: str = "") -> None:
    """Call write(temporary_path) in the target's folder, then rename over `path`: a killed run never leaves a
    half-written file, and a failed write leaves no temporary behind. A write the disk refuses (full, quota, file
    size limit, read-only) ends with one line naming the file and the reason; the previous file, if any, is kept.

    within: the command's output folder; a link planted in a folder between it and `path` is refused. keep: an
    existing file at `path` is earlier work, kept (Exists) unless the user asks; the text says how (e.g.
    "pass overwrite=true to replace it")."""
    path = Path(path)
    if within is not None:
        refuse_links(within, path)
    if keep and (path.exists() or path.is_symlink()):
        raise Exists(f"{path} already exists; {keep}")
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        reason = _write_failure(error)
        if reason is None:
            raise
        try:
            reason += f"; {shutil.disk_usage(path.parent).free / 1e6:.0f} MB free there"
        except OSError:
            pass
        raise UserError(f"cannot write {path} ({reason}); its previous version, if any, is kept") from None


def _write_failure(error: BaseException) -> str | None:
    """The reason a file write failed for a user to fix, or None for anything else. torch.save and safetensors
    wrap the OS error in their own exception types, hence the look at their text."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or str(error)
    text = str(error)
    known = {
        "No space left": "no space left on the device",
        "StorageFull": "no space left on the device",
        "Disk quota": "disk quota exceeded",
        "File too large": "file too large for this file system or limit",
        "FileTooLarge": "file too large for this file system or limit",
        "file write failed": "the write was cut short: is the disk full?",
        "unexpected pos": "the write was cut short: is the disk full?",
    }
    return next((reason for marker, reason in known.items() if marker in text), None)


def output_folder(folder: str | Path, named: str) -> Path:
    """The folder a command writes into, made if needed; one line when it is a file, a dangling link or not
    writable, saying how to choose another (`named`: how the user names it, "--out " or "output_dir="). Nothing is
    written to probe it."""
    folder = Path(folder).expanduser()
    fix = f"pass {named}DIR with a writable folder"
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{named}{folder} is a link to {os.readlink(folder)}, which does not exist; {fix}")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{named}{folder} is a file, not a folder; pass {named}DIR")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {folder} ({error.strerror or error}); {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {folder} (Permission denied); {fix}")
    return folder


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Tensors as a safetensors file, written atomically, with the permissions the umask gives (safetensors itself
    creates its files 0600, which would keep a shared run's checkpoint from the rest of the team)."""
    from safetensors.torch import save_file

    def write(temporary: Path) -> None:
        save_file(tensors, str(temporary), metadata=metadata)
        os.chmod(temporary, 0o666 & ~_umask())

    atomic_write(path, write)
    return Path(path)


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_stream(path: str | Path):
    """A file another process streams into (a server's output), opened for writing in binary: the one output that
    cannot be atomic. Never through a link: a link in its place is refused (O_NOFOLLOW)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error}); remove what is there and retry") from None
    return os.fdopen(descriptor, "wb")
