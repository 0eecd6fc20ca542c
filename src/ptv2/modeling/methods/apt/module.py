"""Adaptive Prefix Tuning (APT; Zhang et al., "Towards Adaptive Prefix Tuning for Parameter-Efficient Language Model
Fine-tuning", ACL 2023, arXiv 2305.15212): P-Tuning v2's per-layer prefixes, each weighted by two gates.

For a prompted layer i with prefix keys/values P_k^i, P_v^i (P_i x d per head) and input hidden states h^{i-1}:

    token-level gate   alpha^i = sigmoid(W^i pool(h^{i-1}) + b^i)          alpha^i in (0, 1)^{P_i}, W^i: d -> P_i
    layer-level gate   lambda^i                                             one learned scalar per layer
    attention          head = Attn(x W_q, [lambda^i alpha^i (.) P_k^i ; x W_k], [lambda^i alpha^i (.) P_v^i ; x W_v])

i.e. every prefix column j of layer i is scaled by w_j = lambda^i * alpha^i_j, the same on its key and its value and
in every head: alpha decides, per example, how much each prefix token counts; lambda balances the layer's prefix
against its input tokens. With alpha = lambda = 1 this is P-Tuning v2 exactly (tests/test_apt.py).

Choices the equations above do not fix, made here and not checked against the authors' code (say so when comparing
with the paper's figures):
- pool(h) is the mean of the layer's input hidden states over the real tokens (a sequence becomes one d-vector;
  padding never counts). For pre-LN decoders the "layer input" is the attention's (normed) input.
- W^i is initialised N(0, initializer_range) with b^i = 0 (alpha starts near 0.5, as every new Linear here starts),
  lambda^i = 1.
- The gates read the whole sequence, so they are not causal: a decoder may classify with APT, but not train an LM
  head for generation (token-by-token decoding never sees the whole answer; `Method.generation` is False).

forward(batch_size) -> {layer: (key, value, None, gate)}: key/value as PrefixEncoder's; gate(hidden (B, L, d),
real-token mask (B, L) | None) -> (B, P_i) weights, applied inside the layer by injection.py's pre-attention hook.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ptv2.modeling.injection import Prefix
from ptv2.modeling.prompts import PrefixEncoder


class AdaptivePrefixEncoder(PrefixEncoder):
    """PrefixEncoder + a token gate (Linear d -> P_i) and a layer gate (scalar) per prompted layer."""

    def __init__(self, layers: list[int], heads: int, head_dim: int, hidden_size: int, length, **options):
        super().__init__(layers, heads, head_dim, hidden_size, length, **options)
        self.token_gates = nn.ModuleList(nn.Linear(hidden_size, tokens) for tokens in self.lengths)
        self.layer_gates = nn.Parameter(torch.ones(len(self.layers)))

    def forward(self, batch_size: int) -> Prefix:
        prefix = super().forward(batch_size)
        return {
            layer: (key, value, None, functools.partial(self.gate, index))
            for index, (layer, (key, value)) in enumerate(prefix.items())
        }

    def gate(self, index: int, hidden: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """lambda^i * alpha^i for the index-th prompted layer: (B, P_i) from its input hidden (B, L, d)."""
        if real is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = real.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        linear = self.token_gates[index]
        # the gate parameters stay in their own (float32) dtype: a half-precision backbone gives half hidden states
        alpha = torch.sigmoid(linear(pooled.to(linear.weight.dtype)))
        return self.layer_gates[index] * alpha
