"""Deep prompts are exact: against a hand-written attention reference, against the stock model, and under
padding, freezing, layer subsets, gradient checkpointing and half-precision backbones — for every family."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILY_CONFIGS, assert_only_prompt_and_head_get_gradients, padded_batch, tiny_encoder
from omegaconf import OmegaConf
from transformers import DynamicCache

from ptv2.modeling import injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel

FAMILIES = list(FAMILY_CONFIGS)
PREFIX_LENGTH = 4


def random_prefix(encoder, layers=None, seed: int = 2, dtype=torch.float32) -> injection.Prefix:
    num_layers, heads, head_dim = injection.encoder_shape(encoder.config)
    generator = torch.Generator().manual_seed(seed)
    return {
        layer: tuple(torch.randn(1, heads, PREFIX_LENGTH, head_dim, generator=generator, dtype=dtype) for _ in "kv")
        for layer in (range(num_layers) if layers is None else layers)
    }


def pad_for(family: str) -> int:
    return 1 if family == "roberta" else 0


def reference_attention(query, key, value, key_mask):
    """Plain softmax attention, one example and head at a time, in float64. query (L, D), key/value (K, D)."""
    scores = (query.double() @ key.double().T) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ value.double()


def reference_bert_family(encoder, input_ids, mask, prefix) -> torch.Tensor:
    """BERT/RoBERTa/ELECTRA encoder written out by hand, attending over [prefix; tokens] at prefixed layers."""
    hidden = encoder.embeddings(input_ids=input_ids)
    batch, length, _ = hidden.shape
    for index, layer in enumerate(encoder.encoder.layer):
        attention = layer.attention.self
        heads, head_dim = attention.num_attention_heads, attention.attention_head_size
        query, key, value = (
            projection(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
            for projection in (attention.query, attention.key, attention.value)
        )
        context = torch.zeros(batch, heads, length, head_dim, dtype=torch.float64)
        for b in range(batch):
            key_mask = mask[b].bool()
            for h in range(heads):
                k, v = key[b, h], value[b, h]
                if index in prefix:
                    k = torch.cat([prefix[index][0][0, h], k])
                    v = torch.cat([prefix[index][1][0, h], v])
                    full_mask = torch.cat([torch.ones(PREFIX_LENGTH, dtype=torch.bool), key_mask])
                else:
                    full_mask = key_mask
                context[b, h] = reference_attention(query[b, h], k, v, full_mask)
        context = context.transpose(1, 2).reshape(batch, length, heads * head_dim).to(hidden.dtype)
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return hidden


def reference_deberta(encoder, input_ids, mask, prefix) -> torch.Tensor:
    """DeBERTa-v2 with stock relative-position bias on token columns and zero bias on prefix columns."""
    hidden = encoder.embeddings(input_ids=input_ids, mask=mask)
    layers = encoder.encoder
    relative_pos = layers.get_rel_pos(hidden)
    rel_embeddings = layers.get_rel_embedding()
    batch, length, _ = hidden.shape
    for index, layer in enumerate(layers.layer):
        attention = layer.attention.self
        heads = attention.num_attention_heads
        query = attention.transpose_for_scores(attention.query_proj(hidden), heads)
        key = attention.transpose_for_scores(attention.key_proj(hidden), heads)
        value = attention.transpose_for_scores(attention.value_proj(hidden), heads)
        bias = attention.disentangled_attention_bias(query, key, relative_pos, rel_embeddings, 3)
        head_dim = query.shape[-1]
        context = torch.zeros(batch, heads, length, head_dim, dtype=torch.float64)
        for b in range(batch):
            for h in range(heads):
                row = b * heads + h
                scores = query[row].double() @ key[row].double().T / math.sqrt(head_dim * 3) + bias[row].double()
                keys_mask = mask[b].bool()
                values = value[row].double()
                if index in prefix:
                    prefix_scores = query[row].double() @ prefix[index][0][0, h].double().T / math.sqrt(head_dim * 3)
                    scores = torch.cat([prefix_scores, scores], dim=1)
                    keys_mask = torch.cat([torch.ones(PREFIX_LENGTH, dtype=torch.bool), keys_mask])
                    values = torch.cat([prefix[index][1][0, h].double(), values])
                scores = scores.masked_fill(~keys_mask, float("-inf"))
                context[b, h] = torch.softmax(scores, dim=-1) @ values
        context = context.permute(0, 2, 1, 3).reshape(batch, length, -1).to(hidden.dtype)
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return hidden


def reference(family, encoder, input_ids, mask, prefix):
    with torch.no_grad():
        if family == "deberta-v2":
            return reference_deberta(encoder, input_ids, mask, prefix)
        return reference_bert_family(encoder, input_ids, mask, prefix)


def valid(hidden, mask):
    """Hidden states of real (non-padding) tokens only: padded rows are never read by heads."""
    return hidden[mask.bool()]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_matches_hand_written_reference(family):
    _, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    prefix = random_prefix(encoder)
    with torch.no_grad():
        ours = injection.run_encoder(encoder, prefix, input_ids=input_ids, attention_mask=mask)
    expected = reference(family, encoder, input_ids, mask, prefix)
    difference = (valid(ours, mask) - valid(expected, mask)).abs().max().item()
    assert difference <= 1e-5, f"{family}: max difference {difference}"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_on_a_layer_subset_matches_reference(family):
    _, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    prefix = random_prefix(encoder, layers=[2])
    with torch.no_grad():
        ours = injection.run_encoder(encoder, prefix, input_ids=input_ids, attention_mask=mask)
    expected = reference(family, encoder, input_ids, mask, prefix)
    assert (valid(ours, mask) - valid(expected, mask)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_no_prefix_is_bit_identical_to_stock(family):
    stock, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=mask).last_hidden_state
        assert torch.equal(injection.run_encoder(encoder, None, input_ids=input_ids, attention_mask=mask), expected)
        assert torch.equal(injection.run_encoder(encoder, {}, input_ids=input_ids, attention_mask=mask), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_respected(family):
    """An example's outputs do not depend on how much padding its batch adds."""
    _, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(lengths=(9, 5), pad_id=pad_for(family))
    prefix = random_prefix(encoder)
    with torch.no_grad():
        batched = injection.run_encoder(encoder, prefix, input_ids=input_ids, attention_mask=mask)
        alone = injection.run_encoder(encoder, prefix, input_ids=input_ids[1:, :5], attention_mask=mask[1:, :5])
    assert (batched[1, :5] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_below_the_first_prompted_layer_are_untouched(family):
    stock, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    prefix = random_prefix(encoder, layers=[1, 2])
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if family == "deberta-v2":
            encoder.prefix_slot.prefix, kwargs = prefix, {}
        else:
            kwargs = {"prefix_key_values": prefix}
        ours = encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **kwargs).hidden_states
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])  # embeddings, layer 0
    assert not torch.allclose(valid(ours[2], mask), valid(expected[2], mask))  # layer 1 has a prompt


