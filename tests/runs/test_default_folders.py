"""Every launcher writes into the folders conf/train.yaml names by default: a sweep without hydra.sweep.dir and a
run without hydra.run.dir, started from a fresh working folder, finish in outputs/ there."""

from __future__ import annotations

import json

import pytest
from conftest import SMOKE, ptv2

LAUNCHERS = {"basic": [], "packed": ["hydra/launcher=packed"], "joblib": ["hydra/launcher=joblib"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_sweep_without_a_sweep_folder_finishes_in_the_default_one(tmp_path, launcher):
    result = ptv2("train", "-m", *SMOKE, "logger=none", "prompt.length=1,2", *LAUNCHERS[launcher], cwd=tmp_path)
    sweeps = list((tmp_path / "outputs" / "multirun" / "rte" / "tiny").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(path.name for path in sweeps[0].iterdir() if path.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        results = json.loads((sweeps[0] / job / "results.json").read_text())
        assert results["best_value"] is not None
        assert not (sweeps[0] / job / "FAILED").exists()
    assert "2 of 2 job(s) finished" in result.stderr


def test_a_run_without_a_run_folder_finishes_in_the_default_one(tmp_path):
    ptv2("train", *SMOKE, "logger=none", cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "rte" / "tiny" / "ptv2").iterdir()
    assert (run / "results.json").is_file() and (run / "prompt.safetensors").is_file()
