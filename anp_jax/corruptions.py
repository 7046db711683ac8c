"""The 19 CIFAR-10-C common corruptions in pure, jit-able JAX.

Re-implementation of the corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019), with the severity tables of the
reference ``make_cifar_c.py``. Every corruption takes a float batch ``x`` of shape ``[B, H, W, C]``
with values in [0, 1], any ``H`` and ``W``, ``C`` in {1, 3}, a ``severity`` in 0..5 (0 returns
``x`` unchanged; static under ``jax.jit``) and a JAX PRNG key ``rng`` (ignored by the
deterministic ones), and a keyword ``quantize`` (default False; True puts the result on the 256
levels of the released uint8 CIFAR-10-C files, see :func:`corrupt`). The result has the shape
and dtype of ``x`` and lies in [0, 1]. Each example of a batch gets its own random draw.
Severity parameters are passed to the jitted kernels as traced values, so one compilation per
input shape serves all five severities.

Image size. The reference works on 32x32 images. With ``s = max(1, min(H, W) / 32)``:

* parameters the reference gives in pixels (blur sigmas, the defocus disk radius, the motion-blur
  radius and sigma, the glass-blur distance) are multiplied by ``s``. They are never shrunk for
  images smaller than 32 px: a sub-pixel kernel degenerates (a disk of radius 0.4 px is a delta)
  and the severity ordering would break, so small images use the reference pixel values;
* the random layers that the reference draws per pixel of a 32x32 image (snow layer, spatter
  mask, elastic displacement field) are made with the reference pixel parameters on a grid whose
  shorter side is 32 (the image grid for smaller images) and resized bilinearly to ``H x W``, so
  that flakes, drops and displacements cover the same fraction of the image at every size;
  displacements are multiplied by the resize factor;
* parameters the reference gives relative to the image (zoom factors, the pixelate ratio, the
  elastic affine jitter) are used as they are; the fog fractal is drawn at the image resolution
  (map size the next power of two), as ImageNet-C does.

Differences from the reference (also in ``docs/corruptions.md``):

* Everything stays in float32: the reference's uint8 rounding of inputs and intermediate
  images (glass blur, the snow layer's PNG round trip) is not reproduced. Its final uint8 cast
  is, on request: ``quantize=True`` (see :func:`corrupt`) truncates to 256 levels as its
  ``np.uint8`` does (rounds, for the three corruptions whose library returns uint8).
* jpeg_compression has no codec. Baseline JPEG as Pillow/libjpeg encodes it at the reference
  quality is simulated: JFIF YCbCr, 4:2:0 chroma subsampling (2x2 mean; triangular "fancy"
  upsampling on decode), edge padding to whole MCUs, 8x8 DCT and quantisation (round half away
  from zero) with the standard Annex K luminance and chrominance tables scaled as
  ``jpeg_set_quality`` does. One-channel images are coded as greyscale JPEG (luminance table
  only). Entropy coding is lossless and is skipped; libjpeg's integer DCT is replaced by the
  exact one.
* motion_blur (and the streaks of snow) re-implement ImageMagick's ``MotionBlurImage``: a
  one-sided line of ``2 * ceil(radius) + 1`` taps weighted ``exp(-i^2 / (2 sigma^2))``, offsets
  rounded to whole pixels, edge pixels repeated.
* frost uses the reference's frost photographs, read from the ``imagecorruptions`` package
  (a dependency; its code is not imported) on the host once. As the reference, each example
  draws one of the first five (``np.random.randint(5)``: ``frost6.jpg`` is never used) and a
  crop position in ``[0, size - H)``; the photographs are resized by ``0.2 s`` with
  ``cv2.resize``'s bilinear sampling (no anti-aliasing: every 5th pixel at 32 px) and rounded
  to uint8 as OpenCV returns them, enlarged if an image would not fit.
* spatter re-implements the reference's OpenCV pipeline (Canny with L1 gradient, the 5x5 L2
  chamfer distance transform, histogram equalisation, emboss filter, box blurs, with OpenCV's
  borders and rounding) in JAX.
* glass_blur: the reference's tuple "swap" of two numpy pixel views is in effect a copy
  ``x[h, w] = x[h + dy, w + dx]`` (offsets in ``[-d, d)``), which we reproduce; with ``d = 1``
  (images under 48 px) the sequential sweep equals a parallel gather, which we use at every size.
* impulse_noise follows current scikit-image ``random_noise(mode='s&p')``: every element is
  replaced independently with probability ``amount``, by 0 or 1 with equal odds.
* One channel: saturate is the identity (a grey pixel has no saturation; the reference's HSV
  round trip would tint it red, which one channel cannot show); brightness is ``clip(x + c)``,
  which is what the HSV round trip gives for grey; snow uses ``x`` as its grey image; the
  water and mud colours and the frost photographs are replaced by their luminance.
* elastic_transform's affine step interpolates in float (OpenCV's ``warpAffine`` quantises
  coordinates to 1/32 pixel); its reference points use the image centre ``(W // 2, H // 2)``
  in (x, y) order, which is the reference's for square images.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CORRUPTIONS",
    "brightness",
    "contrast",
    "corrupt",
    "corruption_id",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_blur",
    "gaussian_noise",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "saturate",
    "shot_noise",
    "snow",
    "spatter",
    "speckle_noise",
    "zoom_blur",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "gaussian_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "saturate",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "spatter",
)

_MAX_SEVERITY = 5
# Corruptions whose reference output is already uint8 from a library that rounds (Pillow's
# resampling and JPEG decoder, ImageMagick's 8-bit PNG); the others are truncated by the
# reference's np.uint8 of a float result.
_ROUNDED = frozenset({"motion_blur", "pixelate", "jpeg_compression"})
_UINT8_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)
_REF_SIZE = 32
_HIGHEST = jax.lax.Precision.HIGHEST
_LUMA = np.array([0.299, 0.587, 0.114])

# Severity tables of make_cifar_c.py, indexed by severity - 1.
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT_NOISE = (500, 250, 100, 75, 50)
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
_SPECKLE_NOISE = (0.06, 0.1, 0.12, 0.16, 0.2)
_GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
# (sigma, max_delta, iterations)
_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# (disk radius, alias blur)
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
# (radius, sigma)
_MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))
_ZOOM_BLUR = tuple(np.arange(1.0, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26))
# (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
_SNOW = (
    (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
# (image weight, frost weight)
_FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
# The reference draws np.random.randint(5) over its six file names: frost6.jpg is never used.
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
_FROST_ZOOM = 0.2  # the photographs' resize factor for 32x32 images
# (strength, wibble decay)
_FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
# (saturation factor, saturation offset)
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
# (alpha, sigma, affine jitter) as fractions of the image size
_ELASTIC = (
    (0.0, 0.0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
_JPEG_QUALITY = (80, 65, 58, 50, 40)
# (loc, scale, sigma, threshold, intensity, mud)
_SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, False),
    (0.65, 0.1, 0.8, 0.7, 0.5, False),
    (0.65, 0.3, 1.0, 0.69, 0.5, False),
    (0.65, 0.1, 0.7, 0.69, 0.6, True),
    (0.65, 0.1, 0.5, 0.68, 0.6, True),
)
_WATER_RGB = np.array([175.0, 238.0, 238.0]) / 255.0
_MUD_RGB = np.array([63.0, 42.0, 20.0]) / 255.0

# Standard JPEG quantisation tables (ITU-T T.81, Annex K).
_JPEG_LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ]
)
_JPEG_CHROMA_TABLE = np.full((8, 8), 99)
_JPEG_CHROMA_TABLE[:4, :4] = [
    [17, 18, 24, 47],
    [18, 21, 26, 66],
    [24, 26, 56, 99],
    [47, 66, 99, 99],
]
_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


_Corruption = Callable[..., jax.Array]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")


def _check_severity(severity: int) -> None:
    valid = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not valid or not 0 <= severity <= _MAX_SEVERITY:
        raise ValueError(f"severity must be an integer in 0..{_MAX_SEVERITY}, got {severity!r}")


def _check_images(x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, H, W, C] with C in (1, 3), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {x.dtype}")


def _quantize(y: jax.Array, rounding: bool) -> jax.Array:
    """``y`` in [0, 1] on the 256 levels of uint8: ``floor(255 y) / 255`` (``np.uint8`` of the
    reference's float result) or, with ``rounding``, ``floor(255 y + 0.5) / 255``.

    The levels are looked up, so that each is the correctly rounded float32 ``k / 255`` that
    ``np.uint8`` images divided by 255 give (XLA divides by a constant through its reciprocal,
    which is one ulp off for half of them)."""
    level = jnp.floor(255.0 * y + (0.5 if rounding else 0.0))
    return jnp.asarray(_UINT8_LEVELS)[jnp.clip(level, 0, 255).astype(jnp.int32)]


def _corruption(needs_rng: bool) -> Callable[[_Corruption], _Corruption]:
    """Wrap an implementation with validation, severity 0, clipping to [0, 1], the optional
    uint8 quantisation and the dtype.

    The implementation receives a float32 ``[B, H, W, C]`` batch and a severity in 1..5. It
    passes the severity's parameters as traced arguments to a jitted kernel, so that one
    compilation per input shape serves all five severities.
    """

    def decorate(impl: _Corruption) -> _Corruption:
        rounding = impl.__name__ in _ROUNDED

        @functools.wraps(impl)
        def wrapper(
            x: jax.Array, severity: int, rng: jax.Array | None = None, *, quantize: bool = False
        ) -> jax.Array:
            _check_severity(severity)
            x = jnp.asarray(x)
            _check_images(x)
            if severity == 0:
                return _quantize(x, rounding).astype(x.dtype) if quantize else x
            if needs_rng and rng is None:
                raise ValueError(f"{impl.__name__} is random and needs a PRNG key `rng`")
            out = jnp.clip(impl(x.astype(jnp.float32), severity, rng), 0.0, 1.0)
            if quantize:
                out = _quantize(out, rounding)
            return out.astype(x.dtype)

        return wrapper

    return decorate


# ---------------------------------------------------------------------------------------------
# Shared image operations
# ---------------------------------------------------------------------------------------------


def _scale(h: int, w: int) -> float:
    """Factor applied to parameters the reference defines in pixels of a 32x32 image."""
    return max(1.0, min(h, w) / _REF_SIZE)


def _base_shape(h: int, w: int) -> tuple[int, int]:
    """Grid on which per-pixel random layers are drawn (shorter side 32, never upsampled)."""
    s = _scale(h, w)
    return max(1, round(h / s)), max(1, round(w / s))


# The samplers draw flat arrays and reshape: XLA:CPU compiles multi-dimensional threefry
# draws several times slower than flat ones.
def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, (math.prod(shape),)).reshape(shape)


def _uniform(key: jax.Array, shape: tuple[int, ...], low: float, high: float) -> jax.Array:
    return jax.random.uniform(key, (math.prod(shape),), minval=low, maxval=high).reshape(shape)


def _resize_plane(p: jax.Array, h: int, w: int) -> jax.Array:
    """Bilinearly resize ``[B, h0, w0]`` planes to ``[B, h, w]``."""
    if p.shape[1:] == (h, w):
        return p
    return jax.image.resize(p, (p.shape[0], h, w), method="linear")


def _colour(rgb: np.ndarray, channels: int) -> jax.Array:
    """An RGB colour for ``channels`` channels (its luminance for one channel)."""
    return jnp.asarray(rgb if channels == 3 else [_LUMA @ rgb], jnp.float32)


def _grey(x: jax.Array) -> jax.Array:
    """Luminance ``[B, H, W, 1]`` (OpenCV's RGB2GRAY weights); ``x`` itself for one channel."""
    if x.shape[-1] == 1:
        return x
    luma = jnp.asarray(_LUMA, jnp.float32)
    return jnp.einsum("bhwc,c->bhw", x, luma, precision=_HIGHEST)[..., None]


def _conv2d(x: jax.Array, kernel: jax.Array | np.ndarray, mode: str) -> jax.Array:
    """Correlate each channel of ``[B, H, W, C]`` with an odd-sized 2-D kernel.

    ``mode`` is a ``jnp.pad`` mode: "reflect" is OpenCV's BORDER_REFLECT_101, "edge" is
    BORDER_REPLICATE and SciPy "nearest", "symmetric" is SciPy "reflect".
    """
    kh, kw = kernel.shape
    b, h, w, c = x.shape
    ph, pw = kh // 2, kw // 2
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=mode)
    xp = jnp.moveaxis(xp, 3, 1).reshape(b * c, h + 2 * ph, w + 2 * pw, 1)
    out = jax.lax.conv_general_dilated(
        xp,
        jnp.asarray(kernel, jnp.float32)[:, :, None, None],
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HIGHEST,
    )
    return jnp.moveaxis(out.reshape(b, c, h, w), 1, 3)


def _conv_plane(p: jax.Array, kernel: np.ndarray, mode: str) -> jax.Array:
    """:func:`_conv2d` for ``[B, H, W]`` planes."""
    return _conv2d(p[..., None], kernel, mode)[..., 0]


def _gaussian_taps(sigma: float, truncate: float, radius: int | None = None) -> np.ndarray:
    """SciPy's ``gaussian_filter1d`` kernel, zero-padded to ``2 * radius + 1`` taps if given."""
    own = int(truncate * sigma + 0.5)
    if sigma <= 0 or own == 0:
        k = np.ones(1)
    else:
        t = np.arange(-own, own + 1)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        k /= k.sum()
    return k if radius is None else np.pad(k, radius - k.size // 2)


def _blur(x: jax.Array, taps: jax.Array | np.ndarray, mode: str = "edge") -> jax.Array:
    """Separable blur of ``[B, H, W, C]`` over H and W with 1-D ``taps`` (SciPy
    ``gaussian_filter`` with :func:`_gaussian_taps`; skimage's default border "nearest")."""
    if taps.shape[0] == 1:
        return x
    return _conv2d(_conv2d(x, taps[:, None], mode), taps[None, :], mode)


def _border_index(i: jax.Array, n: int, mode: str) -> jax.Array:
    """Map integer indices outside ``[0, n)`` inside, following a border ``mode``."""
    if mode in ("edge", "constant") or n == 1:
        return jnp.clip(i, 0, n - 1)
    if mode == "reflect":  # d c b | a b c d | c b a (BORDER_REFLECT_101)
        period = 2 * (n - 1)
        i = jnp.mod(i, period)
        return jnp.where(i >= n, period - i, i)
    if mode == "symmetric":  # c b a | a b c d | d c b (SciPy "reflect")
        period = 2 * n
        i = jnp.mod(i, period)
        return jnp.where(i >= n, period - 1 - i, i)
    raise ValueError(f"unknown border mode {mode!r}")


def _bilinear(x: jax.Array, rows: jax.Array, cols: jax.Array, mode: str) -> jax.Array:
    """Sample ``[B, H, W, C]`` at float pixel coordinates ``rows, cols`` of shape ``[B, h, w]``.

    Pixel centres are at integer coordinates. ``mode`` as in :func:`_border_index`; "constant"
    fills with zeros.
    """
    b, h, w, _ = x.shape
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    bidx = jnp.arange(b)[:, None, None]
    out = jnp.zeros((*rows.shape, x.shape[-1]), x.dtype)
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            ri, ci = r0 + dr, c0 + dc
            weight = wr * wc
            if mode == "constant":
                inside = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
                weight = weight * inside[..., None]
            val = x[bidx, _border_index(ri, h, mode), _border_index(ci, w, mode)]
            out = out + weight * val
    return out


def _interp_matrix(coords: np.ndarray, n_in: int) -> np.ndarray:
    """Linear-interpolation weights ``[len(coords), n_in]`` sampling an axis at ``coords``."""
    lo = np.floor(coords)
    frac = coords - lo
    lo = np.clip(lo.astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    m = np.zeros((coords.size, n_in))
    rows = np.arange(coords.size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


@functools.lru_cache(maxsize=256)
def _clipped_zoom_matrix(n: int, zoom: float) -> np.ndarray:
    """One axis of the reference ``clipped_zoom`` (centre crop, ``scipy.ndimage.zoom`` with
    order 1 and ``grid_mode=False``, centre trim) as an ``[n, n]`` matrix."""
    crop = int(np.ceil(n / zoom))
    top = (n - crop) // 2
    out = int(round(crop * zoom))
    trim = (out - n) // 2
    step = (crop - 1) / (out - 1) if out > 1 else 0.0
    return _interp_matrix(top + (np.arange(n) + trim) * step, n)


def _apply_axes(x: jax.Array, mh: jax.Array | np.ndarray, mw: jax.Array | np.ndarray) -> jax.Array:
    """Apply ``[H', H]`` and ``[W', W]`` linear maps to the spatial axes of ``[B, H, W, C]``."""
    mh, mw = jnp.asarray(mh, jnp.float32), jnp.asarray(mw, jnp.float32)
    return jnp.einsum("ij,bjkc,lk->bilc", mh, x, mw, precision=_HIGHEST)


def _motion_taps(radius: float, sigma: float, size: int) -> np.ndarray:
    """ImageMagick ``MotionBlurImage`` weights: ``2 * ceil(radius) + 1`` taps
    ``exp(-i^2 / (2 sigma^2))`` normalised, zero-padded to ``size`` taps."""
    width = 2 * math.ceil(radius) + 1
    taps = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    return np.pad(taps / taps.sum(), (0, size - width))


def _motion_blur(x: jax.Array, taps: jax.Array, angle: jax.Array) -> jax.Array:
    """ImageMagick motion blur of ``[B, H, W, C]`` with per-example ``angle`` (degrees): tap
    ``i`` samples ``(x + round(i cos a), y + round(i sin a))``; outside pixels repeat the edge."""
    b, h, w, _ = x.shape
    theta = jnp.deg2rad(angle)[:, None, None]
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    bidx = jnp.arange(b)[:, None, None]

    def tap(i: jax.Array, acc: jax.Array) -> jax.Array:
        t = i.astype(jnp.float32)
        dx = jnp.ceil(t * jnp.cos(theta) - 0.5).astype(jnp.int32)
        dy = jnp.ceil(t * jnp.sin(theta) - 0.5).astype(jnp.int32)
        r = jnp.clip(rows + dy, 0, h - 1)
        c = jnp.clip(cols + dx, 0, w - 1)
        return acc + taps[i] * x[bidx, r, c]

    return jax.lax.fori_loop(0, taps.shape[0], tap, jnp.zeros_like(x))


def _rgb_to_hsv(x: jax.Array) -> jax.Array:
    """``skimage.color.rgb2hsv`` on the last axis."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.max(x, axis=-1)
    delta = v - jnp.min(x, axis=-1)
    safe_delta = jnp.where(delta > 0, delta, 1.0)
    s = jnp.where(delta > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    h = jnp.where(
        b == v,
        4.0 + (r - g) / safe_delta,
        jnp.where(g == v, 2.0 + (b - r) / safe_delta, (g - b) / safe_delta),
    )
    h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """``skimage.color.hsv2rgb`` on the last axis."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = jnp.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = jnp.mod(sector.astype(jnp.int32), 6)[..., None]
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    choices = jnp.stack(
        [
            jnp.stack([v, t, p], axis=-1),
            jnp.stack([q, v, p], axis=-1),
            jnp.stack([p, v, t], axis=-1),
            jnp.stack([p, q, v], axis=-1),
            jnp.stack([t, p, v], axis=-1),
            jnp.stack([v, p, q], axis=-1),
        ]
    )
    return jnp.take_along_axis(choices, sector[None], axis=0)[0]


_apply_axes_jit = jax.jit(_apply_axes)
_conv2d_jit = jax.jit(_conv2d, static_argnames="mode")
_blur_jit = jax.jit(_blur, static_argnames="mode")


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


@jax.jit
def _gaussian_noise_kernel(x: jax.Array, c: float, rng: jax.Array) -> jax.Array:
    return x + c * _normal(rng, x.shape)


@jax.jit
def _shot_noise_kernel(x: jax.Array, c: float, rng: jax.Array) -> jax.Array:
    counts = jax.random.poisson(rng, x.reshape(-1) * c).reshape(x.shape)
    return counts.astype(jnp.float32) / c


@jax.jit
def _impulse_noise_kernel(x: jax.Array, amount: float, rng: jax.Array) -> jax.Array:
    u = _uniform(rng, (2, *x.shape), 0.0, 1.0)
    return jnp.where(u[0] < amount, (u[1] < 0.5).astype(jnp.float32), x)


@jax.jit
def _speckle_noise_kernel(x: jax.Array, c: float, rng: jax.Array) -> jax.Array:
    return x + x * c * _normal(rng, x.shape)


@_corruption(needs_rng=True)
def gaussian_noise(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Additive Gaussian noise ``clip(x + N(0, c^2))``, ``c`` in (0.04, 0.06, 0.08, 0.09, 0.1)."""
    return _gaussian_noise_kernel(x, _GAUSSIAN_NOISE[severity - 1], rng)


@_corruption(needs_rng=True)
def shot_noise(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Poisson (shot) noise ``clip(Poisson(c x) / c)``, ``c`` in (500, 250, 100, 75, 50)."""
    return _shot_noise_kernel(x, _SHOT_NOISE[severity - 1], rng)


@_corruption(needs_rng=True)
def impulse_noise(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Salt-and-pepper noise: each element becomes 0 or 1 (equal odds) with probability
    ``amount`` in (0.01, 0.02, 0.03, 0.05, 0.07), as ``skimage.util.random_noise(mode='s&p')``."""
    return _impulse_noise_kernel(x, _IMPULSE_NOISE[severity - 1], rng)


@_corruption(needs_rng=True)
def speckle_noise(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Multiplicative noise ``clip(x + x N(0, c^2))``, ``c`` in (0.06, 0.1, 0.12, 0.16, 0.2)."""
    return _speckle_noise_kernel(x, _SPECKLE_NOISE[severity - 1], rng)


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def _disk_kernel(radius: float, alias_blur: float, half: int) -> np.ndarray:
    """The reference ``disk`` on a ``(2 half + 1)^2`` grid: an aliased disk normalised to sum 1,
    blurred by an OpenCV Gaussian (3x3 up to radius 8, else 5x5) of ``sigma = alias_blur``."""
    ksize = 3 if radius <= 8 else 5
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    t = np.arange(ksize) - ksize // 2
    g = np.exp(-(t**2) / (2.0 * alias_blur**2))
    g /= g.sum()
    padded = np.pad(disk, ksize // 2)
    out = np.zeros_like(disk)
    for i, gi in enumerate(g):
        for j, gj in enumerate(g):
            out += gi * gj * padded[i : i + disk.shape[0], j : j + disk.shape[1]]
    return out


@_corruption(needs_rng=False)
def defocus_blur(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Convolution with an anti-aliased disk (``cv2.filter2D``, BORDER_REFLECT_101); the disk
    radius, not the anti-alias blur, is scaled with the image size."""
    radius, alias_blur = _DEFOCUS_BLUR[severity - 1]
    s = _scale(*x.shape[1:3])
    largest = _DEFOCUS_BLUR[-1][0] * s
    half = math.ceil(largest) + (1 if largest <= 8 else 2)
    return _conv2d_jit(x, _disk_kernel(radius * s, alias_blur, half), mode="reflect")


def _local_shuffle(x: jax.Array, delta: int, rng: jax.Array) -> jax.Array:
    """One sweep of the reference glass-blur loop over ``h`` from ``H - delta`` down to
    ``delta + 1`` (likewise ``w``) with ``dx, dy`` drawn from ``[-delta, delta)``.

    The reference's tuple "swap" of two numpy pixel views is in effect a copy,
    ``x[h, w] = x[h + dy, w + dx]``. For ``delta = 1`` every source lies up-left of its target
    and is read before it is written, so the sweep is this parallel gather; for larger ``delta``
    the gather reads the image before the sweep where the sequential loop can read pixels it
    has already updated.
    """
    b, h, w, _ = x.shape
    offsets = jax.random.randint(rng, (2 * b * h * w,), -delta, delta).reshape(2, b, h, w)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (rows > delta) & (rows <= h - delta) & (cols > delta) & (cols <= w - delta)
    src_rows = jnp.where(inside, rows + offsets[0], rows)
    src_cols = jnp.where(inside, cols + offsets[1], cols)
    return x[jnp.arange(b)[:, None, None], src_rows, src_cols]


@functools.partial(jax.jit, static_argnames="delta")
def _glass_blur_kernel(
    x: jax.Array, taps: jax.Array, iterations: int, rng: jax.Array, delta: int
) -> jax.Array:
    x = _blur(x, taps)
    x = jax.lax.fori_loop(
        0, iterations, lambda i, y: _local_shuffle(y, delta, jax.random.fold_in(rng, i)), x
    )
    return _blur(x, taps)


@_corruption(needs_rng=True)
def glass_blur(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Gaussian blur, ``iterations`` sweeps of sequential local pixel swaps, Gaussian blur;
    sigma and the swap distance are scaled with the image size."""
    sigma, delta, iterations = _GLASS_BLUR[severity - 1]
    s = _scale(*x.shape[1:3])
    radius = int(4.0 * max(p[0] for p in _GLASS_BLUR) * s + 0.5)
    taps = _gaussian_taps(sigma * s, 4.0, radius)
    return _glass_blur_kernel(x, taps, iterations, rng, delta=max(1, round(delta * s)))


@jax.jit
def _motion_blur_kernel(x: jax.Array, taps: jax.Array, rng: jax.Array) -> jax.Array:
    return _motion_blur(x, taps, _uniform(rng, (x.shape[0],), -45.0, 45.0))


@_corruption(needs_rng=True)
def motion_blur(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """ImageMagick motion blur (radius and sigma scaled with the image size) at a random angle
    in [-45, 45) degrees per example."""
    radius, sigma = _MOTION_BLUR[severity - 1]
    s = _scale(*x.shape[1:3])
    size = 2 * math.ceil(max(p[0] for p in _MOTION_BLUR) * s) + 1
    return _motion_blur_kernel(x, _motion_taps(radius * s, sigma * s, size), rng)


@jax.jit
def _zoom_blur_kernel(x: jax.Array, mh: jax.Array, mw: jax.Array, count: int) -> jax.Array:
    zoomed = jnp.einsum("zij,bjkc,zlk->bilc", mh, x, mw, precision=_HIGHEST)
    return (x + zoomed) / count


@_corruption(needs_rng=False)
def zoom_blur(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Mean of ``x`` and its centre zooms by ``np.arange(1, 1 + z, 0.01)`` (the reference
    ``clipped_zoom``: crop, ``scipy.ndimage.zoom`` of order 1, trim)."""
    _, h, w, _ = x.shape
    zooms = _ZOOM_BLUR[severity - 1]
    # Padded with zero maps to the largest count, so that all severities share one compilation.
    mh = np.zeros((len(_ZOOM_BLUR[-1]), h, h), np.float32)
    mw = np.zeros((len(_ZOOM_BLUR[-1]), w, w), np.float32)
    for i, z in enumerate(zooms):
        mh[i], mw[i] = _clipped_zoom_matrix(h, z), _clipped_zoom_matrix(w, z)
    return _zoom_blur_kernel(x, mh, mw, len(zooms) + 1)


@_corruption(needs_rng=False)
def gaussian_blur(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """``skimage.filters.gaussian`` (mode "nearest", truncate 4) with sigma in
    (0.4, 0.6, 0.7, 0.8, 1) times the image-size factor."""
    s = _scale(*x.shape[1:3])
    radius = int(4.0 * max(_GAUSSIAN_BLUR) * s + 0.5)
    return _blur_jit(x, _gaussian_taps(_GAUSSIAN_BLUR[severity - 1] * s, 4.0, radius), mode="edge")


# ---------------------------------------------------------------------------------------------
# Weather
# ---------------------------------------------------------------------------------------------


@jax.jit
def _snow_kernel(
    x: jax.Array,
    rng: jax.Array,
    zoom_h: jax.Array,
    zoom_w: jax.Array,
    loc: float,
    scale: float,
    threshold: float,
    taps: jax.Array,
    blend: float,
) -> jax.Array:
    b, h, w, _ = x.shape
    k_layer, k_angle = jax.random.split(rng)
    layer = loc + scale * _normal(k_layer, (b, zoom_h.shape[0], zoom_w.shape[0], 1))
    layer = _apply_axes(layer, zoom_h, zoom_w)
    layer = jnp.clip(jnp.where(layer < threshold, 0.0, layer), 0.0, 1.0)
    layer = _motion_blur(layer, taps, _uniform(k_angle, (b,), -135.0, -45.0))
    layer = _resize_plane(layer[..., 0], h, w)[..., None]
    x = blend * x + (1.0 - blend) * jnp.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + layer + layer[:, ::-1, ::-1]


@_corruption(needs_rng=True)
def snow(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Snow: a thresholded, zoomed Gaussian layer streaked by a motion blur at an angle in
    [-135, -45) degrees, added twice (once rotated by 180 degrees) to a brightened image."""
    loc, scale, zoom, threshold, radius, sigma, blend = _SNOW[severity - 1]
    hb, wb = _base_shape(*x.shape[1:3])
    size = 2 * math.ceil(max(p[4] for p in _SNOW)) + 1
    zoom_h, zoom_w = _clipped_zoom_matrix(hb, zoom), _clipped_zoom_matrix(wb, zoom)
    taps = _motion_taps(radius, sigma, size)
    return _snow_kernel(x, rng, zoom_h, zoom_w, loc, scale, threshold, taps, blend)


def _frost_photo_dir() -> pathlib.Path:
    """Directory of the reference frost photographs inside the installed ``imagecorruptions``
    package, found without importing the package's code (which needs OpenCV and
    scikit-image). Raises ``FileNotFoundError`` with the fix if they are missing."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = pathlib.Path(location) / "frost"
            if all((folder / name).is_file() for name in _FROST_FILES):
                return folder
    raise FileNotFoundError(
        "frost needs the frost photographs of the `imagecorruptions` package "
        "(pip install imagecorruptions)"
    )


@functools.cache
def _frost_photos() -> tuple[np.ndarray, ...]:
    """The reference's five frost photographs as read-only uint8 RGB ``[H, W, 3]`` arrays
    (alpha dropped, as ``cv2.imread`` does), read from local files once."""
    from PIL import Image

    folder = _frost_photo_dir()
    photos = []
    for name in _FROST_FILES:
        with Image.open(folder / name) as img:
            photo = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        photo.setflags(write=False)
        photos.append(photo)
    return tuple(photos)


def _cv2_linear_matrix(n_in: int, n_out: int, factor: float) -> np.ndarray:
    """One axis of ``cv2.resize(..., fx=factor, interpolation=INTER_LINEAR)`` as an
    ``[n_out, n_in]`` matrix: output pixel ``i`` samples ``(i + 0.5) / factor - 0.5`` with two
    taps, no anti-aliasing, edge pixels repeated (for ``factor = 0.2``: every 5th pixel)."""
    coords = (np.arange(n_out) + 0.5) * (1.0 / factor) - 0.5
    return _interp_matrix(np.clip(coords, 0.0, n_in - 1.0), n_in)


@functools.lru_cache(maxsize=8)
def _frost_layers(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The frost photographs resized for ``h x w`` images, stacked: uint8 ``[5, Hm, Wm, 3]``
    (zero-padded to the largest) and their sizes int32 ``[5, 2]``.

    The reference resizes by 0.2 for 32x32 images; here by ``0.2 * s`` (``s`` as for the other
    corruptions, so the frost covers the same fraction of any image and small images use the
    reference factor), enlarged where needed so that every photograph covers the image, and
    rounded to uint8 as ``cv2.resize`` returns it.
    """
    zoom = _FROST_ZOOM * _scale(h, w)
    layers = []
    for photo in _frost_photos():
        ph, pw = photo.shape[:2]
        factor = max(zoom, (h + 1) / ph, (w + 1) / pw)
        oh, ow = max(h + 1, round(ph * factor)), max(w + 1, round(pw * factor))
        mh, mw = _cv2_linear_matrix(ph, oh, factor), _cv2_linear_matrix(pw, ow, factor)
        resized = np.einsum("ij,jkc,lk->ilc", mh, photo.astype(np.float64), mw, optimize=True)
        layers.append(np.clip(np.round(resized), 0, 255).astype(np.uint8))
    sizes = np.array([layer.shape[:2] for layer in layers], np.int32)
    hm, wm = sizes.max(axis=0)
    stack = np.zeros((len(layers), hm, wm, 3), np.uint8)
    for i, layer in enumerate(layers):
        stack[i, : layer.shape[0], : layer.shape[1]] = layer
    stack.setflags(write=False)
    sizes.setflags(write=False)
    return stack, sizes


def _frost_blend(
    x: jax.Array,
    layers: jax.Array,
    index: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    a: float,
    weight: float,
) -> jax.Array:
    """``a x + weight frost`` with ``frost`` the ``H x W`` crop at ``(rows, cols)`` ``[B]`` of
    photograph ``index`` ``[B]`` of the uint8 ``layers`` (its luminance for one channel)."""
    _, h, w, c = x.shape

    def crop(i: jax.Array, r: jax.Array, col: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(layers, (i, r, col, 0), (1, h, w, 3))[0]

    frost_rgb = jax.vmap(crop)(index, rows, cols).astype(jnp.float32) / 255.0
    return a * x + weight * (frost_rgb if c == 3 else _grey(frost_rgb))


@jax.jit
def _frost_kernel(
    x: jax.Array, rng: jax.Array, layers: jax.Array, sizes: jax.Array, a: float, weight: float
) -> jax.Array:
    b, h, w, _ = x.shape
    k_index, k_row, k_col = jax.random.split(rng, 3)
    index = jax.random.randint(k_index, (b,), 0, layers.shape[0])
    # numpy's randint(0, n) as in the reference: the start lies in [0, size - H).
    rows = jax.random.randint(k_row, (b,), 0, sizes[index, 0] - h)
    cols = jax.random.randint(k_col, (b,), 0, sizes[index, 1] - w)
    return _frost_blend(x, layers, index, rows, cols, a, weight)


@_corruption(needs_rng=True)
def frost(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """``clip(a x + b frost)`` with ``(a, b)`` in ((1, .2), (1, .3), (.9, .4), (.85, .4),
    (.75, .45)) and ``frost`` a random crop of one of the reference's five frost photographs
    (from the ``imagecorruptions`` package), resized by ``0.2 s`` as for 32x32 images; one
    photograph and crop per example; luminance for one channel."""
    a, weight = _FROST[severity - 1]
    layers, sizes = _frost_layers(*x.shape[1:3])
    return _frost_kernel(x, rng, layers, sizes, a, weight)


def _plasma_fractal(rng: jax.Array, b: int, mapsize: int, wibbledecay: jax.Array) -> jax.Array:
    """The reference diamond-square ``plasma_fractal``, batched: ``[B, mapsize, mapsize]``
    in [0, 1]; ``mapsize`` is a power of two."""
    levels = mapsize.bit_length() - 1
    cells = [(mapsize >> (levels - i)) ** 2 for i in range(levels)]  # centres per level
    noise = _uniform(rng, (b, 3 * sum(cells)), -1.0, 1.0)
    m = jnp.zeros((b, mapsize, mapsize))
    step, wibble, start = mapsize, jnp.asarray(100.0), 0

    def wibbled_mean(total: jax.Array) -> jax.Array:
        nonlocal start
        u = noise[:, start : start + total[0].size].reshape(total.shape)
        start += total[0].size
        return total / 4.0 + wibble * wibble * u

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        square = corners + jnp.roll(corners, -1, axis=1)
        square = square + jnp.roll(square, -1, axis=2)
        m = m.at[:, half::step, half::step].set(wibbled_mean(square))
        centres = m[:, half::step, half::step]
        corners = m[:, ::step, ::step]
        row_sum = centres + jnp.roll(centres, 1, axis=1) + corners + jnp.roll(corners, -1, axis=2)
        m = m.at[:, ::step, half::step].set(wibbled_mean(row_sum))
        col_sum = centres + jnp.roll(centres, 1, axis=2) + corners + jnp.roll(corners, -1, axis=1)
        m = m.at[:, half::step, ::step].set(wibbled_mean(col_sum))
        step //= 2
        wibble = wibble / wibbledecay
    m = m - m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


@jax.jit
def _fog_kernel(x: jax.Array, rng: jax.Array, strength: float, wibbledecay: float) -> jax.Array:
    b, h, w, _ = x.shape
    mapsize = max(2, 1 << (max(h, w) - 1).bit_length())
    fractal = _plasma_fractal(rng, b, mapsize, wibbledecay)[:, :h, :w, None]
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + strength * fractal) * max_val / (max_val + strength)


@_corruption(needs_rng=True)
def fog(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """``clip((x + c f) max(x) / (max(x) + c))`` with ``f`` a plasma fractal drawn at the image
    resolution (map size the next power of two, cropped)."""
    strength, wibbledecay = _FOG[severity - 1]
    return _fog_kernel(x, rng, strength, wibbledecay)


# ---------------------------------------------------------------------------------------------
# Digital
# ---------------------------------------------------------------------------------------------


@jax.jit
def _brightness_kernel(x: jax.Array, c: float) -> jax.Array:
    if x.shape[-1] == 1:
        return x + c
    hsv = _rgb_to_hsv(x)
    return _hsv_to_rgb(hsv.at[..., 2].set(jnp.clip(hsv[..., 2] + c, 0.0, 1.0)))


@_corruption(needs_rng=False)
def brightness(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Add ``c`` in (0.05, 0.1, 0.15, 0.2, 0.3) to the HSV value; ``clip(x + c)`` on one
    channel (the HSV round trip of a grey pixel)."""
    return _brightness_kernel(x, _BRIGHTNESS[severity - 1])


@jax.jit
def _contrast_kernel(x: jax.Array, c: float) -> jax.Array:
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


@_corruption(needs_rng=False)
def contrast(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """``(x - m) c + m`` with ``m`` the per-image, per-channel mean and ``c`` in
    (0.75, 0.5, 0.4, 0.3, 0.15)."""
    return _contrast_kernel(x, _CONTRAST[severity - 1])


@jax.jit
def _saturate_kernel(x: jax.Array, a: float, offset: float) -> jax.Array:
    hsv = _rgb_to_hsv(x)
    return _hsv_to_rgb(hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * a + offset, 0.0, 1.0)))


@_corruption(needs_rng=False)
def saturate(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """HSV saturation ``clip(S a + b)``: severities 1-2 desaturate, 3-5 oversaturate (as in the
    reference). The identity on one channel."""
    if x.shape[-1] == 1:
        return x
    return _saturate_kernel(x, *_SATURATE[severity - 1])


def _affine_jitter(x: jax.Array, jitter: float, rng: jax.Array) -> jax.Array:
    """The affine step of ``elastic_transform``: the points ``centre + (s, s)``, ``(s, -s)``,
    ``(-s, -s)`` (``s = size // 3``) are moved by up to ``jitter * size`` and the image is warped
    with ``cv2.warpAffine`` semantics (bilinear, BORDER_REFLECT_101)."""
    b, h, w, _ = x.shape
    size = min(h, w)
    cx, cy, half = w // 2, h // 2, size // 3
    src = np.array([[cx + half, cy + half], [cx + half, cy - half], [cx - half, cy - half]], float)
    dst = src + _uniform(rng, (b, 3, 2), -1.0, 1.0) * (jitter * size)
    # Forward map [u, v, 1] @ fwd = dst (cv2.getAffineTransform); warpAffine samples its inverse.
    src_inv = jnp.asarray(np.linalg.inv(np.hstack([src, np.ones((3, 1))])), jnp.float32)
    fwd = jnp.einsum("ij,bjk->bik", src_inv, dst, precision=_HIGHEST)
    yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    pts = jnp.stack([xx, yy], axis=-1).astype(jnp.float32)[None] - fwd[:, None, None, 2, :]
    m00, m01, m10, m11 = fwd[:, 0, 0], fwd[:, 0, 1], fwd[:, 1, 0], fwd[:, 1, 1]
    inv = jnp.stack([jnp.stack([m11, -m01], -1), jnp.stack([-m10, m00], -1)], 1)
    inv = inv / (m00 * m11 - m01 * m10)[:, None, None]
    uv = jnp.einsum("bhwk,bkl->bhwl", pts, inv, precision=_HIGHEST)
    return _bilinear(x, uv[..., 1], uv[..., 0], "reflect")


def _elastic_displace(x: jax.Array, alpha: float, taps: jax.Array, rng: jax.Array) -> jax.Array:
    """The elastic step of ``elastic_transform``: displacements ``alpha * G(U(-1, 1))`` (Gaussian
    ``taps``, SciPy "reflect", truncate 3) drawn on the base grid, resized with the image, and
    bilinear sampling with SciPy "reflect" borders."""
    b, h, w, _ = x.shape
    hb, wb = _base_shape(h, w)
    fields = _blur(_uniform(rng, (2 * b, hb, wb, 1), -1.0, 1.0), taps, "symmetric")[..., 0]
    dy = _resize_plane(alpha * fields[:b], h, w) * (h / hb)
    dx = _resize_plane(alpha * fields[b:], h, w) * (w / wb)
    yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    return _bilinear(x, yy[None] + dy, xx[None] + dx, "symmetric")


@jax.jit
def _elastic_kernel(
    x: jax.Array, rng: jax.Array, alpha: float, taps: jax.Array, jitter: float
) -> jax.Array:
    k_affine, k_field = jax.random.split(rng)
    return _elastic_displace(_affine_jitter(x, jitter, k_affine), alpha, taps, k_field)


def _elastic_params(severity: int) -> tuple[float, np.ndarray, float]:
    """``(alpha, taps, jitter)``: alpha in pixels of the 32-px base grid, the Gaussian taps
    (padded to the widest severity) and the affine jitter as a fraction of the image size."""
    alpha, sigma, jitter = _ELASTIC[severity - 1]
    radius = int(3.0 * max(p[1] for p in _ELASTIC) * _REF_SIZE + 0.5)
    return alpha * _REF_SIZE, _gaussian_taps(sigma * _REF_SIZE, 3.0, radius), jitter


@_corruption(needs_rng=True)
def elastic_transform(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Random affine warp followed by a smooth random displacement field. By the reference's
    design the affine jitter shrinks with severity while the local displacement grows."""
    return _elastic_kernel(x, rng, *_elastic_params(severity))


def _pil_box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's ``Image.BOX`` resampling weights ``[n_out, n_in]`` (``precompute_coeffs``)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = np.zeros((n_out, n_in))
    for j in range(n_out):
        centre = (j + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        t = (np.arange(lo, hi) - centre + 0.5) / filterscale
        weights = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
        m[j, lo:hi] = weights / max(weights.sum(), 1.0)
    return m


@_corruption(needs_rng=False)
def pixelate(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Pillow BOX downsampling to ``int(size * c)``, c in (0.95, 0.9, 0.85, 0.75, 0.65), and BOX
    upsampling back."""
    c = _PIXELATE[severity - 1]
    _, h, w, _ = x.shape
    hs, ws = max(1, int(h * c)), max(1, int(w * c))
    mh = _pil_box_matrix(hs, h) @ _pil_box_matrix(h, hs)
    mw = _pil_box_matrix(ws, w) @ _pil_box_matrix(w, ws)
    return _apply_axes_jit(x, mh, mw)


def _jpeg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg ``jpeg_set_quality`` scaling with ``force_baseline``."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


def _dct_matrix() -> np.ndarray:
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    d = np.cos(np.pi * (2 * n + 1) * k / 16.0) * 0.5
    d[0] = np.sqrt(1.0 / 8.0)
    return d


def _jpeg_plane(p: jax.Array, table: jax.Array) -> jax.Array:
    """8x8 DCT, quantisation (round half away from zero), dequantisation and inverse DCT of
    ``[B, h, w]`` level-shifted planes whose sides are multiples of 8."""
    b, h, w = p.shape
    d = jnp.asarray(_dct_matrix(), jnp.float32)
    q = table[None, None, :, None, :]
    blocks = p.reshape(b, h // 8, 8, w // 8, 8)
    coef = jnp.einsum("uk,bikjl,vl->biujv", d, blocks, d, precision=_HIGHEST)
    coef = jnp.sign(coef) * jnp.floor(jnp.abs(coef) / q + 0.5) * q
    return jnp.einsum("uk,biujv,vl->bikjl", d, coef, d, precision=_HIGHEST).reshape(b, h, w)


@jax.jit
def _jpeg_kernel(x: jax.Array, luma_table: jax.Array, chroma_table: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    mcu = 16 if c == 3 else 8
    img = jnp.pad(x * 255.0, ((0, 0), (0, -h % mcu), (0, -w % mcu), (0, 0)), mode="edge")
    hp, wp = img.shape[1:3]
    if c == 1:
        out = _jpeg_plane(img[..., 0] - 128.0, luma_table)[..., None] + 128.0
        return out[:, :h, :w] / 255.0
    to_ycc = jnp.asarray(_RGB_TO_YCBCR, jnp.float32)
    ycc = jnp.einsum("bhwc,dc->bhwd", img, to_ycc, precision=_HIGHEST)
    chroma = ycc[..., 1:].reshape(b, hp // 2, 2, wp // 2, 2, 2).mean(axis=(2, 4))
    planes = [_jpeg_plane(ycc[..., 0] - 128.0, luma_table)]
    for i in range(2):
        planes.append(_resize_plane(_jpeg_plane(chroma[..., i], chroma_table), hp, wp))
    to_rgb = jnp.asarray(_YCBCR_TO_RGB, jnp.float32)
    out = jnp.einsum("bhwc,dc->bhwd", jnp.stack(planes, axis=-1), to_rgb, precision=_HIGHEST)
    return (out[:, :h, :w] + 128.0) / 255.0


@_corruption(needs_rng=False)
def jpeg_compression(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Simulated baseline JPEG at quality (80, 65, 58, 50, 40): YCbCr, 4:2:0, 8x8 DCT and
    quantisation with the scaled standard tables (greyscale JPEG for one channel)."""
    quality = _JPEG_QUALITY[severity - 1]
    luma = _jpeg_table(_JPEG_LUMA_TABLE, quality).astype(np.float32)
    chroma = _jpeg_table(_JPEG_CHROMA_TABLE, quality).astype(np.float32)
    return _jpeg_kernel(x, luma, chroma)


# ---------------------------------------------------------------------------------------------
# Spatter (the OpenCV pipeline of the reference)
# ---------------------------------------------------------------------------------------------

_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
_CANNY_TG22 = 13573  # round(tan(22.5 deg) * 2^15), as in OpenCV
_CHAMFER_5 = tuple(
    (dy, dx, weight)
    for dy in range(-2, 3)
    for dx in range(-2, 3)
    for weight in [{1: 1.0, 2: 1.4, 5: 2.1969}.get(dy * dy + dx * dx)]
    if weight is not None
)
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
_BOX3 = np.full((3, 3), 1.0 / 9.0)


def _shift(p: jax.Array, dy: int, dx: int, fill: float) -> jax.Array:
    """``out[i, j] = p[i + dy, j + dx]`` for ``[B, H, W]``, ``fill`` outside (|dy|, |dx| <= 2)."""
    h, w = p.shape[1:]
    padded = jnp.pad(p, ((0, 0), (2, 2), (2, 2)), constant_values=fill)
    return padded[:, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def _canny(img: jax.Array, low: float, high: float) -> jax.Array:
    """``cv2.Canny(img, low, high)`` (aperture 3, L1 gradient) on ``[B, H, W]`` 0..255 planes."""
    gx = _conv_plane(img, _SOBEL_X, "edge")
    gy = _conv_plane(img, _SOBEL_X.T, "edge")
    mag = jnp.abs(gx) + jnp.abs(gy)
    ax, ay = jnp.abs(gx).astype(jnp.int32), jnp.abs(gy).astype(jnp.int32)
    horizontal = ay * (1 << 15) < ax * _CANNY_TG22
    vertical = ay * (1 << 15) > ax * (_CANNY_TG22 + (1 << 16))
    anti_diagonal = (gx < 0) != (gy < 0)

    def nb(dy: int, dx: int) -> jax.Array:
        return _shift(mag, dy, dx, 0.0)

    local_max = jnp.where(
        horizontal,
        (mag > nb(0, -1)) & (mag >= nb(0, 1)),
        jnp.where(
            vertical,
            (mag > nb(-1, 0)) & (mag >= nb(1, 0)),
            jnp.where(
                anti_diagonal,
                (mag > nb(-1, 1)) & (mag > nb(1, -1)),
                (mag > nb(-1, -1)) & (mag > nb(1, 1)),
            ),
        ),
    )
    weak = local_max & (mag > low)
    strong = weak & (mag > high)

    def grow(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        edges, _ = state
        near = edges.astype(jnp.float32)
        near = sum(_shift(near, dy, dx, 0.0) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        grown = edges | (weak & (near > 0))
        return grown, jnp.any(grown != edges)

    edges, _ = jax.lax.while_loop(lambda s: s[1], grow, (strong, jnp.array(True)))
    return edges


def _distance_to_edges(edges: jax.Array, cap: float) -> jax.Array:
    """``min(cv2.distanceTransform(~edges, DIST_L2, 5), cap)``: chamfer distance with weights
    1, 1.4, 2.1969, by ``cap`` min-plus relaxations (every path of length <= cap has at most
    ``cap`` steps)."""

    def relax(_: int, d: jax.Array) -> jax.Array:
        out = d
        for dy, dx, weight in _CHAMFER_5:
            out = jnp.minimum(out, _shift(d, dy, dx, cap) + weight)
        return out

    return jax.lax.fori_loop(0, int(cap), relax, jnp.where(edges, 0.0, cap))


def _equalize_hist(img: jax.Array) -> jax.Array:
    """``cv2.equalizeHist`` of ``[B, H, W]`` int32 planes with values in 0..255."""
    b = img.shape[0]
    flat = img.reshape(b, -1)
    hist = jax.vmap(lambda v: jnp.bincount(v, length=256))(flat)
    first = jnp.argmax(hist > 0, axis=1)[:, None]
    first_count = jnp.take_along_axis(hist, first, axis=1)
    denom = flat.shape[1] - first_count
    scale = 255.0 / jnp.maximum(denom, 1).astype(jnp.float32)
    lut = jnp.round((jnp.cumsum(hist, axis=1) - first_count) * scale)
    lut = jnp.where(denom == 0, jnp.arange(256, dtype=jnp.float32), jnp.clip(lut, 0.0, 255.0))
    return jnp.take_along_axis(lut, flat, axis=1).reshape(img.shape)


def _liquid_layer(
    rng: jax.Array, b: int, shape: tuple[int, int], loc: float, scale: float, taps: jax.Array
) -> jax.Array:
    """``gaussian(N(loc, scale^2))`` on the base grid, ``[B, hb, wb]``."""
    return _blur(loc + scale * _normal(rng, (b, *shape, 1)), taps)[..., 0]


@jax.jit
def _water_kernel(
    x: jax.Array,
    rng: jax.Array,
    loc: float,
    scale: float,
    taps: jax.Array,
    threshold: float,
    intensity: float,
) -> jax.Array:
    b, h, w, c = x.shape
    liquid = _liquid_layer(rng, b, _base_shape(h, w), loc, scale, taps)
    liquid = jnp.floor(jnp.clip(jnp.where(liquid < threshold, 0.0, liquid), 0.0, 1.0) * 255.0)
    dist = _distance_to_edges(_canny(liquid, 50.0, 150.0), 20.0)
    dist = jnp.floor(_conv_plane(dist, _BOX3, "reflect"))
    dist = _equalize_hist(dist.astype(jnp.int32))
    dist = jnp.clip(jnp.round(_conv_plane(dist, _EMBOSS, "reflect")), 0.0, 255.0)
    dist = jnp.round(_conv_plane(dist, _BOX3, "reflect"))
    m = liquid * dist
    peak = m.max(axis=(1, 2), keepdims=True)
    m = jnp.where(peak > 0, m / jnp.where(peak > 0, peak, 1.0), 0.0) * intensity
    return x + _resize_plane(m, h, w)[..., None] * _colour(_WATER_RGB, c)


@jax.jit
def _mud_kernel(x: jax.Array, rng: jax.Array, loc: float, scale: float, taps: jax.Array,
                threshold: float, mask_taps: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    liquid = _liquid_layer(rng, b, _base_shape(h, w), loc, scale, taps)
    m = _blur((liquid > threshold).astype(jnp.float32)[..., None], mask_taps)[..., 0]
    m = _resize_plane(jnp.where(m < 0.8, 0.0, m), h, w)[..., None]
    return x * (1.0 - m) + m * _colour(_MUD_RGB, c)


@_corruption(needs_rng=True)
def spatter(x: jax.Array, severity: int, rng: jax.Array | None = None) -> jax.Array:
    """Water drops (severities 1-3: pale turquoise, added) or mud (4-5: brown, painted over)
    shaped by a blurred, thresholded Gaussian layer."""
    loc, scale, sigma, threshold, intensity, mud = _SPATTER[severity - 1]
    taps = _gaussian_taps(sigma, 4.0, int(4.0 * max(p[2] for p in _SPATTER) + 0.5))
    if mud:
        return _mud_kernel(x, rng, loc, scale, taps, threshold, _gaussian_taps(intensity, 4.0))
    return _water_kernel(x, rng, loc, scale, taps, threshold, intensity)


# ---------------------------------------------------------------------------------------------
# Public dispatch
# ---------------------------------------------------------------------------------------------

_FUNCTIONS: dict[str, _Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "gaussian_blur": gaussian_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "spatter": spatter,
}


def corrupt(
    name: str,
    x: jax.Array,
    severity: int,
    rng: jax.Array | None = None,
    *,
    quantize: bool = False,
) -> jax.Array:
    """Apply corruption ``name`` (one of :data:`CORRUPTIONS`) at ``severity`` (0..5).

    Jit-able with ``name``, ``severity`` and ``quantize`` static, e.g.
    ``jax.jit(corrupt, static_argnames=("name", "severity", "quantize"))``.

    Args:
      name: corruption name, e.g. ``"gaussian_noise"``.
      x: float images ``[B, H, W, C]`` in [0, 1], ``C`` in {1, 3}.
      severity: 0 (returns ``x`` unchanged, or quantised with ``quantize``) to 5.
      rng: JAX PRNG key; required by the random corruptions, ignored by the others.
      quantize: put the result on the 256 levels of uint8, as the released CIFAR-10-C files
        are: ``floor(255 y) / 255``, which is the reference's ``np.uint8`` of its float result
        (truncation); for ``motion_blur``, ``pixelate`` and ``jpeg_compression``, whose
        reference output comes rounded from ImageMagick or Pillow, ``floor(255 y + 0.5) / 255``.
        Off by default: truncation darkens by half a grey level on average and snaps values
        to a grid that images which are not uint8 (resized, normalised, generated) never lie
        on; the float result is the reference's value before its final cast. Turn it on to
        compare number for number with the released CIFAR-10-C files. Intermediate uint8
        roundings of the reference (glass blur, the snow layer, Pillow's two BOX passes) are
        not reproduced either way.

    Returns:
      The corrupted batch, same shape and dtype as ``x``, in [0, 1].

    Raises:
      ValueError: for an unknown name, a severity outside 0..5, a bad shape or dtype, or a
        missing key.
      FileNotFoundError: for ``frost`` when the ``imagecorruptions`` package, which ships the
        frost photographs, is not installed.
    """
    _check_name(name)
    return _FUNCTIONS[name](x, severity, rng, quantize=quantize)


def corruption_id(name: str, severity: int) -> str:
    """Identifier ``"{name}_{severity}"`` of a corruption, e.g. ``gaussian_noise_3``."""
    _check_name(name)
    _check_severity(severity)
    return f"{name}_{severity}"
