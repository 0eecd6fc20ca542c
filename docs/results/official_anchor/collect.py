"""The official-anchor figures from the run folders (standard library only).

    python docs/results/official_anchor/collect.py RUNS_ROOT

RUNS_ROOT holds ptv2_official/seed<N>/ (ptv2 run folders: history.json, results.json when finished) and
official/seed<N>/ (the official run.py output_dir: trainer_state.json), and optionally <arm>_seed<N>.start/.end
(epoch seconds written around each run) and official_seed<N>.log (its stdout, read while trainer_state.json\nis not written yet). Prints one markdown row per run: dev F1 per epoch, the best dev epoch
(1-based), the test F1 at that epoch, and the wall time. A run that has not finished shows the epochs it has.
"""

import ast
import json
import sys
from pathlib import Path


def ptv2_run(folder: Path):
    history = json.loads((folder / "history.json").read_text()) if (folder / "history.json").exists() else []
    dev = [row["dev/f1"] for row in history]
    results = folder / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        return dev, data["best_epoch"], data["test_at_best"]["f1"], True
    return dev, None, None, False


def official_log(folder: Path) -> list[dict]:
    """The trainer's log rows: trainer_state.json once the run has ended, else its printed dicts in the run's log."""
    state = folder / "trainer_state.json"
    if state.exists():
        return json.loads(state.read_text())["log_history"]
    log = folder.parent.parent / f"official_{folder.name}.log"
    rows = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("{'eval_loss'"):
            rows.append(ast.literal_eval(line))
        elif line.startswith("OrderedDict("):
            rows.append(dict(ast.literal_eval(line.removeprefix("OrderedDict(").removesuffix(")"))))
    return rows


def official_run(folder: Path):
    log = official_log(folder)
    dev = [row["eval_f1"] for row in log if "eval_f1" in row]
    bests = [row for row in log if "best_test_f1" in row]
    finished = any("train_runtime" in row for row in log)
    if not bests:
        return dev, None, None, finished
    # best_epoch is 0-based in the official trainer (trainer_base.py); the test set is scored whenever dev F1 is
    # strictly above the best so far, so the last row's best_test_f1 is the test F1 at the best dev epoch.
    return dev, bests[-1]["best_epoch"] + 1, bests[-1]["best_test_f1"], finished


def wall(root: Path, name: str):
    start, end = root / f"{name}.start", root / f"{name}.end"
    if start.exists() and end.exists():
        return f"{(int(end.read_text()) - int(start.read_text())) / 60:.0f} min"
    return "–"


def main(root: Path) -> None:
    print("| arm | seed | dev F1 per epoch | best dev epoch | dev F1 there | test F1 at best dev epoch | finished | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, read in (("ptv2_official", ptv2_run), ("official", official_run)):
        for folder in sorted((root / arm).glob("seed*")):
            seed = folder.name.removeprefix("seed")
            dev, best, test, finished = read(folder)
            curve = " / ".join(f"{100 * f:.1f}" for f in dev) or "–"
            best_dev = f"{100 * dev[best - 1]:.1f}" if best else "–"
            test_text = f"{100 * test:.1f}" if test is not None else "–"
            done = "yes" if finished else f"no ({len(dev)} epochs)"
            print(f"| {arm} | {seed} | {curve} | {best or '–'} | {best_dev} | {test_text} | {done} | "
                  f"{wall(root, f'{arm}_seed{seed}')} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
