"""Experiment tracking with Weights & Biases that never blocks or crashes a run.

mode=auto is online when an API key is configured (WANDB_API_KEY or `wandb login`), offline otherwise; if an
online start fails (no network, bad key) the run falls back to offline files, and if even that fails, to no
tracking — with one warning line each time.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def run_name(cfg) -> str:
    return f"{cfg.task.name}-{cfg.backbone.name}-{cfg.prompt.method}"


class Tracker:
    """Logs config, per-epoch metrics and the final summary; a no-op with logger=none."""

    def __init__(self, cfg, run_dir: Path, job_type: str = "train", group: str | None = None, enabled: bool = True):
        self.run = None
        settings = cfg.logger
        if settings.name == "none" or not enabled:
            return
        mode = os.environ.get("WANDB_MODE") or settings.mode
        if mode == "auto":
            mode = "online" if _has_api_key() else "offline"
        if mode == "disabled":
            return
        import wandb

        options = dict(
            project=settings.project,
            entity=settings.entity,
            name=run_name(cfg),
            group=settings.group or group,
            job_type=job_type,
            tags=list(settings.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            reinit="finish_previous",  # sweeps run several jobs in one process
        )
        for attempt in dict.fromkeys([mode, "offline"]):
            try:
                self.run = wandb.init(mode=attempt, settings=wandb.Settings(init_timeout=60, silent=True), **options)
                return
            except Exception as error:  # wandb raises many types for network and auth problems
                log.warning(
                    "W&B %s start failed (%s); %s",
                    attempt,
                    str(error).splitlines()[0][:160],
                    "trying offline" if attempt != "offline" else "continuing without tracking",
                )

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
