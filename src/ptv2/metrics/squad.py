"""SQuAD 1.1 / 2.0 scores as the official evaluation scripts compute them, and their json outputs.

Answers are compared after the official normalisation (lower case, punctuation removed, articles a/an/the removed,
whitespace collapsed); a question scores the best exact match and token F1 over its gold answers; scores are
percentages. SQuAD 2.0 rules apply as soon as one question is unanswerable (no gold answer) or null odds are given:
an unanswerable question's gold is [""], gold answers that normalise to nothing are dropped, F1 against an empty
answer is 1 only when both are empty, and the HasAns/NoAns breakdown and the best null-odds threshold are reported.

Two deliberate differences from the scripts: a question without a prediction scores 0 (the 1.1 script's rule; the
2.0 script fails on it), and with null odds the exact/F1 scores are those of the predictions as given (the 2.0
script would first blank every prediction whose `na_prob` exceeds 1.0, which suits probabilities, not the
null-minus-span logit differences `postprocess` returns, whose predictions already apply threshold 0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path

from ptv2.io import write_json

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, version_2: bool = True) -> float:
    """Token-overlap F1 of the normalised answers; under 2.0 rules an empty side scores 1 only against empty."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(gold).split()
    if version_2 and (not predicted or not expected):
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def _golds(example: dict, version_2: bool) -> list[str]:
    texts = list(example["answers"]["text"])
    if not version_2:
        return texts
    return [text for text in texts if normalize_answer(text)] or [""]


def squad_metrics(
    examples: list[dict], predictions: dict[str, str], null_odds: dict[str, float] | None = None
) -> dict[str, float]:
    """Official SQuAD scores of `predictions` ({question id: answer text}) on canonical `examples`.

    SQuAD 1.1: {"exact_match", "f1"}. SQuAD 2.0 (an unanswerable question, or null odds given) adds
    HasAns_exact/HasAns_f1 and NoAns_exact/NoAns_f1 (each only when that group is not empty) and best_exact,
    best_exact_thresh, best_f1, best_f1_thresh: the scores reached by predicting "" for every question whose null
    odds exceed the best threshold (without null odds: the plain scores at threshold 0).
    """
    version_2 = bool(null_odds) or any(not example["answers"]["text"] for example in examples)
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for example in examples:
        qid = example["id"]
        if qid not in predictions:
            exact[qid] = f1[qid] = 0.0
            continue
        golds = _golds(example, version_2)
        exact[qid] = max(exact_match(predictions[qid], gold) for gold in golds)
        f1[qid] = max(token_f1(predictions[qid], gold, version_2) for gold in golds)

    results = {"exact_match": _percent(exact.values()), "f1": _percent(f1.values())}
    if not version_2:
        return results

    has_answer = {example["id"]: bool(example["answers"]["text"]) for example in examples}
    for group, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [qid for qid, answerable in has_answer.items() if answerable == wanted]
        if ids:
            results[f"{group}_exact"] = _percent(exact[qid] for qid in ids)
            results[f"{group}_f1"] = _percent(f1[qid] for qid in ids)

    if null_odds:
        odds = {qid: float(null_odds.get(qid, 0.0)) for qid in has_answer}
        results["best_exact"], results["best_exact_thresh"] = _best_threshold(predictions, exact, odds, has_answer)
        results["best_f1"], results["best_f1_thresh"] = _best_threshold(predictions, f1, odds, has_answer)
    else:
        results.update(best_exact=results["exact_match"], best_exact_thresh=0.0)
        results.update(best_f1=results["f1"], best_f1_thresh=0.0)
    return results


def _percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def _best_threshold(
    predictions: dict[str, str], scores: dict[str, float], odds: dict[str, float], has_answer: dict[str, bool]
) -> tuple[float, float]:
    """The official 2.0 threshold search: start from "no answer everywhere", then answer questions in increasing
    order of null odds, keeping the running total's best value and the null odds at which it was reached."""
    total = sum(1.0 for answerable in has_answer.values() if not answerable)
    best, best_threshold = total, 0.0
    for qid in sorted(odds, key=odds.__getitem__):
        if has_answer[qid]:
            total += scores[qid]
        elif predictions.get(qid):
            total -= 1.0
        if total > best:
            best, best_threshold = total, odds[qid]
    return 100.0 * best / len(scores), best_threshold


def write_predictions(path: str | Path, predictions: dict[str, str]) -> Path:
    """Write the official predictions file ({question id: answer text})."""
    return write_json(path, predictions)


def write_null_odds(path: str | Path, null_odds: dict[str, float]) -> Path:
    """Write the official 2.0 `na_prob` file ({question id: null odds})."""
    return write_json(path, {qid: float(value) for qid, value in null_odds.items()})
