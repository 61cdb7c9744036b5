"""Top-k schedules: how many experts each token uses at a given training step.

Deterministic schedules are pure functions of (step, total_steps, k_min, k_max) -> k, matching the
SMoE-Dropout / HyperRouter reference (`calculate_gate_number`): the result is always clipped to
[k_min, k_max]. Rounding is Python's round (half to even), as in the reference.

Elastic-k schedules draw k at random at every optimizer step, so that one model learns to work at
every k of the range (the idea of elastic / "Matryoshka" MoE training: expose the experts to many
k during training instead of growing k once, as SMoE-Dropout and HyperRouter do):
- `random_uniform`: k ~ Uniform{k_min, ..., k_max};
- `random_pow2`: k ~ Uniform over the powers of two in [k_min, k_max] (the nested sizes 1, 2, 4,
  ... at which such models are usually evaluated; k_min itself when the range holds none).
With `train.top_k_per_layer` every MoE layer draws its own k at every step; otherwise one draw
serves every layer. A draw is a pure function of (seed, step, layer) (numpy's SeedSequence), so a
run is reproducible from its seed and a resumed run draws exactly the k the uninterrupted run
would have. These are our formulation of the idea; we follow no specific paper's sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

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


def _powers_of_two(k_min: int, k_max: int) -> list[int]:
    ks = [1 << i for i in range(k_max.bit_length()) if k_min <= 1 << i <= k_max]
    return ks or [k_min]


def elastic_support(name: str, k_min: int, k_max: int) -> list[int]:
    """The values an elastic-k schedule draws from, each with equal probability."""
    if name == "random_pow2":
        return _powers_of_two(k_min, k_max)
    return list(range(k_min, k_max + 1))


def draw_top_k(name: str, seed: int, step: int, layer: int, k_min: int, k_max: int) -> int:
    """The k an elastic-k schedule draws at `step` for `layer` (0 for a draw shared by every
    layer): uniform over `elastic_support`, from a generator seeded by (seed, step, layer)."""
    support = elastic_support(name, k_min, k_max)
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, layer, 0x6B]))
    return support[int(rng.integers(len(support)))]


ELASTIC_SCHEDULES = ("random_uniform", "random_pow2")

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
VALID_SCHEDULES = (*SCHEDULES, *ELASTIC_SCHEDULES)


def top_k_at(
    name: str,
    step: int,
    total_steps: int,
    k_min: int,
    k_max: int,
    *,
    seed: int = 0,
    layer: int = 0,
) -> int:
    """k for `step` under the schedule `name`, with the arguments validated (`seed` and `layer`
    matter only to the elastic-k schedules)."""
    if name not in VALID_SCHEDULES:
        raise HyperRouterError(
            f"unknown top-k schedule {name!r}; valid: {', '.join(VALID_SCHEDULES)}"
        )
    if not 1 <= k_min <= k_max:
        raise HyperRouterError(f"top-k schedule needs 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if total_steps < 1:
        raise HyperRouterError(f"top-k schedule needs total_steps >= 1, got {total_steps}")
    if name in ELASTIC_SCHEDULES:
        return draw_top_k(name, seed, step, layer, k_min, k_max)
    return SCHEDULES[name](step, total_steps, k_min, k_max)
