"""SRL readers (CoNLL-2005 / CoNLL-2012): one BIO example per sentence and predicate, from the official pack's
lines or from bracket-notation column files (formats: tagging.py's docstring)."""

from __future__ import annotations

import re
from pathlib import Path

from ptv2.data.bio import canonical_example, check_lengths, sentences, to_bio
from ptv2.errors import UserError


def read_srl_pack(path: str | Path) -> list[dict]:
    """SRL examples from the official pack's lines: ``<predicate index> tokens ||| BIO tags``."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            words, separator, tag_text = line.partition("|||")
            if not separator:
                raise UserError(f"{where}: expected '<predicate index> tokens ||| tags' (no '|||' found)")
            if len(words.split()) < 2:
                raise UserError(f"{where}: expected '<predicate index> tokens ||| tags' (no tokens before '|||')")
            index_text, *tokens = words.split()
            tags = tag_text.split()
            check_lengths(tokens, tags, where)
            predicate = _predicate_index(index_text, len(tokens), where)
            examples.append(canonical_example(len(examples), tokens, to_bio(tags, where, "bio"), predicate))
    return examples


def _predicate_index(text: str, length: int, where: str) -> int:
    if not text.isdigit() or int(text) >= length:
        raise UserError(f"{where}: predicate index {text!r} is not a word position in 0..{length - 1}")
    return int(text)


# One cell of a bracket-notation column: opening "(LABEL"s, a "*", an optional repeated label, closing ")"s.
_BRACKET_CELL = re.compile(r"^((?:\([^()*\s]+)*)\*[^()*\s]*(\)*)$")


def read_srl_conll(path: str | Path, word_column: int | None = None) -> list[dict]:
    """SRL examples from CoNLL-2005/2012 column files, one per argument column (predicate) of each sentence."""
    examples = []
    for _, rows in sentences(path):
        rows = [(number, line) for number, line in rows if not line.startswith(("#begin", "#end"))]
        if not rows:
            continue
        table = _table(rows, path)
        words = [row[_word_column(table, word_column)] for row in table]
        for cells in _argument_columns(table):
            tags = _bracket_to_bio(cells, path, rows)
            examples.append(canonical_example(len(examples), words, tags, tags.index("B-V")))
    return examples


def _table(rows: list[tuple[int, str]], path: str | Path) -> list[list[str]]:
    table = [line.split() for _, line in rows]
    width = len(table[0])
    for (line_number, _), columns in zip(rows, table, strict=True):
        if len(columns) != width:
            raise UserError(f"{path}:{line_number}: {len(columns)} columns where the sentence's first line has {width}")
    return table


def _word_column(table: list[list[str]], word_column: int | None) -> int:
    if word_column is not None:
        return word_column
    # OntoNotes *_gold_conll rows: document id, part number, word number, word, ... (12 columns or more).
    first = table[0]
    return 3 if len(first) >= 12 and first[1].isdigit() and first[2].isdigit() else 0


def _argument_columns(table: list[list[str]]) -> list[list[str]]:
    """Columns in bracket notation holding exactly one V span: one per predicate, in column order."""
    columns = []
    for index in range(len(table[0])):
        cells = [row[index] for row in table]
        if all(_BRACKET_CELL.match(cell) for cell in cells):
            openings = [label for cell in cells for label in re.findall(r"\(([^()*\s]+)", cell)]
            if openings.count("V") == 1:
                columns.append(cells)
    return columns


def _bracket_to_bio(cells: list[str], path: str | Path, rows: list[tuple[int, str]]) -> list[str]:
    """BIO tags for one argument column; arguments of one predicate never nest, so depth stays <= 1."""
    tags = []
    label = None
    for cell, (line_number, _) in zip(cells, rows, strict=True):
        match = _BRACKET_CELL.match(cell)
        openings = re.findall(r"\(([^()*\s]+)", match.group(1))
        closings = len(match.group(2))
        if len(openings) > 1 or (openings and label) or closings > len(openings) + (label is not None):
            raise UserError(f"{path}:{line_number}: argument cell {cell!r} nests or closes a span that is not open")
        if openings:
            label = openings[0]
            tags.append(f"B-{label}")
        else:
            tags.append(f"I-{label}" if label else "O")
        if closings:
            label = None
    if label is not None:
        raise UserError(f"{path}:{rows[-1][0]}: argument {label} is still open at the end of the sentence")
    return tags
