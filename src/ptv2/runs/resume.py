"""Full training state for resuming: prompt/heads, optimizer, scheduler, RNG states and loop progress.

`ptv2 train` writes <run dir>/state/training_state.pt every `trainer.save_every_steps` steps, at every epoch end
and when SIGTERM/SIGINT arrives (SLURM preemption), always atomically (write, then rename). `trainer.resume=true`
continues the run in hydra.run.dir; `trainer.resume=RUN_DIR` continues another run's state into this run's
directory. Resuming replays the interrupted epoch's batch order (LengthGroupedBatches reshuffles from seed + epoch),
skips the batches already done, then restores the RNG states, so the run ends with the same metrics as an
uninterrupted one.

The file holds only tensors and plain values (numbers, strings, lists, dicts; the loop's progress as JSON) and is
read with `torch.load(weights_only=True)`: a crafted or foreign state file is refused, it never runs code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ptv2.config import FREE, flat_keys, has_role, keys_with
from ptv2.errors import UserError
from ptv2.io import atomic_write
from ptv2.runs import checkpoint

log = logging.getLogger("ptv2")
STATE_DIR = "state"
STATE_FILE = "training_state.pt"
NEXT_FILE = "training_state.next.pt"  # a group save under way (save_group)
# Keys that may differ between the interrupted run and its continuation: they do not change what is computed.
FREE_KEYS = keys_with(FREE)
STATE_KEYS = {"trainable", "best_state", "optimizer", "scheduler", "rng", "config", "progress"}
PROGRESS_KEYS = {"epoch", "batches_done", "step", "losses", "history", "best", "best_value", "best_epoch"}


@dataclass
class Progress:
    """What the training loop carries from step to step, and what a resumed run takes back."""

    epoch: int = 0  # the epoch under way (0-based)
    batches_done: int = 0  # of that epoch
    step: int = 0  # optimizer steps taken
    losses: list[float] = field(default_factory=list)  # of the epoch under way
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    best: dict | None = None  # the best epoch's dev metrics per member
    best_value: float = -math.inf
    best_epoch: int = -1  # 1-based; -1 before the first evaluation
    best_state: dict | None = None  # the best epoch's prompt and heads (tensors)


@dataclass
class Resumed:
    progress: Progress
    rng: dict  # the RNG states to apply once the interrupted epoch's done batches are skipped


# Called with the number of files save_group has written or renamed so far, after each one: where a test injects
# a kill inside a group save (tests/faults.py).
SAVE_CALLBACKS: list = []


def rng_states() -> dict:
    """The RNG states as tensors and plain values (numpy's key array as an int64 tensor), loadable with
    weights_only=True."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(value):
    """numpy scalars (metrics) as Python numbers, for the JSON progress record."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} in the training progress is not a plain value")


def save_group(runs: list[tuple]) -> None:
    """Write the states of a group of runs [(run_dir, model, optimizer, scheduler, cfg, progress)] saved at the same
    point of the same batches, so that a kill at any moment leaves a point every one of them can resume from:
    first every run's new state beside its old one (NEXT_FILE, each written atomically), then each renamed over
    the old. settle_group, before a resume, finishes or undoes a group save that was cut short. At an epoch's start,
    with no batch done, the epoch's losses are not kept."""
    states = []
    for run_dir, model, optimizer, scheduler, cfg, progress in runs:
        best_state = progress.best_state
        record = {f.name: getattr(progress, f.name) for f in fields(progress) if f.name != "best_state"}
        if not record["batches_done"]:
            record["losses"] = []
        state = {
            "trainable": {k: v.detach().cpu().clone() for k, v in model.prompt_state_dict().items()},
            "best_state": None if best_state is None else {k: v.detach().cpu() for k, v in best_state.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states(),
            "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
            "progress": json.dumps(record, default=_plain),
        }
        folder = Path(run_dir) / STATE_DIR
        states.append(folder)
        atomic_write(folder / NEXT_FILE, lambda tmp, state=state: torch.save(state, tmp))
        _saved(len(states))
    for index, folder in enumerate(states):
        os.replace(folder / NEXT_FILE, folder / STATE_FILE)
        _saved(len(states) + index + 1)


def _point(path: Path) -> tuple[int, int] | None:
    """(epoch, batches done) of a state file, None when it is absent or unreadable."""
    try:
        progress = read(path, mmap=True)["progress"]
        return int(progress["epoch"]), int(progress["batches_done"])
    except (UserError, FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def settle_group(run_dirs: list[Path]) -> None:
    """Before a group resumes: where a group save was cut short (some runs hold a NEXT_FILE), keep the latest point
    every run holds: each run's NEXT_FILE at that point is renamed over its state, any other is removed."""
    folders = [Path(run_dir) / STATE_DIR for run_dir in run_dirs]
    if not any((folder / NEXT_FILE).exists() for folder in folders):
        return
    held = [{p for p in (_point(folder / STATE_FILE), _point(folder / NEXT_FILE)) if p} for folder in folders]
    common = set.intersection(*held)
    point = max(common) if common else None
    for folder in folders:
        pending = folder / NEXT_FILE
        if not pending.exists():
            continue
        if point is not None and _point(pending) == point:
            os.replace(pending, folder / STATE_FILE)
            log.info("%s: a group save cut short is completed (epoch %d, %d batches done)", folder, *point)
        else:
            pending.unlink()


def not_saved_yet(run_dir: Path) -> bool:
    """Whether a run started in `run_dir` (its config is there) and stopped before its first save was complete:
    no state folder, or one that holds no state (as a group save cut short before every job's file was written
    leaves it, once settled). Nothing was trained that could be lost: a resume starts it from the beginning."""
    folder = Path(run_dir) / STATE_DIR
    if not (Path(run_dir) / "config.yaml").is_file() or (Path(run_dir) / "results.json").exists():
        return False
    if not folder.exists():
        return True
    return folder.is_dir() and not folder.is_symlink() and not any(folder.glob("training_state*.pt"))


RESUME_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "": False}


def source(cfg, run_dir: Path) -> Path | None:
    """The run directory to resume from, or None for a fresh run. trainer.resume: true (this run's folder), false,
    auto (this run's folder when it holds a training state, else a fresh start: what a requeued Slurm job needs), or
    the folder of the run to continue; anything else (a number, a list) is refused with one line."""
    resume = cfg.trainer.get("resume")
    if resume is None or isinstance(resume, bool):
        return Path(run_dir) if resume else None
    if isinstance(resume, int) and resume in (0, 1):  # `trainer.resume=1` reaches us as an int
        return Path(run_dir) if resume else None
    if not isinstance(resume, str):
        raise UserError(
            f"trainer.resume={resume!r} is not valid; use true, false, auto or the folder of the run to continue"
        )
    word = resume.strip().lower()
    if word in RESUME_WORDS:
        return Path(run_dir) if RESUME_WORDS[word] else None
    if word == "auto":  # a pending group save counts: settle_group finishes or undoes it before anything reads it
        state = Path(run_dir) / STATE_DIR
        return Path(run_dir) if (state / STATE_FILE).exists() or (state / NEXT_FILE).exists() else None
    return Path(resume).expanduser()


def read(path: Path, mmap: bool = False) -> dict:
    """A training state file, loaded without running code (weights_only=True); mmap: tensors are mapped, not read
    (cheap, for looking at the config and progress). Raises UserError for a file that is not a ptv2 state."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(
            f"trainer.resume: {path} holds objects other than tensors and plain values, which could run code when "
            "loaded; refused (a state written by ptv2 before this check, or not by ptv2: start a fresh run)"
        ) from None
    except Exception as error:  # a truncated or foreign file: torch raises several types
        raise UserError(f"trainer.resume: {path} is not a readable training state ({type(error).__name__})") from None
    try:
        if not (isinstance(state, dict) and STATE_KEYS <= state.keys()):
            raise ValueError("missing entries")
        state["config"], state["progress"] = json.loads(state["config"]), json.loads(state["progress"])
        if not isinstance(state["config"], dict):
            raise ValueError("its config is not a mapping")
        _check_progress(state["progress"])
        _check_rng(state["rng"])
        for key in ("trainable", "best_state"):
            tensors = state[key]
            if not (tensors is None and key == "best_state") and not (
                isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())
            ):
                raise ValueError(f"its {key} is not a set of named tensors")
    except (ValueError, TypeError, AttributeError) as error:
        raise UserError(f"trainer.resume: {path} is not a ptv2 training state ({error})") from None
    return state


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each entry of the saved progress must be (Progress's fields), checked before the loop takes them back.
PROGRESS_TYPES = {
    "epoch": (_is_count, "a count"),
    "batches_done": (_is_count, "a count"),
    "step": (_is_count, "a count"),
    "losses": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of records"),
    "best": (lambda v: v is None or isinstance(v, dict), "null or a mapping"),
    "best_value": (_is_number, "a number"),
    "best_epoch": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1, "an epoch number"),
}
assert PROGRESS_TYPES.keys() == PROGRESS_KEYS


def _check_progress(progress) -> None:
    """The saved loop progress holds exactly Progress's entries, each of its type; else ValueError naming one."""
    if not isinstance(progress, dict):
        raise ValueError("its progress is not a mapping")
    missing, unexpected = PROGRESS_KEYS - progress.keys(), progress.keys() - PROGRESS_KEYS
    if missing or unexpected:
        raise ValueError(f"progress entries missing: {sorted(missing)}, unexpected: {sorted(unexpected)}")
    for key, (valid, what) in PROGRESS_TYPES.items():
        if not valid(progress[key]):
            raise ValueError(f"progress.{key}={str(progress[key])[:60]!r} is not {what}")


def _check_rng(rng) -> None:
    """The RNG states have the shapes set_rng_states takes apart (python, numpy, torch)."""
    ok = (
        isinstance(rng, dict)
        and isinstance(rng.get("python"), (list, tuple))
        and len(rng["python"]) == 3
        and isinstance(rng["python"][1], (list, tuple))
        and isinstance(rng.get("numpy"), (list, tuple))
        and len(rng["numpy"]) == 5
        and isinstance(rng["numpy"][1], torch.Tensor)
        and isinstance(rng.get("torch"), torch.Tensor)
        and rng["torch"].dtype == torch.uint8
    )
    if not ok:
        raise ValueError("its random number generator states are malformed")


def state_path(cfg, run_dir: Path) -> Path | None:
    """The state file to resume from (checked to exist), or None for a fresh run."""
    folder = source(cfg, run_dir)
    if folder is None:
        return None
    path = folder / STATE_DIR / STATE_FILE
    if not path.is_file() and folder == Path(run_dir) and not_saved_yet(folder):
        log.info("%s: no training state was saved before the run stopped: it starts from the beginning", folder)
        return None
    if not path.is_file():
        hint = "" if folder != Path(run_dir) else " (pass the interrupted run's folder: hydra.run.dir=RUN_DIR)"
        raise UserError(f"trainer.resume: no training state at {path}{hint}; nothing to resume")
    return path


def config_changes(saved: dict, cfg, labels_known: bool = True) -> list[str]:
    """Keys whose values differ between a saved run config and `cfg`, beside the FREE_KEYS. Before the label
    names are derived from the training data (labels_known=False), an empty `labels` in `cfg` is not a change."""
    old, now = flat_keys(saved), flat_keys(OmegaConf.to_container(cfg, resolve=True))
    return sorted(
        key
        for key in old.keys() | now.keys()
        if old.get(key) != now.get(key)
        and not has_role(key, FREE_KEYS)
        and not (not labels_known and key.rpartition(".")[2] == "labels" and now.get(key) == [])
    )


def _refuse_changes(saved: dict, cfg, labels_known: bool) -> None:
    changed = config_changes(saved, cfg, labels_known)
    if changed:
        old, now = flat_keys(saved), flat_keys(OmegaConf.to_container(cfg, resolve=True))
        shown = ", ".join(f"{k}={repr(old.get(k))[:80]}->{repr(now.get(k))[:80]}" for k in changed[:3])
        raise UserError(f"trainer.resume: the config differs from the interrupted run's ({shown}); resume unchanged")


def check(cfg, run_dir: Path) -> None:
    """Refuse a resume that cannot go on (no state, a foreign file, a changed config) before anything is written
    into the run directory; reads only the config and progress (tensors are memory-mapped, not read)."""
    path = state_path(cfg, run_dir)
    if path is not None:
        _refuse_changes(read(path, mmap=True)["config"], cfg, labels_known=False)


def restore(cfg, run_dir: Path, model, optimizer, scheduler) -> Resumed | None:
    """Load the state to resume from into model/optimizer/scheduler; returns the loop's progress and the RNG states,
    or None (fresh run).

    The RNG states are returned, not applied: the caller applies them once the interrupted epoch's already-done
    batches are skipped (creating the data iterators draws from the torch generator).
    """
    path = state_path(cfg, run_dir)
    if path is None:
        return None
    folder = path.parent.parent
    state = read(path)
    _refuse_changes(state["config"], cfg, labels_known=True)
    own = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                own[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        raise UserError(
            f"trainer.resume: {path} does not fit this model ({type(error).__name__}: {str(error)[:120]})"
        ) from None
    progress = state["progress"]
    if folder != Path(run_dir) and (folder / checkpoint.FILENAME).is_file():
        # The best epoch's checkpoint so far belongs to this run's directory too.
        atomic_write(
            Path(run_dir) / checkpoint.FILENAME, lambda tmp: shutil.copyfile(folder / checkpoint.FILENAME, tmp)
        )
    log.info(
        "resuming from %s: epoch %d, %d batches done, step %d",
        path,
        progress["epoch"] + 1,
        progress["batches_done"],
        progress["step"],
    )
    return Resumed(Progress(**progress, best_state=state["best_state"]), state["rng"])


class StopRequests:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the loop can save its state and stop cleanly.

    install() / uninstall() bracket the training loop; a signal after uninstall (or after the loop died on an
    error) goes to the handler that was there before.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.previous: dict = {}
        self.active = False

    def _handle(self, number, frame) -> None:
        if self.active:
            self.signal_name = signal.Signals(number).name
            return
        signal.signal(number, self.previous.get(number, signal.SIG_DFL))
        signal.raise_signal(number)

    def install(self) -> StopRequests:
        try:
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        self.active = True
        return self

    def uninstall(self) -> None:
        self.active = False
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _saved(count: int) -> None:
    for callback in SAVE_CALLBACKS:
        callback(count)
