"""White-box adversarial attacks on image classifiers.

Every attack is a pure, batched, ``jax.jit``-able function with the calling convention
``attack(logits_fn, x, y, eps, **hyper_parameters) -> x_adv`` where

* ``logits_fn`` maps images ``[B, H, W, C]`` (float32, pixel scale ``[0, 1]``) to logits
  ``[B, num_classes]``; it must treat examples independently (e.g. batch norm in inference
  mode), because the attacks differentiate the cross-entropy *summed* over the batch to get
  one gradient per example;
* ``x`` are the clean images ``[B, H, W, C]`` in ``[0, 1]``;
* ``y`` are integer labels ``[B]``;
* ``eps`` is the budget in ``[0, 1]`` pixel units, a Python float or a traced scalar,
  measured per example in the attack's norm (``"linf"`` or ``"l2"``).

The returned adversarial images have the shape and dtype of ``x``, lie in ``[0, 1]`` and
inside the ``eps``-ball around ``x``.  Hyper-parameters are keyword-only; those that shape the
traced program (``num_steps``, ``restarts``, ``norm``, ``random_start``) must be static::

    attack = jax.jit(functools.partial(pgd, logits_fn, num_steps=20))
    x_adv = attack(x, y, 8 / 255, rng=key)

Attacks are named by ids such as ``pgd10_linf_0.1`` (see :func:`attack_id` and
:func:`parse_attack_id`); :data:`ATTACKS` maps the name part of an id to its function.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from anp_jax.noise import _TINY, per_example_norm

LogitsFn = Callable[[jax.Array], jax.Array]
Attack = Callable[..., jax.Array]
Scalar = float | jax.Array

NORMS = ("linf", "l2")



def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def per_example(mask: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes a per-example array ``[B]`` to broadcast against ``like`` ``[B, ...]``."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _cross_entropy(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example cross-entropy ``[B]`` (nats)."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits_fn(x), y)


def _loss_and_grad(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy ``[B]`` and its gradient w.r.t. ``x`` ``[B, H, W, C]``."""

    def total(x_: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses = _cross_entropy(logits_fn, x_, y)
        return jnp.sum(losses), losses

    (_, losses), grad = jax.value_and_grad(total, has_aux=True)(x)
    return losses, grad


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    """Steepest-ascent direction of unit ``norm``: ``sign(g)`` (linf) or ``g / ||g||_2`` (l2)."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / (per_example_norm(grad) + _TINY)


def project(x_adv: jax.Array, x: jax.Array, eps: Scalar, norm: str) -> jax.Array:
    """Projects ``x_adv`` onto the ``eps``-ball around ``x`` (per example), then onto ``[0, 1]``.

    Clipping to ``[0, 1]`` moves every pixel towards ``x`` (which is in ``[0, 1]``), so it never
    leaves the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / (per_example_norm(delta) + _TINY))
    return jnp.clip(x + delta, 0.0, 1.0)


def uniform_start(key: jax.Array, x: jax.Array, eps: Scalar, norm: str) -> jax.Array:
    """A point drawn uniformly from the ``eps``-ball around ``x``, clipped to ``[0, 1]``."""
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    else:
        key_direction, key_radius = jax.random.split(key)
        direction = jax.random.normal(key_direction, x.shape, x.dtype)
        dim = math.prod(x.shape[1:])
        u = jax.random.uniform(key_radius, (x.shape[0],), x.dtype)
        radius = per_example(eps * u ** (1.0 / dim), x)
        delta = radius * direction / (per_example_norm(direction) + _TINY)
    return project(x + delta, x, eps, norm)


