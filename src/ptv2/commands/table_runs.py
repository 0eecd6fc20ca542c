"""The runs of `ptv2 table`: every results.json under a folder read into a Run (the run's task, backbone, method,
score under the selection protocol and flattened config), or the one reason it cannot be used; failed and unfinished
jobs with the error line of their log."""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptv2.config import flat_keys
from ptv2.runs.summary import in_percent


@dataclass
class Run:
    path: Path
    task: str
    backbone: str
    method: str
    split: str
    metric: str
    score: float  # percent
    seed: object
    config: dict[str, str]  # flattened, values as short strings
    results: dict = field(repr=False, default_factory=dict)


def flatten(config: dict) -> dict[str, str]:
    """A run's config as {"dotted.key": short text} (lists as JSON)."""
    return {
        key: json.dumps(value) if isinstance(value, list) else str(value) for key, value in flat_keys(config).items()
    }


def _metric_of(select, member: str | None = None) -> str:
    return select if isinstance(select, str) else select[member]


def score_of(results: dict, config: dict) -> tuple[str, str, float]:
    """(split, metric, score in percent) of a run under the selection protocol (table.py: PROTOCOL)."""
    task = config.get("task") or {}
    if not isinstance(task, dict):
        raise TypeError("config.yaml: task is not a mapping")
    select = results["select_metric"]
    metric = select if isinstance(select, str) else "/".join(sorted(set(select.values())))
    if "test_at_best" in results:
        tested, split = results["test_at_best"], task.get("test_split") or "test"
        if isinstance(select, str):
            value = tested[select]
        else:  # one dict per member
            value = statistics.fmean(tested[m][_metric_of(select, m)] for m in tested)
    else:
        split, value = task.get("eval_split") or "dev", results["best_value"]
    return split, metric, in_percent(value, task.get("type"))  # SQuAD's metrics are percentages already


class Unusable(ValueError):
    """A run folder whose files the table cannot use: the reason, for its one skip line."""


def _read_mapping(path: Path, parse) -> dict:
    """A JSON / YAML file that must hold a mapping; Unusable naming what is wrong with it."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise Unusable(f"{path.name} is unreadable ({getattr(error, 'strerror', None) or error})") from None
    except (ValueError, yaml.YAMLError) as error:
        raise Unusable(f"{path.name} is not valid ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise Unusable(f"{path.name} holds {type(value).__name__}, not a mapping")
    return value


def load_run(results_path: Path) -> Run:
    results = _read_mapping(results_path, json.loads)
    config_path = results_path.with_name("config.yaml")
    config = _read_mapping(config_path, yaml.safe_load) if config_path.exists() else {}
    try:
        split, metric, score = score_of(results, config)
    except KeyError as error:
        raise Unusable(f"results.json lacks {error}") from None
    except (TypeError, ValueError, AttributeError, statistics.StatisticsError) as error:
        raise Unusable(f"results.json has an entry of the wrong type ({error})") from None
    if not math.isfinite(score):
        raise Unusable(f"its score is {score} (a diverged run)")
    names = {key: results.get(key) for key in ("task", "backbone", "method")}
    odd = [f"{key}={value!r}" for key, value in names.items() if not isinstance(value, str) or not value]
    if odd:
        raise Unusable(f"results.json: {', '.join(odd)} is not a name")
    if not isinstance(split, str) or not isinstance(metric, str):
        raise Unusable(f"the split or metric ({split!r}, {metric!r}) is not a name")
    trainer = config.get("trainer")
    return Run(
        path=results_path.parent,
        task=results["task"],
        backbone=results["backbone"],
        method=results["method"],
        split=split,
        metric=metric,
        score=score,
        seed=trainer.get("seed") if isinstance(trainer, dict) else None,
        config=flatten(config),
        results=results,
    )


def failure_reason(job_dir: Path) -> str:
    """Why a job failed: the line of its FAILED marker, else the error line of its log (the one-line user error,
    else the exception of the traceback)."""
    marker = ""
    if not (job_dir / "FAILED").is_symlink():
        try:
            with open(job_dir / "FAILED", "rb") as file:  # a line, not whatever a received folder put there
                marker = file.read(1000).decode("utf-8", errors="replace").strip()
        except OSError:
            pass
    if marker and marker != "see the job's log":
        return marker.splitlines()[0]
    logs = sorted(job_dir.glob("*.log"))
    if not logs:
        return "no log"
    try:
        lines = logs[0].read_text(errors="replace").splitlines()
    except OSError as error:
        return f"{logs[0].name} is unreadable ({error.strerror})"
    for line in lines:
        if "ptv2: error:" in line:
            return line[line.index("ptv2: error:") + len("ptv2: error: ") :]
    if any(line.startswith("Traceback") for line in lines):
        plain = [line for line in lines if line.strip() and not line.startswith(("[", " "))]
        return plain[-1] if plain else "traceback in the log"
    return f"see {logs[0].name}"


def job_overrides(job_dir: Path) -> str:
    overrides = job_dir / ".hydra" / "overrides.yaml"
    if not overrides.exists():
        return ""
    try:
        listed = yaml.safe_load(overrides.read_text(encoding="utf-8")) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "(unreadable .hydra/overrides.yaml)"
    if not isinstance(listed, list):
        return "(malformed .hydra/overrides.yaml)"
    return " ".join(str(item) for item in listed)


def collect(root: Path) -> tuple[list[Run], list[dict]]:
    """(runs with results, failures) under root; W&B folders are skipped."""
    runs, failures = [], []
    for path in sorted(root.rglob("results.json")):
        if "wandb" in path.relative_to(root).parts:
            continue
        try:
            runs.append(load_run(path))
        except Unusable as error:
            print(f"ptv2 table: skipped {path.parent}: {error}", file=sys.stderr)
            failures.append({"dir": path.parent, "reason": f"skipped: {error}"})
    seen = {run.path for run in runs} | {failure["dir"] for failure in failures}  # each folder reported once
    for marker in sorted(root.rglob("FAILED")):
        if marker.parent in seen:  # a job that failed, then was resumed to the end: its results stand
            continue
        failures.append({"dir": marker.parent, "reason": failure_reason(marker.parent)})
        seen.add(marker.parent)
    # A training job folder (its train.log and config.yaml) with neither: killed, crashed hard or still running.
    for log_file in sorted(root.rglob("train.log")):
        job = log_file.parent
        if job not in seen and (job / "config.yaml").exists():
            failures.append({"dir": job, "reason": "no results.json (killed, crashed or still running)"})
    for failure in failures:
        failure.setdefault("overrides", job_overrides(failure["dir"]))
    return runs, failures
