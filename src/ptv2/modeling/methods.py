"""The prompt methods (`prompt.method`): what each one trains and which prompt it builds, in one table.

Every other module reads this table (the config check, the model, serving, bench) instead of listing method names
of its own; a new method is a new row here plus, when it needs a new kind of prompt, a module in prompts.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ptv2.errors import unknown


@dataclass(frozen=True)
class Method:
    name: str
    frozen: bool  # the backbone's weights stay as loaded; only the prompt and the heads train
    # "prefix": key/value vectors on every chosen layer (deep prompt, prompts.PrefixEncoder); "input": vectors
    # inserted after [CLS] (prompts.InputPrompt); None: no prompt
    prompt: str | None = None
    # An input prompt's reparameterization: "none" for plain embeddings; None: read prompt.encoder (lstm | mlp)
    input_encoder: str | None = None
    # Rows of different checkpoints may share one batch on one backbone: the weights and the token sequence are
    # untouched (serving mixes them; each row gets its own prefix)
    mixes_in_batch: bool = False
    trains_backbone_heads: bool = False  # a verbalizer's MLM head trains although the backbone is frozen
    # PEFT builds the trained part on the frozen backbone (modeling/peft_methods.py): "lora" (low-rank updates of the
    # attention projections) | "prefix" (PEFT's own prefix tuning, the independent implementation beside ptv2's)
    peft: str | None = None
    # A "prefix" method's module class, returned by a function so that the config layer stays free of torch;
    # None: prompts.PrefixEncoder. Built as cls(layers, heads, head_dim, hidden_size, length, projection=...,
    # projection_dim=..., dropout=...)
    prefix_module: Callable[[], type] | None = None
    # Can train an LM head for generation (task.type=generation): False when the prompt reads the whole sequence,
    # which token-by-token decoding never has
    generation: bool = True
    # The training loss, returned by a function so that the config layer stays free of torch: objective(model,
    # batch, head) -> loss (see PromptModel.forward); None: the head's loss on the model's output
    objective: Callable[[], Callable] | None = None

    @property
    def has_prompt(self) -> bool:
        """The method builds a prompt (its own or PEFT's prefix), so prompt.length must be at least 1."""
        return self.prompt is not None or self.peft == "prefix"

    @property
    def input_prompt(self) -> bool:
        """The prompt takes token positions (prompt.length more positions per sequence)."""
        return self.prompt == "input"


def _apt() -> type:
    from ptv2.modeling.apt import AdaptivePrefixEncoder  # Adaptive Prefix Tuning (Zhang et al., 2023)

    return AdaptivePrefixEncoder


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("ptv2", frozen=True, prompt="prefix", mixes_in_batch=True),  # P-Tuning v2 (deep prompt tuning)
        Method("prompt_tuning", frozen=True, prompt="input", input_encoder="none"),  # Lester et al.
        Method("ptuning_v1", frozen=True, prompt="input", input_encoder=None),  # P-tuning v1 (prompt encoder)
        Method("finetune", frozen=False),  # the whole backbone trains: the baseline
        Method("linear_probe", frozen=True, mixes_in_batch=True, trains_backbone_heads=True),  # heads only
        Method("lora", frozen=True, peft="lora"),  # Hu et al.: the attention weights change, so no batch mixing
        # PEFT's prefix tuning: the prefix enters as a cache (generation is refused in config, with that reason)
        Method("peft_prefix", frozen=True, peft="prefix"),
        Method("apt", frozen=True, prompt="prefix", mixes_in_batch=True, prefix_module=_apt, generation=False),  # APT
    )
}
BASELINE = "finetune"  # what bench divides by


def method(name: str) -> Method:
    """The row of `prompt.method`, or one line naming the known methods."""
    if name not in METHODS:
        raise unknown("prompt.method", name, METHODS)
    return METHODS[name]


def mixable() -> list[str]:
    """Methods whose checkpoints share one backbone in a batch."""
    return [name for name, row in METHODS.items() if row.mixes_in_batch]


def parse_layers(spec) -> tuple[str, int | list[int]]:
    """`prompt.layers` read once for every module: ("all", 0), ("top", K), ("bottom", K) or ("list", [i, ...]);
    ValueError for anything else (bounds are the config check's: they need the backbone)."""
    if isinstance(spec, str):
        side, _, count = spec.partition(":")
        if spec == "all":
            return "all", 0
        if side in ("top", "bottom") and count.isdigit():
            return side, int(count)
        raise ValueError(spec)
    if isinstance(spec, (int, bool)) or not all(isinstance(layer, int) for layer in spec):
        raise ValueError(spec)
    return "list", sorted(spec)
