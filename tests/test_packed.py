"""Packed sweeps (hydra/launcher=packed): a group of K jobs trained on one backbone as K x B rows ends as the same
K jobs run separately, on tiny BERT, RoBERTa and DeBERTa-v2 backbones (dropout 0); each job's dropout is its own;
a NaN ends one job alone; a killed group resumes to the uninterrupted result; the grouping rules."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import RTE, compose_config, ptv2, ptv2_subprocess
from omegaconf import OmegaConf

from ptv2.commands import packed, table
from ptv2.modeling import packing
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel
from ptv2.runs import resume as state

ASSET = Path(packed.__file__).parents[1] / "assets" / "tiny-bert"
SHAPE = dict(vocab_size=197, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# Backbone configs on the tiny-bert tokenizer (pad id 0, two token types): RoBERTa numbers positions from the pad
# id on; DeBERTa-v2 has relative positions only and takes the prefix through its own attention.
FAMILIES = {
    "roberta": dict(model_type="roberta", max_position_embeddings=200, type_vocab_size=2, pad_token_id=0),
    "deberta-v2": dict(
        model_type="deberta-v2",
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        max_relative_positions=-1,
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
    ),
}
NO_DROPOUT = ["backbone.dropout=0", "backbone.attention_dropout=0", "prompt.dropout=0", "task.head_dropout=0"]
RUN = [
    f"task.data_dir={RTE}",
    "logger=none",
    "trainer.epochs=3",
    "trainer.batch_size=4",  # 12 examples: 3 steps per epoch
    "trainer.eval_batch_size=4",
    "trainer.progress=false",
]


def backbone_args(family: str, tmp_path: Path) -> list[str]:
    if family == "bert":
        return ["backbone=tiny"]
    folder = tmp_path / family
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(ASSET / name, folder / name)
    (folder / "config.json").write_text(json.dumps({**SHAPE, **FAMILIES[family]}))
    return ["backbone=tiny", f"backbone.name={family}", f"backbone.name_or_path={folder}"]


def train(*args: str, die_at: int | None = None) -> subprocess.CompletedProcess:
    """A sweep in this process; in a fresh one when it is to be killed after step `die_at`."""
    if die_at is None:
        return ptv2("train", "-m", *RUN, *args, check=False)
    return ptv2_subprocess("train", "-m", *RUN, *args, env={"PTV2_DIE_AT_STEP": str(die_at)}, check=False)


def jobs(sweep: Path) -> dict[str, dict]:
    """{job folder name: results.json} of a sweep folder."""
    return {p.name: json.loads((p / "results.json").read_text()) for p in sorted(sweep.iterdir()) if p.is_dir()}


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return state.read(run_dir / state.STATE_DIR / state.STATE_FILE)["trainable"]


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)


# Jobs that differ in prompt length and depth or learning rate: one group of four each.
GRIDS = {
    "bert": ["prompt.length=2,5", "optimizer.lr=1e-2,3e-2"],
    "roberta": ["prompt.length=2,5", "prompt.layers=all,top:1", "prompt.shift_positions=true"],
    "deberta-v2": ["prompt.length=2,5", "prompt.layers=all,top:1"],
}


@pytest.mark.parametrize(
    "family",
    ["bert", pytest.param("roberta", marks=pytest.mark.slow), pytest.param("deberta-v2", marks=pytest.mark.slow)],
)
def test_packed_group_equals_the_jobs_run_separately(family, tmp_path):
    """3 epochs (9 AdamW steps): metrics history equal (losses to 1e-6), prompt and head tensors to 1e-4 relative.

    Not bit-equal: the packed forward sums attention over zero-weight padded prefix columns and runs matmuls on
    K-times larger batches, so floating-point sums are taken in another order (differences of ~1e-7 per step,
    which AdamW's normalised updates carry along: ~1e-6 relative after 9 steps on these fixtures)."""
    args = [*backbone_args(family, tmp_path), *NO_DROPOUT, *GRIDS[family]]
    separate, packed_dir = tmp_path / "separate", tmp_path / "packed"
    # All four jobs' blocks in one forward of 4 x B rows (a CPU would take them one per forward by default).
    packing_args = ["hydra/launcher=packed", "hydra.launcher.jobs_per_forward=4"]
    for folder, extra in ((separate, []), (packed_dir, packing_args)):
        result = train(*args, *extra, f"hydra.sweep.dir={folder}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "packed group of" in (packed_dir / "0" / "train.log").read_text()
    ours, theirs = jobs(packed_dir), jobs(separate)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a["best_epoch"] == b["best_epoch"] and a["steps"] == b["steps"] == 9
        for x, y in zip(a["history"], b["history"], strict=True):
            assert x["dev/accuracy"] == y["dev/accuracy"]
            assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
        assert relative_difference(trained(packed_dir / name), trained(separate / name)) < 1e-4
        config = OmegaConf.load(packed_dir / name / "config.yaml")
        assert config == OmegaConf.load(separate / name / "config.yaml")
    # The job folders are ordinary ones: `ptv2 table` reads them alike, `ptv2 eval` reproduces a job's best epoch.
    tables = {}
    for folder in (separate, packed_dir):
        assert table.main([str(folder), "--out", str(folder / "table"), "--plot", "none"]) == 0
        tables[folder] = (folder / "table" / "table.csv").read_text()
    assert tables[separate] == tables[packed_dir]
    if family == "bert":
        evaluated = tmp_path / "eval"
        ptv2("eval", f"ckpt={packed_dir / '3'}", f"task.data_dir={RTE}", f"hydra.run.dir={evaluated}")
        accuracy = json.loads((evaluated / "eval.json").read_text())["metrics"]["accuracy"]
        assert accuracy == ours["3"]["best"]["accuracy"]


# ----------------------------------------------------------------------------------------------- the packed step


def prompt_config(**values):
    defaults = dict(method="ptv2", length=2, projection="none", projection_dim=8, dropout=0.0, layers="all")
    return OmegaConf.create({**defaults, "shift_positions": False, "init_std": None, **values})


def models_on(encoder, configs: list[dict], seed: int = 0) -> list[PromptModel]:
    torch.manual_seed(seed)
    return [PromptModel(encoder, prompt_config(**c), {"t": (ClassificationHead, 2)}, 0.0) for c in configs]


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2"])
def test_packed_step_gives_each_job_its_own_logits_and_gradients(family):
    """One packed forward/backward of three jobs (prompt lengths 2 and 5, all layers or the top one, shifted
    positions, a linear probe) equals each job's own forward and backward, to float32 summation order."""
    from conftest import padded_batch, tiny_encoder

    _, encoder = tiny_encoder(family)
    shift = family != "deberta-v2"  # relative positions: nothing to shift
    configs = [dict(length=2), dict(length=5, layers="top:1", shift_positions=shift), dict(method="linear_probe")]
    models = models_on(encoder, configs)  # the encoder is in eval mode: no dropout anywhere
    input_ids, mask = padded_batch((9, 6, 4), pad_id=1 if family == "roberta" else 0)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}

    separate = []
    for model in models:
        loss = model.heads["t"].loss(model(batch, head="t"), batch)
        loss.backward()
        separate.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    blocks = packing.packed_hidden(encoder, models, batch)
    losses = [m.heads["t"].loss(m.heads["t"](h, batch), batch) for m, h in zip(models, blocks, strict=True)]
    torch.stack(losses).sum().backward()
    for model, grads in zip(models, separate, strict=True):
        ours = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours, grads, strict=True))
    assert not any(p.grad is not None for p in encoder.parameters())


