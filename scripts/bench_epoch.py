"""One training epoch on real RTE: ptv2's defaults against an "official-style" pipeline, in the same run.

The official P-Tuning v2 scripts padded every example to max_seq_length (128), ran fp32 eager attention and did not
group batches by length. Both pipelines here train the same prompt method on the same backbone and data through
`ptv2 train`; the official style only adds

    trainer.pad_to_max_length=true trainer.group_by_length=false backbone.attention=eager trainer.precision=no

The figure is the training time of the epoch (results.json history[0].train_seconds: forward, backward and optimizer
steps over every batch; data preparation and evaluation excluded). With --repeats N the two pipelines alternate
(ABAB...) so a change of machine load hits both, and medians are reported.

    python scripts/bench_epoch.py                          # full RTE train split, MiniLM
    python scripts/bench_epoch.py --limit-train 640 --repeats 2
Skips (exit 0) when the RTE folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "superglue" / "RTE"
OFFICIAL_STYLE = [
    "trainer.pad_to_max_length=true",
    "trainer.group_by_length=false",
    "backbone.attention=eager",
    "trainer.precision=no",
]


def train_epoch(overrides: list[str], run_dir: Path, threads: int | None) -> dict:
    """One `ptv2 train` epoch; returns its results.json."""
    command = [sys.executable, "-m", "ptv2", "train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(command, check=True, env=env)
    return json.loads((run_dir / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the official RTE jsonl files")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--method", default="ptv2", help="prompt method (Hydra prompt= option)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training examples only")
    parser.add_argument("--repeats", type=int, default=1)
    # On an oversubscribed machine, multi-threaded ops stall on their slowest thread and every op costs about a
    # scheduler slice whatever its size, which hides the work saved; one thread per run measures the work.
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of both runs (OMP_NUM_THREADS)")
    parser.add_argument("--out", type=Path, default=None, help="where to write bench_epoch.json")
    args = parser.parse_args(argv)
    if not (args.data / "train.jsonl").is_file():
        print(f"bench_epoch: skipped, no RTE data in {args.data}")
        return 0

    common = [
        "task=rte",
        f"backbone={args.backbone}",
        f"prompt={args.method}",
        f"task.data_dir={args.data}",
        "trainer.epochs=1",
        "trainer.limit_eval=64",  # evaluation is not timed; keep it short
        "trainer.save_checkpoint=false",
        "trainer.progress=false",
        "logger=none",
    ]
    if args.limit_train:
        common.append(f"trainer.limit_train={args.limit_train}")
    pipelines = {"ptv2_defaults": common, "official_style": common + OFFICIAL_STYLE}
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for name, overrides in pipelines.items():
                results = train_epoch(overrides, Path(work) / f"{name}-{repeat}", args.threads)
                seconds[name].append(results["history"][0]["train_seconds"])
                print(f"{name} (repeat {repeat + 1}): {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report = {
        "backbone": args.backbone,
        "method": args.method,
        "train_examples": results["train_examples"],
        "official_style_overrides": OFFICIAL_STYLE,
        "threads": args.threads,
        "train_seconds": seconds,
        "median_train_seconds": medians,
        "speedup": medians["official_style"] / medians["ptv2_defaults"],
    }
    out = args.out or ROOT / "outputs" / "bench_epoch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(
        f"one RTE epoch ({args.backbone}, {args.method}): ptv2 defaults {medians['ptv2_defaults']:.1f} s, "
        f"official style {medians['official_style']:.1f} s: {report['speedup']:.2f}x faster ({out})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
