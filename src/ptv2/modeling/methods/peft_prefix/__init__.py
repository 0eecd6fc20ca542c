"""PEFT's own prefix tuning (PrefixTuningConfig on ptv2's frozen encoder; modeling/peft_methods.py): the same method
as ptv2, other code. PEFT passes the prefix as a key/value cache (tokens numbered from P), on every layer, without
prefix dropout: those are not settings here."""

from dataclasses import dataclass
from typing import Any

from ptv2.modeling.methods.base import PROMPT_LENGTH, Method, PromptSettings
from ptv2.schema import COUNT, PER_JOB, tagged


@dataclass
class Settings(PromptSettings):
    method: str = "peft_prefix"
    length: Any = tagged(16, PER_JOB, admits=PROMPT_LENGTH)  # PEFT's num_virtual_tokens
    projection: str = tagged("none", PER_JOB, admits=("none", "mlp"))  # mlp: PEFT's prefix_projection
    projection_dim: int = tagged(512, PER_JOB, admits=COUNT)  # PEFT's encoder_hidden_size


METHOD = Method("peft_prefix", Settings, peft="prefix")