def test_each_job_draws_its_own_dropout():
    """Two jobs with identical prompts: with prompt and backbone dropout on, their blocks differ (independent masks);
    with dropout off, they are identical."""
    from conftest import padded_batch, tiny_encoder

    _, encoder = tiny_encoder("bert")
    input_ids, mask = padded_batch((9, 6, 4))
    batch = {"input_ids": input_ids, "attention_mask": mask}
    for dropout in (0.0, 0.5):
        models = [model.train() for model in models_on(encoder, [dict(length=3, dropout=dropout)] * 2)]
        models[1].load_state_dict(models[0].state_dict())
        for module in encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        first, second = packing.packed_hidden(encoder, models, batch)
        # Two rows of one batched matmul need not be bitwise equal (BLAS may block them differently): a tolerance
        # far below what a dropout mask changes.
        gap = (first - second).abs().max().item()
        assert gap < 1e-5 if dropout == 0.0 else gap > 1e-2, gap


def test_prefixes_of_different_lengths_are_padded_and_masked():
    key = torch.ones(2, 4, 3, 8)
    one, other = {0: (key, key), 1: (key, key)}, {1: (key[:, :, :1], key[:, :, :1])}
    prefix = packing.pack_prefixes([one, other, None])
    assert set(prefix) == {0, 1} and prefix[1][0].shape == (6, 4, 3, 8)
    visible = prefix[1][2]
    assert visible[:2].all() and visible[2:4].tolist() == [[True, False, False]] * 2 and not visible[4:].any()
    assert not prefix[0][2][2:].any() and prefix[0][0][2:].abs().sum() == 0  # no prompt on layer 0: nothing seen
    same = packing.pack_prefixes([one, one])
    assert len(same[0]) == 2 and same[0][0].shape == (4, 4, 3, 8)  # equal prompts: no mask needed


# ----------------------------------------------------------------------------------------------- grouping


def composed(*overrides: str):
    return compose_config("backbone=tiny", *overrides)


