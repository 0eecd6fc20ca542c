"""Span-level metrics for sequence tagging: entity micro P/R/F1 (NER) and argument F1 excluding V (SRL).

seqeval's classification report in its default mode (the conlleval chunking rules that `f1_score` uses when no
`mode`/`scheme` is given; the data are IOB2), with zero_division=0: a span counts as correct when its type, start
and end all match a gold span of the same sentence. SRL passes ``exclude_types=("V",)``: those tags are read as O
first, so the predicate span, which the gold tags mark ``B-V``, is not scored (as srl-eval.pl). A type change ends
a span as O does, so no other span changes. tests/test_tagging.py holds this module's figures from before it used
the report (150 recorded cases: IOB1 and IOB2 tags, every type, empty and all-O predictions, with and without V).
"""

from __future__ import annotations

import warnings

from seqeval.metrics import classification_report


def tagging_metrics(gold: list[list[str]], pred: list[list[str]], exclude_types: tuple[str, ...] = ()) -> dict:
    """{"f1", "precision", "recall", "per_type": {TYPE: {"f1", "precision", "recall", "support"}}}, in [0, 1]."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    for number, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {number}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted ones")
    with warnings.catch_warnings():  # no span at all: seqeval's macro average is a mean of nothing (unused here)
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(
            _without(gold, exclude_types), _without(pred, exclude_types), output_dict=True, zero_division=0
        )
    averages = ("micro avg", "macro avg", "weighted avg")
    per_type = {
        kind: {**_scores(row), "support": int(row["support"])} for kind, row in report.items() if kind not in averages
    }
    return {**_scores(report["micro avg"]), "per_type": dict(sorted(per_type.items()))}


def _without(sentences: list[list[str]], exclude_types: tuple[str, ...]) -> list[list[str]]:
    if not exclude_types:
        return [list(tags) for tags in sentences]
    return [
        ["O" if tag[2:] in exclude_types and tag[:2] in ("B-", "I-", "E-", "S-") else tag for tag in tags]
        for tags in sentences
    ]


def _scores(row: dict) -> dict:
    return {"f1": float(row["f1-score"]), "precision": float(row["precision"]), "recall": float(row["recall"])}
