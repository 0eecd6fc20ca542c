"""`ptv2 train prompt=prefix_propagation` end to end on the 2-layer tiny BERT and the RTE fixtures: the trainable count
is P x layers x hidden plus the head; `ptv2 eval` reproduces the best epoch from the checkpoint; `ptv2 predict`
writes predictions; `ptv2 table` lists the run under its method."""

from __future__ import annotations

import json

import pytest
from conftest import RTE, SMOKE, evaluate_and_predict, ptv2

from ptv2.commands import table


def test_train_eval_predict_and_table(tmp_path):
    run = tmp_path / "runs" / "run"
    ptv2(
        "train",
        *SMOKE,
        "logger=none",
        "prompt=prefix_propagation",
        "prompt.length=4",
        "trainer.limit_eval=null",
        f"hydra.run.dir={run}",
    )
    results = json.loads((run / "results.json").read_text())
    length, layers, hidden, labels = 4, 2, 32, 2
    assert results["method"] == "prefix_propagation"
    assert results["trainable_params"] == length * layers * hidden + hidden * labels + labels

    evaluate_and_predict(run, tmp_path)

    assert table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "table"), "--plot", "none"]) == 0
    assert "prefix_propagation" in (tmp_path / "table" / "table.md").read_text()


FIXTURES = RTE.parent
OTHER_HEADS = {
    # the tiny vocabulary is characters plus a few words: label words it holds whole
    "verbalizer": ["task=rte", f"task.data_dir={RTE}", "task.head=verbalizer", "task.options.verbalizer=[is,not]"],
    "tagging": [
        "task=conll03",
        f"task.data_dir={FIXTURES / 'tagging'}",
        *(f"task.files.{split}=conll03_iob1.txt" for split in ("train", "dev", "test")),
    ],
    "span": ["task=squad", f"task.data_dir={FIXTURES / 'squad'}"],
}


@pytest.mark.parametrize("head", list(OTHER_HEADS))
def test_token_level_and_verbalizer_heads_train(head, tmp_path):
    """The heads that read token positions (a mask slot, every token, span ends) read the stripped sequence."""
    run = tmp_path / "run"
    ptv2(
        "train",
        "backbone=tiny",
        "trainer=smoke",
        "logger=none",
        "prompt=prefix_propagation",
        "prompt.length=4",
        *OTHER_HEADS[head],
        f"hydra.run.dir={run}",
    )
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "prefix_propagation" and results["best"]
