"""Evaluation metrics as plain functions: predictions and gold labels in, fractions in [0, 1] out.

SuperGLUE: accuracy, CB macro-F1, MultiRC F1a and EM, ReCoRD F1 and EM (SQuAD-style answer normalisation).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from ptv2.metrics.squad import exact_match, token_f1  # ReCoRD compares answers as SQuAD 1.1 does

# MultiRC and ReCoRD logits are over the labels [false, true]: the "true" logit is at this index.
TRUE_INDEX = 1


# ------------------------------------------------------------------------------------------------ classification


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of predictions equal to the gold label."""
    if len(golds) == 0:
        return 0.0
    return float(np.mean(np.asarray(predictions) == np.asarray(golds)))


def class_f1(predictions: Sequence[int], golds: Sequence[int], positive: int) -> float:
    """F1 of one class taken as the positive one (0 when it is never predicted rightly)."""
    pairs = list(zip(predictions, golds, strict=True))
    hits = sum(1 for p, g in pairs if p == positive and g == positive)
    if hits == 0:
        return 0.0
    precision = hits / sum(1 for p, _ in pairs if p == positive)
    recall = hits / sum(1 for _, g in pairs if g == positive)
    return 2 * precision * recall / (precision + recall)


def macro_f1(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes found in golds or predictions (sklearn's "macro")."""
    classes = sorted(set(int(p) for p in predictions) | set(int(g) for g in golds))
    if not classes:
        return 0.0
    return float(np.mean([class_f1(predictions, golds, c) for c in classes]))


# ------------------------------------------------------------------------------------------------------- MultiRC


def multirc_scores(groups: Sequence[str], predictions: Sequence[int], golds: Sequence[int]) -> dict[str, float]:
    """MultiRC: F1a, the binary F1 of "true" over all answers, and EM, the fraction of questions (groups) whose
    answers are all predicted right."""
    all_right: dict[str, bool] = {}
    for group, p, g in zip(groups, predictions, golds, strict=True):
        all_right[group] = all_right.get(group, True) and p == g
    em = float(np.mean(list(all_right.values()))) if all_right else 0.0
    return {"f1a": class_f1(predictions, golds, TRUE_INDEX), "em": em}


# -------------------------------------------------------------------------------------------------------- ReCoRD


def max_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    """The best score of the prediction against any gold answer (0 when there is none)."""
    return max((metric(prediction, gold) for gold in golds), default=0.0)


def record_predictions(examples: Sequence[dict], scores) -> list[tuple[str, dict]]:
    """(entity, meta) of the top-scoring candidate of each ReCoRD query (group), in first-seen order.

    examples: canonical ReCoRD examples (meta holds "entity", "answers", "passage", "query");
    scores: (N, 2) logits over [false, true]. Candidates are ranked by log-odds, logit[true] - logit[false] (the
    same order as softmax P(true)); the official code ranks by logit[true] alone, which the two-class loss does not
    pin down. Ties go to the first candidate.
    """
    scores = np.asarray(scores, dtype=np.float64)
    margins = scores[:, TRUE_INDEX] - scores[:, 1 - TRUE_INDEX]
    best: dict[str, tuple[float, dict]] = {}
    for example, margin in zip(examples, margins, strict=True):
        group = example["group"]
        if group not in best or margin > best[group][0]:
            best[group] = (float(margin), json.loads(example["meta"]))
    return [(meta["entity"], meta) for _, meta in best.values()]


def record_scores(examples: Sequence[dict], scores) -> dict[str, float]:
    """ReCoRD F1 and EM: per query, the top entity against its gold answers (max over golds), averaged."""
    predictions = record_predictions(examples, scores)
    if not predictions:
        return {"f1": 0.0, "em": 0.0}
    f1 = [max_over_golds(partial(token_f1, version_2=False), entity, meta["answers"]) for entity, meta in predictions]
    em = [max_over_golds(exact_match, entity, meta["answers"]) for entity, meta in predictions]
    return {"f1": float(np.mean(f1)), "em": float(np.mean(em))}


# ------------------------------------------------------------------------------------------------------ SuperGLUE


def superglue_metrics(task_name: str, examples: Sequence[dict], scores) -> dict[str, float]:
    """Dev metrics of one SuperGLUE task from canonical examples and the model's scores.

    scores: (N, num_labels) logits in the order of `examples` ((N, 2) choice logits for COPA).
    Returns {"accuracy"} (CB also "f1_macro"), MultiRC {"f1a", "em"}, ReCoRD {"f1", "em"}; fractions in [0, 1].
    """
    name = task_name.lower()
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(scores) != len(examples):
        raise ValueError(f"scores of shape {scores.shape} for {len(examples)} examples; expected (N, classes)")
    golds = [example["label"] for example in examples]
    if any(gold < 0 for gold in golds):
        raise ValueError(f"{name}: some examples have no gold label (-1): metrics need a labelled split")
    if name == "record":
        return record_scores(examples, scores)
    predictions = scores.argmax(axis=1).tolist()
    if name == "multirc":
        return multirc_scores([example["group"] for example in examples], predictions, golds)
    result = {"accuracy": accuracy(predictions, golds)}
    if name == "cb":
        result["f1_macro"] = macro_f1(predictions, golds)
    return result
