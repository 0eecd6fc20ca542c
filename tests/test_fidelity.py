"""A preset is the official model: PromptModel built from a preset config computes what the official P-Tuning v2
code computed (prefix as past key/values with shifted positions, the backbone's pooler, official initialisation).

The official computation is written out here on a stock transformers model: its prefix embedding reshaped into
per-layer key/values and handed over as a key/value cache (which shifts token positions by P), the attention mask
widened by P ones, `pooled_output` -> dropout -> linear.
"""

from __future__ import annotations

import importlib.resources
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, compose_config, padded_batch
from transformers import AutoModel, BertConfig, DynamicCache, RobertaConfig, RobertaForMaskedLM

import ptv2.config
from ptv2.command_line import with_official_preset
from ptv2.engine import Member, head_spec
from ptv2.errors import UserError
from ptv2.modeling import backbone, injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel
from ptv2.tasks import task_type

PRESETS = {"bert": "rte-bert-large-cased", "roberta": "rte-roberta-large"}
TOKENIZER = SimpleNamespace(name_or_path="tiny")  # what head_spec reads of a tokenizer for linear/pooler heads


def save_tiny_checkpoint(family: str, folder) -> None:
    """A tiny pretrained-style checkpoint. RoBERTa's is saved from the masked-LM model, so, like the real
    roberta-large, it carries no pooler weights; BERT's carries a pooler."""
    torch.manual_seed(0)
    if family == "bert":
        AutoModel.from_config(BertConfig(**TINY, max_position_embeddings=256)).save_pretrained(folder)
    else:
        config = RobertaConfig(**TINY, pad_token_id=1, max_position_embeddings=260)
        RobertaForMaskedLM(config).save_pretrained(folder)


def preset_model(family: str, folder, seed: int = 11) -> tuple[PromptModel, object]:
    """PromptModel from the preset's config, built by the functions `ptv2 train` uses."""
    cfg = compose_config(f"preset={PRESETS[family]}", f"backbone.name_or_path={folder}")
    config = backbone.load_config(cfg.backbone)
    ptv2.checks.validate(cfg, config)
    torch.manual_seed(seed)
    encoder, parts = backbone.load_with_heads(cfg.backbone, config, {cfg.task.head})
    member = Member(cfg.task.name, cfg.task, task_type(cfg.task.type), {})
    heads = {member.name: head_spec(member, TOKENIZER, parts)}
    return PromptModel(encoder, cfg.prompt, heads, cfg.task.head_dropout), cfg


def official_logits(stock, input_ids, mask, prefix_embedding, pooler, linear):
    """The official sequence classifier's forward: prefix -> past key/values -> pooled output -> linear."""
    config = stock.config
    batch, prefix_length = input_ids.shape[0], prefix_embedding.shape[0]
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    past = prefix_embedding.unsqueeze(0).expand(batch, -1, -1)
    past = past.view(batch, prefix_length, config.num_hidden_layers * 2, heads, head_dim)
    past = past.permute(2, 0, 3, 1, 4).split(2)  # per layer: (2, B, heads, P, head_dim)
    cache = DynamicCache(config=config)
    for layer, key_value in enumerate(past):
        cache.update(key_value[0], key_value[1], layer)
    full_mask = torch.cat([torch.ones(batch, prefix_length, dtype=mask.dtype), mask], dim=1)
    hidden = stock(input_ids=input_ids, attention_mask=full_mask, cache=cache).last_hidden_state
    return linear(pooler(hidden))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_preset_model_equals_the_official_computation(family, tmp_path):
    save_tiny_checkpoint(family, tmp_path)
    model, cfg = preset_model(family, tmp_path)
    assert cfg.prompt.shift_positions and cfg.task.head == "pooler" and not cfg.trainer.group_by_length
    model.eval()
    stock = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    stock.config.is_decoder = False
    head = model.heads[cfg.task.name]
    stock.pooler.load_state_dict(head.pooler.state_dict())  # RoBERTa: the random pooler the preset model drew
    pad = stock.config.pad_token_id
    input_ids, mask = padded_batch(pad_id=pad, vocab_size=TINY["vocab_size"])
    batch = {"input_ids": input_ids, "attention_mask": mask}

    ours = model(batch)
    ours.sum().backward()
    prefix = model.prompt.embedding.weight.detach().clone().requires_grad_(True)
    official = official_logits(stock, input_ids, mask, prefix, stock.pooler, head.linear)
    official.sum().backward()

    assert (ours - official).abs().max().item() <= 1e-5
    assert (model.prompt.embedding.weight.grad - prefix.grad).abs().max().item() <= 1e-5
    # What trains is what the official model trained: prefix + classifier, not the pooler or the encoder.
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        "prompt.embedding.weight",
        f"heads.{cfg.task.name}.linear.weight",
        f"heads.{cfg.task.name}.linear.bias",
    }


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_preset_model_starts_as_the_official_model(family, tmp_path):
    save_tiny_checkpoint(family, tmp_path)
    model, cfg = preset_model(family, tmp_path)
    std = model.encoder.config.initializer_range
    prefix = model.prompt.embedding.weight  # P x (layers * 2 * hidden): thousands of draws
    assert abs(prefix.std().item() - std) < 0.1 * std and abs(prefix.mean().item()) < 0.1 * std
    head = model.heads[cfg.task.name]
    assert abs(head.linear.weight.std().item() - std) < 0.3 * std and torch.equal(
        head.linear.bias, torch.zeros_like(head.linear.bias)
    )
    pooler = head.pooler.dense
    if family == "bert":  # pretrained: exactly the checkpoint's weights
        saved = AutoModel.from_pretrained(tmp_path).pooler.dense.weight
        assert torch.equal(pooler.weight, saved)
    else:  # missing from the checkpoint: the backbone's own init, N(0, initializer_range), zero bias
        assert abs(pooler.weight.std().item() - std) < 0.1 * std and not pooler.bias.any()
    assert not any(p.requires_grad for p in head.pooler.parameters())


