"""SuperGLUE leaderboard files (BoolQ.jsonl, CB.jsonl, ...) from a split's examples and the model's scores."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ptv2.data.superglue.tables import LABELS
from ptv2.io import write_jsonl
from ptv2.metrics.superglue import record_predictions


def write_submission(task_name: str, examples: list[dict], scores, path, labels: list[str] | None = None) -> None:
    """Write the SuperGLUE leaderboard file for one task (name it SUBMISSION_NAMES[task_name]), atomically.

    scores: (N, len(labels)) logits, or (N, 2) choice logits for COPA, in the order of `examples`.
    labels: the task's label names in logit order; defaults to LABELS[task_name].
    Label forms follow the SuperGLUE baseline's writer (jiant): RTE/CB the label names, BoolQ/WiC "true"/"false",
    WSC "True"/"False", COPA the choice 0/1; MultiRC {"idx": paragraph, "passage": {"questions": [{"idx",
    "answers": [{"idx", "label": 0|1}]}]}}; ReCoRD {"idx": query, "label": the best entity's text}.
    """
    name = task_name.lower()
    names = list(labels or LABELS[name])
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(scores) != len(examples) or scores.shape[1] != len(names):
        raise ValueError(f"{name}: scores of shape {scores.shape} for {len(examples)} examples and labels {names}")
    if name == "record":
        lines = [{"idx": meta["query"], "label": entity} for entity, meta in record_predictions(examples, scores)]
    else:
        predicted = [names[i] for i in scores.argmax(axis=1)] if name != "copa" else scores.argmax(axis=1)
        if name == "multirc":
            lines = _multirc_lines(examples, predicted)
        else:
            pairs = zip(examples, predicted, strict=True)
            lines = [{"idx": example["idx"], "label": _submission_label(name, p)} for example, p in pairs]
    write_jsonl(path, lines)


def _submission_label(name: str, predicted) -> Any:
    if name == "copa":
        return int(predicted)
    if name == "wsc":
        return predicted.capitalize()  # "True" / "False"
    return predicted


def _multirc_lines(examples: list[dict], predicted: list[str]) -> list[dict]:
    """Nest MultiRC answers back under their question and paragraph, in first-seen order."""
    paragraphs: dict[int, dict[int, list]] = {}
    for example, label in zip(examples, predicted, strict=True):
        meta = json.loads(example["meta"])
        questions = paragraphs.setdefault(meta["paragraph"], {})
        questions.setdefault(meta["question"], []).append({"idx": meta["answer"], "label": int(label == "true")})
    return [
        {"idx": p, "passage": {"questions": [{"idx": q, "answers": answers} for q, answers in questions.items()]}}
        for p, questions in paragraphs.items()
    ]
