"""AutoAttack (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, and their cascade.

The attacks are pure, batched, ``jax.jit``-able functions in the convention of
:mod:`anp_jax.attacks` (``logits_fn`` maps images ``[B, H, W, C]`` in ``[0, 1]`` to logits
``[B, K]`` and treats examples independently; budgets ``eps`` in pixel units, per example, in
the norm ``"linf"`` or ``"l2"``):

* :func:`apgd` -- Auto-PGD on the cross-entropy (APGD-CE), the DLR loss or the targeted DLR
  loss (APGD-T, :func:`apgd_targeted`), with the paper's step-size schedule
  (:func:`apgd_checkpoints`); one iteration at a time: :func:`apgd_init`,
  :func:`apgd_step`, :func:`apgd_result`;
* :func:`fab_targeted` -- FAB-T, the minimum-norm attack along linearised decision
  hyperplanes towards one target class (:func:`fab_init`, :func:`fab_step`,
  :func:`fab_finish`);
* :func:`square` -- the score-based, gradient-free Square attack (margin loss), also as
  :func:`square_init` / :func:`square_steps` for runs in chunks.

The one-iteration forms let the host drive the iterations, which :func:`autoattack` does on
CPU: XLA:CPU runs the convolution gradients inside ``lax.scan``/``fori_loop`` about twice
as slowly as outside (measured on the digits CNN, batch 384: 99 vs 48 ms per APGD step).

:func:`autoattack` runs the cascade of a version (:data:`VERSIONS`: ``"standard"`` is the
published AutoAttack; ``"quick"`` is a cheaper diagnostic and *not* AutoAttack) over a data
set, pmapped over devices, each attack only on the examples every previous attack failed on,
and returns a RobustBench-style record; :func:`sanity_checks` judges records (strength at
twice the iterations, gradient masking, targeted vs untargeted).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anp_jax import attacks
from anp_jax import data as data_lib
from anp_jax.noise import _TINY, per_example_norm
from anp_jax.train import logits_fn as model_logits_fn

LogitsFn = Callable[[jax.Array], jax.Array]
Scalar = float | jax.Array
PyTree = Any

LOSSES = ("ce", "dlr", "dlr_targeted")

_AXIS = "batch"


# --------------------------------------------------------------------------------------------
# Losses


def _at(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``logits[b, labels[b]]``, ``[B]``."""
    return jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Untargeted DLR loss ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, ``[B]``.

    ``z_pi1 >= z_pi2 >= ...`` are the sorted logits ``[B, K]`` (``K >= 3``); positive exactly
    where the example is misclassified.
    """
    z = jnp.sort(logits, axis=-1)
    z_y = _at(logits, y)
    z_other = jnp.where(jnp.argmax(logits, -1) == y, z[:, -2], z[:, -1])
    return -(z_y - z_other) / (z[:, -1] - z[:, -3] + _TINY)


def dlr_loss_targeted(logits: jax.Array, y: jax.Array, y_target: jax.Array) -> jax.Array:
    """Targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, ``[B]`` (``K >= 4``)."""
    z = jnp.sort(logits, axis=-1)
    return -(_at(logits, y) - _at(logits, y_target)) / (
        z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + _TINY)


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """``z_y - max_{i != y} z_i``, ``[B]``: positive exactly where ``y`` wins."""
    others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return _at(logits, y) - jnp.max(others, axis=-1)


def target_class(logits: jax.Array, rank: int | jax.Array) -> jax.Array:
    """The class with the ``rank``-th largest logit (``rank`` 2 = runner-up), ``[B]`` int32.

    ``rank`` may be traced; AutoAttack's targets are ranks ``2 .. num_targets + 1`` of the
    clean logits.
    """
    order = jnp.argsort(logits, axis=-1)
    index = jnp.full((logits.shape[0], 1), logits.shape[-1] - rank, jnp.int32)
    return jnp.take_along_axis(order, index, axis=-1)[:, 0].astype(jnp.int32)


def _loss_fn(loss: str, y: jax.Array, y_target: jax.Array | None
             ) -> Callable[[jax.Array], jax.Array]:
    if loss == "ce":
        return lambda logits: optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
    if loss == "dlr":
        return lambda logits: dlr_loss(logits, y)
    if loss == "dlr_targeted":
        if y_target is None:
            raise ValueError("loss 'dlr_targeted' needs y_target")
        return lambda logits: dlr_loss_targeted(logits, y, y_target)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _norm(v: jax.Array, norm: str) -> jax.Array:
    """Per-example ``norm`` of ``v`` ``[B, ...]``, shaped ``[B]``."""
    if norm == "linf":
        return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=-1)
    return per_example_norm(v).reshape(v.shape[0])


# --------------------------------------------------------------------------------------------
# APGD


def apgd_checkpoints(num_steps: int) -> list[int]:
    """APGD's checkpoints ``w_j = ceil(p_j * num_steps)`` with ``0 < w_j < num_steps``.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``;
    duplicates (possible for small ``num_steps``) are merged.  At ``w_j`` the step size is
    halved where a condition of :func:`apgd` holds.
    """
    checkpoints = set()
    p_prev, p = 0.0, 0.22
    while p < 1.0:
        # Rounding guards against float noise such as 0.22 * 100 = 22.000000000000004.
        checkpoints.add(math.ceil(round(p * num_steps, 6)))
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return sorted(w for w in checkpoints if 0 < w < num_steps)


class APGDResult(NamedTuple):
    """What :func:`apgd` found, per example."""

    x_adv: jax.Array  # a misclassified iterate where one was found, else x_best [B, H, W, C]
    fooled: jax.Array  # whether some iterate was misclassified, [B] bool
    x_best: jax.Array  # the highest-loss iterate, [B, H, W, C]
    loss_best: jax.Array  # its loss, [B]
    step_sizes: jax.Array | None = None  # step size eta^(k) of every iteration, [num_steps, B]


class APGDState(NamedTuple):
    """APGD's per-example state between iterations (all ``[B, ...]``)."""

    x_adv: jax.Array  # current iterate x^(k)
    x_prev: jax.Array  # previous iterate x^(k-1)
    grad: jax.Array  # gradient at x_adv
    loss: jax.Array  # loss at x_adv
    step_size: jax.Array  # eta^(k)
    x_best: jax.Array
    grad_best: jax.Array
    loss_best: jax.Array
    num_increases: jax.Array  # loss increases since the last checkpoint, int32
    loss_best_at_check: jax.Array  # loss_best at the last checkpoint
    reduced_at_check: jax.Array  # whether the step was halved at the last checkpoint
    x_found: jax.Array  # last misclassified iterate
    fooled: jax.Array  # bool
    y_target: jax.Array  # target classes of the targeted loss (else y), int32


