"""Task types: how examples become model inputs, and model outputs become metrics.

A task type is a module here that provides what `TaskType` lists: its head, the `task.head` kinds it admits, how
long a feature is, `encode` (a batched `datasets.map` function from canonical examples to features), `collate`
(features -> padded tensors), `outputs` (per-feature results to gather, one row per feature) and `metrics`.
Optional: `labels(train_examples)` derives label names from the training data when the task config lists none;
`write_predictions` writes prediction files; `PER_TOKEN` names the batch keys padded like input_ids;
`generate(model, batch, member, tokenizer)` replaces the forward at evaluation (generation: greedy decoding). A new task
type is a new module here: nothing to register.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Protocol

from ptv2.errors import unknown

TASK_TYPES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))


class TaskType(Protocol):
    HEAD: type  # head class on the encoder's hidden states (modeling.heads): (B, L, H) -> logits
    HEAD_KINDS: tuple[str, ...]  # task.head values it admits: linear | pooler | verbalizer
    VERBALIZER_WORDS: int | None  # label words task.options.verbalizer needs (None: one per label)

    def feature_length(self, input_ids) -> int: ...  # tokens of one feature (length-grouped batching)

    def encode(self, batch: dict[str, list], tokenizer, task) -> dict[str, list]: ...

    def collate(self, features: list[dict], tokenizer) -> dict: ...

    def outputs(self, logits, batch: dict): ...  # (B, ...) rows to gather, one per feature

    def metrics(self, task, split, outputs: list) -> dict: ...  # outputs: one numpy array per feature, in order


REQUIRED = ("HEAD", "HEAD_KINDS", "VERBALIZER_WORDS", "feature_length", "encode", "collate", "outputs", "metrics")


def task_type(name: str) -> TaskType:
    if name not in TASK_TYPES:
        raise unknown("task.type", name, TASK_TYPES)
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [attribute for attribute in REQUIRED if not hasattr(module, attribute)]
    if missing:  # a programming error in a new task type, not a user's
        raise TypeError(f"task type {name} lacks {', '.join(missing)} (see ptv2.tasks.TaskType)")
    return module
