"""Full fine-tuning, the baseline: no prompt, every backbone weight trains."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import Method, PromptSettings


@dataclass
class Settings(PromptSettings):
    method: str = "finetune"


METHOD = Method("finetune", Settings, frozen=False)
