"""A classification dataset added as one YAML file (conf/task/mini_nli.yaml) read by the generic text_pairs reader:
its examples, and a training run through the CLI end to end on the tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ptv2, task_yaml
from omegaconf import OmegaConf

from ptv2.data import text_pairs
from ptv2.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "mini_nli"


def mini_nli(**changes):
    task = task_yaml("mini_nli")
    task.data_dir = str(FIXTURE)
    return OmegaConf.merge(task, changes)


def test_fields_named_in_the_yaml_become_canonical_examples():
    train = text_pairs.load(mini_nli(), "train")
    assert len(train) == 18 and len(text_pairs.load(mini_nli(), "dev")) == 6
    assert train[1] == {
        "idx": 1,
        "text_a": "A woman is riding a bicycle down the hill.",
        "text_b": "The woman is asleep in bed.",
        "label": 2,  # contradiction: the third of task.labels
    }
    assert sorted({example["label"] for example in train}) == [0, 1, 2]


def test_unlabelled_test_lines_and_unknown_labels(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"premise": "A cat sleeps.", "hypothesis": "An animal rests."}\n')
    (tmp_path / "dev.jsonl").write_text('{"premise": "A", "hypothesis": "B", "gold": "maybe"}\n')
    task = mini_nli(data_dir=str(tmp_path))
    assert text_pairs.load(task, "test") == [
        {"idx": 0, "text_a": "A cat sleeps.", "text_b": "An animal rests.", "label": -1}
    ]
    with pytest.raises(UserError, match=r"dev.jsonl:1: unknown label 'maybe'"):
        text_pairs.load(task, "dev")


def test_mini_nli_trains_and_predicts_through_the_cli(tmp_path):
    run = tmp_path / "run"
    data = f"task.data_dir={FIXTURE}"
    ptv2("train", "task=mini_nli", data, "backbone=tiny", "trainer=smoke", "logger=none", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "mini_nli" and results["select_metric"] == "accuracy" and results["steps"] == 2
    right = results["best"]["accuracy"] * 6  # a fraction of the 6 dev pairs
    assert right == pytest.approx(round(right))
    out = tmp_path / "predictions"
    ptv2("predict", f"ckpt={run}", "split=dev", data, f"output_dir={out}")
    lines = [json.loads(line) for line in (out / "mini_nli-dev.jsonl").read_text().splitlines()]
    assert [line["idx"] for line in lines] == list(range(6))
    assert {line["label"] for line in lines} <= {"entailment", "neutral", "contradiction"}
