"""Adaptive Prefix Tuning (APT; Zhang et al., ACL 2023, arXiv 2305.15212): P-Tuning v2's prefixes weighted by a
token gate and a layer gate (module.py). Its settings are P-Tuning v2's, so the two compare at equal length."""

from dataclasses import dataclass

from ptv2.modeling.methods.base import DeepPromptSettings, Method


@dataclass
class Settings(DeepPromptSettings):
    method: str = "apt"


def _build(settings, config):
    from ptv2.modeling.methods.apt.module import AdaptivePrefixEncoder

    return AdaptivePrefixEncoder.from_settings(settings, config)


# The gates read the whole sequence, which token-by-token decoding never has: no generation.
METHOD = Method("apt", Settings, prompt="prefix", build=_build, mixes_in_batch=True, generation=False)