def accuracy(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction (float32 scalar) of images ``x`` ``[B, H, W, C]`` classified as ``y`` ``[B]``."""
    return jnp.mean(jnp.argmax(logits_fn(x), axis=-1) == y)


def fgsm(
    logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *, norm: str = "linf"
) -> jax.Array:
    """Fast gradient (sign) method: one step of size ``eps`` up the cross-entropy.

    Args:
      logits_fn: images ``[B, H, W, C]`` in ``[0, 1]`` -> logits ``[B, K]``.
      x: clean images ``[B, H, W, C]`` in ``[0, 1]``.
      y: integer labels ``[B]``.
      eps: budget in pixel units.
      norm: ``"linf"`` (``x + eps * sign(g)``) or ``"l2"`` (``x + eps * g / ||g||_2``).

    Returns:
      Adversarial images ``[B, H, W, C]`` in ``[0, 1]`` and in the ``eps``-ball around ``x``.
    """
    check_norm(norm)
    _, grad = _loss_and_grad(logits_fn, x, y)
    return project(x + eps * ascent_direction(grad, norm), x, eps, norm)


def step_ll(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar) -> jax.Array:
    """Step-LL (Kurakin et al. 2017): one linf step *towards* the least-likely class.

    ``x_adv = clip(x - eps * sign(dCE(x, y_ll)/dx), 0, 1)`` with ``y_ll = argmin logits(x)``.

    Args:
      logits_fn: images ``[B, H, W, C]`` in ``[0, 1]`` -> logits ``[B, K]``.
      x: clean images ``[B, H, W, C]`` in ``[0, 1]``.
      y: integer labels ``[B]``; not used (the target is the least-likely class), accepted so
        that every attack has the same signature.
      eps: linf budget in pixel units.

    Returns:
      Adversarial images ``[B, H, W, C]`` in ``[0, 1]`` with ``max |x_adv - x| <= eps``.
    """
    del y
    y_ll = jnp.argmin(logits_fn(x), axis=-1)
    _, grad = _loss_and_grad(logits_fn, x, y_ll)
    return project(x - eps * jnp.sign(grad), x, eps, "linf")


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    eps: Scalar,
    *,
    rng: jax.Array,
    num_steps: int = 10,
    step_size: Scalar | None = None,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
) -> jax.Array:
    """Projected gradient descent on the cross-entropy (Madry et al. 2018).

    Each run starts from a point drawn uniformly from the ``eps``-ball (or from ``x`` when
    ``random_start`` is false) and takes ``num_steps`` steepest-ascent steps of ``step_size``,
    projecting back onto the ball and ``[0, 1]`` after each one.  With ``restarts > 1`` run ``r``
    uses the ``r``-th key of ``jax.random.split(rng, restarts)`` (a single run uses ``rng``
    itself) and each example keeps the result of the first run that misclassifies it or, if no
    run does, the result with the highest loss.

    Args:
      logits_fn: images ``[B, H, W, C]`` in ``[0, 1]`` -> logits ``[B, K]``.
      x: clean images ``[B, H, W, C]`` in ``[0, 1]``.
      y: integer labels ``[B]``.
      eps: budget in pixel units.
      rng: PRNG key for the random starts.
      num_steps: number of gradient steps per run (static, >= 1).
      step_size: step length in pixel units, in ``norm``; defaults to ``2.5 * eps / num_steps``.
      norm: ``"linf"`` or ``"l2"`` (static).
      restarts: number of runs (static, >= 1).
      random_start: whether runs start at a random point of the ball (static).

    Returns:
      Adversarial images ``[B, H, W, C]`` in ``[0, 1]`` and in the ``eps``-ball around ``x``.
    """
    check_norm(norm)
    if num_steps < 1 or restarts < 1:
        raise ValueError(f"num_steps and restarts must be >= 1, got {num_steps}, {restarts}")
    alpha = 2.5 * eps / num_steps if step_size is None else step_size

    def step(_: jax.Array, x_adv: jax.Array) -> jax.Array:
        _, grad = _loss_and_grad(logits_fn, x_adv, y)
        return project(x_adv + alpha * ascent_direction(grad, norm), x, eps, norm)

    def run(key: jax.Array) -> jax.Array:
        x_adv = uniform_start(key, x, eps, norm) if random_start else x
        return jax.lax.fori_loop(0, num_steps, step, x_adv)

    if restarts == 1:
        return run(rng)

    def restart(
        carry: tuple[jax.Array, jax.Array, jax.Array], key: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        x_best, loss_best, fooled_best = carry
        x_new = run(key)
        logits = logits_fn(x_new)
        loss_new = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
        fooled_new = jnp.argmax(logits, axis=-1) != y
        take = ~fooled_best & (fooled_new | (loss_new > loss_best))
        carry = (
            jnp.where(per_example(take, x), x_new, x_best),
            jnp.where(take, loss_new, loss_best),
            fooled_best | fooled_new,
        )
        return carry, None

    batch = x.shape[0]
    init = (x, jnp.full((batch,), -jnp.inf, x.dtype), jnp.zeros((batch,), bool))
    (x_best, _, _), _ = jax.lax.scan(restart, init, jax.random.split(rng, restarts))
    return x_best


def mi_fgsm(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    eps: Scalar,
    *,
    num_steps: int = 10,
    decay: float = 1.0,
    step_size: Scalar | None = None,
) -> jax.Array:
    """Momentum iterative FGSM (Dong et al. 2018), linf.

    ``m <- decay * m + g / mean|g|`` (per example), ``x <- proj(x + step_size * sign(m))``,
    starting from the clean images with ``m = 0``.

    Args:
      logits_fn: images ``[B, H, W, C]`` in ``[0, 1]`` -> logits ``[B, K]``.
      x: clean images ``[B, H, W, C]`` in ``[0, 1]``.
      y: integer labels ``[B]``.
      eps: linf budget in pixel units.
      num_steps: number of steps (static, >= 1).
      decay: momentum decay factor ``mu``.
      step_size: linf step in pixel units; defaults to ``eps / num_steps``.

    Returns:
      Adversarial images ``[B, H, W, C]`` in ``[0, 1]`` with ``max |x_adv - x| <= eps``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    alpha = eps / num_steps if step_size is None else step_size

    def step(_: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x_adv, momentum = carry
        _, grad = _loss_and_grad(logits_fn, x_adv, y)
        l1_mean = jnp.mean(jnp.abs(grad), axis=tuple(range(1, grad.ndim)), keepdims=True)
        momentum = decay * momentum + grad / jnp.maximum(l1_mean, _TINY)
        return project(x_adv + alpha * jnp.sign(momentum), x, eps, "linf"), momentum

    x_adv, _ = jax.lax.fori_loop(0, num_steps, step, (x, jnp.zeros_like(x)))
    return x_adv


def apgd_ce(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *, rng: jax.Array,
            num_steps: int = 10, norm: str = "linf", rho: float = 0.75) -> jax.Array:
    """APGD on the cross-entropy (Croce & Hein 2020): the highest-loss point of
    :func:`anp_jax.evaluation.autoattack.apgd` (see there), ``[B, H, W, C]``."""
    from anp_jax.evaluation import autoattack

    return autoattack.apgd(logits_fn, x, y, eps, rng=rng, num_steps=num_steps, norm=norm,
                           rho=rho).x_best


ATTACKS: dict[str, Attack] = {
    "fgsm": fgsm,
    "stepll": step_ll,
    "pgd": pgd,
    "mifgsm": mi_fgsm,
    "apgd": apgd_ce,
}

_ID_PATTERN = re.compile(r"([a-z]+)([1-9][0-9]*)?_(linf|l2)_([0-9.eE+-]+)")


def attack_id(name: str, norm: str, eps: float, steps: int | None = None) -> str:
    """The id of an attack configuration, e.g. ``pgd10_linf_0.1`` or ``fgsm_l2_0.5``.

    Args:
      name: a key of :data:`ATTACKS`.
      norm: ``"linf"`` or ``"l2"``.
      eps: budget in pixel units, written with ``f"{eps:g}"`` (6 significant digits).
      steps: number of iterations, omitted from the id when ``None``.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    check_norm(norm)
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 or None, got {steps}")
    return f"{name}{'' if steps is None else steps}_{norm}_{eps:g}"


def parse_attack_id(id_: str) -> tuple[str, str, float, int | None]:
    """Inverse of :func:`attack_id`: ``"pgd20_l2_0.5" -> ("pgd", "l2", 0.5, 20)``."""
    match = _ID_PATTERN.fullmatch(id_)
    if match is None or match[1] not in ATTACKS:
        raise ValueError(f"not an attack id: {id_!r}")
    name, steps, norm, eps = match.groups()
    try:
        budget = float(eps)
    except ValueError:
        raise ValueError(f"not an attack id: {id_!r}") from None
    return name, norm, budget, int(steps) if steps else None
