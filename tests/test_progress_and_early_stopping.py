"""What a long run prints and when it stops: progress lines instead of bar redraws off a terminal, and
trainer.early_stopping_patience (off by default and in every preset)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from conftest import RTE, compose_config, ptv2
from test_config import options
from tqdm import tqdm

from ptv2 import progress


class Clock:
    def __init__(self, step_seconds: float):
        self.now, self.step_seconds = 0.0, step_seconds

    def __call__(self) -> float:
        self.now += self.step_seconds
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(bar, caplog) -> list[str]:
    with caplog.at_level(logging.INFO, logger="ptv2"):
        for _ in bar:
            bar.set_postfix(loss="0.5000")
    return [record.getMessage() for record in caplog.records]


def test_one_line_per_tenth_of_an_epoch(caplog):
    lines = lines_of(progress.ProgressLines(range(439), 439, "epoch 1/4", clock=Clock(0.01)), caplog)
    assert len(lines) == 10
    assert lines[0].startswith("epoch 1/4: 44/439 steps (10%), loss 0.5000, ")
    assert lines[-1].startswith("epoch 1/4: 439/439 steps (100%)") and "left" not in lines[-1]


def test_slow_epochs_also_get_a_line_every_few_minutes(caplog):
    # 100 steps of 100 s: a tenth (10 steps) takes 1000 s, so lines come every LINE_SECONDS (3 steps) as well.
    lines = lines_of(progress.ProgressLines(range(100), 100, "epoch 1/1", clock=Clock(100.0)), caplog)
    assert lines[0].startswith("epoch 1/1: 3/100 steps (3%)") and "~9700 s left in the epoch" in lines[0]
    assert len(lines) == 40  # at 3, 6, 9 and the tenth at 10 in every tenth


def test_resumed_epoch_counts_from_its_finished_batches(caplog):
    bar = progress.ProgressLines(range(5), 20, "epoch 2/3", initial=15, clock=Clock(1.0))
    lines = lines_of(bar, caplog)
    assert [line.split(",")[0] for line in lines] == [f"epoch 2/3: {n}/20 steps ({5 * n}%)" for n in (16, 18, 20)]


def test_bar_on_a_terminal_lines_elsewhere_nothing_when_disabled(caplog):
    assert isinstance(progress.epoch_progress(range(3), 3, "x", stream=Terminal()), tqdm)
    for unit, shown in (("steps", "step/s"), ("batches", "batch/s")):  # the bar's rate names one of the unit
        terminal = Terminal()
        list(progress.epoch_progress(range(3), 3, "x", stream=terminal, unit=unit))
        assert shown in terminal.getvalue() and "batche/s" not in terminal.getvalue()
    assert isinstance(progress.epoch_progress(range(3), 3, "x", stream=io.StringIO()), progress.ProgressLines)
    assert lines_of(progress.epoch_progress(range(3), 3, "x", enabled=False, stream=io.StringIO()), caplog) == []
    assert lines_of(progress.epoch_progress(range(3), 3, "x", enabled=False, stream=Terminal()), caplog) == []


@pytest.mark.parametrize("preset", [None, *options("preset")])
def test_early_stopping_is_off_by_default_and_in_presets(preset):
    cfg = compose_config(*([f"preset={preset}"] if preset else []))
    assert cfg.trainer.early_stopping_patience is None


def test_early_stopping_ends_the_run_and_logs_progress_lines(tmp_path):
    """With lr 1e-12 the prompt barely moves, so the dev metric never improves: patience 1 stops after epoch 2 of 5.
    The run's output is not a terminal, so progress comes as log lines, with no carriage-return redraws."""
    run_dir = tmp_path / "run"
    result = ptv2(
        "train",
        "backbone=tiny",
        f"task.data_dir={RTE}",
        "logger=none",
        "trainer.epochs=5",
        "trainer.batch_size=4",
        "trainer.limit_train=8",
        "optimizer.lr=1e-12",
        "trainer.early_stopping_patience=1",
        f"hydra.run.dir={run_dir}",
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped_early"] is True and results["best_epoch"] == 1
    assert [record["epoch"] for record in results["history"]] == [1, 2]
    log_text = (run_dir / "train.log").read_text()
    assert "early stopping: no better dev accuracy in the 1 epochs after epoch 1" in log_text
    assert "epoch 1/5: 1/2 steps (50%)" in log_text and "epoch 2/5: 2/2 steps (100%)" in log_text
    assert "\r" not in result.stdout + result.stderr
