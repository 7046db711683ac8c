"""Schedules: pure functions from a count (step or epoch) to a hyper-parameter value.

Every schedule is a plain function ``count -> value`` that works on Python numbers and on
traced JAX scalars alike, like optax's schedules.  ANP uses three of them, for ``eps``
(noise magnitude), ``alpha`` (how much previous noise is kept) and ``k`` (progressive
steps, an integer that may change during training).  The trainer evaluates them on the
fractional epoch of each mini-batch.

A schedule of your own is any function of the count, for example a step-down of eps::

    def halve_after_ten(epoch):
        return jnp.where(epoch < 10, 1.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Schedule = Callable[[float], float]


def constant(value: float) -> Schedule:
    """Always ``value``."""
    return lambda count: jnp.asarray(value) + 0 * jnp.asarray(count)


def piecewise_constant(boundaries: Sequence[float], values: Sequence[float]) -> Schedule:
    """``values[i]`` on ``[boundaries[i-1], boundaries[i])``; needs one more value than
    boundaries, which must increase."""
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"piecewise_constant needs {len(boundaries) + 1} values for "
                         f"{len(boundaries)} boundaries, got {len(values)}")
    if any(b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"piecewise_constant boundaries must increase: {list(boundaries)}")
    bounds = jnp.asarray(boundaries, jnp.float32)
    table = jnp.asarray(values)

    def schedule(count: float) -> float:
        index = jnp.sum(jnp.asarray(count, jnp.float32) >= bounds)
        return table[index]

    return schedule


def _ramp(shape: Callable[[jax.Array], jax.Array], init_value: float, end_value: float,
          transition: float, start: float) -> Schedule:
    """``init_value`` until ``start``, then ``shape(fraction)`` of the way to ``end_value``."""
    if transition <= 0:
        raise ValueError(f"schedule needs transition > 0, got {transition}")

    def schedule(count: float) -> float:
        frac = jnp.clip((jnp.asarray(count, jnp.float32) - start) / transition, 0.0, 1.0)
        return init_value + shape(frac) * (end_value - init_value)

    return schedule


def linear(init_value: float, end_value: float, transition: float,
           start: float = 0.0) -> Schedule:
    """``init_value`` until ``start``, then linearly to ``end_value`` over ``transition``."""
    return _ramp(lambda f: f, init_value, end_value, transition, start)


def cosine(init_value: float, end_value: float, transition: float,
           start: float = 0.0) -> Schedule:
    """``init_value`` until ``start``, then along half a cosine to ``end_value``."""
    return _ramp(lambda f: 0.5 * (1.0 - jnp.cos(math.pi * f)), init_value, end_value,
                 transition, start)


def step_decay(init_value: float, every: float, factor: float, num_epochs: float,
               offset: float = 0.0) -> Schedule:
    """``init_value * factor ** n`` after ``n`` drops, one every ``every`` epochs, the first
    at ``every - offset`` (drops at or beyond ``num_epochs`` are left out).

    ``offset=1`` is PyTorch's ``StepLR(step_size=every)`` stepped at the start of every
    epoch, as the official ANP code does: with ``every=30`` the rate drops at epochs 29, 59
    and 89 (0-indexed), one epoch before "every 30 epochs" (and, for 120 epochs, once more
    at epoch 119, StepLR's 120th step).
    """
    if every <= 0 or not 0 <= offset < every:
        raise ValueError(f"step_decay needs every > 0 and 0 <= offset < every, got "
                         f"every={every}, offset={offset}")
    bounds = []
    while (every * (len(bounds) + 1) - offset) < num_epochs:
        bounds.append(every * (len(bounds) + 1) - offset)
    return piecewise_constant(bounds, [init_value * factor ** i for i in range(len(bounds) + 1)])


# The official CIFAR-10 schedule (VGG-16-BN, 120 epochs): epoch boundaries and values.
OFFICIAL_BOUNDARIES = (40, 60, 80, 100)
OFFICIAL_EPS = (0.0, 0.3, 1.0, 0.3, 0.0)
OFFICIAL_ALPHA = (0.0, 0.7, 1.0, 0.7, 0.0)
OFFICIAL_K = (1, 3, 3, 3, 1)


def official_cifar10(num_epochs: float = 120, peak: float = 1.0) -> dict[str, Schedule]:
    """The official eps/alpha/k schedule over epochs, stretched to ``num_epochs``.

    For 120 epochs: clean for 0-39, (0.3, 0.7, 3) for 40-59, (1.0, 1.0, 3) for 60-79,
    (0.3, 0.7, 3) for 80-99, clean for 100-119.  ``peak`` scales the eps column (the
    table's own peak is 1.0): the same shape with less or more noise.
    """
    bounds = [b * num_epochs / 120 for b in OFFICIAL_BOUNDARIES]
    return {
        "eps": piecewise_constant(bounds, [peak * e for e in OFFICIAL_EPS]),
        "alpha": piecewise_constant(bounds, OFFICIAL_ALPHA),
        "k": piecewise_constant(bounds, OFFICIAL_K),
    }
