"""Per-layer prefix key/values for any supported encoder: the one module that touches transformers internals.

Deep prompts (P-Tuning v2) prepend P learned key/value vectors to the attention of chosen layers. Two mechanisms,
picked per model family in `FAMILIES`:

- "attention_interface" (BERT, RoBERTa, XLM-R, ELECTRA, ...): a registered attention function prepends the layer's
  prefix to its keys/values, pads the boolean mask with "attend" columns and delegates to the stock SDPA integration.
  The prefix travels as the forward kwarg `prefix_key_values`, so it survives gradient checkpointing and touches
  neither position ids nor any cache. The stock SDPA mask builder is registered under the same key, otherwise
  transformers would silently skip padding masks for an unknown implementation.
  Decoders (GPT-2, Llama, Mistral, Qwen2/3, Gemma, GLM/GLM-4) take the same path: their attention modules call the
  registered function after rotary embeddings and the cache update, so the prefix is never rotated, never enters
  the cache, and every query sees every prefix column (a causal mask gets P always-open columns in front).
- "deberta" (DeBERTa-v2/v3, which has neither a cache nor the attention interface): each self-attention module gets
  a per-instance forward that scores queries against [prefix; keys], gives prefix columns zero relative-position
  bias (as the official P-Tuning v2 code does), and reads the prefix from a slot set just before the encoder runs.

With no prefix for a layer, both paths run the stock computation unchanged.

A prefix is `dict[layer_index, (key, value)]`, each of shape (batch or 1, heads, P, head_dim); P may differ by
layer. Serving several prompts in one batch adds a third element, a boolean (batch, P) mask of the prefix columns
each example may attend to (shorter prompts are zero-padded and their padded columns hidden: they get exactly zero
attention weight), or None. A fourth element, a `Gate`, makes the prefix depend on the layer's input (adaptive
prefixes, APT): gate(hidden (B, L, hidden), token_mask (B, L) bool | None) -> weights (B, P), and the layer attends
over [w * prefix_key; keys] and [w * prefix_value; values]. The gate is applied by a forward pre-hook on each
attention module (the only place the layer's input hidden states and its mask are both at hand); without a gate the
hook does nothing.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ptv2.errors import UserError
from ptv2.modeling.generation import decoder_inputs

ATTENTION_KEY = "ptv2_prefix_sdpa"
# backbone.attention=eager: the same prefix handling with the attention written out (matmul, softmax, dropout,
# matmul) as the official implementation's eager BERT attention ran it; for official-style speed comparisons.
EAGER_ATTENTION_KEY = "ptv2_prefix_eager"

Prefix = dict[int, tuple[torch.Tensor, torch.Tensor]]
# (layer input (B, L, hidden), real-token mask (B, L) bool or None when every token is real) -> weights (B, P)
Gate = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """How a model family takes prefixes and numbers its positions."""

    injection: str  # "attention_interface" | "deberta"
    # "absolute" (0..L-1) | "padding_offset" (RoBERTa: padding_idx + 1 + i) | "relative" | "rotary" (applied to
    # tokens inside attention; any length the config's rope allows)
    positions: str
    causal: bool = False  # a decoder: heads read the last real token, token positions are counted from the mask
    # prompt.method=lora's default prompt.target_modules: the attention projections LoRA adapts (module name
    # suffixes). Encoders: query and value, as in the LoRA paper; decoders: q, k, v and o, the common choice there.
    lora_targets: tuple[str, ...] = ("query", "value")


DECODER_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")
FAMILIES = {
    "bert": Family("attention_interface", "absolute"),
    "electra": Family("attention_interface", "absolute"),
    "roberta": Family("attention_interface", "padding_offset"),
    "xlm-roberta": Family("attention_interface", "padding_offset"),
    "camembert": Family("attention_interface", "padding_offset"),
    "deberta-v2": Family("deberta", "relative", lora_targets=("query_proj", "value_proj")),
    # Decoders: the attention-interface path; GPT-2 has learned absolute positions, the others rotary ones.
    # GPT-2 projects q, k, v with one fused layer (attn.c_attn); "attn." keeps the MLP's c_proj out.
    "gpt2": Family("attention_interface", "absolute", causal=True, lora_targets=("attn.c_attn", "attn.c_proj")),
    "llama": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
    "mistral": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
    "qwen2": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
    "qwen3": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
    "gemma": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
    "glm": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
    "glm4": Family("attention_interface", "rotary", causal=True, lora_targets=DECODER_LORA),
}


def family_of(config: PretrainedConfig) -> Family:
    if config.model_type not in FAMILIES:
        raise UserError(
            f"backbone model type '{config.model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[config.model_type]


def _expand_to_batch(tensor: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).expand(batch_size, -1, -1, -1)


def _prefix_sdpa_attention(
    module, query, key, value, attention_mask, prefix_key_values: Prefix | None = None, eager: bool = False, **kw
):
    """Stock SDPA attention over [prefix; keys] for layers that have a prefix; the same math written out when
    `eager` (backbone.attention=eager) and for prefixed layers training with dropout on the CPU (see
    _written_out_attention). Without a prefix and not eager: the stock SDPA call, unchanged."""
    layer_prefix = prefix_key_values.get(module.layer_idx) if prefix_key_values else None
    if layer_prefix is not None:
        prefix_key, prefix_value, *rest = layer_prefix
        prefix_mask = [rest[0]] if rest and rest[0] is not None else []
        batch_size, prefix_length = key.shape[0], prefix_key.shape[2]
        key_length = key.shape[2]
        if attention_mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
            # SDPA's is_causal aligns the diagonal top-left (and transformers then crops the keys to the queries):
            # with prefix columns in front the causal pattern has to be written out.
            attention_mask = _causal_mask(query.shape[2], key_length, query.device)
        key = torch.cat([_expand_to_batch(prefix_key, batch_size, key.dtype), key], dim=2)
        value = torch.cat([_expand_to_batch(prefix_value, batch_size, value.dtype), value], dim=2)
        if prefix_mask:  # per-example prompts (serving): hide each example's padded prefix columns
            attention_mask = _with_prefix_mask(attention_mask, prefix_mask[0], query.shape[2], key_length)
        elif attention_mask is not None:  # None means "no padding in this batch": nothing to extend
            # Every query may attend to every prefix column: True for boolean masks, 0 for additive ones.
            visible = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
            columns = visible(
                *attention_mask.shape[:-1], prefix_length, dtype=attention_mask.dtype, device=attention_mask.device
            )
            attention_mask = torch.cat([columns, attention_mask], dim=-1)
        if kw.get("dropout", 0.0) > 0 and query.device.type == "cpu" and not prefix_mask:
            eager = True
    if eager:
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return _written_out_attention(query, key, value, attention_mask, kw.get("dropout", 0.0), kw.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def _gated(layer_prefix: tuple, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> tuple:
    """A layer's prefix entry with its gate applied: (key * w, value * w[, visible]) with w = gate(hidden, mask)
    (B, P); an entry without a gate comes back as it is."""
    if len(layer_prefix) < 4 or layer_prefix[3] is None:
        return layer_prefix
    key, value, visible, gate = layer_prefix
    weights = gate(hidden_states, token_mask)[:, None, :, None]  # (B, 1, P, 1): one weight per prefix column
    gated = (key * weights.to(key.dtype), value * weights.to(value.dtype))
    return gated if visible is None else (*gated, visible)


def _real_tokens(attention_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """The (B, L) real-token mask inside a mask the attention interface receives: its last query row, which a
    bidirectional mask gives every real key and a causal one every real key up to the last position (all of them);
    additive masks hold 0 where visible. None: no padding anywhere in the batch."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :]
    row = row if row.dtype == torch.bool else row == 0
    return row.expand(batch_size, -1)