def _loss_grad(logits_fn: LogitsFn, z: jax.Array, y: jax.Array, y_target: jax.Array,
               loss: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example loss ``[B]``, its gradient w.r.t. ``z`` and whether ``z`` is misclassified."""
    per_example_loss = _loss_fn(loss, y, y_target)

    def total(z_: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        logits = logits_fn(z_)
        losses = per_example_loss(logits)
        return jnp.sum(losses), (losses, jnp.argmax(logits, -1) != y)

    (_, (losses, fooled)), grad = jax.value_and_grad(total, has_aux=True)(z)
    return losses, grad, fooled


def _where(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(attacks.per_example(mask, a), a, b)


def apgd_init(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *,
              rng: jax.Array, norm: str = "linf", loss: str = "ce",
              y_target: jax.Array | None = None) -> APGDState:
    """APGD's state at a uniform random start in the ball (see :func:`apgd`)."""
    attacks.check_norm(norm)
    y_target = y.astype(jnp.int32) if y_target is None else y_target.astype(jnp.int32)
    x0 = attacks.uniform_start(rng, x, eps, norm)
    loss0, grad0, fooled0 = _loss_grad(logits_fn, x0, y, y_target, loss)
    batch = x.shape[0]
    return APGDState(
        x_adv=x0, x_prev=x0, grad=grad0, loss=loss0,
        step_size=jnp.full((batch,), 2.0, x.dtype) * eps,
        x_best=x0, grad_best=grad0, loss_best=loss0,
        num_increases=jnp.zeros((batch,), jnp.int32), loss_best_at_check=loss0,
        reduced_at_check=jnp.zeros((batch,), bool), x_found=x0, fooled=fooled0,
        y_target=y_target)


def apgd_step(logits_fn: LogitsFn, s: APGDState, x: jax.Array, y: jax.Array, eps: Scalar,
              k: int | jax.Array, *, num_steps: int, norm: str = "linf", loss: str = "ce",
              rho: float = 0.75, momentum: float = 0.75) -> APGDState:
    """Iteration ``k`` (may be traced) of an APGD run of ``num_steps`` (see :func:`apgd`)."""
    # Static tables over k: whether x^(k+1) is a checkpoint and, if so, the number of
    # iterations since the previous one.
    is_checkpoint = np.zeros(num_steps, bool)
    interval = np.zeros(num_steps, np.float32)
    previous = 0
    for w in apgd_checkpoints(num_steps):
        is_checkpoint[w - 1], interval[w - 1], previous = True, w - previous, w
    at_checkpoint, since = jnp.asarray(is_checkpoint)[k], jnp.asarray(interval)[k]
    alpha = jnp.where(k == 0, 1.0, momentum)
    step = attacks.per_example(s.step_size, x) * attacks.ascent_direction(s.grad, norm)
    z = attacks.project(s.x_adv + step, x, eps, norm)
    x_new = attacks.project(
        s.x_adv + alpha * (z - s.x_adv) + (1.0 - alpha) * (s.x_adv - s.x_prev), x, eps, norm)
    loss_new, grad_new, fooled_new = _loss_grad(logits_fn, x_new, y, s.y_target, loss)
    num_increases = s.num_increases + (loss_new > s.loss)
    improved = loss_new > s.loss_best
    x_best = _where(improved, x_new, s.x_best)
    grad_best = _where(improved, grad_new, s.grad_best)
    loss_best = jnp.where(improved, loss_new, s.loss_best)
    too_few_increases = num_increases < rho * since
    stalled = ~s.reduced_at_check & (loss_best <= s.loss_best_at_check)
    reduce = at_checkpoint & (too_few_increases | stalled)
    return APGDState(
        x_adv=_where(reduce, x_best, x_new),
        x_prev=_where(reduce, x_best, s.x_adv),
        grad=_where(reduce, grad_best, grad_new),
        loss=jnp.where(reduce, loss_best, loss_new),
        step_size=jnp.where(reduce, s.step_size / 2, s.step_size),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        num_increases=jnp.where(at_checkpoint, 0, num_increases),
        loss_best_at_check=jnp.where(at_checkpoint, loss_best, s.loss_best_at_check),
        reduced_at_check=jnp.where(at_checkpoint, reduce, s.reduced_at_check),
        x_found=_where(fooled_new, x_new, s.x_found),
        fooled=s.fooled | fooled_new, y_target=s.y_target)


def apgd_result(s: APGDState, step_sizes: jax.Array | None = None) -> APGDResult:
    """The :class:`APGDResult` of a final state."""
    return APGDResult(x_adv=_where(s.fooled, s.x_found, s.x_best), fooled=s.fooled,
                      x_best=s.x_best, loss_best=s.loss_best, step_sizes=step_sizes)


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *, rng: jax.Array,
         num_steps: int = 100, norm: str = "linf", loss: str = "ce",
         y_target: jax.Array | None = None, rho: float = 0.75, momentum: float = 0.75
         ) -> APGDResult:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) on ``loss``.

    From a uniform random start ``x^(0)`` in the ball, each iteration takes a steepest-ascent
    step and a momentum step (none on the first iteration)::

        z = P(x^(k) + eta^(k) * direction(grad f(x^(k))))
        x^(k+1) = P(x^(k) + alpha * (z - x^(k)) + (1 - alpha) * (x^(k) - x^(k-1)))

    with ``alpha = momentum`` and per-example step sizes from ``eta^(0) = 2 * eps`` (both
    norms).  At each checkpoint ``w_j`` of :func:`apgd_checkpoints` an example halves its step
    size and restarts from its best point (without momentum) if (1) fewer than
    ``rho * (w_j - w_{j-1})`` of its iterations since ``w_{j-1}`` increased the loss, or (2)
    its step size was not halved at ``w_{j-1}`` and its best loss has not grown since.
    The same run, one iteration at a time: :func:`apgd_init`, :func:`apgd_step`,
    :func:`apgd_result`.

    Args:
      logits_fn: images ``[B, H, W, C]`` in ``[0, 1]`` -> logits ``[B, K]``.
      x: clean images ``[B, H, W, C]`` in ``[0, 1]``.
      y: integer labels ``[B]``.
      eps: budget in pixel units (may be traced).
      rng: PRNG key of the random start.
      num_steps: iterations (static, >= 1); costs ``num_steps + 1`` gradients.
      norm: ``"linf"`` or ``"l2"`` (static).
      loss: ``"ce"``, ``"dlr"`` or ``"dlr_targeted"`` (static; the last needs ``y_target``).
      y_target: target classes ``[B]`` of the targeted DLR loss.
      rho: threshold on the fraction of loss-increasing iterations (condition 1).
      momentum: ``alpha`` above.

    Returns:
      An :class:`APGDResult`; every image lies in ``[0, 1]`` and in the ``eps``-ball.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _loss_fn(loss, y, y_target)  # fail early on a bad loss

    def body(s: APGDState, k: jax.Array) -> tuple[APGDState, jax.Array]:
        return apgd_step(logits_fn, s, x, y, eps, k, num_steps=num_steps, norm=norm,
                         loss=loss, rho=rho, momentum=momentum), s.step_size

    init = apgd_init(logits_fn, x, y, eps, rng=rng, norm=norm, loss=loss, y_target=y_target)
    final, step_sizes = jax.lax.scan(body, init, jnp.arange(num_steps))
    return apgd_result(final, step_sizes)


def apgd_targeted(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *,
                  rng: jax.Array, target_rank: int | jax.Array = 2, num_steps: int = 100,
                  norm: str = "linf", rho: float = 0.75) -> APGDResult:
    """APGD-T for one target: :func:`apgd` on the targeted DLR loss towards the class with the
    ``target_rank``-th largest clean logit (2 = runner-up; may be traced).

    AutoAttack runs ranks ``2 .. 10`` (9 targets), each on the examples still robust.
    """
    y_target = target_class(logits_fn(x), target_rank)
    return apgd(logits_fn, x, y, eps, rng=rng, num_steps=num_steps, norm=norm,
                loss="dlr_targeted", y_target=y_target, rho=rho)


# --------------------------------------------------------------------------------------------
# FAB-T


# Halvings of the bisection of :func:`project_on_hyperplane`: the bracket of ``lam`` (at
# most 1 wide for pixels in [0, 1] under L-inf; ||w||-scaled under L2) shrinks below float32
# resolution well before this.
_PROJECTION_HALVINGS = 40


