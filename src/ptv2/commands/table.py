"""`ptv2 table DIR`: collect the results.json of runs and sweeps under DIR into a results table and plots.

One piece: collecting, the table, its details, the plots and the W&B upload all read the same cells (runs
grouped by task, split, metric, method, backbone and the keys that vary), built once in `build_table`.

Rows are tasks (one per split and metric), columns method x backbone. Runs that differ only in their seed are one
config: the cell is their mean ± std (sample std) and n. When runs of the same task, method and backbone also
differ in other config keys (a prompt-length sweep), those keys become row columns, so every config has its row.
Each cell is set beside the published number for the same task, backbone, method, split and metric
(src/ptv2/references.yaml, every number with its source) and the difference. Failed jobs (FAILED marker) and jobs
without results are listed, with the error line of their log.

Writes into --out (default DIR): table.md, table.csv (the same table, one number per column), runs.csv (one row
per run), plots (commands/plots.py: PNG, PDF and SVG, chosen from what varies: metric vs prompt length, vs prompt
depth, methods side by side) and plots.json (the plotted points).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptv2.commands.plots import AUTO_PLOTS, PLOTS, dev_per_epoch, make_plots, natural, split_text
from ptv2.config import ALIAS, COMMAND, FREE, REPLICATE, flat_keys, has_role, keys_with
from ptv2.errors import UserError
from ptv2.io import declare, output_folder, write_text
from ptv2.runs.summary import in_percent

REFERENCES = Path(__file__).parents[1] / "references.yaml"
OUTPUTS = declare("table", "table.md", "table.csv", "runs.csv", "plots.json", "*.png", "*.pdf", "*.svg")
# Config keys that never make two runs different configs: the seed (seeds are aggregated), bookkeeping, logging,
# keys that another one names, and eval/predict's own.
IGNORED = keys_with(REPLICATE, FREE, ALIAS, COMMAND)
PROTOCOL = (
    "Selection protocol: every run keeps its best dev epoch (results.json `best_epoch`, chosen by the task's "
    "selection metric). The score is the dev score at that epoch; for tasks with a test split (tagging) it is the "
    "test score at the best dev epoch (`test_at_best`). Multi-task runs: the mean over members. Scores in percent. "
    "Runs that differ only in `trainer.seed` are aggregated: mean ± sample std (n runs)."
)


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

    @property
    def cell(self) -> tuple:
        return (self.task, self.split, self.metric, self.method, self.backbone)


# ---------------------------------------------------------------------------------------------- collecting runs


def flatten(config: dict) -> dict[str, str]:
    """A run's config as {"dotted.key": short text} (lists as JSON)."""
    return {
        key: json.dumps(value) if isinstance(value, list) else str(value) for key, value in flat_keys(config).items()
    }


def _metric_of(select, member: str | None = None) -> str:
    return select if isinstance(select, str) else select[member]


def score_of(results: dict, config: dict) -> tuple[str, str, float]:
    """(split, metric, score in percent) of a run under the selection protocol (see PROTOCOL)."""
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


# ---------------------------------------------------------------------------------------------- the table


def _ignored(key: str) -> bool:
    return has_role(key, IGNORED)


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ among runs of one cell (task, split, metric, method, backbone)."""
    cells = defaultdict(list)
    for run in runs:
        cells[run.cell].append(run)
    keys = set()
    for members in cells.values():
        for key in set().union(*(run.config for run in members)):
            if not _ignored(key) and len({run.config.get(key) for run in members}) > 1:
                keys.add(key)
    first = ["prompt.length", "prompt.layers", "prompt.projection", "optimizer.lr"]
    return [k for k in first if k in keys] + sorted(keys - set(first))


@dataclass
class Cell:
    """The runs of one row and column. Grouping is a dict and mean ± sample std the standard library's statistics,
    not pandas' groupby (installed with datasets): fmean sums exactly (fsum) where pandas sums pairwise in floating
    point, so a published table's last digit could change with the library; and the table command stays free of a
    frame library's import time."""

    scores: list[float]
    runs: list[Run]
    reference: dict | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else math.nan

    @property
    def delta(self) -> float:
        return self.mean - self.reference["value"] if self.reference else math.nan


