"""All eight SuperGLUE tasks through `ptv2 train` on the tiny backbone and the official-format fixtures; COPA as
multiple choice; the verbalizer head (MLM logits of label words at a mask slot) with every prompt method;
leaderboard files from write_predictions; every task config and preset composes."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY_CONFIGS, SUPERGLUE_FOLDERS, TINY_BERT, compose_config, padded_batch, ptv2
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForMaskedLM, AutoTokenizer

from ptv2.checks import validate
from ptv2.data import Split, superglue
from ptv2.engine import Member, head_spec
from ptv2.errors import UserError
from ptv2.modeling import backbone, injection
from ptv2.modeling.backbone import BackboneHeads
from ptv2.modeling.heads import VerbalizerHead
from ptv2.modeling.methods import METHODS as REGISTRY
from ptv2.modeling.model import PromptModel
from ptv2.tasks import classification, multiple_choice, tagging

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
FOLDERS = SUPERGLUE_FOLDERS
CONF = Path(str(importlib.resources.files("ptv2.conf")))  # conf/, installed as the package ptv2.conf
# The tiny vocabulary has no "yes"/"no": single-token stand-ins for the label words.
TINY_WORDS = "[is,not]"
METHODS = ["ptv2", "prompt_tuning", "ptuning_v1", "finetune", "linear_probe"]


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# ------------------------------------------------------------------------------------ every task trains, end to end


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory) -> Path:
    """One multirun over the eight tasks: 2 steps of batch 1 each, then dev evaluation (one job folder per task).

    task.data_dir points at lower-case links to the fixture folders so one interpolation serves every task.
    """
    root = tmp_path_factory.mktemp("superglue")
    for name, folder in FOLDERS.items():
        (root / "data" / name).parent.mkdir(exist_ok=True)
        (root / "data" / name).symlink_to(FIXTURES / folder)
    tasks = ",".join(FOLDERS)
    ptv2(
        "train", "-m", f"task={tasks}", "backbone=tiny", "trainer=smoke", "trainer.batch_size=1", "logger=none",
        f"task.data_dir={root}/data/${{task.name}}", f"hydra.sweep.dir={root}/runs", "hydra.sweep.subdir=${task.name}",
    )  # fmt: skip
    return root / "runs"


# The official metric keys of each task (the first one selects the best epoch) and its dev examples in the fixtures.
OFFICIAL_KEYS = {
    "boolq": (["accuracy"], 2),
    "cb": (["accuracy", "f1_macro"], 3),
    "copa": (["accuracy"], 3),
    "multirc": (["f1a", "em"], None),
    "record": (["f1", "em"], None),
    "rte": (["accuracy"], 2),
    "wic": (["accuracy"], 2),
    "wsc": (["accuracy"], 2),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_every_task_trains_two_steps_and_reports_its_official_metrics(task_runs, name):
    results = results_of(task_runs / name)
    keys, dev_examples = OFFICIAL_KEYS[name]
    assert results["task"] == name and results["steps"] == 2 and results["history"][0]["step"] == 2
    assert results["select_metric"] == keys[0]
    assert sorted(results["best"]) == sorted(keys)
    assert results["best_value"] == results["best"][keys[0]]
    assert all(0.0 <= value <= 1.0 for value in results["best"].values())
    if dev_examples:  # accuracy is a fraction of the fixture's dev examples
        right = results["best"]["accuracy"] * dev_examples
        assert right == pytest.approx(round(right))
    assert all(f"dev/{key}" in results["history"][0] for key in keys)


def test_copa_trains_a_multiple_choice_head(task_runs):
    config = OmegaConf.load(task_runs / "copa" / "config.yaml")
    assert config.task.type == "multiple_choice"
    with safe_open(str(task_runs / "copa" / "prompt.safetensors"), framework="pt") as checkpoint:
        # one score per (premise, choice) sequence: a linear layer to a single output
        assert tuple(checkpoint.get_tensor("heads.copa.linear.weight").shape) == (1, 32)


# -------------------------------------------------------------------------------------------- multiple choice parts


def test_multiple_choice_encode_and_collate_flatten_choices_example_major():
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BERT))
    task = OmegaConf.create({"max_length": 32, "head": "linear"})
    batch = {"text_a": ["ab", "c"], "choices": [["d", "ef"], ["g", "h"]], "label": [1, 0]}
    features = multiple_choice.encode(batch, tokenizer, task)
    assert [len(ids) for ids in features["input_ids"]] == [2, 2]  # one token list per choice
    rows = [{key: features[key][i] for key in features} for i in range(2)]
    collated = multiple_choice.collate(rows, tokenizer)
    assert collated["num_choices"] == 2 and collated["labels"].tolist() == [1, 0]
    assert collated["input_ids"].shape == (4, 7)  # B*C sequences; the longest: [CLS] a ##b [SEP] e ##f [SEP]
    texts = [tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in collated["input_ids"]]
    assert texts == ["abd", "abef", "cg", "ch"]
    # the multiple-choice head regroups the B*C scores per example: (4, L, H) -> (2, 2)
    head = multiple_choice_head_scores(collated)
    assert head.shape == (2, 2)


def multiple_choice_head_scores(batch: dict) -> torch.Tensor:
    from ptv2.modeling.heads import MultipleChoiceHead

    hidden = torch.arange(4.0).view(4, 1, 1).expand(4, 3, 2)  # sequence i has every hidden value i
    head = MultipleChoiceHead(2, 1, 0.0)
    with torch.no_grad():
        head.linear.weight.fill_(1.0)
        head.linear.bias.zero_()
    scores = head(hidden, batch)
    assert scores.tolist() == [[0.0, 2.0], [4.0, 6.0]]  # 2 * i, grouped as [[seq 0, seq 1], [seq 2, seq 3]]
    return scores


# ----------------------------------------------------------------------------------------------------- verbalizer


def test_mask_slot_goes_before_the_closing_separator():
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BERT))
    task = OmegaConf.create({"max_length": 32, "head": "verbalizer"})
    features = classification.encode({"text_a": ["ab"], "text_b": ["cd"], "label": [0]}, tokenizer, task)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    assert tokens == ["[CLS]", "a", "##b", "[SEP]", "c", "##d", "?", "[MASK]", "[SEP]"]
    assert features["mask_position"] == [7]
    assert features["token_type_ids"][0] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert features["attention_mask"][0] == [1] * 9

    # truncation keeps room for the slot: 8 tokens in all, the texts lose 1
    task.max_length = 8
    short = classification.encode({"text_a": ["ab"], "text_b": ["cd"], "label": [0]}, tokenizer, task)
    tokens = tokenizer.convert_ids_to_tokens(short["input_ids"][0])
    assert len(tokens) == 8 and tokens[-3:] == ["?", "[MASK]", "[SEP]"] and short["mask_position"] == [6]

    # collate: the mask position of every row of the padded batch
    task.max_length = 32
    more = classification.encode({"text_a": ["ab", "a"], "text_b": ["cd", "c"], "label": [0, 1]}, tokenizer, task)
    rows = [{key: more[key][i] for key in more} for i in range(2)]
    batch = classification.collate(rows, tokenizer)
    assert batch["mask_positions"].tolist() == [7, 5]
    assert (batch["input_ids"][torch.arange(2), batch["mask_positions"]] == tokenizer.mask_token_id).all()


def test_label_words_must_be_single_tokens():
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BERT))
    assert backbone.label_word_ids(tokenizer, ["is", "not"], "task rte") == [148, 164]  # lines 149, 165 of vocab.txt
    with pytest.raises(UserError, match="label word 'yes' is not one token"):
        backbone.label_word_ids(tokenizer, ["is", "yes"], "task rte")
    with pytest.raises(UserError, match="must be different tokens"):
        backbone.label_word_ids(tokenizer, ["is", "is"], "task rte")


def _masked_lm(family: str, seed: int = 0):
    """(stock masked LM, prompt-ready copy with the same weights), both in eval mode."""
    config = MLM_CONFIGS[family]()
    if family == "deberta-v2-new-head":
        config.legacy = False
    torch.manual_seed(seed)
    stock = AutoModelForMaskedLM.from_config(config).eval()
    key = injection.ATTENTION_KEY if injection.family_of(config).injection == "attention_interface" else "eager"
    prepared = AutoModelForMaskedLM.from_config(config, attn_implementation=key)
    prepared.load_state_dict(stock.state_dict())
    return stock, prepared.eval()


# DeBERTa-v2 has two MLM heads: the legacy one (BERT-like, the default) and one that reads the word embeddings.
MLM_CONFIGS = {**FAMILY_CONFIGS, "deberta-v2-new-head": FAMILY_CONFIGS["deberta-v2"]}


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "deberta-v2", "deberta-v2-new-head"])
def test_verbalizer_logits_are_the_stock_mlm_logits_of_the_label_words(family):
    stock, prepared = _masked_lm(family)
    encoder, lm_head = backbone.split_masked_lm(prepared)
    words = [7, 11, 30]
    model = PromptModel(
        encoder, OmegaConf.structured(REGISTRY["linear_probe"].settings()), {"t": VerbalizerHead(lm_head, words)}, 0.0
    ).eval()
    input_ids, mask = padded_batch((9, 6, 4), pad_id=stock.config.pad_token_id or 0)
    positions = torch.tensor([8, 3, 2])
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=mask).logits[torch.arange(3), positions][:, words]
        logits = model({"input_ids": input_ids, "attention_mask": mask, "mask_positions": positions})
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_verbalizer_trains_only_what_the_method_trains(method):
    _, prepared = _masked_lm("bert")
    encoder, lm_head = backbone.split_masked_lm(prepared)
    settings = REGISTRY[method].settings
    cfg = OmegaConf.structured(settings(length=4) if "length" in settings.__dataclass_fields__ else settings())
    model = PromptModel(encoder, cfg, {"t": VerbalizerHead(lm_head, [7, 11])}, 0.0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head_own = {n for n in trainable if n.startswith("heads.")}
    word_embeddings = model.encoder.get_input_embeddings().weight
    assert lm_head.parts[0].predictions.decoder.weight is word_embeddings  # the decoder stays tied
    if method == "finetune":
        assert len(trainable) == len(list(model.named_parameters()))
    elif method == "linear_probe":
        # the MLM head's own layers: transform dense + LayerNorm, output bias; never the tied word embeddings
        assert (
            head_own
            == {
                "heads.t.lm_head.parts.0.predictions.bias",
                "heads.t.lm_head.parts.0.predictions.transform.dense.weight",
                "heads.t.lm_head.parts.0.predictions.transform.dense.bias",
                "heads.t.lm_head.parts.0.predictions.transform.LayerNorm.weight",
                "heads.t.lm_head.parts.0.predictions.transform.LayerNorm.bias",
            }
            == trainable
        )
        assert not word_embeddings.requires_grad
    else:  # prompt methods: the prompt only, the MLM head stays frozen
        assert trainable and all(name.startswith("prompt.") for name in trainable)


@pytest.fixture(scope="module")
def verbalizer_runs(tmp_path_factory) -> Path:
    """One multirun: RTE with the verbalizer head, 2 steps with each prompt method."""
    root = tmp_path_factory.mktemp("verbalizer")
    ptv2(
        "train", "-m", f"prompt={','.join(METHODS)}", "task=rte", "task.head=verbalizer",
        f"task.options.verbalizer={TINY_WORDS}", "backbone=tiny", "trainer=smoke", "trainer.batch_size=1",
        "logger=none", f"task.data_dir={FIXTURES / 'RTE'}", f"hydra.sweep.dir={root}",
        "hydra.sweep.subdir=${prompt.method}",
    )  # fmt: skip
    return root


# Trainable parameters of tiny-bert (2 layers, hidden 32, vocabulary 197) with a verbalizer, by hand:
# ptv2: 16 prompt vectors x 2 layers x (key, value) x 32 = 2048; prompt_tuning: 16 x 32 = 512;
# linear_probe: the MLM transform 32*32 + 32 and LayerNorm 2*32, plus the output bias 197 = 1317.
VERBALIZER_TRAINABLE = {"ptv2": 2048, "prompt_tuning": 512, "linear_probe": 1317}


@pytest.mark.parametrize("method", METHODS)
def test_verbalizer_trains_with_every_prompt_method(verbalizer_runs, method):
    run_dir = verbalizer_runs / method
    results = results_of(run_dir)
    assert results["method"] == method and results["steps"] == 2 and 0.0 <= results["best"]["accuracy"] <= 1.0
    if method in VERBALIZER_TRAINABLE:
        assert results["trainable_params"] == VERBALIZER_TRAINABLE[method]
    if method == "finetune":
        assert results["trainable_params"] == results["total_params"]
    with safe_open(str(run_dir / "prompt.safetensors"), framework="pt") as checkpoint:
        names = set(checkpoint.keys())
    if method in ("ptv2", "prompt_tuning"):
        assert names == {"prompt.embedding.weight"}  # the frozen MLM head is not part of the checkpoint


@pytest.mark.slow  # one more ptv2 process
def test_verbalizer_checkpoint_evaluates_to_the_same_accuracy(verbalizer_runs, tmp_path):
    run_dir = verbalizer_runs / "ptv2"
    ptv2("eval", f"ckpt={run_dir}", f"task.data_dir={FIXTURES / 'RTE'}", f"hydra.run.dir={tmp_path}")
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["metrics"]["accuracy"] == results_of(run_dir)["best"]["accuracy"]


@pytest.mark.slow  # one more ptv2 process
def test_bad_label_words_fail_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ptv2", "train", "task=rte", "task.head=verbalizer", "backbone=tiny", "logger=none",
         "trainer=smoke", f"task.data_dir={FIXTURES / 'RTE'}", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip
    # conf/task/rte.yaml's words are "yes"/"no", which the tiny character-level vocabulary splits
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "label word 'yes' is not one token of the backbone's vocabulary" in result.stderr


def test_head_spec_checks_word_count_and_task_type():
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BERT))
    task = task_config("cb")
    task.head = "verbalizer"
    task.options.verbalizer = ["is", "not"]
    with pytest.raises(UserError, match=r"needs 3 words, one per label of \['entailment'"):
        head_spec(Member("cb", task, classification, {}), tokenizer, BackboneHeads())
    task.options.verbalizer = ["is", "not", "can"]
    assert head_spec(Member("cb", task, classification, {}), tokenizer, BackboneHeads()).label_word_ids.tolist() == [
        148,
        164,
        178,
    ]
    copa = task_config("copa")
    copa.head = "verbalizer"
    copa.options.verbalizer = ["is"]
    assert head_spec(Member("copa", copa, multiple_choice, {}), tokenizer, BackboneHeads()).label_word_ids.tolist() == [
        148
    ]
    task.type = "tagging"
    with pytest.raises(
        UserError, match="task.head=verbalizer works for task types classification, multiple_choice, not tagging"
    ):
        head_spec(Member("cb", task, tagging, {}), tokenizer, BackboneHeads())


def test_unknown_head_is_refused():
    cfg = compose_config("task=rte", "backbone=tiny", "task.head=softmax")
    with pytest.raises(UserError, match="task.head=softmax .* choose one of linear, pooler, verbalizer, lm"):
        validate(cfg, backbone.load_config(cfg.backbone))


# ---------------------------------------------------------------------------------------------- prediction files


def task_config(name: str):
    """The composed conf/task/<name>.yaml, reading the fixture folder."""
    return compose_config(f"task={name}", f"task.data_dir={FIXTURES / FOLDERS[name]}").task


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Hand-made test-split scores (one row per canonical example) and the leaderboard lines they must give.
SUBMISSIONS = {
    "rte": ([[2.0, 1.0], [0.0, 3.0]], [{"idx": 0, "label": "entailment"}, {"idx": 1, "label": "not_entailment"}]),
    "cb": ([[0.0, 0.0, 1.0]], [{"idx": 0, "label": "neutral"}]),
    "boolq": ([[0.0, 1.0]], [{"idx": 0, "label": "true"}]),
    "wic": ([[1.0, 0.0]], [{"idx": 0, "label": "false"}]),
    "wsc": ([[0.0, 1.0]], [{"idx": 0, "label": "True"}]),
    "copa": ([[0.2, 0.7]], [{"idx": 0, "label": 1}]),
    # one paragraph, one question, answers 0 and 1
    "multirc": (
        [[0.0, 1.0], [1.0, 0.0]],
        [
            {
                "idx": 0,
                "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]}]},
            }
        ],
    ),
    # candidates in sorted order: Inter Miami, Lionel Messi, Messi, Orlando; "Messi" has the best true-minus-false
    "record": ([[0.0, 1.0], [0.0, 2.0], [-1.0, 2.0], [3.0, 0.0]], [{"idx": 0, "label": "Messi"}]),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_write_predictions_gives_the_leaderboard_file(tmp_path, name):
    task = task_config(name)
    examples = superglue.load(task, "test")
    scores, expected = SUBMISSIONS[name]
    assert len(examples) == len(scores)
    kind = multiple_choice if name == "copa" else classification
    paths = kind.write_predictions(task, Split("test", examples, None), [np.array(row) for row in scores], tmp_path)
    assert paths == [tmp_path / superglue.SUBMISSION_NAMES[name]]
    assert read_lines(paths[0]) == expected


def test_write_predictions_of_other_tasks_name_the_labels(tmp_path):
    task = OmegaConf.create({"name": "toy", "reader": "local", "labels": ["neg", "pos"]})
    split = Split("dev", [{"idx": 7}, {"idx": 9}], None)
    paths = classification.write_predictions(task, split, [np.array([0.1, 0.9]), np.array([0.8, 0.2])], tmp_path)
    assert paths == [tmp_path / "toy-dev.jsonl"]
    assert read_lines(paths[0]) == [{"idx": 7, "label": "pos"}, {"idx": 9, "label": "neg"}]
    paths = multiple_choice.write_predictions(
        task, split, [np.array([0.1, 0.9, 0.0]), np.array([2.0, 0.2, 1.0])], tmp_path
    )
    assert read_lines(paths[0]) == [{"idx": 7, "label": 1}, {"idx": 9, "label": 0}]


# ----------------------------------------------------------------------------------------------------- composition

# The official run scripts' values (THUDM/P-tuning-v2 run_script/run_<task>_<bert|roberta>.sh):
# preset -> (lr, prompt length, batch size, epochs, seed).
OFFICIAL = {
    "boolq-bert-large-cased": (5e-3, 40, 32, 100, 11),
    "boolq-roberta-large": (7e-3, 8, 32, 100, 11),
    "copa-bert-large-cased": (1e-2, 16, 16, 80, 44),
    "copa-roberta-large": (9e-3, 8, 16, 120, 11),
    "rte-bert-large-cased": (1e-2, 20, 32, 60, 11),
    "rte-roberta-large": (5e-3, 128, 32, 100, 11),
    "wic-bert-large-cased": (1e-4, 20, 16, 80, 44),
    "wic-roberta-large": (1e-2, 8, 32, 50, 11),
    "wsc-bert-large-cased": (5e-3, 20, 16, 80, 44),
    "wsc-roberta-large": (1e-2, 8, 16, 10, 44),
}


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONF / "task").glob("*.yaml")))
def test_every_task_config_composes(name):
    task = compose_config(f"task={name}").task
    if name in superglue.TASKS:
        assert task.name == name and task.reader == "superglue" and task.metric == OFFICIAL_KEYS[name][0][0]
        assert list(task.labels) == superglue.LABELS[name]
        assert task.hub.path == "aps/super_glue" and task.hub.name == name
        assert task.hub.revision == compose_config("task=rte").task.hub.revision  # one revision for the whole benchmark
        assert task.type == ("multiple_choice" if name == "copa" else "classification")
        assert task.options.verbalizer and task.head == "linear"
        if name in superglue.TEMPLATES:
            assert task.options.template == superglue.TEMPLATES[name][0]


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONF / "preset").glob("*.yaml")))
def test_every_preset_composes(name):
    cfg = compose_config(f"preset={name}")
    task, backbone_name = name.split("-", 1)
    if task in superglue.TASKS:
        assert cfg.task.name == task and cfg.backbone.name == backbone_name
    if name in OFFICIAL:
        lr, length, batch_size, epochs, seed = OFFICIAL[name]
        assert (cfg.optimizer.lr, cfg.prompt.length, cfg.trainer.batch_size) == (lr, length, batch_size)
        assert (cfg.trainer.epochs, cfg.trainer.seed, cfg.task.max_length) == (epochs, seed, 128)
    if name == "wic-bert-large-cased":
        assert cfg.task.options.template == "word_prefix" and cfg.prompt.projection == "mlp"
