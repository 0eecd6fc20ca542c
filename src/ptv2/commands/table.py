"""`ptv2 table DIR`: collect the results.json of runs and sweeps under DIR into a results table and plots.

One piece: collecting, the table, its details, the plots and the W&B upload all read the same cells (runs
grouped by task, split, metric, method, backbone and the keys that vary), built once in `build_table` with pandas:
a frame of runs (one row per run, its flattened config keys as columns), grouped into cells (mean, sample std, n),
pivoted into the table's layout and written as Markdown and CSV.

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
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from ptv2.commands.plots import AUTO_PLOTS, PLOTS, dev_per_epoch, make_plots, natural, split_text
from ptv2.commands.table_runs import Run, collect
from ptv2.config import ALIAS, COMMAND, FREE, REPLICATE, has_role, keys_with
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


# ---------------------------------------------------------------------------------------------- the table

CELL = ["task", "split", "metric", "method", "backbone"]  # what a cell's runs share besides their varying keys
ROW, COLUMN = CELL[:3], CELL[3:]
# The frame's own columns, beside the config keys (a config key of the same name is left out).
RUN_COLUMNS = ["path", *CELL, "seed", "score", "dev", "best_epoch", "trainable_percent", "wall_time_seconds"]
RUN_COLUMNS += ["curve", "run"]
FIRST_KEYS = ["prompt.length", "prompt.layers", "prompt.projection", "optimizer.lr"]  # row keys shown first


def dev_score(run: Run) -> float:
    """The run's dev score at its best epoch, in percent (NaN when results.json lacks it)."""
    try:
        return in_percent(run.results["best_value"], run.config.get("task.type"))
    except (KeyError, TypeError, ValueError):
        return math.nan