def load_references(path: Path | None) -> tuple[list[dict], dict]:
    if path is None:
        return [], {}
    if not path.is_file():
        raise UserError(f"reference file {path} does not exist; pass --reference FILE or --no-reference")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:120]
        raise UserError(f"reference file {path} is unreadable ({reason}); fix it or pass --no-reference") from None
    references = data.get("references", []) if isinstance(data, dict) else None
    sources = data.get("sources", {}) if isinstance(data, dict) else None
    if not isinstance(references, list) or not isinstance(sources, dict):
        raise UserError(f"{path}: expected a mapping with a references list and a sources mapping; see {REFERENCES}")
    for entry in references:
        if not isinstance(entry, dict):
            raise UserError(f"{path}: reference {str(entry)[:80]!r} is not a mapping; see {REFERENCES}")
        missing = {"task", "backbone", "method", "split", "metric", "value", "source"} - set(entry)
        if missing or entry["source"] not in sources:
            raise UserError(f"{path}: reference {entry} lacks {sorted(missing) or 'a source listed under sources'}")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{path}: reference {entry} has value {value!r}, not a finite number")
    return references, sources


def find_reference(references: list[dict], cell: tuple) -> dict | None:
    for entry in references:
        if (entry["task"], entry["split"], entry["metric"], entry["method"], entry["backbone"]) == cell:
            return entry
    return None


def build_table(runs: list[Run], references: list[dict]):
    """(row keys, column keys, {(row, column): Cell}, descriptor keys).

    A descriptor describes a run only where it varies among the runs of that run's cell: beside LoRA at two ranks,
    ptv2's row shows no rank (its config holds the schema's default, which it never reads)."""
    descriptors = varying_keys(runs)
    by_cell = defaultdict(list)
    for run in runs:
        by_cell[run.cell].append(run)
    shown = {cell: set(varying_keys(members)) for cell, members in by_cell.items()}
    cells: dict[tuple, Cell] = {}
    for run in runs:
        values = (run.config.get(key) if key in shown[run.cell] else None for key in descriptors)
        row = (run.task, run.split, run.metric, *values)
        column = (run.method, run.backbone)
        cell = cells.setdefault((row, column), Cell([], [], find_reference(references, run.cell)))
        cell.scores.append(run.score)
        cell.runs.append(run)
    rows = sorted({row for row, _ in cells}, key=lambda r: (r[0], r[1], r[2], *(natural(v) for v in r[3:])))
    columns = sorted({column for _, column in cells})
    return rows, columns, cells, descriptors


def _fmt(value: float, signed: bool = False) -> str:
    return "" if math.isnan(value) else (f"{value:+.1f}" if signed else f"{value:.1f}")


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return ""
    text = _fmt(cell.mean) if len(cell.scores) == 1 else f"{_fmt(cell.mean)} ± {_fmt(cell.std)} (n={len(cell.scores)})"
    if cell.reference:
        text += f" · ref {cell.reference['value']:.1f} (Δ {_fmt(cell.delta, signed=True)})"
    return text


def split_label(split: str, runs=()) -> str:
    """The split column says how the score was selected: a dev score is the best dev epoch's own score
    (dev-selected, optimistic, as the official SuperGLUE numbers are); a test score is taken at that epoch. With
    the runs, a dev split cut by trainer.limit_eval says so (`dev, first 128 of 277`)."""
    shown = split_text(split, runs) if runs else split
    return f"{shown} (at best dev epoch)" if split.startswith("test") else f"{shown} (dev-selected: best epoch)"


LIMIT_KEYS = ("trainer.limit_train", "trainer.limit_eval")


