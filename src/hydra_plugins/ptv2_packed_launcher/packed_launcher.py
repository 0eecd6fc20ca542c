"""`hydra/launcher=packed`: the sweep's jobs that may share a frozen backbone train together, in one process.

Hydra finds launchers only in the `hydra_plugins` namespace package, so this module is that thin layer: it groups
the jobs of a sweep (ptv2.commands.packed.group_key, at most `max_pack` per group) and hands each group of several
to ptv2.commands.packed.train_group; a group of one (and every job that cannot pack: fine-tuning, input prompts,
fp16) runs as an ordinary job, exactly as Hydra's basic launcher runs it. Kept light: Hydra imports it at every
start.
"""

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("ptv2")


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.ptv2_packed_launcher.packed_launcher.PackedLauncher"
    # Most jobs per group; see conf/hydra/launcher/packed.yaml for why 8.
    max_pack: int = 8
    # Jobs whose blocks share one backbone forward; None: all on a GPU, one on a CPU (ptv2.modeling.packing).
    jobs_per_forward: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="packed_schema", node=PackedLauncherConf, provider="ptv2")


class PackedLauncher(Launcher):
    def __init__(self, max_pack: int = 8, jobs_per_forward: Optional[int] = None) -> None:
        for key, value in (
            ("max_pack", max_pack),
            ("jobs_per_forward", 1 if jobs_per_forward is None else jobs_per_forward),
        ):
            if value < 1:
                raise ValueError(f"hydra.launcher.{key}={value} is out of range; use an integer >= 1")
        self.max_pack, self.jobs_per_forward = max_pack, jobs_per_forward
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ptv2.commands import packed

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        keys = [self._group_key(config) for config in configs]
        returns: list[JobReturn | None] = [None] * len(configs)
        for group in packed.groups(keys, self.max_pack):
            shown = "; ".join(
                f"#{configs[i].hydra.job.num}: {' '.join(filter_overrides(job_overrides[i]))}" for i in group
            )
            log.info("%s %s", "packed group:" if len(group) > 1 else "alone:", shown)
            if len(group) == 1:
                returns[group[0]] = self._run(configs[group[0]], self.task_function)
            else:
                for index, job_return in zip(group, self._run_packed([configs[i] for i in group]), strict=True):
                    returns[index] = job_return
        return returns

    def _job_config(self, num: int, overrides: Sequence[str]) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = f"{config.hydra.job.name}_{num}"
            config.hydra.job.num = num
        return config

    @staticmethod
    def _group_key(config: DictConfig) -> str | None:
        """The job's packing key (None: it runs alone; a config that does not resolve fails in its own job)."""
        from ptv2.commands import packed

        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)
        try:
            task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            reason = packed.unpacked_reason(task_cfg)
            if reason:
                log.info("job %s runs alone: %s", config.hydra.job.num, reason)
            return packed.group_key(task_cfg)
        except Exception:
            return None
        finally:
            HydraConfig.instance().cfg = saved

    def _run(self, config: DictConfig, task_function: TaskFunction, configure_logging: bool = True) -> JobReturn:
        return run_job(
            hydra_context=self.hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
            configure_logging=configure_logging,
        )

    def _run_packed(self, configs: list[DictConfig]) -> list[JobReturn]:
        """Hydra's job set-up for each job (folder, runtime config), then one training for the group."""
        from ptv2.commands import packed
        from ptv2.runs.session import objective

        def job(task_cfg: DictConfig):
            hydra_cfg = HydraConfig.get()
            # Resolved now, while Hydra's node still has the job's config as its parent: the job's scope sets it
            # again later on its own, where `${task.name}` in the default hydra.sweep.dir would not resolve.
            hydra = copy.deepcopy(HydraConfig.instance().cfg)
            with read_write(hydra.hydra):
                for node in ("run", "sweep"):
                    for key, value in OmegaConf.to_container(hydra_cfg[node], resolve=True).items():
                        hydra.hydra[node][key] = value
            return packed.new_job(task_cfg, Path(hydra_cfg.runtime.output_dir), hydra, hydra_cfg.job.num)

        # Logging stays the launcher's (console); commands.packed adds one <job name>.log per job folder.
        returns = [self._run(config, job, configure_logging=False) for config in configs]
        jobs = [job_return.return_value for job_return in returns]
        packed.train_group(jobs, self.jobs_per_forward)
        for job_return, job in zip(returns, jobs, strict=True):
            job_return.return_value = objective(job.results) if job.results is not None else None
            job_return.status = (
                JobStatus.COMPLETED
            )  # a failed job is marked FAILED in its folder, as session.run_job does
        return returns
