"""`make install` installs the torch the machine can use: the CPU build without an NVIDIA GPU, PyPI's (CUDA) torch
with one, and says which; TORCH=... (CI) still chooses. Read from `make -n` (the commands, none run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def planned(tmp_path: Path, *arguments: str, gpu: bool) -> str:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    if gpu:  # what nvidia-smi -L prints on a GPU machine
        (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
        (tools / "nvidia-smi").chmod(0o755)
    path = f"{tools}:{SYSTEM_PATH}"
    if not gpu and shutil.which("nvidia-smi", path=path):
        pytest.skip("this machine has nvidia-smi")
    environment = {**os.environ, "PATH": path}
    environment.pop("TORCH", None)
    result = subprocess.run(
        ["make", "-n", "install", *arguments], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_without_a_gpu_the_cpu_build_from_pytorchs_cpu_index_else_pypi(tmp_path):
    plan = planned(tmp_path, gpu=False)
    assert 'if [ -n "" ]' in plan  # the GPU branch is not taken
    assert "no GPU here: the CPU build of torch==2.13.0" in plan
    assert '--index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"' in plan
    assert '|| .venv/bin/pip install "torch==2.13.0"' in plan
    assert "make install: torch {torch.__version__} ({build})" in plan  # it says which it installed


def test_with_a_gpu_pypis_torch(tmp_path):
    plan = planned(tmp_path, gpu=True)
    assert 'if [ -n "yes" ]; then echo "make install: a GPU is here (nvidia-smi): torch from PyPI"' in plan
    assert '.venv/bin/pip install "torch"; \\' in plan


def test_ci_s_pin_still_chooses(tmp_path):
    plan = planned(tmp_path, "TORCH=torch==2.13.0", gpu=True)
    assert '.venv/bin/pip install "torch==2.13.0"' in plan
