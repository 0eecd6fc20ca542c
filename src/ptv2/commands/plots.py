"""The plots of `ptv2 table`: figures fit for a paper, drawn from the table's cells (commands/table.py: a frame
with one row per cell, its keys, mean, std, n, runs and mean dev curve).

Each plot is written as PNG (300 dpi) with a PDF and an SVG beside it. What keeps a figure honest:
- a line at the majority class's accuracy of the evaluated examples (results.json `evaluated`), so that scores at
  chance read as chance, and a y-axis of at least MIN_Y_SPAN points, so that noise does not fill the height;
- error bars only where a point averages several runs (n > 1);
- the method comparison as points on the same kind of axis, not bars from 0, which would flatten its gaps;
- titles that name the split and, when trainer.limit_eval cut it, how many of its examples were scored.
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from itertools import chain
from pathlib import Path

from ptv2.io import atomic_write
from ptv2.modeling.methods import parse_layers
from ptv2.runs.summary import in_percent

PLOTS = {
    "length": ("plot_prompt_length.png", "score vs prompt length", "prompt length (log scale)"),
    "depth": ("plot_prompt_depth.png", "score vs number of layers with prompts", "K layers with prompts"),
    "methods": ("plot_methods.png", "method comparison", "method"),
    "curves": ("plot_learning_curves.png", "dev score per epoch (mean over seeds)", "epoch"),
}
AUTO_PLOTS = ("length", "depth", "methods")  # --plot auto; curves on request (--plot curves or a list)
FORMATS = ("png", "pdf", "svg")  # the PNG for a page, the vector files for a paper
DPI = 300
# The y-axis spans at least this many percentage points: a few points of noise between configs (runs at chance on
# a small dev set) must not fill the whole height and read as a trend.
MIN_Y_SPAN = 10.0
MARKERS = "osD^v<>Pp*"  # one per line, so that lines on top of each other stay visible


def evaluated_of(run) -> dict | None:
    """The run's results.json `evaluated` entry for its task when it is well formed (results may come from
    elsewhere), else None."""
    entry = (run.results.get("evaluated") or {}).get(run.task) if isinstance(run.results, dict) else None
    if not isinstance(entry, dict):
        return None
    counts = (entry.get("examples"), entry.get("of"))
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts) or counts[0] > counts[1]:
        return None
    return entry


def split_text(split: str, runs) -> str:
    """`dev`, or `dev, first 128 of 277` when every run scored the first 128 of the split's 277 examples (`dev, a
    subset` when they differ). A test score is taken as the split stands."""
    entries = [evaluated_of(run) for run in runs]
    if split.startswith("test") or not entries or any(e is None or e.get("split") != split for e in entries):
        return split
    sizes = {(e["examples"], e["of"]) for e in entries}
    if len(sizes) > 1:
        return f"{split}, subsets of different sizes"
    used, total = sizes.pop()
    return split if used == total else f"{split}, first {used} of {total}"


def floors(cells) -> dict[str, float]:
    """Task -> the majority class's accuracy (percent) on the examples its runs scored, where all agree."""
    values = defaultdict(set)
    for run in chain.from_iterable(cells["runs"]):
        entry = evaluated_of(run)
        majority = entry.get("majority") if entry else None
        values[run.task].add(round(majority, 6) if isinstance(majority, (int, float)) and run.split == "dev" else None)
    return {task: found.pop() for task, found in sorted(values.items()) if len(found) == 1 and None not in found}


def dev_per_epoch(run) -> list[float] | None:
    """The run's dev selection metric at every epoch, in the table's unit; None for a multi-task run."""
    metric = run.results.get("select_metric")
    if not isinstance(metric, str):
        return None
    task_type = run.config.get("task.type")
    try:
        scores = [in_percent(record[f"dev/{metric}"], task_type) for record in run.results.get("history") or []]
    except (KeyError, TypeError, ValueError):
        return None
    return scores if all(math.isfinite(score) for score in scores) else None  # a NaN epoch: no curve to draw


def plot_series(cells, descriptors: list[str], kind: str) -> dict | None:
    """The points of one plot kind: {series label: [(x, mean, std), ...]}, or None when the runs lack that axis.

    length: x = prompt.length, one line per task x column (x other varying keys);
    depth: x = K of prompt.layers bottom:K (ascending) / top:K (descending), one line per task x column x order;
    methods: one point per method, grouped by task x backbone;
    curves: x = epoch, the dev score per epoch (mean over the cell's runs), one line per cell.
    """
    series = defaultdict(list)
    for cell in cells.to_dict("records"):
        column = f"{cell['method']}/{cell['backbone']}"
        point = (cell["mean"], cell["std"])
        others = {key: cell[key] for key in descriptors if cell[key]}  # the row's keys this cell shows
        if kind == "length" and "prompt.length" in descriptors:
            if not re.fullmatch(r"\d+", cell["prompt.length"]):
                continue  # per-layer lengths ([4, 8, 16]) have no place on one length axis: the table holds them
            label = [cell["task"], column, *(f"{k}={v}" for k, v in others.items() if k != "prompt.length")]
            series[" ".join(label)].append((float(cell["prompt.length"]), *point))
        elif kind == "depth" and "prompt.layers" in descriptors:
            try:
                side, count = parse_layers(cell["prompt.layers"])
            except ValueError:
                continue
            if side in ("top", "bottom"):
                order = "ascending (bottom:K)" if side == "bottom" else "descending (top:K)"
                series[f"{cell['task']} {column} {order}"].append((float(count), *point))
        elif kind == "curves" and cell["curve"] and len(cell["curve"]) >= 2:
            label = " ".join([cell["task"], column, *(f"{k}={v}" for k, v in others.items())]) + f" (n={cell['n']})"
            series[label] += [(epoch, mean, std) for epoch, (mean, std) in enumerate(cell["curve"], start=1)]
        elif kind == "methods" and cells["method"].nunique() > 1:
            label = " ".join([cell["task"], cell["backbone"], *others.values()])
            series[label].append((cell["method"], *point))
    if not series:
        return None
    return {label: sorted(points, key=lambda p: natural(str(p[0]))) for label, points in sorted(series.items())}


def natural(value) -> tuple:
    """Sort key: numbers by value ('bottom:6' before 'bottom:12'), None last."""
    if value is None:
        return ((2, ""),)
    number = r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)"
    return tuple((0, float(p)) if re.fullmatch(number, p) else (1, p) for p in re.split(number, value) if p)


def y_limits(series: dict, min_span: float = MIN_Y_SPAN, lines: tuple[float, ...] = ()) -> tuple[float, float]:
    """(bottom, top) of the y-axis: the points with their error bars, and the reference `lines`, with a margin,
    widened around their middle to at least `min_span`, kept inside 0..100 where the points allow."""
    lows = [mean - (0 if math.isnan(std) else std) for points in series.values() for _, mean, std in points]
    highs = [mean + (0 if math.isnan(std) else std) for points in series.values() for _, mean, std in points]
    low, high = min([*lows, *lines]), max([*highs, *lines])
    margin = 0.05 * (high - low)
    low, high = low - margin, high + margin
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    if low < 0 <= min(lows):
        low, high = 0.0, max(high - low, high)
    if high > 100 >= max(highs):
        low, high = min(low - (high - 100), low), 100.0
    return low, high


def plot_title(kind: str, cells) -> str:
    """The plot's title: what it shows, on which split(s) (and how much of a cut one), and how many runs each point
    averages (n)."""
    splits = sorted(cells["split"].unique())
    runs = {split: [r for r in chain.from_iterable(cells["runs"]) if r.split == split] for split in splits}
    where = "; ".join(split_text(split, runs[split]) if runs[split] else split for split in splits)
    counts = sorted(cells["n"].unique())
    n = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"
    return f"{PLOTS[kind][1]} ({where}; {n} run(s) per point)"


def dodge(index: int, count: int, kind: str) -> float:
    """A line's small sideways shift, so that lines with equal points do not hide each other: a factor on the log
    x-axis of the length plot, an offset on the integer K of the depth plot and the method positions."""
    if count <= 1:
        return 1.0 if kind == "length" else 0.0
    step = (index - (count - 1) / 2) / count
    return 2 ** (0.12 * step) if kind == "length" else (0.3 if kind == "methods" else 0.12) * step


def draw(kind: str, series: dict, out: Path, ylabel: str, title: str | None = None, floor: dict | None = None):
    """Draw one plot into out/<name>.png, .pdf and .svg; returns the paths, the PNG first. floor: task -> the
    majority class's score, drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    filename, _, xlabel = PLOTS[kind]
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    methods = sorted({p[0] for points in series.values() for p in points}) if kind == "methods" else []
    for i, (label, points) in enumerate(series.items()):
        xs, means, stds = zip(*points, strict=True)
        shift = dodge(i, len(series), kind)
        if kind == "methods":
            xs = [methods.index(x) + shift for x in xs]
        else:
            xs = [x * shift for x in xs] if kind == "length" else [x + shift for x in xs]
        style = {"linestyle": "none"} if kind == "methods" else {}
        (line,) = axes.plot(xs, means, marker=MARKERS[i % len(MARKERS)], label=label, alpha=0.85, markersize=6, **style)
        spread = [(x, m, s) for x, m, s in zip(xs, means, stds, strict=True) if not math.isnan(s)]
        if spread:  # n > 1: the sample std; a single run has no error bar
            bx, bm, bs = zip(*spread, strict=True)
            axes.errorbar(bx, bm, yerr=bs, fmt="none", capsize=3, color=line.get_color(), alpha=0.85)
    for task, value in (floor or {}).items():
        axes.axhline(value, linestyle="--", color="0.4", linewidth=1, label=f"{task}: majority class ({value:.1f})")
    if kind == "methods":
        axes.set_xticks(range(len(methods)), methods)
        axes.set_xlim(-0.5, len(methods) - 0.5)
    else:
        ticks = sorted({p[0] for points in series.values() for p in points})
        if kind == "length":  # lengths grow geometrically; label the lengths themselves
            axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, [f"{x:g}" for x in ticks])  # the values run, integers (no 1.2, 1.4 for K)
        axes.minorticks_off()
    axes.set_ylim(*y_limits(series, lines=tuple((floor or {}).values())))
    axes.set_title(title or PLOTS[kind][1], fontsize=9)
    axes.set(xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    paths = [out / Path(filename).with_suffix(f".{suffix}").name for suffix in FORMATS]
    for path in paths:  # through ptv2.io: atomic, never through a link planted at the name
        atomic_write(path, lambda temporary, path=path: figure.savefig(temporary, dpi=DPI, format=path.suffix[1:]))
    plt.close(figure)
    return paths


def make_plots(cells, descriptors: list[str], out: Path, choice: str) -> list[dict]:
    """The plots `choice` names (auto: all that apply) into `out`, and plots.json with their points."""
    from ptv2.io import write_json

    kinds = list(AUTO_PLOTS) if choice == "auto" else [] if choice == "none" else choice.split(",")
    wanted = {kind: plot_series(cells, descriptors, kind) for kind in kinds}
    wanted = {kind: series for kind, series in wanted.items() if series}
    if choice not in ("auto", "none") and not wanted:
        print(f"ptv2 table: no plot '{choice}': the runs do not vary along that axis", file=sys.stderr)
    if not wanted:
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("ptv2 table: plots skipped: matplotlib is missing (pip install 'ptv2[sweeps]')", file=sys.stderr)
        return []
    metrics = sorted(cells["metric"].unique())
    ylabel = f"{'/'.join(metrics)} (%)"
    floor = floors(cells) if metrics == ["accuracy"] else {}
    plots = []
    for kind, series in wanted.items():
        title = plot_title(kind, cells)
        paths = draw(kind, series, out, ylabel, title, floor)
        points = {
            label: [[x, mean, None if math.isnan(std) else std] for x, mean, std in p] for label, p in series.items()
        }
        plots.append(
            {"kind": kind, "file": str(paths[0]), "files": [str(p) for p in paths], "title": title,
             "majority": floor, "series": points}
        )  # fmt: skip
    write_json(out / "plots.json", plots)
    return plots
