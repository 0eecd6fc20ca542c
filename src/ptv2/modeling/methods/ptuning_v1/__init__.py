"""P-tuning v1 (Liu et al., 2021): input prompts produced by a prompt encoder (a bidirectional LSTM + MLP, or an MLP)
from learned embeddings (prompts.InputPrompt); frozen backbone."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import InputPromptSettings, Method
from ptv2.schema import tagged


@dataclass
class Settings(InputPromptSettings):
    method: str = "ptuning_v1"
    encoder: str = tagged("lstm", admits=("lstm", "mlp"))  # the prompt encoder


def _build(settings, config):
    from ptv2.modeling.prompts import InputPrompt

    return InputPrompt(config.hidden_size, settings.length, settings.encoder, settings.dropout)


METHOD = Method("ptuning_v1", Settings, prompt="input", build=_build)
