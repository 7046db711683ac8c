"""Noise transforms: how activation gradients become the noise injected by ANP.

A noise transform is a pair of pure functions, in the style of optax:

* ``init(template, rng) -> state`` builds the transform's state for a pytree of
  activations shaped like ``template`` (every leaf has the batch as its leading axis);
* ``update(grads, state, hparams) -> (updates, new_state)`` maps a pytree of
  activation gradients ``dloss/dz`` to a pytree of the same shapes.

``hparams`` is a mapping of scalars (``"eps"``, ``"alpha"``, ``"k"``) that may change
from step to step (see :mod:`anp_jax.schedules`); transforms read the ones they need, so
a schedule never forces a recompilation.  Transforms compose with :func:`chain`; the
output of the whole chain is the noise that is *added* to the activations at the next
forward pass.

The official ANP rule (Liu et al.; registers reset for every mini-batch)::

    r <- alpha * r + g / ||g||_2        # per example
    injection = (eps / k) * r

is ``chain(normalize("l2"), accumulate(), scale_by_eps_over_k())`` and is returned by
:func:`anp`.

Writing a new transform takes a few lines.  For example, noise that follows the sign of
the gradient and keeps only a fraction of the previous noise::

    def keep_fraction(fraction: float) -> NoiseTransform:
        def init(template, rng):
            return jax.tree.map(jnp.zeros_like, template)
        def update(grads, state, hparams):
            new = jax.tree.map(lambda g, r: fraction * r + g, grads, state)
            return new, new
        return NoiseTransform(init, update)

    noise_tx = chain(sign(), keep_fraction(0.5), scale_by_eps_over_k())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
HParams = Mapping[str, jax.Array | float]
InitFn = Callable[[PyTree, jax.Array], PyTree]
UpdateFn = Callable[[PyTree, PyTree, HParams], tuple[PyTree, PyTree]]

# Guards the per-example division: a gradient whose norm is below this gives zero noise.
_TINY = 1e-12


class NoiseTransform(NamedTuple):
    """A pure ``(init, update)`` pair over pytrees of activation gradients."""

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def _stateless(fn: Callable[[jax.Array, HParams], jax.Array]) -> NoiseTransform:
    """Wraps a per-leaf function ``fn(leaf, hparams)`` as a stateless transform."""

    def init(template: PyTree, rng: jax.Array) -> EmptyState:
        del template, rng
        return EmptyState()

    def update(grads: PyTree, state: EmptyState, hparams: HParams) -> tuple[PyTree, EmptyState]:
        return jax.tree.map(lambda g: fn(g, hparams), grads), state

    return NoiseTransform(init, update)


def _per_example(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Reduces ``x`` over every axis but the leading (batch) one, keeping dims."""
    return fn(x.reshape(x.shape[0], -1)).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def per_example_norm(x: jax.Array, ord: str = "l2") -> jax.Array:
    """The norm of each example of ``x`` (``[B, ...]``), shaped ``[B, 1, ..., 1]``.

    Computed in float32 whatever the dtype of ``x``.
    """
    x32 = x.astype(jnp.float32)
    if ord == "l2":
        return jnp.sqrt(_per_example(lambda v: jnp.sum(v * v, axis=1), x32))
    if ord == "linf":
        return _per_example(lambda v: jnp.max(jnp.abs(v), axis=1), x32)
    raise ValueError(f"unknown norm {ord!r}: expected 'l2' or 'linf'")


def _safe_divide(x: jax.Array, norm: jax.Array) -> jax.Array:
    safe = jnp.where(norm > _TINY, norm, 1.0)
    return jnp.where(norm > _TINY, x.astype(jnp.float32) / safe, 0.0).astype(x.dtype)


def normalize(ord: str = "l2") -> NoiseTransform:
    """Divides each example by its norm (``"l2"`` or ``"linf"``); zero stays zero."""
    per_example_norm(jnp.zeros((1, 1)), ord)  # validates ``ord`` at construction.
    return _stateless(lambda g, hp: _safe_divide(g, per_example_norm(g, ord)))


def sign() -> NoiseTransform:
    """The sign of the gradient (the L-infinity steepest-ascent direction)."""
    return _stateless(lambda g, hp: jnp.sign(g))


def scale(factor: float | Callable[[HParams], jax.Array | float]) -> NoiseTransform:
    """Multiplies by ``factor``, a number or a function of the hyper-parameters."""
    get = factor if callable(factor) else (lambda hp: factor)
    return _stateless(lambda g, hp: (g * get(hp)).astype(g.dtype))


def scale_by_eps_over_k() -> NoiseTransform:
    """Multiplies by ``hparams["eps"] / hparams["k"]``: the official ANP injection scale."""
    return scale(lambda hp: hp["eps"] / hp["k"])


