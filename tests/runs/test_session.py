"""runs/session.py: which process owns a run folder, and the line that ends a sweep."""

from __future__ import annotations

import pytest
from conftest import SMOKE, ptv2

from ptv2.runs import session


@pytest.mark.parametrize(
    ("env", "owns"),
    [
        ({}, True),
        ({"RANK": "1"}, True),  # a RANK left in the environment: still locks and checks the folder
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, True),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),
    ],
)
def test_the_main_process_of_a_launch_owns_the_run_folder(monkeypatch, env, owns):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert session.process_owns_run_dir() is owns


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 with WORLD_SIZE=2 is no process of the launch"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 with WORLD_SIZE=2 is no process of the launch"),
        ({"LOCAL_RANK": "0"}, "LOCAL_RANK is set without RANK"),
        ({"RANK": "one"}, "RANK='one' are not integers"),
    ],
)
def test_launch_variables_that_name_no_process_are_one_line_and_write_nothing(env, says, tmp_path):
    result = ptv2("train", *SMOKE, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", env=env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and says in result.stderr
    assert not (tmp_path / "run").exists()


def everything(folder) -> dict:
    """Every entry under `folder` with its bytes, the lock file and logs included."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    ptv2("train", *SMOKE, "logger=none", f"hydra.run.dir={run}")
    return run


def test_a_refused_eval_in_a_finished_run_leaves_it_byte_identical(finished):
    before = everything(finished)
    result = ptv2("eval", f"ckpt={finished}", "split=nowhere", f"hydra.run.dir={finished}", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert everything(finished) == before  # no eval.log, no lock file


def test_a_refused_resume_of_a_finished_sweep_marks_no_finished_job_failed(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *SMOKE, "logger=none", "prompt.length=1,2", f"hydra.sweep.dir={sweep}"]
    ptv2(*args)
    before = {job: everything(sweep / job) for job in ("0", "1")}
    again = ptv2(*args, "trainer.resume=true", "optimizer.lr=0.5", check=False)
    assert again.returncode == 1 and "the config differs" in (again.stdout + again.stderr)
    assert {job: everything(sweep / job) for job in ("0", "1")} == before  # no FAILED marker, no log line


def test_a_run_stopped_before_its_first_save_starts_again_with_resume_auto(tmp_path):
    """A run folder holding its config and an empty state folder (killed before the first save completed) is no
    finished run: resume=auto starts it from the beginning, where it once said "use resume=true"."""
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    result = ptv2("train", *SMOKE, "logger=none", f"hydra.run.dir={run}", "trainer.resume=auto")
    assert result.returncode == 0 and (run / "results.json").is_file()
