"""Fidelity study report: the method table (dev and test f1, mean ± std over seeds), learning curves and the
prompt-length curve, from the run folders of `make reproduce-table TABLE=fidelity` (and TABLE=fidelity-length).

    python scripts/fidelity_report.py --methods outputs/tables/fidelity/<time> \
        --length outputs/tables/fidelity-length/<time> --out docs/results/fidelity
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

METHOD_ORDER = ["finetune", "ptv2", "prompt_tuning", "linear_probe"]


def runs(root: Path) -> list[dict]:
    """Every finished job under a sweep folder: its results and resolved config."""
    found = []
    for results_path in sorted(root.glob("**/results.json")):
        config = yaml.safe_load(results_path.with_name("config.yaml").read_text())
        found.append({"dir": results_path.parent, "results": json.loads(results_path.read_text()), "config": config})
    return found


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def describe(config: dict) -> dict:
    prompt, trainer = config["prompt"], config["trainer"]
    return {
        "method": prompt["method"],
        "lr": config["optimizer"]["lr"],
        "P": prompt["length"] if prompt["method"] in ("ptv2", "prompt_tuning") else "",
        "epochs": trainer["epochs"],
    }


def method_table(all_runs: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for run in all_runs:
        key = tuple(describe(run["config"]).items())
        groups[key].append(run)
    rows = sorted(groups.items(), key=lambda kv: METHOD_ORDER.index(dict(kv[0])["method"]))
    lines = [
        "| method | lr | P | epochs | trainable % | dev f1 (best epoch) | test f1 (at best dev epoch) | best epochs "
        "| n | wall per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, members in rows:
        info = dict(key)
        dev = [100 * r["results"]["best_value"] for r in members]
        test = [100 * r["results"]["test_at_best"]["f1"] for r in members]
        epochs = ", ".join(str(r["results"]["best_epoch"]) for r in members)
        wall = statistics.fmean(r["results"]["wall_time_seconds"] for r in members) / 60
        share = members[0]["results"]["trainable_percent"]
        lines.append(
            f"| {info['method']} | {info['lr']:g} | {info['P']} | {info['epochs']} | {share:.3f} | {mean_std(dev)} "
            f"| {mean_std(test)} | {epochs} | {len(members)} | {wall:.0f} min |"
        )
    return lines


def save_plot(figure, axis, labels: tuple[str, str, str], path: Path) -> None:
    """Label (x, y, title), grid, legend and write the figure."""
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(labels[2])
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def learning_curves(all_runs: list[dict], path: Path) -> None:
    curves = defaultdict(list)
    for run in all_runs:
        curves[run["config"]["prompt"]["method"]].append([100 * h["dev/f1"] for h in run["results"]["history"]])
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for method in [m for m in METHOD_ORDER if m in curves]:
        width = min(len(c) for c in curves[method])
        means = [statistics.fmean(c[i] for c in curves[method]) for i in range(width)]
        axis.plot(range(1, width + 1), means, marker="o", label=f"{method} (n={len(curves[method])})")
    save_plot(figure, axis, ("epoch", "dev f1 (mean over seeds)", "CoNLL03, MiniLM-L6: dev f1 per epoch"), path)


def length_curve(length_runs: list[dict], path: Path) -> list[str]:
    points = sorted(
        (r["config"]["prompt"]["length"], 100 * r["results"]["best_value"], 100 * r["results"]["test_at_best"]["f1"])
        for r in length_runs
    )
    figure, axis = plt.subplots(figsize=(6.5, 4))
    axis.plot([p for p, _, _ in points], [d for _, d, _ in points], marker="o", label="dev f1 (best epoch)")
    axis.plot([p for p, _, _ in points], [t for _, _, t in points], marker="s", label="test f1 (at best dev epoch)")
    axis.set_xscale("log", base=2)
    save_plot(
        figure, axis, ("prompt length P (per layer)", "f1", "CoNLL03, MiniLM-L6, P-Tuning v2: prompt length"), path
    )
    lines = ["| P | dev f1 (best epoch) | test f1 (at best dev epoch) |", "|---|---|---|"]
    return lines + [f"| {p} | {d:.1f} | {t:.1f} |" for p, d, t in points]


def runs_by_name(root: Path, title: str) -> list[str]:
    """One line per run folder under root (lr search, deviation runs): its settings and dev f1 per epoch."""
    lines = [f"## {title}", "", "| run | task | method | head | lr | P | shift | grouped batches | train examples "]
    lines[-1] += "| dev metric per epoch | best |"
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in sorted(runs(root), key=lambda r: (r["config"]["prompt"]["method"], r["config"]["optimizer"]["lr"])):
        config, results = run["config"], run["results"]
        metric = results["select_metric"]
        curve = " / ".join(f"{100 * h[f'dev/{metric}']:.1f}" for h in results["history"])
        prompt, task = config["prompt"], config["task"]
        lines.append(
            f"| {run['dir'].name} | {task['name']} ({metric}) | {prompt['method']} | {task['head']} "
            f"| {config['optimizer']['lr']:g} | {describe(config)['P']} "
            f"| {prompt['shift_positions']} | {config['trainer']['group_by_length']} "
            f"| {results['train_examples'][config['task']['name']]} | {curve} | {100 * results['best_value']:.1f} |"
        )
    return [*lines, ""]


def hardware() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return (
        f"{model}, {torch.get_num_threads()} torch threads available, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=Path, required=True, help="sweep folder of TABLE=fidelity")
    parser.add_argument("--length", type=Path, nargs="*", default=[], help="run folders of the prompt-length curve")
    parser.add_argument("--search", type=Path, help="folder of the learning-rate search runs")
    parser.add_argument("--deviations", type=Path, nargs="*", default=[], help="folders of one-setting-at-a-time runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    method_runs = runs(args.methods)
    lines = ["## Methods", "", *method_table(method_runs), ""]
    learning_curves(method_runs, args.out / "learning_curves.png")
    lines += ["![learning curves](learning_curves.png)", ""]
    if args.length:
        length_runs = [run for folder in args.length for run in runs(folder)]
        lines += ["## Prompt length (P-Tuning v2, seed 1)", "", *length_curve(length_runs, args.out / "length.png")]
        lines += ["", "![prompt length](length.png)", ""]
    if args.search:
        lines += runs_by_name(args.search, "Learning-rate search")
    for folder in args.deviations:
        lines += runs_by_name(folder, f"Official settings vs ptv2 defaults, one at a time ({folder.name})")
    lines += [f"Hardware: {hardware()}."]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