def limits_note(runs: list[Run]) -> str | None:
    """A warning when the runs were trained or evaluated on different numbers of examples (trainer.limit_*): their
    scores sit side by side in the table but are not measured alike."""
    groups = defaultdict(int)
    for run in runs:
        groups[
            tuple(run.config.get(key) if run.config.get(key) not in (None, "", "None") else "all" for key in LIMIT_KEYS)
        ] += 1
    if len(groups) < 2:
        return None
    shown = "; ".join(
        f"{', '.join(f'{k}={v}' for k, v in zip(LIMIT_KEYS, limits, strict=True))} ({count} run(s))"
        for limits, count in sorted(groups.items(), key=lambda item: natural(str(item[0])))
    )
    return f"**Note: these runs used different data limits, so their scores are not on the same examples**: {shown}."


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def details_lines(rows, columns, cells, descriptors) -> list[str]:
    """`--details`: one line per cell with how its runs were trained and how they went: learning rate, epochs,
    trainable share, the dev score of the best epoch, the reported score, the best epochs, the mean dev curve and
    the wall time per run."""
    header = [
        "task",
        "method / backbone",
        *descriptors,
        "P",
        "lr",
        "epochs",
        "trainable %",
        "dev (best epoch)",
        "score",
    ]
    header += ["best epochs", "dev per epoch (mean)", "n", "wall per run"]
    lines = ["## Settings and training", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for column in columns:
            cell = cells.get((row, column))
            if cell is None:
                continue
            runs, first = cell.runs, cell.runs[0]
            dev = [in_percent(run.results["best_value"], first.config.get("task.type")) for run in runs]
            curves = [curve for curve in map(dev_per_epoch, runs) if curve]
            width = min(map(len, curves)) if len(curves) == len(runs) else 0
            curve = " / ".join(f"{statistics.fmean(c[i] for c in curves):.1f}" for i in range(width))
            walls = [run.results.get("wall_time_seconds") for run in runs]
            wall = f"{statistics.fmean(walls) / 60:.0f} min" if all(isinstance(w, (int, float)) for w in walls) else ""
            share = first.results.get("trainable_percent")
            values = [
                row[0],
                f"{column[0]} / {column[1]}",
                *(v if v is not None else "" for v in row[3:]),
                "" if first.config.get("prompt.length") in (None, "0") else first.config["prompt.length"],
                first.config.get("optimizer.lr", ""),
                first.config.get("trainer.epochs", ""),
                f"{share:.3f}" if isinstance(share, (int, float)) else "",
                mean_std(dev),
                f"{split_label(row[1], cell.runs)}: {mean_std(cell.scores)}",
                ", ".join(str(run.results.get("best_epoch")) for run in runs),
                curve,
                str(len(runs)),
                wall,
            ]
            lines.append("| " + " | ".join(map(str, values)) + " |")
    return [*lines, ""]


def write_markdown(path, root, rows, columns, cells, descriptors, failures, sources, plots, details=False) -> None:
    lines = [f"# Results: {root}", "", PROTOCOL, ""]
    note = limits_note([run for cell in cells.values() for run in cell.runs])
    if note:
        lines += [note, ""]
    if any(cell.reference for cell in cells.values()):
        lines += ["`ref`: the published number for this task, backbone, method, split and metric; Δ = ours − ref.", ""]
    header = ["task", "split", "metric", *descriptors, *(f"{m} / {b}" for m, b in columns)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [v if v is not None else "" for v in row]
        values[1] = split_label(values[1], [run for c in columns if (row, c) in cells for run in cells[(row, c)].runs])
        lines.append("| " + " | ".join([*values, *(cell_text(cells.get((row, c))) for c in columns)]) + " |")
    if details:
        lines += ["", *details_lines(rows, columns, cells, descriptors)]
    used = sorted({cell.reference["source"] for cell in cells.values() if cell.reference})
    if used:
        lines += ["", "## Reference sources", ""] + [f"- `{name}`: {sources[name]}" for name in used]
    if plots:
        names = [Path(plot["file"]).name for plot in plots]
        lines += ["", "## Plots", ""] + [f"- [{n}]({n}): {p['title']}" for n, p in zip(names, plots, strict=True)]
    lines += ["", f"## Failures ({len(failures)})", ""]
    for failure in failures:
        where = failure["dir"].relative_to(root) if failure["dir"].is_relative_to(root) else failure["dir"]
        lines.append(f"- `{where}` ({failure['overrides'] or 'no overrides'}): {failure['reason']}")
    lines += [] if failures else ["none"]
    write_text(path, "\n".join(lines) + "\n")


def write_csv(path, rows, columns, cells, descriptors) -> None:
    with csv_file(path) as writer:
        parts = ("mean", "std", "n", "reference", "delta")
        writer.writerow(["task", "split", "metric", *descriptors, *(f"{m}/{b} {p}" for m, b in columns for p in parts)])
        for row in rows:
            values = [v if v is not None else "" for v in row]
            for column in columns:
                cell = cells.get((row, column))
                if cell is None:
                    values += [""] * len(parts)
                    continue
                reference = cell.reference["value"] if cell.reference else ""
                values += [round(cell.mean, 4), _round(cell.std), len(cell.scores), reference, _round(cell.delta)]
            writer.writerow(values)


@contextlib.contextmanager
def csv_file(path: Path):
    """A csv writer whose rows land in `path` (through ptv2.io) when the block ends."""
    buffer = io.StringIO(newline="")
    yield csv.writer(buffer)
    write_text(path, buffer.getvalue())


def _round(value: float):
    return "" if math.isnan(value) else round(value, 4)


def write_runs_csv(path, runs: list[Run], descriptors: list[str], root: Path) -> None:
    with csv_file(path) as writer:
        writer.writerow(["dir", "task", "split", "metric", "method", "backbone", *descriptors, "seed", "score",
                         "best_epoch", "trainable_percent", "wall_time_seconds"])  # fmt: skip
        for run in sorted(runs, key=lambda r: str(r.path)):
            r = run.results
            writer.writerow([run.path.relative_to(root) if run.path.is_relative_to(root) else run.path,
                             run.task, run.split, run.metric, run.method, run.backbone,
                             *(run.config.get(k, "") for k in descriptors), run.seed, round(run.score, 4),
                             r.get("best_epoch"), r.get("trainable_percent"), r.get("wall_time_seconds")])  # fmt: skip


# ---------------------------------------------------------------------------------------------- W&B


def log_to_wandb(out: Path, root: Path, project: str, plots: list[dict]) -> None:
    """The table as a W&B Table (in the run and as an artifact with the CSV/Markdown files) and the plots."""
    import wandb

    from ptv2.runs.tracking import _has_api_key

    mode = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
    with (out / "table.csv").open() as handle:
        header, *data = list(csv.reader(handle))
    run = wandb.init(project=project, job_type="table", name=f"table-{root.name}", dir=str(out), mode=mode)
    table = wandb.Table(columns=header, data=data)
    images = {f"plots/{p['kind']}": wandb.Image(p["file"]) for p in plots}
    run.log({"results": table, **images})
    artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"table-{root.name}"), type="results-table")
    artifact.add(table, "results")
    for name in ("table.md", "table.csv", "runs.csv"):
        artifact.add_file(str(out / name))
    run.log_artifact(artifact)
    run.finish()


