"""Sentence(-pair) classification from JSON-lines files: one object per line with a first text, an optional second
text and a label. The field names come from the task YAML (task.options: text_a_field, text_b_field, label_field;
defaults "text_a", "text_b", "label"), so a new dataset in this form is one YAML file and no code.

Examples (the classification task type's canonical form): {"idx", "text_a", "text_b" ("" without a second text),
"label": index into task.labels, -1 when the line has no label (a test file)}. Labels are read by name (or as an
index into task.labels); metrics and prediction files are the task type's own (accuracy; <task>-<split>.jsonl).
"""

from __future__ import annotations

from ptv2.data.files import JSONL_FILES, field, jsonl_records, label_id
from ptv2.errors import UserError


def local_files(task) -> dict[str, dict[str, list[str]]]:
    return JSONL_FILES


def load(task, split: str) -> list[dict]:
    return examples_of(task, jsonl_records(task, split), split)


def examples_of(task, records, split: str) -> list[dict]:
    """Canonical examples of (where, record) pairs: a file's lines, or the records a server is sent (split "test":
    labels optional)."""
    options = task.get("options") or {}
    text_a, text_b = options.get("text_a_field", "text_a"), options.get("text_b_field", "text_b")
    label_field = options.get("label_field", "label")
    labels = [str(label) for label in task.labels]
    examples = []
    for where, record in records:
        first, second = field(record, text_a, where), record.get(text_b, "") if text_b else ""
        if not isinstance(first, str) or not isinstance(second, str):
            raise UserError(f"{where}: '{text_a}' and '{text_b}' must be strings")
        labelled = split != "test" or label_field in record
        label = label_id(field(record, label_field, where), labels, where) if labelled else -1
        examples.append({"idx": record.get("idx", len(examples)), "text_a": first, "text_b": second, "label": label})
    return examples
