"""Prefix-propagation (prompt.method=prefix_propagation): the module driving a real encoder against a forward written
out here layer by layer (embeddings of the zero-prepended sequence, then each layer with prefix[i] added to the P
prefix positions first), values and the prefix's gradients; half of P-Tuning v2's parameters; padding; refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, padded_batch, tiny_encoder
from transformers import AutoModel, ElectraConfig

from ptv2.errors import UserError
from ptv2.modeling import injection
from ptv2.modeling.methods.prefix_propagation.module import PrefixPropagation
from ptv2.modeling.prompts import PrefixEncoder, official_init_

LENGTH = 3


def built(encoder, projection: str = "none", seed: int = 5) -> PrefixPropagation:
    """The module for `encoder`, attached, its parameters drawn large enough to move a random tiny encoder."""
    config = encoder.config
    torch.manual_seed(seed)
    prompt = PrefixPropagation(
        config.num_hidden_layers, config.hidden_size, LENGTH, dropout=0.0, projection=projection, projection_dim=8
    )
    official_init_(prompt, std=0.5)
    prompt.attach(encoder)
    return prompt.eval()


def through_module(prompt, encoder, input_ids, mask, types=None) -> torch.Tensor:
    """What PromptModel does with a prompt that extends the inputs: extend, run the encoder, strip."""
    inputs = {"attention_mask": mask} if types is None else {"attention_mask": mask, "token_type_ids": types}
    inputs.update(prompt.extend_inputs(encoder, input_ids, inputs))
    return prompt.strip(injection.run_encoder(encoder, None, **inputs))


def additions_by_hand(prompt, projection: str) -> list[torch.Tensor]:
    """prefix[i] (P, hidden) for each layer, from the module's parameters written out."""
    weight = prompt.embedding.weight
    if projection == "mlp":
        first, _, second = prompt.projection
        weight = torch.tanh(weight @ first.weight.T + first.bias) @ second.weight.T + second.bias
    layers, hidden = prompt.num_layers, prompt.hidden_size
    return [weight.view(LENGTH, layers, hidden)[:, i] for i in range(layers)]


