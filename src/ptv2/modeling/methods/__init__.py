"""The prompt methods (`prompt=NAME`): one package each, holding its settings, its module and its registry entry
(base.Method). Every other module reads the registry (the config checks, the model, the packer, serving, bench,
export) instead of listing method names of its own; a new method is a package here and one line below.
"""

from __future__ import annotations

import importlib
from dataclasses import fields

from ptv2.errors import unknown
from ptv2.modeling.methods.base import Method, parse_layers

__all__ = ["BASELINE", "METHODS", "Method", "method", "mixable", "parse_layers", "setting_names", "with_setting"]

PACKAGES = (
    "ptv2",  # P-Tuning v2 (deep prompt tuning)
    "prompt_tuning",  # Lester et al.
    "ptuning_v1",  # P-tuning v1 (prompt encoder)
    "finetune",  # the whole backbone trains: the baseline
    "linear_probe",  # heads only
    "lora",  # Hu et al., through PEFT
    "peft_prefix",  # PEFT's prefix tuning
    "apt",  # Adaptive Prefix Tuning
    "prefix_propagation",  # Li et al.: prefix positions computed like tokens, an addition before every layer
    "ptp",  # P-Tuning v2 trained with a perturbation-based regularizer
)
METHODS: dict[str, Method] = {
    entry.name: entry for entry in (importlib.import_module(f"{__name__}.{name}").METHOD for name in PACKAGES)
}
BASELINE = "finetune"  # what bench divides by


def method(name: str) -> Method:
    """The entry of `prompt.method`, or one line naming the known methods."""
    if name not in METHODS:
        raise unknown("prompt.method", name, METHODS)
    return METHODS[name]


def mixable() -> list[str]:
    """Methods whose checkpoints share one backbone in a batch."""
    return [name for name, row in METHODS.items() if row.mixes_in_batch]


def setting_names(name: str) -> list[str]:
    """The prompt.* keys method `name` has: its settings' fields, in their order."""
    return [item.name for item in fields(METHODS[name].settings)]


def with_setting(key: str) -> list[str]:
    """The methods whose settings have `key` (a prompt.* key without the prefix)."""
    return [name for name in METHODS if key in setting_names(name)]
