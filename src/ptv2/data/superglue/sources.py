"""The two sources of SuperGLUE records, official jsonl files and hub rows, turned into flat records (see
ptv2.data.superglue), with the checked-field helpers both sources and the posing use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ptv2.data.files import field
from ptv2.data.superglue.tables import _FLAT_IDX, _HUB_CLASSES
from ptv2.errors import UserError

# ------------------------------------------------------------------------------------------ sources -> flat records
# A flat record has the hub's column names, "label" holding the official label value (str, bool or int) or None
# when unlabelled; ReCoRD has "entities" (sorted unique texts) and "answers" (sorted unique texts, None unlabelled).


def _flatten_official(name: str, record: dict, where: str, labelled: bool) -> list[tuple[str, dict]]:
    """(place, flat record) pairs of one official jsonl record: several for MultiRC and ReCoRD, else one."""
    if name == "multirc":
        return _flatten_multirc(record, where, labelled)
    if name == "record":
        return _flatten_record(record, where, labelled)
    row = dict(record)
    if name == "wsc":
        row.update(_object(record, "target", where))
    if name not in _FLAT_IDX:  # the flat tasks' records may leave it out: posing._examples numbers them
        row["idx"] = field(record, "idx", where)
    row["label"] = _label(record, where, labelled)
    return [(where, row)]


def _label(record: dict, where: str, labelled: bool):
    """The official label of a record; in a labelled split (train, dev) it must be given: a null label is refused
    when reading, naming the line, instead of failing mid-epoch."""
    if not labelled:
        return record.get("label")
    label = field(record, "label", where)
    if label is None:
        raise UserError(f"{where}: the label is null; train and dev files need a label on every example")
    return label


def _flatten_multirc(record: dict, where: str, labelled: bool) -> list[tuple[str, dict]]:
    passage = _object(record, "passage", where)
    paragraph = field(passage, "text", f"{where} passage")
    rows = []
    for q, question in enumerate(_objects(passage, "questions", f"{where} passage")):
        q_where = f"{where} passage.questions[{q}]"
        for a, answer in enumerate(_objects(question, "answers", q_where)):
            a_where = f"{q_where}.answers[{a}]"
            label = _label(answer, a_where, labelled)
            row = {
                "paragraph": paragraph,
                "question": field(question, "question", q_where),
                "answer": field(answer, "text", a_where),
                "idx": {
                    "paragraph": field(record, "idx", where),
                    "question": field(question, "idx", q_where),
                    "answer": field(answer, "idx", a_where),
                },
                # Official MultiRC labels are 0/1: map them to the names "false"/"true".
                "label": None if label is None else _zero_one(label, a_where) == 1,
            }
            rows.append((a_where, row))
    return rows


def _flatten_record(record: dict, where: str, labelled: bool) -> list[tuple[str, dict]]:
    passage = _object(record, "passage", where)
    text = _str(field(passage, "text", f"{where} passage"), f"{where} passage")
    entities = set()
    for e, span in enumerate(_objects(passage, "entities", f"{where} passage")):
        e_where = f"{where} passage.entities[{e}]"
        start, end = field(span, "start", e_where), field(span, "end", e_where)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(text)):
            raise UserError(f"{e_where}: entity span start={start!r} end={end!r} is outside the passage text")
        entities.add(text[start : end + 1])  # official offsets: `end` is inclusive
    rows = []
    for q, qa in enumerate(_objects(record, "qas", where)):
        q_where = f"{where} qas[{q}]"
        answers = _objects(qa, "answers", q_where) if labelled or "answers" in qa else None
        row = {
            "passage": text,
            "query": field(qa, "query", q_where),
            "entities": sorted(entities),
            "answers": sorted({field(answer, "text", q_where) for answer in answers}) if answers else None,
            "idx": {"passage": field(record, "idx", where), "query": field(qa, "idx", q_where)},
        }
        if labelled and row["answers"] is None:
            raise UserError(f"{q_where}: no answers in a labelled split")
        rows.append((q_where, row))
    return rows


def _flatten_hub(name: str, rows: Iterable[Mapping], where: str, labelled: bool) -> Iterable[tuple[str, dict]]:
    """(place, flat record) pairs of hub rows."""
    for i, row in enumerate(rows):
        place = f"{where} row {i}"
        yield place, _from_hub(name, dict(row), place, labelled)


def _from_hub(name: str, row: dict, where: str, labelled: bool) -> dict:
    """A hub row as a flat record: integer labels back to class names, -1 to None."""
    if name == "record":
        row["entities"] = sorted(set(field(row, "entities", where)))  # the hub stores a set: order is arbitrary
        row["answers"] = sorted(set(field(row, "answers", where))) or None
        if labelled and row["answers"] is None:
            raise UserError(f"{where}: no answers in a labelled split")
        return row
    label = field(row, "label", where)
    if label == -1:
        if labelled:
            raise UserError(f"{where}: label -1 (unlabelled) in a labelled split")
        row["label"] = None
    elif name in _HUB_CLASSES:
        classes = _HUB_CLASSES[name]
        if not (isinstance(label, int) and 0 <= label < len(classes)):
            raise UserError(f"{where}: unknown hub label {label!r}; expected -1 or 0..{len(classes) - 1}")
        row["label"] = classes[label]
    return row


def _idx_dict(row: dict, keys: tuple[str, ...], where: str) -> dict[str, int]:
    idx = field(row, "idx", where)
    if not isinstance(idx, Mapping):
        raise UserError(f"{where}: field 'idx' should be an object with {list(keys)}, got {idx!r}")
    return {key: _int(field(idx, key, f"{where} idx"), f"idx.{key}", where) for key in keys}


def _object(record: dict, name: str, where: str) -> dict:
    """record[name], checked to be a JSON object."""
    value = field(record, name, where)
    if not isinstance(value, dict):
        raise UserError(f"{where}: field '{name}' should be an object, got {type(value).__name__}")
    return value


def _objects(record: dict, name: str, where: str) -> list[dict]:
    """record[name], checked to be a list of JSON objects."""
    value = field(record, name, where)
    if not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        raise UserError(f"{where}: field '{name}' should be a list of objects")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    return value


def _int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: field '{name}' should be an integer, got {value!r}")
    return value


def _zero_one(value: Any, where: str) -> int:
    """A 0/1 label (COPA's choice, MultiRC's answer label)."""
    if isinstance(value, bool) or value not in (0, 1):
        raise UserError(f"{where}: unknown label {value!r}; expected 0 or 1")
    return int(value)
