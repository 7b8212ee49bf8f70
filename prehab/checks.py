"""Type predicates for argument validation, shared by ``PrehabModule`` and the callbacks.

Configs arrive from YAML and Python alike: ``True`` is an ``int`` and ``nan`` a ``float``, so "a number" and
"a count" need more than ``isinstance``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_count", "is_real"]


def is_real(value: Any) -> bool:
    """A finite int or float (not a bool, not NaN/Inf)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any, minimum: int) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
