"""Data folders that just work: each split's file and its format are found from what `task.data_dir` holds (the
reader's `local_files` names); where the folder leaves a choice, one line names the overrides that settle it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import SMOKE, ptv2
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from ptv2 import tasks
from ptv2.config import TaskConfig
from ptv2.data import prepare_split, squad, superglue, tagging
from ptv2.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
TAGGING = FIXTURES / "tagging"
TINY_BERT = Path(tasks.__file__).parents[1] / "assets" / "tiny-bert"
REPO = Path(__file__).resolve().parents[1]


def task(name: str, data_dir: Path, **fields):
    """A task node as the core builds it from conf/task/<name>.yaml: format and files left to detection."""
    node = OmegaConf.merge(
        OmegaConf.structured(TaskConfig),
        {"name": name, "reader": "tagging", "type": "tagging", "data_dir": str(data_dir), **fields},
    )
    OmegaConf.set_struct(node, True)
    return node


def folder(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A data folder holding copies of fixture files under the given names."""
    tmp_path.mkdir(exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, tmp_path / name)
    return tmp_path


def test_ontonotes_reads_a_folder_of_conll_column_files(tmp_path):
    data = folder(tmp_path, {f"{s}.txt": TAGGING / "conll03_iob1.txt" for s in ("train", "dev", "test")})
    examples = tagging.load(task("ontonotes", data), "dev")
    assert examples[0]["tokens"] == ["Acme", "Corp", "hired", "Jane", "Doe", "."]  # token column 0, not the pack's 1
    assert examples[0]["tags"] == ["B-ORG", "I-ORG", "O", "B-PER", "I-PER", "O"]


def test_conll04_reads_spert_json_files(tmp_path):
    data = folder(tmp_path, {f"conll04_{s}.json": TAGGING / "conll04_spert.json" for s in ("train", "dev", "test")})
    examples = tagging.load(task("conll04", data), "train")
    assert examples[0]["tags"][:2] == ["B-Peop", "I-Peop"]


def test_official_pack_folders_need_no_format(tmp_path):
    assert tagging.load(task("ontonotes", TAGGING / "ontonotes_pack"), "dev")[0]["tokens"][0] == "Mary"  # 2nd column
    srl = tagging.load(task("conll05", TAGGING / "conll05_pack"), "test_brown")
    assert srl and all(example["predicate"] >= 0 for example in srl)
    # The pack's CoNLL03 dev file is valid.txt; column files found by name read the same.
    data = folder(tmp_path, {"train.txt": TAGGING / "conll03_iob1.txt", "valid.txt": TAGGING / "conll03_iob1.txt"})
    assert tagging.load(task("conll03", data), "dev") == tagging.load(task("conll03", data), "train")


def test_a_named_file_gets_its_format_from_name_extension_or_content(tmp_path):
    # SRL .txt files are either the pack's lines or bracket columns: the content decides.
    columns = task("conll05", TAGGING, files={"train": "conll05_columns.txt"})
    assert tagging.load(columns, "train")[0]["tokens"][:2] == ["The", "company"]
    shutil.copy(TAGGING / "conll05_pack" / "conll05.train.txt", tmp_path / "mine.txt")
    assert tagging.load(task("conll05", tmp_path, files={"train": "mine.txt"}), "train")[0]["predicate"] == 2
    assert tagging.load(task("conll04", TAGGING, files={"dev": "conll04_bilou.jsonl"}), "dev")[0]["tags"][0] == "B-Peop"


def test_ambiguous_folders_name_the_overrides_that_settle_them(tmp_path):
    data = folder(
        tmp_path, {"train.txt": TAGGING / "conll03_iob1.txt", "conll04_train.json": TAGGING / "conll04_spert.json"}
    )
    with pytest.raises(UserError) as error:
        tagging.load(task("conll04", data), "train")
    message = str(error.value)
    assert "\n" not in message
    assert "holds several train files, train.txt (conll) and conll04_train.json (json)" in message
    assert message.endswith("add task.format=conll or task.format=json")
    assert tagging.load(task("conll04", data, format="json"), "train")[0]["tags"][0] == "B-Peop"  # settled

    folder(tmp_path, {"dev.txt": TAGGING / "conll03_iob1.txt", "valid.txt": TAGGING / "conll03_iob1.txt"})
    with pytest.raises(UserError, match=r"add task.files.dev=dev.txt or task.files.dev=valid.txt$"):
        tagging.load(task("conll03", data), "dev")


