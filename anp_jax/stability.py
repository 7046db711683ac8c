"""CIFAR-10-P-style perturbation sequences and the flip probability, in pure JAX.

Hendrycks & Dietterich (ICLR 2019) measure stability on short sequences of gradually perturbed
frames of each test image (CIFAR-10-P, ``make_cifar_p.py``) by the flip probability: how often
the top-1 prediction changes along a sequence (``flip_prob`` in ``cifar-p-eval.py``).

:func:`perturbation_sequence` makes ``num_frames`` frames ``t = 0 .. 1`` of growing strength;
frame 0 is the clean image except for "gaussian_blur", whose first frame has the reference's
smallest sigma, 0.3 px (nearly the identity). With ``s = max(1, min(H, W) / 32)``:

* "gaussian_noise": one fixed noise field ``z ~ N(0, 1)`` per image, ``clip(x + 0.06 t z)``
  (0.06 is the largest of CIFAR-10-P's noise levels 0.02, 0.04, 0.06). The reference instead
  draws fresh noise of a constant sigma for every frame; both are scored against the first
  frame (see :func:`flip_probability`).
* "gaussian_blur": sigma ``s (0.3 + 0.45 t)`` px, the reference's range 0.3 .. 0.75 px
  (SciPy "nearest" borders, truncate 4 where the reference uses 7: the dropped tail is
  below 1e-10).
* "translate": horizontal shift by ``t W / 8`` px (4 px at 32x32; the reference shifts by
  -7 .. 8 whole pixels), bilinear, zero fill.
* "rotate": counter-clockwise by ``15 t`` degrees about the image centre (the reference
  sweeps -15 .. 15), bilinear, zero fill.
* "zoom": scale ``1 + 0.2 t`` about the image centre (the reference's "scale" sweeps
  0.7 .. 1.3), bilinear.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from anp_jax.corruptions import _bilinear, _blur, _check_images, _gaussian_taps, _normal, _scale

__all__ = ["PERTURBATIONS", "flip_probability", "perturbation_sequence"]

PERTURBATIONS: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "translate", "rotate", "zoom")

_NOISE_SIGMA = 0.06
_BLUR_SIGMA = (0.3, 0.75)
_SHIFT_FRACTION = 1.0 / 8.0
_MAX_DEGREES = 15.0
_MAX_ZOOM = 1.2


@functools.partial(jax.jit, static_argnames="mode")
def _sample_frames(x: jax.Array, rows: jax.Array, cols: jax.Array, mode: str) -> jax.Array:
    """Bilinearly sample ``x`` ``[B, H, W, C]`` at per-frame coordinates ``[F, H, W]``."""
    shape = (x.shape[0], *rows.shape[1:])

    def frame(r: jax.Array, c: jax.Array) -> jax.Array:
        return _bilinear(x, jnp.broadcast_to(r, shape), jnp.broadcast_to(c, shape), mode)

    return jax.vmap(frame)(rows, cols)


@jax.jit
def _blur_frames(x: jax.Array, taps: jax.Array) -> jax.Array:
    """Blur ``x`` ``[B, H, W, C]`` once per row of ``taps`` ``[F, K]``."""
    return jax.vmap(lambda k: _blur(x, k))(taps)


def perturbation_sequence(
    name: str, x: jax.Array, num_frames: int, rng: jax.Array | None = None
) -> jax.Array:
    """Frames ``[num_frames, B, H, W, C]`` of gradually stronger perturbation ``name``.

    Jit-able with ``name`` and ``num_frames`` static.

    Args:
      name: one of :data:`PERTURBATIONS`.
      x: float images ``[B, H, W, C]`` in [0, 1], ``C`` in {1, 3}.
      num_frames: number of frames (at least 2); strength grows linearly from frame 0.
      rng: JAX PRNG key; required for "gaussian_noise", ignored otherwise.

    Returns:
      The sequence, dtype of ``x``, values in [0, 1].

    Raises:
      ValueError: for an unknown name, fewer than 2 frames, bad images or a missing key.
    """
    if name not in PERTURBATIONS:
        raise ValueError(
            f"unknown perturbation {name!r}; expected one of {', '.join(PERTURBATIONS)}"
        )
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
        raise ValueError(f"num_frames must be an integer >= 2, got {num_frames!r}")
    x = jnp.asarray(x)
    _check_images(x)
    dtype = x.dtype
    x = x.astype(jnp.float32)
    _, h, w, _ = x.shape
    t = np.linspace(0.0, 1.0, num_frames)
    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    if name == "gaussian_noise":
        if rng is None:
            raise ValueError("perturbation 'gaussian_noise' is random and needs a PRNG key `rng`")
        sigma = jnp.asarray(_NOISE_SIGMA * t, jnp.float32)[:, None, None, None, None]
        frames = x[None] + sigma * _normal(rng, x.shape)[None]
    elif name == "gaussian_blur":
        s = _scale(h, w)
        sigmas = s * (_BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * t)
        radius = int(4.0 * sigmas[-1] + 0.5)
        taps = jnp.asarray(np.stack([_gaussian_taps(sg, 4.0, radius) for sg in sigmas]))
        frames = _blur_frames(x, taps)
    elif name == "translate":
        shift = (_SHIFT_FRACTION * w * t)[:, None, None]
        rows = np.broadcast_to(yy, (num_frames, h, w))
        frames = _sample_frames(x, jnp.asarray(rows), jnp.asarray(xx[None] - shift), "constant")
    elif name == "rotate":
        theta = np.deg2rad(_MAX_DEGREES * t)[:, None, None]
        dx, dy = xx[None] - cx, yy[None] - cy
        rows = cy + dx * np.sin(theta) + dy * np.cos(theta)
        cols = cx + dx * np.cos(theta) - dy * np.sin(theta)
        frames = _sample_frames(x, jnp.asarray(rows), jnp.asarray(cols), "constant")
    else:  # zoom
        scale = (1.0 + (_MAX_ZOOM - 1.0) * t)[:, None, None]
        rows = cy + (yy[None] - cy) / scale
        cols = cx + (xx[None] - cx) / scale
        frames = _sample_frames(x, jnp.asarray(rows), jnp.asarray(cols), "edge")
    return jnp.clip(frames, 0.0, 1.0).astype(dtype)


def flip_probability(predictions: jax.Array, noise_perturbation: bool = False) -> jax.Array:
    """Flip probability of top-1 ``predictions`` ``[num_frames, B]`` (integer labels).

    As ``flip_prob`` of the reference ``cifar-p-eval.py`` (with its ``difficulty = 1``): the mean
    over examples of the fraction of frames ``1 .. F - 1`` whose prediction differs from the
    previous frame, or, with ``noise_perturbation=True`` (the reference's choice for noise
    sequences), from the first frame.

    Returns:
      A float32 scalar array (``float(...)`` gives a Python float); jit-able.

    Raises:
      ValueError: unless ``predictions`` is 2-D with at least two frames.
    """
    predictions = jnp.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] < 2:
        raise ValueError(
            f"predictions must have shape [num_frames >= 2, B], got {predictions.shape}"
        )
    reference = predictions[:1] if noise_perturbation else predictions[:-1]
    return jnp.mean((predictions[1:] != reference).astype(jnp.float32))
