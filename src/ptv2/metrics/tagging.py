"""Span-level metrics for sequence tagging: entity micro P/R/F1 (NER) and argument F1 excluding V (SRL).

Spans are read from word-level BIO tags with seqeval's default-mode chunker (``get_entities``, the conlleval
rules that seqeval's ``f1_score`` uses when no ``mode``/``scheme`` is given; the data are IOB2). A span counts as
correct when its type, start and end all match a gold span of the same sentence. SRL passes
``exclude_types=("V",)`` so the predicate span, which the gold tags mark ``B-V``, is not scored (as srl-eval.pl).
"""

from __future__ import annotations

from collections import Counter

from seqeval.metrics.sequence_labeling import get_entities


def tagging_metrics(gold: list[list[str]], pred: list[list[str]], exclude_types: tuple[str, ...] = ()) -> dict:
    """{"f1", "precision", "recall", "per_type": {TYPE: {"f1", "precision", "recall", "support"}}}, in [0, 1]."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    for number, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {number}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted ones")
    gold_spans = _spans(gold, exclude_types)
    pred_spans = _spans(pred, exclude_types)
    correct = gold_spans & pred_spans
    overall = _scores(len(correct), len(pred_spans), len(gold_spans))
    per_type = {}
    gold_count, pred_count, correct_count = _by_type(gold_spans), _by_type(pred_spans), _by_type(correct)
    for kind in sorted(set(gold_count) | set(pred_count)):
        per_type[kind] = _scores(correct_count[kind], pred_count[kind], gold_count[kind])
        per_type[kind]["support"] = gold_count[kind]
    return {**overall, "per_type": per_type}


def _spans(sentences: list[list[str]], exclude_types: tuple[str, ...]) -> set[tuple[int, str, int, int]]:
    """(sentence, type, first word, last word) of every span; chunked per sentence so spans never cross sentences."""
    spans = set()
    for number, tags in enumerate(sentences):
        for kind, start, end in get_entities(list(tags)):
            if kind not in exclude_types:
                spans.add((number, kind, start, end))
    return spans


def _by_type(spans: set[tuple[int, str, int, int]]) -> Counter:
    return Counter(kind for _, kind, _, _ in spans)


def _scores(correct: int, predicted: int, gold: int) -> dict:
    # An empty denominator scores 0, as seqeval does with zero_division=0.
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}
