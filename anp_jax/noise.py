"""Noise transforms: how activation gradients become the noise injected by ANP.

Every noise transform is an :class:`optax.GradientTransformationExtraArgs` over a pytree of
activations (in the trainer, a dict ``{point name: [B, ...]}``, batch first):

* ``init(template) -> state`` builds the transform's state for activations shaped like
  ``template``;
* ``update(grads, state, params=None, *, eps, alpha, k, **extra) -> (noise, new_state)``
  maps the activation gradients ``dloss/dz`` to a pytree of the same shapes.

The step's hyper-parameters come as keyword *extra arguments* (traced scalars, so a schedule
never forces a recompilation; see :mod:`anp_jax.schedules`); each transform reads the ones
it needs and ignores the others.  The trainer also passes ``key=`` (a PRNG key, only to the
update that starts a mini-batch) and ``activations=`` (the activations at the points, see
:func:`scale_by_activation_norm`).  Because they are optax transforms, they compose with
optax: ``optax.chain``, ``optax.named_chain``, ``optax.masked``, ``optax.multi_transform``
(``optax.partition``) and optax's own transforms (``optax.scale``, ``optax.clip``, ...)
work on noise as on parameter updates.  The output of the whole chain is the noise that is
*added* to the activations at the next forward pass.

The official ANP rule (Liu et al.; registers reset for every mini-batch)::

    r <- alpha * r + g / ||g||_2        # per example
    injection = (eps / k) * r

is ``optax.chain(normalize("l2"), accumulate(), scale_by_eps_over_k())``, which is what
:func:`anp` returns.

Per-point rules go through optax's partitioning on the dict of points.  Noise on the input
only, twice the step at the hidden points::

    optax.multi_transform(
        {"input": anp(), "hidden": optax.chain(anp(), optax.scale(2.0))},
        lambda grads: {p: "input" if p == "input" else "hidden" for p in grads})

and the official code's accumulated input gradient (see :func:`accumulate_gradients`)::

    optax.chain(optax.masked(accumulate_gradients(), point_mask("input")), anp())

:func:`scale_by_activation_norm` reads ``activations`` inside ``optax.masked`` and
``optax.multi_transform`` as well.

Writing a new transform takes a few lines.  For example, noise that follows the sign of
the gradient and keeps only a fraction of the previous noise:

>>> import jax
>>> import jax.numpy as jnp
>>> import optax
>>> from anp_jax import noise
>>> def keep_fraction(fraction: float) -> optax.GradientTransformationExtraArgs:
...     def init(params):
...         return jax.tree.map(jnp.zeros_like, params)
...     def update(updates, state, params=None, **extra):
...         new = jax.tree.map(lambda g, r: fraction * r + g, updates, state)
...         return new, new
...     return optax.GradientTransformationExtraArgs(init, update)
>>> noise_tx = optax.chain(noise.sign(), keep_fraction(0.5), noise.scale_by_eps_over_k())
>>> grads = {"conv1": jnp.array([[-2.0, 0.0, 3.0]])}
>>> state = noise_tx.init(grads)
>>> injection, state = noise_tx.update(grads, state, eps=1.0, alpha=0.9, k=2)
>>> injection["conv1"]
Array([[-0.5,  0. ,  0.5]], dtype=float32)
>>> injection, state = noise_tx.update(grads, state, eps=1.0, alpha=0.9, k=2)
>>> injection["conv1"]
Array([[-0.75,  0.  ,  0.75]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
ExtraArgs = Mapping[str, Any]  # the keyword extra arguments of one update
Transform = optax.GradientTransformationExtraArgs

# Guards the per-example division: a gradient whose norm is below this gives zero noise.
_TINY = 1e-12
_NORMS = ("l2", "linf")


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


def _check_norm(ord: str) -> None:
    if ord not in _NORMS:
        raise ValueError(f"unknown norm {ord!r}: expected 'l2' or 'linf'")


def _safe_divide(x: jax.Array, norm: jax.Array) -> jax.Array:
    safe = jnp.where(norm > _TINY, norm, 1.0)
    return jnp.where(norm > _TINY, x.astype(jnp.float32) / safe, 0.0).astype(x.dtype)


def _scaled(updates: PyTree, factor: jax.Array | float) -> PyTree:
    """``factor * updates``, each leaf keeping its dtype."""
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)


def _stateless(fn: Callable[[jax.Array, ExtraArgs], jax.Array]) -> Transform:
    """A stateless transform applying ``fn(leaf, extra_args)`` to every leaf."""

    def init(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None,
               **extra: Any) -> tuple[PyTree, optax.EmptyState]:
        del params
        return jax.tree.map(lambda g: fn(g, extra), updates), state

    return Transform(init, update)


def _hparam(value: float | Callable[[ExtraArgs], Any] | None, name: str, who: str
            ) -> Callable[[ExtraArgs], Any]:
    """Reads a hyper-parameter: ``value`` if given (a number, or a function of the extra
    arguments), else the extra argument ``name`` (a clear error when it is missing)."""
    if callable(value):
        return value
    if value is not None:
        return lambda extra: value

    def get(extra: ExtraArgs) -> Any:
        if name not in extra:
            raise TypeError(f"{who}: update needs the extra argument {name}=")
        return extra[name]

    return get


def normalize(ord: str = "l2") -> Transform:
    """Divides each example by its norm (``"l2"`` or ``"linf"``); zero stays zero."""
    _check_norm(ord)
    return _stateless(lambda g, extra: _safe_divide(g, per_example_norm(g, ord)))


def sign() -> Transform:
    """The sign of the gradient (the L-infinity steepest-ascent direction)."""
    return _stateless(lambda g, extra: jnp.sign(g))


def scale(factor: float | Callable[[ExtraArgs], Any]) -> Transform:
    """Multiplies by ``factor``: a number, or a function of the update's extra arguments
    (for example ``scale(lambda hp: hp["eps"] / hp["k"])``)."""
    get = factor if callable(factor) else (lambda extra: factor)
    return _stateless(lambda g, extra: (g * get(extra)).astype(g.dtype))


def scale_by_eps_over_k() -> Transform:
    """Multiplies by ``eps / k`` (extra arguments): the official ANP injection scale."""

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None, *,
               eps: jax.Array | float, k: jax.Array | int, **extra: Any
               ) -> tuple[PyTree, optax.EmptyState]:
        del params, extra
        return _scaled(updates, eps / k), state

    return Transform(lambda params: optax.EmptyState(), update)


def project(radius: float | Callable[[ExtraArgs], Any] | None = None,
            ord: str = "l2") -> Transform:
    """Projects each example onto the ball of ``radius`` (default: the extra argument
    ``eps``).

    ``"l2"`` rescales examples whose L2 norm exceeds the radius; ``"linf"`` clips values.
    """
    _check_norm(ord)
    get = _hparam(radius, "eps", "project")

    def fn(g: jax.Array, extra: ExtraArgs) -> jax.Array:
        r = jnp.asarray(get(extra), jnp.float32)
        if ord == "linf":
            return jnp.clip(g, -r, r).astype(g.dtype)
        norm = per_example_norm(g, "l2")
        factor = jnp.where(norm > r, r / jnp.maximum(norm, _TINY), 1.0)
        return (g.astype(jnp.float32) * factor).astype(g.dtype)

    return _stateless(fn)


class AccumulateState(NamedTuple):
    """The noise register ``r`` of every perturbation point."""

    register: PyTree


def accumulate(alpha: float | Callable[[ExtraArgs], Any] | None = None) -> Transform:
    """Keeps a register ``r <- alpha * r + update`` and outputs the new ``r``.

    ``alpha`` defaults to the extra argument ``alpha`` (the paper's eta: how much of the
    previous noise is kept).  The register starts at zero and has the dtype of the
    activations.
    """
    get = _hparam(alpha, "alpha", "accumulate")

    def init(params: PyTree) -> AccumulateState:
        return AccumulateState(jax.tree.map(jnp.zeros_like, params))

    def update(updates: PyTree, state: AccumulateState, params: PyTree = None,
               **extra: Any) -> tuple[PyTree, AccumulateState]:
        del params
        a = get(extra)
        new = jax.tree.map(lambda g, r: (a * r + g).astype(r.dtype), updates, state.register)
        return new, AccumulateState(new)

    return Transform(init, update)


def accumulate_gradients() -> Transform:
    """Sums the gradients it sees since ``init``: ``G <- G + g``, outputs ``G``.

    The official code (AnonymousCodeRepo/ANP) never zeroes the input tensor's ``.grad``
    between the ``k`` progressive steps of a mini-batch, so its input register is built
    from ``g1``, then ``g1 + g2``, ..., while hidden points use the current step's
    gradient.  Put this first and on the input point only to train as that code does::

        optax.chain(optax.masked(accumulate_gradients(), point_mask("input")), anp())

    The trainer's config ``anp.accumulate_input_grad`` (default False, also in
    ``anp_jax/configs/cifar10.py``) builds exactly that.  It is :func:`accumulate` with
    ``alpha = 1``; the sum restarts whenever the trainer resets the noise state.
    """
    return accumulate(1.0)


def point_mask(*names: str) -> Callable[[Mapping[str, Any]], dict[str, bool]]:
    """A mask for ``optax.masked`` over the dict of points: True at ``names``."""
    return lambda tree: {point: point in names for point in tree}


def random_init(kind: str = "gaussian", scale: float = 1.0) -> Transform:
    """Adds random noise to the gradients of an update that receives ``key=`` (a PRNG key).

    The draw is ``scale * N(0, 1)`` (``kind="gaussian"``) or ``U(-scale, scale)``
    (``kind="uniform"``), independent for every leaf; an update without ``key`` passes
    gradients through.  The trainer passes a key, drawn from its state's rng for every
    mini-batch, only to the update it makes with zero gradients when it resets the noise,
    so the first forward pass of each mini-batch starts from random noise ("diversified"
    noise) and the progressive steps after it do not redraw.  Put it first in a chain so
    that the random start goes through the same normalisation as gradients.  Stateless.
    """
    if kind not in ("gaussian", "uniform"):
        raise ValueError(f"unknown random_init kind {kind!r}: expected 'gaussian' or 'uniform'")

    def draw(key: jax.Array, leaf: jax.Array) -> jax.Array:
        if kind == "gaussian":
            return scale * jax.random.normal(key, leaf.shape, jnp.float32)
        return jax.random.uniform(key, leaf.shape, jnp.float32, -scale, scale)

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None, *,
               key: jax.Array | None = None, **extra: Any) -> tuple[PyTree, optax.EmptyState]:
        del params, extra
        if key is None:
            return updates, state
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(key, max(len(leaves), 1))
        out = [(g + draw(kk, g)).astype(g.dtype) for kk, g in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, out), state

    return Transform(lambda params: optax.EmptyState(), update)


def scale_by_activation_norm(ord: str = "l2") -> Transform:
    """Multiplies each example by the norm of the activation at its point (extra argument
    ``activations``, a pytree shaped like the gradients).

    After the official rule, ``optax.chain(anp(), scale_by_activation_norm())`` injects
    ``(eps/k) * r * ||z||`` at each point: noise relative to the activation ``z`` (per
    example, over all non-batch axes) instead of absolute, so one ``eps`` suits points
    whose activations have different scales.  The trainer passes, after each forward pass,
    the activations its model sows at the perturbation points (``z`` before the point's
    own noise is added; see ``anp_jax.models.ACTIVATIONS``) and, when it resets the noise
    before the first forward pass of a mini-batch, zeros (no activation is known yet, so
    the first pass carries no noise, and a random start would be scaled to zero: the
    trainer refuses that combination).  Inside ``optax.masked`` or
    ``optax.multi_transform`` the full dict of activations may be passed: masked points
    are skipped.
    """
    _check_norm(ord)

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None, *,
               activations: PyTree = None, **extra: Any) -> tuple[PyTree, optax.EmptyState]:
        del params, extra
        if activations is None:
            raise TypeError("scale_by_activation_norm: update needs the extra argument "
                            "activations= (the activations at the points)")

        def leaf(g: Any, z: jax.Array) -> Any:
            if isinstance(g, optax.MaskedNode):
                return g
            return (g.astype(jnp.float32) * per_example_norm(z, ord)).astype(g.dtype)

        return jax.tree.map(leaf, updates, activations,
                            is_leaf=lambda x: isinstance(x, optax.MaskedNode)), state

    return Transform(lambda params: optax.EmptyState(), update)


def anp(norm: str = "l2", init: str | None = None, init_scale: float = 1.0) -> Transform:
    """The official ANP rule: ``r <- alpha*r + g/||g||``, injection ``(eps/k) * r``.

    ``optax.chain(direction, accumulate(), scale_by_eps_over_k())``, preceded by
    ``random_init(init, init_scale)`` when ``init`` is given; its state is the tuple of
    those transforms' states (``state[1].register`` holds the registers without a random
    start).

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
    return optax.chain(*parts)
