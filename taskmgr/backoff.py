"""The one backoff formula, for the manager's retries and rejections and the runner's
failed polls alike."""

from __future__ import annotations

import random

_RNG = random.Random()


def backoff_s(failures: int, base_s: float, max_s: float, rng: random.Random = _RNG) -> float:
    """The delay after the n-th failure in a row (n >= 1): `base_s * 2^(n-1)`, capped at
    `max_s`, half of it fixed and half random, so the retries of many tasks that failed
    together spread out."""
    delay = min(max_s, base_s * 2 ** max(0, failures - 1))
    return delay / 2 + rng.uniform(0, delay / 2)
