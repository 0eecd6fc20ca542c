"""Extractive QA (SQuAD 1.1 / 2.0): reading the official files or the hub into canonical examples.

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

Windowing and answer post-processing belong to the span task type (ptv2.tasks.span), which serves any reader that
gives this form.
"""

from __future__ import annotations

import logging
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
