"""How each SuperGLUE task is posed as the official P-tuning v2 code poses it: flat records -> canonical examples
(sentence pairs, COPA choices, one example per MultiRC answer and per ReCoRD entity; see ptv2.data.superglue)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ptv2.data.files import field, label_id
from ptv2.data.superglue.sources import _idx_dict, _int, _str, _zero_one
from ptv2.data.superglue.tables import _COLUMNS, _FLAT_IDX, TEMPLATES
from ptv2.errors import UserError

# ------------------------------------------------------------------------------------- flat records -> canonical


def _examples(name: str, flat: Iterable[tuple[str, dict]], labels: list[str], options: Mapping) -> list[dict]:
    """Pose every flat record as the task's canonical example(s)."""
    template = _template(name, options)
    examples = []
    for position, (where, row) in enumerate(flat):
        for column in _COLUMNS[name]:
            field(row, column, where)
        if "idx" not in row and name in _FLAT_IDX:
            # A user's own file (ptv2 predict input=FILE) need not carry the official bookkeeping id: its records
            # are numbered in file order, the id the prediction file then gives back.
            row = {**row, "idx": position}
        if name == "record":
            examples.extend(_record_examples(row, labels, where))
        elif name == "copa":
            examples.append(_copa_example(row, where))
        else:
            examples.append(_pair_example(name, row, labels, template, where))
    if name in ("multirc", "record"):
        # one official record gives many examples: number them; the official ids stay in meta
        for number, example in enumerate(examples):
            example["idx"] = number
    return examples


def _template(name: str, options: Mapping) -> str | None:
    if name not in TEMPLATES:
        return None
    choices = TEMPLATES[name]
    template = str(options.get("template") or choices[0])
    if template not in choices:
        raise UserError(f"task {name}: unknown options.template '{template}'; expected one of {list(choices)}")
    return template


def _pair_example(name: str, row: dict, labels: list[str], template: str | None, where: str) -> dict:
    """The sentence-pair example of one flat record (all tasks but COPA and ReCoRD)."""
    group, meta = None, {}
    if name == "boolq":
        text_a, text_b = row["question"], row["passage"]
    elif name in ("cb", "rte"):
        text_a, text_b = row["premise"], row["hypothesis"]
    elif name == "wic":
        text_a, text_b = wic_texts(row["word"], row["sentence1"], row["sentence2"], template)
    elif name == "wsc":
        text_a, text_b = wsc_texts(row, template, where)
    else:  # multirc
        text_a, text_b = row["paragraph"], f"{row['question']} {row['answer']}"
        ids = _idx_dict(row, ("paragraph", "question", "answer"), where)
        group, meta = f"p{ids['paragraph']}-q{ids['question']}", ids
    idx = 0 if name == "multirc" else _int(field(row, "idx", where), "idx", where)
    label = -1 if row["label"] is None else label_id(row["label"], labels, where)
    return _example(idx, _str(text_a, where), _str(text_b, where), label, group or str(idx), meta)


def wic_texts(word: str, sentence1: str, sentence2: str, template: str) -> tuple[str, str]:
    """(text_a, text_b) for WiC, both templates of the official code making the target word visible.

    - "question" (official template_id 0, the RoBERTa runs): one sequence,
      "<sentence1> <sentence2> Does <word> have the same meaning in both sentences?", text_b "".
    - "word_prefix" (official template_id 1, the BERT runs): a pair, "<word>: <sentence1>" and "<word>: <sentence2>".
    """
    if template == "word_prefix":
        return f"{word}: {sentence1}", f"{word}: {sentence2}"
    return f"{sentence1} {sentence2} Does {word} have the same meaning in both sentences?", ""


def wsc_texts(row: Mapping[str, Any], template: str, where: str = "wsc") -> tuple[str, str]:
    """(text_a, text_b) for WSC: the text with the pronoun (span2) marked, and the candidate referent (span1_text).

    - "pronoun_prefix" (official template_id 0, all official runs): text_a "<span2_text>: <text>".
    - "mark_pronoun" (official template_id 1): text_a is the text split on whitespace with the word at span2_index
      wrapped in asterisks ("*he*"), joined by single spaces. Like the official code, only that one word is marked
      (span2 is a pronoun) and span1 is not marked in the text: it is text_b.
    """
    text, pronoun, referent = (_str(row[key], where) for key in ("text", "span2_text", "span1_text"))
    if template == "mark_pronoun":
        words = text.split()
        index = _int(row["span2_index"], "span2_index", where)
        if not 0 <= index < len(words):
            raise UserError(f"{where}: span2_index {index} is outside the text ({len(words)} words)")
        words[index] = f"*{words[index]}*"
        return " ".join(words), referent
    return f"{pronoun}: {text}", referent


def _copa_example(row: dict, where: str) -> dict:
    """COPA: premise with the joiner the question asks for, and the two choices."""
    question = row["question"]
    if question not in ("cause", "effect"):
        raise UserError(f"{where}: field 'question' is {question!r}; expected 'cause' or 'effect'")
    joiner = "because" if question == "cause" else "so"
    idx = _int(field(row, "idx", where), "idx", where)
    label = -1 if row["label"] is None else _zero_one(row["label"], where)
    return {
        "idx": idx,
        "text_a": f"{_str(row['premise'], where)} {joiner}",
        "choices": [_str(row["choice1"], where), _str(row["choice2"], where)],
        "label": label,
        "group": str(idx),
        "meta": "{}",
    }


def _record_examples(row: dict, labels: list[str], where: str) -> list[dict]:
    """ReCoRD: one binary example per candidate entity, all splits alike.

    As in the official dataset.py (the path its trainer uses), the candidates are the passage's unique entity texts
    (the hub's dedupe), sorted here so that both sources agree, and an entity is right when its text is one of the
    gold answer texts. The official dataset_record.py (not used by its trainer) instead samples at most 10
    candidates per gold answer for training; that is not done here.
    """
    ids = _idx_dict(row, ("passage", "query"), where)
    passage = _str(row["passage"], where).replace("@highlight\n", "- ")
    query, answers = _str(row["query"], where), row["answers"]
    group = f"p{ids['passage']}-q{ids['query']}"
    examples = []
    for entity in row["entities"]:
        label = -1 if answers is None else label_id(entity in answers, labels, where)
        meta = {**ids, "entity": entity, "answers": answers or []}
        examples.append(_example(0, passage, query.replace("@placeholder", entity), label, group, meta))
    return examples


def _example(idx: int, text_a: str, text_b: str, label: int, group: str, meta: dict) -> dict:
    return {"idx": idx, "text_a": text_a, "text_b": text_b, "label": label, "group": group, "meta": json.dumps(meta)}
