"""Task types: how examples become model inputs, and model outputs become metrics.

Each task type module provides `encode(batch, tokenizer, task)` (a batched `datasets.map` function from canonical
examples to features), `collate(features, tokenizer)` (features -> padded tensors), `outputs(logits, batch)`
(per-feature results to gather, one row per feature) and `metrics(task, split, outputs)` (outputs: a list with one
numpy array per feature of the split, in feature order -> metric dict); its head
is the entry of the same name in ptv2.heads.HEADS. Optional: `labels(train_examples)` derives label names from the
training data when the task config lists none. A new task type is a new module here: nothing to register.
"""

from __future__ import annotations

import importlib
import pkgutil

from ptv2.errors import UserError

TASK_TYPES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))


def task_type(name: str):
    if name not in TASK_TYPES:
        raise UserError(f"task.type={name} is unknown; choose one of {', '.join(TASK_TYPES)}")
    return importlib.import_module(f"ptv2.tasks.{name}")
