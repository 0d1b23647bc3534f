"""Capped exponential backoff with full jitter, shared by the outbox and the adapters.

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads the
retries of many clients that failed together, so a broker coming back is not hit by
all of them in the same millisecond.
"""

from __future__ import annotations

import random

# 2**60 times any sane base is already far above any cap; stopping the exponent
# here keeps the float conversion from overflowing on absurd attempt numbers.
_MAX_EXPONENT = 60


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """Return the upper bound of the delay for this attempt: min(cap, base * 2**attempt)."""
    exponent = min(max(attempt, 0), _MAX_EXPONENT)
    return min(cap, base * (2**exponent))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Return a delay drawn uniformly from [0, min(cap, base * 2**attempt)], attempt from 0."""
    ceiling = backoff_ceiling(attempt, base, cap)
    uniform = rng.uniform if rng is not None else random.uniform
    return uniform(0.0, ceiling)
