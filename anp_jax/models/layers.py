"""Perturbation points: naming them, listing them, and choosing which ones ANP perturbs."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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


def _windows(x: jax.Array, pads: tuple[tuple[int, int], ...], kernel_hw: tuple[int, int]
             ) -> tuple[jax.Array, int, int]:
    """``x`` padded by ``pads``, and the output size of a stride-1 ``kernel_hw`` window."""
    (top, bottom), (left, right) = pads
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0),
                                             (0, 0, 0)))
    return xp, xp.shape[1] - kernel_hw[0] + 1, xp.shape[2] - kernel_hw[1] + 1


def _conv_by_shifts(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...],
                    precision: lax.PrecisionLike) -> jax.Array:
    """A stride-1 NHWC convolution as a sum over the kernel's taps of a shifted window of
    the padded input times that tap's ``[C, O]`` matrix:
    ``y[b, h, w, o] = sum_ij sum_c xp[b, h + i, w + j, c] * w[i, j, c, o]``.

    For a grey-scale first layer (``C`` of 1) this is one fused multiply-add loop over
    the output (``B Ho Wo KH KW C O`` products, the convolution's own count) where
    XLA:CPU's convolution runs several times slower (LeNet's first layer at batch 512:
    2 ms against 17 ms).
    """
    del precision  # elementwise products: no dot whose precision could be chosen
    kh, kw, channels, _ = w.shape
    xp, ho, wo = _windows(x, pads, (kh, kw))
    y = None
    for i in range(kh):
        for j in range(kw):
            for c in range(channels):
                # Broadcast products, one fusion with the sum: a dot with C of 1 to 3 would
                # be a matrix product of a degenerate shape.
                term = xp[:, i:i + ho, j:j + wo, c:c + 1] * w[i, j, c]
                y = term if y is None else y + term
    return y


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


def _on_cpu(by_shifts: Callable[..., jax.Array], xla: Callable[..., jax.Array],
            *args: jax.Array) -> jax.Array:
    """``by_shifts(*args)`` on CPU, ``xla(*args)`` elsewhere (GPU and TPU libraries run
    first-layer convolutions well)."""
    return lax.platform_dependent(*args, cpu=by_shifts, default=xla)


def _in_batch_loop(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunks: int = 4
                   ) -> jax.Array:
    """``fn(x)`` for a ``fn`` that treats examples independently, over ``chunks`` slices of
    the batch in a ``lax.map``.

    The loop is a fusion boundary: its output is materialised once, as a convolution's is.
    Without it XLA:CPU fuses a sum of shifted products into its consumers, and runs that
    several times slower than the two apart or computes it again in each of them (LeNet's
    first block at batch 512: 28 ms fused, 8 ms in the loop, 19 ms with XLA's convolution;
    an APGD step, whose input gradient three updates read: 83 ms against 54 ms for the
    gradient alone).
    """
    b = x.shape[0]
    n = next(k for k in (chunks, 2, 1) if b % k == 0)
    if n == 1:  # a loop of one trip is inlined: no boundary, but the same values
        return fn(x)
    y = lax.map(fn, x.reshape((n, b // n) + x.shape[1:]))
    return y.reshape((b,) + y.shape[2:])


def _conv_by_shifts_in_loop(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...],
                            precision: lax.PrecisionLike) -> jax.Array:
    """:func:`_conv_by_shifts` in :func:`_in_batch_loop`."""
    return _in_batch_loop(lambda part: _conv_by_shifts(part, w, pads, precision), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _first_layer_conv(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...],
                      precision: lax.PrecisionLike) -> jax.Array:
    xla = functools.partial(_conv, pads=pads, precision=precision)
    if w.shape[2] != 1:  # with 3 channels XLA's convolution is as fast or faster
        return xla(x, w)
    return _on_cpu(functools.partial(_conv_by_shifts_in_loop, pads=pads, precision=precision),
                   xla, x, w)


def _first_layer_conv_fwd(x, w, pads, precision):
    return _first_layer_conv(x, w, pads, precision), (x, w)


def _first_layer_conv_bwd(pads, precision, residuals, g):
    x, w = residuals

    def xla(x_, w_, g_):
        return jax.vjp(lambda a, b: _conv(a, b, pads, precision), x_, w_)[1](g_)

    def by_shifts(x_, w_, g_):
        # The kernel's gradient stays XLA's (a reduction over the batch it runs well).  The
        # batch loop was measured for one input channel, where it pays (see _in_batch_loop).
        def dx_of(part):
            return _input_grad_by_shifts(part, w_, pads, x_.shape[1:3], precision)

        dx_ = _in_batch_loop(dx_of, g_) if w_.shape[2] == 1 else dx_of(g_)
        return dx_, xla(x_, w_, g_)[1]

    dx, dw = _on_cpu(by_shifts, xla, x, w, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_first_layer_conv.defvjp(_first_layer_conv_fwd, _first_layer_conv_bwd)


def first_layer_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                     rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                     precision: lax.PrecisionLike = None) -> jax.Array:
    """``lax.conv_general_dilated`` for the convolution that reads a model's input, with
    an input gradient (the gradient ANP's ``input`` point and input attacks ask for) that
    XLA:CPU computes several times faster, and on CPU for one input channel a forward pass
    by shifted products (:func:`_conv_by_shifts_in_loop`), about twice as fast.  Values
    and gradients equal XLA's to float32 round-off (the kernel's gradient is XLA's own).

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