def run_record(run: Run) -> dict:
    """A run as a row: its cell, score, seed and bookkeeping, the run itself (for the plots and details), and its
    flattened config keys (those of IGNORED left out: they never make two runs different configs)."""
    return {
        "path": run.path,
        **{key: getattr(run, key) for key in (*CELL, "seed", "score")},
        "dev": dev_score(run),
        **{key: run.results.get(key) for key in ("best_epoch", "trainable_percent", "wall_time_seconds")},
        "curve": dev_per_epoch(run),
        "run": run,
        **{key: value for key, value in run.config.items() if not has_role(key, IGNORED) and key not in RUN_COLUMNS},
    }


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run, the flattened config keys as columns. Values stay as the files give them (object columns:
    a seed column with a missing value keeps its integers), the scores are floats."""
    frame = pd.DataFrame(map(run_record, runs), columns=None if runs else RUN_COLUMNS, dtype=object)
    return frame.astype({"score": float, "dev": float})


def mean_curve(curves: pd.Series) -> list[tuple[float, float]] | None:
    """The dev curve of a cell: (mean, sample std) over its runs at every epoch they all reached; None when a run
    has no curve."""
    if not all(isinstance(curve, list) and curve for curve in curves):
        return None
    per_epoch = pd.concat([pd.Series(curve) for curve in curves], axis=1).dropna()
    return list(zip(per_epoch.mean(axis=1), per_epoch.std(axis=1), strict=True))


def mean_of_numbers(values: pd.Series) -> float:
    """The mean, NaN unless every value is a number."""
    return pd.to_numeric(values, errors="coerce").mean(skipna=False)


def natural_order(column: pd.Series) -> pd.Series:
    """A column as ranks in natural order (numbers by value: 'bottom:6' before 'bottom:12'; an empty key last)."""
    ranks = sorted(column.unique(), key=lambda value: natural(value or None))
    return column.map({value: rank for rank, value in enumerate(ranks)})


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


@dataclass
class Table:
    runs: pd.DataFrame  # runs_frame
    cells: pd.DataFrame  # one row per cell, in table order: its keys, mean, std, n, runs, reference, delta, ...
    descriptors: list[str]  # the config keys that tell a cell's rows apart

    @property
    def rows(self) -> list[str]:
        return [*ROW, *self.descriptors]


def build_table(runs: list[Run], references: list[dict]) -> Table:
    """The runs grouped into cells: rows are task, split, metric and the config keys that vary among the runs of
    one cell (task, split, metric, method, backbone); columns are method x backbone.

    A descriptor describes a run only where it varies among the runs of that run's cell: beside LoRA at two ranks,
    ptv2's row shows no rank (its config holds the schema's default, which it never reads)."""
    frame = runs_frame(runs)
    keys = [key for key in frame.columns if key not in RUN_COLUMNS]
    varies = frame.groupby(CELL)[keys].transform("nunique", dropna=False) > 1 if keys else frame[[]]
    found = set(varies.columns[varies.any()])
    descriptors = [key for key in FIRST_KEYS if key in found] + sorted(found - set(FIRST_KEYS))
    shown = [frame[key].where(varies[key], "").fillna("") for key in descriptors]
    cells = (
        frame.groupby([*(frame[key] for key in ROW), *shown, *(frame[key] for key in COLUMN)], sort=False)
        .agg(
            mean=("score", "mean"),
            std=("score", "std"),
            n=("score", "size"),
            runs=("run", list),
            dev_mean=("dev", "mean"),
            dev_std=("dev", "std"),
            best_epochs=("best_epoch", list),
            curve=("curve", mean_curve),
            wall=("wall_time_seconds", mean_of_numbers),
        )
        .reset_index()
    )
    published = pd.DataFrame(references, columns=[*CELL, "value", "source"], dtype=object)
    published = published.drop_duplicates(CELL).rename(columns={"value": "reference"}).astype({"reference": float})
    cells = cells.merge(published, on=CELL, how="left")  # the first reference of a cell, as listed
    cells["delta"] = cells["mean"] - cells["reference"]
    order = [*ROW, *descriptors, *COLUMN]
    return Table(frame, cells.sort_values(order, key=natural_order, ignore_index=True), descriptors)


def layout(cells: pd.DataFrame, rows: list[str], values) -> pd.DataFrame:
    """The cells' `values` laid out as the table: one row per task, split, metric and descriptors (the cells' order),
    one column per method x backbone (sorted) [x value]."""
    if cells.empty:
        return pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=rows))
    wide = cells.pivot(index=rows, columns=COLUMN, values=values).sort_index(axis=1)
    return wide.reindex(pd.MultiIndex.from_frame(cells[rows].drop_duplicates()))


def spread(mean: float, std: float, n: int) -> str:
    """`mean ± sample std` of n values, one decimal (the mean alone for one value)."""
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def mean_std(values) -> str:
    """`mean ± sample std` of a list of numbers ('' for none)."""
    values = pd.Series(values, dtype=float)
    return spread(values.mean(), values.std(), len(values)) if len(values) else ""


def cell_text(cell: dict) -> str:
    text = spread(cell["mean"], cell["std"], cell["n"]) + (f" (n={cell['n']})" if cell["n"] > 1 else "")
    if not math.isnan(cell["reference"]):
        text += f" · ref {cell['reference']:.1f} (Δ {cell['delta']:+.1f})"
    return text


def split_label(split: str, runs=()) -> str:
    """The split column says how the score was selected: a dev score is the best dev epoch's own score
    (dev-selected, optimistic, as the official SuperGLUE numbers are); a test score is taken at that epoch. With
    the runs, a dev split cut by trainer.limit_eval says so (`dev, first 128 of 277`)."""
    shown = split_text(split, runs) if runs else split
    return f"{shown} (at best dev epoch)" if split.startswith("test") else f"{shown} (dev-selected: best epoch)"


def markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)  # values as written: 1e-2 stays


def results_table(table: Table) -> pd.DataFrame:
    """table.md's table: each cell's text (mean ± std (n) · ref (Δ)); the split says how it was selected."""
    cells = table.cells.assign(text=[cell_text(cell) for cell in table.cells.to_dict("records")])
    wide = layout(cells, table.rows, "text").fillna("")
    wide.columns = [f"{method} / {backbone}" for method, backbone in wide.columns]
    runs = cells.explode("runs").groupby(table.rows, sort=False)["runs"].agg(list)  # each row's runs
    wide = wide.reset_index()
    wide["split"] = [split_label(split, members) for split, members in zip(wide["split"], runs, strict=True)]
    return wide


def details_table(table: Table) -> pd.DataFrame:
    """`--details`: one row per cell with how its runs were trained and how they went: learning rate, epochs,
    trainable share, the dev score of the best epoch, the reported score, the best epochs, the mean dev curve and
    the wall time per run. Settings are the cell's first run's."""
    cells = table.cells
    first = [runs[0] for runs in cells["runs"]]
    share = [run.results.get("trainable_percent") for run in first]
    length = [run.config.get("prompt.length") for run in first]  # P: none for a method without a prompt
    return pd.DataFrame(
        {
            "task": cells["task"],
            "method / backbone": cells["method"] + " / " + cells["backbone"],
            **{key: cells[key] for key in table.descriptors},
            "P": ["" if value in (None, "0") else value for value in length],
            "lr": [run.config.get("optimizer.lr", "") for run in first],
            "epochs": [run.config.get("trainer.epochs", "") for run in first],
            "trainable %": [f"{s:.3f}" if isinstance(s, (int, float)) else "" for s in share],
            "dev (best epoch)": [spread(*v) for v in zip(cells["dev_mean"], cells["dev_std"], cells["n"], strict=True)],
            "score": [
                f"{split_label(cell['split'], cell['runs'])}: {spread(cell['mean'], cell['std'], cell['n'])}"
                for cell in cells.to_dict("records")
            ],
            "best epochs": [", ".join(map(str, epochs)) for epochs in cells["best_epochs"]],
            "dev per epoch (mean)": [" / ".join(f"{m:.1f}" for m, _ in curve or ()) for curve in cells["curve"]],
            "n": cells["n"],
            "wall per run": ["" if math.isnan(wall) else f"{wall / 60:.0f} min" for wall in cells["wall"]],
        }
    )


PARTS = ["mean", "std", "n", "reference", "delta"]


def csv_table(table: Table) -> pd.DataFrame:
    """table.csv: the table with one number per column (`method/backbone mean`, `std`, `n`, `reference`, `delta`)."""
    numbers = table.cells.round({"mean": 4, "std": 4, "delta": 4}).astype({"n": "Int64"})
    wide = layout(numbers, table.rows, PARTS)
    columns = sorted({(method, backbone) for _, method, backbone in wide.columns})
    wide = wide.reindex(columns=[(part, *column) for column in columns for part in PARTS])
    wide.columns = [f"{method}/{backbone} {part}" for part, method, backbone in wide.columns]
    return wide.reset_index()


def runs_table(table: Table, root: Path) -> pd.DataFrame:
    """runs.csv: one row per run, by folder."""
    frame = table.runs.sort_values("path", key=lambda paths: paths.map(str))
    return frame.assign(
        dir=[path.relative_to(root) if path.is_relative_to(root) else path for path in frame["path"]],
        score=frame["score"].round(4),
        **{key: frame[key].fillna("") for key in table.descriptors},
    )[["dir", *CELL, *table.descriptors, "seed", "score", "best_epoch", "trainable_percent", "wall_time_seconds"]]


LIMIT_KEYS = ["trainer.limit_train", "trainer.limit_eval"]


def limits_note(frame: pd.DataFrame) -> str | None:
    """A warning when the runs were trained or evaluated on different numbers of examples (trainer.limit_*): their
    scores sit side by side in the table but are not measured alike."""
    limits = frame.reindex(columns=LIMIT_KEYS).replace({"None": None, "": None}).fillna("all")
    counts = limits.value_counts()
    if len(counts) < 2:
        return None
    shown = "; ".join(
        f"{', '.join(f'{k}={v}' for k, v in zip(LIMIT_KEYS, values, strict=True))} ({count} run(s))"
        for values, count in sorted(counts.items(), key=lambda item: natural(str(item[0])))
    )
    return f"**Note: these runs used different data limits, so their scores are not on the same examples**: {shown}."


def write_markdown(path, root, table: Table, failures, sources, plots, details=False) -> None:
    lines = [f"# Results: {root}", "", PROTOCOL, ""]
    note = limits_note(table.runs)
    if note:
        lines += [note, ""]
    used = sorted(table.cells["source"].dropna().unique())
    if used:
        lines += ["`ref`: the published number for this task, backbone, method, split and metric; Δ = ours − ref.", ""]
    lines.append(markdown(results_table(table)))
    if details:
        lines += ["", "## Settings and training", "", markdown(details_table(table)), ""]
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


# ---------------------------------------------------------------------------------------------- W&B


def log_to_wandb(out: Path, root: Path, project: str, plots: list[dict]) -> None:
    """The table as a W&B Table (in the run and as an artifact with the CSV/Markdown files) and the plots."""
    import wandb

    from ptv2.runs.tracking import _has_api_key

    mode = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
    run = wandb.init(project=project, job_type="table", name=f"table-{root.name}", dir=str(out), mode=mode)
    table = wandb.Table(dataframe=pd.read_csv(out / "table.csv", dtype=str, keep_default_na=False))
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
    table = build_table(runs, references)
    try:
        output_folder(out, "--out ")
        plots = make_plots(table.cells, table.descriptors, out, args.plot)
        write_markdown(out / "table.md", root, table, failures, sources, plots, args.details)
        write_text(out / "table.csv", csv_table(table).to_csv(index=False, lineterminator="\r\n"))  # as csv writes
        write_text(out / "runs.csv", runs_table(table, root).to_csv(index=False, lineterminator="\r\n"))
    except OSError as error:  # a read-only or full folder: one line, no traceback
        where = error.filename or out
        raise UserError(
            f"cannot write the table into {out} ({where}: {error.strerror or error}); pass --out DIR with a "
            "writable folder"
        ) from None
    if args.wandb:
        log_to_wandb(out, root, args.project, plots)
    rows = len(table.cells[table.rows].drop_duplicates())
    print(f"ptv2 table: {len(runs)} run(s), {rows} row(s), {len(failures)} failure(s) -> {out / 'table.md'}")
    if limits_note(table.runs):
        print("  note: the runs used different trainer.limit_train / limit_eval (table.md lists them)")
    for plot in plots:
        print(f"  plot: {plot['file']}")
    return 0
