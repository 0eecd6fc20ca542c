"""Bad input ends with a clear message, a non-zero exit code, no Python traceback and nothing half-written.

Every user error, Hydra's included (unknown group option, misspelled key, wrong type, bad override syntax), ends
with one line `ptv2: error: ...` and exit code 2; Hydra's lines are folded into it (the key, the valid options).
Every numeric and enumerated setting is checked at start-up, with its range in the message. Checkpoint errors are
tested in test_checkpoint.py, resume errors in test_resume.py, crafted files in test_untrusted_files.py, run folders
in test_run_dirs.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import RTE, ptv2, ptv2_subprocess

from ptv2.runs.resume import NEXT_FILE, STATE_DIR, STATE_FILE
from ptv2.runs.resume import read as read_state

BASE = ["backbone=tiny", "trainer=smoke", "logger=none"]


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return ptv2(*args, env=env, cwd=cwd, check=False)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("ptv2: error: "), result.stderr[-2000:]
    return lines[0]


def train_error(tmp_path: Path, *args: str, env: dict | None = None) -> str:
    """The one-line error of a failing `ptv2 train`; the run directory holds no results or checkpoint."""
    run_dir = tmp_path / "run"
    message = one_line_error(run("train", *BASE, *args, f"hydra.run.dir={run_dir}", env=env))
    assert not (run_dir / "results.json").exists() and not (run_dir / "prompt.safetensors").exists()
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "task=nope",
            "In 'train': Could not find 'task/nope'; available options in 'task': boolq, cb, conll03, conll04, ",
        ),
        ("backbone=nope", "available options in 'backbone': bert-base-uncased, bert-large-cased,"),
        (
            "prompt=nope",
            "available options in 'prompt': apt, finetune, linear_probe, lora, peft_prefix, prefix_propagation,",
        ),
        ("trainer.epoch=3", "Could not override 'trainer.epoch' (Key 'epoch' not in 'TrainerConfig')"),
        ("trainer.epochs=abc", "(Value 'abc' of type 'str' could not be converted to Integer)"),
        ("trainer.epochs=[1", "no viable alternative at input '[1'"),
    ],
)
def test_config_mistakes_get_one_line_like_every_user_error(override, expected, tmp_path):
    result = run("train", *BASE, f"task.data_dir={RTE}", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert expected in one_line_error(result)
    assert one_line_error(result).endswith("; `ptv2 train --help` lists the options")
    if override == "trainer.epoch=3":
        assert "did you mean trainer.epochs?" in one_line_error(result)
    assert not (tmp_path / "run").exists()  # fails before the run directory is made


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["prompt.length=0"], "prompt.length=0 is out of range for prompt.method=ptv2; use an integer in [1, 4096]"),
        (["prompt.length=-3"], "prompt.length=-3 is out of range for prompt.method=ptv2; use an integer in [1, 4096]"),
        (["prompt.layers=[0,7]"], "prompt.layers=[0, 7]: the backbone has layers 0..1 (bad: [7])"),
        (
            ["prompt.shift_positions=true", "task.max_length=600"],
            "prompt length 16 + task.max_length 600 needs 616 positions but the backbone has 512; lower "
            "task.max_length or prompt.length or set prompt.shift_positions=false",
        ),
    ],
)
def test_prompt_values_the_backbone_cannot_take(overrides, expected, tmp_path):
    assert train_error(tmp_path, f"task.data_dir={RTE}", *overrides) == f"ptv2: error: {expected}"


# The examples and more: each was a traceback deep in PyTorch or silently accepted.
BAD_VALUES = [
    ("trainer.batch_size=0", "trainer.batch_size=0 is out of range; use an integer >= 1"),
    ("trainer.epochs=0", "trainer.epochs=0 is out of range; use an integer >= 1"),
    ("trainer.epochs=-1", "trainer.epochs=-1 is out of range; use an integer >= 1"),
    ("optimizer.lr=nan", "optimizer.lr=nan is out of range; use a number >= 0"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0 is out of range; use a number >= 0"),
    ("optimizer.lr=inf", "optimizer.lr=inf is out of range; use a number >= 0"),
    ("prompt.dropout=2", "prompt.dropout=2.0 is out of range; use a number in [0, 1)"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0] is out of range; use two numbers in [0, 1)"),
    ("optimizer.betas=[-0.1,0.9]", "optimizer.betas=[-0.1, 0.9] is out of range; use two numbers in [0, 1)"),
    ("task.max_length=1", "task.max_length=1 is out of range; use an integer >= 8"),
    ("backbone.dtype=int8", "backbone.dtype=int8 is unknown; choose one of float32, bfloat16, float16"),
    (
        "task.reader=foo",
        "task.reader=foo is unknown; choose one of instructions, squad, superglue, tagging, text_pairs",
    ),
    ("trainer.limit_train=0", "trainer.limit_train=0 is out of range; use null or an integer >= 1"),
    ("trainer.limit_eval=-30", "trainer.limit_eval=-30 is out of range; use null or an integer >= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 is out of range; use null or an integer >= 1"),
    ("trainer.seed=-1", "trainer.seed=-1 is out of range; use an integer in [0, 4294967295]"),
    ("scheduler.warmup_ratio=1.5", "scheduler.warmup_ratio=1.5 is out of range; use a number in [0, 1]"),
    ("scheduler.gamma=0", "scheduler.gamma=0.0 is out of range; use a number in (0, 1]"),
    (
        "task.type=regression",
        "task.type=regression is unknown; choose one of classification, generation, multiple_choice, ",
    ),
    ("optimizer.name=adam", "optimizer.name=adam is unknown; choose one of adamw, sgd"),
    ("logger.name=tensorboard", "logger.name=tensorboard is unknown; choose one of wandb, none"),
    ("task.name=../../elsewhere", "task.name='../../elsewhere' is not a valid name: use letters, digits, '_', "),
    (
        "split=dev",
        "Could not override 'split' (Key 'split' not in 'TrainConfig'); it is a setting of `ptv2 eval` and "
        "`ptv2 predict` only",
    ),
]


@pytest.mark.parametrize(("override", "expected"), BAD_VALUES, ids=[override for override, _ in BAD_VALUES])
def test_every_bad_value_is_refused_at_start_up_in_one_line(override, expected, tmp_path):
    assert train_error(tmp_path, f"task.data_dir={RTE}", override).startswith(f"ptv2: error: {expected}")
    assert not (tmp_path / "run").exists()  # nothing left behind: Hydra's empty log and folder are removed


def test_a_refused_start_keeps_a_folder_that_existed_before(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert train_error(tmp_path, f"task.data_dir={RTE}", "trainer.epochs=0").startswith("ptv2: error: trainer.epochs")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    run("train", *BASE, f"task.data_dir={RTE}", "trainer.epochs=0", f"hydra.run.dir={tmp_path / 'empty'}")
    assert (tmp_path / "empty").is_dir()  # named and there before this start: left in place


def broken_copy(tmp_path: Path, edit) -> Path:
    """A copy of the RTE fixture with train.jsonl's lines passed through edit(lines) -> lines."""
    folder = tmp_path / "data"
    shutil.copytree(RTE, folder)
    lines = (folder / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("".join(line + "\n" for line in edit(lines)))
    return folder


def test_data_problems_name_the_file_line_and_field(tmp_path):
    missing_dir = tmp_path / "nowhere"
    assert f"task.data_dir={missing_dir} is not a directory" in train_error(tmp_path, f"task.data_dir={missing_dir}")

    no_train = tmp_path / "no_train"
    no_train.mkdir()
    shutil.copy(RTE / "val.jsonl", no_train)
    message = train_error(tmp_path, f"task.data_dir={no_train}")
    assert f"no train file in {no_train} (it holds: val.jsonl); expected train.jsonl (jsonl); or name it" in message

    bad = broken_copy(tmp_path / "a", lambda lines: [*lines[:2], '{"premise": "x",', *lines[3:]])
    assert f"{bad / 'train.jsonl'}:3: malformed JSON" in train_error(tmp_path, f"task.data_dir={bad}")

    bad = broken_copy(tmp_path / "b", lambda lines: [*lines[:4], lines[4].replace('"hypothesis"', '"hypo"')])
    assert f"{bad / 'train.jsonl'}:5: missing field 'hypothesis'" in train_error(tmp_path, f"task.data_dir={bad}")

    bad = broken_copy(tmp_path / "c", lambda lines: [lines[0].replace('"entailment"', '"maybe"'), *lines[1:]])
    message = train_error(tmp_path, f"task.data_dir={bad}")
    assert f"{bad / 'train.jsonl'}:1: unknown label 'maybe'" in message

    bad = broken_copy(tmp_path / "d", lambda lines: [])
    assert "the train split of task rte" in train_error(tmp_path, f"task.data_dir={bad}")


def test_offline_without_cached_hub_data_says_to_pass_data_dir(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    message = train_error(tmp_path, env=offline)
    assert "could not load aps/super_glue/rte split 'train' from the Hugging Face hub" in message
    assert "(HF_HUB_OFFLINE is set and the hub cache has no copy)" in message
    assert "task.data_dir=DIR" in message and "backbone=minilm" in message
    assert "set HF_HUB_OFFLINE=1" not in message  # already set: advice that would change nothing


def test_an_unreachable_hub_is_probed_once_and_fails_fast_naming_the_fixes(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, and a hub address nobody listens on: one probe, then the clients read only their cache."""
    import datasets.config
    import huggingface_hub.constants

    from ptv2 import hub

    monkeypatch.setattr(hub, "_state", {})  # the switch to cache-only is put back for the other tests
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    message = train_error(tmp_path, env=env)
    assert "(the Hugging Face hub is unreachable and the hub cache has no copy)" in message
    assert "task.data_dir=DIR" in message and "backbone=minilm" in message
    assert "backbone.name_or_path=DIR" in message
    assert hub._state == {"reachable": False, "switched": True}
    message = train_error(tmp_path, f"task.data_dir={RTE}", "backbone.name_or_path=no-such/model", env=env)
    assert "could not load the config of backbone 'no-such/model' (the Hugging Face hub is unreachable" in message
    assert "backbone.name_or_path=DIR" in message and "backbone=minilm" in message


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    # A huge learning rate without clipping blows the prompt up after the first step.
    message = train_error(
        tmp_path, f"task.data_dir={RTE}", "optimizer.lr=1e30", "trainer.max_grad_norm=0", "trainer.max_steps=null"
    )
    assert message.startswith("ptv2: error: the loss became nan at step 2 (epoch 1); lower optimizer.lr")
    assert "the training state of step 1" in message
    import torch

    state = read_state(tmp_path / "run" / STATE_DIR / STATE_FILE)
    assert state["progress"]["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = one_line_error(run("train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={blocker / 'run'}"))
    assert message == (
        f"ptv2: error: cannot create the run directory {blocker / 'run'}: {blocker} is not a folder; "
        "pass hydra.run.dir=DIR with a writable DIR"
    )
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        message = one_line_error(run("train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={locked / 'run'}"))
        assert f"{locked} is not writable" in message


def test_unreachable_wandb_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """A bogus key and a W&B server address nobody listens on (loopback only) must not stop the run: the start
    probes the server once and opens the W&B run offline (test_sweeps runs offline W&B to the end)."""
    import wandb
    from conftest import compose_config

    from ptv2.runs.tracking import Tracker

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    starts = []
    monkeypatch.setattr(wandb, "init", lambda **options: starts.append(options) or object())
    cfg = compose_config("backbone=tiny", "logger=wandb", "logger.init_timeout=15")
    with caplog.at_level("WARNING", logger="ptv2.runs.tracking"):
        Tracker(cfg, tmp_path)
    assert [start["mode"] for start in starts] == ["offline"]
    assert caplog.messages == ["W&B server 127.0.0.1:9 did not answer: logging offline"]


# ------------------------------------------------------------------ files and data that are odd, not malformed
FIXTURES = Path(__file__).parent / "fixtures"


def task_config(*overrides: str):
    from conftest import compose_config

    return compose_config("backbone=tiny", *overrides).task


def load_error(*overrides: str) -> str:
    """The one-line UserError of reading the train split of a task config (in process: every reader)."""
    from ptv2.data import load_examples
    from ptv2.errors import UserError

    with pytest.raises(UserError) as error:
        load_examples(task_config(*overrides), "train")
    assert "\n" not in str(error.value)
    return str(error.value)


def with_bad_byte(source: Path, folder: Path, name: str, line: int) -> Path:
    """A copy of `source` as folder/name with byte 0xff put into line `line` (1-based)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = source.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1][:3] + b"\xff" + lines[line - 1][3:]
    (folder / name).write_bytes(b"\n".join(lines))
    return folder / name


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    jsonl = with_bad_byte(RTE / "train.jsonl", tmp_path / "rte", "train.jsonl", 3)
    shutil.copy(RTE / "val.jsonl", tmp_path / "rte")
    expected = f"{jsonl}:3: byte 0xff is not UTF-8 text (invalid start byte); save the file as UTF-8"
    assert train_error(tmp_path, f"task.data_dir={tmp_path / 'rte'}") == f"ptv2: error: {expected}"
    conll = with_bad_byte(FIXTURES / "tagging" / "conll03_iob1.txt", tmp_path / "conll", "train.txt", 4)
    assert load_error("task=conll03", f"task.data_dir={tmp_path / 'conll'}").startswith(f"{conll}:4: byte 0xff")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_an_unreadable_file_is_named(tmp_path):
    folder = tmp_path / "rte"
    shutil.copytree(RTE, folder)
    (folder / "train.jsonl").chmod(0)
    message = train_error(tmp_path, f"task.data_dir={folder}")
    assert f"{folder / 'train.jsonl'}" in message and "ermission denied" in message


@pytest.mark.parametrize("kind", ["folder", "fifo", "broken link"])
def test_a_split_file_that_is_not_a_file_says_what_it_is(tmp_path, kind):
    folder = tmp_path / "rte"
    folder.mkdir()
    shutil.copy(RTE / "val.jsonl", folder)
    target = folder / "train.jsonl"
    if kind == "folder":
        target.mkdir()
        what = "is a folder, not a file"
    elif kind == "fifo":
        os.mkfifo(target)
        what = "is a FIFO"
    else:
        target.symlink_to(folder / "gone.jsonl")
        what = f"is a broken symbolic link (to {folder / 'gone.jsonl'})"
    message = train_error(tmp_path, f"task.data_dir={folder}")
    assert message == (
        f"ptv2: error: task rte: {target} {what}; put the train data file there or name another: task.files.train=FILE"
    )


def test_an_unusable_cache_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = train_error(tmp_path, f"task.data_dir={RTE}", f"trainer.cache_dir={blocker}")
    assert message == (
        f"ptv2: error: cannot use the data cache {blocker} (Not a directory: {blocker / 'features'}); set "
        "trainer.cache_dir=DIR (or PTV2_CACHE) to a writable folder"
    )
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        (locked / "features").mkdir(parents=True)
        (locked / "features").chmod(0o555)
        message = train_error(tmp_path, f"task.data_dir={RTE}", f"trainer.cache_dir={locked}")
        assert f"cannot use the data cache {locked / 'features'} (not writable)" in message


@pytest.mark.parametrize("split_file", ["train.jsonl", "val.jsonl"])
def test_a_null_label_is_refused_when_reading(tmp_path, split_file):
    folder = tmp_path / "rte"
    shutil.copytree(RTE, folder)
    lines = (folder / split_file).read_text().splitlines()
    lines[1] = lines[1].replace('"label": "not_entailment"', '"label": null')
    (folder / split_file).write_text("\n".join(lines) + "\n")
    assert train_error(tmp_path, f"task.data_dir={folder}") == (
        f"ptv2: error: {folder / split_file}:2: the label is null; train and dev files need a label on every example"
    )


def squad_copy(tmp_path: Path, edit) -> Path:
    """A folder with the SQuAD 1.1 fixture, its training file's questions passed through edit(questions)."""
    import json

    folder = tmp_path / "squad"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "squad" / "dev-v1.1.json", folder)
    document = json.loads((FIXTURES / "squad" / "train-v1.1.json").read_text())
    edit([qa for article in document["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]])
    (folder / "train-v1.1.json").write_text(json.dumps(document))
    return folder


def test_squad_answers_are_held_to_the_official_format(tmp_path, caplog):
    from ptv2.data import load_examples

    def no_answers(questions):
        questions[1]["answers"] = questions[2]["answers"] = []

    folder = squad_copy(tmp_path / "a", no_answers)
    message = load_error("task=squad", f"task.data_dir={folder}")
    assert message.startswith(f"{folder / 'train-v1.1.json'}: 2 of ") and "training questions have no answer" in message
    assert message.endswith("SQuAD 1.1 training needs one per question: use task=squad_v2 for unanswerable questions")

    def shifted(questions):
        questions[0]["answers"][0]["answer_start"] += 3

    folder = squad_copy(tmp_path / "b", shifted)
    task = task_config("task=squad", f"task.data_dir={folder}")
    complete = load_examples(task_config("task=squad", f"task.data_dir={FIXTURES / 'squad'}"), "train")
    with caplog.at_level("WARNING", logger="ptv2"):
        examples = load_examples(task, "train")
    assert len(examples) == len(complete) - 1  # left out of training, with a warning giving the count
    assert f"1 of {len(complete)} questions have an answer that is not at its answer_start" in caplog.text


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the training state cannot be written."""
    run_dir = tmp_path / "run"
    result = ptv2_subprocess(
        "train",
        *BASE,
        f"task.data_dir={RTE}",
        f"hydra.run.dir={run_dir}",
        env={"PTV2_CACHE": str(tmp_path / "cache")},
        file_size_limit=24_000,
        check=False,
    )
    message = one_line_error(result)
    # A state is first written beside the previous one (runs.resume.save_group), so that one stays as it was.
    assert message.startswith(f"ptv2: error: cannot write {run_dir / STATE_DIR / NEXT_FILE} (the write was cut short")
    assert message.endswith("its previous version, if any, is kept")
    assert not list((run_dir / STATE_DIR).iterdir())  # no temporary left behind
