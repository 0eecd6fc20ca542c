"""BIO tags and the canonical tagging example, shared by the NER readers (tagging.py) and the SRL readers
(srl.py): tags of any scheme to BIO, entity spans to BIO, the sentence blocks of a column file.

Canonical example: ``{"idx": int, "tokens": [str], "tags": [str] (BIO), "predicate": int}``; ``predicate`` is the
0-based word index of the predicate for SRL (one example per sentence and predicate) and -1 for NER.
"""

from __future__ import annotations

from pathlib import Path

from ptv2.errors import UserError

# Tag prefixes each scheme may use; "auto" accepts them all (the conversion below is the same for every scheme).
SCHEME_PREFIXES = {
    "auto": "BIESLU",
    "iob1": "BI",
    "iob2": "BI",
    "bio": "BI",
    "bioes": "BIES",
    "iobes": "BIES",
    "bilou": "BILU",
}


def to_bio(tags: list[str], where: str = "tags", scheme: str = "auto") -> list[str]:
    """Convert IOB1 / IOB2 / BIOES / BILOU tags to BIO (IOB2): each entity starts with B-, continues with I-.

    One rule serves every scheme: a tag continues an entity only when it is I-, E- or L- of the same type right
    after a B- or I- tag; otherwise it begins one. IOB1's sentence-initial or after-O I- thus becomes B-.
    """
    allowed = SCHEME_PREFIXES.get(str(scheme).lower())
    if allowed is None:
        raise UserError(f"unknown tag scheme '{scheme}'; expected one of {', '.join(SCHEME_PREFIXES)}")
    bio: list[str] = []
    previous = "O"
    for position, tag in enumerate(tags):
        prefix, kind = _split_tag(tag, where, position, allowed)
        if prefix is None:
            bio.append("O")
        elif prefix in "IEL" and previous[:1] in "BI" and previous[2:] == kind:
            bio.append(f"I-{kind}")
        else:
            bio.append(f"B-{kind}")
        # Track the raw prefix: after E-/L-/S-/U- the entity has ended even if the next tag is I- of the same type.
        previous = tag if prefix is None or prefix in "BI" else "O"
    return bio


def _split_tag(tag: str, where: str, position: int, allowed: str) -> tuple[str | None, str]:
    if tag == "O":
        return None, ""
    if len(tag) < 3 or tag[1] != "-" or tag[0] not in allowed:
        raise UserError(
            f"{where}: tag {tag!r} (word {position + 1}) is not O or one of {'/'.join(allowed)}-TYPE; "
            "check the tag column (task.options.tag_column) and the scheme (task.options.scheme)"
        )
    return tag[0], tag[2:]


def spans_to_bio(length: int, spans: list[tuple[int, int, str]], where: str) -> list[str]:
    """BIO tags for non-overlapping (start, end exclusive, type) spans over `length` words."""
    tags = ["O"] * length
    for start, end, kind in sorted(spans):
        if not (0 <= start < end <= length):
            raise UserError(f"{where}: entity {kind} [{start}, {end}) lies outside the {length} tokens")
        if any(tag != "O" for tag in tags[start:end]):
            raise UserError(f"{where}: entity {kind} [{start}, {end}) overlaps another one; BIO cannot encode that")
        tags[start] = f"B-{kind}"
        tags[start + 1 : end] = [f"I-{kind}"] * (end - start - 1)
    return tags


def sentences(path: str | Path):
    """Yield (first line number, [(line number, line)]) per blank-line separated block, skipping -DOCSTART-."""
    rows: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if line.strip() and not line.startswith("-DOCSTART-"):
                rows.append((line_number, line))
                continue
            # A blank or -DOCSTART- line closes the current sentence, as in the official readers.
            if rows:
                yield rows[0][0], rows
            rows = []
    # The official conll04 / ontonotes readers drop a last sentence with no blank line after it; we keep it.
    if rows:
        yield rows[0][0], rows


def canonical_example(idx: int, tokens: list[str], tags: list[str], predicate: int = -1) -> dict:
    return {"idx": idx, "tokens": tokens, "tags": tags, "predicate": predicate}


def check_lengths(tokens: list[str], tags: list[str], where: str) -> None:
    if not tokens:
        raise UserError(f"{where}: empty sentence (no tokens)")
    if len(tokens) != len(tags):
        raise UserError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