def project_on_hyperplane(w: jax.Array, r: jax.Array, lower: jax.Array, upper: jax.Array,
                          norm: str) -> jax.Array:
    """The smallest ``d`` (in ``norm``) with ``w . d = r`` and ``lower <= d <= upper``.

    Rows are independent problems: ``w``, ``lower <= 0 <= upper`` are ``[B, D]``, ``r`` is
    ``[B]``.  Along the ray of the optimum, ``d_i = sign(w_i) min(lam, beta_i)`` (linf) or
    ``d_i = w_i min(lam, beta_i)`` (l2) with ``beta_i`` where coordinate ``i`` meets its box
    side; ``w . d`` is piecewise linear and non-decreasing in ``lam``, so ``lam`` is found
    by bisection to its segment between two breakpoints (:data:`_PROJECTION_HALVINGS`
    halvings: float32 resolution), then in closed form on it.  Where the box does not
    allow ``w . d = r`` the result is the box corner that gets closest.
    """
    sign_r = jnp.where(r < 0, -1.0, 1.0)
    w = w * sign_r[:, None]
    r = jnp.abs(r)
    reach = jnp.where(w > 0, upper, jnp.where(w < 0, -lower, 0.0))  # >= 0
    if norm == "linf":
        weight, beta = jnp.abs(w), reach
    else:
        weight = jnp.square(w)
        beta = jnp.where(w != 0, reach / jnp.where(w != 0, jnp.abs(w), 1.0), 0.0)

    def reached(lam: jax.Array) -> jax.Array:  # w . d at lam, [B]
        return jnp.sum(weight * jnp.minimum(lam[:, None], beta), -1)

    # Bisection for the breakpoint segment of lam (sorting the breakpoints, the textbook
    # way, costs far more on CPUs), then lam in closed form on that segment.
    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = (lo + hi) / 2
        below = reached(mid) < r
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    top = jnp.max(beta, -1)
    lo, hi = jax.lax.fori_loop(0, _PROJECTION_HALVINGS, halve, (jnp.zeros_like(top), top))
    saturated = beta <= lo[:, None]
    sat = jnp.sum(jnp.where(saturated, weight * beta, 0.0), -1)
    free = jnp.sum(jnp.where(saturated, 0.0, weight), -1)
    lam = jnp.clip((r - sat) / jnp.maximum(free, _TINY), lo, hi)
    lam = jnp.where(reached(top) < r, jnp.inf, lam)[:, None]  # the box cannot reach r
    scale = jnp.minimum(lam, beta)
    return jnp.where(w != 0, (jnp.sign(w) if norm == "linf" else w) * scale, 0.0)


class FABResult(NamedTuple):
    """What :func:`fab_targeted` found, per example."""

    x_adv: jax.Array  # the smallest misclassified point found, else x, [B, H, W, C]
    distance: jax.Array  # its distance to x in the norm (inf where none), [B]


class FABState(NamedTuple):
    """FAB's per-example state between iterations."""

    x1: jax.Array  # current iterate, [B, H, W, C]
    best: jax.Array  # closest misclassified point so far (x where none), [B, H, W, C]
    best_dist: jax.Array  # its distance to x (inf where none), [B]
    y_target: jax.Array  # target classes, [B] int32


def fab_init(logits_fn: LogitsFn, x: jax.Array, *, target_rank: int | jax.Array = 2
             ) -> FABState:
    """FAB-T's state at ``x``, aiming at the ``target_rank``-th class of the clean logits."""
    return FABState(x1=x, best=x, best_dist=jnp.full((x.shape[0],), jnp.inf, x.dtype),
                    y_target=target_class(logits_fn(x), target_rank))


def fab_step(logits_fn: LogitsFn, s: FABState, x: jax.Array, y: jax.Array, *,
             norm: str = "linf", alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9
             ) -> FABState:
    """One FAB-T iteration (see :func:`fab_targeted`)."""
    batch = x.shape[0]
    x0 = x.reshape(batch, -1)

    def difference(z: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits_fn(z)
        diff = _at(logits, s.y_target) - _at(logits, y)
        return jnp.sum(diff), diff

    dg, df = jax.grad(difference, has_aux=True)(s.x1)
    w = dg.reshape(batch, -1)
    p1 = s.x1.reshape(batch, -1)
    # The hyperplane g(x1) + w . (z - x1) = 0 is reached from p by d with w . d = r.
    d1 = project_on_hyperplane(w, -df, -p1, 1.0 - p1, norm)
    d2 = project_on_hyperplane(w, -(df + jnp.sum(w * (x0 - p1), -1)), -x0, 1.0 - x0, norm)
    a1 = jnp.maximum(_norm(d1, norm), 1e-8)[:, None]
    a2 = jnp.maximum(_norm(d2, norm), 1e-8)[:, None]
    a = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)
    p_new = jnp.clip((p1 + eta * d1) * (1 - a) + (x0 + eta * d2) * a, 0.0, 1.0)
    x_new = p_new.reshape(x.shape)
    is_adv = jnp.argmax(logits_fn(x_new), -1) != y
    dist = _norm(p_new - x0, norm)
    closer = is_adv & (dist < s.best_dist)
    return FABState(x1=_where(is_adv, x + beta * (x_new - x), x_new),
                    best=_where(closer, x_new, s.best),
                    best_dist=jnp.where(closer, dist, s.best_dist), y_target=s.y_target)


def fab_finish(logits_fn: LogitsFn, s: FABState, x: jax.Array, y: jax.Array, *,
               norm: str = "linf", final_search: int = 10) -> FABResult:
    """The final search of :func:`fab_targeted`: ``final_search`` bisection steps on the
    segment from ``x`` to the closest misclassified point found."""
    def bisect(carry: tuple[jax.Array, jax.Array], _: None
               ) -> tuple[tuple[jax.Array, jax.Array], None]:
        lo, hi = carry  # x + lo (best - x) is not misclassified, x + hi (best - x) is
        mid = (lo + hi) / 2
        is_adv = jnp.argmax(logits_fn(x + attacks.per_example(mid, x) * (s.best - x)),
                            -1) != y
        return (jnp.where(is_adv, lo, mid), jnp.where(is_adv, mid, hi)), None

    ones = jnp.ones((x.shape[0],), x.dtype)
    (_, hi), _ = jax.lax.scan(bisect, (0 * ones, ones), None, length=final_search)
    best = x + attacks.per_example(hi, x) * (s.best - x)
    return FABResult(x_adv=best, distance=jnp.where(jnp.isfinite(s.best_dist),
                                                    _norm(best - x, norm), jnp.inf))


def fab_targeted(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *,
                 target_rank: int | jax.Array = 2, num_steps: int = 100, norm: str = "linf",
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 final_search: int = 10) -> FABResult:
    """FAB-T (Croce & Hein 2020): the minimum-norm attack towards one target class.

    The target ``t`` has the ``target_rank``-th largest clean logit.  Each iteration
    linearises ``g = z_t - z_y`` at the iterate ``x1``, projects both ``x1`` and the original
    ``x`` onto the hyperplane ``g = 0`` intersected with the box ``[0, 1]``
    (:func:`project_on_hyperplane`: ``d1``, ``d2``) and moves to::

        x1 <- clip((x1 + eta d1) (1 - a) + (x + eta d2) a, 0, 1),
        a = min(||d1|| / (||d1|| + ||d2||), alpha_max)

    An iterate that is misclassified (any wrong class) is kept if it is the closest so far,
    and the iterate steps back to ``x + beta (x1 - x)``.  Starts from ``x`` (no restarts,
    as AutoAttack's standard version).  A final bisection on the segment from ``x`` to the
    closest misclassified point found shrinks it further.  The caller compares ``distance``
    with its budget.  One iteration at a time: :func:`fab_init`, :func:`fab_step`,
    :func:`fab_finish`.

    Args:
      logits_fn: images ``[B, H, W, C]`` in ``[0, 1]`` -> logits ``[B, K]``.
      x: clean images ``[B, H, W, C]`` in ``[0, 1]``.
      y: integer labels ``[B]``.
      target_rank: rank of the target among the clean logits (may be traced).
      num_steps: iterations (static); each costs a gradient and a forward pass.
      norm: ``"linf"`` or ``"l2"`` (static).
      alpha_max, eta, beta: the reference's extrapolation bound, overshoot and backward step.
      final_search: bisection steps (forward passes) of the final search (static).
    """
    attacks.check_norm(norm)

    def body(s: FABState, _: None) -> tuple[FABState, None]:
        return fab_step(logits_fn, s, x, y, norm=norm, alpha_max=alpha_max, eta=eta,
                        beta=beta), None

    state, _ = jax.lax.scan(body, fab_init(logits_fn, x, target_rank=target_rank), None,
                            length=num_steps)
    return fab_finish(logits_fn, state, x, y, norm=norm, final_search=final_search)