def test_grouping_rules():
    """Jobs differing only in prompt, head dropout, optimizer or scheduler share a group; a different seed, batch
    size or task does not; fine-tuning, input prompts and fp16 run alone; groups are cut at max_pack."""
    base = packed.group_key(composed())
    same = ["prompt.length=64", "prompt.layers=top:1", "optimizer.lr=5e-3", "scheduler=constant", "task.head_dropout=0"]
    assert all(packed.group_key(composed(o)) == base for o in same)
    other = ["trainer.seed=1", "trainer.batch_size=8", "task=boolq", "task.max_length=64", "prompt=linear_probe"]
    assert len({base, *(packed.group_key(composed(o)) for o in other)}) == len(other) + 1
    for alone in ("prompt=finetune", "prompt=prompt_tuning", "prompt=ptuning_v1", "trainer.precision=fp16"):
        assert packed.group_key(composed(alone)) is None and packed.unpacked_reason(composed(alone))
    assert packed.groups(["a", "b", None, "a", "a"], max_pack=2) == [[0, 3], [1], [2], [4]]


# ----------------------------------------------------------------------------------------------- failures, resume


def test_a_nan_ends_only_its_own_job_and_fine_tuning_runs_alone(tmp_path):
    sweep = tmp_path / "sweep"
    smoke = [arg for arg in RUN if not arg.startswith("trainer.")] + ["trainer=smoke"]
    args = ["backbone=tiny", *smoke, "hydra/launcher=packed", "prompt=ptv2,finetune", "optimizer.lr=1e-2,1e30"]
    result = ptv2("train", "-m", *args, f"hydra.sweep.dir={sweep}", check=False)
    assert result.returncode == 1 and "2 job(s) failed: job 1" in result.stderr
    assert "job 2 runs alone: prompt.method=finetune" in result.stderr + result.stdout
    for job, failed in (("0", False), ("1", True), ("2", False), ("3", True)):
        assert (sweep / job / "FAILED").exists() == failed and (sweep / job / "results.json").exists() != failed
    assert "the loss became nan at step 2" in (sweep / "1" / "train.log").read_text()
    assert "the loss became" not in (sweep / "0" / "train.log").read_text()  # each job's log is its own
    assert json.loads((sweep / "0" / "results.json").read_text())["steps"] == 2


@pytest.mark.slow  # three sweeps in subprocesses (about a minute on a shared 2-core CPU)
def test_a_killed_packed_group_resumes_every_job_to_the_uninterrupted_result(tmp_path):
    """Dropout on (prompt, head, backbone); 3 epochs of 6 steps; SIGKILL after step 9, state saved at step 8."""
    args = ["backbone=tiny", "hydra/launcher=packed", "hydra.launcher.jobs_per_forward=2", "trainer.batch_size=2"]
    args += ["trainer.save_every_steps=2"]
    args += ["prompt.length=2,5", "optimizer.lr=1e-2"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train(*args, f"hydra.sweep.dir={reference}").returncode == 0
    killed = train(*args, f"hydra.sweep.dir={resumed}", die_at=9)
    assert killed.returncode == -9 and not any((resumed / job / "results.json").exists() for job in ("0", "1"))
    again = train(*args, f"hydra.sweep.dir={resumed}", "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    ours, theirs = jobs(resumed), jobs(reference)
    assert ours.keys() == theirs.keys() == {"0", "1"}
    for name in ours:
        untimed = [
            [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in x[name]["history"]]
            for x in (ours, theirs)
        ]
        assert untimed[0] == untimed[1] and ours[name]["steps"] == 18
        a, b = trained(resumed / name), trained(reference / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- the benchmark


def test_pack_bench_times_both_sides_for_the_same_steps(tmp_path):
    """Both sides of `ptv2 bench bench.pack=K` in this process, on the tiny backbone: K jobs x steps timed each."""
    from ptv2.commands import pack_bench

    bench = ("bench.pack=3", "bench.batch_size=2", "bench.seq_length=8", "bench.steps=2", "bench.warmup_steps=1")
    cfg = compose_config("backbone=tiny", *bench, config_name="bench")
    cfg.bench.device = "cpu"
    sides = {mode: pack_bench.measure(cfg, mode) for mode in ("sequential", "packed")}
    assert sides["sequential"]["steps_timed"] == 6 and sides["packed"]["steps_timed"] == 2  # 3 jobs x 2 steps
    assert sides["packed"]["sequential_interleaved_seconds"] > 0
    assert all(side["train_seconds"] > 0 and side["peak_memory_bytes"] > 0 for side in sides.values())
    report = {"backbone": "tiny", "method": "ptv2", "pack": 3, "settings": {**cfg.bench, "precision": "no"}, **sides}
    assert "| packed |" in pack_bench.table({**report, "wall_ratio": 0.5, "memory_ratio": 1.1})
    assert sides["packed"]["jobs_per_forward"] == 1  # on a CPU: one job per forward unless told