def test_a_missing_split_says_what_names_are_read(tmp_path):
    data = folder(tmp_path, {"train.txt": TAGGING / "conll03_iob1.txt"})
    with pytest.raises(UserError) as error:
        tagging.load(task("conll03", data), "test")
    message = str(error.value)
    assert f"task conll03: no test file in {data} (it holds: train.txt); expected test.txt, test.conll" in message
    assert "conll03_test.json, test.json, test.jsonl (json)" in message and message.endswith("task.files.test=FILE")
    with pytest.raises(UserError, match="task.format=xml is unknown; this task reads conll, ptv2_pack, json"):
        tagging.load(task("conll03", data, format="xml"), "train")


def test_superglue_and_squad_find_their_official_names(tmp_path):
    mine = folder(tmp_path, {"mine.json": FIXTURES / "rte_small" / "val.jsonl"})  # a reader of one format reads it
    labels = ["entailment", "not_entailment"]
    named = OmegaConf.create({"name": "rte", "data_dir": str(mine), "files": {"dev": "mine.json"}, "labels": labels})
    assert len(superglue.load(named, "dev")) == 6
    rte = OmegaConf.create(
        {"name": "rte", "data_dir": str(FIXTURES / "rte_small"), "labels": ["entailment", "not_entailment"]}
    )
    assert len(superglue.load(rte, "dev")) == 6  # val.jsonl
    # One folder holds both SQuAD versions: each task finds its own files.
    for name, version_2 in (("squad", False), ("squad_v2", True)):
        config = OmegaConf.create(
            {"name": name, "data_dir": str(FIXTURES / "squad"), "options": {"version_2": version_2}}
        )
        expected = json.loads((FIXTURES / "squad" / f"dev-{'v2.0' if version_2 else 'v1.1'}.json").read_text())
        questions = [qa["id"] for article in expected["data"] for p in article["paragraphs"] for qa in p["qas"]]
        assert [example["id"] for example in squad.load(config, "dev")] == questions


def test_the_cache_follows_the_file_found(tmp_path):
    """Replacing the folder's files (same task config) is not answered from the cache of the old ones."""
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BERT))
    kind = tasks.task_type("tagging")
    data = folder(tmp_path / "data", {"train.txt": TAGGING / "conll03_iob1.txt"})
    config = task("conll04", data, labels=["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"])
    first = prepare_split(config, "train", tokenizer, kind, str(tmp_path / "cache"))
    (data / "train.txt").unlink()
    shutil.copy(TAGGING / "conll04_spert.json", data / "conll04_train.json")
    second = prepare_split(config, "train", tokenizer, kind, str(tmp_path / "cache"))
    assert first.examples[0]["tokens"][0] == "Acme" and second.examples[0]["tokens"][0] == "John"
    assert config.files.get("train") is None and config.format is None  # the run's config is left as given


def test_train_with_only_data_dir_and_a_one_line_error_when_ambiguous(tmp_path):
    data = folder(tmp_path / "data", {f"{s}.txt": TAGGING / "conll03_iob1.txt" for s in ("train", "dev", "test")})
    smoke = [arg for arg in SMOKE if not arg.startswith("task.data_dir")]
    ptv2("train", *smoke, "task=ontonotes", f"task.data_dir={data}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "ontonotes" and "f1" in results["test_at_best"]
    assert (
        f"task ontonotes, train split: {data / 'train.txt'} (format conll)"
        in (tmp_path / "run" / "train.log").read_text()
    )

    shutil.copy(TAGGING / "conll04_spert.json", data / "conll04_dev.json")
    failed = ptv2("train", *smoke, "task=conll04", f"task.data_dir={data}", "logger=none", check=False)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"ptv2: error: task conll04: {data} holds several dev files, dev.txt (conll) and conll04_dev.json (json); "
        "add task.format=conll or task.format=json"
    ]


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="make demo runs the repository's .venv")
def test_make_demo_without_the_data_or_the_hub_says_where_to_get_the_files(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # a hub that refuses connections at once
    result = subprocess.run(
        ["make", "-s", "demo", f"SHARED={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[0] == (
        f"make demo: no {tmp_path}/superglue/RTE and no Hugging Face hub: unzip "
        "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/RTE.zip into DIR/superglue, then make demo SHARED=DIR"
    )
