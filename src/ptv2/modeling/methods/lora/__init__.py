"""LoRA (Hu et al., 2021) through PEFT (modeling/peft_methods.py): low-rank updates W + (alpha / r) B A of the
attention projections of the frozen backbone. The weights change, so rows of other checkpoints never share its
batch. The defaults are the LoRA paper's RoBERTa settings."""

from dataclasses import dataclass
from typing import Optional

from ptv2.modeling.methods.base import Method, PromptSettings
from ptv2.schema import COUNT, PER_JOB, POSITIVE, PROBABILITY, tagged


@dataclass
class Settings(PromptSettings):
    method: str = "lora"
    r: int = tagged(8, admits=COUNT)  # rank of the update B A
    alpha: float = tagged(16.0, admits=POSITIVE)  # the update is scaled by alpha / r
    dropout: float = tagged(0.1, PER_JOB, admits=PROBABILITY)  # on LoRA's input
    # module name suffixes to adapt; None: the backbone family's default (injection.FAMILIES lora_targets)
    target_modules: Optional[list[str]] = None


METHOD = Method("lora", Settings, peft="lora", exports="lora")
