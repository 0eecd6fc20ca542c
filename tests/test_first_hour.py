"""What a new user meets in the first hour: messages, where outputs go, summaries (issue 26)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from conftest import compose_config, markdown_rows


def test_wandb_config_holds_only_what_the_run_reads(tmp_path, monkeypatch):
    import wandb

    from ptv2.runs import tracking

    cfg = compose_config("backbone=tiny", "logger=wandb", "logger.mode=offline")
    seen = {}

    def fake_init(**options):
        seen.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", fake_init)
    tracking.Tracker(cfg, tmp_path)
    assert "trainer" in seen["config"] and not {"bench", "serve", "ckpt", "split"} & set(seen["config"])
    assert not {"r", "alpha", "target_modules", "encoder"} & set(seen["config"]["prompt"])  # no other method's keys


def test_wandb_server_probe_names_the_address(monkeypatch):
    from ptv2.runs import tracking

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert tracking.server_unreachable(timeout=1) == "127.0.0.1:9"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, ("huggingface.co", 443)), ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ("127.0.0.1", 9))],
)
def test_hub_endpoint_follows_hf_endpoint(monkeypatch, env, expected):
    from ptv2 import hub

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert hub.endpoint() == expected


def test_run_folder_checks_name_the_state_folder_resume_writes():
    from ptv2.runs import resume, rundir

    assert rundir.STATE_DIR == resume.STATE_DIR


@pytest.mark.parametrize(
    ("override", "expected"),
    [("trainer.epoch=1", "did you mean trainer.epochs?"), ("trainer.epochs=-1", "trainer.epochs=-1 is out of range")],
)
def test_a_config_mistake_is_reported_before_torch_is_imported(tmp_path, override, expected):
    """The error path of a bad key or value loads neither torch nor transformers (they cost seconds per start)."""
    import subprocess
    import sys

    code = (
        "import sys; from ptv2 import cli\n"
        "try:\n"
        f"    code = cli.main(['train', 'backbone=tiny', '{override}', 'hydra.run.dir={tmp_path / 'run'}'])\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "assert code == 2, code\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert expected in result.stderr


def test_epoch_line_prints_counts_as_integers():
    from ptv2.runs.summary import epoch_line

    record = {"epoch": 2, "step": 78.0, "train_loss": 0.69314, "dev/accuracy": 0.5}
    assert epoch_line(record) == "epoch 2: step=78, train_loss=0.6931, dev/accuracy=0.5000"


def test_run_line_names_split_unit_test_at_best_and_folder():
    from ptv2.runs.summary import run_line

    tagging = {"name": "conll03", "type": "tagging", "test_split": "test"}
    results = {"select_metric": "f1", "best_value": 0.9, "best_epoch": 3, "test_at_best": {"f1": 0.85}}
    assert run_line(tagging, results, "/runs/a") == (
        "conll03: best dev f1=0.9000 at epoch 3; test f1=0.8500 at that epoch (fraction); results in /runs/a"
    )
    squad = {"name": "squad", "type": "span"}
    results = {"select_metric": "f1", "best_value": 88.5, "best_epoch": 1}
    assert run_line(squad, results, "/runs/b") == "squad: best dev f1=88.5000 at epoch 1 (percent); results in /runs/b"


def test_sweep_line_names_the_table_command():
    from ptv2.runs.summary import sweep_line

    assert sweep_line("/s", 3, 1) == "ptv2: sweep: 2 of 3 job(s) finished, 1 failed; runs in /s; table: ptv2 table /s"


def test_a_bad_value_in_any_sweep_job_is_refused_before_the_first_starts(tmp_path):
    from conftest import RTE, ptv2

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "backbone=tiny", "trainer=smoke", "logger=none", f"task.data_dir={RTE}"]
    result = ptv2(*args, "prompt.length=1,0", f"hydra.sweep.dir={sweep}", check=False)
    assert result.returncode == 2
    assert "sweep job 1 (" in result.stderr and "prompt.length=0 is out of range" in result.stderr
    assert result.stderr.rstrip().endswith("no job was started") and not sweep.exists()


def test_a_finished_sweep_ends_with_one_line_and_the_table_command(tmp_path):
    from conftest import RTE, ptv2

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "backbone=tiny", "trainer=smoke", "logger=none", f"task.data_dir={RTE}"]
    result = ptv2(*args, "prompt.length=1,2", f"hydra.sweep.dir={sweep}")
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ptv2: sweep: 2 of 2 job(s) finished; runs in {sweep}; table: ptv2 table {sweep}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import RTE, ptv2

    run = tmp_path_factory.mktemp("first-hour") / "run"
    ptv2("train", "backbone=tiny", "trainer=smoke", "logger=none", f"task.data_dir={RTE}", f"hydra.run.dir={run}")
    return run


def test_eval_takes_the_run_folder_positionally_and_prints_where_eval_json_went(trained, tmp_path):
    from conftest import RTE, ptv2

    by_key, by_position = tmp_path / "key", tmp_path / "position"
    one_batch = ptv2("eval", f"ckpt={trained}", "split=dev", f"task.data_dir={RTE}", f"hydra.run.dir={by_key}")
    args = ["split=dev", f"task.data_dir={RTE}", "trainer.eval_batch_size=1"]  # 6 batches: a line each
    result = ptv2("eval", str(trained), *args, f"hydra.run.dir={by_position}")
    assert f"eval.json written to {by_position / 'eval.json'}" in result.stdout
    assert "rte dev: {" in result.stdout and "(fraction)" in result.stdout
    # progress through the split (a line per tenth off a terminal); training has its own epoch lines instead, and a
    # split of a few batches none
    done = re.findall(r"rte dev: (\d+)/(\d+) batches \((\d+)%\)", result.stdout)
    assert done[-1] == ("6", "6", "100") and len(done) == 6
    assert "batches (" not in (trained / "train.log").read_text() and "batches (" not in one_batch.stdout
    read = [json.loads((folder / "eval.json").read_text()) for folder in (by_key, by_position)]
    assert read[0]["metrics"] == read[1]["metrics"] and read[1]["checkpoint"].startswith(str(trained))


def test_eval_with_a_folder_and_ckpt_is_one_line(trained, tmp_path):
    from conftest import ptv2

    result = ptv2("eval", str(trained), f"ckpt={trained}", f"hydra.run.dir={tmp_path / 'e'}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ptv2: error: {trained} and ckpt= both name the checkpoint; give one of them"


def test_eval_without_data_names_the_folder_it_trained_on(trained, tmp_path):
    from conftest import RTE, ptv2

    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = ptv2("eval", str(trained), "split=dev", f"hydra.run.dir={tmp_path / 'e'}", env=env, check=False)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.endswith(
        f"the checkpoint was trained on task.data_dir={RTE}: add task.data_dir={RTE} to the command "
        "(ptv2 never takes a path from a checkpoint)"
    )
    assert "or use the packaged backbone=minilm" not in line  # the data is missing: no backbone is the fix


@pytest.mark.parametrize("style", [["DIR"], ["dir=DIR"], ["dir=DIR", "out=OUT"]])
def test_table_takes_its_folder_positionally_or_as_dir(trained, tmp_path, style, capsys):
    from ptv2.commands import table

    argv = [arg.replace("DIR", str(trained.parent)).replace("OUT", str(tmp_path)) for arg in style]
    assert table.main([*argv, "--plot", "none"]) == 0
    out = tmp_path if "out=OUT" in style else trained.parent
    assert f"-> {out / 'table.md'}" in capsys.readouterr().out


def test_piped_eval_logs_carry_no_weight_loading_bar(tmp_path):
    """transformers draws a "Loading weights" bar on stderr; piped into a log it is off (MiniLM has real weights)."""
    from conftest import RTE, ptv2, ptv2_subprocess

    run = tmp_path / "run"
    ptv2("train", "backbone=minilm", "trainer=smoke", "logger=none", f"task.data_dir={RTE}", f"hydra.run.dir={run}")
    result = ptv2_subprocess("eval", str(run), "split=dev", f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'e'}")
    assert "eval.json written to" in result.stdout
    assert "Loading weights" not in result.stderr + result.stdout


def test_make_demo_runs_the_ptv2_on_path_into_a_fresh_folder_each_time(tmp_path):
    """Without the checkout's .venv (VENV= names none) the ptv2 the PATH gives runs; its folder is
    outputs/demo/${unique_now:} (a time and a random suffix), so a second `make demo` does not meet the first."""
    import os
    import subprocess
    from pathlib import Path

    bin_dir, data = tmp_path / "bin", tmp_path / "shared" / "superglue" / "RTE"
    bin_dir.mkdir()
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("{}\n")
    fake = bin_dir / "ptv2"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    repo = Path(__file__).parents[1]
    for _ in range(2):
        command = ["make", "-s", "demo", f"VENV={tmp_path / 'no-venv'}", f"SHARED={tmp_path / 'shared'}"]
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0].startswith("train task=rte backbone=minilm task.data_dir=")
    assert calls[0].endswith("hydra.run.dir=outputs/demo/${unique_now:}")


def test_plot_y_axis_spans_at_least_ten_points_around_noise():
    from ptv2.commands.plots import MIN_Y_SPAN, y_limits

    noise = {"rte ptv2/tiny": [(1, 50.2, math.nan), (4, 51.3, math.nan), (16, 50.7, math.nan)]}
    low, high = y_limits(noise)
    assert high - low == pytest.approx(MIN_Y_SPAN) and low < 50.2 and high > 51.3
    wide = {"a": [(1, 40.0, 2.0), (2, 80.0, 1.0)]}
    low, high = y_limits(wide)
    assert low < 38.0 and high > 81.0 and high - low < 50  # a real spread keeps its own range
    top = {"a": [(1, 99.0, math.nan), (2, 99.5, math.nan)]}
    assert y_limits(top) == pytest.approx((90.0, 100.0))  # never above 100 % where no point is


def test_plot_title_names_split_and_n():
    import pandas as pd

    from ptv2.commands.plots import plot_title

    cells = pd.DataFrame({"split": ["dev", "dev"], "prompt.length": ["4", "8"], "n": [3, 3], "runs": [[], []]})
    assert plot_title("length", cells) == "score vs prompt length (dev; n=3 run(s) per point)"
    cells.loc[1, "n"] = 1
    assert plot_title("depth", cells).endswith("(dev; n=1-3 run(s) per point)")


def test_depth_plot_lines_are_shifted_apart_and_ticked_at_integer_k(tmp_path):
    from ptv2.commands.plots import MARKERS, dodge, draw

    shifts = [dodge(i, 2, "depth") for i in range(2)]
    assert shifts[0] < 0 < shifts[1] and abs(shifts[0]) < 0.5  # apart, yet nearer their K than the next K
    same = [(1.0, 50.0, math.nan), (2.0, 50.0, math.nan), (3.0, 50.0, math.nan)]
    series = {"rte ptv2/tiny ascending (bottom:K)": same, "rte ptv2/tiny descending (top:K)": same}
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def keep(figure, *args, **kwargs):
        axes = figure.axes[0]
        captured["ticks"] = [float(t) for t in axes.get_xticks()]
        lines = [line for line in axes.get_lines() if line.get_marker() in MARKERS]  # not the error bars' caps
        captured["xs"] = [list(line.get_xdata()) for line in lines]
        captured["markers"] = {line.get_marker() for line in lines}
        return original(figure, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        draw("depth", series, tmp_path, "accuracy (%)", "title")
    finally:
        plt.Figure.savefig = original
    assert captured["ticks"] == [1.0, 2.0, 3.0]
    assert captured["xs"][0] != captured["xs"][1] and len(captured["markers"]) == 2


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_help_says_what_every_group_chooses(command):
    from conftest import ptv2

    text = ptv2(command, "--help").stdout
    described, options = text.split("== Options of each group ==")
    described = described.split("== Configuration groups: what each chooses")[1]
    groups = [line.split(":")[0] for line in options.split("== Config")[0].strip().splitlines()]
    assert "task" in groups and "backbone" in groups
    for group in groups:
        assert re.search(rf"(^  {group} |; {group}: )", described, re.MULTILINE), f"no word on the {group} group"


def test_help_and_usage_name_every_prompt_method():
    """`ptv2 train --help` and docs/usage.md's method table name each option of conf/prompt/."""
    from conftest import ptv2

    root = Path(__file__).parents[1]
    methods = sorted(path.stem for path in (root / "conf" / "prompt").glob("*.yaml"))
    described = ptv2("train", "--help").stdout.split("== Options of each group ==")[0]
    prompt_lines = described.split("  prompt ")[1].split("  preset ")[0]
    table = [line for line in (root / "docs" / "usage.md").read_text().splitlines() if line.startswith("| `")]
    for method in methods:
        assert re.search(rf"\b{method}\b", prompt_lines), f"--help does not name prompt={method}"
        assert any(line.startswith(f"| `{method}` |") for line in table), f"docs/usage.md has no row for {method}"


