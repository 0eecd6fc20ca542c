"""Prompt tuning (Lester et al., 2021): P learned vectors at the input only (prompts.InputPrompt); frozen backbone."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import InputPromptSettings, Method


@dataclass
class Settings(InputPromptSettings):
    method: str = "prompt_tuning"


def _build(settings, config):
    from ptv2.modeling.prompts import InputPrompt

    return InputPrompt(config.hidden_size, settings.length, "none", settings.dropout)


METHOD = Method("prompt_tuning", Settings, prompt="input", build=_build)
