"""The primitives every section's config rules are written with: each raises one ConfigError
naming the key, the bad value and what is allowed."""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from jax_diffusion.errors import ConfigError


def require(condition: bool, key: str, value, rule: str) -> None:
    """ConfigError "config.<key>=<value> <rule>" unless `condition`."""
    if not condition:
        raise ConfigError(f"config.{key}={value!r} {rule}")


def choice(value, key: str, allowed: Sequence[str]) -> None:
    """`value` must be one of `allowed`."""
    require(value in allowed, key, value, f"is unknown; allowed: {', '.join(map(str, allowed))}")


def positive_int(section: ml_collections.ConfigDict, name: str, prefix: str,
                  minimum: int = 1) -> None:
    """section[name] must be an integer >= minimum (prefix: the section's dotted name)."""
    value = section[name]
    require(isinstance(value, (int, np.integer)) and not isinstance(value, bool)
             and value >= minimum, f"{prefix}.{name}", value, f"must be an integer >= {minimum}")


def fraction(value: float, key: str, low: float, high: float, *, high_open: bool) -> None:
    """`value` must lie in [low, high] (or [low, high) with high_open)."""
    inside = low <= value < high if high_open else low <= value <= high
    require(inside, key, value, f"must lie in [{low:g}, {high:g}{')' if high_open else ']'}")