def project(radius: float | Callable[[HParams], jax.Array | float] | None = None,
            ord: str = "l2") -> NoiseTransform:
    """Projects each example onto the ball of ``radius`` (default ``hparams["eps"]``).

    ``"l2"`` rescales examples whose L2 norm exceeds the radius; ``"linf"`` clips values.
    """
    per_example_norm(jnp.zeros((1, 1)), ord)
    if radius is None:
        get = lambda hp: hp["eps"]  # noqa: E731
    else:
        get = radius if callable(radius) else (lambda hp: radius)

    def fn(g: jax.Array, hp: HParams) -> jax.Array:
        r = jnp.asarray(get(hp), jnp.float32)
        if ord == "linf":
            return jnp.clip(g, -r, r).astype(g.dtype)
        norm = per_example_norm(g, "l2")
        factor = jnp.where(norm > r, r / jnp.maximum(norm, _TINY), 1.0)
        return (g.astype(jnp.float32) * factor).astype(g.dtype)

    return _stateless(fn)


class AccumulateState(NamedTuple):
    """The noise register ``r`` of every perturbation point."""

    register: PyTree


def accumulate(alpha: float | Callable[[HParams], jax.Array | float] | None = None
               ) -> NoiseTransform:
    """Keeps a register ``r <- alpha * r + update`` and outputs the new ``r``.

    ``alpha`` defaults to ``hparams["alpha"]`` (the paper's eta: how much of the previous
    noise is kept).  The register starts at zero and has the dtype of the activations.
    """
    if alpha is None:
        get = lambda hp: hp["alpha"]  # noqa: E731
    else:
        get = alpha if callable(alpha) else (lambda hp: alpha)

    def init(template: PyTree, rng: jax.Array) -> AccumulateState:
        del rng
        return AccumulateState(jax.tree.map(jnp.zeros_like, template))

    def update(grads: PyTree, state: AccumulateState, hparams: HParams
               ) -> tuple[PyTree, AccumulateState]:
        a = get(hparams)
        new = jax.tree.map(lambda g, r: (a * r + g).astype(r.dtype), grads, state.register)
        return new, AccumulateState(new)

    return NoiseTransform(init, update)


class RandomInitState(NamedTuple):
    """Random noise still to be added to the next gradient (zero once used)."""

    pending: PyTree


def random_init(kind: str = "gaussian", scale: float = 1.0) -> NoiseTransform:
    """Adds random noise to the first gradient it sees ("diversified" noise).

    ``init`` draws ``scale * N(0, 1)`` (``kind="gaussian"``) or ``U(-scale, scale)``
    (``kind="uniform"``) for every leaf; the first ``update`` adds it to the gradients,
    later updates pass gradients through.  Put it first in a chain so the random start
    goes through the same normalisation as gradients.  The trainer calls ``update`` once
    with zero gradients when registers are reset, so the very first forward pass of a
    mini-batch is already perturbed.
    """
    if kind not in ("gaussian", "uniform"):
        raise ValueError(f"unknown random_init kind {kind!r}: expected 'gaussian' or 'uniform'")

    def init(template: PyTree, rng: jax.Array) -> RandomInitState:
        leaves, treedef = jax.tree.flatten(template)
        keys = jax.random.split(rng, max(len(leaves), 1))
        draw = []
        for key, leaf in zip(keys, leaves):
            if kind == "gaussian":
                v = scale * jax.random.normal(key, leaf.shape, jnp.float32)
            else:
                v = jax.random.uniform(key, leaf.shape, jnp.float32, -scale, scale)
            draw.append(v.astype(leaf.dtype))
        return RandomInitState(jax.tree.unflatten(treedef, draw))

    def update(grads: PyTree, state: RandomInitState, hparams: HParams
               ) -> tuple[PyTree, RandomInitState]:
        del hparams
        out = jax.tree.map(lambda g, p: (g + p).astype(g.dtype), grads, state.pending)
        return out, RandomInitState(jax.tree.map(jnp.zeros_like, state.pending))

    return NoiseTransform(init, update)


def chain(*transforms: NoiseTransform) -> NoiseTransform:
    """Applies ``transforms`` one after the other; the state is the tuple of their states."""

    def init(template: PyTree, rng: jax.Array) -> tuple[PyTree, ...]:
        keys = jax.random.split(rng, max(len(transforms), 1))
        return tuple(t.init(template, key) for t, key in zip(transforms, keys))

    def update(grads: PyTree, state: tuple[PyTree, ...], hparams: HParams
               ) -> tuple[PyTree, tuple[PyTree, ...]]:
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, hparams)
            new_state.append(s)
        return grads, tuple(new_state)

    return NoiseTransform(init, update)


def anp(norm: str = "l2", init: str | None = None, init_scale: float = 1.0) -> NoiseTransform:
    """The official ANP rule: ``r <- alpha*r + g/||g||``, injection ``(eps/k) * r``.

    Args:
      norm: ``"l2"`` (official: per-example L2 normalisation), ``"linf"`` (per-example
        division by the largest magnitude) or ``"sign"``.
      init: ``None`` (registers start at zero, as in the official code), ``"gaussian"`` or
        ``"uniform"`` for a random start.
      init_scale: scale of the random start, before normalisation.
    """
    direction = sign() if norm == "sign" else normalize(norm)
    parts = [direction, accumulate(), scale_by_eps_over_k()]
    if init is not None:
        parts.insert(0, random_init(init, init_scale))
    return chain(*parts)
