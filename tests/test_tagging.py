"""Sequence-tagging readers (NER, SRL) and their span metrics, on small fixtures in each reader's exact format."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from seqeval.metrics import f1_score, precision_score, recall_score

from ptv2.data import files, tagging
from ptv2.data.bio import to_bio
from ptv2.data.srl import read_srl_conll, read_srl_pack
from ptv2.data.tagging import convert_hub_rows, label_set, load, read_conll04_json, read_conll_ner
from ptv2.errors import UserError
from ptv2.metrics.tagging import tagging_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "tagging"


def make_task(**fields):
    """A task node as the core builds it (OmegaConf, struct mode) with only the fields a test needs."""
    base = {"name": "conll03", "data_dir": None, "format": "conll", "files": {}, "hub": {}, "hub_splits": {}}
    base["options"] = {}
    base.update(fields)
    node = OmegaConf.create(base)
    OmegaConf.set_struct(node, True)
    return node


# ---------------------------------------------------------------- tag schemes


def test_to_bio_iob1_starts_entities_with_b():
    assert to_bio(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        "B-PER",
        "I-PER",
        "O",
        "B-LOC",
        "B-LOC",
        "B-ORG",
    ]


def test_to_bio_keeps_valid_bio_unchanged():
    tags = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC"]
    assert to_bio(tags) == tags


def test_to_bio_bioes_and_bilou():
    assert to_bio(["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]) == ["B-PER", "B-LOC", "I-LOC", "I-LOC", "B-LOC"]
    assert to_bio(["U-Peop", "B-Org", "L-Org", "I-Org"]) == ["B-Peop", "B-Org", "I-Org", "B-Org"]


def test_to_bio_rejects_prefixes_outside_the_named_scheme():
    with pytest.raises(UserError, match="E-LOC"):
        to_bio(["B-LOC", "E-LOC"], scheme="iob2")
    with pytest.raises(UserError, match="unknown tag scheme"):
        to_bio(["O"], scheme="xyz")


def test_label_set_puts_o_first_then_sorted():
    examples = [{"tags": ["B-PER", "O", "I-PER"]}, {"tags": ["B-LOC", "O"]}]
    assert label_set(examples) == ["O", "B-LOC", "B-PER", "I-PER"]


# ---------------------------------------------------------------- NER: CoNLL columns


def test_conll_iob1_file_becomes_bio_and_skips_docstart():
    examples = read_conll_ner(FIXTURES / "conll03_iob1.txt")
    assert [e["idx"] for e in examples] == [0, 1, 2]
    assert examples[0]["tokens"] == ["Acme", "Corp", "hired", "Jane", "Doe", "."]
    assert examples[0]["tags"] == ["B-ORG", "I-ORG", "O", "B-PER", "I-PER", "O"]
    # IOB1's B- marks a second adjacent entity of the same type.
    assert examples[1]["tags"] == ["B-LOC", "B-LOC", "O", "B-LOC", "O"]
    # The last sentence has no blank line after it and is still read.
    assert examples[2] == {"idx": 2, "tokens": ["Italian", "food"], "tags": ["B-MISC", "O"], "predicate": -1}


def test_conll_tag_column_option_and_bioes():
    task = make_task(data_dir=str(FIXTURES), files={"train": "conll_tag_column.tsv"}, options={"tag_column": 1})
    examples = load(task, "train")
    assert [e["tokens"] for e in examples] == [["Tom", "Smith", "sleeps"], ["Fred", "met", "New", "York"]]
    assert examples[0]["tags"] == ["B-PER", "I-PER", "O"]
    assert examples[1]["tags"] == ["B-PER", "O", "B-LOC", "I-LOC"]


def test_conll_bad_tag_names_file_and_line():
    with pytest.raises(UserError, match=r"conll_bad_tag.txt:1: tag 'PER'"):
        read_conll_ner(FIXTURES / "conll_bad_tag.txt")


def test_conll_short_line_names_file_and_line():
    with pytest.raises(UserError, match=r"conll_short_line.txt:2: no tag column 3"):
        read_conll_ner(FIXTURES / "conll_short_line.txt", tag_column=3)


def test_missing_split_file_is_a_user_error():
    task = make_task(data_dir=str(FIXTURES / "conll04_pack"), name="conll04", format="ptv2_pack")
    with pytest.raises(UserError, match="no test file in .*conll04_pack .*; or name it: task.files.test=FILE"):
        load(task, "test")


# ---------------------------------------------------------------- NER: official P-tuning v2 pack


def test_ptv2_pack_conll04_uses_pack_file_names():
    task = make_task(name="conll04", format="ptv2_pack", data_dir=str(FIXTURES / "conll04_pack"))
    train = load(task, "train")
    assert len(train) == 2
    assert train[0]["tags"] == ["B-Peop", "I-Peop", "O", "O", "B-Loc", "O"]
    assert train[1]["tokens"] == ["Acme", "Inc.", "sold", "Widgets", "."]
    dev = load(task, "dev")
    assert dev == [{"idx": 0, "tokens": ["Mary", "visited", "Oslo"], "tags": ["B-Peop", "O", "B-Loc"], "predicate": -1}]
    assert label_set(train) == ["O", "B-Loc", "B-Org", "B-Other", "B-Peop", "I-Org", "I-Peop"]


def test_ptv2_pack_ontonotes_reads_second_tab_column():
    task = make_task(name="ontonotes", format="ptv2_pack", data_dir=str(FIXTURES / "ontonotes_pack"))
    examples = load(task, "dev")
    assert examples[0]["tokens"] == ["Mary", "flew", "to", "New", "York", "on", "Monday"]
    assert examples[0]["tags"] == ["B-PERSON", "O", "O", "B-GPE", "I-GPE", "O", "B-DATE"]
    assert examples[1]["tokens"] == ["He", "paid", "$", "5"]
    assert examples[1]["tags"] == ["O", "O", "B-MONEY", "I-MONEY"]


# ---------------------------------------------------------------- NER: CoNLL04 JSON


def test_conll04_spert_json_entities_end_exclusive():
    examples = read_conll04_json(FIXTURES / "conll04_spert.json")
    assert examples[0]["tags"] == ["B-Peop", "I-Peop", "O", "O", "B-Org", "I-Org", "O", "B-Loc", "O"]
    assert examples[1]["tags"] == ["O", "O", "O"]


def test_conll04_jsonl_bilou_tags_via_load():
    task = make_task(name="conll04", format="json", data_dir=str(FIXTURES), files={"train": "conll04_bilou.jsonl"})
    examples = load(task, "train")
    assert examples[0]["tags"] == ["B-Peop", "I-Peop", "O", "B-Loc", "O"]
    assert examples[1]["tags"] == ["O", "B-Org", "I-Org", "I-Org", "I-Org"]


def test_conll04_json_missing_tags_names_line():
    with pytest.raises(UserError, match=r"conll04_missing.jsonl:2: missing field 'entities' or 'tags'"):
        read_conll04_json(FIXTURES / "conll04_missing.jsonl")


def test_overlapping_entities_are_rejected(tmp_path):
    path = tmp_path / "overlap.json"
    path.write_text(
        '[{"tokens": ["a", "b", "c"], "entities": [{"type": "X", "start": 0, "end": 2}, '
        '{"type": "Y", "start": 1, "end": 3}]}]'
    )
    with pytest.raises(UserError, match="record 0: entity Y"):
        read_conll04_json(path)


# ---------------------------------------------------------------- NER: hub rows


def test_hub_rows_conll2003_ids():
    rows = [{"id": "0", "tokens": ["EU", "rejects", "German", "call"], "pos_tags": [22, 42, 16, 21],
             "chunk_tags": [11, 21, 11, 12], "ner_tags": [3, 0, 7, 0]}]  # fmt: skip
    examples = convert_hub_rows(rows, tagging.HUB_LABEL_NAMES["eriktks/conll2003"])
    assert examples == [
        {
            "idx": 0,
            "tokens": ["EU", "rejects", "German", "call"],
            "tags": ["B-ORG", "O", "B-MISC", "O"],
            "predicate": -1,
        }
    ]


def test_hub_rows_tner_ontonotes_ids():
    rows = [{"tokens": ["Phil", "Rosen", "of", "Boston"], "tags": [4, 5, 0, 7]}]
    examples = convert_hub_rows(rows, tagging.HUB_LABEL_NAMES["tner/ontonotes5"])
    assert examples[0]["tags"] == ["B-PERSON", "I-PERSON", "O", "B-GPE"]
    assert len(tagging.HUB_LABEL_NAMES["tner/ontonotes5"]) == 37


def test_hub_rows_conll04_entities_and_string_tags():
    rows = [
        {"tokens": ["Ann", "met", "Bo"], "entities": [{"start": 2, "end": 3, "type": "Peop"}], "relations": []},
        {"tokens": ["Ann", "Lee"], "ner_tags": ["I-Peop", "I-Peop"]},
    ]
    examples = convert_hub_rows(rows)
    assert examples[0]["tags"] == ["O", "O", "B-Peop"]
    assert examples[1]["tags"] == ["B-Peop", "I-Peop"]


def test_hub_rows_ids_without_names_or_out_of_range():
    with pytest.raises(UserError, match="row 0: tag ids need label names"):
        convert_hub_rows([{"tokens": ["a"], "ner_tags": [1]}])
    with pytest.raises(UserError, match="row 0: tag id 9"):
        convert_hub_rows([{"tokens": ["a"], "ner_tags": [9]}], ["O", "B-X"])


def test_load_from_hub_maps_split_and_label_names(monkeypatch):
    calls = []

    def fake_hub(path, name, revision, split):
        calls.append((path, name, revision, split))
        return [{"tokens": ["Oslo"], "ner_tags": [5]}]

    monkeypatch.setattr(files, "load_hub_split", fake_hub)
    task = make_task(hub={"path": "eriktks/conll2003", "name": None, "revision": "refs/convert/parquet"})
    assert load(task, "dev")[0]["tags"] == ["B-LOC"]
    assert calls == [("eriktks/conll2003", None, "refs/convert/parquet", "validation")]


def test_srl_without_data_dir_is_a_user_error():
    with pytest.raises(UserError, match="local files only"):
        load(make_task(name="conll05"), "train")


# ---------------------------------------------------------------- SRL


def test_srl_pack_one_example_per_predicate():
    task = make_task(name="conll05", format="ptv2_pack", data_dir=str(FIXTURES / "conll05_pack"))
    examples = load(task, "train")
    assert [e["predicate"] for e in examples] == [2, 1, 3]
    assert examples[0]["tokens"] == ["The", "cat", "sat", "on", "the", "mat", "."]
    assert examples[0]["tags"] == ["B-A0", "I-A0", "B-V", "B-AM-LOC", "I-AM-LOC", "I-AM-LOC", "O"]
    assert examples[2]["tags"] == ["B-A0", "O", "O", "B-V", "O"]
    assert load(task, "test_brown") == [{"idx": 0, "tokens": ["Run", "!"], "tags": ["B-V", "O"], "predicate": 0}]


def test_srl_pack_malformed_lines_name_file_and_line():
    with pytest.raises(UserError, match=r"conll05.bad.txt:3: expected '<predicate index> tokens \|\|\| tags'"):
        read_srl_pack(FIXTURES / "conll05_pack" / "conll05.bad.txt")
    with pytest.raises(UserError, match=r"conll05.mismatch.txt:1: 5 tokens but 4 tags"):
        read_srl_pack(FIXTURES / "conll05_pack" / "conll05.mismatch.txt")


def test_srl_conll05_columns():
    examples = read_srl_conll(FIXTURES / "conll05_columns.txt")
    words = ["The", "company", "said", "it", "would", "sell", "shares", "."]
    assert [e["tokens"] for e in examples] == [words, words]
    assert examples[0]["predicate"] == 2
    assert examples[0]["tags"] == ["B-A0", "I-A0", "B-V", "B-A1", "I-A1", "I-A1", "I-A1", "O"]
    assert examples[1]["predicate"] == 5
    assert examples[1]["tags"] == ["O", "O", "O", "B-A0", "B-AM-MOD", "B-V", "B-A1", "O"]


def test_srl_conll12_gold_conll_columns_via_load():
    task = make_task(
        name="conll12", format="conll", data_dir=str(FIXTURES), files={"dev": "conll12_columns.gold_conll"}
    )
    examples = load(task, "dev")
    assert [(e["tokens"][e["predicate"]], e["tags"]) for e in examples] == [
        ("bought", ["B-ARG0", "B-V", "B-ARG1", "I-ARG1", "I-ARG1", "O"]),
        ("wants", ["B-ARG0", "B-V", "B-ARG1", "I-ARG1", "O"]),
        ("leave", ["B-ARG0", "O", "O", "B-V", "O"]),
    ]
    assert [e["idx"] for e in examples] == [0, 1, 2]


def test_srl_conll_unclosed_or_nested_argument_names_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"conll05_unclosed.txt:2: argument A0 is still open"):
        read_srl_conll(FIXTURES / "conll05_unclosed.txt")
    nested = tmp_path / "nested.txt"
    nested.write_text("John (A0*\nran (V*)\n")
    with pytest.raises(UserError, match=r"nested.txt:2: argument cell '\(V\*\)' nests"):
        read_srl_conll(nested)


# ---------------------------------------------------------------- metrics


def test_metrics_one_correct_one_wrong_type():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"]]
    result = tagging_metrics(gold, pred)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(0.5)
    assert result["per_type"]["PER"] == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "support": 1}
    assert result["per_type"]["LOC"] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 1}
    assert result["per_type"]["ORG"] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 0}


def test_metrics_partial_span_is_wrong_and_spans_stay_in_their_sentence():
    gold = [["B-PER", "I-PER", "O"], ["B-LOC", "O"]]
    pred = [["B-PER", "O", "O"], ["B-LOC", "O"]]
    # 1 of 2 predicted spans correct, 1 of 2 gold spans found.
    result = tagging_metrics(gold, pred)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    # A span at a sentence end must not merge with one starting the next sentence.
    result = tagging_metrics([["B-PER"], ["I-PER"]], [["B-PER"], ["I-PER"]])
    assert result["per_type"]["PER"]["support"] == 2


def test_metrics_srl_excludes_the_predicate():
    gold = [["B-A0", "I-A0", "B-V", "B-A1", "I-A1"]]
    pred = [["B-A0", "I-A0", "B-V", "B-A1", "O"]]
    # Without V: 1 correct of 2 predicted, 2 gold -> P = R = F1 = 0.5; with V counted it would be 2/3.
    result = tagging_metrics(gold, pred, exclude_types=("V",))
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert "V" not in result["per_type"]
    assert tagging_metrics(gold, pred)["f1"] == pytest.approx(2 / 3)


def test_metrics_agree_with_seqeval_default_mode():
    gold = [["B-PER", "I-PER", "O", "I-LOC", "I-LOC"], ["B-ORG", "B-ORG", "I-ORG", "O"], ["O", "B-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O"], ["B-MISC", "I-MISC"]]
    result = tagging_metrics(gold, pred)
    assert result["precision"] == pytest.approx(precision_score(gold, pred))
    assert result["recall"] == pytest.approx(recall_score(gold, pred))
    assert result["f1"] == pytest.approx(f1_score(gold, pred))


def test_metrics_empty_and_mismatched_inputs():
    result = tagging_metrics([["O", "O"]], [["O", "O"]])
    assert result == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "per_type": {}}
    with pytest.raises(ValueError, match="sentence 0"):
        tagging_metrics([["O", "O"]], [["O"]])


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_conll2003_dev(shared_data):
    folder = shared_data / "conll2003"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    task = make_task(name="conll03", format="conll", data_dir=str(folder), files={"dev": "dev.txt"})
    examples = load(task, "dev")
    assert len(examples) == 3250
    types = ("PER", "ORG", "LOC", "MISC")
    assert set(label_set(examples)) == {"O"} | {f"{prefix}-{kind}" for prefix in "BI" for kind in types}


def test_the_metrics_give_the_figures_recorded_before_they_used_seqevals_report():
    """150 random cases recorded from the hand-written aggregation this module used before (IOB1/IOB2-style tags
    of five types, SRL's V excluded in a third of them, random, near-right, all-O and exact predictions): seqeval's
    classification report gives the same dict, every float equal."""
    import json

    from ptv2.metrics.tagging import tagging_metrics

    records = json.loads((Path(__file__).parent / "fixtures" / "tagging_metric_records.json").read_text())
    assert (
        len(records) == 150
        and any(r["exclude"] for r in records)
        and any(not r["metrics"]["per_type"] for r in records)
    )
    for record in records:
        assert tagging_metrics(record["gold"], record["pred"], tuple(record["exclude"])) == record["metrics"]
