"""What a new user meets in the first hour: messages, where outputs go, summaries (issue 26)."""

from __future__ import annotations

import pytest
from test_config import compose_train


def test_wandb_config_leaves_out_the_bench_block(tmp_path, monkeypatch):
    import wandb

    from ptv2.runs import tracking

    cfg = compose_train("backbone=tiny", "logger=wandb", "logger.mode=offline")
    assert "bench" in cfg  # composed into every config, read only by `ptv2 bench`
    seen = {}

    def fake_init(**options):
        seen.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", fake_init)
    tracking.Tracker(cfg, tmp_path)
    assert "bench" not in seen["config"] and "trainer" in seen["config"]


def test_wandb_server_probe_names_the_address(monkeypatch):
    from ptv2.runs import tracking

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert tracking.server_unreachable(timeout=1) == "127.0.0.1:9"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, ("huggingface.co", 443)), ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ("127.0.0.1", 9))],
)
def test_hub_endpoint_follows_hf_endpoint(monkeypatch, env, expected):
    from ptv2 import hub

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert hub.endpoint() == expected


def test_run_folder_checks_name_the_state_folder_resume_writes():
    from ptv2.runs import resume, rundir

    assert rundir.STATE_DIR == resume.STATE_DIR


@pytest.mark.parametrize(
    ("override", "expected"),
    [("trainer.epoch=1", "did you mean trainer.epochs?"), ("trainer.epochs=-1", "trainer.epochs=-1 is out of range")],
)
def test_a_config_mistake_is_reported_before_torch_is_imported(tmp_path, override, expected):
    """The error path of a bad key or value loads neither torch nor transformers (they cost seconds per start)."""
    import subprocess
    import sys

    code = (
        "import sys; from ptv2 import cli\n"
        "try:\n"
        f"    code = cli.main(['train', 'backbone=tiny', '{override}', 'hydra.run.dir={tmp_path / 'run'}'])\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "assert code == 2, code\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert expected in result.stderr
