"""The tagging task type (NER, SRL): first-sub-word alignment, the SRL predicate segment, truncation counted as
missed entities, V excluded from SRL scores, prediction files; and `ptv2 train` end to end on every reader and on
the multi-task configs (one shared prompt, one head per dataset, continued on one member with prompt.init_from)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import ptv2
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoTokenizer, RobertaTokenizer

from ptv2.data import Split
from ptv2.tasks import tagging

TAGGING = Path(__file__).parent / "fixtures" / "tagging"
X = -100  # ignored label / not a first sub-word
LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]


def make_task(labels=LABELS, max_length=64, name="conll03"):
    return OmegaConf.create({"name": name, "labels": labels, "max_length": max_length})


def example(idx, tokens, tags, predicate=-1):
    return {"idx": idx, "tokens": tokens, "tags": tags, "predicate": predicate}


def make_split(examples, tokenizer, task, name="dev") -> Split:
    """Encode examples the way ptv2.data.prepare_split does (a batched datasets.map)."""
    rows = datasets.Dataset.from_list(examples)
    features = rows.map(
        lambda batch: tagging.encode(batch, tokenizer, task), batched=True, remove_columns=rows.column_names
    )
    return Split(name, examples, features)


def perfect_outputs(split: Split) -> list[np.ndarray]:
    """Outputs that predict every labelled position's gold label id (0 = "O" elsewhere), padded like a batch."""
    width = max(len(labels) for labels in split.features["labels"]) + 3
    rows = []
    for labels in split.features["labels"]:
        row = np.zeros(width, dtype=np.int32)
        row[: len(labels)] = np.maximum(labels, 0)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- encode


def test_first_sub_word_carries_the_label_on_the_tiny_tokenizer(tiny_tokenizer):
    task = make_task()
    split = make_split([example(0, ["Acme", "hired", "Jo"], ["B-ORG", "O", "B-PER"])], tiny_tokenizer, task)
    feature = split.features[0]
    pieces = tiny_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "a", "##c", "##m", "##e", "h", "##i", "##r", "##e", "##d", "j", "##o", "[SEP]"]
    assert feature["labels"] == [X, 2, X, X, X, 0, X, X, X, X, 3, X, X]
    assert feature["word_ids"] == [-1, 0, -1, -1, -1, 1, -1, -1, -1, -1, 2, -1, -1]


def test_first_sub_word_alignment_on_minilm_wordpieces(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    task = make_task()
    split = make_split([example(0, ["EU", "rejects", "Brusselsxyz"], ["B-ORG", "O", "B-LOC"])], tokenizer, task)
    feature = split.features[0]
    pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "eu", "rejects", "brussels", "##xy", "##z", "[SEP]"]
    assert feature["labels"] == [X, 2, 0, 1, X, X, X]
    assert feature["word_ids"] == [-1, 0, 1, 2, -1, -1, -1]


def test_tag_unseen_in_training_is_ignored_in_the_loss(tiny_tokenizer):
    split = make_split([example(0, ["Al", "x"], ["B-MISC", "B-PER"])], tiny_tokenizer, make_task())
    assert split.features[0]["labels"] == [X, X, X, 3, X]  # B-MISC is not a label: -100, not a crash
    assert split.features[0]["word_ids"] == [-1, 0, -1, 1, -1]  # ...but its word is still mapped back


def test_srl_predicate_is_a_second_segment_and_is_not_labelled(tiny_tokenizer):
    task = make_task(labels=["O", "B-A0", "B-A1", "B-V"], name="conll05")
    split = make_split([example(0, ["Jo", "ran", "far"], ["B-A0", "B-V", "B-A1"], predicate=1)], tiny_tokenizer, task)
    feature = split.features[0]
    pieces = tiny_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "j", "##o", "r", "##a", "##n", "f", "##a", "##r", "[SEP]", "r", "##a", "##n", "[SEP]"]
    assert feature["token_type_ids"] == [0] * 10 + [1] * 4
    assert feature["labels"] == [X, 1, X, 3, X, X, 2, X, X, X, X, X, X, X]
    assert feature["word_ids"] == [-1, 0, -1, 1, -1, -1, 2, -1, -1, -1, -1, -1, -1, -1]


