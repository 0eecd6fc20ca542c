"""SuperGLUE readers (official files and hub rows), metrics and leaderboard files, on tiny offline fixtures.

The fixtures under tests/fixtures/superglue/<TASK>/ are in the official distribution's jsonl format; the *_HUB row
lists below are the same val examples as the `super_glue` hub card stores them (flat, integer labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SUPERGLUE_FOLDERS, task_yaml
from omegaconf import OmegaConf

from ptv2.data import files
from ptv2.data.superglue import LABELS, SUBMISSION_NAMES, hub_examples, load, write_submission
from ptv2.errors import UserError
from ptv2.metrics.squad import normalize_answer
from ptv2.metrics.superglue import macro_f1, superglue_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
FOLDERS = SUPERGLUE_FOLDERS


def config(name: str, data_dir: str | None = "fixtures", template: str | None = None):
    """A task config as the core passes it (an OmegaConf DictConfig)."""
    return OmegaConf.create(
        {
            "name": name,
            "data_dir": str(FIXTURES / FOLDERS[name]) if data_dir == "fixtures" else data_dir,
            "files": {"train": "train.jsonl", "dev": "val.jsonl", "test": "test.jsonl"},
            "hub": dict(task_yaml(name).hub),
            "hub_splits": {"train": "train", "dev": "validation", "test": "test"},
            "labels": LABELS[name],
            "options": {"template": template} if template else {},
        }
    )


def hub(name: str, rows: list[dict], template: str | None = None, labelled: bool = True) -> list[dict]:
    return hub_examples(name, rows, LABELS[name], {"template": template} if template else {}, labelled)


def meta(example: dict) -> dict:
    return json.loads(example["meta"])


# ------------------------------------------------------------------------------------------- hub rows (val split)

RTE_HUB = [
    {
        "premise": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
        "hypothesis": "Christopher Reeve had an accident.",
        "idx": 0,
        "label": 1,
    },
    {
        "premise": "Yet, we now are discovering that antibiotics are losing their effectiveness against illness.",
        "hypothesis": "Bacteria is winning the war against antibiotics.",
        "idx": 1,
        "label": 0,
    },
]
CB_HUB = [
    {
        "premise": (
            "Valence the void-brain. Why couldn't the figger choose his own portion of titanic anatomy to shaft?"
        ),
        "hypothesis": "Valence was helping",
        "idx": 0,
        "label": 1,
    },
    {
        "premise": "``Who knows? The point is, do we go with it or not?'' Do we assume there is a shipment?",
        "hypothesis": "there is a shipment",
        "idx": 1,
        "label": 2,
    },
    {
        "premise": "But a few minutes later he realized that the man was not dead.",
        "hypothesis": "the man was not dead",
        "idx": 2,
        "label": 0,
    },
]
BOOLQ_HUB = [
    {
        "question": "does ethanol take more energy make that produces",
        "passage": "Ethanol fuel -- All biomass goes through at least some of these steps.",
        "idx": 0,
        "label": 0,
    },
    {
        "question": "is house tax and property tax are same",
        "passage": (
            "Property tax -- Property tax or 'house tax' is a local tax on buildings, along with appurtenant land."
        ),
        "idx": 1,
        "label": 1,
    },
]
COPA_HUB = [
    {
        "premise": "The man turned on the faucet.",
        "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.",
        "question": "effect",
        "idx": 0,
        "label": 1,
    },
    {
        "premise": "The girl found a bug in her cereal.",
        "choice1": "She poured milk in the bowl.",
        "choice2": "She lost her appetite.",
        "question": "effect",
        "idx": 1,
        "label": 1,
    },
    {
        "premise": "The woman retired.",
        "choice1": "She received her pension.",
        "choice2": "She paid off her mortgage.",
        "question": "cause",
        "idx": 2,
        "label": 0,
    },
]
WIC_HUB = [
    {
        "word": "board",
        "sentence1": "Room and board .",
        "sentence2": "He nailed boards across the windows .",
        "start1": 9,
        "start2": 10,
        "end1": 14,
        "end2": 16,
        "idx": 0,
        "label": 0,
    },
    {
        "word": "circulate",
        "sentence1": "Circulate a rumor .",
        "sentence2": "This letter is being circulated among the faculty .",
        "start1": 0,
        "start2": 21,
        "end1": 9,
        "end2": 31,
        "idx": 1,
        "label": 1,
    },
]
TROPHY = "The trophy doesn't fit into the brown suitcase because it is too large."
WSC_HUB = [
    {
        "text": TROPHY,
        "span1_index": 5,
        "span2_index": 9,
        "span1_text": "the brown suitcase",
        "span2_text": "it",
        "idx": 0,
        "label": 0,
    },
    {
        "text": TROPHY,
        "span1_index": 0,
        "span2_index": 9,
        "span1_text": "The trophy",
        "span2_text": "it",
        "idx": 1,
        "label": 1,
    },
]
SUSAN = (
    "<b>Sent 1: </b>Susan wanted to have a birthday party.<br><b>Sent 2: </b>She called all of her friends.<br>"
    "<b>Sent 3: </b>One friend, Sam, was sick.<br>"
)
RAIN = "<b>Sent 1: </b>The rain fell for three days.<br><b>Sent 2: </b>The river rose over its banks.<br>"


def _multirc_row(paragraph, question, answer, p, q, a, label):
    return {
        "paragraph": paragraph,
        "question": question,
        "answer": answer,
        "idx": {"paragraph": p, "question": q, "answer": a},
        "label": label,
    }


MULTIRC_HUB = [
    _multirc_row(SUSAN, "What did Susan want?", "A birthday party", 0, 0, 0, 1),
    _multirc_row(SUSAN, "What did Susan want?", "A party", 0, 0, 1, 1),
    _multirc_row(SUSAN, "What did Susan want?", "A bike", 0, 0, 2, 0),
    _multirc_row(SUSAN, "Who was sick?", "Sam", 0, 1, 3, 1),
    _multirc_row(SUSAN, "Who was sick?", "Susan", 0, 1, 4, 0),
    _multirc_row(RAIN, "How long did it rain?", "Three days", 1, 2, 5, 1),
    _multirc_row(RAIN, "How long did it rain?", "One week", 1, 2, 6, 0),
]
EIFFEL = (
    "The Eiffel Tower was repainted in Paris this spring, said Gustave Eiffel's heirs.\n"
    "@highlight\nParis tower gets a new coat of paint\n@highlight\nThe landmark is 135 years old"
)
# The hub keeps the passage's unique entity texts in no fixed order (a Python set) and spans end-exclusive.
EIFFEL_SPANS = {
    "text": ["Eiffel Tower", "Paris", "Gustave Eiffel", "Paris"],
    "start": [4, 34, 58, 93],
    "end": [16, 39, 72, 98],
}
RECORD_HUB = [
    {
        "passage": EIFFEL,
        "query": "Tourists queued to climb the @placeholder on Sunday.",
        "entities": ["Paris", "Gustave Eiffel", "Eiffel Tower"],
        "entity_spans": EIFFEL_SPANS,
        "answers": ["Eiffel Tower"],
        "idx": {"passage": 0, "query": 0},
    },
    {
        "passage": EIFFEL,
        "query": "@placeholder will host the next summer games.",
        "entities": ["Gustave Eiffel", "Eiffel Tower", "Paris"],
        "entity_spans": EIFFEL_SPANS,
        "answers": ["Paris"],
        "idx": {"passage": 0, "query": 1},
    },
]
HUB_VAL = {
    "boolq": BOOLQ_HUB,
    "cb": CB_HUB,
    "copa": COPA_HUB,
    "multirc": MULTIRC_HUB,
    "record": RECORD_HUB,
    "rte": RTE_HUB,
    "wic": WIC_HUB,
    "wsc": WSC_HUB,
}


# ----------------------------------------------------------------------------------------- both sources agree


@pytest.mark.parametrize(
    ("name", "template"),
    [(name, None) for name in FOLDERS] + [("wic", "word_prefix"), ("wsc", "mark_pronoun")],
)
def test_hub_rows_give_the_same_examples_as_the_official_files(name, template):
    from_files = load(config(name, template=template), "dev")
    from_hub = hub(name, HUB_VAL[name], template)
    assert from_hub == from_files
    assert len(from_files) == {"multirc": 7, "record": 6}.get(name, len(HUB_VAL[name]))


def test_load_reads_hub_rows_when_no_data_dir(monkeypatch):
    calls = []

    def fake_hub(path, name, revision, split):
        calls.append((path, name, revision, split))
        return RTE_HUB

    monkeypatch.setattr(files, "load_hub_split", fake_hub)
    examples = load(config("rte", data_dir=None), "dev")
    assert calls == [("aps/super_glue", "rte", "3de24cf8022e94f4ee4b9d55a6f539891524d646", "validation")]
    assert [e["label"] for e in examples] == [1, 0]


def test_hub_test_rows_are_unlabelled():
    rows = [dict(RTE_HUB[0], label=-1)]
    assert hub("rte", rows, labelled=False)[0]["label"] == -1
    with pytest.raises(UserError, match="row 0: label -1"):
        hub("rte", rows)
    record = [dict(RECORD_HUB[0], answers=[])]
    assert [e["label"] for e in hub("record", record, labelled=False)] == [-1, -1, -1]


# --------------------------------------------------------------------------------------- task by task (files)


def test_rte_cb_boolq_pairs_and_label_ids():
    rte = load(config("rte"), "dev")
    assert rte[0] == {
        "idx": 0,
        "text_a": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
        "text_b": "Christopher Reeve had an accident.",
        "label": 1,
        "group": "0",
        "meta": "{}",
    }
    assert [e["label"] for e in load(config("cb"), "dev")] == [1, 2, 0]
    boolq = load(config("boolq"), "dev")
    assert (boolq[1]["text_a"], boolq[1]["label"]) == ("is house tax and property tax are same", 1)
    assert boolq[1]["text_b"].startswith("Property tax -- ")


def test_test_split_has_no_labels_and_train_loads():
    for name in FOLDERS:
        test = load(config(name), "test")
        assert test and all(e["label"] == -1 for e in test), name
        assert all(e["label"] >= 0 for e in load(config(name), "train")), name


def test_label_order_follows_task_labels():
    cfg = config("rte")
    cfg.labels = ["not_entailment", "entailment"]
    assert [e["label"] for e in load(cfg, "dev")] == [0, 1]


def test_copa_joiner_and_choices():
    copa = load(config("copa"), "dev")
    assert copa[0] == {
        "idx": 0,
        "text_a": "The man turned on the faucet. so",
        "choices": ["The toilet filled with water.", "Water flowed from the spout."],
        "label": 1,
        "group": "0",
        "meta": "{}",
    }
    assert copa[2]["text_a"] == "The woman retired. because"
    assert copa[2]["label"] == 0


def test_wic_templates():
    question = load(config("wic"), "dev")[0]
    assert question["text_a"] == (
        "Room and board . He nailed boards across the windows . Does board have the same meaning in both sentences?"
    )
    assert (question["text_b"], question["label"]) == ("", 0)
    prefix = load(config("wic", template="word_prefix"), "dev")[1]
    assert (prefix["text_a"], prefix["text_b"], prefix["label"]) == (
        "circulate: Circulate a rumor .",
        "circulate: This letter is being circulated among the faculty .",
        1,
    )


def test_wsc_templates():
    prefix = load(config("wsc"), "dev")
    assert (prefix[0]["text_a"], prefix[0]["text_b"], prefix[0]["label"]) == (f"it: {TROPHY}", "the brown suitcase", 0)
    marked = load(config("wsc", template="mark_pronoun"), "dev")[1]
    assert marked["text_a"] == "The trophy doesn't fit into the brown suitcase because *it* is too large."
    assert (marked["text_b"], marked["label"]) == ("The trophy", 1)


def test_multirc_one_example_per_answer():
    examples = load(config("multirc"), "dev")
    assert [e["idx"] for e in examples] == list(range(7))
    assert [e["group"] for e in examples] == ["p0-q0"] * 3 + ["p0-q1"] * 2 + ["p1-q2"] * 2
    assert [e["label"] for e in examples] == [1, 1, 0, 1, 0, 1, 0]
    assert examples[3]["text_a"] == SUSAN
    assert examples[3]["text_b"] == "Who was sick? Sam"
    assert meta(examples[6]) == {"paragraph": 1, "question": 2, "answer": 6}


def test_record_one_example_per_unique_entity():
    examples = load(config("record"), "dev")
    passage = (
        "The Eiffel Tower was repainted in Paris this spring, said Gustave Eiffel's heirs.\n"
        "- Paris tower gets a new coat of paint\n- The landmark is 135 years old"
    )
    assert all(e["text_a"] == passage for e in examples)
    # "Paris" is mentioned twice but is one candidate; candidates sorted
    assert [meta(e)["entity"] for e in examples] == ["Eiffel Tower", "Gustave Eiffel", "Paris"] * 2
    assert [e["label"] for e in examples] == [1, 0, 0, 0, 0, 1]
    assert examples[0]["text_b"] == "Tourists queued to climb the Eiffel Tower on Sunday."
    assert examples[5]["text_b"] == "Paris will host the next summer games."
    assert [e["group"] for e in examples] == ["p0-q0"] * 3 + ["p0-q1"] * 3
    assert meta(examples[5]) == {"passage": 0, "query": 1, "entity": "Paris", "answers": ["Paris"]}
    train = load(config("record"), "train")
    assert [(meta(e)["entity"], e["label"]) for e in train] == [
        ("Inter Miami", 0),
        ("Lionel Messi", 1),
        ("Messi", 1),
        ("Orlando", 0),
    ]


def test_examples_fit_a_datasets_table():
    datasets = pytest.importorskip("datasets")
    for name in FOLDERS:
        for split in ("train", "dev", "test"):
            examples = load(config(name), split)
            assert datasets.Dataset.from_list(examples).num_rows == len(examples)


# ---------------------------------------------------------------------------------------------------- errors


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config(name, data_dir=str(tmp_path))
    return cfg


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0})
    cfg = _write(tmp_path, "rte", [good, "{not json"])
    with pytest.raises(UserError, match=r"val\.jsonl:2: malformed JSON"):
        load(cfg, "dev")


def test_missing_field_names_file_line_and_field(tmp_path):
    good = json.dumps({"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0})
    bad = json.dumps({"premise": "p", "label": "entailment", "idx": 1})
    cfg = _write(tmp_path, "rte", [good, bad])
    with pytest.raises(UserError, match=r"val\.jsonl:2: missing field 'hypothesis'"):
        load(cfg, "dev")


def test_unknown_label_and_missing_label(tmp_path):
    cfg = _write(tmp_path, "cb", [json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 0})])
    with pytest.raises(UserError, match=r"val\.jsonl:1: unknown label 'maybe'"):
        load(cfg, "dev")
    cfg = _write(tmp_path, "boolq", [json.dumps({"question": "q", "passage": "p", "idx": 0})])
    with pytest.raises(UserError, match=r"val\.jsonl:1: missing field 'label'"):
        load(cfg, "dev")


def test_nested_errors_name_the_place(tmp_path):
    record = {
        "idx": 0,
        "passage": {"text": "t", "questions": [{"question": "q", "idx": 0, "answers": [{"text": "a", "idx": 0}]}]},
    }
    cfg = _write(tmp_path, "multirc", [json.dumps(record)])
    with pytest.raises(UserError, match=r"val\.jsonl:1 passage\.questions\[0\]\.answers\[0\]: missing field 'label'"):
        load(cfg, "dev")


def test_bad_options_and_labels():
    with pytest.raises(UserError, match="unknown options.template 'fancy'"):
        load(config("wic", template="fancy"), "dev")
    cfg = config("multirc")
    cfg.labels = ["true", "false"]
    with pytest.raises(UserError, match="task.labels"):
        load(cfg, "dev")
    with pytest.raises(UserError, match="unknown split"):
        load(config("rte"), "validation")


# --------------------------------------------------------------------------------------------------- metrics


def _logits(predicted: list[int], classes: int = 2) -> np.ndarray:
    """One-hot-ish logits whose argmax is `predicted`."""
    scores = np.zeros((len(predicted), classes))
    scores[np.arange(len(predicted)), predicted] = 1.0
    return scores


def test_accuracy_tasks():
    rte = load(config("rte"), "dev")  # golds [1, 0]
    assert superglue_metrics("rte", rte, _logits([1, 1])) == {"accuracy": 0.5}
    copa = load(config("copa"), "dev")  # golds [1, 1, 0]
    assert superglue_metrics("copa", copa, np.array([[0.1, 0.9], [0.8, 0.2], [2.0, -1.0]])) == {
        "accuracy": pytest.approx(2 / 3)
    }


def test_cb_macro_f1_by_hand():
    examples = [{"label": g, "group": str(i)} for i, g in enumerate([0, 1, 2, 0, 1, 2])]
    # class 0: P 2/3 R 1 -> F1 0.8; class 1: P 1/2 R 1/2 -> 0.5; class 2: no hit -> 0; mean 1.3 / 3
    result = superglue_metrics("cb", examples, _logits([0, 1, 1, 0, 2, 0], 3))
    assert result == {"accuracy": 0.5, "f1_macro": pytest.approx(1.3 / 3)}
    # classes absent from golds and predictions do not count (sklearn's macro average)
    assert macro_f1([0, 1, 1], [0, 0, 1]) == pytest.approx(2 / 3)


def test_multirc_em_and_f1a_by_hand():
    examples = load(config("multirc"), "dev")  # golds [1, 1, 0 | 1, 0 | 1, 0]
    predicted = [1, 0, 0, 1, 0, 1, 1]
    # F1a: 3 true positives, 4 predicted, 4 gold -> P = R = 3/4; EM: only question p0-q1 all right -> 1/3
    result = superglue_metrics("multirc", examples, _logits(predicted))
    assert result == {"f1a": pytest.approx(0.75), "em": pytest.approx(1 / 3)}


def _record_example(group: str, entity: str, answers: list[str]) -> dict:
    info = {"passage": 0, "query": int(group[-1]), "entity": entity, "answers": answers}
    return {
        "idx": 0,
        "text_a": "",
        "text_b": "",
        "label": int(entity in answers),
        "group": group,
        "meta": json.dumps(info),
    }


def test_record_max_over_gold_answers_by_hand():
    examples = [
        _record_example("p0-q0", "Joe Biden", ["Barack Obama", "Obama"]),
        _record_example("p0-q0", "President Obama", ["Barack Obama", "Obama"]),
        _record_example("p0-q1", "The White House", ["White House"]),
        _record_example("p0-q1", "Congress", ["White House"]),
    ]
    # q0: "President Obama" wins on log-odds (3.0 > -0.5) though "Joe Biden" has the larger true logit;
    #     F1 vs "Barack Obama" 1/2, vs "Obama" 2/3 -> max 2/3; EM 0.
    # q1: "The White House" normalises to "white house": EM 1, F1 1.
    scores = np.array([[3.0, 2.5], [-1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    result = superglue_metrics("record", examples, scores)
    assert result == {"f1": pytest.approx((2 / 3 + 1) / 2), "em": pytest.approx(0.5)}


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower, an icon! ") == "eiffeltower icon"


def test_metrics_refuse_unlabelled_examples():
    with pytest.raises(ValueError, match="no gold label"):
        superglue_metrics("rte", load(config("rte"), "test"), _logits([0, 1]))


# ------------------------------------------------------------------------------------------------ submissions


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    ("name", "predicted", "expected"),
    [
        ("rte", [1, 0], ["not_entailment", "entailment"]),
        ("cb", [2, 0, 1], ["neutral", "entailment", "contradiction"]),
        ("boolq", [1, 0], ["true", "false"]),
        ("wic", [0, 1], ["false", "true"]),
        ("wsc", [1, 0], ["True", "False"]),
        ("copa", [1, 0, 1], [1, 0, 1]),
    ],
)
def test_flat_submissions(tmp_path, name, predicted, expected):
    examples = load(config(name), "dev")
    path = tmp_path / SUBMISSION_NAMES[name]
    write_submission(name, examples, _logits(predicted, 3 if name == "cb" else 2), path)
    assert _read_jsonl(path) == [{"idx": i, "label": label} for i, label in enumerate(expected)]
    assert [p.name for p in tmp_path.iterdir()] == [SUBMISSION_NAMES[name]]  # no temporary file left


def test_multirc_submission_is_nested(tmp_path):
    examples = load(config("multirc"), "test")
    path = tmp_path / "MultiRC.jsonl"
    write_submission("multirc", examples, _logits([1, 0]), path)
    assert _read_jsonl(path) == [
        {"idx": 0, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]}]}}
    ]
    dev = load(config("multirc"), "dev")
    write_submission("multirc", dev, _logits([1, 1, 0, 1, 0, 1, 0]), path)
    lines = _read_jsonl(path)
    assert [line["idx"] for line in lines] == [0, 1]
    assert [q["idx"] for q in lines[0]["passage"]["questions"]] == [0, 1]
    assert lines[1]["passage"]["questions"][0]["answers"] == [{"idx": 5, "label": 1}, {"idx": 6, "label": 0}]


def test_record_submission_picks_the_best_entity(tmp_path):
    examples = load(config("record"), "dev")  # entities Eiffel Tower, Gustave Eiffel, Paris per query
    scores = _logits([1, 0, 0, 0, 1, 0])
    path = tmp_path / "out" / "ReCoRD.jsonl"
    write_submission("record", examples, scores, path)
    assert _read_jsonl(path) == [{"idx": 0, "label": "Eiffel Tower"}, {"idx": 1, "label": "Gustave Eiffel"}]


def test_select_metric_is_a_returned_key():
    for name in FOLDERS:
        examples = load(config(name), "dev")
        classes = 3 if name == "cb" else 2
        scores = _logits([0] * len(examples), classes)
        assert task_yaml(name).metric in superglue_metrics(name, examples, scores)
