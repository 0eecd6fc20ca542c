"""Canonical examples of records sent one by one (a server's requests) rather than read from a file.

A record has the form of one line of the file `ptv2 predict input=FILE` reads for the task (its reader's JSON
form): SuperGLUE's official fields (RTE: premise, hypothesis), text_pairs' text_a / text_b, instructions' prompt,
tagging's tokens (SRL: and the predicate's word index), SQuAD's question and context. The reader's own checks
apply, so a bad record gets the line `ptv2 predict` would give for the same line of a file. Records are read as
the test split: labels may be left out.
"""

from __future__ import annotations

from ptv2.data import instructions, squad, superglue, tagging, text_pairs
from ptv2.errors import UserError

SPLIT = "test"
# What a record of each reader must hold, for the error a record without it gets and for the docs.
FIELDS = {
    "superglue": "the task's official fields (RTE: premise, hypothesis)",
    "text_pairs": "text_a (and text_b for a pair), or the fields task.options names",
    "instructions": "prompt (or the field task.options.prompt_field names)",
    "tagging": "tokens (a list of words; SRL: and predicate, the index of the predicate word)",
    "squad": "question and context",
}


def examples_of(task, records: list, where: str = "record") -> list[list[dict]]:
    """The canonical examples of each record (one each, several for MultiRC and ReCoRD records), in order."""
    if task.reader not in FIELDS:
        raise UserError(f"task {task.name}: records of reader {task.reader} cannot be sent; use ptv2 predict input=")
    examples = []
    for number, record in enumerate(records):
        place = f"{where} {number}"
        if not isinstance(record, dict):
            raise UserError(f"{place}: expected a JSON object with {FIELDS[task.reader]}, got {type(record).__name__}")
        examples.append(_examples(task, record, place, number))
    return examples


def _examples(task, record: dict, where: str, number: int) -> list[dict]:
    if task.reader == "superglue":
        labels = [str(label) for label in task.labels]
        options = dict(task.get("options") or {})
        return superglue.official_examples(task.name, [(where, record)], labels, options, labelled=False)
    if task.reader == "text_pairs":
        return text_pairs.examples_of(task, [(where, record)], SPLIT)
    if task.reader == "instructions":
        return instructions.examples_of(task, [(where, record)], SPLIT)
    if task.reader == "tagging":
        scheme = (task.get("options") or {}).get("scheme") or "auto"
        return [tagging.json_example(where, record, number, scheme, labelled=False)]
    given = {"id": str(number), "title": "", "answers": {"text": [], "answer_start": []}, **record}
    return [squad.check_example(given, where)]
