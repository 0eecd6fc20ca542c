"""Optimizers and learning-rate schedules, chosen by name (`optimizer.name`, `scheduler.name`) from one table each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ptv2.errors import unknown

if TYPE_CHECKING:
    import torch

# torch and transformers are imported when an optimizer or schedule is built, not with this module: the config check
# reads the tables' names before a start loads them, so a config mistake is reported in a fraction of a second.


def _adamw(params, cfg):
    import torch

    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _sgd(params, cfg):
    import torch

    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _linear(opt, cfg, total):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)


def _exponential(opt, cfg, total):
    import torch

    return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)


def _constant(opt, cfg, total):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


# name -> optimizer over the trainable parameters, built from the `optimizer` config group.
OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}

# name -> (scheduler from the `scheduler` config group and the run's total optimizer steps, unit): "step" schedulers
# advance after every optimizer step, "epoch" ones after every epoch.
SCHEDULERS = {"linear": (_linear, "step"), "exponential": (_exponential, "epoch"), "constant": (_constant, "step")}


def _lookup(table: dict, key: str, name: str):
    if name not in table:
        raise unknown(key, name, table)
    return table[name]


def make_optimizer(cfg, parameters) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer.name` names, over `parameters` (the trainable ones)."""
    return _lookup(OPTIMIZERS, "optimizer.name", cfg.optimizer.name)(list(parameters), cfg.optimizer)


def make_scheduler(cfg, optimizer, total_steps: int):
    """(scheduler, unit) of `cfg.scheduler.name`; unit "step" or "epoch" says when the loop steps it."""
    build, unit = _lookup(SCHEDULERS, "scheduler.name", cfg.scheduler.name)
    return build(optimizer, cfg.scheduler, total_steps), unit