def _gate_hook(module, args, kwargs):
    """Forward pre-hook of an attention module: if this layer's prefix carries a gate, hand the module a prefix whose
    entry for this layer is already weighted by the gate on this call's input hidden states (the layer's input:
    post-LN families' previous layer output, pre-LN ones' normed copy of it). Other layers' entries are untouched."""
    prefix = kwargs.get("prefix_key_values")
    entry = prefix.get(module.layer_idx) if prefix else None
    if entry is None or len(entry) < 4 or entry[3] is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = _real_tokens(kwargs.get("attention_mask"), hidden.shape[0])
    return args, {**kwargs, "prefix_key_values": {**prefix, module.layer_idx: _gated(entry, hidden, mask)}}


def _prefix_eager_attention(module, query, key, value, attention_mask, **kw):
    return _prefix_sdpa_attention(module, query, key, value, attention_mask, eager=True, **kw)


def _written_out_attention(query, key, value, attention_mask, dropout: float, scaling: float | None):
    """Attention as SDPA's math kernel computes it, minus two costs; used for training with a prefix on the CPU.

    With dropout on, CPU SDPA always falls back to its math kernel, which scales queries and keys separately and
    guards against fully masked rows (isneginf + all + where over the whole score tensor). Prefix columns are
    visible to every query, so no row is ever fully masked: scaling the queries once and a plain softmax give the
    same result for three fewer passes over the (B, H, L, P + L) scores per layer (and a row that is fully masked
    anyway gets uniform weights instead of zeros). Returns (B, L, H, D), None.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _causal_mask(queries: int, keys: int, device) -> torch.Tensor:
    """(1, 1, queries, keys) boolean causal mask for the last `queries` of `keys` positions (a cache holds the rest)."""
    rows = torch.arange(keys - queries, keys, device=device)[:, None]
    return (torch.arange(keys, device=device)[None, :] <= rows)[None, None]


def _with_prefix_mask(attention_mask, prefix_mask: torch.Tensor, queries: int, keys: int) -> torch.Tensor:
    """The attention mask (B, 1, queries, P + keys) with prefix columns visible where prefix_mask (B, P) is True."""
    batch_size = prefix_mask.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, 1, queries, keys, dtype=torch.bool, device=prefix_mask.device)
    attention_mask = attention_mask.expand(batch_size, *attention_mask.shape[1:])
    columns = prefix_mask[:, None, None, :].expand(*attention_mask.shape[:-1], prefix_mask.shape[1])
    if attention_mask.dtype != torch.bool:  # additive mask: 0 where visible, the dtype's minimum where hidden
        hidden = torch.finfo(attention_mask.dtype).min
        columns = torch.zeros(columns.shape, dtype=attention_mask.dtype, device=columns.device).masked_fill(
            ~columns, hidden
        )
    return torch.cat([columns, attention_mask], dim=-1)


AttentionInterface.register(ATTENTION_KEY, _prefix_sdpa_attention)
AttentionMaskInterface.register(ATTENTION_KEY, sdpa_mask)
AttentionInterface.register(EAGER_ATTENTION_KEY, _prefix_eager_attention)
AttentionMaskInterface.register(EAGER_ATTENTION_KEY, sdpa_mask)


def attention_key(config: PretrainedConfig, attention: str = "sdpa") -> str:
    """attn_implementation to load a backbone with: prefix-aware SDPA (or written-out eager) for the attention-
    interface families, the model's own eager attention for DeBERTa-v2 (which prepare_encoder then patches)."""
    if family_of(config).injection != "attention_interface":
        return "eager"
    return EAGER_ATTENTION_KEY if attention == "eager" else ATTENTION_KEY


