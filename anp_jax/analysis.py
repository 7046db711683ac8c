"""Analyses of a trained model beyond accuracy: hidden-representation insensitivity and the
empirical decision-boundary distance (the two "why does ANP work" measurements of the paper).

Every function here is pure and ``jax.jit``-able (the model function and the names of the
perturbation points are static); all of them work on one batch and return per-example
arrays, so that a caller can mask padded examples and sum over a whole split.

Hidden-representation insensitivity (:func:`noise_insensitivity`). For each perturbation
point ``m`` (see ``model.perturbation_points()``) and each example, Gaussian noise whose L2
norm is ``sigma`` times the L2 norm of that example's clean activation ``z_m`` is added
through the model's ``perturbations`` collection, and the change of the logits is measured::

    n = sigma * ||z_m|| * u / ||u||,  u ~ N(0, I)          (per example, all non-batch dims)
    relative_logit_change = ||f(x; z_m + n) - f(x)||_2 / ||f(x)||_2
    kl = KL(softmax f(x) || softmax f(x; z_m + n))
    flipped = argmax f(x; z_m + n) != argmax f(x)

Lower is more insensitive. A point the logits do not depend on gives exactly 0. The clean
activations are read with :func:`capture_points` (Flax method interception of
``perturb``), so no model needs to be changed. :func:`representation_change` is the dual
view: Gaussian noise on the *input* and the relative change of every hidden
representation.

Empirical decision-boundary distance (:func:`boundary_distance`). For each example, draw
``num_directions`` random orthonormal directions ``d`` in input space (QR of a Gaussian
matrix) and search along each line ``x + t d`` (both signs of ``t``, without clipping to
[0, 1]) for the smallest ``|t|`` at which the top-1 prediction differs from the clean one.
The search is vectorised: a coarse grid of ``coarse`` distances up to ``max_distance``
brackets the first change, then ``fine`` points inside the bracket refine it; the result is
the first fine grid point that changes the prediction (an upper bound, at most
``max_distance / (coarse * fine)`` above the exact first crossing when the crossing is
unique within the bracket). Lines whose prediction never changes within ``max_distance``
are censored at ``max_distance``. The per-example minimum over directions is the empirical
worst-case distance of the paper; the mean over directions is also returned. For a linear
classifier with two classes the exact distance along a unit ``d`` is
``|w.x + b| / |w.d|``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anp_jax.adversarial import kl_divergence
from anp_jax.models import PERTURBATIONS
from anp_jax.noise import _TINY
from anp_jax.noise import per_example_norm as _norm

PyTree = Any
ApplyFn = Callable[..., jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]

__all__ = [
    "boundary_distance",
    "capture_points",
    "noise_insensitivity",
    "relative_noise",
    "representation_change",
]


def _per_example_norm(v: jax.Array) -> jax.Array:
    """L2 norm (float32) over all non-batch dimensions, shaped ``[B]``."""
    return _norm(v).reshape(v.shape[0])


def capture_points(apply_fn: ApplyFn, variables: Mapping[str, PyTree], x: jax.Array,
                   **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the model once and records the value at every perturbation point.

    The value recorded for point ``m`` is the activation *before* any noise of the
    ``perturbations`` collection is added (the model's ``self.perturb(name, z)`` receives
    ``z``).  Works for every model of :mod:`anp_jax.models` without changing it.

    Args:
      apply_fn: the model's ``apply`` (e.g. ``model.apply``).
      variables: ``{"params": ..., "batch_stats": ...}`` (and optionally perturbations).
      x: images ``[B, H, W, C]``.
      **kwargs: passed to ``apply_fn``; defaults to ``train=False``.

    Returns:
      ``(logits, {point name: activation})``.
    """
    captured: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kw, context):
        if context.method_name == "perturb":
            name = args[0] if args else kw["name"]
            value = args[1] if len(args) > 1 else kw["value"]
            captured[name] = value
        return next_fun(*args, **kw)

    kwargs.setdefault("train", False)
    with nn.intercept_methods(interceptor):
        logits = apply_fn(variables, x, **kwargs)
    return logits, captured


def relative_noise(rng: jax.Array, z: jax.Array, sigma: float | jax.Array) -> jax.Array:
    """Gaussian noise shaped like ``z`` ``[B, ...]`` whose per-example L2 norm is exactly
    ``sigma * ||z_i||_2`` (a zero activation gets zero noise)."""
    u = jax.random.normal(rng, z.shape, jnp.float32)
    scale = sigma * _norm(z) / (_norm(u) + _TINY)
    return (scale * u).astype(z.dtype)


