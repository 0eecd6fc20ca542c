"""`ptv2 table` on whatever a sweep folder can hold (issue 22): corrupt, partial or odd results.json / config.yaml /
overrides.yaml, NaN and inf scores, unreadable entries, a bad --reference file, an --out that cannot be written.
Each bad run is one skip line (and a row under Failures), each bad argument one error line; never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ptv2.commands import table

GOOD = {
    "task": "rte",
    "backbone": "tiny",
    "method": "ptv2",
    "select_metric": "accuracy",
    "best_value": 0.75,
    "best_epoch": 1,
}


def make_run(root: Path, name: str, results, config: str | None = "trainer:\n  seed: 1\n") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return folder


def table_of(root: Path, capsys, *flags: str) -> tuple[int, list[str], str]:
    code = table.main([str(root), "--plot", "none", "--no-reference", *flags])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.strip().splitlines(), captured.out


BAD_RUNS = {
    "truncated_json": ('{"task": "rte", "best_va', None, "results.json is not valid"),
    "a_list": ("[1, 2]", None, "results.json holds list, not a mapping"),
    "missing_keys": ({"task": "rte"}, None, "results.json lacks 'select_metric'"),
    "nan_score": (
        '{"task": "rte", "backbone": "tiny", "method": "ptv2", "select_metric": "accuracy", "best_value": NaN}',
        None,
        "its score is nan",
    ),  # fmt: skip
    "inf_score": ({**GOOD, "best_value": float("inf")}, None, "its score is inf"),
    "string_score": ({**GOOD, "best_value": "high"}, None, "wrong type"),
    "numeric_task": ({**GOOD, "task": 7}, None, "task=7 is not a name"),
    "select_metric_list": ({**GOOD, "select_metric": ["a"]}, None, "wrong type"),
    "corrupt_config": (GOOD, "trainer: [unclosed", "config.yaml is not valid"),
    "config_a_string": (GOOD, "just text", "config.yaml holds str, not a mapping"),
    "config_task_a_list": (GOOD, "task: [1]", "task is not a mapping"),
    "binary_results": (b"\xff\xfe\x00", None, "results.json is unreadable"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_a_bad_run_is_one_skip_line_and_the_good_run_stays(case, tmp_path, capsys):
    results, config, reason = BAD_RUNS[case]
    make_run(tmp_path, "good", GOOD)
    bad = tmp_path / "bad"
    if isinstance(results, bytes):
        bad.mkdir()
        (bad / "results.json").write_bytes(results)
    else:
        make_run(tmp_path, "bad", results, config)
    (bad / "train.log").write_text("a training job's log\n")  # a job folder: reported once, as skipped
    (bad / "config.yaml").exists() or (bad / "config.yaml").write_text("{}\n")
    code, lines, out = table_of(tmp_path, capsys)
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith(f"ptv2 table: skipped {bad}: ") and reason in lines[0], lines
    assert "1 run(s)" in out and "1 failure(s)" in out
    assert f"`bad` (no overrides): skipped: {lines[0].split(': ', 2)[2]}" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.md").read_text().count("`bad`") == 1


def test_unreadable_entries_are_skipped(tmp_path, capsys):
    make_run(tmp_path, "good", GOOD)
    (tmp_path / "folder_named_results" / "results.json").mkdir(parents=True)  # a folder where a file should be
    failed = tmp_path / "failed"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "FAILED").write_text("see the job's log\n")
    (failed / ".hydra" / "overrides.yaml").write_text("{not: [closed")
    (failed / "train.log").mkdir()  # a log that cannot be read
    code, lines, _ = table_of(tmp_path, capsys)
    assert code == 0 and len(lines) == 1 and "results.json is unreadable" in lines[0]
    text = (tmp_path / "table.md").read_text()
    assert "`failed` ((unreadable .hydra/overrides.yaml)): train.log is unreadable" in text


def test_a_finished_run_with_a_stale_failed_marker_is_a_run_not_a_failure(tmp_path, capsys):
    folder = make_run(tmp_path, "resumed", GOOD)
    (folder / "FAILED").write_text("see the job's log\n")  # left by the interrupted attempt
    code, _, out = table_of(tmp_path, capsys)
    assert code == 0 and "1 run(s)" in out and "0 failure(s)" in out


REFERENCES = {
    "missing": (None, "does not exist; pass --reference FILE or --no-reference"),
    "corrupt": ("references: [", "is unreadable"),
    "a_list": ("- 1\n- 2\n", "expected a mapping with a references list"),
    "entry_not_mapping": ("references: [3]\nsources: {}\n", "is not a mapping"),
    "nan_value": (
        "references:\n- {task: rte, backbone: tiny, method: ptv2, split: dev, metric: accuracy, value: .nan, "
        "source: s}\nsources: {s: paper}\n",
        "not a finite number",
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_a_bad_reference_file_is_one_error_line(case, tmp_path, capsys):
    make_run(tmp_path / "runs", "good", GOOD)
    text, expected = REFERENCES[case]
    reference = tmp_path / "reference.yaml"
    if text is not None:
        reference.write_text(text)
    code = table.main([str(tmp_path / "runs"), "--plot", "none", "--reference", str(reference)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ptv2: error: ") and expected in lines[0], lines


def test_an_out_that_is_a_file_or_read_only_is_one_error_line(tmp_path, capsys):
    make_run(tmp_path / "runs", "good", GOOD)
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    code, lines, _ = table_of(tmp_path / "runs", capsys, "--out", str(a_file))
    assert code == 2 and lines == [f"ptv2: error: --out {a_file} is a file, not a folder; pass --out DIR"]
    assert a_file.read_text() == "keep me"
    if os.getuid() == 0:
        pytest.skip("root writes into read-only folders")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    code, lines, _ = table_of(tmp_path / "runs", capsys, "--out", str(read_only))
    assert code == 2 and len(lines) == 1 and "Permission denied); pass --out DIR with a writable folder" in lines[0]