class _PrefixSlot:
    """Holds the prefix of the current forward pass for families without a kwarg path (DeBERTa)."""

    prefix: Prefix | None = None


def _deberta_prefix_attention(self, hidden_states, attention_mask, output_attentions=False, **kwargs):
    """DisentangledSelfAttention.forward with prefix keys/values (zero relative bias on prefix columns)."""
    prefix = self.prefix_slot.prefix
    layer_prefix = prefix.get(self.prefix_layer_index) if prefix else None
    if layer_prefix is None or kwargs.get("query_states") is not None:
        return self.stock_forward(hidden_states, attention_mask, output_attentions, **kwargs)
    # DeBERTa's mask is the outer product of the padding mask; row 0 ([CLS], always real) is the padding mask
    layer_prefix = _gated(layer_prefix, hidden_states, attention_mask[:, 0, 0, :].bool())

    heads = self.num_attention_heads
    query = self.transpose_for_scores(self.query_proj(hidden_states), heads)  # (B*H, L, D)
    key = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    value = self.transpose_for_scores(self.value_proj(hidden_states), heads)
    batch_size, length = hidden_states.shape[:2]
    prefix_key, prefix_value = (
        _expand_to_batch(t, batch_size, key.dtype).reshape(batch_size * heads, -1, key.shape[-1])
        for t in layer_prefix[:2]
    )
    prefix_length = prefix_key.shape[1]

    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scale = torch.sqrt(torch.tensor(query.size(-1), dtype=torch.float) * scale_factor).to(query.dtype)
    scores = torch.bmm(query, torch.cat([prefix_key, key], dim=1).transpose(-1, -2) / scale)  # (B*H, L, P+L)
    if self.relative_attention:
        rel_embeddings = self.pos_dropout(kwargs["rel_embeddings"])
        relative_bias = self.disentangled_attention_bias(
            query, key, kwargs.get("relative_pos"), rel_embeddings, scale_factor
        )
        scores[:, :, prefix_length:] += relative_bias
    scores = scores.view(batch_size, heads, length, prefix_length + length)

    mask = attention_mask.bool()  # (B, 1, L, L)
    if len(layer_prefix) > 2 and layer_prefix[2] is not None:  # per-example prompts: hide padded prefix columns
        mask = _with_prefix_mask(mask.expand(batch_size, *mask.shape[1:]), layer_prefix[2], length, length)
    else:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], prefix_length), mask], dim=-1)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = self.dropout(torch.softmax(scores, dim=-1))
    context = torch.bmm(probs.view(batch_size * heads, length, -1), torch.cat([prefix_value, value], dim=1))
    context = context.view(batch_size, heads, length, -1).permute(0, 2, 1, 3).reshape(batch_size, length, -1)
    return (context, probs if output_attentions else None)