def noise_insensitivity(apply_fn: ApplyFn, variables: Mapping[str, PyTree], x: jax.Array,
                        y: jax.Array, rng: jax.Array, sigmas: Sequence[float] | jax.Array,
                        points: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
    """Sensitivity of the logits to relative Gaussian noise at each perturbation point.

    Jit-able with ``apply_fn`` and ``points`` static; ``sigmas`` may be traced.  At point
    ``points[i]`` one Gaussian direction per example is drawn from ``fold_in(rng, i)`` and
    scaled to every sigma, so the measurements at different sigmas share their noise.

    Args:
      apply_fn: the model's ``apply``; evaluation mode (``train=False``).
      variables: ``{"params": ..., "batch_stats": ...}`` without perturbations.
      x: images ``[B, H, W, C]`` in [0, 1].
      y: labels ``[B]``.
      rng: PRNG key.
      sigmas: relative noise magnitudes ``[S]``.
      points: perturbation point names, e.g. ``model.perturbation_points()``.

    Returns:
      ``{point: {"relative_logit_change", "kl", "flipped", "correct"}}`` with float32
      arrays ``[S, B]`` (one row per sigma; ``flipped``/``correct`` are 0/1), plus
      ``"clean": {"correct": [B]}``.  (No point may be named ``"clean"``.)
    """
    variables = {k: v for k, v in variables.items() if k != PERTURBATIONS}
    logits, acts = capture_points(apply_fn, variables, x)
    missing = [p for p in points if p not in acts]
    if missing:
        raise ValueError(f"the model has no perturbation point(s) {missing}; "
                         f"it has {sorted(acts)}")
    clean_pred = jnp.argmax(logits, -1)
    clean_norm = _per_example_norm(logits)
    out: dict[str, dict[str, jax.Array]] = {
        "clean": {"correct": (clean_pred == y).astype(jnp.float32)}}
    sigmas = jnp.asarray(sigmas, jnp.float32).reshape(-1)

    def noisy_logits(point: str, noise: jax.Array) -> jax.Array:
        return apply_fn(dict(variables, **{PERTURBATIONS: {point: noise}}), x, train=False)

    for i, point in enumerate(points):
        # One direction per point and example, scaled to every sigma (vmapped: one traced
        # forward pass per point, whatever the number of sigmas).
        unit = relative_noise(jax.random.fold_in(rng, i), acts[point], 1.0)
        noises = sigmas.reshape((-1,) + (1,) * unit.ndim).astype(unit.dtype) * unit[None]
        noisy = jax.vmap(lambda n, p=point: noisy_logits(p, n))(noises)  # [S, B, K]
        pred = jnp.argmax(noisy, -1)
        out[point] = {
            "relative_logit_change": jax.vmap(_per_example_norm)(noisy - logits[None])
            / (clean_norm[None] + _TINY),
            "kl": jax.vmap(lambda q: kl_divergence(logits, q))(noisy),
            "flipped": (pred != clean_pred[None]).astype(jnp.float32),
            "correct": (pred == y[None]).astype(jnp.float32),
        }
    return out


def representation_change(apply_fn: ApplyFn, variables: Mapping[str, PyTree], x: jax.Array,
                          rng: jax.Array, sigma: float | jax.Array,
                          points: Sequence[str]) -> dict[str, jax.Array]:
    """Relative change ``||z_m(x + n) - z_m(x)|| / ||z_m(x)||`` of every hidden representation
    when Gaussian noise ``n`` of per-example L2 norm ``sigma * ||x||`` is added to the input
    (no clipping).  Returns ``{point: [B]}``; jit-able with ``apply_fn`` and ``points``
    static."""
    variables = {k: v for k, v in variables.items() if k != PERTURBATIONS}
    _, clean = capture_points(apply_fn, variables, x)
    _, noisy = capture_points(apply_fn, variables, x + relative_noise(rng, x, sigma))
    return {p: _per_example_norm(noisy[p] - clean[p]) / (_per_example_norm(clean[p]) + _TINY)
            for p in points}


def random_orthonormal_directions(rng: jax.Array, batch: int, shape: tuple[int, ...],
                                  num_directions: int) -> jax.Array:
    """``[B, N, *shape]``: for each example, ``N`` orthonormal directions (in the flattened
    input space, Haar-distributed): the Q of the QR factorisation of a Gaussian matrix with
    R's diagonal positive, which is what Gram-Schmidt gives.

    Gram-Schmidt (each column orthogonalised twice against the ones before, "twice is
    enough") in plain array operations rather than ``jnp.linalg.qr``: on several XLA:CPU
    devices LAPACK's batched QR kernels of the devices wait on one thread pool and can
    deadlock (seen with 2 host devices), and N is small."""
    dim = 1
    for s in shape:
        dim *= s
    if not 1 <= num_directions <= dim:
        raise ValueError(f"num_directions must be in 1..{dim}, got {num_directions}")
    g = jax.random.normal(rng, (batch, dim, num_directions), jnp.float32)
    q = []
    for j in range(num_directions):
        v = g[:, :, j]
        for _ in range(2 if j else 0):
            basis = jnp.stack(q, axis=1)  # [B, j, D]
            v = v - jnp.einsum("bjd,bj->bd", basis, jnp.einsum("bjd,bd->bj", basis, v))
        q.append(v / jnp.linalg.norm(v, axis=-1, keepdims=True))
    return jnp.stack(q, axis=1).reshape((batch, num_directions) + tuple(shape))


def boundary_distance(logits_fn: LogitsFn, x: jax.Array, rng: jax.Array | None = None, *,
                      directions: jax.Array | None = None, num_directions: int = 8,
                      max_distance: float | jax.Array = 8.0, coarse: int = 16,
                      fine: int = 16, both_signs: bool = True,
                      clip: bool = False) -> dict[str, jax.Array]:
    """Empirical decision-boundary distance along random orthonormal directions.

    Jit-able with ``logits_fn``, ``num_directions``, ``coarse``, ``fine``, ``both_signs`` and
    ``clip`` static.  The model is called on batches of ``B * N * S * coarse`` and
    ``B * N * S * fine`` images (``S`` = 2 with ``both_signs``), so keep ``B`` small.

    Args:
      logits_fn: images ``[n, H, W, C]`` -> logits ``[n, K]`` (examples independent).
      x: images ``[B, H, W, C]``.
      rng: PRNG key for the directions (unused when ``directions`` is given).
      directions: optional ``[B, N, H, W, C]`` unit directions to use instead.
      num_directions: ``N``, random orthonormal directions per example.
      max_distance: largest L2 distance searched (pixel units).
      coarse, fine: grid sizes of the two search stages.
      both_signs: search ``x - t d`` too (a direction is then a line).
      clip: clip the points to [0, 1] (off by default: the geometric distance).

    Returns:
      ``{"min": [B], "mean": [B], "censored": [B], "distances": [B, N]}``: the smallest
      and mean distance over the directions (per direction, the smaller of the two signs),
      the fraction of directions censored at ``max_distance``, and all distances.
    """
    if coarse < 1 or fine < 1:
        raise ValueError(f"coarse and fine must be >= 1, got {coarse}, {fine}")
    b = x.shape[0]
    img = tuple(x.shape[1:])
    if directions is None:
        if rng is None:
            raise ValueError("boundary_distance needs `rng` or `directions`")
        directions = random_orthonormal_directions(rng, b, img, num_directions)
    n = directions.shape[1]
    signs = jnp.asarray([1.0, -1.0] if both_signs else [1.0], jnp.float32)
    s = signs.shape[0]
    # Unit directions with sign: [B, N, S, *img].
    dirs = directions[:, :, None] * signs.reshape((1, 1, s) + (1,) * len(img))
    clean = jnp.argmax(logits_fn(x), -1)  # [B]
    max_distance = jnp.asarray(max_distance, jnp.float32)

    def predictions(t: jax.Array) -> jax.Array:
        """Predictions at ``x + t d`` for distances ``t`` ``[B, N, S, G]`` -> ``[B, N, S, G]``."""
        t = t.reshape(t.shape + (1,) * len(img))
        pts = x[:, None, None, None] + t * dirs[:, :, :, None]
        if clip:
            pts = jnp.clip(pts, 0.0, 1.0)
        logits = logits_fn(pts.reshape((-1,) + img).astype(x.dtype))
        return jnp.argmax(logits, -1).reshape(t.shape[:4])

    step = max_distance / coarse
    grid = step * jnp.arange(1, coarse + 1, dtype=jnp.float32)  # [G]
    t_coarse = jnp.broadcast_to(grid, (b, n, s, coarse))
    changed = predictions(t_coarse) != clean[:, None, None, None]
    found = jnp.any(changed, -1)  # [B, N, S]
    first = jnp.argmax(changed, -1)  # index of the first change (0 if none)
    low = first.astype(jnp.float32) * step  # the last coarse point that kept the class
    sub = (step / fine) * jnp.arange(1, fine + 1, dtype=jnp.float32)  # (0, step]
    t_fine = low[..., None] + sub
    changed_fine = predictions(t_fine) != clean[:, None, None, None]
    # The bracket's right end is known to change; a fine point before it may change first.
    first_fine = jnp.where(jnp.any(changed_fine, -1), jnp.argmax(changed_fine, -1), fine - 1)
    dist = low + (first_fine.astype(jnp.float32) + 1.0) * (step / fine)
    dist = jnp.where(found, dist, max_distance)  # [B, N, S]
    per_direction = jnp.min(dist, axis=-1)  # [B, N]
    censored = jnp.all(~found, axis=-1)  # [B, N]
    return {
        "min": jnp.min(per_direction, axis=-1),
        "mean": jnp.mean(per_direction, axis=-1),
        "censored": jnp.mean(censored.astype(jnp.float32), axis=-1),
        "distances": per_direction,
    }
