"""Files from elsewhere never run code and never make ptv2 write outside its place.

Each crafted file here is armed: a control shows that Python's plain pickle loading of it WOULD create a marker
folder; ptv2 then reads the same file and the marker must not appear. Covered: a training state (trainer.resume),
a planted data-cache entry, and checkpoint metadata (paths, interpolations, names used in file names).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RTE
from safetensors.torch import load_file, save_file
from test_bad_input import BASE, one_line_error, run

from ptv2.errors import UserError
from ptv2.runs import checkpoint
from ptv2.runs.resume import STATE_DIR, STATE_FILE


class Armed:
    """Unpickling this calls os.makedirs(marker): the stand-in for any code a crafted pickle runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def assert_armed(path: Path, loader: str, tmp_path: Path) -> None:
    """Control: loading `path` the unsafe way (`loader`: torch or pickle) in a child process creates the marker the
    file names, so the file would run code if ptv2 loaded it that way."""
    load = "torch.load(p, weights_only=False)" if loader == "torch" else "pickle.loads(open(p, 'rb').read())"
    code = f"import pickle, torch; p = {str(path)!r}; {load}"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    control = tmp_path / "control_marker"
    assert control.is_dir(), "the crafted file is not armed: the test would prove nothing"
    control.rmdir()


def armed_state(path: Path, marker: Path) -> None:
    """A state file with every entry ptv2 expects and a payload in the trainable tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"trainable": Armed(marker), "best_state": None, "optimizer": {}, "scheduler": {}, "rng": {}}
    torch.save({**state, "config": "{}", "progress": "{}"}, path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = run("train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_a_crafted_training_state_never_runs_code_on_resume(tmp_path):
    marker = tmp_path / "control_marker"
    state_file = tmp_path / "run" / STATE_DIR / STATE_FILE
    armed_state(state_file, marker)
    assert_armed(state_file, "torch", tmp_path)

    armed_state(state_file, tmp_path / "marker")  # the same file, pointed at the marker checked below
    config_before = tmp_path / "run" / "config.yaml"
    config_before.write_text("the interrupted run's config\n")
    result = run("train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.resume=true")
    message = one_line_error(result)
    assert "holds objects other than tensors and plain values, which could run code when loaded; refused" in message
    assert not (tmp_path / "marker").exists()
    # Refused before anything was written: the folder's config and Hydra record are untouched.
    assert config_before.read_text() == "the interrupted run's config\n"
    assert not (tmp_path / "run" / ".hydra").exists()


def test_a_state_file_that_is_not_a_ptv2_state_is_one_line(tmp_path):
    state_file = tmp_path / "run" / STATE_DIR / STATE_FILE
    state_file.parent.mkdir(parents=True)
    torch.save({"just": torch.zeros(2)}, state_file)  # loadable, but not ours
    result = run("train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.resume=true")
    assert "is not a ptv2 training state (missing entries)" in one_line_error(result)
    state_file.write_bytes(b"PK\x03\x04 truncated")
    result = run("train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.resume=true")
    assert "is not a readable training state" in one_line_error(result)


def test_the_saved_state_holds_only_tensors_and_plain_values(finished_run):
    state = torch.load(finished_run / STATE_DIR / STATE_FILE, weights_only=True)  # raises on anything else
    assert set(state) == {"trainable", "best_state", "optimizer", "scheduler", "rng", "config", "progress"}
    assert json.loads(state["progress"])["step"] == 2 and json.loads(state["config"])["task"]["name"] == "rte"


def test_a_planted_cache_entry_never_runs_code_and_a_damaged_one_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    first = run(
        "train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'a'}", env={"PTV2_CACHE": str(cache)}
    )
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted((cache / "features").iterdir())
    assert entries and all(p.name.startswith("rte-") for p in entries)
    for entry in entries:  # data only: Arrow and JSON, no pickle
        assert {p.suffix for p in entry.iterdir()} == {".arrow", ".json"}, sorted(p.name for p in entry.iterdir())
    # Plant an armed pickle under the old examples name in every entry and damage the JSON examples: the next run
    # must neither run the pickle nor fail on the damage (the entries are rebuilt).
    payload = pickle.dumps(Armed(tmp_path / "control_marker"))
    (tmp_path / "armed.pickle").write_bytes(payload)
    assert_armed(tmp_path / "armed.pickle", "pickle", tmp_path)
    for entry in entries:
        (entry / "ptv2_examples.pickle").write_bytes(pickle.dumps(Armed(tmp_path / "marker")))
        examples = entry / "ptv2_examples.json"
        examples.write_text(examples.read_text()[: len(examples.read_text()) // 2])  # truncated
    second = run(
        "train", *BASE, f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'b'}", env={"PTV2_CACHE": str(cache)}
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert not (tmp_path / "marker").exists()
    assert "is unreadable" in second.stdout + second.stderr  # warned, then rebuilt
    ours, theirs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert ours["best"] == theirs["best"]


@pytest.mark.parametrize("damage", ["arrow", "state"])
def test_a_damaged_cache_entry_is_rebuilt_in_process(tmp_path, damage):
    from conftest import compose_config
    from transformers import AutoTokenizer

    from ptv2.data import prepare_split
    from ptv2.tasks import classification

    task = compose_config("backbone=tiny", f"task.data_dir={RTE}").task
    tokenizer = AutoTokenizer.from_pretrained(str(Path(__file__).parents[1] / "src" / "ptv2" / "assets" / "tiny-bert"))
    first = prepare_split(task, "train", tokenizer, classification, str(tmp_path))
    (entry,) = (tmp_path / "features").iterdir()
    if damage == "arrow":
        (arrow,) = entry.glob("*.arrow")
        # A new file in its place: the first split still maps the old one (truncating that in place would crash
        # this process with SIGBUS, as any reader of a file shrunk under its mapping).
        (entry / "truncated").write_bytes(arrow.read_bytes()[:200])
        os.replace(entry / "truncated", arrow)
    else:
        (entry / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../../elsewhere.arrow"}]}))
    again = prepare_split(task, "train", tokenizer, classification, str(tmp_path))
    assert again.examples == first.examples and again.features[:] == first.features[:]


def test_cache_examples_round_trip_with_shared_strings():
    from ptv2.data import decode_examples, encode_examples

    examples = [{"id": str(i), "context": "a long shared context", "answers": {"text": ["x"]}} for i in range(4)]
    text = encode_examples(examples)
    assert text.count("a long shared context") == 1 and decode_examples(text) == examples
    with pytest.raises((ValueError, IndexError, KeyError, TypeError)):
        decode_examples(json.dumps({"shared": {"context": []}, "examples": [{"context": 3}]}))


def crafted_checkpoint(finished_run: Path, folder: Path, edit) -> Path:
    """A copy of the run's checkpoint whose stored run config went through edit(config)."""
    tensors, metadata = load_file(str(finished_run / checkpoint.FILENAME)), checkpoint.read_metadata(finished_run)
    config = json.loads(metadata["config"])
    edit(config)
    path = folder / "crafted.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    return path


