"""`ptv2 train`: one job through the training loop (ptv2.loop); its results land in the run directory.

A run trains one prompt on one dataset, or on several ("members" of a multi-task config) with one head each:
every epoch visits each member's batches once, in a seeded random interleaving (sampling proportional to dataset
size), and the best epoch maximises the mean of the members' selection metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptv2 import loop
from ptv2.io import declare

log = logging.getLogger("ptv2")
# In the run folder (the loop and runs/ write them): the resolved config and Hydra's record, the log, the training
# state, the per-epoch history, the best epoch's prompt and head, the results; FAILED for a failed sweep job.
OUTPUTS = declare(
    "train", "config.yaml", ".hydra/*.yaml", "train.log", "state/*", "history.json", "prompt.safetensors",
    "results.json", "FAILED",
)  # fmt: skip


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.perf_counter()
    preset = HydraConfig.get().runtime.choices.get("preset") if HydraConfig.initialized() else None
    if preset:
        log.info("preset %s: the official run's settings, with the command line's overrides on top", preset)
    job = loop.Job(cfg, Path(run_dir))
    loop.train([job], started=started)
    if job.error is not None:
        raise job.error
    return job.results