def reference(stock, additions, input_ids, mask, types=None) -> torch.Tensor:
    """The method written out on the stock (eager) encoder: the zero-prepended sequence through the embeddings, then
    each layer with prefix[i] added to the first P positions, the prefix attending and attended like tokens."""
    config = stock.config
    batch, length = input_ids.shape
    words = stock.embeddings.word_embeddings(input_ids)
    embeds = torch.cat([torch.zeros(batch, LENGTH, words.shape[-1]), words], dim=1)
    full_mask = torch.cat([torch.ones(batch, LENGTH, dtype=mask.dtype), mask], dim=1)
    if config.model_type == "roberta":  # positions from padding_idx + 1; the prefix takes the first P of them
        pad = config.pad_token_id
        positions = torch.cumsum(full_mask, dim=1) * full_mask + pad
    else:
        positions = torch.arange(LENGTH + length).expand(batch, -1)
    types = torch.zeros_like(input_ids) if types is None else types
    types = torch.cat([torch.zeros(batch, LENGTH, dtype=types.dtype), types], dim=1)
    hidden = stock.embeddings(inputs_embeds=embeds, token_type_ids=types, position_ids=positions)
    if hasattr(stock, "embeddings_project"):
        hidden = stock.embeddings_project(hidden)
    additive = (1.0 - full_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for index, layer in enumerate(stock.encoder.layer):
        hidden = torch.cat([hidden[:, :LENGTH] + additions[index], hidden[:, LENGTH:]], dim=1)
        hidden = layer(hidden, additive)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden[:, LENGTH:]


def eager(stock):
    stock.set_attn_implementation("eager")
    return stock


def encoders(family: str):
    """(stock eager encoder, prompt-ready encoder) with the same weights; "electra-projected": ELECTRA whose
    embeddings (width 16) are projected to the layers' width (32), as ELECTRA-small's are."""
    if family != "electra-projected":
        stock, encoder = tiny_encoder(family)
        return eager(stock), encoder
    config = ElectraConfig(**TINY, embedding_size=16)
    torch.manual_seed(0)
    stock = AutoModel.from_config(config, attn_implementation="eager").eval()
    encoder = AutoModel.from_config(config, attn_implementation=injection.ATTENTION_KEY).eval()
    encoder.load_state_dict(stock.state_dict())
    injection.prepare_encoder(encoder)
    return stock, encoder


@pytest.mark.parametrize("projection", ["none", "mlp"])
@pytest.mark.parametrize("family", ["bert", "roberta", "electra-projected"])
def test_the_module_on_the_encoder_equals_the_forward_written_out(family, projection):
    stock, encoder = encoders(family)
    prompt = built(encoder, projection)
    input_ids, mask = padded_batch(pad_id=encoder.config.pad_token_id)
    types = (torch.arange(input_ids.shape[1]) >= 3).long().expand_as(input_ids) * mask
    types = types if encoder.config.type_vocab_size > 1 else None

    got = through_module(prompt, encoder, input_ids, mask, types)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    (got * weights * mask[..., None]).sum().backward()
    got_grads = {name: p.grad.clone() for name, p in prompt.named_parameters()}
    prompt.zero_grad()

    expected = reference(stock, additions_by_hand(prompt, projection), input_ids, mask, types)
    (expected * weights * mask[..., None]).sum().backward()

    assert got.shape == input_ids.shape + (encoder.config.hidden_size,)  # strip: the original length
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-6
    # the prefix moves the tokens: a test that would pass with no prefix at all proves nothing
    plain = injection.run_encoder(encoder, None, input_ids=input_ids, attention_mask=mask)
    assert (got - plain)[real].abs().max().item() > 1e-2
    for name, parameter in prompt.named_parameters():
        assert got_grads[name].abs().max() > 0, name
        assert torch.allclose(got_grads[name], parameter.grad, atol=1e-6, rtol=1e-5), name


def test_every_layer_adds_its_own_prefix_the_first_included():
    """The written-out reference with layer i's prefix dropped differs: each layer's addition, layer 0's included,
    reaches the output (a module that skipped one would still match a reference that skipped it)."""
    stock, encoder = tiny_encoder("bert")
    stock = eager(stock)
    prompt = built(encoder)
    input_ids, mask = padded_batch(pad_id=0)
    with torch.no_grad():
        got = through_module(prompt, encoder, input_ids, mask)
        additions = additions_by_hand(prompt, "none")
        for layer in range(prompt.num_layers):
            dropped = [torch.zeros_like(a) if i == layer else a for i, a in enumerate(additions)]
            gap = (reference(stock, dropped, input_ids, mask) - got)[mask.bool()].abs().max().item()
            assert gap > 1e-3, layer


def test_perturb_moves_the_tokens_word_embeddings_only():
    _, encoder = tiny_encoder("bert")
    prompt = built(encoder)
    input_ids, mask = padded_batch(pad_id=0)
    perturb = torch.randn(*input_ids.shape, encoder.config.hidden_size)
    inputs = prompt.extend_inputs(encoder, input_ids, {"attention_mask": mask}, perturb)
    words = encoder.get_input_embeddings()(input_ids)
    assert torch.equal(inputs["inputs_embeds"][:, LENGTH:], words + perturb)
    assert not inputs["inputs_embeds"][:, :LENGTH].any()


def test_padding_changes_no_real_token():
    """A row padded to a longer batch gives its real tokens the outputs it gives alone."""
    _, encoder = tiny_encoder("bert")
    prompt = built(encoder)
    input_ids, mask = padded_batch(lengths=(9, 4), pad_id=0)
    with torch.no_grad():
        batched = through_module(prompt, encoder, input_ids, mask)
        alone = through_module(prompt, encoder, input_ids[1:, :4], mask[1:, :4])
    assert (batched[1, :4] - alone[0]).abs().max().item() <= 1e-6


def test_half_the_parameters_of_ptv2_at_the_same_length():
    layers, heads, head_dim = 3, 4, 8
    hidden = heads * head_dim
    propagation = PrefixPropagation(layers, hidden, length=16)
    deep = PrefixEncoder(list(range(layers)), heads, head_dim, hidden, length=16)
    count = sum(p.numel() for p in propagation.parameters())
    assert count == 16 * layers * hidden
    assert 2 * count == sum(p.numel() for p in deep.parameters())


def test_prefix_dropout_acts_per_example_and_only_in_training():
    prompt = PrefixPropagation(2, 8, length=4, dropout=0.5)
    prompt.train()
    first, _ = prompt(batch_size=2)
    assert not torch.equal(first[0], first[1])
    prompt.eval()
    first, _ = prompt(batch_size=2)
    assert torch.equal(first[0], prompt.embedding.weight.view(4, 2, 8)[:, 0])


def test_gradient_checkpointing_gives_the_same_gradients():
    _, encoder = tiny_encoder("bert")
    prompt = built(encoder)
    input_ids, mask = padded_batch(pad_id=0)
    grads = []
    for checkpointing in (False, True):
        encoder.gradient_checkpointing_enable({"use_reentrant": False}) if checkpointing else None
        encoder.train()  # checkpointing acts in training only; the tiny encoder's dropout is zeroed below
        for dropout in (m for m in encoder.modules() if isinstance(m, torch.nn.Dropout)):
            dropout.p = 0.0
        prompt.zero_grad()
        through_module(prompt, encoder, input_ids, mask).pow(2).sum().backward()
        grads.append(prompt.embedding.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_plain_forward_after_a_prompted_one_is_the_stock_encoder():
    """The additions travel with the call: a forward without them runs the stock encoder."""
    stock, encoder = tiny_encoder("bert")
    prompt = built(encoder)
    input_ids, mask = padded_batch(pad_id=0)
    with torch.no_grad():
        through_module(prompt, encoder, input_ids, mask)
        plain = injection.run_encoder(encoder, None, input_ids=input_ids, attention_mask=mask)
        expected = stock(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert (plain - expected)[mask.bool()].abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", ["deberta-v2", "gpt2"])
def test_relative_position_and_causal_backbones_are_refused(family):
    if family == "gpt2":
        from transformers import GPT2Config, GPT2Model

        encoder = GPT2Model(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    else:
        _, encoder = tiny_encoder(family)
    config = encoder.config
    prompt = PrefixPropagation(config.num_hidden_layers, config.hidden_size, LENGTH)
    with pytest.raises(UserError, match="prompt.method=ptv2"):
        prompt.attach(encoder)


def test_too_many_positions_are_refused():
    _, encoder = tiny_encoder("roberta")  # 64 positions, numbered from padding_idx + 1 = 2
    prompt = built(encoder)
    input_ids, mask = padded_batch(lengths=(62 - LENGTH + 1,), pad_id=1)
    with pytest.raises(UserError, match="prompt.length=3"):
        through_module(prompt, encoder, input_ids, mask)
    through_module(prompt, encoder, input_ids[:, :-1], mask[:, :-1])


def test_prompt_model_trains_only_the_prefix_and_the_head():
    from conftest import assert_only_prompt_and_head_get_gradients
    from omegaconf import OmegaConf

    from ptv2.modeling.heads import ClassificationHead
    from ptv2.modeling.methods import METHODS
    from ptv2.modeling.model import PromptModel

    _, encoder = tiny_encoder("bert")
    settings = OmegaConf.structured(METHODS["prefix_propagation"].settings(length=LENGTH))
    model = PromptModel(encoder, settings, {"t": (ClassificationHead, 3)}, head_dropout=0.0).train()
    assert isinstance(model.prompt, PrefixPropagation) and model.lowest_layer == 0
    input_ids, mask = padded_batch(pad_id=0)
    model({"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}, loss=True).backward()
    assert_only_prompt_and_head_get_gradients(model)
    assert sum(p.numel() for p in model.prompt.parameters()) == LENGTH * 3 * 32


@pytest.mark.realdata
def test_the_packaged_minilm_equals_the_forward_written_out(minilm_path):
    """The same comparison on real weights (all-MiniLM-L6-v2, a BERT): trained LayerNorms and attention, not a tiny
    random encoder's."""
    stock = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    encoder = AutoModel.from_pretrained(minilm_path, attn_implementation=injection.ATTENTION_KEY).eval()
    injection.prepare_encoder(encoder)
    prompt = built(encoder)
    input_ids, mask = padded_batch(lengths=(12, 7), pad_id=0, vocab_size=5000)
    with torch.no_grad():
        got = through_module(prompt, encoder, input_ids, mask)
        expected = reference(stock, additions_by_hand(prompt, "none"), input_ids, mask)
        plain = injection.run_encoder(encoder, None, input_ids=input_ids, attention_mask=mask)
    # SDPA against eager attention on 384-wide layers: about 2e-6 apart in float32
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-5
    assert (got - plain)[mask.bool()].abs().max().item() > 1e-2
