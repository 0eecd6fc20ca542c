"""Experiment tracking with Weights & Biases that never blocks or crashes a run.

mode=auto is online when an API key is configured (WANDB_API_KEY or `wandb login`), offline otherwise; if an
online start fails (no network, bad key) the run falls back to offline files, and if even that fails, to no
tracking — with one warning line each time.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


PROBE_TIMEOUT_S = 3.0


def server_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """The W&B server's address (WANDB_BASE_URL, else api.wandb.ai) when no TCP connection to it opens within
    `timeout` seconds, else None: an online start would wait logger.init_timeout before falling back."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    address = (url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443))
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return f"{address[0]}:{address[1]}"
    return None


def run_name(cfg) -> str:
    return f"{cfg.task.name}-{cfg.backbone.name}-{cfg.prompt.method}"


def hydra_job() -> dict:
    """What W&B should know of the Hydra job this process runs: its command-line overrides (in a sweep, the swept
    values), and in a multirun its job number and a default group shared by the sweep's jobs: the sweep folder
    below outputs/multirun (e.g. 'rte/tiny/2025-01-01_12-00-00'), or its name. Empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    job = {"overrides": list(hydra_cfg.overrides.task)}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        parts = Path(hydra_cfg.sweep.dir).parts
        below = parts[parts.index("multirun") + 1 :] if "multirun" in parts else parts[-1:]
        job.update(num=hydra_cfg.job.num, group="/".join(below) or "sweep", sweep_dir=str(hydra_cfg.sweep.dir))
    return job


class Tracker:
    """Logs config, per-step loss and learning rate, per-epoch metrics and the final summary; a no-op with
    logger=none.

    In a multirun every job is a run of job_type 'sweep-job' in one group (logger.group, else the sweep folder),
    named after its job number, with the job's overrides in its config ('overrides') so the swept keys show."""

    def __init__(
        self,
        cfg,
        run_dir: Path,
        job_type: str | None = None,
        group: str | None = None,
        enabled: bool = True,
        concurrent: bool = False,  # several runs open at once in this process (a packed sweep group)
    ):
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

        job = hydra_job()
        sweeping = "num" in job
        options = dict(
            project=settings.project,
            entity=settings.entity,
            name=f"{run_name(cfg)}-job{job['num']}" if sweeping else run_name(cfg),
            group=settings.group or group or job.get("group"),
            job_type=job_type or ("sweep-job" if sweeping else "train"),
            tags=list(settings.tags),
            config={
                **OmegaConf.to_container(cfg, resolve=True),  # the command's own schema: only what the run reads
                **{k: job[k] for k in ("overrides", "sweep_dir") if k in job},
            },
            dir=str(run_dir),
            reinit="create_new" if concurrent else "finish_previous",  # sweeps run several jobs in one process
        )
        if mode == "online":
            unreachable = server_unreachable(min(PROBE_TIMEOUT_S, float(settings.get("init_timeout", 60))))
            if unreachable:
                log.warning("W&B server %s did not answer: logging offline", unreachable)
                mode = "offline"
        for attempt in dict.fromkeys([mode, "offline"]):
            try:
                wandb_settings = wandb.Settings(init_timeout=settings.get("init_timeout", 60), silent=True)
                self.run = wandb.init(mode=attempt, settings=wandb_settings, **options)
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

    def log_step(self, step: int, loss: float, learning_rate: float) -> None:
        """One optimizer step's training loss and learning rate: W&B's per-step curves (epochs log at their last
        step, so both share one step axis)."""
        if self.run is not None:
            self.run.log({"train/step_loss": float(loss), "train/lr": float(learning_rate)}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            offline = self.run.settings.mode == "offline"
            folder = Path(self.run.dir).parent  # wandb/offline-run-<time>-<id>, the folder `wandb sync` takes
            self.run.finish()
            self.run = None
            if offline:
                log.info("W&B offline run written to %s; upload it with: wandb sync %s", folder, folder)