def test_a_local_model_folder_without_weights_is_named_not_the_hub(tmp_path):
    from pathlib import Path

    from conftest import RTE, ptv2

    folder = Path(__file__).parent / "fixtures" / "decoders" / "gpt2"  # config.json only
    args = ["train", "backbone=tiny", f"backbone.name_or_path={folder}", "backbone.random_init=false"]
    result = ptv2(
        *args, "trainer=smoke", "logger=none", f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'r'}", check=False
    )
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith(f"ptv2: error: could not load the weights of backbone '{folder}' (")
    assert line.endswith(
        "pass a complete Hugging Face model folder (config.json, tokenizer files, model.safetensors) "
        "with backbone.name_or_path=DIR"
    )
    assert "hub" not in line


def test_positional_run_folders_become_ckpt_and_parse_back_to_the_paths():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ptv2.command_line import positional_checkpoints

    assert positional_checkpoints(["--cfg", "job", "runs/a", "split=dev"]) == (
        ["--cfg", "job", "ckpt=runs/a", "split=dev"],
        None,
    )
    args, problem = positional_checkpoints(["runs/a", "runs/b"])
    assert problem is None and args == ["ckpt=[runs/a,runs/b]"]
    odd = "/tmp/my run's (1)"
    (override,) = positional_checkpoints([odd])[0]
    assert OverridesParser.create().parse_override(override).value() == odd