def test_prompt_init_std_overrides_the_prefix_std(tmp_path):
    save_tiny_checkpoint("bert", tmp_path)
    cfg = compose_config("preset=rte-bert-large-cased", f"backbone.name_or_path={tmp_path}", "prompt.init_std=1.0")
    encoder, parts = backbone.load_with_heads(cfg.backbone, backbone.load_config(cfg.backbone), {"pooler"})
    model = PromptModel(encoder, cfg.prompt, {"rte": (ClassificationHead, 2, parts.pooler)}, 0.1)
    assert 0.9 < model.prompt.embedding.weight.std().item() < 1.1


def test_pooler_head_is_saved_and_restored_with_the_prompt(tmp_path):
    """RoBERTa's pooler is random: a checkpoint must carry it, or evaluation would draw another one."""
    save_tiny_checkpoint("roberta", tmp_path)
    model, _ = preset_model("roberta", tmp_path, seed=1)
    other, _ = preset_model("roberta", tmp_path, seed=2)
    state = model.prompt_state_dict()
    assert any(".pooler." in name for name in state)
    other.load_state_dict(state, strict=False)
    model.eval(), other.eval()
    input_ids, mask = padded_batch(pad_id=1, vocab_size=TINY["vocab_size"])
    batch = {"input_ids": input_ids, "attention_mask": mask}
    assert torch.equal(model(batch), other(batch))


def test_pooler_head_needs_a_pooler_and_a_sentence_task(tmp_path):
    save_tiny_checkpoint("bert", tmp_path)
    cfg = compose_config("task=conll03", "backbone=tiny", "task.head=pooler")
    member = Member("conll03", cfg.task, task_type("tagging"), {})
    with pytest.raises(UserError, match="task.head=pooler works for task types"):
        head_spec(member, TOKENIZER, backbone.BackboneHeads(pooler=torch.nn.Identity()))
    rte = compose_config("task=rte", "backbone=tiny", "task.head=pooler").task
    with pytest.raises(UserError, match="has no pooler"):
        head_spec(Member("rte", rte, task_type("classification"), {}), TOKENIZER, backbone.BackboneHeads())


@pytest.mark.parametrize(
    "args, preset",
    [
        (["task=rte", "backbone=roberta-large"], "rte-roberta-large"),
        ([], "rte-roberta-large"),  # the defaults are RTE on roberta-large
        (["task=boolq", "backbone=bert-large-cased", "prompt.length=4"], "boolq-bert-large-cased"),
        (["task=rte", "backbone=minilm"], None),  # no preset for this pair
        (["task=rte", "backbone=roberta-large", "prompt=finetune"], None),  # another method
        (["task=rte", "backbone=roberta-large", "preset=none"], None),
        (["task=rte,boolq", "backbone=roberta-large"], None),  # a sweep over tasks
        (["preset=wic-roberta-large"], None),  # explicit: left as it is
    ],
)
def test_official_preset_applies_by_itself(args, preset):
    out, name = with_official_preset(args)
    assert name == preset
    assert "preset=none" not in out
    assert out == ([*args, f"preset={preset}"] if preset else [a for a in args if a != "preset=none"])


def test_every_preset_is_the_official_model():
    """Positions shifted, random batches, the official head, head dropout = the run's dropout, official init."""
    for path in sorted(importlib.resources.files("ptv2.conf").joinpath("preset").iterdir()):
        cfg = compose_config(f"preset={path.name.removesuffix('.yaml')}")
        assert cfg.prompt.shift_positions and not cfg.trainer.group_by_length, path.name
        assert cfg.prompt.init_std is None and cfg.task.head_dropout == cfg.prompt.dropout == cfg.backbone.dropout
        sentence = cfg.task.type in ("classification", "multiple_choice")
        assert cfg.task.head == ("pooler" if sentence else "linear"), path.name
        used = injection.positions_used(_official_config(cfg.backbone.name), cfg.task.max_length, cfg.prompt.length)
        assert used <= _official_config(cfg.backbone.name).max_position_embeddings, path.name


def _official_config(name: str):
    """Position tables of the preset backbones (their hub configs, which the test cannot download)."""
    if name.startswith("roberta"):
        return RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    return BertConfig(max_position_embeddings=512)


def test_masked_lm_checkpoint_has_no_pooler_weights(tmp_path):
    """The premise of the RoBERTa case above: a masked-LM checkpoint, like roberta-large's, lacks the pooler."""
    save_tiny_checkpoint("roberta", tmp_path)
    from safetensors.torch import load_file

    assert not any("pooler" in key for key in load_file(str(tmp_path / "model.safetensors")))