def prepare_encoder(encoder: torch.nn.Module) -> None:
    """Make a loaded encoder accept prefixes (call once, after loading)."""
    family = family_of(encoder.config)
    if family.injection == "attention_interface":
        if encoder.config._attn_implementation not in (ATTENTION_KEY, EAGER_ATTENTION_KEY):
            encoder.set_attn_implementation(ATTENTION_KEY)
        for module in encoder.modules():
            # the modules that call the attention interface are the ones that know their layer index
            if hasattr(module, "layer_idx") and not getattr(module, "ptv2_gate_hook", False):
                module.register_forward_pre_hook(_gate_hook, with_kwargs=True)
                module.ptv2_gate_hook = True
        return
    slot = _PrefixSlot()
    encoder.prefix_slot = slot
    for index, layer in enumerate(encoder.encoder.layer):
        attention = layer.attention.self
        attention.prefix_slot = slot
        attention.prefix_layer_index = index
        attention.stock_forward = attention.forward
        attention.forward = types.MethodType(_deberta_prefix_attention, attention)


def run_encoder(encoder: torch.nn.Module, prefix: Prefix | None, **inputs) -> torch.Tensor:
    """Last hidden states (B, L, hidden) of `encoder` run with `prefix` on its layers."""
    slot = getattr(encoder, "prefix_slot", None)
    if slot is not None:
        # The slot keeps the prefix after the call so activation-checkpointed layers recompute with it.
        slot.prefix = prefix
        return encoder(**inputs).last_hidden_state
    if family_of(encoder.config).causal:
        inputs = decoder_inputs(**inputs)
    if prefix:
        inputs["prefix_key_values"] = prefix
    return encoder(**inputs).last_hidden_state


