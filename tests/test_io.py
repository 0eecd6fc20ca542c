"""The one writer (ptv2.io): every command's outputs are declared there, and no command writes through a link.

The list of outputs is taken from the writer itself (io.OUTPUTS, filled by each command module's `declare`): each
command runs once into a clean folder, every file it wrote must match a declared name (so a new output is covered
when it is added), then it runs again into a folder where a link to a file outside stands at each of those paths.
Nothing outside may change: the command refuses in one line, or replaces the links with its files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import shutil
from pathlib import Path

import pytest
from conftest import RTE, SMOKE, TINY_BERT, ptv2

from ptv2 import io

COMMAND_MODULES = ("train", "evaluate", "predict", "table", "bench", "pack_bench", "export")
TINY_BENCH = ["backbone=tiny", "bench.isolate=false", "bench.methods=[ptv2]", "bench.batch_size=2"]
TINY_BENCH += ["bench.seq_length=12", "bench.prompt_length=3", "bench.warmup_steps=1", "bench.steps=1"]
TINY_BENCH += ["bench.eval_batches=1", "bench.eval_batch_size=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    ptv2("train", *SMOKE, "logger=none", f"hydra.run.dir={run}")
    return run


def recipes(trained: Path, out: Path) -> dict[str, list[str]]:
    """The command line of each command, writing into `out`."""
    tables = out.parent / f"{out.name}-runs"
    if not tables.exists():
        shutil.copytree(trained, tables / "run")
    return {
        "train": ["train", *SMOKE, "logger=none", f"hydra.run.dir={out}"],
        "eval": ["eval", f"ckpt={trained}", f"task.data_dir={RTE}", f"hydra.run.dir={out}"],
        "predict": ["predict", f"ckpt={trained}", f"task.data_dir={RTE}", "split=dev", f"hydra.run.dir={out}"],
        "table": ["table", str(tables), "--out", str(out)],
        "bench": ["bench", *TINY_BENCH, f"hydra.run.dir={out}"],
        "export": ["export", str(trained), "--to", "peft", str(out), "--backbone", str(TINY_BERT)],
        "import": [
            "import",
            str(adapter(trained, out.parent)),
            "--from",
            "peft",
            str(out),
            "--like",
            str(trained),
            "--backbone",
            str(TINY_BERT),
        ],
    }


def adapter(trained: Path, root: Path) -> Path:
    """An exported adapter of the trained run, to import."""
    folder = root / "adapter-to-import"
    if not folder.exists():
        ptv2("export", str(trained), "--to", "peft", str(folder), "--backbone", str(TINY_BERT))
    return folder


def written(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def declared(command: str) -> tuple[str, ...]:
    for name in COMMAND_MODULES:
        importlib.import_module(f"ptv2.commands.{name}")
    return io.OUTPUTS[command]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "table", "bench", "export", "import"])
def test_no_command_writes_through_a_link_at_any_of_its_outputs(command, trained, tmp_path):
    clean = tmp_path / "clean"
    ptv2(*recipes(trained, clean)[command])
    files = written(clean)
    patterns = declared(command)
    undeclared = [name for name in files if not any(fnmatch.fnmatch(name, p) for p in patterns)]
    assert files and not undeclared, f"{command} wrote files it does not declare (io.declare): {undeclared}"

    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "planted"
    targets = {}
    for index, name in enumerate(files):
        target = outside / f"target{index}"
        target.write_text(f"not ptv2's {index}\n")
        targets[target] = hashlib.sha256(target.read_bytes()).hexdigest()
        (planted / name).parent.mkdir(parents=True, exist_ok=True)
        (planted / name).symlink_to(target)
    replace = ["--overwrite"] if command in ("export", "import") else []  # past the refusal of earlier work
    result = ptv2(*recipes(trained, planted)[command], *replace, check=False)
    assert all(hashlib.sha256(t.read_bytes()).hexdigest() == digest for t, digest in targets.items()), result.stderr
    assert sorted(p.name for p in outside.iterdir()) == sorted(t.name for t in targets)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("ptv2: error:")]
        assert len(lines) == 1 and "link" in lines[0], result.stderr[-2000:]


def test_a_link_between_the_output_folder_and_a_file_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").symlink_to(elsewhere)
    with pytest.raises(io.UserError, match="is a symbolic link"):
        io.write_text(tmp_path / "out" / "sub" / "file.txt", "x", within=tmp_path / "out")
    assert list(elsewhere.iterdir()) == []


def test_earlier_work_is_kept_unless_asked(tmp_path):
    path = io.write_text(tmp_path / "a.json", "first")
    with pytest.raises(io.Exists, match="pass overwrite=true"):
        io.write_text(path, "second", keep="pass overwrite=true to replace it")
    assert path.read_text() == "first"
    io.write_text(path, "second")
    assert path.read_text() == "second"


def test_predict_keeps_earlier_predictions_in_an_explicit_folder(trained, tmp_path):
    out = tmp_path / "predictions"
    args = ["predict", f"ckpt={trained}", f"task.data_dir={RTE}", "split=dev", f"output_dir={out}"]
    ptv2(*args, f"hydra.run.dir={tmp_path / 'p1'}")
    before = {name: (out / name).read_bytes() for name in written(out)}
    again = ptv2(*args, check=False)
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        .splitlines()[-1]
        .endswith("replace them with trainer.overwrite=true, or pass another output_dir=DIR")
    )
    assert {name: (out / name).read_bytes() for name in written(out)} == before
    ptv2(*args, "trainer.overwrite=true")


def test_a_finished_run_keeps_no_lock_file(trained):
    assert not (trained / ".ptv2.lock").exists()
