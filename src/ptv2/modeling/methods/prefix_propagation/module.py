"""Prefix-propagation (Li et al., ACL 2023, arXiv 2305.12086): prefix positions that are computed like tokens.

P extra positions go in front of the sequence. They enter the embeddings with zero word embeddings (so they leave
the embedding layer as position embeddings 0..P-1 plus the segment-0 embedding, normed), attend and are attended
like tokens, and before every layer i, the first included, the learned vectors prefix[i] (P, hidden) are added to
their hidden states. A layer's prefix therefore carries what the layers below computed for those positions: it is
propagated instead of replaced, as P-Tuning v2's key/value prefixes are. Heads read the real tokens only (`strip`),
so a sentence head reads [CLS], which sits at position P, as the authors' pooler does.

This is the authors' `propagate_prefix=only` (the paper's method). Not here: `combine` (ordinary key/value prefixes
as well), and `propagate_prefix_scalar`, whose "scalar" is an elementwise (P, hidden) factor per layer applied
before the addition in their RoBERTa code only (their Longformer layer reads the addition and ignores it), used by
none of their run scripts.

Parameters: an embedding (P, layers * hidden), half of P-Tuning v2's (P, layers * 2 * hidden) at the same P; with
`projection="mlp"` an embedding (P, hidden) and a two-layer tanh MLP to layers * hidden, as theirs. Dropout acts on
the batch-expanded prefix, per example, as theirs (their prefix dropout is the backbone's hidden_dropout_prob).

Positions: BERT-style families (positions from 0) number the prefix 0..P-1 and the tokens from P on; the authors
have no BERT version (their propagated prefix exists for RoBERTa, Longformer and BigBird), so this is their scheme
without RoBERTa's offset. RoBERTa-style families (positions from padding_idx + 1) number the prefix padding_idx + 1
.. padding_idx + P and the tokens from padding_idx + 1 + P on. The authors' RoBERTa numbers the tokens the same way
but gives the prefix arange(0, P): position 0, which RoBERTa's own numbering never uses, and position padding_idx =
1, its padding row; here the prefix takes the first positions a real sequence has. Relative-position (DeBERTa) and
causal (decoder) backbones are refused: the authors defined the method for bidirectional encoders with absolute
positions, and behind a causal mask the prefix would never see the tokens it is meant to propagate.
"""

from __future__ import annotations

import torch
from torch import nn

from ptv2.errors import UserError
from ptv2.modeling.injection import family_of, layer_stack, position_ids

# The encoder input that carries the per-layer additions to the layers' hooks (a keyword argument transformers hands
# every layer): the additions travel with the forward call, so a stale prefix can never reach a later plain forward.
ADDITIONS_KEY = "ptv2_propagated_prefix"


class PrefixPropagation(nn.Module):
    """Learned additions to P prefix positions before each of `num_layers` layers.

    forward(batch_size) -> tuple of num_layers tensors (batch_size, length, hidden_size): what layer i adds.
    extend_inputs(encoder, input_ids (B, L), inputs) -> the encoder's inputs for P + L positions;
    strip(hidden (B, P + L, hidden)) -> (B, L, hidden).
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        length: int,
        dropout: float = 0.1,
        projection: str = "none",
        projection_dim: int = 512,
    ):
        super().__init__()
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise UserError(f"prompt.length={length}: prefix-propagation takes one length of at least 1")
        self.num_layers, self.hidden_size, self.length = num_layers, hidden_size, length
        width = num_layers * hidden_size
        if projection == "mlp":
            self.embedding = nn.Embedding(length, hidden_size)
            self.projection = nn.Sequential(
                nn.Linear(hidden_size, projection_dim), nn.Tanh(), nn.Linear(projection_dim, width)
            )
        elif projection == "none":
            self.embedding = nn.Embedding(length, width)
            self.projection = None
        else:
            raise UserError(f"prompt.projection={projection} is unknown; choose one of none, mlp")
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        prefix = self.embedding.weight
        if self.projection is not None:
            prefix = self.projection(prefix)
        prefix = prefix.expand(batch_size, -1, -1)  # (B, P, layers * hidden)
        prefix = self.dropout(prefix) if self.training and self.dropout.p > 0 else prefix
        # unbind, not indexing: one stacked gradient in the backward instead of one zero-filled copy per layer
        return prefix.view(batch_size, self.length, self.num_layers, self.hidden_size).unbind(2)

    def attach(self, encoder: nn.Module) -> None:
        """Check that the backbone fits and hook its layers: layer i adds the i-th addition to the prefix positions of
        its input hidden states (out of place)."""
        config = encoder.config
        family = family_of(config)
        if family.causal or family.positions not in ("absolute", "padding_offset"):
            why = (
                "a causal mask, behind which the prefix never sees the tokens"
                if family.causal
                else "relative positions"
            )
            raise UserError(
                "prompt.method=prefix_propagation needs a bidirectional encoder with absolute positions (BERT, "
                f"RoBERTa, ELECTRA, MiniLM); {config.model_type} has {why}; use prompt.method=ptv2"
            )
        holder, name = layer_stack(encoder)
        layers = getattr(holder, name)
        if len(layers) != self.num_layers or config.hidden_size != self.hidden_size:
            raise UserError(
                f"prefix-propagation was built for {self.num_layers} layers of width {self.hidden_size}; the backbone "
                f"has {len(layers)} of width {config.hidden_size}"
            )
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        length = self.length

        def add_prefix(module, args, kwargs):
            additions = kwargs.get(ADDITIONS_KEY)
            if additions is None:
                return None
            kwargs = {key: value for key, value in kwargs.items() if key != ADDITIONS_KEY}
            hidden = args[0] if args else kwargs["hidden_states"]
            added = hidden[:, :length] + additions[index].to(hidden.dtype)
            hidden = torch.cat([added, hidden[:, length:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return add_prefix

    def extend_inputs(self, encoder: nn.Module, input_ids: torch.Tensor, inputs: dict, perturb=None) -> dict:
        """The encoder's inputs with P prefix positions in front: zero word embeddings, attention mask ones, segment
        0, positions numbered as the class docstring says, and the per-layer additions for the hooks. perturb
        (B, L, hidden), when given, is added to the tokens' word embeddings."""
        config = encoder.config
        batch_size, length = input_ids.shape
        limit = config.max_position_embeddings - (
            config.pad_token_id + 1 if family_of(config).positions == "padding_offset" else 0
        )
        if self.length + length > limit:
            raise UserError(
                f"prefix-propagation puts prompt.length={self.length} positions before {length} tokens, more than "
                f"the {limit} positions {config.model_type} has; shorten task.max_length or prompt.length"
            )
        embeddings = encoder.get_input_embeddings()(input_ids)
        if perturb is not None:
            embeddings = embeddings + perturb
        zeros = embeddings.new_zeros(batch_size, self.length, embeddings.shape[-1])
        mask = inputs["attention_mask"]
        mask = torch.cat([mask.new_ones(batch_size, self.length), mask], dim=1)
        types = inputs.get("token_type_ids")
        types = input_ids.new_zeros(batch_size, length) if types is None else types
        return {
            "inputs_embeds": torch.cat([zeros, embeddings], dim=1),
            "attention_mask": mask,
            "token_type_ids": torch.cat([types.new_zeros(batch_size, self.length), types], dim=1),
            "position_ids": position_ids(config, mask),
            ADDITIONS_KEY: self(batch_size),
        }

    def strip(self, hidden: torch.Tensor) -> torch.Tensor:
        """The prefix positions dropped: (B, P + L, hidden) -> (B, L, hidden)."""
        return hidden[:, self.length :]
