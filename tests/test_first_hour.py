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
