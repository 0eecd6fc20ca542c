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