def test_a_run_on_another_folder_is_not_labelled_as_the_option_it_borrowed(tmp_path):
    from ptv2.runs.checkpoint import backbone_label

    folder = Path(__file__).parent / "fixtures" / "decoders" / "gpt2"
    assert backbone_label(compose_config("backbone=tiny").backbone) == "tiny"
    assert backbone_label(compose_config("backbone=tiny", f"backbone.name_or_path={folder}/").backbone) == "tiny@gpt2"
    # the option's own folder named another way (relative, through a link, a trailing slash) is still the option
    own = Path(compose_config("backbone=tiny").backbone.name_or_path)
    link = tmp_path / "my-tiny"
    link.symlink_to(own)
    for other in (f"{os.path.relpath(own)}/", str(link)):
        assert backbone_label(compose_config("backbone=tiny", f"backbone.name_or_path={other}").backbone) == "tiny"
    # a name no option has (tests, local models) is the label as given
    unlisted = compose_config("backbone=tiny", "backbone.name=my-model", f"backbone.name_or_path={folder}")
    assert backbone_label(unlisted.backbone) == "my-model"


def test_the_borrowed_folder_label_reaches_results_and_the_table(tmp_path):
    import shutil

    from conftest import SMOKE, ptv2

    from ptv2.commands import table

    mine = Path(shutil.copytree(compose_config("backbone=tiny").backbone.name_or_path, tmp_path / "my-bert"))
    run = tmp_path / "runs" / "a"
    ptv2("train", *SMOKE, "logger=none", f"backbone.name_or_path={mine}", f"hydra.run.dir={run}")
    assert json.loads((run / "results.json").read_text())["backbone"] == "tiny@my-bert"
    assert table.main([str(run.parent), "--plot", "none"]) == 0
    header = markdown_rows((run.parent / "table.md").read_text())[0]
    assert "ptv2 / tiny@my-bert" in header  # the column names the folder