def encoder_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of a backbone config: the shape of one layer's prefix keys. Grouped-query
    decoders have fewer key/value heads than query heads; some set head_dim apart from hidden_size / heads."""
    heads = config.num_attention_heads
    head_dim = (
        getattr(config, "attention_head_size", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    )
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def shifted_position_ids(config: PretrainedConfig, attention_mask: torch.Tensor, shift: int) -> torch.Tensor | None:
    """Position ids moved by `shift`, as the official cache-based implementation numbered them (None if n/a)."""
    return position_ids(config, attention_mask, shift) if shift else None


def position_ids(config: PretrainedConfig, attention_mask: torch.Tensor, shift: int = 0) -> torch.Tensor | None:
    """Position ids of tokens numbered from `shift` on (0: the stock numbering, written out); None for relative
    and decoder families. Packed training numbers each job's block of rows with its own job's shift."""
    family = family_of(config)
    if family.positions in ("relative", "rotary") or family.causal:  # decoders number positions themselves
        return None
    if family.positions == "padding_offset":
        # RoBERTa numbers real tokens padding_idx+1, padding_idx+2, ... and keeps padding at padding_idx.
        return (torch.cumsum(attention_mask, dim=1) + shift) * attention_mask + config.pad_token_id
    length = attention_mask.shape[1]
    return torch.arange(shift, shift + length, device=attention_mask.device).expand_as(attention_mask)


def positions_used(config: PretrainedConfig, length: int, shift: int) -> int:
    """Highest position index + 1 needed for `length` tokens shifted by `shift` (0 for relative families)."""
    family = family_of(config)
    if family.positions in ("relative", "rotary"):
        return 0
    offset = config.pad_token_id + 1 if family.positions == "padding_offset" else 0
    return offset + shift + length


# ----------------------------------------------------------------------------------------------- frozen layers
# A run whose lowest prompted layer is k computes the hidden states entering layer k once per example (frozen.py)
# and trains from them: the stack of layers is cut for the length of one forward, and the first layer kept takes
# the given hidden states in place of what the embeddings (and the layers cut) would hand it. Masks, rotary
# embeddings and the final norm are computed by the model's own forward as always.


def layer_stack(encoder: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(module holding the layer list, its attribute name): BERT-style encoder.layer, GPT-2's h, the decoders'
    layers."""
    for holder, name in ((getattr(encoder, "encoder", None), "layer"), (encoder, "h"), (encoder, "layers")):
        if holder is not None and isinstance(getattr(holder, name, None), torch.nn.ModuleList):
            return holder, name
    raise UserError(f"trainer.cache_frozen: {type(encoder).__name__} has no layer list ptv2 knows")


class _Stop(Exception):
    """Ends a bottom forward at the highest layer it was asked for."""


def hidden_entering(encoder: torch.nn.Module, layers: list[int], **inputs) -> dict[int, torch.Tensor]:
    """{layer: the hidden states (B, L, hidden) entering it} for each of `layers` (the layer count: the last hidden
    states), from one forward that stops at the highest: the embeddings and layers below, no prefix; call in eval
    mode for the cache."""
    holder, name = layer_stack(encoder)
    stack = getattr(holder, name)
    found: dict[int, torch.Tensor] = {}

    def capture(layer: int, last: bool):
        def hook(module, args, kwargs):
            found[layer] = args[0] if args else kwargs["hidden_states"]
            if last:
                raise _Stop

        return hook

    inside = sorted(layer for layer in set(layers) if layer < len(stack))
    stop_at = inside[-1] if len(inside) == len(set(layers)) else None  # the encoder's output asked for: no stop
    hooks = [(stack[layer], capture(layer, layer == stop_at)) for layer in inside]
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks]
    try:
        output = run_encoder(encoder, None, **inputs)
        found[len(stack)] = output
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: found[layer] for layer in layers}


def _replace_input(hidden: torch.Tensor):
    def hook(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def run_encoder_from(encoder: torch.nn.Module, prefix: Prefix | None, start: int, hidden: torch.Tensor, **inputs):
    """Last hidden states of `encoder` run from layer `start` on, `hidden` (B, L, hidden) entering it: what
    run_encoder gives when the layers below compute `hidden`. The embeddings still run (for their shapes; their
    dropout is switched off, so they draw no random numbers) and their output is dropped."""
    holder, name = layer_stack(encoder)
    layers = getattr(holder, name)
    if start >= len(layers):
        return hidden
    kept = torch.nn.ModuleList(list(layers)[start:])
    dropouts = [m for m in encoder.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    inside = {id(m) for m in kept.modules()}
    paused = [m for m in dropouts if id(m) not in inside]
    handle = kept[0].register_forward_pre_hook(_replace_input(hidden), with_kwargs=True)
    setattr(holder, name, kept)
    for module in paused:
        module.eval()
    try:
        return run_encoder(encoder, prefix, **inputs)
    finally:
        handle.remove()
        setattr(holder, name, layers)
        for module in paused:
            module.train()


def config_dropout(config: PretrainedConfig) -> float:
    """The largest dropout rate a backbone config sets for its encoder (hidden_dropout_prob, attention_dropout,
    GPT-2's *_pdrop, ...; not a classifier's), for decisions taken before the model is built."""
    rates = [
        value
        for name, value in config.to_dict().items()
        if ("drop" in name and "classifier" not in name) and isinstance(value, float)
    ]
    return max(rates, default=0.0)
