"""The one training loop (ptv2.loop) against figures recorded from the two loops it replaced.

tests/fixtures/loop_records.json holds, per case, what `ptv2 train` (single jobs) and the packed launcher (groups)
gave before they became one loop: every epoch's train loss and dev metrics, the test score at the best epoch, and
each trained tensor's sum and absolute sum. It was written once by `python tests/test_loop.py --record` on the code
before the change; the test compares today's code with it, never with itself. On the machine that recorded them the
figures were equal to the last bit; elsewhere BLAS may sum in another order, so the comparison allows 1e-5 relative.

Cases: tiny BERT, RoBERTa (shifted positions), DeBERTa-v2 and Llama with dropout on; fine-tuning and prompt tuning
(groups of one that never pack); tagging with a test split; generation; a packed group of two jobs, one block per
forward and both blocks in one forward.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # conftest's helpers when run as a script (--record)

from conftest import RTE, ptv2  # noqa: E402
from test_packed import backbone_args  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = FIXTURES / "loop_records.json"
DECODER = FIXTURES / "decoders"
RUN = ["logger=none", "trainer.epochs=2", "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.progress=false"]
RTE_TASK = [f"task.data_dir={RTE}"]
TAGGING = ["task=conll03", f"task.data_dir={FIXTURES / 'tagging'}"]
TAGGING += [f"task.files.{split}=conll03_iob1.txt" for split in ("train", "dev", "test")]
LLAMA = ["backbone.name=tiny-llama", f"backbone.name_or_path={DECODER / 'llama'}"]
LLAMA += [f"backbone.tokenizer={DECODER / 'tokenizer'}"]
GENERATION = ["task=generation", f"task.data_dir={FIXTURES / 'generation'}", "task.options.max_new_tokens=4"]


def family_folder(family: str, root: Path) -> list[str]:
    """A tiny RoBERTa or DeBERTa-v2 on the tiny-bert tokenizer (test_packed's), as backbone overrides."""
    return backbone_args(family, root)[1:]  # without its backbone=tiny, already given


# name -> (sweep?, overrides); a sweep's figures are recorded per job folder.
CASES = {
    "bert": (False, [*RTE_TASK, "prompt.length=3"]),
    "roberta": (False, [*RTE_TASK, "prompt.length=3", "prompt.shift_positions=true", "@roberta"]),
    "deberta-v2": (False, [*RTE_TASK, "prompt.length=3", "@deberta-v2"]),
    "llama": (False, [*RTE_TASK, *LLAMA, "prompt.length=4"]),
    "finetune": (False, [*RTE_TASK, "prompt=finetune", "optimizer.lr=1e-3"]),
    "prompt_tuning": (False, [*RTE_TASK, "prompt=prompt_tuning", "prompt.length=3"]),
    "tagging": (False, [*TAGGING, "prompt.length=3"]),
    "generation": (False, [*GENERATION, *LLAMA, "prompt.length=4", "trainer.epochs=1"]),
    "packed": (True, [*RTE_TASK, "hydra/launcher=packed", "prompt.length=2,5"]),
    "packed-one-forward": (True, [*RTE_TASK, "hydra/launcher=packed", "hydra.launcher.jobs_per_forward=2"]),
}
CASES["packed-one-forward"][1].append("optimizer.lr=1e-2,3e-2")


def figures(run_dir: Path) -> dict:
    """What a finished run is judged by: its epochs (timings left out), its test score, its trained tensors."""
    from ptv2.runs import resume as state

    results = json.loads((run_dir / "results.json").read_text())
    epochs = [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in results["history"]]
    trained = state.read(run_dir / state.STATE_DIR / state.STATE_FILE)["trainable"]
    tensors = {k: [v.double().sum().item(), v.double().abs().sum().item()] for k, v in sorted(trained.items())}
    return {"epochs": epochs, "test": results.get("test_at_best"), "steps": results["steps"], "tensors": tensors}


def run_case(name: str, root: Path) -> dict:
    sweep, overrides = CASES[name]
    args = ["backbone=tiny", *RUN]
    for item in overrides:
        args += family_folder(item[1:], root) if item.startswith("@") else [item]
    folder = root / name
    if sweep:
        ptv2("train", "-m", *args, f"hydra.sweep.dir={folder}")
        return {job.name: figures(job) for job in sorted(folder.iterdir()) if job.is_dir()}
    ptv2("train", *args, f"hydra.run.dir={folder}")
    return figures(folder)


def assert_close(ours, theirs, where: str = "") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        # A key bias gets an exactly zero gradient in exact arithmetic (softmax ignores a shift shared by a query's
        # scores), so a fine-tuned one holds only round-off, which Adam scales up to lr * g / eps per step and which
        # differs between CPUs' kernels: it is held to that size, every other figure to round-off.
        noise = 1e-5 if ".key.bias" in where else 1e-7
        assert math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=noise), f"{where}: {ours} != {theirs}"
    else:
        assert ours == theirs, f"{where}: {ours} != {theirs}"


