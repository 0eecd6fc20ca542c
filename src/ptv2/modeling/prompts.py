"""Prompt modules: deep per-layer prefixes (P-Tuning v2) and input-level prompts (Lester et al., P-tuning v1)."""

from __future__ import annotations

import torch
from torch import nn

from ptv2.errors import UserError
from ptv2.modeling.injection import Prefix, encoder_shape
from ptv2.schema import parse_layers


def prompt_layers(spec, num_layers: int) -> list[int]:
    """Layer indices from `prompt.layers` (validated in config)."""
    side, count = parse_layers(spec)
    if side == "all":
        return list(range(num_layers))
    if side == "list":
        return count
    return list(range(num_layers - count, num_layers)) if side == "top" else list(range(count))


def official_init_(module: nn.Module, std: float, embedding_std: float | None = None) -> None:
    """Initialise a module's new Linear and Embedding layers as the official models got them.

    The official models were built with `from_pretrained`, which passes every module missing from the checkpoint
    (prefix embedding, reparameterization MLP, classifier) through the backbone's `_init_weights`: weights
    N(0, initializer_range), biases zero. `embedding_std` overrides the std of the prompt embeddings
    (`prompt.init_std`). Other layers (the P-tuning v1 LSTM) keep PyTorch's defaults, as they did there.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Embedding):
            nn.init.normal_(layer.weight, mean=0.0, std=std if embedding_std is None else embedding_std)


class PrefixEncoder(nn.Module):
    """Learned key/value prefixes for a set of layers (P-Tuning v2).

    forward(batch_size) -> {layer: (key, value)}, each (batch_size, heads, length, head_dim).

    With `projection="mlp"` a two-layer MLP (the paper's reparameterization) maps `length` embeddings of width
    `hidden_size` to all layers' key/values; otherwise the key/values are the parameters themselves. PromptModel
    initialises the parameters as the official models got them (see `official_init_`).

    `length` may be a list, one length per layer of `layers` (per-layer prompt lengths): then each layer has its
    own rows, sum(lengths) in all, each row holding one layer's key and value (2 x heads x head_dim; with the MLP,
    the MLP's output for that layer), and layer i gets (batch_size, heads, lengths[i], head_dim). A list of equal
    lengths is the single length (the same parameters, checkpoints and computation).
    """

    def __init__(
        self,
        layers: list[int],
        heads: int,
        head_dim: int,
        hidden_size: int,
        length: int,
        projection: str = "none",
        projection_dim: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.layers, self.heads, self.head_dim = list(layers), heads, head_dim
        self.lengths = per_layer_lengths(length, len(self.layers))
        # One number when every layer has the same length (the layout P-Tuning v2 checkpoints have); else None.
        self.length = self.lengths[0] if len(set(self.lengths)) == 1 else None
        width = len(self.layers) * 2 * heads * head_dim
        rows = self.length or sum(self.lengths)
        if projection == "mlp":
            self.embedding = nn.Embedding(rows, hidden_size)
            self.projection = nn.Sequential(
                nn.Linear(hidden_size, projection_dim), nn.Tanh(), nn.Linear(projection_dim, width)
            )
        else:
            self.embedding = nn.Embedding(rows, width if self.length else 2 * heads * head_dim)
            self.projection = None
        self.dropout = nn.Dropout(dropout)
        # A folded prefix (the MLP's output, stored for inference) replaces embedding + MLP when present.
        self.register_buffer("folded", None, persistent=False)

    @classmethod
    def from_settings(cls, settings, config):
        """The prefix of a deep-prompt method's settings (prompt.*) on a backbone of this HF config."""
        num_layers, heads, head_dim = encoder_shape(config)
        return cls(
            layers=prompt_layers(settings.layers, num_layers),
            heads=heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            length=settings.length,
            projection=settings.projection,
            projection_dim=settings.projection_dim,
            dropout=settings.dropout,
        )

    def key_values(self) -> torch.Tensor:
        """All prefixes as one tensor (length, layers * 2 * heads * head_dim)."""
        if self.folded is not None:
            return self.folded
        prefix = self.embedding.weight
        return self.projection(prefix) if self.projection is not None else prefix

    def forward(self, batch_size: int) -> Prefix:
        if self.length is None:
            return self._per_layer_forward(batch_size)
        prefix = self.key_values()
        device = prefix.device.type
        if torch.is_autocast_enabled(device):
            # Attention consumes the prefix in the autocast dtype anyway; casting before the batch expansion halves
            # the largest tensor of a deep-prompt step (batch x P x layers x 2 x hidden) and its dropout mask.
            prefix = prefix.to(torch.get_autocast_dtype(device))
        prefix = prefix.expand(batch_size, -1, -1)
        # Dropout per example on the batch-expanded prefix, as the official implementation applies it.
        prefix = self.dropout(prefix) if self.training and self.dropout.p > 0 else prefix
        prefix = prefix.view(batch_size, self.length, len(self.layers) * 2, self.heads, self.head_dim)
        # (batch, heads, length, head_dim) per layer and key/value. unbind, not indexing: its backward stacks the
        # 2 x layers gradients once, where each index would zero-fill and add a gradient the size of all prefixes.
        parts = prefix.permute(2, 0, 3, 1, 4).unbind(0)
        return {layer: (parts[2 * i], parts[2 * i + 1]) for i, layer in enumerate(self.layers)}

    def _per_layer_forward(self, batch_size: int) -> Prefix:
        """forward() for per-layer lengths: layer i reads its own rows of key_values()."""
        prefix = self.key_values()  # (sum(lengths), 2 * heads * head_dim) or, with the MLP, (..., layers * that)
        device = prefix.device.type
        if torch.is_autocast_enabled(device):
            prefix = prefix.to(torch.get_autocast_dtype(device))
        if prefix.shape[1] != 2 * self.heads * self.head_dim:
            # the MLP maps every row to all layers' key/values: each row keeps its own layer's part
            owner = torch.repeat_interleave(torch.arange(len(self.layers)), torch.tensor(self.lengths))
            prefix = prefix.view(prefix.shape[0], len(self.layers), -1)[torch.arange(prefix.shape[0]), owner]
        prefix = prefix.expand(batch_size, -1, -1)
        prefix = self.dropout(prefix) if self.training and self.dropout.p > 0 else prefix
        out = {}
        for layer, part in zip(self.layers, prefix.split(self.lengths, dim=1), strict=True):
            key, value = part.view(batch_size, part.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out[layer] = (key, value)
        return out

    @torch.no_grad()
    def fold(self) -> torch.Tensor:
        """The reparameterized prefix computed once (what inference needs; no MLP required)."""
        return self.key_values().detach().clone()


def per_layer_lengths(length, layers: int) -> list[int]:
    """[P_i] for each of `layers` prompted layers from prompt.length: one number (every layer) or a list."""
    if isinstance(length, int):
        return [length] * layers
    lengths = [int(value) for value in length]
    if len(lengths) != layers:
        raise UserError(
            f"prompt.length has {len(lengths)} lengths for {layers} prompted layers; give one per layer of "
            "prompt.layers, or one number"
        )
    return lengths


class InputPrompt(nn.Module):
    """Prompt vectors prepended to the input embeddings only.

    forward() -> (length, hidden_size). `encoder="none"` learns them directly (Lester et al. prompt tuning);
    "lstm" and "mlp" produce them from learned embeddings through a bidirectional LSTM + MLP or an MLP alone
    (P-tuning v1's prompt encoder).
    """

    def __init__(self, hidden_size: int, length: int, encoder: str = "none", dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(length, hidden_size)
        self.encoder = encoder
        if encoder == "lstm":
            self.lstm = nn.LSTM(hidden_size, hidden_size // 2, num_layers=2, bidirectional=True, batch_first=True)
        if encoder in ("lstm", "mlp"):
            self.mlp = nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
            )
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        prompt = self.embedding.weight
        if self.encoder == "lstm":
            prompt = self.lstm(prompt.unsqueeze(0))[0].squeeze(0)
        if self.encoder in ("lstm", "mlp"):
            prompt = self.mlp(prompt)
        return self.dropout(prompt)

    # A prompt that takes token positions answers extend_inputs (the encoder's inputs with its positions) and strip
    # (the encoder's output without them); PromptModel calls both.
    def extend_inputs(self, encoder: nn.Module, input_ids: torch.Tensor, inputs: dict, perturb=None) -> dict:
        """The prompt vectors inserted right after the first ([CLS]) token, so [CLS] keeps position 0; perturb
        (B, L, hidden), when given, is added to the tokens' embeddings."""
        embeddings = encoder.get_input_embeddings()(input_ids)
        if perturb is not None:
            embeddings = embeddings + perturb
        prompt = self().to(embeddings.dtype).expand(input_ids.shape[0], -1, -1)
        length = prompt.shape[1]
        mask = inputs["attention_mask"]
        out = {
            "inputs_embeds": torch.cat([embeddings[:, :1], prompt, embeddings[:, 1:]], dim=1),
            "attention_mask": torch.cat([mask[:, :1], mask.new_ones(mask.shape[0], length), mask[:, 1:]], dim=1),
        }
        if "token_type_ids" in inputs:
            types = inputs["token_type_ids"]
            out["token_type_ids"] = torch.cat([types[:, :1], types.new_zeros(types.shape[0], length), types[:, 1:]], 1)
        return out

    def strip(self, hidden: torch.Tensor) -> torch.Tensor:
        """The prompt positions dropped, so heads see the original token positions."""
        return torch.cat([hidden[:, :1], hidden[:, 1 + self.embedding.num_embeddings :]], dim=1)
