"""Report of the full-size fidelity study (scripts/gpu_evidence.sh, part "study"): every run's epochs read from its
history.json (written at every epoch end, so a run stopped at the deadline counts with the epochs it finished), its
test F1 from results.json where it finished.

    python scripts/gpu_study_report.py STUDY_DIR [STUDY_DIR ...] --out docs/results/fidelity/gpu
Each STUDY_DIR holds one sweep folder per method family (OUT/study of one call); a run folder is named by its
sweep and job number, its arm by its config; when a job ran in several calls, the later folder wins.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from ptv2.commands.table import mean_std  # noqa: E402


def save_plot(figure, axis, labels: tuple[str, str, str], path: Path) -> None:
    """Label (x, y, title), grid, legend and write the figure."""
    axis.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def read_job(folder: Path) -> dict:
    """A run's config, its per-epoch records and, if it finished, its results."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    results_path = folder / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    history = folder / "history.json"
    epochs = results["history"] if results else json.loads(history.read_text()) if history.exists() else []
    return {"config": config, "epochs": epochs, "results": results}


def arm_of(job: dict) -> str:
    """task/method[-P<length>] from the run's config: the seeds of one arm share it."""
    config = job["config"]
    method, length = config["prompt"]["method"], config["prompt"]["length"]
    return f"{config['task']['name']}/{method}" + (f"-P{length}" if length else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for call, root in enumerate(args.runs, 1):
        for config in sorted(root.glob("*/*/config.yaml")):
            job = read_job(config.parent)
            if job["epochs"]:
                jobs[f"{config.parent.parent.name}/{config.parent.name}"] = {**job, "call": call}

    with (args.out / "epochs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", "call", "epoch", "metric", "dev", "train_loss", "train_seconds"])
        for name, job in sorted(jobs.items()):
            metric = job["config"]["task"]["metric"]
            for e in job["epochs"]:
                writer.writerow(
                    [
                        name,
                        job["call"],
                        e["epoch"],
                        metric,
                        f"{100 * e[f'dev/{metric}']:.2f}",
                        f"{e['train_loss']:.4f}",
                        f"{e['train_seconds']:.1f}",
                    ]
                )

    arms = defaultdict(list)
    for job in jobs.values():
        arms[arm_of(job)].append(job)
    lines = [
        "| task | arm | lr | epochs done / planned | dev at the last common epoch | best dev so far "
        "| test f1 at best dev (finished runs) | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for arm, members in sorted(arms.items()):
        config = members[0]["config"]
        metric = config["task"]["metric"]
        done = min(len(m["epochs"]) for m in members)
        last = [100 * m["epochs"][done - 1][f"dev/{metric}"] for m in members]
        best = [100 * max(e[f"dev/{metric}"] for e in m["epochs"][:done]) for m in members]
        tests = [
            100 * m["results"]["test_at_best"]["f1"] for m in members if m["results"] and "test_at_best" in m["results"]
        ]
        task, label = arm.split("/")
        lines.append(
            f"| {task} ({metric}) | {label} | {config['optimizer']['lr']:g} | {done} / {config['trainer']['epochs']} "
            f"| {mean_std(last)} | {mean_std(best)} | {mean_std(tests) or '–'} | {len(members)} |"
        )
        if task == "conll03":
            curve = [statistics.fmean(100 * m["epochs"][i][f"dev/{metric}"] for m in members) for i in range(done)]
            axis.plot(range(1, done + 1), curve, marker="o", label=f"{label} (n={len(members)})")
    labels = ("epoch", "dev f1 (mean over seeds)", "CoNLL03 (full), MiniLM-L6, H200: dev f1 per epoch")
    save_plot(figure, axis, labels, args.out / "learning_curves.png")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