def test_srl_truncation_cuts_the_sentence_and_keeps_the_predicate(tiny_tokenizer):
    task = make_task(labels=["O", "B-A0", "B-A1", "B-V"], max_length=8, name="conll05")
    split = make_split([example(0, ["Jo", "ran", "far"], ["B-A0", "B-V", "B-A1"], predicate=1)], tiny_tokenizer, task)
    pieces = tiny_tokenizer.convert_ids_to_tokens(split.features[0]["input_ids"])
    assert pieces == ["[CLS]", "j", "##o", "[SEP]", "r", "##a", "##n", "[SEP]"]  # 8 tokens, predicate intact


def tiny_roberta(tmp_path) -> RobertaTokenizer:
    """A byte-level BPE tokenizer in RoBERTa's layout, loaded as from a hub folder (add_prefix_space=False)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for char in "abcdefghijklmnopqrstuvwxyzĠ":
        vocab[char] = len(vocab)
    merges = [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("c", "a"), ("ca", "t"), ("Ġ", "r"), ("Ġr", "a"), ("Ġra", "n")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    RobertaTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path / "roberta")
    return AutoTokenizer.from_pretrained(tmp_path / "roberta")


def test_roberta_words_get_a_leading_space_and_a_real_pair_separator(tmp_path):
    tokenizer = tiny_roberta(tmp_path)
    plain = tokenizer(["cat", "ran"], is_split_into_words=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(plain) == ["<s>", "cat", "r", "a", "n", "</s>"]  # the mismatch we avoid
    task = make_task(labels=["O", "B-A0", "B-V"], name="conll05")
    split = make_split([example(0, ["cat", "ran"], ["B-A0", "B-V"], predicate=1)], tokenizer, task)
    pieces = tokenizer.convert_ids_to_tokens(split.features[0]["input_ids"])
    assert pieces == ["<s>", "Ġcat", "Ġran", "</s>", "</s>", "Ġran", "</s>"]
    assert split.features[0]["labels"] == [X, 1, 2, X, X, X, X]
    assert tagging.word_tokenizer(tokenizer) is tagging.word_tokenizer(tokenizer)  # copied once
    assert tokenizer.backend_tokenizer.pre_tokenizer.add_prefix_space is False  # the original is untouched


# ---------------------------------------------------------------- collate / outputs


def test_collate_pads_inputs_and_labels_and_outputs_are_label_ids(tiny_tokenizer):
    split = make_split(
        [example(0, ["Jo"], ["B-PER"]), example(1, ["Al", "x"], ["B-PER", "O"])], tiny_tokenizer, make_task()
    )
    batch = tagging.collate([split.features[0], split.features[1]], tiny_tokenizer)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 5)
    assert batch["labels"].tolist() == [[X, 3, X, X, X], [X, 3, X, 0, X]]
    assert batch["input_ids"][0, 4].item() == tiny_tokenizer.pad_token_id and "word_ids" not in batch
    logits = torch.zeros(2, 5, len(LABELS))
    logits[0, 1, 3] = logits[1, 3, 4] = 1.0
    ids = tagging.outputs(logits, batch)
    assert ids.dtype == torch.int32 and ids.tolist() == [[0, 3, 0, 0, 0], [0, 0, 0, 4, 0]]


# ---------------------------------------------------------------- metrics


def test_truncated_words_count_as_missed_entities(tiny_tokenizer):
    # Tokens: [CLS] b ##o ##b o ##k p ##a ##r ##i ##s x [SEP]; max_length keeps [CLS] + (max_length - 2) + [SEP].
    examples = [example(0, ["Bob", "ok", "Paris", "x"], ["B-PER", "O", "B-LOC", "O"])]
    split = make_split(examples, tiny_tokenizer, make_task(max_length=8))
    assert split.features[0]["word_ids"] == [-1, 0, -1, -1, 1, -1, 2, -1]  # only "p" of Paris is left...
    split = make_split(examples, tiny_tokenizer, make_task(max_length=6))
    assert split.features[0]["word_ids"] == [-1, 0, -1, -1, 1, -1]  # ...and here Paris is gone entirely
    scores = tagging.metrics(make_task(max_length=6), split, perfect_outputs(split))
    # Gold spans PER(Bob), LOC(Paris); predicted PER only: precision 1/1, recall 1/2, f1 = 2*1*0.5/1.5 = 2/3.
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    assert scores["per_type"]["LOC"] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 1}


def test_srl_scores_exclude_the_predicate_span(tiny_tokenizer):
    labels = ["O", "B-A0", "B-A1", "B-V", "I-A1"]
    task = make_task(labels=labels, name="conll05")
    examples = [example(0, ["Jo", "ate", "a", "pie", "."], ["B-A0", "B-V", "B-A1", "I-A1", "O"], predicate=1)]
    split = make_split(examples, tiny_tokenizer, task)
    row = np.zeros(30, dtype=np.int32)
    word_ids = np.array(split.features[0]["word_ids"])
    predicted = ["O", "B-V", "B-A1", "I-A1", "O"]  # A0 missed, V and A1 right
    for position in np.flatnonzero(word_ids >= 0):
        row[position] = labels.index(predicted[word_ids[position]])
    scores = tagging.metrics(task, split, [row])
    # V excluded: gold {A0, A1}, predicted {A1}: P 1, R 1/2, F1 2/3 (with V it would be R 2/3, F1 0.8).
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    assert "V" not in scores["per_type"]
    assert tagging.predicted_tags(task, split, [row]) == [predicted]


def test_write_predictions_jsonl(tiny_tokenizer, tmp_path):
    task = make_task()
    examples = [example(7, ["Bob", "at"], ["B-PER", "O"]), example(8, ["Jo"], ["O"])]
    split = make_split(examples, tiny_tokenizer, task, name="test")
    outputs = perfect_outputs(split)
    outputs[1][1] = 3  # "Jo" predicted B-PER
    (path,) = tagging.write_predictions(task, split, outputs, tmp_path / "out")
    assert path.name == "conll03-test-predictions.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"idx": 7, "tokens": ["Bob", "at"], "tags": ["B-PER", "O"]},
        {"idx": 8, "tokens": ["Jo"], "tags": ["B-PER"]},
    ]


def test_labels_come_from_the_training_examples():
    examples = [example(0, ["a", "b"], ["B-PER", "I-PER"]), example(1, ["c"], ["B-LOC"])]
    assert tagging.labels(examples) == ["O", "B-LOC", "B-PER", "I-PER"]


# ---------------------------------------------------------------- ptv2 train on every reader

SMOKE = ["backbone=tiny", "trainer=smoke", "trainer.batch_size=1", "logger=none"]


def same_file(name: str) -> str:
    return f"task.files={{train: {name}, dev: {name}, test: {name}}}"


READER_RUNS = {
    "conll03-conll": ["task=conll03", f"task.data_dir={TAGGING}", same_file("conll03_iob1.txt")],
    "conll04-pack": ["task=conll04", f"task.data_dir={TAGGING / 'conll04_pack'}", "task.files.test=dev.txt"],
    "conll04-json": ["task=conll04", f"task.data_dir={TAGGING}", "task.format=json", same_file("conll04_spert.json")],
    "conll04-bilou": ["task=conll04", f"task.data_dir={TAGGING}", "task.format=json", same_file("conll04_bilou.jsonl")],
    "ontonotes-pack": ["task=ontonotes", f"task.data_dir={TAGGING / 'ontonotes_pack'}", same_file("dev.sd.conllx")],
    "conll05-pack-brown": [
        "task=conll05",
        f"task.data_dir={TAGGING / 'conll05_pack'}",
        "task.files.dev=conll05.train.txt",
        "task.test_split=test_brown",
    ],
    "conll05-columns": [
        "task=conll05",
        f"task.data_dir={TAGGING}",
        "task.format=conll",
        same_file("conll05_columns.txt"),
    ],
    "conll12-columns": [
        "task=conll12",
        f"task.data_dir={TAGGING}",
        "task.format=conll",
        same_file("conll12_columns.gold_conll"),
    ],
}
FAST_RUNS = {"conll03-conll", "conll05-pack-brown"}  # the rest are marked slow (a subprocess each)


@pytest.mark.parametrize(
    "run",
    [name if name in FAST_RUNS else pytest.param(name, marks=pytest.mark.slow) for name in READER_RUNS],
)
def test_every_reader_trains_and_reports_dev_and_test_f1(tmp_path, run):
    ptv2("train", *SMOKE, *READER_RUNS[run], f"hydra.run.dir={tmp_path}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 2 and results["select_metric"] == "f1"
    for scores in (results["best"], results["test_at_best"]):
        assert 0.0 <= scores["f1"] <= 1.0 and {"precision", "recall", "per_type"} <= set(scores)
    assert results["history"][0]["dev/f1"] == results["best"]["f1"]
    if run.startswith("conll05"):
        assert "V" not in results["best"]["per_type"]  # SRL: arguments only


# ---------------------------------------------------------------- multi-task

NER_MULTI = [
    "task=ner_multi",
    f"task.members.conll03.data_dir={TAGGING}",
    "task.members.conll03." + same_file("conll03_iob1.txt").removeprefix("task."),
    f"task.members.ontonotes.data_dir={TAGGING / 'ontonotes_pack'}",
    "task.members.ontonotes." + same_file("dev.sd.conllx").removeprefix("task."),
    f"task.members.conll04.data_dir={TAGGING / 'conll04_pack'}",
    "task.members.conll04.files.test=dev.txt",
]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "prompt.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_ner_multi_task_shares_one_prompt_and_continues_on_one_member(tmp_path):
    multi = tmp_path / "multi"
    ptv2("train", *SMOKE, *NER_MULTI, "trainer.max_steps=4", f"hydra.run.dir={multi}")
    results = json.loads((multi / "results.json").read_text())
    assert set(results["best"]) == set(results["test_at_best"]) == {"conll03", "ontonotes", "conll04"}
    assert results["train_examples"] == {"conll03": 3, "ontonotes": 2, "conll04": 2}
    assert results["best_value"] == pytest.approx(np.mean([results["best"][m]["f1"] for m in results["best"]]))
    saved = tensors(multi)
    heads = {name.split(".")[1] for name in saved if name.startswith("heads.")}
    assert heads == {"conll03", "ontonotes", "conll04"}
    assert [name for name in saved if name.startswith("prompt.")] == ["prompt.embedding.weight"]
    assert saved["heads.ontonotes.linear.weight"].shape[0] == 7  # its own label set: O + 6 tags

    # Continue on CoNLL03 alone from the multi-task prompt. With lr 0 nothing moves, so the single-task checkpoint
    # must hold exactly the multi-task prompt and conll03 head: proof that both were loaded.
    single = tmp_path / "single"
    ptv2(
        "train",
        *SMOKE,
        *READER_RUNS["conll03-conll"],
        f"prompt.init_from={multi}",
        "optimizer.lr=0",
        f"hydra.run.dir={single}",
    )
    continued = tensors(single)
    assert set(continued) == {"prompt.embedding.weight", "heads.conll03.linear.weight", "heads.conll03.linear.bias"}
    for name, tensor in continued.items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.slow
def test_srl_multi_task_trains_both_members(tmp_path):
    ptv2(
        "train",
        *SMOKE,
        "task=srl_multi",
        f"task.members.conll05.data_dir={TAGGING}",
        "task.members.conll05.format=conll",
        "task.members.conll05." + same_file("conll05_columns.txt").removeprefix("task."),
        f"task.members.conll12.data_dir={TAGGING}",
        "task.members.conll12.format=conll",
        "task.members.conll12." + same_file("conll12_columns.gold_conll").removeprefix("task."),
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path}",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test_at_best"]) == {"conll05", "conll12"}
    assert {name.split(".")[1] for name in tensors(tmp_path) if name.startswith("heads.")} == {"conll05", "conll12"}


def test_presets_follow_the_official_scripts():
    """Spot-check the composed presets (values from THUDM/P-tuning-v2 run_script/*.sh)."""
    from conftest import compose_config

    expected = {
        "conll03-roberta-large": (11, 3e-2, 16, 30, 11),
        "conll04-bert-large-uncased": (128, 2e-2, 32, 40, 11),
        "ontonotes-roberta-large": (48, 7e-3, 16, 60, 14),
        "conll05-roberta-large": (224, 6e-3, 16, 15, 11),
        "conll12-roberta-large": (64, 5e-3, 32, 45, 11),
    }
    for preset, (length, lr, batch, epochs, seed) in expected.items():
        cfg = compose_config(f"preset={preset}")
        assert (cfg.prompt.length, cfg.optimizer.lr, cfg.trainer.batch_size) == (length, lr, batch), preset
        assert (cfg.trainer.epochs, cfg.trainer.seed, cfg.scheduler.name) == (epochs, seed, "exponential"), preset
        assert cfg.task.name == preset.split("-")[0] and cfg.task.test_split == "test"
    cfg = compose_config("preset=conll04-bert-large-uncased")
    assert cfg.prompt.dropout == cfg.backbone.dropout == cfg.task.head_dropout == 0.2
