"""Resuming: a run killed mid-epoch (SIGKILL) or preempted (SIGTERM) and resumed ends exactly like an uninterrupted
run, on the tiny backbone and the RTE fixture (3 epochs of 6 steps, dropout on)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import RTE, ptv2, ptv2_subprocess
from safetensors.torch import load_file

from ptv2.runs import resume as state
from ptv2.runs.resume import STATE_DIR, STATE_FILE

RUN = [
    "train",
    "backbone=tiny",
    f"task.data_dir={RTE}",
    "logger=none",
    "trainer.epochs=3",
    "trainer.batch_size=2",  # 12 examples: 6 steps per epoch
    "trainer.eval_batch_size=4",
    "trainer.progress=false",
    "trainer.save_every_steps=2",
]


def train(*args: str, die_at: int | None = None, signal: str = "KILL") -> subprocess.CompletedProcess:
    """A training run in this process; with die_at, a process of its own that a signal ends after step die_at."""
    if die_at is None:
        return ptv2(*RUN, *args, check=False)
    return ptv2_subprocess(*RUN, *args, env={"PTV2_DIE_AT_STEP": str(die_at), "PTV2_DIE_SIGNAL": signal}, check=False)


def final_state(run_dir) -> dict:
    """The saved training state, read as ptv2 reads it: weights_only=True (no code runs), progress parsed."""
    return state.read(run_dir / STATE_DIR / STATE_FILE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def untimed(history: list[dict]) -> list[dict]:
    """Per-epoch records without wall-clock fields (`*_seconds`), which differ between any two runs."""
    return [{k: v for k, v in record.items() if not k.endswith("_seconds")} for record in history]


def assert_same_run(run_dir, reference) -> None:
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert untimed(ours["history"]) == untimed(theirs["history"]) and len(ours["history"]) == 3
    assert ours["best"] == theirs["best"] and ours["best_epoch"] == theirs["best_epoch"] and ours["steps"] == 18
    a, b = final_state(run_dir), final_state(reference)
    assert a["trainable"].keys() == b["trainable"].keys()
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    ours, theirs = (load_file(str(d / "prompt.safetensors")) for d in (run_dir, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(reference, tmp_path):
    killed = train(f"hydra.run.dir={tmp_path}", die_at=9)  # epoch 2, one step after the step-8 state
    assert killed.returncode == -9
    # Nothing half-written: no results yet, and the state and checkpoint on disk are complete files.
    assert not (tmp_path / "results.json").exists()
    progress = final_state(tmp_path)["progress"]
    assert (progress["epoch"], progress["batches_done"], progress["step"]) == (1, 2, 8)
    assert load_file(str(tmp_path / "prompt.safetensors"))
    resumed = train(f"hydra.run.dir={tmp_path}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path, reference)


def test_sigterm_saves_state_and_resume_into_another_directory_matches(reference, tmp_path):
    stopped_dir, continued_dir = tmp_path / "stopped", tmp_path / "continued"
    stopped = train(f"hydra.run.dir={stopped_dir}", die_at=9, signal="TERM")
    assert stopped.returncode == 2
    assert stopped.stderr.strip().splitlines() == [
        f"ptv2: error: stopped by SIGTERM at step 9; the training state is saved in {stopped_dir / STATE_DIR}: "
        f"continue with trainer.resume={stopped_dir}"
    ]
    assert final_state(stopped_dir)["progress"]["step"] == 9
    resumed = train(f"hydra.run.dir={continued_dir}", f"trainer.resume={stopped_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(continued_dir, reference)


def test_resume_refuses_a_changed_config_or_a_missing_state(reference, tmp_path):
    changed = train(f"hydra.run.dir={tmp_path}", f"trainer.resume={reference}", "optimizer.lr=0.5")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "the config differs from the interrupted run's (optimizer.lr=0.01->0.5)" in changed.stderr
    missing = train(f"hydra.run.dir={tmp_path / 'fresh'}", "trainer.resume=true")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"no training state at {tmp_path / 'fresh' / STATE_DIR / STATE_FILE}" in missing.stderr