# --------------------------------------------------------------------------------------------
# Square


def square_p(iteration: int, num_queries: int, p_init: float = 0.8) -> float:
    """Square's fraction ``p`` of pixels changed at ``iteration`` (the reference's schedule,
    rescaled to ``num_queries``): ``p_init`` halved at each of 10, 50, 200, 500, 1000, 2000,
    4000, 6000, 8000 out of 10,000."""
    it = int(iteration / num_queries * 10000)
    return p_init / 2 ** sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))


def square_sizes(num_queries: int, height: int, width: int, norm: str,
                 p_init: float = 0.8) -> np.ndarray:
    """Side ``s`` of the square window at each iteration, ``[num_queries]`` int32.

    ``s = round(sqrt(p * height * width))``, at least 1 (linf) or at least 3 and odd (l2), at
    most ``min(height, width)``.
    """
    sizes = []
    for i in range(num_queries):
        s = int(round(math.sqrt(square_p(i, num_queries, p_init) * height * width)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2
        sizes.append(min(s, height, width))
    return np.asarray(sizes, np.int32)


def _rectangle_bump(rows: int, cols: int) -> np.ndarray:
    """Nested rectangles around the centre of a ``rows x cols`` window, the ``k``-th weighted
    ``1 / (k + 1)^2``, unit L2 norm (zeros if the window is empty)."""
    bump = np.zeros((rows, cols))
    ci, cj = rows // 2, cols // 2
    for k in range(max(ci, cj) + 1):
        bump[max(ci - k, 0):ci + k + 1, max(cj - k, 0):cj + k + 1] += 1.0 / (k + 1) ** 2
    total = np.sqrt(np.sum(bump ** 2))
    return bump / total if total > 0 else bump


def square_l2_pattern(s: int) -> np.ndarray:
    """The l2 Square update of side ``s``: a positive bump on the top half, a negative one on
    the bottom half, unit L2 norm, ``[s, s]``."""
    pattern = np.concatenate([_rectangle_bump(s // 2, s), -_rectangle_bump(s - s // 2, s)])
    return pattern / np.sqrt(np.sum(pattern ** 2))


class SquareState(NamedTuple):
    """Square's per-example state."""

    x_best: jax.Array  # best point so far, [B, H, W, C]
    margin: jax.Array  # its margin z_y - max_{i != y} z_i (<= 0: fooled), [B]


def _window(corner_h: jax.Array, corner_w: jax.Array, s: jax.Array, height: int, width: int
            ) -> jax.Array:
    """Masks ``[B, H, W, 1]`` of the ``s x s`` windows with top-left corners ``[B]``."""
    rows = jnp.arange(height)[None, :, None, None]
    cols = jnp.arange(width)[None, None, :, None]
    ch, cw = corner_h[:, None, None, None], corner_w[:, None, None, None]
    return (rows >= ch) & (rows < ch + s) & (cols >= cw) & (cols < cw + s)


def square_init(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *,
                rng: jax.Array, norm: str = "linf") -> SquareState:
    """Square's starting points: vertical stripes of ``+-eps`` (linf), or a grid of the l2
    update patterns with random signs rescaled to norm ``eps`` (l2)."""
    attacks.check_norm(norm)
    batch, height, width, channels = x.shape
    if norm == "linf":
        stripes = jax.random.rademacher(rng, (batch, 1, width, channels), x.dtype)
        x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    else:
        s = max(height // 5, 1)
        first = (height - 5 * s) // 2
        pattern = np.zeros((height, width))
        tile = np.full((height, width), -1)
        corners = [(i, j) for i in range(first, height, s) for j in range(first, width, s)]
        for t, (i, j) in enumerate(corners):
            block = square_l2_pattern(s)[:height - i, :width - j]
            pattern[i:i + s, j:j + s] = block
            tile[i:i + s, j:j + s] = t
        signs = jax.random.rademacher(rng, (batch, len(corners), channels), x.dtype)
        delta = signs[:, np.maximum(tile, 0)] * jnp.asarray(
            (pattern * (tile >= 0))[None, :, :, None], x.dtype)
        x_best = jnp.clip(x + eps * delta / (per_example_norm(delta) + _TINY), 0.0, 1.0)
    return SquareState(x_best=x_best, margin=margin(logits_fn(x_best), y))


def square_steps(logits_fn: LogitsFn, state: SquareState, x: jax.Array, y: jax.Array,
                 eps: Scalar, *, rng: jax.Array, start: int | jax.Array, num_iters: int,
                 num_queries: int = 5000, norm: str = "linf", p_init: float = 0.8
                 ) -> SquareState:
    """Iterations ``start .. start + num_iters - 1`` of a Square run of ``num_queries``.

    Each iteration proposes, for every example, a change of one random ``s x s`` window
    (``s`` from :func:`square_sizes`): linf sets it to ``x +- eps`` (one random sign per
    channel); l2 moves the perturbation's energy in that window and a second random window
    into the first one, adds the :func:`square_l2_pattern` with a random sign per channel
    (transposed at random) and rescales the whole perturbation to norm ``eps``.  One forward
    of the batch scores the proposals; an example keeps its proposal if the margin drops.
    Examples already fooled (margin <= 0) are left unchanged.

    Args:
      state: from :func:`square_init` or a previous call.
      start: index of the first iteration (may be traced).
      num_iters: iterations of this call (static).
      num_queries, norm, p_init: of the whole run (static).
    """
    attacks.check_norm(norm)
    batch, height, width, channels = x.shape
    sizes_np = square_sizes(num_queries, height, width, norm, p_init)
    sizes = jnp.asarray(sizes_np)
    if norm == "l2":
        side = min(height, width)
        distinct = sorted(set(sizes_np.tolist()))
        slot = np.zeros(side + 1, np.int32)
        patterns = np.zeros((len(distinct), side, side), np.float32)
        for n, s in enumerate(distinct):
            slot[s] = n
            patterns[n, :s, :s] = square_l2_pattern(s)
        patterns = jnp.asarray(np.stack([patterns, patterns.transpose(0, 2, 1)], 1))
        slot = jnp.asarray(slot)

    def body(s: SquareState, i: jax.Array) -> tuple[SquareState, None]:
        key = jax.random.fold_in(rng, i)
        k_h, k_w, k_sign, k_h2, k_w2, k_t = jax.random.split(key, 6)
        size = sizes[jnp.minimum(i, num_queries - 1)]
        corner_h = jax.random.randint(k_h, (batch,), 0, height - size + 1)
        corner_w = jax.random.randint(k_w, (batch,), 0, width - size + 1)
        window = _window(corner_h, corner_w, size, height, width)
        signs = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
        if norm == "linf":
            x_new = attacks.project(jnp.where(window, s.x_best + 2 * eps * signs, s.x_best), x,
                                    eps, "linf")
        else:
            second = _window(jax.random.randint(k_h2, (batch,), 0, height - size + 1),
                             jax.random.randint(k_w2, (batch,), 0, width - size + 1), size,
                             height, width)
            delta = s.x_best - x

            def channel_norm(v: jax.Array) -> jax.Array:
                return jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))

            union = window | second
            rows = jnp.clip(jnp.arange(height)[None, :] - corner_h[:, None], 0, side - 1)
            cols = jnp.clip(jnp.arange(width)[None, :] - corner_w[:, None], 0, side - 1)
            flip = jax.random.bernoulli(k_t, 0.5, (batch,)).astype(jnp.int32)
            table = patterns[slot[size]][flip]  # [B, side, side]
            bump = table[jnp.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
            proposal = bump[..., None] * signs + jnp.where(window, delta, 0.0) / (
                channel_norm(jnp.where(window, delta, 0.0)) + _TINY)
            proposal = jnp.where(window, proposal, 0.0)
            energy = jnp.sqrt(jnp.maximum(jnp.square(eps) - jnp.square(per_example_norm(delta)),
                                          0.0) / channels
                              + jnp.square(channel_norm(jnp.where(union, delta, 0.0))))
            proposal = proposal / (channel_norm(proposal) + _TINY) * energy
            delta = jnp.where(window, proposal, jnp.where(second, 0.0, delta))
            x_new = jnp.clip(x + eps * delta / (per_example_norm(delta) + _TINY), 0.0, 1.0)
        margin_new = margin(logits_fn(x_new), y)
        accept = (s.margin > 0) & (margin_new < s.margin)
        return SquareState(x_best=jnp.where(attacks.per_example(accept, x), x_new, s.x_best),
                           margin=jnp.where(accept, margin_new, s.margin)), None

    final, _ = jax.lax.scan(body, state, start + jnp.arange(num_iters))
    return final


def square(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps: Scalar, *, rng: jax.Array,
           num_queries: int = 5000, norm: str = "linf", p_init: float = 0.8) -> SquareState:
    """The Square attack (Andriushchenko et al. 2020) with ``num_queries`` iterations after
    the initial point: :func:`square_init` then :func:`square_steps`.  ``x_best`` stays in
    ``[0, 1]`` and in the ``eps``-ball; ``margin <= 0`` marks the fooled examples."""
    k_init, k_steps = jax.random.split(rng)
    state = square_init(logits_fn, x, y, eps, rng=k_init, norm=norm)
    return square_steps(logits_fn, state, x, y, eps, rng=k_steps, start=0, num_iters=num_queries,
                        num_queries=num_queries, norm=norm, p_init=p_init)


# --------------------------------------------------------------------------------------------
# The cascade

VERSIONS: dict[str, tuple[dict, ...]] = {
    # AutoAttack as published (Croce & Hein 2020; the reference's version "standard").
    "standard": (
        {"name": "apgd-ce", "loss": "ce", "num_steps": 100, "restarts": 1, "rho": 0.75},
        {"name": "apgd-t", "loss": "dlr_targeted", "num_steps": 100, "num_targets": 9,
         "rho": 0.75},
        {"name": "fab-t", "num_steps": 100, "num_targets": 9, "alpha_max": 0.1, "eta": 1.05,
         "beta": 0.9},
        {"name": "square", "loss": "margin", "num_queries": 5000, "p_init": 0.8},
    ),
    # A cheaper diagnostic for quick looks; NOT AutoAttack, never a reported robust accuracy.
    "quick": (
        {"name": "apgd-ce", "loss": "ce", "num_steps": 20, "restarts": 1, "rho": 0.75},
        {"name": "apgd-t", "loss": "dlr_targeted", "num_steps": 20, "num_targets": 3,
         "rho": 0.75},
        {"name": "square", "loss": "margin", "num_queries": 500, "p_init": 0.8},
    ),
}
GRADIENT_ATTACKS = ("apgd-ce", "apgd-t", "fab-t")


def attack_plan(version: str = "standard", *, double: bool = False,
                only: Sequence[str] | None = None) -> list[dict]:
    """The attacks of ``version`` (copies of :data:`VERSIONS`), in cascade order.

    Args:
      version: a key of :data:`VERSIONS`.
      double: twice the iterations (``num_steps``) and queries (``num_queries``) of every
        attack, for the strength check of :func:`sanity_checks`.
      only: keep only these attack names (e.g. ``("square",)``), in the version's order.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; known: {sorted(VERSIONS)}")
    plan = [dict(spec) for spec in VERSIONS[version]]
    if only is not None:
        unknown = set(only) - {spec["name"] for spec in plan}
        if unknown:
            raise ValueError(f"attacks {sorted(unknown)} are not in version {version!r} "
                             f"({', '.join(spec['name'] for spec in plan)})")
        plan = [spec for spec in plan if spec["name"] in only]
    if double:
        for spec in plan:
            for field in ("num_steps", "num_queries"):
                if field in spec:
                    spec[field] *= 2
    return plan


def _fooled(fn: LogitsFn, x_adv: jax.Array, x: jax.Array, y: jax.Array, eps: Scalar,
            norm: str) -> jax.Array:
    """Whether ``x_adv`` is misclassified, in ``[0, 1]`` and in the ``eps``-ball, ``[B]``."""
    inside = _norm(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-7
    in_box = jnp.all((x_adv >= 0) & (x_adv <= 1), axis=tuple(range(1, x.ndim)))
    return (jnp.argmax(fn(x_adv), -1) != y) & inside & in_box


def _device_key(key: jax.Array) -> jax.Array:
    return jax.random.fold_in(key, jax.lax.axis_index(_AXIS))


# Kernels: per-device functions of (params, batch_stats, per-example arrays..., broadcast
# values...) that the runner pmaps.  "Whole" kernels run an attack in one lax.scan; the
# init / step / final kernels let the host drive the iterations (XLA:CPU runs convolution
# gradients inside loops about twice as slowly as outside them).


def _clean_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array, *,
                  apply_fn: Callable) -> jax.Array:
    return jnp.argmax(model_logits_fn(apply_fn, params, batch_stats)(x), -1) == y


def _verify_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                   x_adv: jax.Array, eps: jax.Array, *, apply_fn: Callable, norm: str
                   ) -> jax.Array:
    return _fooled(model_logits_fn(apply_fn, params, batch_stats), x_adv, x, y, eps, norm)


def _apgd_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                 eps: jax.Array, key: jax.Array, rank: jax.Array, *, apply_fn: Callable,
                 norm: str, num_steps: int, loss: str, rho: float) -> jax.Array:
    fn = model_logits_fn(apply_fn, params, batch_stats)
    y_target = target_class(fn(x), rank) if loss == "dlr_targeted" else None
    result = apgd(fn, x, y, eps, rng=_device_key(key), num_steps=num_steps, norm=norm,
                  loss=loss, y_target=y_target, rho=rho)
    return _fooled(fn, result.x_adv, x, y, eps, norm)


def _apgd_init_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                      eps: jax.Array, key: jax.Array, rank: jax.Array, *, apply_fn: Callable,
                      norm: str, loss: str) -> APGDState:
    fn = model_logits_fn(apply_fn, params, batch_stats)
    y_target = target_class(fn(x), rank) if loss == "dlr_targeted" else None
    return apgd_init(fn, x, y, eps, rng=_device_key(key), norm=norm, loss=loss,
                     y_target=y_target)


def _apgd_step_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                      state: APGDState, eps: jax.Array, k: jax.Array, *, apply_fn: Callable,
                      norm: str, num_steps: int, loss: str, rho: float) -> APGDState:
    return apgd_step(model_logits_fn(apply_fn, params, batch_stats), state, x, y, eps, k,
                     num_steps=num_steps, norm=norm, loss=loss, rho=rho)


def _apgd_final_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                       state: APGDState, eps: jax.Array, *, apply_fn: Callable, norm: str
                       ) -> jax.Array:
    return _fooled(model_logits_fn(apply_fn, params, batch_stats), apgd_result(state).x_adv,
                   x, y, eps, norm)


def _fab_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                eps: jax.Array, rank: jax.Array, *, apply_fn: Callable, norm: str,
                num_steps: int, alpha_max: float, eta: float, beta: float) -> jax.Array:
    fn = model_logits_fn(apply_fn, params, batch_stats)
    result = fab_targeted(fn, x, y, target_rank=rank, num_steps=num_steps, norm=norm,
                          alpha_max=alpha_max, eta=eta, beta=beta)
    return _fooled(fn, result.x_adv, x, y, eps, norm)


def _fab_init_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, rank: jax.Array, *,
                     apply_fn: Callable) -> FABState:
    return fab_init(model_logits_fn(apply_fn, params, batch_stats), x, target_rank=rank)


def _fab_step_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                     state: FABState, *, apply_fn: Callable, norm: str, alpha_max: float,
                     eta: float, beta: float) -> FABState:
    return fab_step(model_logits_fn(apply_fn, params, batch_stats), state, x, y, norm=norm,
                    alpha_max=alpha_max, eta=eta, beta=beta)


def _fab_final_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                      state: FABState, eps: jax.Array, *, apply_fn: Callable, norm: str
                      ) -> jax.Array:
    fn = model_logits_fn(apply_fn, params, batch_stats)
    return _fooled(fn, fab_finish(fn, state, x, y, norm=norm).x_adv, x, y, eps, norm)


def _square_init_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                        eps: jax.Array, key: jax.Array, *, apply_fn: Callable, norm: str
                        ) -> SquareState:
    return square_init(model_logits_fn(apply_fn, params, batch_stats), x, y, eps,
                       rng=_device_key(key), norm=norm)


def _square_steps_kernel(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array,
                         state: SquareState, eps: jax.Array, key: jax.Array, start: jax.Array,
                         *, apply_fn: Callable, norm: str, num_iters: int, num_queries: int,
                         p_init: float) -> SquareState:
    return square_steps(model_logits_fn(apply_fn, params, batch_stats), state, x, y, eps,
                        rng=_device_key(key), start=start, num_iters=num_iters,
                        num_queries=num_queries, norm=norm, p_init=p_init)


# Per kernel: how many arguments after (params, batch_stats) are per-example (split over
# the devices); the rest are broadcast.
_PER_EXAMPLE_ARGS = {_clean_kernel: 2, _verify_kernel: 3, _apgd_kernel: 2,
                     _apgd_init_kernel: 2, _apgd_step_kernel: 3, _apgd_final_kernel: 3,
                     _fab_kernel: 2, _fab_init_kernel: 1, _fab_step_kernel: 3,
                     _fab_final_kernel: 3, _square_init_kernel: 2, _square_steps_kernel: 3}


@functools.lru_cache(maxsize=128)
def _pmapped(kernel: Callable, apply_fn: Callable, devices: tuple, static: tuple) -> Callable:
    """``kernel`` pmapped over ``devices`` (cached, so every bucket size and budget of one
    model reuses the compilations)."""
    n_args = _PER_EXAMPLE_ARGS[kernel]
    n_total = kernel.__code__.co_argcount
    in_axes = (None, None) + (0,) * n_args + (None,) * (n_total - 2 - n_args)
    return jax.pmap(functools.partial(kernel, apply_fn=apply_fn, **dict(static)),
                    axis_name=_AXIS, in_axes=in_axes, devices=list(devices))


def bucket_size(n: int, num_devices: int, max_batch: int) -> int:
    """The padded batch for ``n <= max_batch`` examples: ``num_devices`` times the smallest
    of 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5 times them) that holds
    ``ceil(n / num_devices)``, at most ``max_batch`` (a multiple of ``num_devices``).

    Coarse steps keep the compilations few (the survivors of one attack's targets mostly
    share a bucket) at the cost of at most 1/3 padding.
    """
    per_device, cap = -(-n // num_devices), max_batch // num_devices
    size = 8
    while size < per_device:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, cap) * num_devices


class _Runner:
    """Pads sets of examples to buckets and calls pmapped kernels on them (host side)."""

    def __init__(self, apply_fn: Callable, params: PyTree, batch_stats: PyTree,
                 devices: Sequence[jax.Device], max_batch: int) -> None:
        self.devices = tuple(devices)
        mesh = jax.sharding.Mesh(np.array(self.devices), ("devices",))
        self.split = jax.NamedSharding(mesh, jax.P("devices"))  # leading axis over devices
        # The variables go to every device once, not at every call.
        self.apply_fn = apply_fn
        self.params, self.batch_stats = jax.device_put((params, batch_stats),
                                                       jax.NamedSharding(mesh, jax.P()))
        n_dev = len(self.devices)
        self.max_batch = max(n_dev, max_batch // n_dev * n_dev)

    def batches(self, arrays: Sequence[np.ndarray]) -> list[tuple[list[jax.Array], int]]:
        """``arrays`` (same length) in chunks of at most ``max_batch``, each padded to its
        bucket, shaped ``[devices, per_device, ...]`` and put on the devices; with the number
        of real rows."""
        n_dev, n = len(self.devices), len(arrays[0])
        out = []
        for start in range(0, n, self.max_batch):
            m = min(self.max_batch, n - start)
            size = bucket_size(m, n_dev, self.max_batch)
            pad = start + np.concatenate([np.arange(m), np.zeros(size - m, np.int64)])
            out.append(([jax.device_put(a[pad].reshape((n_dev, size // n_dev) + a.shape[1:]),
                                        self.split) for a in arrays], m))
        return out

    def __call__(self, kernel: Callable, static: dict, per_example: Sequence[Any],
                 broadcast: Sequence[Any] = ()) -> Any:
        fn = _pmapped(kernel, self.apply_fn, self.devices, tuple(sorted(static.items())))
        return fn(self.params, self.batch_stats, *per_example, *broadcast)


def _unpad(tree: Any, m: int) -> Any:
    """Host copies of a pmapped output ``[devices, per_device, ...]``, first ``m`` rows."""
    return jax.tree.map(lambda a: np.asarray(a).reshape((-1,) + a.shape[2:])[:m], tree)


def _gradient_attack(run: _Runner, spec: dict, x: np.ndarray, y: np.ndarray, eps: float,
                     norm: str, key: jax.Array, rank: int, host_loop: bool) -> np.ndarray:
    """Whether one run of APGD (CE or targeted DLR towards ``rank``) or FAB-T fools each
    example of ``x``, ``[N]`` bool."""
    eps32, rank32 = np.float32(eps), np.int32(rank)
    fab = spec["name"] == "fab-t"
    steps = spec["num_steps"]
    if fab:
        step_static = {"norm": norm, **{k: spec[k] for k in ("alpha_max", "eta", "beta")}}
    else:
        step_static = {"norm": norm, "num_steps": steps, "loss": spec["loss"],
                       "rho": spec["rho"]}
    hits = []
    for b, (args, m) in enumerate(run.batches([x, y])):
        key_b = jax.random.fold_in(key, b)
        if not host_loop:
            if fab:
                hit = run(_fab_kernel, dict(step_static, num_steps=steps), args,
                          [eps32, rank32])
            else:
                hit = run(_apgd_kernel, step_static, args, [eps32, key_b, rank32])
        elif fab:
            state = run(_fab_init_kernel, {}, args[:1], [rank32])
            for _ in range(steps):
                state = run(_fab_step_kernel, step_static, [*args, state])
            hit = run(_fab_final_kernel, {"norm": norm}, [*args, state], [eps32])
        else:
            state = run(_apgd_init_kernel, {"norm": norm, "loss": spec["loss"]}, args,
                        [eps32, key_b, rank32])
            for k in range(steps):
                state = run(_apgd_step_kernel, step_static, [*args, state],
                            [eps32, np.int32(k)])
            hit = run(_apgd_final_kernel, {"norm": norm}, [*args, state], [eps32])
        hits.append(_unpad(hit, m))
    return np.concatenate(hits)


def _square_attack(run: _Runner, spec: dict, x: np.ndarray, y: np.ndarray, eps: float,
                   norm: str, key: jax.Array, chunk: int) -> np.ndarray:
    """Whether Square fools each example of ``x``, ``[N]`` bool; ``chunk`` queries per call
    (a ``lax.scan``: forward passes alone run as fast in it as outside), then the examples
    not yet fooled are compacted."""
    eps32 = np.float32(eps)
    queries = spec["num_queries"]
    key_init, key_steps = jax.random.split(key)
    parts = [_unpad(run(_square_init_kernel, {"norm": norm}, args,
                        [eps32, jax.random.fold_in(key_init, b)]), m)
             for b, (args, m) in enumerate(run.batches([x, y]))]
    x_best = np.concatenate([p.x_best for p in parts])
    margins = np.concatenate([p.margin for p in parts])
    fooled = margins <= 0
    static = {"norm": norm, "num_queries": queries, "p_init": spec["p_init"]}
    for start in range(0, queries, chunk):
        left = np.flatnonzero(~fooled)
        if not len(left):
            break
        length = min(chunk, queries - start)
        for b, (args, m) in enumerate(run.batches([x[left], y[left], x_best[left],
                                                   margins[left]])):
            key_b = jax.random.fold_in(jax.random.fold_in(key_steps, start), b)
            state = run(_square_steps_kernel, dict(static, num_iters=length),
                        [*args[:2], SquareState(args[2], args[3])],
                        [eps32, key_b, np.int32(start)])
            hit = run(_verify_kernel, {"norm": norm}, [*args[:2], state.x_best], [eps32])
            rows = left[b * run.max_batch:b * run.max_batch + m]
            state, hit = _unpad((state, hit), m)
            x_best[rows], margins[rows] = state.x_best, state.margin
            fooled[rows] |= hit
    return fooled


def _run_stage(run: _Runner, spec: dict, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
               eps: float, norm: str, key: jax.Array, num_classes: int, host_loop: bool,
               square_chunk: int) -> np.ndarray:
    """Indices (into ``x``) of the examples among ``idx`` that the attack ``spec`` fools."""
    name = spec["name"]
    if name == "square":
        if not len(idx):
            return idx
        return idx[_square_attack(run, spec, x[idx], y[idx], eps, norm, key, square_chunk)]
    if name == "apgd-ce":
        runs = [(r, 0) for r in range(spec["restarts"])]
    elif name in ("apgd-t", "fab-t"):
        runs = [(t, t + 2) for t in range(min(spec["num_targets"], num_classes - 1))]
    else:
        raise ValueError(f"unknown attack {name!r}")
    fooled = np.zeros(len(idx), bool)
    for i, rank in runs:  # restarts or targets, each on the examples not yet fooled
        left = np.flatnonzero(~fooled)
        if not len(left):
            break
        sub = idx[left]
        fooled[left] = _gradient_attack(run, spec, x[sub], y[sub], eps, norm,
                                        jax.random.fold_in(key, i), rank, host_loop)
    return idx[fooled]


def autoattack(apply_fn: Callable, params: PyTree, batch_stats: PyTree, images: np.ndarray,
               labels: np.ndarray, *, eps: float, norm: str = "linf",
               version: str = "standard", double: bool = False,
               only: Sequence[str] | None = None, seed: int = 0,
               devices: Sequence[jax.Device] | None = None, batch_size: int = 512,
               loop: str = "auto", square_chunk: int = 500,
               log: Callable[[str], None] | None = None) -> dict:
    """Robust accuracy under the AutoAttack cascade of ``version``; a RobustBench-style record.

    The noise-free model (``apply_fn`` with ``params`` and ``batch_stats``, as in
    :func:`anp_jax.evaluate.evaluate`; inference mode) is attacked on the clean-correct
    examples; each attack runs only on the examples every previous attack failed on (the
    survivors are compacted on the host and padded to :func:`bucket_size` buckets, so the
    compilations are reused), and an example is robust only if every attack fails.  Every
    adversarial point is checked (misclassified, inside the ``eps``-ball and ``[0, 1]``) by
    a forward pass.  Targeted attacks run one target at a time on the examples not yet
    fooled; Square runs in chunks of ``square_chunk`` queries, compacting between chunks.

    Args:
      apply_fn, params, batch_stats: the model (unreplicated variables).
      images: ``[N, H, W, C]``, uint8 or float in ``[0, 1]``.
      labels: int ``[N]``.
      eps: budget in ``[0, 1]`` pixel units, in ``norm`` (``"linf"`` or ``"l2"``).
      version: a key of :data:`VERSIONS`.
      double: every attack with twice the iterations / queries (strength check).
      only: run only these attacks of the version (e.g. ``("square",)``).
      seed: seeds the random starts and Square's proposals.
      devices: the devices the batch is split over (default: all local devices).
      batch_size: largest global batch of one call.
      loop: for APGD and FAB, ``"host"``: the host drives the iterations, one pmapped call
        per iteration; ``"device"``: each run is one pmapped call with a ``lax.scan``;
        ``"auto"``: host on CPU (where XLA runs convolution gradients in loops about 2x
        slower), device elsewhere.  Square always runs ``square_chunk`` queries per call.
      square_chunk: Square queries between compactions.
      log: called with one line per stage.

    Returns:
      A JSON-able dict: ``threat_model`` ("Linf" / "L2"), ``norm``, ``eps``,
      ``num_examples``, ``version``, ``double``, ``seed``, ``num_devices``, ``loop``,
      ``attacks`` (the plan: every attack with its parameters), ``clean_accuracy``,
      ``stages`` (per attack: ``attack``, ``num_attacked``, ``robust_accuracy`` after it,
      ``seconds``),
      ``robust_accuracy_after`` (attack -> robust accuracy after that stage),
      ``robust_accuracy`` (the final worst case), ``seconds`` (per attack, ``clean`` and
      ``total``), ``robust`` (per example, robust to every attack; a list of bools) and
      ``fooled_at`` (per example: ``-1`` robust, ``0`` misclassified clean, ``i`` first
      fooled by the ``i``-th stage; :func:`restrict` makes a subset's record from it).
    """
    attacks.check_norm(norm)
    plan = attack_plan(version, double=double, only=only)
    names = [spec["name"] for spec in VERSIONS[version]]
    t_start = time.perf_counter()
    devices = list(devices or jax.local_devices())
    if loop not in ("auto", "host", "device"):
        raise ValueError(f"loop must be 'auto', 'host' or 'device', got {loop!r}")
    host_loop = loop == "host" or (loop == "auto" and devices[0].platform == "cpu")
    x = np.asarray(images)
    x = data_lib.to_float(x) if x.dtype == np.uint8 else x.astype(np.float32)
    y = np.asarray(labels).astype(np.int32)
    if x.ndim != 4 or len(x) != len(y) or not len(y):
        raise ValueError(f"images must be [N, H, W, C] and labels [N] with N > 0, got "
                         f"{x.shape} and {y.shape}")
    run = _Runner(apply_fn, params, batch_stats, devices, batch_size)
    num_classes = int(jax.eval_shape(model_logits_fn(apply_fn, params, batch_stats),
                                     jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
                                     ).shape[-1])
    if any(spec["name"] == "apgd-t" for spec in plan) and num_classes < 4:
        raise ValueError(f"APGD-T's targeted DLR loss needs >= 4 classes, got {num_classes}")
    robust = np.concatenate([_unpad(run(_clean_kernel, {}, args), m)
                             for args, m in run.batches([x, y])])
    clean = float(robust.mean())
    fooled_at = np.where(robust, -1, 0)
    seconds = {"clean": time.perf_counter() - t_start}
    stages = []
    key = jax.random.PRNGKey(seed)
    for number, spec in enumerate(plan, 1):
        t0 = time.perf_counter()
        idx = np.flatnonzero(robust)
        # Keys follow the attack's place in the version, so `only` runs draw the same.
        stage_key = jax.random.fold_in(key, names.index(spec["name"]))
        fooled = _run_stage(run, spec, x, y, idx, eps, norm, stage_key, num_classes,
                            host_loop, square_chunk)
        robust[fooled], fooled_at[fooled] = False, number
        seconds[spec["name"]] = time.perf_counter() - t0
        stages.append({"attack": spec["name"], "num_attacked": int(len(idx)),
                       "robust_accuracy": float(robust.mean()),
                       "seconds": seconds[spec["name"]]})
        if log is not None:
            log(f"autoattack {version} {norm} {eps:g}: {spec['name']} on {len(idx)} -> robust "
                f"{robust.mean():.4f} ({seconds[spec['name']]:.1f} s)")
    seconds["total"] = time.perf_counter() - t_start
    return {
        "threat_model": {"linf": "Linf", "l2": "L2"}[norm],
        "norm": norm,
        "eps": float(eps),
        "num_examples": int(len(y)),
        "version": version,
        "double": bool(double),
        "seed": int(seed),
        "num_devices": len(devices),
        "loop": "host" if host_loop else "device",
        "attacks": plan,
        "clean_accuracy": clean,
        "stages": stages,
        "robust_accuracy_after": {s["attack"]: s["robust_accuracy"] for s in stages},
        "robust_accuracy": float(robust.mean()),
        "seconds": seconds,
        "robust": [bool(r) for r in robust],
        "fooled_at": [int(f) for f in fooled_at],
    }


def restrict(record: dict, rows: slice | Sequence[int] | np.ndarray) -> dict:
    """The record of :func:`autoattack` on the examples ``rows`` alone: the same cascade's
    outcome on them (clean accuracy, robust accuracy after each stage, the worst case and
    the per-example flags), from its per-example ``fooled_at``.  Every attack acts on each
    example on its own, so this is a record of the cascade run on those examples.  Their
    share of the time is not known: ``seconds`` and the stages' ``seconds`` are ``None``."""
    fooled_at = np.asarray(record["fooled_at"])[rows]
    if not fooled_at.size:
        raise ValueError("restrict: no examples selected")
    stages = [{"attack": s["attack"],
               "num_attacked": int(((fooled_at == -1) | (fooled_at >= i)).sum()),
               "robust_accuracy": float(((fooled_at == -1) | (fooled_at > i)).mean()),
               "seconds": None}
              for i, s in enumerate(record["stages"], 1)]
    robust = fooled_at == -1
    return {**record, "num_examples": int(fooled_at.size),
            "clean_accuracy": float((fooled_at != 0).mean()), "stages": stages,
            "robust_accuracy_after": {s["attack"]: s["robust_accuracy"] for s in stages},
            "robust_accuracy": float(robust.mean()), "seconds": None,
            "robust": [bool(r) for r in robust], "fooled_at": [int(f) for f in fooled_at]}


# --------------------------------------------------------------------------------------------
# Sanity checks


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def sanity_runs(apply_fn: Callable, params: PyTree, batch_stats: PyTree, images: np.ndarray,
                labels: np.ndarray, *, eps: float, norm: str = "linf",
                version: str = "standard", **kwargs: Any) -> dict[str, dict]:
    """The records :func:`sanity_checks` compares with the main one: ``double`` (the cascade
    at twice the iterations / queries, another seed), ``square`` (Square alone on every
    clean-correct example) and ``apgd-t`` (APGD-T alone).  ``kwargs`` go to
    :func:`autoattack`."""
    seed = kwargs.pop("seed", 0)
    common = dict(eps=eps, norm=norm, version=version, **kwargs)
    args = (apply_fn, params, batch_stats, images, labels)
    names = [spec["name"] for spec in VERSIONS[version]]
    runs = {"double": autoattack(*args, double=True, seed=seed + 1, **common)}
    for name in ("square", "apgd-t"):
        if name in names:
            runs[name] = autoattack(*args, only=(name,), seed=seed, **common)
    return runs


def sanity_checks(record: dict, runs: dict[str, dict], tolerance: float = 0.01
                  ) -> tuple[list[dict], list[str]]:
    """Checks that catch under-strength attacks and gradient masking.

    * ``cascade_never_raises``: robust accuracy never rises along the cascade and never
      exceeds the clean accuracy (an invariant of :func:`autoattack`; guards the record).
    * ``double_iterations_agree`` (``runs["double"]``): at twice the iterations / queries the
      robust accuracy is not lower than the reported one by more than ``tolerance`` (else
      the attacks have not converged).
    * ``gradient_free_not_stronger`` (``runs["square"]``): Square alone does not beat the
      gradient attacks of the cascade (robust accuracy after its last gradient stage) by
      more than ``tolerance`` (else gradient masking).
    * ``targeted_consistent_with_untargeted`` (``runs["apgd-t"]``): APGD-T alone (9 targets,
      9 times the iterations) is not weaker than APGD-CE alone (the cascade's first stage,
      which attacks every clean-correct example) by more than ``tolerance``: a targeted DLR
      attack that loses to the cross-entropy points at a broken loss or masked logits.

    Args:
      record: from :func:`autoattack`.
      runs: from :func:`sanity_runs` (any subset; missing checks are skipped).
      tolerance: in robust accuracy (fraction of the examples).

    Returns:
      ``(checks, warnings)``: ``{"name", "passed", "detail"}`` dicts and one line per failed
      check.
    """
    label = f"{record['norm']} {record['eps']:g}"
    acc = record["robust_accuracy"]
    stage_acc = [s["robust_accuracy"] for s in record["stages"]]
    curve = [record["clean_accuracy"], *stage_acc]
    checks = [_check("cascade_never_raises",
                     all(b <= a for a, b in zip(curve, curve[1:])),
                     f"clean {curve[0]:.4f} -> " + " -> ".join(
                         f"{s['attack']} {s['robust_accuracy']:.4f}" for s in record["stages"])
                     + f" at {label}")]
    if "double" in runs:
        double = runs["double"]["robust_accuracy"]
        checks.append(_check("double_iterations_agree", double >= acc - tolerance,
                             f"{record['version']} {acc:.4f} vs twice the iterations "
                             f"{double:.4f} at {label} (tolerance {tolerance:g})"))
    gradient = [s["robust_accuracy"] for s in record["stages"]
                if s["attack"] in GRADIENT_ATTACKS]
    if "square" in runs and gradient:
        free = runs["square"]["robust_accuracy"]
        checks.append(_check("gradient_free_not_stronger", free >= gradient[-1] - tolerance,
                             f"Square alone {free:.4f} vs gradient attacks {gradient[-1]:.4f} "
                             f"at {label} (tolerance {tolerance:g})"))
    if "apgd-t" in runs and record["stages"] and record["stages"][0]["attack"] == "apgd-ce":
        targeted, untargeted = runs["apgd-t"]["robust_accuracy"], stage_acc[0]
        checks.append(_check("targeted_consistent_with_untargeted",
                             targeted <= untargeted + tolerance,
                             f"APGD-T alone {targeted:.4f} vs APGD-CE alone {untargeted:.4f} "
                             f"at {label} (tolerance {tolerance:g})"))
    hints = {"double_iterations_agree": "attacks have not converged; the reported robust "
                                        "accuracy is too high",
             "gradient_free_not_stronger": "possible gradient masking; do not trust the "
                                           "gradient attacks",
             "targeted_consistent_with_untargeted": "targeted attack weaker than untargeted; "
                                                    "check the loss or logit masking",
             "cascade_never_raises": "the record is inconsistent"}
    warnings = [f"AutoAttack sanity check {c['name']} failed: {c['detail']} "
                f"({hints[c['name']]})" for c in checks if not c["passed"]]
    return checks, warnings
