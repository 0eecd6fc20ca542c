"""`ptv2 table --details` and `--plot curves`: how each cell's runs were trained and went (what the fidelity report
script used to compute), checked against the runs' own results.json."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import SMOKE, ptv2

from ptv2.commands import table


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("details") / "sweep"
    args = [*SMOKE, "logger=none", "trainer.epochs=2", "trainer.max_steps=null", "trainer.limit_train=8"]
    ptv2("train", "-m", *args, "trainer.seed=1,2", "prompt.length=2,4", f"hydra.sweep.dir={folder}")
    return folder


def test_details_give_each_cells_settings_dev_curve_and_wall_time(sweep, tmp_path):
    out = tmp_path / "table"
    assert table.main([str(sweep), "--details", "--plot", "curves,length", "--out", str(out), "--no-reference"]) == 0
    text = (out / "table.md").read_text()
    rows = [line for line in text.split("## Settings and training")[1].splitlines() if line.startswith("| rte")]
    assert len(rows) == 2  # prompt.length 2 and 4, each over seeds 1 and 2
    runs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/results.json"))]
    assert len(runs) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        length = cells[2]
        members = [
            r
            for r, path in zip(runs, sorted(sweep.glob("*/config.yaml")), strict=True)
            if f"length: {length}\n" in path.read_text()
        ]
        assert len(members) == 2 and cells[-2] == "2"
        curve = [statistics.fmean(100 * r["history"][e]["dev/accuracy"] for r in members) for e in range(2)]
        assert cells[-3] == " / ".join(f"{v:.1f}" for v in curve)
        assert cells[-4] == ", ".join(str(r["best_epoch"]) for r in members)
        assert cells[3] == length and cells[5] == "2"  # P, epochs
    assert (out / "plot_learning_curves.png").is_file() and (out / "plot_prompt_length.png").is_file()


def test_an_unknown_plot_is_refused_in_one_line(sweep, capsys):
    with pytest.raises(SystemExit) as exit:
        table.main([str(sweep), "--plot", "curvez"])
    assert exit.value.code == 2 and "--plot curvez is not a plot" in capsys.readouterr().err


def test_a_key_describes_only_the_runs_whose_cell_varies_in_it(tmp_path):
    """LoRA at ranks 8 and 32 beside ptv2 (which carries the schema's rank 8 but never reads it): two LoRA rows with
    their rank, one ptv2 row with none."""

    def run(method, rank, seed, score):
        config = {"prompt.method": method, "prompt.r": str(rank), "trainer.seed": str(seed)}
        return table.Run(tmp_path, "conll03", "minilm", method, "test", "f1", score, seed, config)

    runs = [run("lora", 8, 1, 80.0), run("lora", 32, 1, 81.0), run("ptv2", 8, 1, 75.0), run("ptv2", 8, 2, 76.0)]
    built = table.build_table(runs, [])
    assert built.descriptors == ["prompt.r"]
    cells = {method: built.cells[built.cells["method"] == method] for method in ("lora", "ptv2")}
    assert cells["ptv2"][built.rows].values.tolist() == [["conll03", "test", "f1", ""]]  # one row, no rank shown
    assert [run.score for run in cells["ptv2"]["runs"].iloc[0]] == [75.0, 76.0]
    assert cells["lora"]["prompt.r"].tolist() == ["8", "32"]  # a row per rank, in natural order
