"""Extractive QA (SQuAD 1.1 / 2.0): start/end logits per token, answers from post-processed windows.

Examples come from the `squad` reader (see ptv2.data.squad for the canonical form). A question whose context is
longer than `task.max_length` becomes several overlapping windows ("features"), so a split has at least as many
features as examples.

One encoding for every split: train.py prepares training and evaluation splits with the same `encode`, so every
feature carries both the training targets (`start_positions` / `end_positions`, the CLS token when the window
lacks the whole first gold answer or the question has none) and what post-processing needs (`example_id`,
`offset_mapping`). `collate` passes only the tensors the model and its loss use; `metrics` and
`write_predictions` read the ids and offsets from the split's features (training features carry offsets that
collate drops). Windows follow the usual recipe for BERT/RoBERTa extractive QA: question and context as a pair,
only the context truncated, long contexts cut into overlapping windows (`stride` tokens shared by neighbours).

Training targets are the same for SQuAD 1.1 and 2.0: a window that does not hold the answer points at CLS, which
is the v2 rule of "no answer here". `options.version_2` only changes how answers are read back: with it the
prediction is "" when the null score beats the best span, the null odds are written and scored (HasAns/NoAns,
best threshold); without it every question gets its best span (the 1.1 protocol).

Options (`task.options`): stride (128) tokens shared by neighbouring windows, n_best (20) start/end candidates per
window, max_answer_length (30) tokens, version_2 (false).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ptv2.data import Split
from ptv2.errors import UserError
from ptv2.metrics.squad import squad_metrics, write_null_odds
from ptv2.metrics.squad import write_predictions as write_predictions_json
from ptv2.modeling.heads import SpanHead

HEAD = SpanHead
HEAD_KINDS = ("linear",)
VERBALIZER_WORDS = None
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULTS = {"stride": 128, "n_best": 20, "max_answer_length": 30, "version_2": False}


def feature_length(input_ids: list[int]) -> int:
    return len(input_ids)


def option(task, name: str):
    return (task.get("options") or {}).get(name, DEFAULTS[name])


def encode(batch: dict[str, list], tokenizer, task) -> dict[str, list]:
    """Windows of every question with both targets and post-processing columns (see `windows`)."""
    stride = option(task, "stride")
    check_room(batch["question"], tokenizer, task.max_length, stride)
    return windows(batch, tokenizer, task.max_length, stride)


def check_room(questions: list[str], tokenizer, max_length: int, stride: int) -> None:
    """Refuse windows that cannot hold `stride` context tokens next to the longest question (the Rust tokenizer
    would abort the process instead of raising)."""
    if stride < 0:
        raise UserError(f"task.options.stride={stride} must be 0 or more")
    lengths = [len(ids) for ids in tokenizer([q.lstrip() for q in questions], add_special_tokens=False)["input_ids"]]
    longest = max(lengths, default=0)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - longest
    if stride >= room:
        raise UserError(
            f"task.options.stride={stride} needs windows with more than {stride} context tokens, but "
            f"task.max_length={max_length} leaves {room} next to a question of {longest} tokens; raise "
            "task.max_length or lower task.options.stride"
        )


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Padded model inputs (B, L) and the targets (B,); example ids and offsets stay in the split."""
    inputs = [{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features]
    batch = tokenizer.pad(inputs, return_tensors="pt")
    batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
    batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
    return dict(batch)


def outputs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, L, 2) start/end logits, padded to the batch width; `metrics` trims each row to its feature's length."""
    return logits.float()


def answers(task, split: Split, outputs: list[np.ndarray]) -> tuple[dict[str, str], dict[str, float]]:
    """(predictions {question id: answer text}, null odds {question id: null - best span score}; empty for 1.1)."""
    features = split.features.select_columns(["example_id", "offset_mapping"]).to_list()
    if len(outputs) != len(features):
        raise ValueError(f"{len(features)} features in split {split.name} but {len(outputs)} outputs")
    starts, ends = [], []
    for row, feature in zip(outputs, features, strict=True):
        row = np.asarray(row)[: len(feature["offset_mapping"])]  # drop the batch padding: (L_feature, 2)
        starts.append(row[:, 0])
        ends.append(row[:, 1])
    return postprocess(
        split.examples,
        features,
        starts,
        ends,
        n_best=option(task, "n_best"),
        max_answer_length=option(task, "max_answer_length"),
        version_2=bool(option(task, "version_2")),
    )


def metrics(task, split: Split, outputs: list[np.ndarray]) -> dict[str, float]:
    """Official SQuAD scores in percent: exact_match and f1; for version_2 also HasAns_/NoAns_ exact and f1 and
    the best null-odds threshold (best_exact, best_exact_thresh, best_f1, best_f1_thresh)."""
    predictions, null_odds = answers(task, split, outputs)
    return squad_metrics(split.examples, predictions, null_odds or None)


def write_predictions(task, split: Split, outputs: list[np.ndarray], out_dir: str | Path) -> list[Path]:
    """The official prediction file `<task>-<split>-predictions.json` ({question id: answer text}) and, for
    version_2, the official `na_prob` file `<task>-<split>-null_odds.json` ({question id: null odds}); the
    files feed the official evaluate-v1.1.py / evaluate-v2.0.py scripts as they are."""
    predictions, null_odds = answers(task, split, outputs)
    stem = Path(out_dir) / f"{task.name}-{split.name}"
    written = [write_predictions_json(f"{stem}-predictions.json", predictions)]
    if option(task, "version_2"):
        written.append(write_null_odds(f"{stem}-null_odds.json", null_odds))
    return written


# ------------------------------------------------------------------------------------------------------ windowing