def prompt_cfg(**overrides):
    base = dict(
        method="ptv2",
        length=PREFIX_LENGTH,
        projection="none",
        projection_dim=16,
        dropout=0.0,
        layers="all",
        shift_positions=False,
        encoder="lstm",
    )
    return OmegaConf.create({**base, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_only_prompt_and_head_get_gradients(family):
    _, encoder = tiny_encoder(family)
    model = PromptModel(encoder, prompt_cfg(layers="top:2"), {"t": (ClassificationHead, 3)}, head_dropout=0.0)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    logits = model({"input_ids": input_ids, "attention_mask": mask})
    model.head_for(None).loss(logits, {"labels": torch.tensor([0, 1, 2])}).backward()
    assert_only_prompt_and_head_get_gradients(model)
    assert model.prompt.layers == [1, 2]
    assert model.prompt.embedding.weight.shape == (PREFIX_LENGTH, 2 * 2 * 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_logits_match_reference_head_on_cls(family):
    _, encoder = tiny_encoder(family)
    model = PromptModel(encoder, prompt_cfg(projection="mlp"), {"t": (ClassificationHead, 2)}, head_dropout=0.0).eval()
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    with torch.no_grad():
        logits = model({"input_ids": input_ids, "attention_mask": mask})
        prefix = {layer: (k[:1], v[:1]) for layer, (k, v) in model.prompt(1).items()}
        expected = model.heads["t"].linear(reference(family, encoder, input_ids, mask, prefix)[:, 0])
    assert (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_shifted_positions_equal_the_official_cache_path(family):
    """shift_positions=true reproduces the official implementation (prefix as past key/values in a cache)."""
    stock, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    prefix = random_prefix(encoder)
    position_ids = injection.shifted_position_ids(encoder.config, mask, PREFIX_LENGTH)
    with torch.no_grad():
        ours = injection.run_encoder(
            encoder, prefix, input_ids=input_ids, attention_mask=mask, position_ids=position_ids
        )
        cache = DynamicCache(config=stock.config)
        for layer, (key, value) in prefix.items():
            cache.update(key.expand(3, -1, -1, -1), value.expand(3, -1, -1, -1), layer)
        stock.config.is_decoder = False
        full_mask = torch.cat([torch.ones(3, PREFIX_LENGTH, dtype=torch.long), mask], dim=1)
        official = stock(input_ids=input_ids, attention_mask=full_mask, cache=cache).last_hidden_state
    assert (valid(ours, mask) - valid(official, mask)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_gradient_checkpointing_keeps_the_prefix(family):
    _, encoder = tiny_encoder(family)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    model = PromptModel(encoder, prompt_cfg(), {"t": (ClassificationHead, 2)}, head_dropout=0.0).train()
    for module in model.modules():  # deterministic training-mode forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = {"input_ids": input_ids, "attention_mask": mask}
    plain = model(batch)
    model.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = model(batch)
    assert (plain - checkpointed).abs().max().item() <= 1e-6
    checkpointed.sum().backward()
    assert model.prompt.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone_with_fp32_prompt(family, dtype):
    _, reference_encoder = tiny_encoder(family)
    _, encoder = tiny_encoder(family, dtype=dtype)
    input_ids, mask = padded_batch(pad_id=pad_for(family))
    model = PromptModel(encoder, prompt_cfg(), {"t": (ClassificationHead, 2)}, head_dropout=0.0)
    model.heads.float()
    assert model.prompt.embedding.weight.dtype == torch.float32
    hidden = injection.run_encoder(encoder, model.prompt(3), input_ids=input_ids, attention_mask=mask)
    assert hidden.dtype == dtype
    readout = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    (hidden.float() * readout).sum().backward()
    gradient = model.prompt.embedding.weight.grad
    assert gradient.dtype == torch.float32 and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    with torch.no_grad():
        full = injection.run_encoder(reference_encoder, model.prompt(3), input_ids=input_ids, attention_mask=mask)
    assert (valid(hidden.float(), mask) - valid(full, mask)).abs().max().item() < 0.1
