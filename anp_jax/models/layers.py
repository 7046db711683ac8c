"""Perturbation points: naming them, listing them, and choosing which ones ANP perturbs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

PERTURBATIONS = "perturbations"
# The activation at every perturbation point before its noise is added, sown by ``perturb``
# when this collection is mutable (``apply(..., mutable=[ACTIVATIONS])``): {name: z}.
ACTIVATIONS = "activations"
_NHWC = ("NHWC", "HWIO", "NHWC")


class PerturbableModel(nn.Module):
    """Base of every model: named perturbation points, listed shallow to deep.

    Subclasses call ``self.perturb(name, z)`` at each point (Flax adds the matching entry
    of the ``perturbations`` collection to ``z`` when one is given, and is the identity
    otherwise) and list the names, input first, in :meth:`perturbation_points`.

    Attributes shared by every model: ``num_classes``; ``mean``/``std`` to standardise
    pixels inside the model; ``axis_name`` of pmap for cross-replica BatchNorm; ``dtype``
    of the computation (activations, and so the noise registers).
    """

    num_classes: int = 10
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    def perturbation_points(self) -> tuple[str, ...]:
        raise NotImplementedError

    def perturb(self, name: str, value: jnp.ndarray,
                collection: str = PERTURBATIONS) -> jnp.ndarray:
        """Returns ``value`` plus the noise ``collection[name]``, if that entry is given.

        Unlike Flax's ``Module.perturb``, a collection that holds only some of the points
        is allowed: the others are left untouched (and cost nothing).  At ``init`` with a
        mutable collection, zeros shaped like ``value`` are stored for every point.  When
        the ``ACTIVATIONS`` collection is mutable, ``value`` itself (before the noise) is
        sown there under ``name`` (not at ``init``).
        """
        if not self.is_initializing() and self.is_mutable_collection(ACTIVATIONS):
            # Written directly, not sown: a submodule may share the point's name.
            self.put_variable(ACTIVATIONS, name, value)
        if self.is_mutable_collection(collection) and not self.has_variable(collection, name):
            self.put_variable(collection, name, jnp.zeros_like(value))
        if self.has_variable(collection, name):
            value = value + self.get_variable(collection, name).astype(value.dtype)
        return value

    def normalize_input(self, x: jnp.ndarray) -> jnp.ndarray:
        """Standardises pixels inside the model, so attack budgets stay in pixel units."""
        if self.mean is not None:
            x = x - jnp.asarray(self.mean, x.dtype)
        if self.std is not None:
            x = x / jnp.asarray(self.std, x.dtype)
        return x


def max_pool(x: jnp.ndarray, size: int = 2) -> jnp.ndarray:
    """``nn.max_pool(x, (size, size), (size, size), padding="SAME")`` for ``[B, H, W, C]``.

    The same values (SAME padding pads the bottom and right edges with -inf).  Written as a
    reshape and a max over non-overlapping windows, so that its gradient is a comparison
    with the broadcast maximum: XLA:CPU expands the gradient of ``nn.max_pool`` (a
    select-and-scatter) into an index scatter with four index buffers the size of ``x``,
    the largest temporaries of LeNet's step.  Ties within a window (probability zero for
    float activations, and after a ReLU only at zero, where the ReLU's gradient is zero)
    share the gradient instead of giving it to the first maximum.
    """
    b, h, w, c = x.shape
    hp, wp = -(-h // size) * size, -(-w // size) * size
    if (hp, wp) != (h, w):
        x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), constant_values=-jnp.inf)
    return jnp.max(x.reshape(b, hp // size, size, wp // size, size, c), axis=(2, 4))


def _conv(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...],
          precision: lax.PrecisionLike) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC,
                                    precision=precision)


def _input_grad_by_shifts(g: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...],
                          in_hw: tuple[int, int], precision: lax.PrecisionLike) -> jax.Array:
    """``d loss / d x`` of a stride-1 NHWC convolution, as one matrix product and a sum
    of shifted copies: ``t[i, j, c, b, h, w] = sum_o w[i, j, c, o] * g[b, h, w, o]``, and
    ``dx[b, y, x, c] = sum_ij t[i, j, c, b, y + pad_h - i, x + pad_w - j]``.

    ``g``: ``[B, Ho, Wo, O]``; ``w``: ``[KH, KW, C, O]``; returns ``[B, H, W, C]``.  It
    touches ``B Ho Wo KH KW C`` values where the convolution XLA:CPU would otherwise run
    (a transposed convolution whose patches have ``KH KW O`` values per pixel) touches
    ``B H W KH KW O``: for a first layer (``C`` of 1 or 3, ``O`` of 6 to 64) many times
    fewer.
    """
    kh, kw, _, _ = w.shape
    _, ho, wo, _ = g.shape
    # Laid out [KH, KW, C, B, Ho, Wo] (the product's natural order), so that each shift
    # reads a contiguous block.
    t = jnp.einsum("ijco,bhwo->ijcbhw", w, g, precision=precision)
    (top, _), (left, _) = pads
    dx = None
    for i in range(kh):
        for j in range(kw):
            # The output pixel (y, x) read the input pixel (y + i - top, x + j - left).
            lo_h, lo_w = i - top, j - left
            shifted = lax.pad(t[i, j], jnp.zeros((), t.dtype),
                              ((0, 0, 0), (0, 0, 0), (lo_h, in_hw[0] - ho - lo_h, 0),
                               (lo_w, in_hw[1] - wo - lo_w, 0)))
            dx = shifted if dx is None else dx + shifted
    return jnp.transpose(dx, (1, 2, 3, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _first_layer_conv(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...],
                      precision: lax.PrecisionLike) -> jax.Array:
    return _conv(x, w, pads, precision)


def _first_layer_conv_fwd(x, w, pads, precision):
    return _conv(x, w, pads, precision), (x, w)


def _first_layer_conv_bwd(pads, precision, residuals, g):
    x, w = residuals
    _, vjp = jax.vjp(lambda x_, w_: _conv(x_, w_, pads, precision), x, w)
    # The kernel's gradient is XLA's own; the input's is computed by shifts on CPU only
    # (GPU and TPU libraries run the transposed convolution well).
    dx_xla, dw = vjp(g)
    dx = lax.platform_dependent(
        g, w, cpu=lambda g_, w_: _input_grad_by_shifts(g_, w_, pads, x.shape[1:3], precision),
        default=lambda g_, w_: dx_xla)
    return dx.astype(x.dtype), dw


_first_layer_conv.defvjp(_first_layer_conv_fwd, _first_layer_conv_bwd)


def first_layer_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                     rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                     precision: lax.PrecisionLike = None) -> jax.Array:
    """``lax.conv_general_dilated`` for the convolution that reads a model's input: the
    same values and kernel gradient, and an input gradient (the gradient ANP's ``input``
    point and input attacks ask for) that XLA:CPU computes several times faster.

    Pass it as ``nn.Conv(..., conv_general_dilated=first_layer_conv)``.  Used for stride-1,
    undilated, ungrouped 2-D convolutions with fewer input than output channels; any other
    convolution is ``lax.conv_general_dilated`` unchanged.
    """
    strides = tuple(window_strides)
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) if lhs.ndim == 4 else None
    simple = (lhs.ndim == 4 and strides == (1, 1) and feature_group_count == 1
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and all(d == 1 for d in (rhs_dilation or (1, 1)))
              and dimension_numbers in (None, dims) and rhs.shape[2] < rhs.shape[3])
    if not simple:
        return lax.conv_general_dilated(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count,
                                        precision=precision)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _first_layer_conv(lhs, rhs, pads, precision)


def select_layers(spec: str | Sequence[str | int], points: Sequence[str],
                  model_name: str = "model") -> tuple[str, ...]:
    """Resolves a layer selection to perturbation point names, in model order.

    ``spec`` is one of: ``"all"``; ``"none"`` or ``""``; ``"shallow N"`` (the first N
    points, the input included); ``"deep N"`` (the last N); a comma-separated string or a
    sequence of names and/or indices into ``points`` (``"0,1"`` as in the official code,
    ``"input,conv1"``).  Raises ``ValueError`` naming any unknown point.
    """
    points = tuple(points)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return points
        if text in ("", "none"):
            return ()
        words = text.split()
        if len(words) == 2 and words[0] in ("shallow", "deep"):
            try:
                n = int(words[1])
            except ValueError:
                raise ValueError(f"layer selection {spec!r}: expected '{words[0]} N' "
                                 "with an integer N") from None
            if not 1 <= n <= len(points):
                raise ValueError(f"layer selection {spec!r}: N must be in 1..{len(points)} "
                                 f"for {model_name}")
            return points[:n] if words[0] == "shallow" else points[-n:]
        items: Sequence[str | int] = [w.strip() for w in spec.split(",") if w.strip()]
    else:
        items = list(spec)
    chosen = set()
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            index = int(item)
            if not 0 <= index < len(points):
                raise ValueError(f"unknown perturbation point index {index} for {model_name}: "
                                 f"valid indices are 0..{len(points) - 1}")
            chosen.add(points[index])
        elif item in points:
            chosen.add(item)
        else:
            raise ValueError(f"unknown perturbation point {item!r} for {model_name}; "
                             f"choose from: {', '.join(points)}")
    return tuple(p for p in points if p in chosen)
