"""A JSON-lines record larger than MAX_RECORD_CHARS is one line naming it, read no further (a 10 MB line once took
37 s and 3.2 GB to tokenize before the model cut it to task.max_length tokens)."""

from __future__ import annotations

import json

import pytest

from ptv2.data import files
from ptv2.errors import UserError


def test_a_record_over_the_limit_is_named_and_one_at_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_RECORD_CHARS", 40)
    path = tmp_path / "records.jsonl"
    fits = json.dumps({"text": "x" * 28})  # 40 characters
    assert len(fits) == 40
    path.write_text(fits + "\n" + json.dumps({"text": "y" * 29}) + "\n")
    with pytest.raises(UserError, match=r"records.jsonl:2: a record of over 40 characters"):
        list(files.read_jsonl(path))
    path.write_text(fits + "\n" + fits)  # the last line without its newline
    assert [number for number, _ in files.read_jsonl(path)] == [1, 2]