@pytest.mark.parametrize("name", list(CASES))
def test_the_loop_gives_the_recorded_figures(name, tmp_path):
    recorded = json.loads(RECORDS.read_text())[name]
    assert_close(run_case(name, tmp_path), recorded, name)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        records = {name: run_case(name, Path(folder)) for name in CASES}
    RECORDS.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDS}")


# ----------------------------------------------------------------------------------------------- group saves


class Stub(torch.nn.Module):
    """What save_group reads of a model: prompt_state_dict."""

    def __init__(self, value: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((2,), value))

    def prompt_state_dict(self):
        return {"weight": self.weight}


def saved_at(run_dirs, point, value):
    from omegaconf import OmegaConf

    from ptv2.runs import resume as state

    runs = []
    for run_dir in run_dirs:
        model = Stub(value)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        progress = state.Progress(epoch=point[0], batches_done=point[1], step=point[1])
        runs.append((run_dir, model, optimizer, scheduler, OmegaConf.create({"seed": 1}), progress))
    return runs


def held(run_dir):
    from ptv2.runs import resume as state

    saved = state.read(run_dir / state.STATE_DIR / state.STATE_FILE)
    pending = (run_dir / state.STATE_DIR / state.NEXT_FILE).exists()
    return saved["progress"]["batches_done"], saved["trainable"]["weight"][0].item(), pending


def test_a_group_save_cut_short_settles_on_a_point_every_job_holds(tmp_path):
    """Cut in its first half (some jobs' new states written beside the old): every job goes back to the old point.
    Cut in its second half (some renamed already): every job goes on from the new point."""
    import shutil

    from ptv2.runs import resume as state

    dirs = [tmp_path / "run" / str(i) for i in range(3)]
    newer = [tmp_path / "newer" / str(i) for i in range(3)]
    state.save_group(saved_at(newer, (0, 4), 2.0))  # each job's state at the later point, to plant below
    new_file = [d / state.STATE_DIR / state.STATE_FILE for d in newer]

    def plant(job: int, name: str) -> None:
        shutil.copyfile(new_file[job], dirs[job] / state.STATE_DIR / name)

    state.save_group(saved_at(dirs, (0, 2), 1.0))
    plant(0, state.NEXT_FILE)  # first half cut short: only job 0's new state written
    state.settle_group(dirs)
    assert [held(d) for d in dirs] == [(2, 1.0, False)] * 3
    plant(0, state.STATE_FILE)  # second half cut short: all written, only job 0's renamed
    plant(1, state.NEXT_FILE)
    plant(2, state.NEXT_FILE)
    assert [held(d) for d in dirs] == [(4, 2.0, False), (2, 1.0, True), (2, 1.0, True)]
    state.settle_group(dirs)
    assert [held(d) for d in dirs] == [(4, 2.0, False)] * 3


GROUP_SAVE = ["train", "-m", "backbone=tiny", *RUN, *RTE_TASK, "hydra/launcher=packed", "trainer.batch_size=2"]
GROUP_SAVE += ["trainer.save_every_steps=4", "prompt.length=2,5"]


@pytest.fixture(scope="module")
def uninterrupted_group(tmp_path_factory) -> Path:
    reference = tmp_path_factory.mktemp("group") / "reference"
    ptv2(*GROUP_SAVE, f"hydra.sweep.dir={reference}")
    return reference


