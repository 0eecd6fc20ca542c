"""A run folder is never lost: a finished run is not replaced without trainer.resume / trainer.overwrite=true, two
runs never share a default folder, a folder being written is locked, and a refused run writes nothing there."""

from __future__ import annotations

import fcntl
import json

import pytest
from conftest import RTE, start_ptv2
from test_bad_input import BASE, one_line_error, run

from ptv2.runs.rundir import LOCK_FILE, unique_now

TRAIN = ["train", *BASE, f"task.data_dir={RTE}"]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (but the lock file and the log, which a refused run may touch) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE and p.suffix != ".log"
    }


@pytest.fixture
def finished(tmp_path):
    run_dir = tmp_path / "run"
    result = run(*TRAIN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_a_fresh_run_into_a_finished_run_folder_is_refused_and_changes_nothing(finished):
    before = snapshot(finished)
    assert {"results.json", "prompt.safetensors", "config.yaml", ".hydra/overrides.yaml"} <= before.keys()
    # The preemption command of docs/usage.md (Resuming), re-issued without trainer.resume, and with another config.
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={finished}", "optimizer.lr=0.5"))
    assert message == (
        f"ptv2: error: {finished} already holds a run (results.json, prompt.safetensors, state); continue it with "
        "trainer.resume=true, replace it with trainer.overwrite=true, or choose another hydra.run.dir"
    )
    assert snapshot(finished) == before
    # eval / predict aimed at a training run's folder would replace its config.yaml: refused too.
    message = one_line_error(run("eval", f"ckpt={finished}", f"task.data_dir={RTE}", f"hydra.run.dir={finished}"))
    assert "already holds a run" in message and "trainer.resume" not in message
    assert snapshot(finished) == before


def test_a_refused_resume_leaves_config_and_hydra_record_as_they_were(finished):
    before = snapshot(finished)
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={finished}", "trainer.resume=true", "optimizer.lr=0.5"))
    assert "the config differs from the interrupted run's (optimizer.lr=0.01->0.5)" in message
    assert snapshot(finished) == before


def test_resume_of_a_finished_run_and_overwrite_are_explicit(finished):
    before = snapshot(finished)
    resumed = run(*TRAIN, f"hydra.run.dir={finished}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "nothing to resume, nothing written" in resumed.stderr and snapshot(finished) == before
    old = json.loads((finished / "results.json").read_text())
    replaced = run(*TRAIN, f"hydra.run.dir={finished}", "trainer.overwrite=true", "optimizer.lr=0.5")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "lr: 0.5" in (finished / "config.yaml").read_text()
    assert json.loads((finished / "results.json").read_text())["history"] != old["history"]


def test_a_folder_being_written_is_locked(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / LOCK_FILE, "a+") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        message = one_line_error(run(*TRAIN, f"hydra.run.dir={run_dir}"))
    assert message == (
        f"ptv2: error: {run_dir} is being written by another ptv2 run (pid 4242 on elsewhere); wait for it to end "
        "or choose another hydra.run.dir"
    )
    assert snapshot(run_dir) == {}  # nothing written
    result = run(*TRAIN, f"hydra.run.dir={run_dir}")  # released: the folder is usable again
    assert result.returncode == 0, result.stderr[-2000:]


def test_runs_started_together_get_their_own_default_folders(tmp_path):
    """Two runs started in the same second with the default run folder (outputs/<task>/<backbone>/<method>/...)."""
    jobs = [start_ptv2(*TRAIN, cwd=tmp_path) for _ in range(2)]
    for job in jobs:
        done = job.wait()
        assert done.returncode == 0, done.stderr[-2000:]
    folders = sorted((tmp_path / "outputs" / "rte" / "tiny" / "ptv2").iterdir())
    assert len(folders) == 2 and all((folder / "results.json").is_file() for folder in folders)


def test_unique_now_differs_between_calls():
    first, second = unique_now(), unique_now()
    assert first != second and len(first) == len("2026-11-29_19-32-25-a3f9c1") == len(second)


def test_a_sweep_into_a_finished_sweep_folder_is_refused_before_hydra_writes(tmp_path):
    sweep = tmp_path / "sweep"
    first = run("train", "-m", *BASE, f"task.data_dir={RTE}", "prompt.length=2,3", f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(sweep)
    message = one_line_error(
        run("train", "-m", *BASE, f"task.data_dir={RTE}", "prompt.length=4", f"hydra.sweep.dir={sweep}")
    )
    assert message == (
        f"ptv2: error: {sweep} already holds a sweep (job folders 0, 1); continue it with trainer.resume=true, "
        "replace it with trainer.overwrite=true, or choose another hydra.sweep.dir"
    )
    assert snapshot(sweep) == before  # multirun.yaml too
