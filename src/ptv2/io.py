"""Writing files: one atomic writer (write a temporary, then rename) and the JSON / JSON Lines writers on top of it.

Every result, checkpoint, state and prediction file goes through `atomic_write`, so a killed run never leaves a
half-written file and a full disk is one line naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ptv2.errors import UserError


def write_text(path: str | Path, text: str) -> Path:
    """`text` as a UTF-8 file, written atomically (a link in its place is replaced, never followed)."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as indented UTF-8 JSON."""
    return write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line, UTF-8."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call write(temporary_path) in the target's folder, then rename over `path`: a killed run never leaves a
    half-written file, and a failed write leaves no temporary behind. A write the disk refuses (full, quota, file
    size limit, read-only) ends with one line naming the file and the reason; the previous file, if any, is kept."""
    path = Path(path)
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