# A group save of two jobs is four events: write job 0's pending state, write job 1's, rename job 0's over its
# state, rename job 1's. Saves come at steps 4 and 8: events 1-4 are the first save, 5-8 the second.
KILL_POINTS = [
    pytest.param(1, "true", id="first-save-one-written", marks=pytest.mark.slow),
    pytest.param(1, "auto", id="first-save-one-written-auto", marks=pytest.mark.slow),
    pytest.param(2, "true", id="first-save-both-written", marks=pytest.mark.slow),
    pytest.param(3, "auto", id="first-save-one-renamed-auto"),
    pytest.param(3, "true", id="first-save-one-renamed", marks=pytest.mark.slow),
    pytest.param(7, "true", id="second-save-one-renamed", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("event", "resume"), KILL_POINTS)
def test_a_packed_group_killed_inside_a_group_save_resumes_exactly(event, resume, uninterrupted_group, tmp_path):
    """SIGKILL after any event of a group save, the first save's included (jobs then hold only a pending state, or
    states of different steps): the resumed group, with trainer.resume=true or auto (a requeued job), ends with the
    uninterrupted group's figures, to the last bit (the same computation on the same machine)."""
    from conftest import ptv2_subprocess

    resumed = tmp_path / "resumed"
    killed = ptv2_subprocess(
        *GROUP_SAVE, f"hydra.sweep.dir={resumed}", env={"PTV2_DIE_AT_SAVE": str(event)}, check=False
    )
    assert killed.returncode == -9
    again = ptv2(*GROUP_SAVE, f"hydra.sweep.dir={resumed}", f"trainer.resume={resume}", check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    for job in ("0", "1"):
        assert figures(resumed / job) == figures(uninterrupted_group / job)


def test_a_packed_generation_sweep_equals_its_jobs_run_separately(tmp_path):
    """Generation packs like the other task types: both jobs' blocks in one decoder forward, each job's greedy
    answers decoded with its own prefix, ending as the same jobs run one by one (dropout off; 1e-5 relative, as
    the packed forward sums in another order)."""
    no_dropout = ["backbone.dropout=0", "backbone.attention_dropout=0", "prompt.dropout=0", "task.head_dropout=0"]
    args = ["backbone=tiny", *RUN, *GENERATION, *LLAMA, *no_dropout, "trainer.epochs=1", "prompt.length=2,4"]
    packed, separate = tmp_path / "packed", tmp_path / "separate"
    ptv2(
        "train", "-m", *args, "hydra/launcher=packed", "hydra.launcher.jobs_per_forward=2", f"hydra.sweep.dir={packed}"
    )
    ptv2("train", "-m", *args, f"hydra.sweep.dir={separate}")
    assert "packed group of 2 jobs" in (packed / "0" / "train.log").read_text()
    for job in ("0", "1"):
        ours = figures(packed / job)
        assert "dev/rougeL" in ours["epochs"][0] and ours["steps"] > 0
        assert_close(ours, figures(separate / job), job)


@pytest.mark.slow  # a sweep in a subprocess, then its resume
def test_a_resumed_packed_group_leaves_no_failed_marker(tmp_path):
    """SIGTERM marks every job FAILED (the sweep did not finish); a resume that finishes them removes the markers,
    so `ptv2 table` lists them as finished runs."""
    from conftest import ptv2_subprocess

    from ptv2.commands import table

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "backbone=tiny", *RUN, *RTE_TASK, "hydra/launcher=packed", "trainer.batch_size=2"]
    args += ["trainer.save_every_steps=2", "prompt.length=2,5", f"hydra.sweep.dir={sweep}"]
    stopped = ptv2_subprocess(*args, env={"PTV2_DIE_AT_STEP": "3", "PTV2_DIE_SIGNAL": "TERM"}, check=False)
    assert stopped.returncode != 0 and all((sweep / job / "FAILED").exists() for job in ("0", "1"))
    assert "trainer.resume=true" in (sweep / "0" / "train.log").read_text()
    ptv2(*args, "trainer.resume=true")
    assert not any((sweep / job / "FAILED").exists() for job in ("0", "1"))
    assert table.main([str(sweep), "--out", str(tmp_path / "table"), "--plot", "none"]) == 0
    assert "failed" not in (tmp_path / "table" / "table.md").read_text().lower()
