"""Prompt checkpoints: exact round trip, folded MLP prefixes, metadata, and clear errors through `ptv2 eval`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import RTE, SMOKE, compose_config, padded_batch, ptv2, tiny_encoder
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ptv2 import __version__
from ptv2.errors import UserError
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel
from ptv2.runs import checkpoint

LABELS = ["entailment", "not_entailment"]


def run_cfg(projection: str):
    return OmegaConf.create(
        {
            "backbone": {"name": "tiny-bert", "name_or_path": "tiny/bert"},
            "task": {"name": "rte", "labels": LABELS},
            "prompt": {
                "method": "ptv2",
                "length": 4,
                "projection": projection,
                "projection_dim": 8,
                "dropout": 0.1,
                "layers": "all",
                "shift_positions": False,
                "encoder": "lstm",
            },
        }
    )


def new_model(cfg, seed: int) -> PromptModel:
    """A PromptModel on the same tiny encoder weights every time; `seed` sets the prompt/head init."""
    _, encoder = tiny_encoder("bert")
    torch.manual_seed(seed)
    return PromptModel(encoder, cfg.prompt, heads={"rte": (ClassificationHead, 2)}, head_dropout=0.1)


def trained(cfg) -> tuple[PromptModel, dict]:
    """A model after a few optimizer steps (dropout on), and an evaluation batch."""
    model = new_model(cfg, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    input_ids, mask = padded_batch(lengths=(9, 6, 4))
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    model.train()
    for _ in range(3):
        model.head_for("rte").loss(model(batch), batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), batch


@pytest.mark.parametrize("projection", ["none", "mlp"])
def test_loaded_checkpoint_gives_bit_identical_outputs(tmp_path, projection):
    cfg = run_cfg(projection)
    model, batch = trained(cfg)
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, model, cfg, {"rte": LABELS})
    fresh = new_model(cfg, seed=2).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(batch), model(batch))  # a different init really differs
        checkpoint.load(path, fresh)
        assert torch.equal(fresh(batch), model(batch))


def test_folded_mlp_prefix_needs_no_mlp_and_folded_models_save(tmp_path):
    cfg = run_cfg("mlp")
    model, batch = trained(cfg)
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, model, cfg, {"rte": LABELS})
    assert checkpoint.FOLDED_KEY in load_file(str(path))
    folded = new_model(cfg, seed=2).eval()
    checkpoint.load(path, folded, use_folded=True)
    with torch.no_grad():
        expected = model(batch)
        torch.testing.assert_close(folded(batch), expected, atol=1e-6, rtol=0)
        # A folded model saves a checkpoint that loads (folded or not) to the same outputs.
        again = tmp_path / "again.safetensors"
        checkpoint.save(again, folded, cfg, {"rte": LABELS})
        for use_folded in (True, False):
            other = new_model(cfg, seed=3).eval()
            checkpoint.load(again, other, use_folded=use_folded)
            torch.testing.assert_close(other(batch), expected, atol=1e-6, rtol=0)
        for parameter in folded.prompt.projection.parameters():  # inference from the fold needs no MLP
            parameter.zero_()
        torch.testing.assert_close(folded(batch), expected, atol=1e-6, rtol=0)


def test_metadata_identifies_backbone_task_labels_prompt_and_version(tmp_path):
    cfg = run_cfg("none")
    model = new_model(cfg, seed=1)
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, model, cfg, {"rte": LABELS})
    metadata = checkpoint.read_metadata(tmp_path)  # a run directory works too
    assert metadata["ptv2_version"] == __version__
    assert metadata["backbone"] == "tiny/bert" and metadata["backbone_name"] == "tiny-bert"
    assert metadata["backbone_hash"] == checkpoint.backbone_hash(model.encoder.config)
    assert metadata["task"] == "rte" and metadata["method"] == "ptv2"
    assert json.loads(metadata["labels"]) == {"rte": LABELS}
    assert json.loads(metadata["config"])["prompt"]["length"] == 4
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {"prompt.embedding.weight", "heads.rte.linear.weight", "heads.rte.linear.bias"}


def test_load_refuses_other_backbone_and_other_prompt_shape(tmp_path):
    cfg = run_cfg("none")
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, new_model(cfg, seed=1), cfg, {"rte": LABELS})
    _, roberta = tiny_encoder("roberta")
    other_backbone = PromptModel(roberta, cfg.prompt, heads={"rte": (ClassificationHead, 2)}, head_dropout=0.1)
    with pytest.raises(UserError, match="was trained on backbone tiny/bert, which differs from the one loaded"):
        checkpoint.load(path, other_backbone)
    longer = run_cfg("none")
    longer.prompt.length = 6
    with pytest.raises(UserError, match=r"prompt.embedding.weight has shape \(4, 192\), the model expects \(6, 192\)"):
        checkpoint.load(path, new_model(longer, seed=1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    ptv2("train", *SMOKE, "logger=none", f"hydra.run.dir={run_dir}")
    return run_dir


def eval_error(*args: str) -> str:
    """stderr of a failing `ptv2 eval`, checked to be one line and exit code 2."""
    result = ptv2("eval", *args, f"task.data_dir={RTE}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_eval_errors_for_wrong_missing_and_corrupt_checkpoints(run_dir, tmp_path):
    # Another backbone: the same file with another backbone's config hash.
    tensors, metadata = load_file(str(run_dir / checkpoint.FILENAME)), checkpoint.read_metadata(run_dir)
    other = tmp_path / "other-backbone.safetensors"
    save_file(tensors, str(other), metadata={**metadata, "backbone": "roberta-large", "backbone_hash": "0" * 16})
    assert "was trained on backbone roberta-large, which differs from the one loaded" in eval_error(f"ckpt={other}")
    # Another task: a CB head in a checkpoint whose config builds an RTE model.
    cb = tmp_path / "cb.safetensors"
    renamed = {name.replace("heads.rte.", "heads.cb."): tensor for name, tensor in tensors.items()}
    save_file(renamed, str(cb), metadata={**metadata, "task": "cb"})
    message = eval_error(f"ckpt={cb}")
    assert "does not fit this model (unexpected tensors: heads.cb." in message and "holds task cb" in message
    # Another task group is refused before anything loads.
    message = eval_error(f"ckpt={run_dir}", "task=cb")
    assert "would change the task group of a trained checkpoint (trained with task=rte)" in message
    # Missing and corrupt files.
    assert f"no checkpoint at {tmp_path / 'nope'}: pass a" in eval_error(f"ckpt={tmp_path / 'nope'}")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((run_dir / checkpoint.FILENAME).read_bytes()[:100])
    assert "is not a readable safetensors checkpoint" in eval_error(f"ckpt={corrupt}")


def command_config(monkeypatch, command: str, *overrides: str):
    """The checkpoint config `ptv2 <command>` builds from these command-line overrides (Hydra's record of them
    stubbed, as inside a running job)."""
    monkeypatch.setattr(
        checkpoint.HydraConfig, "get", lambda: SimpleNamespace(overrides=SimpleNamespace(task=overrides))
    )
    return checkpoint.checkpoint_config(compose_config(*overrides, config_name=command))


def test_habitual_options_are_harmless_and_model_changes_refused(run_dir, tmp_path, monkeypatch):
    # A checkpoint trained with seed 3 and W&B on (the run_dir fixture's config, edited).
    tensors, metadata = load_file(str(run_dir / checkpoint.FILENAME)), checkpoint.read_metadata(run_dir)
    config = json.loads(metadata["config"])
    config["trainer"]["seed"], config["logger"]["name"] = 3, "wandb"
    seeded = tmp_path / "seeded.safetensors"
    save_file(tensors, str(seeded), metadata={**metadata, "config": json.dumps(config)})

    habits = ["logger=none", "trainer=default", "optimizer=adamw", "scheduler=constant", "task=rte", "backbone=tiny"]
    saved = command_config(monkeypatch, "predict", f"ckpt={seeded}", *habits, "trainer.eval_batch_size=5")
    assert saved.logger.name == "none" and saved.scheduler.name == "constant"
    assert saved.trainer.limit_eval is None and saved.trainer.eval_batch_size == 5  # trainer=default, then the key
    assert saved.trainer.seed == 3  # rebuilds a random-init backbone as in training
    assert (
        saved.task.name == "rte" and saved.backbone.name == "tiny" and saved.prompt.length == config["prompt"]["length"]
    )
    assert saved.task.data_dir is None  # paths are never taken from a checkpoint: the command gives its own

    for refused, trained in (
        ("backbone=minilm", "backbone=tiny"),
        ("prompt=finetune", "prompt=ptv2"),
        ("task=cb", "task=rte"),
    ):
        with pytest.raises(
            UserError, match=f"would change the .* group of a trained checkpoint \\(trained with {trained}\\)"
        ):
            command_config(monkeypatch, "eval", f"ckpt={seeded}", refused)
    with pytest.raises(UserError, match="would change the preset group"):
        command_config(monkeypatch, "eval", f"ckpt={seeded}", "preset=rte-roberta-large")
