"""P-Tuning v2 (Liu et al., ACL 2022): P learned key/value vectors at every layer (or the layers in prompt.layers) of
a frozen backbone; the module is prompts.PrefixEncoder."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import DeepPromptSettings, Method, prefix_encoder


@dataclass
class Settings(DeepPromptSettings):
    method: str = "ptv2"


METHOD = Method("ptv2", Settings, prompt="prefix", build=prefix_encoder, mixes_in_batch=True, exports="prefix")
