"""What a setting of a structured config declares beside its field: its roles and the values it admits.

`tagged(default, *roles, admits=...)` is used by every schema (config.py's command schemas and each prompt method's
settings in modeling/methods/), so that the key, its default, its roles and its allowed values are written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The roles of config keys, read by every module that treats a kind of key alike (config.keys_with).
PATH = "path"  # a path on the machine that wrote it: a checkpoint's is never used (cleared to the default)
FREE = "free"  # changes nothing a run computes: a resume may change it, `ptv2 table` does not tell runs apart by it
REPLICATE = "replicate"  # runs that differ only here are replicates: `ptv2 table` aggregates them (mean ± std)
ALIAS = "alias"  # another key names the same thing (backbone.name; the data): `ptv2 table` reads that one
PER_JOB = "per_job"  # may differ between the jobs of one packed group (it lives in a job's prompt, head, optimizer)
COMMAND = "command"  # a key of `ptv2 eval` / `predict` / `serve`, not of the run


@dataclass(frozen=True)
class Range:
    """The numbers a setting admits: from `low` to `high` (None: unbounded), either end excluded when *_open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False  # null is allowed (the setting is off)

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low, high = (str(int(x)) if x is not None and float(x).is_integer() else f"{x}" for x in (self.low, self.high))
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {low}"
        else:
            text = f"{kind} {'<' if self.high_open else '<='} {high}"
        return f"null or {text}" if self.optional else text


MAX_PROMPT_LENGTH = 4096
COUNT, SOME_COUNT = Range(1, integer=True), Range(1, integer=True, optional=True)
PROBABILITY = Range(0, 1, high_open=True)  # dropout
POSITIVE = Range(0, low_open=True)


def tagged(default: Any = None, *roles: str, admits: Range | tuple | None = None, factory=None):
    """A schema field with its roles (PATH, FREE, ...) and the values it admits (a Range, or a tuple of choices);
    factory: a default_factory instead of a default."""
    metadata = {"roles": frozenset(roles), "admits": admits}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
