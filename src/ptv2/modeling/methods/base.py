"""What every prompt method package declares: its settings (a dataclass holding only the keys it reads, with the
values each admits beside the field) and its registry entry (`Method`: what the loop, the packer, the server and
the exporter need of it). Free of torch: the config checks read it before torch loads; the modules come through
functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from ptv2.schema import COUNT, MAX_PROMPT_LENGTH, PATH, PER_JOB, PROBABILITY, Range, parse_layers, tagged

__all__ = ["parse_layers"]  # read by the config checks and the modules through the registry

PROMPT_LENGTH = Range(1, MAX_PROMPT_LENGTH, integer=True)  # the paper's longest prompts are 128-256 vectors


@dataclass
class PromptSettings:
    """What every method has: its name and the run whose trained part (and matching heads) start training."""

    method: str = MISSING
    init_from: Optional[str] = tagged(None, PATH, PER_JOB)


@dataclass
class InputPromptSettings(PromptSettings):
    """Vectors inserted into the input (Lester et al.'s prompt tuning)."""

    length: Any = tagged(16, PER_JOB, admits=PROMPT_LENGTH)  # number of prompt vectors
    dropout: float = tagged(0.0, PER_JOB, admits=PROBABILITY)  # on the prompt vectors
    # std of the N(0, std) prompt embeddings; None: the backbone's initializer_range, as the official models started
    init_std: Optional[float] = tagged(None, PER_JOB, admits=Range(0, low_open=True, optional=True))


@dataclass
class DeepPromptSettings(InputPromptSettings):
    """Key/value prefixes at every chosen layer (P-Tuning v2 and the methods built on its prefix)."""

    # per layer; a list gives one length per prompted layer (bottom to top), e.g. [4, 8, 16]
    length: Any = tagged(16, PER_JOB, admits=PROMPT_LENGTH)
    projection: str = tagged("none", PER_JOB, admits=("none", "mlp"))  # reparameterization: none | mlp
    projection_dim: int = tagged(512, PER_JOB, admits=COUNT)  # hidden width of the reparameterization MLP
    dropout: float = tagged(0.1, PER_JOB, admits=PROBABILITY)  # on the prefix (the official scripts' 0.1)
    layers: Any = tagged("all", PER_JOB)  # depth: all | top:K | bottom:K | [i, j, ...]
    shift_positions: bool = tagged(False, PER_JOB)  # number tokens P..P+L-1 as the official cache-based code did


@dataclass(frozen=True)
class Method:
    name: str
    settings: type  # the dataclass of its settings (prompt.*): only the keys this method reads
    frozen: bool = True  # the backbone's weights stay as loaded; only the prompt and the heads train
    # "prefix": key/value vectors on every chosen layer (deep prompt, prompts.PrefixEncoder); "input": vectors in the
    # token sequence (prompts.InputPrompt and the like); None: no prompt of ptv2's own
    prompt: str | None = None
    # build(settings, backbone config) -> the prompt module; a function so that the config layer stays free of torch
    build: Callable[[Any, Any], Any] | None = None
    # Rows of different checkpoints may share one batch on one backbone: the weights and the token sequence are
    # untouched (serving mixes them; each row gets its own prefix)
    mixes_in_batch: bool = False
    # Why its jobs cannot train packed although its checkpoints mix at inference (None: they pack when they mix)
    pack_refusal: str | None = None
    trains_backbone_heads: bool = False  # a verbalizer's MLM head trains although the backbone is frozen
    # PEFT builds the trained part on the frozen backbone (modeling/peft_methods.py): "lora" (low-rank updates of the
    # attention projections) | "prefix" (PEFT's own prefix tuning, the independent implementation beside ptv2's)
    peft: str | None = None
    exports: str | None = None  # `ptv2 export --to peft` writes it as this PEFT method: "prefix" | "lora"
    # Can train an LM head for generation (task.type=generation): False when the prompt reads the whole sequence,
    # which token-by-token decoding never has
    generation: bool = True
    # The training loss, through a function so that the config layer stays free of torch: objective(settings)
    # gives f(model, batch, head) -> loss (see PromptModel.forward); None: the head's loss on the model's output
    objective: Callable[[Any], Callable] | None = None

    @property
    def has_prompt(self) -> bool:
        """The method builds a prompt (its own or PEFT's prefix), so prompt.length must be at least 1."""
        return self.prompt is not None or self.peft == "prefix"

    @property
    def input_prompt(self) -> bool:
        """The prompt takes token positions (prompt.length more positions per sequence)."""
        return self.prompt == "input"

    @property
    def packs(self) -> bool:
        """Jobs of this method may train packed on one backbone forward."""
        return self.mixes_in_batch and self.pack_refusal is None


def prefix_encoder(settings, config):
    """P-Tuning v2's prefix (prompts.PrefixEncoder) for these settings on a backbone of this config."""
    from ptv2.modeling.prompts import PrefixEncoder

    return PrefixEncoder.from_settings(settings, config)
