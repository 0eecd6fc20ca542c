"""The lines that end a run and a sweep: what was measured, on which split, in which unit, and where it went.

`epoch_line` and `run_line` are meant for the training loop (loop.py's epoch log and the line after results.json);
`sweep_line` ends a multirun (cli.py). Numbers: counts (epoch, step) as integers, scores with four decimals in the
task's own unit, which the line names: fractions, except the SQuAD-style span tasks whose official script reports
percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

PERCENT_TASK_TYPES = ("span",)  # the official SQuAD script reports exact_match and f1 in percent
COUNT_KEYS = ("epoch", "step", "steps")


def unit(task_type: str | None) -> str:
    """'percent' for the task types whose metrics are percentages, else 'fraction'."""
    return "percent" if task_type in PERCENT_TASK_TYPES else "fraction"


def in_percent(value: float, task_type: str | None) -> float:
    """A score in percent, from the task's own unit (see `unit`)."""
    return float(value) * (1.0 if unit(task_type) == "percent" else 100.0)


def number(key: str, value) -> str:
    """A record value as shown: counts as integers, other numbers with four decimals, the rest as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.split("/")[-1] in COUNT_KEYS or isinstance(value, int):
        return str(int(value))
    return f"{value:.4f}"


def epoch_line(record: Mapping) -> str:
    """`epoch 3: step=78, train_loss=0.6931, ...`: the epoch line of the training loop (counts as integers)."""
    return f"epoch {record['epoch']}: " + ", ".join(f"{k}={number(k, v)}" for k, v in record.items() if k != "epoch")


def run_line(task: Mapping, results: Mapping, run_dir: str | Path) -> str:
    """One line after a run: the selection metric on the split that picked the best epoch, the test score at that
    epoch where the task has a test split (the tagging protocol), the unit and the folder. `task` is the run's
    task config, `results` its results.json record."""
    metric = results["select_metric"]
    metric = metric if isinstance(metric, str) else "mean of " + "/".join(sorted(set(metric.values())))
    dev = task.get("eval_split") or "dev"
    line = f"{task.get('name')}: best {dev} {metric}={results['best_value']:.4f} at epoch {results['best_epoch']}"
    tested = results.get("test_at_best")
    if tested is not None and isinstance(results["select_metric"], str):
        line += f"; {task.get('test_split') or 'test'} {metric}={tested[metric]:.4f} at that epoch"
    return f"{line} ({unit(task.get('type'))}); results in {run_dir}"


def sweep_line(sweep_dir: str | Path, jobs: int, failed: int) -> str:
    """One line after a multirun: how many jobs finished, where they are, and the command that tables them."""
    done = f"{jobs - failed} of {jobs} job(s) finished" + (f", {failed} failed" if failed else "")
    return f"ptv2: sweep: {done}; runs in {sweep_dir}; table: ptv2 table {sweep_dir}"


def evaluated(members) -> dict:
    """results.json's `evaluated`: per task, the split the dev score comes from, how many of its examples were
    scored and how many it has (`of`; trainer.limit_eval can cut it), and, for an accuracy task whose examples carry
    one label each, the majority class's accuracy in percent on those examples (the floor a plot draws)."""
    facts = {}
    for member in members:
        split = member.splits.get(member.task.eval_split)
        if split is None:
            continue
        labels = [example.get("label") for example in split.examples]
        scalar = labels and all(isinstance(label, (str, int)) and not isinstance(label, bool) for label in labels)
        majority = None
        if scalar and member.task.metric == "accuracy":
            majority = 100.0 * max(labels.count(label) for label in set(labels)) / len(labels)
        count = len(split.examples)
        facts[member.name] = {"split": split.name, "examples": count, "of": split.total or count, "majority": majority}
    return facts


def results_record(cfg, members: list, progress, extra: dict, prep_seconds, test) -> dict:
    """results.json's record (the caller adds the wall time): the epochs, the parameter counts and whatever else
    `extra` holds, the data preparation time, and the test scores at the best dev epoch when a test split is set."""
    from ptv2.runs import checkpoint  # torch: only for the end of a run

    single = len(members) == 1
    results = {
        "task": cfg.task.name,
        "backbone": checkpoint.backbone_label(cfg.backbone),
        "method": cfg.prompt.method,
        "select_metric": members[0].task.metric if single else {m.name: m.task.metric for m in members},
        "best_epoch": progress.best_epoch,
        "best": progress.best[members[0].name] if single else progress.best,
        "best_value": progress.best_value,
        "final": progress.history[-1],
        "history": progress.history,
        "train_examples": {m.name: len(m.splits["train"].examples) for m in members},
        "evaluated": evaluated(members),
        "steps": progress.step,
        **extra,
        "data_prep_seconds": prep_seconds,
    }
    if test is not None:
        results["test_at_best"] = test[members[0].name] if single else test
    return results
