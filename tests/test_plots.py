"""`ptv2 table`'s figures: PNG at 300 dpi with PDF and SVG beside it, a majority-class line, error bars only where
n > 1, methods on an axis that keeps their gaps, titles and table.md naming a cut dev split, and a note when runs
with different data limits share a table."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import RTE, SMOKE, markdown_rows, ptv2

from ptv2.commands import plots, table

pytest.importorskip("matplotlib")


def fake_run(root: Path, name: str, score: float, *, method="ptv2", seed=1, length=4, used=128, limit_train=None):
    """A finished run's results.json and config.yaml: RTE dev accuracy `score`, on the first `used` of 277 dev
    examples, whose majority class has 52.7 %."""
    job = root / name
    job.mkdir(parents=True)
    results = {
        "task": "rte", "backbone": "minilm", "method": method, "select_metric": "accuracy", "best_epoch": 1,
        "best": {"accuracy": score}, "best_value": score,
        "evaluated": {"rte": {"split": "dev", "examples": used, "of": 277, "majority": 52.7}},
    }  # fmt: skip
    config = {
        "task": {"name": "rte", "type": "classification", "eval_split": "dev"},
        "prompt": {"length": length, "method": method},
        "trainer": {"seed": seed, "limit_train": limit_train, "limit_eval": used if used < 277 else None},
    }
    (job / "results.json").write_text(json.dumps(results))
    (job / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The axes of every figure saved, kept as they were when saved."""
    import matplotlib.pyplot as plt

    saved, original = [], plt.Figure.savefig

    def keep(figure, path, *args, **kwargs):
        saved.append(("." + kwargs["format"], figure.axes[0], kwargs.get("dpi")))  # written to a temporary first
        return original(figure, path, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    return saved


def test_the_evaluated_split_its_size_and_majority_class_are_in_results(tmp_path):
    run = tmp_path / "run"
    ptv2("train", *SMOKE, "logger=none", "trainer.limit_eval=4", f"hydra.run.dir={run}")
    labels = [json.loads(line)["label"] for line in (RTE / "val.jsonl").read_text().splitlines()]
    evaluated = json.loads((run / "results.json").read_text())["evaluated"]
    majority = 100 * max(Counter(labels[:4]).values()) / 4
    assert evaluated == {"rte": {"split": "dev", "examples": 4, "of": len(labels), "majority": majority}}


def test_length_plot_files_title_majority_line_and_no_error_bars_for_single_runs(tmp_path, drawn):
    for length, score in ((1, 0.45), (4, 0.52), (16, 0.48)):
        fake_run(tmp_path / "runs", f"p{length}", score, length=length)
    out = tmp_path / "out"
    assert table.main([str(tmp_path / "runs"), "--out", str(out), "--no-reference"]) == 0
    assert (out / "plot_prompt_length.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plot_prompt_length.pdf").read_bytes()[:4] == b"%PDF"
    assert "<svg" in (out / "plot_prompt_length.svg").read_text()
    assert sorted(suffix for suffix, _, _ in drawn) == [".pdf", ".png", ".svg"] and {d for *_, d in drawn} == {300}
    axes = drawn[0][1]
    assert axes.get_title() == "score vs prompt length (dev, first 128 of 277; n=1 run(s) per point)"
    floor = [line for line in axes.get_lines() if list(line.get_ydata()) == [52.7, 52.7]]
    assert len(floor) == 1 and "majority class (52.7)" in floor[0].get_label()
    assert not axes.containers and not axes.collections  # no error bars: every point is one run
    low, high = axes.get_ylim()
    assert low < 45 and high > 52.7 and high - low >= plots.MIN_Y_SPAN
    assert json.loads((out / "plots.json").read_text())[0]["majority"] == {"rte": 52.7}
    rows = markdown_rows((out / "table.md").read_text())
    assert ["rte", "dev, first 128 of 277 (dev-selected: best epoch)", "accuracy"] in [row[:3] for row in rows]


def test_error_bars_where_points_average_several_runs(tmp_path, drawn):
    for seed, score in ((1, 0.50), (2, 0.54)):
        fake_run(tmp_path / "runs", f"p4-{seed}", score, seed=seed)
    fake_run(tmp_path / "runs", "p16", 0.49, length=16)
    assert table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-reference"]) == 0
    axes = drawn[0][1]
    (bars,) = axes.containers
    assert len(bars.lines[2][0].get_segments()) == 1  # one bar: prompt length 4, n = 2; none at length 16 (n = 1)


def test_methods_are_points_on_an_axis_that_keeps_their_gap(tmp_path, drawn):
    fake_run(tmp_path / "runs", "ptv2", 0.58, method="ptv2")
    fake_run(tmp_path / "runs", "lora", 0.50, method="lora")
    assert table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--plot", "methods"]) == 0
    axes = drawn[0][1]
    assert not axes.patches  # no bars from 0
    low, high = axes.get_ylim()
    assert 40 < low < 50 and 58 < high < 70  # the 8-point gap fills most of the height
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["lora", "ptv2"]


def test_runs_with_different_data_limits_get_a_note(tmp_path, capsys):
    fake_run(tmp_path / "runs", "small", 0.50, length=4, limit_train=128)
    fake_run(tmp_path / "runs", "full", 0.60, length=16, used=277)
    assert table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--plot", "none"]) == 0
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "**Note: these runs used different data limits" in markdown
    assert "trainer.limit_train=128, trainer.limit_eval=128 (1 run(s))" in markdown
    assert "trainer.limit_train=all, trainer.limit_eval=all (1 run(s))" in markdown
    splits = [row[1] for row in markdown_rows(markdown)]
    assert "dev (dev-selected: best epoch)" in splits  # the full split's row names no subset
    assert "different trainer.limit_train / limit_eval" in capsys.readouterr().out


def test_a_malformed_evaluated_entry_is_ignored(tmp_path):
    from types import SimpleNamespace

    odd = [{"split": "dev", "examples": "128", "of": 277}, {"split": "dev", "examples": 300, "of": 277}, [1], None]
    for entry in odd:
        run = SimpleNamespace(task="rte", results={"evaluated": {"rte": entry}})
        assert plots.split_text("dev", [run]) == "dev"


def test_a_run_with_a_nan_in_its_history_draws_no_curve():
    from types import SimpleNamespace

    from ptv2.commands.plots import dev_per_epoch

    def run(*scores):
        history = [{"epoch": i + 1, "dev/accuracy": score} for i, score in enumerate(scores)]
        return SimpleNamespace(results={"select_metric": "accuracy", "history": history}, config={})

    assert dev_per_epoch(run(0.5, 0.625)) == [50.0, 62.5]
    assert dev_per_epoch(run(0.5, float("nan"))) is None
