"""Extractive QA (SQuAD 1.1 / 2.0): reading, sliding-window tokenisation, and span post-processing.

Canonical example (the same as a row of the hub's `squad` datasets):
    {"id": str, "title": str, "question": str, "context": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]}}
Unanswerable SQuAD 2.0 questions have empty `text` and `answer_start` lists.

Sources:
- local official json (`task.data_dir`, found by name or named by `task.files`): train-v1.1.json / dev-v1.1.json,
  train-v2.0.json / dev-v2.0.json (`is_impossible` and `plausible_answers` are read past: the golds are `answers`);
- the Hugging Face hub, parquet-backed:
  squad    -> path `rajpurkar/squad`,    name `plain_text`
  squad_v2 -> path `rajpurkar/squad_v2`, name `squad_v2`
  (splits `train` and `validation`), each at the revision its conf/task YAML pins (`hub:`).

Tokenisation follows the usual recipe for BERT/RoBERTa extractive QA: question and context as a pair, only the
context truncated, long contexts cut into overlapping windows (`stride` tokens shared between neighbours).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptv2.data.files import field, hub_rows, local_split, read_json
from ptv2.errors import UserError

log = logging.getLogger("ptv2")


# --------------------------------------------------------------------------------------------------------- reading


def local_files(task) -> dict[str, dict[str, list[str]]]:
    """The official names of the task's version (format json), found in task.data_dir unless task.files names
    another; a folder may hold both versions."""
    version = "v2.0" if (task.get("options") or {}).get("version_2") else "v1.1"
    return {"json": {split: [f"{split}-{version}.json", f"{split}.json"] for split in ("train", "dev")}}


def load(task, split: str) -> list[dict]:
    """Canonical examples of one split ("train" or "dev") of `task` (name squad|squad_v2).

    With `task.data_dir` set, reads the split's official json (local_files, or `task.files[split]`); otherwise the
    hub dataset `task.hub` (path, name, revision) at split `task.hub_splits[split]`.
    """
    version_2 = bool((task.get("options") or {}).get("version_2"))
    if task.get("data_dir"):
        _, path = local_split(task, split, local_files(task))
        return checked_answers(read_official(path), split, version_2, str(path))

    rows, where = hub_rows(task, split, "official json files")
    examples = _unique([check_example(row, f"{where} row {index}") for index, row in enumerate(rows)], where)
    return checked_answers(examples, split, version_2, where)


def checked_answers(examples: list[dict], split: str, version_2: bool, where: str) -> list[dict]:
    """The answers of a labelled split held to the official format: each answer text stands in the context at its
    answer_start, and in SQuAD 1.1 (not version_2) every training question has an answer.

    An unanswered SQuAD 1.1 training question is refused (it would train the model to point at [CLS], which 1.1
    decoding never predicts): one line with the count and the first id. A training question whose first answer
    (the one trained on) is not at its answer_start is left out of training, with a warning giving the count; in
    the dev split mismatches are only counted (the answer texts are what is scored).
    """
    if split not in ("train", "dev"):
        return examples
    if split == "train" and not version_2:
        unanswered = [example["id"] for example in examples if not example["answers"]["text"]]
        if unanswered:
            raise UserError(
                f"{where}: {len(unanswered)} of {len(examples)} training questions have no answer (first: "
                f"{unanswered[0]}); SQuAD 1.1 training needs one per question: use task=squad_v2 for unanswerable "
                "questions"
            )

    def misplaced(example: dict, answers: int | None) -> bool:
        context, gold = example["context"], example["answers"]
        pairs = list(zip(gold["text"], gold["answer_start"], strict=True))[:answers]
        return any(context[start : start + len(text)] != text for text, start in pairs)

    bad = [example["id"] for example in examples if misplaced(example, 1 if split == "train" else None)]
    if bad:
        what = "are left out of training" if split == "train" else "are kept: only their texts are scored"
        log.warning(
            "%s: %d of %d questions have an answer that is not at its answer_start in the context (first: %s); they %s",
            where, len(bad), len(examples), bad[0], what,
        )  # fmt: skip
        if split == "train":
            skipped = set(bad)
            examples = [example for example in examples if example["id"] not in skipped]
    return examples


def read_official(path: str | Path) -> list[dict]:
    """Canonical examples of an official SQuAD json file (data -> paragraphs -> qas -> answers)."""
    document = read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise UserError(f"{path}: not an official SQuAD file (expected an object with a 'data' list of articles)")
    examples = []
    for article_number, article in enumerate(document["data"]):
        where = f"{path}: article {article_number}"
        _expect(article, dict, "an article", where)
        title = field(article, "title", where)
        for paragraph in _expect(field(article, "paragraphs", where), list, "'paragraphs'", where):
            _expect(paragraph, dict, "a paragraph", where)
            context = field(paragraph, "context", where)
            for qa in _expect(field(paragraph, "qas", where), list, "'qas'", where):
                _expect(qa, dict, "a question", where)
                question_where = f"{path}: question {qa.get('id', '(no id)')}"
                answers = _expect(field(qa, "answers", question_where), list, "'answers'", question_where)
                for answer in answers:
                    _expect(answer, dict, "an answer", question_where)
                example = {
                    "id": field(qa, "id", question_where),
                    "title": title,
                    "question": field(qa, "question", question_where),
                    "context": context,
                    "answers": {
                        "text": [field(answer, "text", question_where) for answer in answers],
                        "answer_start": [field(answer, "answer_start", question_where) for answer in answers],
                    },
                }
                examples.append(check_example(example, question_where))
    return _unique(examples, str(path))


def check_example(example: dict[str, Any], where: str) -> dict:
    """A canonical example checked field by field (a UserError names `where` and the bad field)."""
    _expect(example, dict, "an example", where)
    checked = {
        name: _expect(field(example, name, where), str, f"'{name}'", where) for name in ("id", "question", "context")
    }
    title = example.get("title", "")
    checked["title"] = _expect(title if title is not None else "", str, "'title'", where)
    answers = _expect(field(example, "answers", where), dict, "'answers'", where)
    texts = list(_expect(field(answers, "text", where + " answers"), (list, tuple), "'answers.text'", where))
    starts = list(_expect(field(answers, "answer_start", where + " answers"), (list, tuple), "'answer_start'", where))
    if len(texts) != len(starts):
        raise UserError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    for text, start in zip(texts, starts, strict=True):
        _expect(text, str, "an answer text", where)
        if (
            isinstance(start, bool)
            or not isinstance(start, (int, np.integer))
            or not 0 <= start <= len(checked["context"])
        ):
            raise UserError(f"{where}: answer_start {start!r} is not a position in the context")
    checked["answers"] = {"text": texts, "answer_start": [int(start) for start in starts]}
    return {key: checked[key] for key in ("id", "title", "question", "context", "answers")}


def _expect(value: Any, kind: type | tuple[type, ...], what: str, where: str) -> Any:
    if not isinstance(value, kind):
        raise UserError(f"{where}: expected {what} to be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", list: "a list", tuple: "a list", str: "a string"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _unique(examples: list[dict], where: str) -> list[dict]:
    seen = set()
    for example in examples:
        if example["id"] in seen:
            raise UserError(f"{where}: question id {example['id']} appears more than once")
        seen.add(example["id"])
    return examples


# ---------------------------------------------------------------------------------------------- pre-processing


def _tokenize(examples: dict[str, list], tokenizer, max_length: int, stride: int, padding: bool | str):
    """Question/context pairs cut into overlapping windows; returns (encoding, index of the context sequence)."""
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
        padding=padding,
    )
    return encoding, 0 if context_first else 1


def _context_range(sequence_ids: list[int | None], context_index: int) -> tuple[int, int] | None:
    """First and last token positions of the context in one window (None for an empty context)."""
    positions = [position for position, sequence in enumerate(sequence_ids) if sequence == context_index]
    return (positions[0], positions[-1]) if positions else None


def encode_train(
    examples: dict[str, list], tokenizer, max_length: int = 384, stride: int = 128, pad_to_max: bool = False
) -> dict[str, list]:
    """`datasets.map(batched=True)` function: training windows with `start_positions` / `end_positions`.

    One example gives one feature per window; a window that does not hold the whole (first) gold answer, and any
    unanswerable question, points both positions at the CLS token. Columns: the tokenizer's (input_ids,
    attention_mask, token_type_ids for BERT-style models) plus start_positions and end_positions.
    """
    encoding, context_index = _tokenize(examples, tokenizer, max_length, stride, "max_length" if pad_to_max else False)
    sample_of = encoding.pop("overflow_to_sample_mapping")
    all_offsets = encoding.pop("offset_mapping")
    starts, ends = [], []
    for window, offsets in enumerate(all_offsets):
        input_ids = encoding["input_ids"][window]
        cls = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answers = examples["answers"][sample_of[window]]
        start, end = cls, cls
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            bounds = _context_range(encoding.sequence_ids(window), context_index)
            first, last = bounds if bounds else (0, -1)
            if bounds and offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                start = max(t for t in range(first, last + 1) if offsets[t][0] <= start_char)
                end = min(t for t in range(start, last + 1) if offsets[t][1] >= end_char)
        starts.append(start)
        ends.append(end)
    encoding["start_positions"] = starts
    encoding["end_positions"] = ends
    return dict(encoding)


def encode_eval(examples: dict[str, list], tokenizer, max_length: int = 384, stride: int = 128) -> dict[str, list]:
    """`datasets.map(batched=True)` function: evaluation windows that remember where they came from.

    Columns: the tokenizer's (input_ids, attention_mask, token_type_ids for BERT-style models), `example_id` (the
    question id) and `offset_mapping` (character span in the context per token, None for non-context tokens).
    """
    encoding, context_index = _tokenize(examples, tokenizer, max_length, stride, False)
    sample_of = encoding.pop("overflow_to_sample_mapping")
    encoding["example_id"] = [examples["id"][sample] for sample in sample_of]
    encoding["offset_mapping"] = [
        [
            list(offset) if sequence == context_index else None
            for offset, sequence in zip(offsets, encoding.sequence_ids(w), strict=True)
        ]
        for w, offsets in enumerate(encoding["offset_mapping"])
    ]
    return dict(encoding)


# --------------------------------------------------------------------------------------------- post-processing


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
