"""Linear probe: frozen backbone, only the heads train (the floor every prompt method should beat)."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import Method, PromptSettings


@dataclass
class Settings(PromptSettings):
    method: str = "linear_probe"


METHOD = Method("linear_probe", Settings, mixes_in_batch=True, trains_backbone_heads=True)
