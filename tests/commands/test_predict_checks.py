"""What predict and a run's start refuse in one line instead of ignoring: a split beside input=FILE, a missing field
named among the fields the file really has, an empty LoRA module list, an init_from run of another method; and
several prompts of one task predicting a user's file."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SMOKE, ptv2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, extra in {"a": [], "b": ["prompt.length=3"], "lora": ["prompt=lora"]}.items():
        ptv2("train", *SMOKE, "logger=none", *extra, f"hydra.run.dir={root / name}")
    return root


def one_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_input_with_a_split_is_refused(runs, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"premise": "A man sleeps.", "hypothesis": "He is awake."}) + "\n")
    line = one_line(ptv2("predict", str(runs / "a"), f"input={mine}", "split=dev", check=False))
    assert line == "ptv2: error: input=FILE and split=dev do not go together: input= predicts the file; drop split=dev"


def test_a_missing_field_lists_only_the_fields_of_the_file(runs, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"premise": "A man sleeps."}) + "\n")
    line = one_line(ptv2("predict", str(runs / "a"), f"input={mine}", check=False))
    assert line.endswith(f"{mine}:1: missing field 'hypothesis' (fields present: premise)")


def test_two_prompts_of_one_task_predict_a_users_file(runs, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"premise": "A man sleeps.", "hypothesis": "He is awake."}) + "\n")
    out = tmp_path / "out"
    ptv2("predict", f"ckpt=[{runs / 'a'},{runs / 'b'}]", f"input={mine}", f"hydra.run.dir={out}")
    for served in ("rte", "rte-1"):
        (record,) = [json.loads(line) for line in (out / served / f"{served}-scores.jsonl").read_text().splitlines()]
        assert record["record"] == 0 and set(record["scores"]) == {"entailment", "not_entailment"}


def test_an_empty_lora_module_list_is_refused_before_training(tmp_path):
    result = ptv2("train", *SMOKE, "prompt=lora", "prompt.target_modules=[]", f"hydra.run.dir={tmp_path}", check=False)
    assert "prompt.target_modules=[] names no module" in one_line(result)


def test_init_from_a_run_of_another_method_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    args = ["train", *SMOKE, "logger=none", f"prompt.init_from={runs / 'lora'}", f"hydra.run.dir={run}"]
    line = one_line(ptv2(*args, check=False))
    assert "holds lora tensors this model has no place for" in line and "of the same prompt method" in line
    assert not (run / "results.json").exists()


def test_init_from_a_run_of_the_same_method_starts_from_its_prompt(runs, tmp_path):
    ptv2("train", *SMOKE, "logger=none", f"prompt.init_from={runs / 'a'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "results.json").is_file()


def test_classify_refuses_what_it_cannot_serve_in_one_line(runs):
    """PromptServer.classify (the library call beside `ptv2 serve`): an unknown task, texts and tasks of different
    lengths and a None text are one line each; an empty batch is an empty answer; a good pair gets a label."""
    from ptv2.errors import UserError
    from ptv2.serving import PromptServer

    server = PromptServer.from_checkpoints([str(runs / "a")]).eval()
    assert server.classify([], []) == []
    assert server.classify([("A man sleeps.", "He is awake.")], ["rte"])[0] in ("entailment", "not_entailment")
    for texts, tasks, says in [
        (["a text"], ["nope"], "task 'nope' is not served; served: rte"),
        (["a", "b"], ["rte"], "2 text(s) and 1 task name(s)"),
        ([None], ["rte"], "text 0 is None"),
    ]:
        with pytest.raises(UserError, match=re.escape(says)):
            server.classify(texts, tasks)
