"""Sweeps, experiments and `ptv2 table`: a prompt-length sweep with a failing job becomes a table, CSV and plot;
the collector aggregates seeds and sets references beside cells; sweep jobs share one W&B group; the SMOKE
`make reproduce-table` pipeline runs offline; experiment configs compose."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SMOKE, markdown_rows, ptv2, ptv2_subprocess
from test_cli import _wandb_history, _wandb_records

from ptv2.commands import table
from ptv2.runs.session import objective

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_prompt_length_sweep_gives_table_csv_plot_and_lists_the_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    # A prompt of 20 with 500 tokens needs more positions than the backbone has: refused when its job starts (the
    # backbone's config is read then), that job alone fails, the others are kept, ptv2 exits 1. (A value out of range
    # for every backbone, prompt.length=0, refuses the whole sweep before any job starts: test_first_hour.)
    over = ["prompt.shift_positions=true", "task.max_length=500"]
    result = ptv2(
        "train", "-m", *SMOKE, "logger=none", *over, "prompt.length=20,2,4,8", f"hydra.sweep.dir={sweep}", check=False
    )
    assert result.returncode == 1 and (sweep / "0" / "FAILED").exists()

    out = tmp_path / "table"
    assert table.main([str(sweep), "--out", str(out)]) == 0
    rows = read_csv(out / "table.csv")
    assert [row["prompt.length"] for row in rows] == ["2", "4", "8"]  # sorted by value, one row per config
    for row in rows:
        assert row["task"] == "rte" and row["split"] == "dev" and row["metric"] == "accuracy"
        assert 0.0 <= float(row["ptv2/tiny mean"]) <= 100.0 and row["ptv2/tiny n"] == "1"
    scores = {r["prompt.length"]: float(r["score"]) for r in read_csv(out / "runs.csv")}
    for length, row in zip(("2", "4", "8"), rows, strict=True):  # the score is results.json's best dev value
        job = next(
            j
            for j in sweep.iterdir()
            if (j / "config.yaml").exists()
            and f"length: {length}\n" in (j / "config.yaml").read_text()
            and (j / "results.json").exists()
        )
        assert scores[length] == pytest.approx(100 * json.loads((job / "results.json").read_text())["best_value"])
        assert float(row["ptv2/tiny mean"]) == pytest.approx(scores[length])

    plots = json.loads((out / "plots.json").read_text())
    assert [p["kind"] for p in plots] == ["length"]
    assert [x for x, _, _ in plots[0]["series"]["rte ptv2/tiny"]] == [2, 4, 8]
    assert (out / "plot_prompt_length.png").read_bytes()[:4] == b"\x89PNG"

    markdown = (out / "table.md").read_text()
    assert "best dev epoch" in markdown
    assert ["task", "split", "metric", "prompt.length", "ptv2 / tiny"] in markdown_rows(markdown)
    failures = markdown.split("## Failures (1)")[1]
    assert "`0`" in failures and "prompt.length=20" in failures and "needs 520 positions" in failures


def fake_run(
    root: Path,
    name: str,
    *,
    score: float,
    seed: int,
    task="rte",
    backbone="roberta-large",
    lr=5e-3,
    test=None,
    task_type="classification",
    metric="accuracy",
) -> None:
    """A job folder as `ptv2 train` leaves it: results.json and the resolved config.yaml."""
    job = root / name
    job.mkdir(parents=True)
    results = {
        "task": task,
        "backbone": backbone,
        "method": "ptv2",
        "select_metric": metric,
        "best_epoch": 3,
        "best": {metric: score},
        "best_value": score,
        "trainable_percent": 0.1,
    }
    if test is not None:
        results["test_at_best"] = {metric: test}
    config = {
        "task": {"name": task, "type": task_type, "eval_split": "dev", "test_split": "test" if test else None},
        "trainer": {"seed": seed, "progress": True},
        "optimizer": {"lr": lr},
        "logger": {"group": name},
    }
    (job / "results.json").write_text(json.dumps(results))
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "train.log").write_text("...\n")


def test_collector_aggregates_seeds_uses_test_at_best_and_sets_references(tmp_path):
    runs = tmp_path / "runs"
    for seed, score in ((1, 0.80), (2, 0.84), (3, 0.88)):  # one config, three seeds (logger differs: ignored)
        fake_run(runs, f"rte-{seed}", score=score, seed=seed)
    fake_run(runs, "conll03", task="conll03", score=0.95, test=0.90, seed=1, metric="f1", lr=3e-2)
    fake_run(runs, "squad", task="squad", task_type="span", score=93.0, seed=1, metric="f1")
    crashed = runs / "crashed"  # a job killed before writing results.json
    crashed.mkdir()
    (crashed / "config.yaml").write_text("{}")
    (crashed / "train.log").write_text("[INFO] epoch 1\n")

    out = tmp_path / "out"
    assert table.main([str(runs), "--out", str(out), "--plot", "none"]) == 0
    rows = {row["task"]: row for row in read_csv(out / "table.csv")}
    assert set(rows) == {"rte", "conll03", "squad"}  # lr differs only across tasks: not a row key
    rte = rows["rte"]
    assert float(rte["ptv2/roberta-large mean"]) == pytest.approx(84.0)
    assert float(rte["ptv2/roberta-large std"]) == pytest.approx(4.0) and rte["ptv2/roberta-large n"] == "3"
    assert float(rte["ptv2/roberta-large reference"]) == 86.6  # THUDM README, RoBERTa-large RTE
    assert float(rte["ptv2/roberta-large delta"]) == pytest.approx(84.0 - 86.6)
    conll = rows["conll03"]  # tagging: the test score at the best dev epoch, against the README's test f1
    assert conll["split"] == "test" and float(conll["ptv2/roberta-large mean"]) == pytest.approx(90.0)
    assert float(conll["ptv2/roberta-large reference"]) == 91.8
    assert float(rows["squad"]["ptv2/roberta-large mean"]) == pytest.approx(93.0)  # already percent: not scaled
    markdown = (out / "table.md").read_text()
    assert "84.0 ± 4.0 (n=3) · ref 86.6 (Δ -2.6)" in markdown and "thudm-readme-roberta" in markdown
    assert "`crashed`" in markdown and "no results.json" in markdown


def test_every_reference_has_a_source_and_bad_input_is_one_line(tmp_path, capsys):
    references, sources = table.load_references(table.REFERENCES)
    assert len(references) >= 20 and all(entry["source"] in sources for entry in references)
    assert table.main([str(tmp_path / "missing")]) == 2
    assert table.main([str(tmp_path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"ptv2: error: {tmp_path / 'missing'} is not a folder",
        f"ptv2: error: no results.json under {tmp_path}",
    ]


def test_a_job_returns_its_dev_value_for_optimizing_sweepers():
    assert objective({"best_value": 0.75, "history": []}) == 0.75
    assert objective(None) is None and objective({"metrics": 1}) == {"metrics": 1}


def test_sweep_jobs_go_offline_without_login_as_wandb_runs_of_one_group_with_overrides_and_metrics(tmp_path):
    """No W&B login (a HOME without ~/.netrc, no WANDB_API_KEY): every job logs offline."""
    sweep = tmp_path / "multirun" / "rte" / "tiny" / "now"
    done = ptv2_subprocess(
        "train", "-m", *SMOKE, "logger=wandb", "prompt.length=2,4", f"hydra.sweep.dir={sweep}", home=tmp_path
    )
    folders = sorted(sweep.glob("*/wandb/offline-run-*"))
    for folder in folders:
        assert f"W&B offline run written to {folder}; upload it with: wandb sync {folder}" in done.stdout
    files = [next(folder.glob("*.wandb")) for folder in folders]
    runs = [_wandb_records(file, "run")[0].run for file in files]
    assert len(runs) == 2
    for history in map(_wandb_history, files):
        assert any("dev/accuracy" in row for row in history) and any("train_loss" in row for row in history)
    assert {run.run_group for run in runs} == {"rte/tiny/now"}  # the sweep folder below multirun/
    assert {run.job_type for run in runs} == {"sweep-job"}
    overrides = []
    for run in runs:
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        overrides.append(next(o for o in config["overrides"] if o.startswith("prompt.length")))
    assert sorted(overrides) == ["prompt.length=2", "prompt.length=4"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_a_group_and_sweep_params(name):
    config = yaml.safe_load((ROOT / "conf" / "experiment" / f"{name}.yaml").read_text())
    assert config["logger"]["group"] and config["hydra"]["sweeper"]["params"]
    header = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_" and any(f"experiment={name}" in line for line in header)


def test_optuna_experiment_maximizes_the_returned_dev_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    ptv2(
        "train",
        "-m",
        "experiment=optuna_lr",
        *SMOKE,
        "logger=none",
        "hydra.sweeper.n_trials=2",
        "trainer.save_checkpoint=false",
        f"hydra.sweep.dir={sweep}",
    )
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and 0.0 <= best["best_value"] <= 1.0
    assert set(best["best_params"]) == {"optimizer.lr", "prompt.length"}


def test_an_optuna_sweep_whose_every_trial_fails_ends_with_the_failures_not_a_traceback(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    args = ["experiment=optuna_lr", "backbone=tiny", "trainer=smoke", "logger=none", "hydra.sweeper.n_trials=2"]
    result = ptv2("train", "-m", *args, f"task.data_dir={tmp_path / 'absent'}", f"hydra.sweep.dir={sweep}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == f"ptv2: 2 job(s) failed: job 0 ({sweep / '0'}); job 1 ({sweep / '1'})"
    )


@pytest.mark.slow
def test_make_reproduce_table_smoke_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "table"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run(
        [
            "make",
            "reproduce-table",
            "TABLE=prompt-length",
            "SMOKE=1",
            f"TABLE_DIR={out}",
            f"BIN={Path(sys.executable).parent}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "HOME": str(tmp_path)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "table.csv")
    assert [row["prompt.length"] for row in rows] == ["1", "2", "4"]
    assert (out / "plot_prompt_length.png").exists() and "## Failures (0)" in (out / "table.md").read_text()


def test_table_takes_logger_out_of_habit_and_refuses_other_run_settings(tmp_path, capsys):
    """`ptv2 table DIR logger=none` (the habit from `ptv2 train`) works; `logger=wandb` means --wandb; any other
    `key=value` is one line naming it, exit 2; a folder whose name holds '=' is still a folder."""
    assert table.parse_args([str(tmp_path), "logger=none"]).wandb is False
    assert table.parse_args([str(tmp_path), "logger=wandb"]).wandb is True
    with pytest.raises(SystemExit) as exit_info:
        table.parse_args([str(tmp_path), "task=rte"])
    assert exit_info.value.code == 2
    assert "task=rte is a run setting" in capsys.readouterr().err
    folder = tmp_path / "lr=0.01"
    folder.mkdir()
    assert table.parse_args([str(folder)]).dir == folder
