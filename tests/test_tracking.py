"""W&B's per-step curves: every optimizer step logs its training loss and the learning rate it used, on the step
axis the epoch records share (an offline run, read back from its .wandb file)."""

from __future__ import annotations

import json

import pytest
from conftest import SMOKE, ptv2_subprocess
from test_cli import _wandb_history

pytest.importorskip("wandb")


def test_each_step_logs_its_loss_and_learning_rate(tmp_path):
    run_dir = tmp_path / "run"
    done = ptv2_subprocess(
        "train", *SMOKE, "trainer.max_steps=null", "trainer.epochs=2", "optimizer.lr=0.01", "scheduler=linear",
        "logger=wandb", f"hydra.run.dir={run_dir}", home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    history = _wandb_history(next(run_dir.glob("wandb/offline-run-*/*.wandb")))
    steps = [row for row in history if "train/step_loss" in row]
    epochs = [row for row in history if "train_loss" in row]
    assert [int(row["_step"]) for row in steps] == [1, 2, 3, 4]  # 8 examples, batch 4, 2 epochs
    # Linear decay to 0 over the 4 steps, no warmup: the rate each step used.
    assert [json.loads(row["train/lr"]) for row in steps] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    losses = [json.loads(row["train/step_loss"]) for row in steps]
    # The epoch records' train loss is the mean of their steps' losses.
    means = [json.loads(row["train_loss"]) for row in epochs]
    assert means == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2])
    assert [int(row["_step"]) for row in epochs] == [2, 4]
