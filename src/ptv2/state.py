"""Full training state for resuming: prompt/heads, optimizer, scheduler, RNG states and loop progress.

`ptv2 train` writes <run dir>/state/training_state.pt every `trainer.save_every_steps` steps, at every epoch end
and when SIGTERM/SIGINT arrives (SLURM preemption), always atomically (write, then rename). `trainer.resume=true`
continues the run in hydra.run.dir; `trainer.resume=RUN_DIR` continues another run's state into this run's
directory. Resuming replays the interrupted epoch's batch order (LengthGroupedBatches reshuffles from seed + epoch),
skips the batches already done, then restores the RNG states, so the run ends with the same metrics as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ptv2 import checkpoint
from ptv2.errors import UserError

log = logging.getLogger("ptv2")
STATE_DIR = "state"
STATE_FILE = "training_state.pt"
# Keys that may differ between the interrupted run and its continuation: they do not change what is computed.
FREE_KEYS = ("trainer.resume", "trainer.save_every_steps", "trainer.progress", "logger.")
# Test-only knob: after step N, send the process this signal (KILL by default) to simulate a crash or preemption.
DIE_AT_STEP, DIE_SIGNAL = "PTV2_DIE_AT_STEP", "PTV2_DIE_SIGNAL"


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _flat(container, prefix: str = "") -> dict:
    if isinstance(container, dict):
        return {k: v for key, value in container.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): container}


def save(run_dir: Path, model, optimizer, scheduler, cfg, progress: dict) -> Path:
    """Write the state atomically; progress: epoch, batches_done (of that epoch), step, losses, history, best..."""
    path = Path(run_dir) / STATE_DIR / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "trainable": {k: v.detach().cpu().clone() for k, v in model.prompt_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
        "progress": progress,
    }
    checkpoint.atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def source(cfg, run_dir: Path) -> Path | None:
    """The run directory to resume from, or None for a fresh run."""
    resume = cfg.trainer.get("resume")
    if resume is None or resume is False or str(resume).lower() in ("false", "no", "0", ""):
        return None
    return Path(run_dir) if resume is True or str(resume).lower() in ("true", "yes", "1") else Path(resume).expanduser()


def restore(cfg, run_dir: Path, model, optimizer, scheduler) -> dict | None:
    """Load the state to resume from into model/optimizer/scheduler; returns (progress, rng) or None (fresh run).

    The RNG states are returned, not applied: the caller applies them once the interrupted epoch's already-done
    batches are skipped (creating the data iterators draws from the torch generator).
    """
    folder = source(cfg, run_dir)
    if folder is None:
        return None
    path = folder / STATE_DIR / STATE_FILE
    if not path.is_file():
        hint = "" if folder != Path(run_dir) else " (pass the interrupted run's folder: hydra.run.dir=RUN_DIR)"
        raise UserError(f"trainer.resume: no training state at {path}{hint}; nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG tuples
    except Exception as error:  # a truncated or foreign file: torch raises several types
        raise UserError(f"trainer.resume: {path} is not a readable training state ({type(error).__name__})") from None
    saved, now = _flat(json.loads(state["config"])), _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(
        key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key) and not key.startswith(FREE_KEYS)
    )
    if changed:
        shown = ", ".join(f"{k}={saved.get(k)!r}->{now.get(k)!r}" for k in changed[:3])
        raise UserError(f"trainer.resume: the config differs from the interrupted run's ({shown}); resume unchanged")
    with torch.no_grad():
        own = dict(model.named_parameters())
        for name, tensor in state["trainable"].items():
            own[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress = state["progress"]
    if folder != Path(run_dir) and (folder / checkpoint.FILENAME).is_file():
        # The best epoch's checkpoint so far belongs to this run's directory too.
        checkpoint.atomic_write(
            Path(run_dir) / checkpoint.FILENAME, lambda tmp: shutil.copyfile(folder / checkpoint.FILENAME, tmp)
        )
    log.info(
        "resuming from %s: epoch %d, %d batches done, step %d",
        path,
        progress["epoch"] + 1,
        progress["batches_done"],
        progress["step"],
    )
    return {**progress, "rng": state["rng"]}


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


def maybe_die(step: int) -> None:
    """The test knob: PTV2_DIE_AT_STEP=N [PTV2_DIE_SIGNAL=KILL|TERM|INT] signals this process after step N."""
    if os.environ.get(DIE_AT_STEP) == str(step):
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(DIE_SIGNAL, 'KILL')}"))
