"""Top-k schedules: how many experts each token uses at a given training step.

Pure functions of (step, total_steps, k_min, k_max) -> k, matching the SMoE-Dropout / HyperRouter
reference (`calculate_gate_number`): the result is always clipped to [k_min, k_max]. Rounding is
Python's round (half to even), as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hyperrouter.errors import HyperRouterError

MULTI_STEP_KS = (1, 2, 4, 8, 16)


def _clip(k: float, k_min: int, k_max: int) -> int:
    return int(min(max(k, k_min), k_max))


def constant(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """Always k_max (a fixed k: set k_min = k_max = k)."""
    return k_max


def linear_increase(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """k_min -> k_max linearly: round((k_max - k_min) * step / T) + k_min (SMoE-Dropout)."""
    return _clip(round((k_max - k_min) * step / total_steps) + k_min, k_min, k_max)


def linear_decrease(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """k_max -> k_min linearly: round((k_min - k_max) * step / T) + k_max."""
    return _clip(round((k_min - k_max) * step / total_steps) + k_max, k_min, k_max)


def cosine_decrease(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """round((k_max - k_min) * cos(pi * step / (2T))) + k_min: k_max at 0, k_min at T."""
    value = math.cos(math.pi * step / (2 * total_steps))
    return _clip(round((k_max - k_min) * value) + k_min, k_min, k_max)


def cosine_increase(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """round((k_min - k_max) * cos(pi * step / (2T))) + k_max: k_min at 0, k_max at T."""
    value = math.cos(math.pi * step / (2 * total_steps))
    return _clip(round((k_min - k_max) * value) + k_max, k_min, k_max)


def exp_increase(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """round((k_min - k_max) * 0.99 ** (step // (T // 300))) + k_max (reference's exp schedule).

    For T < 300 the reference divides by zero; we use a period of 1 step there.
    """
    period = max(total_steps // 300, 1)
    value = 0.99 ** (step // period)
    return _clip(round((k_min - k_max) * value) + k_max, k_min, k_max)


def multi_step_increase(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """k from [1, 2, 4, 8, 16] in 5 equal phases, clipped to [k_min, k_max]."""
    index = min(int(len(MULTI_STEP_KS) * step / total_steps), len(MULTI_STEP_KS) - 1)
    return _clip(MULTI_STEP_KS[index], k_min, k_max)


def multi_step_decrease(step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """k from [16, 8, 4, 2, 1] in 5 equal phases, clipped to [k_min, k_max]."""
    index = min(int(len(MULTI_STEP_KS) * step / total_steps), len(MULTI_STEP_KS) - 1)
    return _clip(MULTI_STEP_KS[::-1][index], k_min, k_max)


SCHEDULES: dict[str, Callable[[int, int, int, int], int]] = {
    f.__name__: f
    for f in (
        constant,
        linear_increase,
        linear_decrease,
        cosine_increase,
        cosine_decrease,
        exp_increase,
        multi_step_increase,
        multi_step_decrease,
    )
}


def top_k_at(name: str, step: int, total_steps: int, k_min: int, k_max: int) -> int:
    """k for `step` under the schedule `name`, with the arguments validated."""
    if name not in SCHEDULES:
        raise HyperRouterError(f"unknown top-k schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if not 1 <= k_min <= k_max:
        raise HyperRouterError(f"top-k schedule needs 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if total_steps < 1:
        raise HyperRouterError(f"top-k schedule needs total_steps >= 1, got {total_steps}")
    return SCHEDULES[name](step, total_steps, k_min, k_max)