def windows(examples: dict[str, list], tokenizer, max_length: int = 384, stride: int = 128) -> dict[str, list]:
    """`datasets.map(batched=True)` function: one tokenisation of question/context pairs into overlapping windows.

    Columns: the tokenizer's (input_ids, attention_mask, token_type_ids for BERT-style models); the training
    targets start_positions / end_positions (a window that does not hold the whole first gold answer, and any
    unanswerable question, points both at the CLS token); and for post-processing `example_id` (the question id)
    and `offset_mapping` (the character span in the context per token, None for the other tokens).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer: SQuAD needs character offsets")
    questions = [question.lstrip() for question in examples["question"]]
    contexts = examples["context"]
    context_first = tokenizer.padding_side == "left"  # keep the context on the side away from the padding
    encoding = tokenizer(
        contexts if context_first else questions,
        questions if context_first else contexts,
        truncation="only_first" if context_first else "only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    context_index = 0 if context_first else 1
    sample_of = encoding.pop("overflow_to_sample_mapping")
    all_offsets = encoding.pop("offset_mapping")
    starts, ends, offset_columns = [], [], []
    for window, offsets in enumerate(all_offsets):
        sequence_ids = encoding.sequence_ids(window)
        start, end = answer_positions(examples["answers"][sample_of[window]], offsets, sequence_ids, context_index)
        if start is None:
            input_ids = encoding["input_ids"][window]
            start = end = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        starts.append(start)
        ends.append(end)
        offset_columns.append(
            [
                list(offset) if sequence == context_index else None
                for offset, sequence in zip(offsets, sequence_ids, strict=True)
            ]
        )
    encoding["start_positions"] = starts
    encoding["end_positions"] = ends
    encoding["example_id"] = [examples["id"][sample] for sample in sample_of]
    encoding["offset_mapping"] = offset_columns
    return dict(encoding)


def answer_positions(answers: dict, offsets: list, sequence_ids: list, context_index: int) -> tuple:
    """Token positions (start, end) of the first gold answer in one window, or (None, None) when the window does
    not hold all of it (or the question has none)."""
    if not answers["answer_start"]:
        return None, None
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [position for position, sequence in enumerate(sequence_ids) if sequence == context_index]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None, None
    first, last = context[0], context[-1]
    start = max(t for t in range(first, last + 1) if offsets[t][0] <= start_char)
    end = min(t for t in range(start, last + 1) if offsets[t][1] >= end_char)
    return start, end


# ------------------------------------------------------------------------------------------------ post-processing


def postprocess(
    examples: list[dict],
    features: Iterable[dict],
    start_logits: Sequence,
    end_logits: Sequence,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
) -> tuple[dict[str, str], dict[str, float]]:
    """Answer text per question from per-token start/end logits of the eval features (see `encode_eval`).

    In each window the `n_best` highest start and end logits are paired; a pair counts when both tokens are in the
    context, start <= end and the span is at most `max_answer_length` tokens; its score is start + end logit. The
    answer is the best pair over all windows of the question. The null score is the lowest CLS score (position 0)
    over the windows. Returns (predictions {id: text}, null_odds {id: null score - best span score}); for
    version_2 the prediction is "" when null_odds > 0, and null_odds is empty for SQuAD 1.1. Logits may be
    ragged (one row per feature, its own length) or padded (extra positions are ignored).
    """
    features = list(features)
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"{len(features)} features but {len(start_logits)} start and {len(end_logits)} end logit rows")
    windows_of = defaultdict(list)
    for index, feature in enumerate(features):
        windows_of[feature["example_id"]].append(index)

    predictions: dict[str, str] = {}
    null_odds: dict[str, float] = {}
    for example in examples:
        best = None  # (score, start_char, end_char)
        null_score = float("inf")
        for index in windows_of.get(example["id"], []):
            offsets = features[index]["offset_mapping"]
            length = min(len(offsets), len(start_logits[index]), len(end_logits[index]))
            starts = np.asarray(start_logits[index], dtype=np.float64)[:length]
            ends = np.asarray(end_logits[index], dtype=np.float64)[:length]
            null_score = min(null_score, starts[0] + ends[0])
            span = _best_span(starts, ends, offsets[:length], n_best, max_answer_length)
            if span is not None and (best is None or span[0] > best[0]):
                best = span
        text = example["context"][best[1] : best[2]] if best is not None else ""
        if version_2:
            odds = null_score - best[0] if best is not None else float("inf")
            null_odds[example["id"]] = float(odds)
            text = "" if odds > 0.0 else text
        predictions[example["id"]] = text
    return predictions, null_odds


def _best_span(starts: np.ndarray, ends: np.ndarray, offsets: list, n_best: int, max_answer_length: int):
    """(score, start_char, end_char) of the best valid span in one window, or None."""
    in_context = np.array([offset is not None and offset[0] >= 0 and offset[1] > offset[0] for offset in offsets])
    usable_start = in_context & np.isfinite(starts)
    usable_end = in_context & np.isfinite(ends)
    if not usable_start.any() or not usable_end.any():
        return None
    top_starts = np.argsort(-starts, kind="stable")[:n_best][:, None]
    top_ends = np.argsort(-ends, kind="stable")[:n_best][None, :]
    valid = (
        usable_start[top_starts]
        & usable_end[top_ends]
        & (top_ends >= top_starts)
        & (top_ends - top_starts + 1 <= max_answer_length)
    )
    scores = np.where(valid, starts[top_starts] + ends[top_ends], -np.inf)
    row, column = np.unravel_index(np.argmax(scores), scores.shape)
    if not valid[row, column]:
        return None
    start, end = int(top_starts[row, 0]), int(top_ends[0, column])
    return float(scores[row, column]), int(offsets[start][0]), int(offsets[end][1])
