"""Serving several prompts on one backbone (mixed batches) and `ptv2 predict`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RTE, SMOKE, padded_batch, ptv2, tiny_encoder
from omegaconf import OmegaConf

from ptv2.modeling.model import PromptModel
from ptv2.serving import PromptServer
from ptv2.tasks import task_type


def prompt_cfg(length: int, layers="all", shift: bool = False, projection: str = "none", method: str = "ptv2"):
    return OmegaConf.create(
        dict(
            method=method,
            length=length,
            projection=projection,
            projection_dim=16,
            dropout=0.1,
            layers=layers,
            shift_positions=shift,
            encoder="lstm",
        )
    )


def make_server(family: str, prompts: dict, head_types: dict | None = None):
    """A server over tiny random prompt models on one shared encoder (prompts: {name: prompt config})."""
    _, encoder = tiny_encoder(family)
    torch.manual_seed(3)
    models = {}
    for name, cfg in prompts.items():
        kind = task_type((head_types or {}).get(name, "classification"))
        models[name] = PromptModel(encoder, cfg, heads={name: (kind.HEAD, 3)}, head_dropout=0.1)
        if models[name].prompt is not None:  # N(0, 1) prefixes are too small to matter: make them count
            with torch.no_grad():
                models[name].prompt.embedding.weight.mul_(3)
    return PromptServer(encoder, None, models, {}).eval(), models


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2"])
def test_mixed_batch_equals_each_task_alone(family):
    """Different prompt lengths, layer subsets, no prompt at all, and an MLP prompt, in one forward pass."""
    prompts = {
        "a": prompt_cfg(4),
        "b": prompt_cfg(7, layers=[1, 2]),
        "c": prompt_cfg(2, projection="mlp"),
        "probe": prompt_cfg(1, method="linear_probe"),
    }
    server, models = make_server(family, prompts, head_types={"b": "tagging"})
    pad = 1 if family == "roberta" else 0
    input_ids, mask = padded_batch(lengths=(9, 6, 4, 8, 3, 7), pad_id=pad)
    tasks = ["a", "b", "c", "a", "probe", "b"]
    with torch.no_grad():
        mixed = server({"input_ids": input_ids, "attention_mask": mask}, tasks=tasks)
        for name in prompts:
            rows = [i for i, t in enumerate(tasks) if t == name]
            alone = models[name]({"input_ids": input_ids[rows], "attention_mask": mask[rows]}, head=name)
            for position, row in enumerate(rows):
                real = int(mask[row].sum())
                expected, got = alone[position], mixed[row]
                if expected.dim() == 2:  # tagging: compare the real tokens only
                    expected, got = expected[:real], got[:real]
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The padded prefix columns matter: without the mask the short prompts' rows would change.
    assert mixed[2].shape == (3,) and mixed[1].shape == (9, 3)


def test_mixed_batch_of_equal_prompts_gathers_each_rows_own_prefix():
    """Prompts of one length on the same layers (a server's usual set) take the gathered path, with no padding mask:
    every row still equals its prompt run alone, and a row given another prompt changes."""
    prompts = {name: prompt_cfg(4) for name in ("a", "b", "c")}
    server, models = make_server("bert", prompts, head_types={"c": "tagging"})
    input_ids, mask = padded_batch(lengths=(9, 6, 4, 8, 5))
    tasks = ["b", "a", "c", "a", "b"]
    with torch.no_grad():
        prefix = server._mixed_prefix(server._groups(tasks), len(tasks))
        assert all(len(kv) == 2 for kv in prefix.values())  # no visibility mask: no padded column
        mixed = server({"input_ids": input_ids, "attention_mask": mask}, tasks=tasks)
        for row, name in enumerate(tasks):
            alone = models[name]({"input_ids": input_ids[[row]], "attention_mask": mask[[row]]}, head=name)[0]
            real = int(mask[row].sum())
            got, expected = (mixed[row][:real], alone[:real]) if alone.dim() == 2 else (mixed[row], alone)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        swapped = server({"input_ids": input_ids, "attention_mask": mask}, tasks=["a", "b", "c", "a", "b"])
    assert not torch.allclose(swapped[0], mixed[0])


def test_mixed_batch_with_shifted_positions():
    prompts = {"s": prompt_cfg(5, shift=True), "n": prompt_cfg(3)}
    server, models = make_server("bert", prompts)
    input_ids, mask = padded_batch(lengths=(9, 6, 4, 8))
    tasks = ["s", "n", "n", "s"]
    with torch.no_grad():
        mixed = server({"input_ids": input_ids, "attention_mask": mask}, tasks=tasks)
        for name in prompts:
            rows = [i for i, t in enumerate(tasks) if t == name]
            alone = models[name]({"input_ids": input_ids[rows], "attention_mask": mask[rows]}, head=name)
            torch.testing.assert_close(torch.stack([mixed[r] for r in rows]), alone, atol=1e-5, rtol=0)


def test_unknown_task_name_is_a_user_error():
    from ptv2.errors import UserError

    server, _ = make_server("bert", {"a": prompt_cfg(2)})
    input_ids, mask = padded_batch(lengths=(3,))
    with pytest.raises(UserError, match="no served task named zzz; served: a"):
        server({"input_ids": input_ids, "attention_mask": mask}, tasks=["zzz"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny RTE runs with different prompt lengths (and one with the MLP reparameterization)."""
    root = tmp_path_factory.mktemp("runs")
    ptv2("train", *SMOKE, "logger=none", "prompt.length=3", f"hydra.run.dir={root / 'a'}")
    ptv2("train", *SMOKE, "logger=none", "prompt.length=5", "prompt.projection=mlp", f"hydra.run.dir={root / 'b'}")
    return root / "a", root / "b"


def test_predict_writes_submission_and_serves_several_checkpoints(two_runs, tmp_path):
    """`ptv2 predict` on the test split writes the task's file; several checkpoints share one backbone and agree
    with predicting each alone; input=FILE reads a file in the task's own format."""
    a, b = two_runs
    alone = {}
    for run in (a, b):
        out = tmp_path / f"alone-{run.name}"
        ptv2(
            "predict", f"ckpt={run}", "split=test", f"task.data_dir={RTE}", f"output_dir={out}", f"hydra.run.dir={out}"
        )
        files = sorted(p.name for p in out.iterdir() if p.suffix == ".jsonl")
        assert files, f"no prediction file in {sorted(p.name for p in out.iterdir())}"
        alone[run.name] = (out / files[0]).read_text().splitlines()
        assert len(alone[run.name]) == 3 and all("label" in json.loads(line) for line in alone[run.name])

    both = tmp_path / "both"
    # Options passed to every command out of habit are accepted: harmless groups, the checkpoints' own backbone.
    habits = ["logger=none", "trainer=smoke", "optimizer=adamw", "backbone=tiny"]
    ptv2("predict", f"ckpt=[{a},{b}]", "split=test", f"task.data_dir={RTE}", *habits, f"hydra.run.dir={both}")
    summary = json.loads((both / "predict.json").read_text())
    assert [entry["name"] for entry in summary["served"]] == ["rte", "rte-1"]
    for entry, run in zip(summary["served"], (a, b), strict=True):
        lines = open(entry["files"][0]).read().splitlines()
        assert [json.loads(x)["label"] for x in lines] == [json.loads(x)["label"] for x in alone[run.name]]

    # A user's file without the bookkeeping idx, the run folder given positionally: the labels as predicted on the
    # official file, numbered in file order, and every label's probability beside them.
    record = json.loads((RTE / "test.jsonl").read_text().splitlines()[0])
    raw = tmp_path / "mine.jsonl"
    raw.write_text(json.dumps({k: v for k, v in record.items() if k not in ("idx", "label")}) + "\n")
    one = tmp_path / "one"
    result = ptv2("predict", str(a), f"input={raw}", f"hydra.run.dir={one}")
    assert f"predict.json (what was written) in {one / 'predict.json'}" in result.stdout
    submission = json.loads((one / "RTE.jsonl").read_text())
    assert submission == {"idx": 0, "label": json.loads(alone["a"][0])["label"]}
    scores = json.loads((one / "rte-scores.jsonl").read_text())
    assert scores["record"] == submission["idx"] == 0 and scores["label"] == submission["label"]
    assert set(scores["scores"]) == {"entailment", "not_entailment"}
    assert sum(scores["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert max(scores["scores"], key=scores["scores"].get) == submission["label"]