# ---------------------------------------------------------------------------------------------- command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ptv2 table", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="folder searched recursively for results.json (a sweep, outputs/)")
    parser.add_argument("--out", type=Path, help="where table.md, table.csv, runs.csv and plots go (default: DIR)")
    parser.add_argument("--reference", type=Path, default=REFERENCES, help="reference numbers (YAML, with sources)")
    parser.add_argument("--no-reference", action="store_true", help="no reference column")
    parser.add_argument(
        "--plot",
        default="auto",
        help=f"auto ({', '.join(AUTO_PLOTS)}: all that apply), none, or a comma list of {', '.join(PLOTS)}",
    )
    parser.add_argument(
        "--details", action="store_true", help="also a section per cell: lr, epochs, trainable %%, dev curve, wall"
    )
    parser.add_argument("--wandb", action="store_true", help="also log table and plots to W&B")
    parser.add_argument("--project", default="ptv2", help="W&B project for --wandb")
    # `logger=...` out of habit from `ptv2 train`: the table's own switch is --wandb.
    habits = {"logger=none": [], "logger=wandb": ["--wandb"]}
    argv = [flag for arg in argv for flag in habits.get(arg, [arg])]
    # `dir=DIR` / `out=DIR` in the key=value style of the other commands mean the folder and --out.
    argv = [
        *(arg[len("dir=") :] for arg in argv if arg.startswith("dir=")),
        *(flag for arg in argv for flag in (["--out", arg[len("out=") :]] if arg.startswith("out=") else [arg])
          if not flag.startswith("dir=")),
    ]  # fmt: skip
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-") and not Path(arg).exists()]
    if overrides:
        parser.error(f"{overrides[0]} is a run setting; ptv2 table takes a folder and flags (--out, --plot, --wandb)")
    args = parser.parse_args(argv)
    unknown = [kind for kind in args.plot.split(",") if kind not in PLOTS] if args.plot not in ("auto", "none") else []
    if unknown:
        parser.error(f"--plot {unknown[0]} is not a plot; choose auto, none or from {', '.join(PLOTS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"ptv2: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    root = args.dir
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    runs, failures = collect(root)
    if not runs and not failures:
        raise UserError(f"no results.json under {root}")
    references, sources = load_references(None if args.no_reference else args.reference)
    out = args.out or root
    rows, columns, cells, descriptors = build_table(runs, references)
    try:
        output_folder(out, "--out ")
        plots = make_plots(rows, columns, cells, descriptors, out, args.plot)
        write_markdown(
            out / "table.md", root, rows, columns, cells, descriptors, failures, sources, plots, args.details
        )
        write_csv(out / "table.csv", rows, columns, cells, descriptors)
        write_runs_csv(out / "runs.csv", runs, descriptors, root)
    except OSError as error:  # a read-only or full folder: one line, no traceback
        where = error.filename or out
        raise UserError(
            f"cannot write the table into {out} ({where}: {error.strerror or error}); pass --out DIR with a "
            "writable folder"
        ) from None
    if args.wandb:
        log_to_wandb(out, root, args.project, plots)
    print(f"ptv2 table: {len(runs)} run(s), {len(rows)} row(s), {len(failures)} failure(s) -> {out / 'table.md'}")
    if limits_note(runs):
        print("  note: the runs used different trainer.limit_train / limit_eval (table.md lists them)")
    for plot in plots:
        print(f"  plot: {plot['file']}")
    return 0
