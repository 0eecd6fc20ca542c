"""The `ptv2` command end to end on the tiny backbone and the RTE fixture: train, eval, sweeps, W&B offline
files, determinism, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import RTE, SMOKE, ptv2
from safetensors import safe_open


def test_help_lists_commands_and_config_groups():
    assert "train" in ptv2("--help").stdout and "eval" in ptv2("--help").stdout
    help_text = ptv2("train", "--help").stdout
    for group in ("backbone:", "task:", "prompt:", "optimizer:", "scheduler:", "trainer:", "logger:"):
        assert group in help_text
    assert "ptuning_v1" in help_text and "roberta-large" in help_text and "minilm" in help_text


def test_train_writes_results_checkpoint_config_and_log(tmp_path):
    run_dir = tmp_path / "run"
    ptv2("train", *SMOKE, "logger=none", f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "rte" and results["method"] == "ptv2" and results["steps"] == 2
    assert results["best_epoch"] == 1 and 0.0 <= results["best"]["accuracy"] <= 1.0
    assert 0 < results["trainable_params"] < results["total_params"]
    assert results["wall_time_seconds"] > 0 and results["history"][0]["dev/accuracy"] == results["best"]["accuracy"]
    assert "method: ptv2" in (run_dir / "config.yaml").read_text()
    assert "trainable" in (run_dir / "train.log").read_text()
    with safe_open(str(run_dir / "prompt.safetensors"), framework="pt") as checkpoint:
        names = set(checkpoint.keys())
        metadata = checkpoint.metadata()
    assert names == {"prompt.embedding.weight", "heads.rte.linear.weight", "heads.rte.linear.bias"}
    assert metadata["task"] == "rte" and json.loads(metadata["labels"]) == {"rte": ["entailment", "not_entailment"]}

    # ptv2 eval rebuilds the model from the checkpoint alone and reproduces the dev metric of the best epoch.
    eval_dir = tmp_path / "eval"
    ptv2("eval", f"ckpt={run_dir}", f"task.data_dir={RTE}", f"hydra.run.dir={eval_dir}")
    evaluation = json.loads((eval_dir / "eval.json").read_text())
    assert evaluation["metrics"]["accuracy"] == results["best"]["accuracy"]


def test_same_seed_gives_identical_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        ptv2("train", *SMOKE, "logger=none", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / name}")
        history = json.loads((tmp_path / name / "results.json").read_text())["history"]
        runs.append([{k: v for k, v in epoch.items() if not k.endswith("_seconds")} for epoch in history])  # no timings
    assert runs[0] == runs[1] and "dev/accuracy" in runs[0][0]


@pytest.mark.parametrize("method", ["prompt_tuning", "ptuning_v1", "finetune", "linear_probe"])
def test_every_prompt_method_trains(tmp_path, method):
    ptv2("train", *SMOKE, "logger=none", f"prompt={method}", f"hydra.run.dir={tmp_path}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == method and results["steps"] == 2
    if method == "finetune":
        assert results["trainable_params"] == results["total_params"]


def test_multirun_sweeps_prompt_length(tmp_path):
    ptv2("train", "-m", *SMOKE, "logger=none", "prompt.length=2,4", f"hydra.sweep.dir={tmp_path}")
    lengths = sorted(
        json.loads((job / "results.json").read_text())["trainable_params"]
        for job in tmp_path.iterdir()
        if job.is_dir() and (job / "results.json").exists()
    )
    assert len(lengths) == 2 and lengths[0] < lengths[1]


def _wandb_history(path: Path) -> list[dict]:
    """The metric rows logged in an offline W&B run file."""
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
        for record in _wandb_records(path, "history")
    ]


def _wandb_payloads(path: Path) -> list[bytes]:
    """The serialized records of an offline W&B run file.

    The file is a 7-byte W&B header followed by LevelDB-style log blocks of 32 KiB: records with a 7-byte header
    (checksum 4, length 2, type 1: full / first / middle / last) carrying serialized `Record` protobufs.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, payloads, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # block trailer padding
            position += left_in_block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    return payloads


def _wandb_records(path: Path, kind: str) -> list:
    """The `Record` protobufs of one type ('run', 'history', ...) in an offline W&B run file."""
    return [r for r in _parse_records(_wandb_payloads(path)) if r.WhichOneof("record_type") == kind]


def _parse_records(payloads: list[bytes]) -> list:
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


@pytest.mark.parametrize(
    "overrides",
    [
        ["prompt.length=1,4,16", "optimizer.lr=1e-3,1e-2"],
        ["prompt.length=range(2,5)", "trainer.epochs=1", "prompt.length=3,5", "+backbone.dropout=0.0,0.1"],
        ["task=rte,cb", "prompt=ptv2,lora", "seed=choice(1,2)"],
    ],
)
def test_the_sweep_expansion_equals_hydras_basic_sweeper(overrides):
    """command_line.expanded_sweep uses only Hydra's public override API; Hydra's own BasicSweeper is the reference."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ptv2.command_line import expanded_sweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    reference = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert expanded_sweep("train", overrides) == reference


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("task=rtee", "task=rtee is unknown; did you mean rte?"),
        ("backbone=roberta-larg", "backbone=roberta-larg is unknown; did you mean roberta-large or roberta-base?"),
    ],
)
def test_a_misspelt_option_gets_the_close_names(override, line, tmp_path):
    result = ptv2("train", override, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ptv2: error: {line}; `ptv2 train --help` lists the options"


def test_a_sweep_over_a_missing_data_folder_starts_no_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["backbone=tiny", "trainer=smoke", "logger=none", "task.data_dir=DIR/RTE", "prompt.length=1,4"]
    result = ptv2("train", "-m", *args, f"hydra.sweep.dir={sweep}", check=False)
    assert result.returncode == 2 and not sweep.exists()
    assert result.stderr.strip().endswith(
        "task.data_dir=DIR/RTE is not a directory: pass the folder that holds the task's files; no job was started"
    )