def test_checkpoint_names_never_place_files_outside_the_output_folder(finished_run, tmp_path):
    outside = tmp_path / "outside"
    crafted = crafted_checkpoint(finished_run, tmp_path, lambda c: c["task"].update(name=f"{outside}/name"))
    out = tmp_path / "predictions"
    result = run("predict", f"ckpt={crafted}", f"task.data_dir={RTE}", f"hydra.run.dir={out}")
    assert one_line_error(result) == (
        f"ptv2: error: {crafted}: task.name='{outside}/name' is not a valid name: use letters, digits, '_', '.' "
        "and '-' only (it names files); refused"
    )
    assert not outside.exists() and not any(p.suffix == ".jsonl" for p in out.rglob("*"))


def test_checkpoint_paths_and_interpolations_are_data(finished_run, tmp_path, monkeypatch):
    """trainer.cache_dir, task.data_dir and prompt.init_from of a checkpoint are not used; `${oc.env:...}` stays
    text; the run still predicts with the command's own data folder and cache."""
    trap = tmp_path / "trap"

    def edit(config):
        config["trainer"]["cache_dir"] = str(trap / "cache")
        config["task"]["data_dir"] = str(trap / "data")
        config["prompt"]["init_from"] = str(trap / "init")
        config["logger"]["project"] = "${oc.env:HOME}"

    crafted = crafted_checkpoint(finished_run, tmp_path, edit)
    saved = checkpoint.stored_config(crafted)
    assert saved.trainer.cache_dir is None and saved.task.data_dir is None and saved.prompt.init_from is None
    assert saved.logger.project == "${oc.env:HOME}"  # read back as the text it is, never resolved
    assert saved.backbone.name_or_path.endswith("tiny-bert")  # the packaged option on this machine
    out = tmp_path / "predictions"
    result = run("predict", f"ckpt={crafted}", f"task.data_dir={RTE}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not trap.exists() and (out / "RTE.jsonl").is_file()
    # Without a packaged option of its name, a local backbone folder is not taken either.
    foreign = crafted_checkpoint(finished_run, tmp_path, lambda c: c["backbone"].update(name="mine", name_or_path="/x"))
    result = run("eval", f"ckpt={foreign}", f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'eval'}")
    trained = checkpoint.read_metadata(foreign)["backbone"]
    assert one_line_error(result) == (
        f"ptv2: error: {foreign} was trained on the local backbone folder {trained}; folders are not taken from "
        "checkpoints: pass backbone.name_or_path=DIR"
    )


def test_a_checkpoint_with_a_local_hub_dataset_path_is_refused(finished_run, tmp_path):
    crafted = crafted_checkpoint(finished_run, tmp_path, lambda c: c["task"]["hub"].update(path="/etc"))
    with pytest.raises(UserError, match="task.hub.path='/etc' is not a hub dataset id"):
        checkpoint.stored_config(crafted)
