"""The GPU evidence run (scripts/gpu_evidence.sh) cannot rot between GPU loans: the same command runs here on the
CPU with tiny shapes (SMALL=1), every part in order, each writing its figures and its status line; a deadline
stops what does not fit and the status says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def evidence(out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PTV2_DIE"))}
    environment.update({"SMALL": "1", "OUT": str(out), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **env})
    command = ["bash", "scripts/gpu_evidence.sh"]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def status(out: Path) -> dict[str, str]:
    rows = [line.split("|")[1:3] for line in (out / "status.md").read_text().splitlines()[2:]]
    return {name.strip(): state.strip() for name, state in rows}


@pytest.mark.slow  # two sweeps in fresh processes (about 17 s on 2 cores): run it (make test-all) before a GPU run
def test_the_study_part_runs_both_families_and_reports(tmp_path):
    """The dry run of the study part (the one that needs ptv2's training path); the other parts run the
    benchmarks, whose own tests run them small (test_bench, test_packed, test_decoders), and all four in order in
    the slow test below. The default suite keeps the script's plumbing (the deadline test)."""
    out = tmp_path / "evidence"
    result = evidence(out, ONLY="study")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert status(out) == {"study": "ok"}, (out / "status.md").read_text()
    for family, jobs in (("ptv2", 2), ("finetune", 1)):  # SMALL: seed 1 only
        sweep = out / "study" / family
        histories = sorted(sweep.glob("*/history.json"))
        assert len(histories) == jobs, family
        assert all(json.loads(path.read_text())[0]["epoch"] == 1 for path in histories)
        assert not list(sweep.glob("**/*.safetensors"))  # what comes back stays small
    assert "packed group of 2 jobs" in (out / "study" / "ptv2" / "0" / "train.log").read_text()
    report = [sys.executable, "scripts/gpu_study_report.py", str(out / "study"), "--out", str(tmp_path / "report")]
    subprocess.run(report, cwd=ROOT, check=True, capture_output=True, timeout=120)
    table = (tmp_path / "report" / "table.md").read_text()
    assert all(f"| conll03 (f1) | {arm} |" in table for arm in ("finetune", "ptv2-P64", "ptv2-P128"))


def test_a_part_past_the_deadline_is_skipped_and_said_so(tmp_path):
    out = tmp_path / "evidence"
    result = evidence(out, ONLY="bench", DEADLINE="5")
    assert result.returncode == 0
    assert status(out) == {"bench": "skipped: the deadline (5 s) is reached"}


@pytest.mark.slow  # every part, each python process importing torch: minutes on a 2-core CPU
def test_every_part_runs_in_order_and_writes_its_figures(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "evidence"
    result = evidence(out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert status(out) == {"pack": "ok", "decoder": "ok", "bench": "ok", "study": "ok"}, (out / "status.md").read_text()
    pack = json.loads((out / "pack" / "pack_roberta_large.json").read_text())
    assert pack["pack"] == 2 and pack["wall_ratio"] > 0
    assert (out / "decoder" / "anchor.json").is_file() and (out / "bench" / "bench_all.json").is_file()
