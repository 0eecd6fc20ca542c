"""The span task type (SQuAD 1.1 / 2.0): encoding for training and evaluation at once, collation, metrics and
prediction files on hand-made logits, and `ptv2 train` end to end for squad, squad_v2 and the QA multi-task."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import ptv2
from omegaconf import OmegaConf

from ptv2.data import Split, squad
from ptv2.errors import UserError
from ptv2.tasks import span

SQUAD = Path(__file__).parent / "fixtures" / "squad"
SMOKE = ["backbone=tiny", "trainer=smoke", "logger=none"]


def task(version_2=False, max_length=384, stride=128, name="squad"):
    options = {"stride": stride, "n_best": 20, "max_answer_length": 30, "version_2": version_2}
    return OmegaConf.create({"name": name, "max_length": max_length, "options": options})


# ---------------------------------------------------------------------------------------------------- encoding


def test_every_feature_has_targets_and_offsets(tiny_tokenizer):
    examples = squad.read_official(SQUAD / "train-v2.0.json")
    rows = {key: [e[key] for e in examples] for key in examples[0]}
    features = span.encode(rows, tiny_tokenizer, task(max_length=96, stride=32))
    assert {"start_positions", "end_positions", "example_id", "offset_mapping", "input_ids"} <= set(features)
    assert len(features["input_ids"]) > len(examples)  # 96 characters per window: long contexts are cut

    by_id = {e["id"]: e for e in examples}
    located = set()
    for qid, offsets, start, end in zip(
        features["example_id"],
        features["offset_mapping"],
        features["start_positions"],
        features["end_positions"],
        strict=True,
    ):
        answers = by_id[qid]["answers"]
        if start == end == 0:  # CLS: no answer in this window (or none at all)
            continue
        # the targets sit on context tokens and cover exactly the first gold answer's characters
        assert offsets[start] is not None and offsets[end] is not None
        assert by_id[qid]["context"][offsets[start][0] : offsets[end][1]] == answers["text"][0]
        located.add(qid)
    answerable = {qid for qid, e in by_id.items() if e["answers"]["text"]}
    assert located == answerable  # every answer is found in some window; unanswerable ones never are


def test_too_small_windows_for_the_stride_are_a_user_error(tiny_tokenizer):
    rows = {"id": ["a"], "question": ["  Why?"], "context": ["Because."], "answers": [{"text": [], "answer_start": []}]}
    # 24 - 3 special tokens - 4 question characters = 17 context tokens per window: a stride of 17 cannot fit
    with pytest.raises(UserError, match="leaves 17 next to a question of 4 tokens"):
        span.encode({**rows, "title": [""]}, tiny_tokenizer, task(max_length=24, stride=17))
    assert span.encode({**rows, "title": [""]}, tiny_tokenizer, task(max_length=24, stride=16))["input_ids"]


def test_collate_passes_model_inputs_and_targets_only(tiny_tokenizer):
    features = [
        {"input_ids": [2, 10, 3, 11, 12, 3], "token_type_ids": [0, 0, 0, 1, 1, 1], "attention_mask": [1] * 6,
         "start_positions": 3, "end_positions": 4, "example_id": "a", "offset_mapping": [None] * 3 + [[0, 1]] * 3},
        {"input_ids": [2, 10, 3, 11], "token_type_ids": [0, 0, 0, 1], "attention_mask": [1] * 4,
         "start_positions": 0, "end_positions": 0, "example_id": "b", "offset_mapping": [None] * 3 + [[0, 1]]},
    ]  # fmt: skip
    batch = span.collate(features, tiny_tokenizer)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    assert batch["input_ids"].tolist() == [[2, 10, 3, 11, 12, 3], [2, 10, 3, 11, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert batch["start_positions"].tolist() == [3, 0] and batch["end_positions"].tolist() == [4, 0]


# ---------------------------------------------------------------------------- metrics and files on hand-made logits

CONTEXT = "Warsaw is on the Vistula River."
# [CLS] question [SEP] Warsaw is on the Vistula River . [SEP]
OFFSETS = [None, None, None, [0, 6], [7, 9], [10, 12], [13, 16], [17, 24], [25, 30], [30, 31], None]


def logits(start: dict[int, float], end: dict[int, float], padded_to: int = 13) -> np.ndarray:
    """(padded_to, 2) logits of one feature; positions past its 11 tokens hold 99, which trimming must ignore."""
    row = np.zeros((padded_to, 2), dtype=np.float32)
    row[len(OFFSETS) :] = 99.0
    for position, value in start.items():
        row[position, 0] = value
    for position, value in end.items():
        row[position, 1] = value
    return row


def synthetic_split(q2_answerable: bool) -> tuple[Split, list[np.ndarray]]:
    """Three questions on one context, one window each:
    q1 -> span 7..8 "Vistula River" (score 5 + 4 = 9), null 1 + 0.5: odds -7.5;
    q2 -> span 3..3 "Warsaw" (3 + 2 = 5), null 6 + 4 = 10: odds +5 (the null answer under 2.0 rules);
    q3 -> span 8..8 "River" (3 + 3 = 6), null 0: odds -6."""
    golds = {"q1": ["Vistula River"], "q2": ["Warsaw"] if q2_answerable else [], "q3": ["the Vistula River"]}
    examples = [
        {"id": qid, "title": "T", "question": "?", "context": CONTEXT,
         "answers": {"text": texts, "answer_start": [CONTEXT.index(t) for t in texts]}}
        for qid, texts in golds.items()
    ]  # fmt: skip
    features = datasets.Dataset.from_list(
        [{"input_ids": [1] * len(OFFSETS), "example_id": qid, "offset_mapping": OFFSETS} for qid in golds]
    )
    outputs = [
        logits({0: 1.0, 7: 5.0, 3: 2.0}, {0: 0.5, 8: 4.0, 9: 1.0}),
        logits({0: 6.0, 3: 3.0}, {0: 4.0, 3: 2.0}),
        logits({8: 3.0}, {8: 3.0}),
    ]
    return Split("dev", examples, features), outputs


def test_v1_metrics_by_hand():
    split, outputs = synthetic_split(q2_answerable=True)
    scores = span.metrics(task(), split, outputs)
    # q1 and q2 exact; q3 "River" vs "the Vistula River": P 1, R 1/2, F1 2/3
    assert set(scores) == {"exact_match", "f1"}
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)


def test_v2_metrics_by_hand():
    split, outputs = synthetic_split(q2_answerable=False)
    scores = span.metrics(task(version_2=True), split, outputs)
    assert scores["exact_match"] == pytest.approx(200 / 3)  # q2 correctly left unanswered
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
    assert scores["HasAns_exact"] == pytest.approx(50.0) and scores["HasAns_f1"] == pytest.approx(100 * 5 / 6)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(100.0)
    # threshold search in increasing odds: start at 1 (q2 blank); q1 (-7.5) +1 -> 2; q3 (-6) +2/3 F1, +0 exact
    assert scores["best_f1"] == pytest.approx(100 * (2 + 2 / 3) / 3) and scores["best_f1_thresh"] == pytest.approx(-6)
    assert scores["best_exact"] == pytest.approx(200 / 3) and scores["best_exact_thresh"] == pytest.approx(-7.5)


def test_write_predictions_gives_the_official_files(tmp_path):
    split, outputs = synthetic_split(q2_answerable=False)
    written = span.write_predictions(task(version_2=True, name="squad_v2"), split, outputs, tmp_path)
    assert [p.name for p in written] == ["squad_v2-dev-predictions.json", "squad_v2-dev-null_odds.json"]
    assert json.loads(written[0].read_text()) == {"q1": "Vistula River", "q2": "", "q3": "River"}
    assert json.loads(written[1].read_text()) == pytest.approx({"q1": -7.5, "q2": 5.0, "q3": -6.0})

    split, outputs = synthetic_split(q2_answerable=True)
    written = span.write_predictions(task(), split, outputs, tmp_path / "v1")
    assert [p.name for p in written] == ["squad-dev-predictions.json"]  # 1.1: no null odds, always a span
    assert json.loads(written[0].read_text()) == {"q1": "Vistula River", "q2": "Warsaw", "q3": "River"}


def test_outputs_keep_both_logits_per_token():
    logits_in = torch.randn(2, 5, 2, dtype=torch.bfloat16)
    out = span.outputs(logits_in, {})
    assert out.shape == (2, 5, 2) and out.dtype == torch.float32


# --------------------------------------------------------------------------------------------- ptv2 end to end


def test_train_squad_then_eval_reproduces_the_best_scores(tmp_path):
    run = tmp_path / "run"
    # finetune: the checkpoint holds the whole (randomly initialised) tiny encoder, so eval rebuilds the same model
    ptv2("train", "task=squad", *SMOKE, "prompt=finetune", f"task.data_dir={SQUAD}", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "squad" and results["select_metric"] == "f1"
    assert set(results["best"]) == {"exact_match", "f1"}
    assert 0.0 <= results["best"]["exact_match"] <= results["best"]["f1"] <= 100.0
    assert results["train_examples"] == {"squad": 4} and results["steps"] == 1  # 4 questions, batches of 4

    ptv2("eval", f"ckpt={run}", f"task.data_dir={SQUAD}", f"hydra.run.dir={tmp_path / 'eval'}")
    evaluation = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluation["metrics"] == pytest.approx(results["best"])


def test_train_squad_v2_with_many_windows(tmp_path):
    # 128 characters per window and a stride of 32: the fixture's contexts (up to 196 characters) are cut
    ptv2(
        "train", "task=squad_v2", *SMOKE, f"task.data_dir={SQUAD}", "task.max_length=128", "task.options.stride=32",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    best = results["best"]
    assert {"exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"} <= set(best)
    assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"} <= set(best)
    assert best["best_f1"] >= best["f1"] and results["best_value"] == best["f1"]
    # the dev fixture: one answerable and one unanswerable question, so f1 is the mean of the two groups
    assert best["f1"] == pytest.approx((best["HasAns_f1"] + best["NoAns_f1"]) / 2)


def test_qa_multi_task_trains_one_prompt_with_two_heads(tmp_path):
    ptv2(
        "train", "task=qa_multi", *SMOKE, f"task.members.squad.data_dir={SQUAD}",
        f"task.members.squad_v2.data_dir={SQUAD}", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["select_metric"] == {"squad": "f1", "squad_v2": "f1"}
    assert results["train_examples"] == {"squad": 4, "squad_v2": 4} and results["steps"] == 2
    assert set(results["best"]["squad"]) == {"exact_match", "f1"}  # 1.1 protocol for the 1.1 member
    assert "NoAns_f1" in results["best"]["squad_v2"]
    f1_scores = [results["best"][name]["f1"] for name in ("squad", "squad_v2")]
    assert results["best_value"] == pytest.approx(sum(f1_scores) / 2)  # best epoch: the mean of the two dev f1
    config = OmegaConf.load(tmp_path / "config.yaml")
    assert config.task.members.squad.options.version_2 is False and config.task.members.squad_v2.options.version_2


# ------------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.realdata
def test_real_dev_round_trip_with_oracle_logits(shared_data, minilm_path):
    """Real SQuAD 1.1 dev questions through the real MiniLM tokenizer: logits that put all their mass on each
    window's targets must come back, through window aggregation and the official metric, as the gold answers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    examples = squad.read_official(shared_data / "squad_v1.1" / "dev-v1.1.json")[:1500]
    rows = {key: [e[key] for e in examples] for key in examples[0]}
    config = task(max_length=192, stride=64)  # short windows: many contexts are cut
    features = span.encode(rows, tokenizer, config)
    assert len(features["input_ids"]) > 1.2 * len(examples)

    outputs = []
    targets = zip(features["input_ids"], features["start_positions"], features["end_positions"], strict=True)
    for ids, start, end in targets:
        row = np.zeros((len(ids), 2), dtype=np.float32)
        row[start, 0] = row[end, 1] = 10.0  # windows without the answer put it on [CLS], which 1.1 never reads
        outputs.append(row)
    split = Split("dev", examples, datasets.Dataset.from_dict(features))
    predictions, _ = span.answers(config, split, outputs)
    missed = [e for e in examples if predictions[e["id"]] not in e["answers"]["text"]]
    # An answer that starts or ends inside a word piece ("5" of "50", "wards" of "backwards") comes back as the
    # whole pieces that hold it; every other answer comes back exactly.
    assert all(e["answers"]["text"][0] in predictions[e["id"]] for e in missed)
    assert len(missed) < 0.02 * len(examples)
    scores = span.metrics(config, split, outputs)
    exact = len(examples) - len(missed)  # a miss may still match another gold answer after normalisation
    assert scores["exact_match"] >= 100 * exact / len(examples) - 1e-9