def test_a_misspelt_preset_arm_or_experiment_is_refused_not_skipped(tmp_path):
    """Hydra skips a missing option of an optional group without a word: the defaults would run instead."""
    from conftest import ptv2

    for args, line in (
        (["preset=rte-roberta-larg"], "preset=rte-roberta-larg is unknown; did you mean rte-roberta-large"),
        (["-m", "experiment=fidelity", "arm=fidelity-ptv2,fidelity-lorra"], "arm=fidelity-lorra is unknown; did you"),
        (["experiment=no_such_study"], "experiment=no_such_study is unknown; the options are in conf/experiment/"),
    ):
        result = ptv2("train", *args, f"hydra.run.dir={tmp_path / 'run'}", check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"ptv2: error: {line}"), result.stderr
        assert not (tmp_path / "run").exists()


def test_a_sweep_with_cfg_is_one_line_and_hydra_sweep_functions_pass_the_option_check(tmp_path):
    from conftest import ptv2

    result = ptv2("train", "-m", "prompt.length=4,8", "--cfg", "job", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "ptv2: error: -m and --cfg cannot go together; drop -m to see one job's config"
    from ptv2.command_line import missing_optional_option

    assert missing_optional_option("train", ["-m", "arm=glob(fidelity-lora*)", "experiment=fidelity"]) is None
    assert missing_optional_option("train", ["-m", "arm=fidelity-lora,fidelity-lorb"]).startswith("arm=fidelity-lorb")


def test_length_grouped_batches_are_transformers_batches_in_another_order():
    """Why data.LengthGroupedBatches is not transformers' LengthGroupedSampler: from the same generator draws and
    windows of 50 batches it cuts the same batches, but shuffles them where transformers keeps window order, and
    transformers' default window shrinks on small sets; swapping would change every recorded training order."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from ptv2.data import LengthGroupedBatches

    def theirs(lengths, **options):
        order = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(1), **options)
        return [tuple(order[i : i + 4]) for i in range(0, len(order), 4)]

    lengths = [(i * 37) % 53 + 1 for i in range(2000)]  # every window holds the longest length: no swap to first
    ours = [tuple(batch) for batch in LengthGroupedBatches(lengths, 4, seed=1)]
    assert sorted(ours) == sorted(theirs(lengths)) and ours != theirs(lengths)
    small = lengths[:100]  # transformers' window: 100 // (4 * 4) = 6 batches, not 50
    assert theirs(small) != theirs(small, mega_batch_mult=50)
    ours_small = [tuple(batch) for batch in LengthGroupedBatches(small, 4, seed=1)]
    assert sorted(ours_small) == sorted(theirs(small, mega_batch_mult=50))
