"""Fidelity of :mod:`anp_jax.corruptions` to the reference CIFAR-10-C generator.

    python -m benchmarks.corruption_fidelity [--crops 200] [--draws 4] [--json FILE]
        [--no-quantize]

On ``--crops`` 32x32 uint8 crops of scikit-learn's two sample photographs (random square
windows of 64 to 427 px, reduced with Pillow's BOX filter, as CIFAR images are reduced
photographs), every severity of

* the random ``frost``, ``gaussian_noise``, ``shot_noise``, ``impulse_noise``,
  ``speckle_noise``, ``glass_blur``, ``motion_blur``, ``elastic_transform``, ``snow``, ``fog``
  and ``spatter``, against the reference formulas of ``make_cifar_c.py`` (32x32 constants)
  written here in NumPy, SciPy, OpenCV and scikit-image (``random_noise`` for impulse noise,
  ``filters.gaussian`` where the reference uses it), each ending with the reference's
  ``np.uint8``. frost: the photograph read with ``cv2.imread`` (one of ``frost1.png`` ..
  ``frost5.jpg``, the reference's ``np.random.randint(5)``), ``cv2.resize`` by 0.2, a random
  32x32 crop, ``np.uint8(np.clip(a x + b frost, 0, 255))``. glass_blur keeps the reference's
  sequential loop of pixel "swaps" (offsets drawn per image at once); fog its diamond-square
  ``plasma_fractal``; elastic_transform its ``cv2.warpAffine`` and ``map_coordinates``; spatter
  its OpenCV pipeline, including the unclipped ``astype(np.uint8)`` of the liquid layer.
  ``motion_blur`` and ``snow`` use ImageMagick's motion blur as the reference does
  (``MagickMotionBlurImage`` through Wand on a PNG, decoded with ``cv2.imdecode``): they need
  ``pip install Wand`` and ImageMagick's MagickWand library (Debian: ``libmagickwand-dev``),
  which are not dependencies of the project; without them they are skipped with a note. Both
  sides are random, so the measure is the mean absolute change from the clean image,
  ``--draws`` draws per crop on each side;
* the deterministic ``contrast``, ``gaussian_blur``, ``defocus_blur``, ``zoom_blur``,
  ``brightness``, ``saturate``, ``pixelate`` and ``jpeg_compression``, against their reference
  formulas (NumPy, SciPy, OpenCV, scikit-image's HSV, Pillow's BOX resampling and JPEG codec)
  with the reference's final ``np.uint8``: the mean change, and the mean absolute difference
  from the reference's uint8 output, with and without ``quantize=True``.

All 19 corruptions are measured (17 without Wand).

Reported per corruption and severity, in grey levels (0..255): ``ours`` and ``reference``
mean change and their ``ratio`` (``ours_quantized``, ``ratio_quantized`` with
``quantize=True``), and for the deterministic ones ``diff_float`` and ``diff_quantized`` (mean
|ours - reference|) and ``exact_quantized`` (the fraction of values equal to the reference's).
``mean_ratio`` (and ``mean_ratio_quantized``) give each corruption's ratio averaged over the
five severities. ``--no-quantize`` skips the quantised runs (for versions of the library
without the option).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math

import numpy as np

FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
ZOOM_STOPS = (1.06, 1.11, 1.16, 1.21, 1.26)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
JPEG_QUALITY = (80, 65, 58, 50, 40)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE = (500, 250, 100, 75, 50)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
SPECKLE_NOISE = (0.06, 0.1, 0.12, 0.16, 0.2)
# (sigma, max_delta, iterations)
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# (radius, sigma)
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
# (alpha, sigma, affine jitter) in pixels: 32 times the reference's fractions
ELASTIC = tuple((32 * a, 32 * s, 32 * j) for a, s, j in (
    (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)))
# (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
# (strength, wibble decay)
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
# (loc, scale, sigma, threshold, intensity, mud)
SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, 0),
           (0.65, 0.1, 0.8, 0.7, 0.5, 0),
           (0.65, 0.3, 1, 0.69, 0.5, 0),
           (0.65, 0.1, 0.7, 0.69, 0.6, 1),
           (0.65, 0.1, 0.5, 0.68, 0.6, 1))


def photo_crops(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 32, 32, 3]`` uint8 crops of scikit-learn's sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(64, min(photo.size) + 1))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        out.append(np.asarray(crop.resize((32, 32), Image.BOX)))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# The reference formulas (make_cifar_c.py, 32x32), in NumPy, OpenCV and SciPy
# ---------------------------------------------------------------------------------------------


def reference_frost_layers() -> list[np.ndarray]:
    """The five photographs as the reference reads them: ``cv2.imread`` (BGR), resized by
    0.2 with ``cv2.resize``, converted to RGB; located through the package's metadata."""
    import cv2

    dist = importlib.metadata.distribution("imagecorruptions")
    layers = []
    for name in FROST_FILES:
        img = cv2.imread(str(dist.locate_file(f"imagecorruptions/frost/{name}")))
        layers.append(cv2.resize(img, (0, 0), fx=0.2, fy=0.2)[..., ::-1])
    return layers


def reference_frost(x: np.ndarray, severity: int, layers: list[np.ndarray],
                    rng: np.random.Generator) -> np.ndarray:
    a, b = FROST[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        frost = layers[rng.integers(len(layers))]
        r = rng.integers(0, frost.shape[0] - 32)
        c = rng.integers(0, frost.shape[1] - 32)
        crop = frost[r : r + 32, c : c + 32].astype(np.float64)
        out[i] = np.uint8(np.clip(a * img + b * crop, 0, 255))
    return out


def reference_contrast(x: np.ndarray, severity: int) -> np.ndarray:
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.uint8(np.clip((x - means) * CONTRAST[severity - 1] + means, 0, 1) * 255)


def reference_gaussian_blur(x: np.ndarray, severity: int) -> np.ndarray:
    from scipy import ndimage

    sigma = GAUSSIAN_BLUR[severity - 1]
    y = ndimage.gaussian_filter(x / 255.0, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    return np.uint8(np.clip(y, 0, 1) * 255)


def reference_defocus_blur(x: np.ndarray, severity: int) -> np.ndarray:
    import cv2

    radius, alias_blur = DEFOCUS[severity - 1]
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    kernel = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias_blur)
    out = np.empty_like(x)
    for i, img in enumerate(x / 255.0):
        y = np.stack([cv2.filter2D(img[..., d], -1, kernel) for d in range(3)], axis=-1)
        out[i] = np.uint8(np.clip(y, 0, 1) * 255)
    return out


def reference_clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """The reference ``clipped_zoom`` of an ``[h, h, c]`` array."""
    from scipy import ndimage

    h = img.shape[0]
    ch = int(np.ceil(h / zoom))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top : top + ch, top : top + ch], (zoom, zoom, 1), order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim : trim + h, trim : trim + h]


def reference_zoom_blur(x: np.ndarray, severity: int) -> np.ndarray:
    zooms = np.arange(1, ZOOM_STOPS[severity - 1], 0.01)
    out = np.empty_like(x)
    for i, img in enumerate((x / 255.0).astype(np.float32)):
        acc = sum(reference_clipped_zoom(img, z) for z in zooms)
        out[i] = np.uint8(np.clip((img + acc) / (len(zooms) + 1), 0, 1) * 255)
    return out


def reference_brightness(x: np.ndarray, severity: int) -> np.ndarray:
    from skimage import color

    hsv = color.rgb2hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + BRIGHTNESS[severity - 1], 0, 1)
    return np.uint8(np.clip(color.hsv2rgb(hsv), 0, 1) * 255)


def reference_saturate(x: np.ndarray, severity: int) -> np.ndarray:
    from skimage import color

    factor, offset = SATURATE[severity - 1]
    hsv = color.rgb2hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor + offset, 0, 1)
    return np.uint8(np.clip(color.hsv2rgb(hsv), 0, 1) * 255)


def reference_pixelate(x: np.ndarray, severity: int) -> np.ndarray:
    from PIL import Image

    side = int(32 * PIXELATE[severity - 1])
    return np.stack([np.asarray(Image.fromarray(img).resize((side, side), Image.BOX)
                                .resize((32, 32), Image.BOX)) for img in x])


def reference_jpeg_compression(x: np.ndarray, severity: int) -> np.ndarray:
    from PIL import Image

    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=JPEG_QUALITY[severity - 1])
        out.append(np.asarray(Image.open(buf)))
    return np.stack(out)


def reference_gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator):
    sigma = GAUSSIAN_NOISE[severity - 1]
    return np.uint8(np.clip(x / 255.0 + rng.normal(size=x.shape, scale=sigma), 0, 1) * 255)


def reference_shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator):
    c = SHOT_NOISE[severity - 1]
    return np.uint8(np.clip(rng.poisson(x / 255.0 * c) / c, 0, 1) * 255)


def reference_impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator):
    from skimage.util import random_noise

    y = random_noise(x / 255.0, mode="s&p", amount=IMPULSE_NOISE[severity - 1],
                     rng=int(rng.integers(2**31)))
    return np.uint8(np.clip(y, 0, 1) * 255)


def reference_speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator):
    x = x / 255.0
    sigma = SPECKLE_NOISE[severity - 1]
    return np.uint8(np.clip(x + x * rng.normal(size=x.shape, scale=sigma), 0, 1) * 255)



def reference_glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """skimage Gaussian blur, uint8, the reference's loop of pixel "swaps" (a tuple assignment
    of two numpy views, in effect the copy ``x[h, w] = x[h + dy, w + dx]``, kept as written),
    Gaussian blur again. The offsets, ``randint(-d, d)`` per pixel in the reference, are drawn
    per image at once."""
    from skimage.filters import gaussian

    sigma, delta, iterations = GLASS_BLUR[severity - 1]
    sweep = range(32 - delta, delta, -1)
    out = np.empty_like(x)
    for i, img in enumerate(x):
        img = np.uint8(gaussian(img / 255.0, sigma=sigma, channel_axis=-1) * 255)
        offsets = rng.integers(-delta, delta, size=(iterations, len(sweep), len(sweep), 2))
        for it in range(iterations):
            for a, h in enumerate(sweep):
                for b, w in enumerate(sweep):
                    dx, dy = offsets[it, a, b]
                    h_prime, w_prime = h + dy, w + dx
                    img[h, w], img[h_prime, w_prime] = img[h_prime, w_prime], img[h, w]
        y = gaussian(img / 255.0, sigma=sigma, channel_axis=-1)
        out[i] = np.uint8(np.clip(y, 0, 1) * 255)
    return out


def wand_available() -> bool:
    """Whether Wand (and through it ImageMagick's MagickWand library) can be loaded."""
    try:
        import wand.image  # noqa: F401
    except ImportError:  # also raised by Wand when the MagickWand library is missing
        return False
    return True


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _wand_motion_blur(png: bytes, radius: float, sigma: float, angle: float) -> np.ndarray:
    """The reference's ``MotionImage.motion_blur`` (``MagickMotionBlurImage(wand, radius,
    sigma, angle)``, which Wand's ``Image.motion_blur`` calls) of a PNG, decoded as the
    reference does with ``cv2.imdecode(..., IMREAD_UNCHANGED)``: BGR, or one plane when
    ImageMagick writes a grey PNG."""
    import cv2
    from wand.image import Image as WandImage

    with WandImage(blob=png) as img:
        img.motion_blur(radius=radius, sigma=sigma, angle=angle)
        blob = img.make_blob()
    return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)


def reference_motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator):
    radius, sigma = MOTION_BLUR[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        y = _wand_motion_blur(_png(img), radius, sigma, rng.uniform(-45, 45))
        y = y[..., [2, 1, 0]] if y.shape != (32, 32) else np.stack([y, y, y], axis=-1)
        out[i] = np.uint8(np.clip(y, 0, 255))
    return out


def reference_snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        img = np.asarray(img, np.float32) / 255.0
        layer = rng.normal(size=(32, 32), loc=loc, scale=scale)
        layer = reference_clipped_zoom(layer[..., np.newaxis], zoom)
        layer[layer < threshold] = 0
        layer = (np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8)  # PIL mode "L"
        layer = _wand_motion_blur(_png(layer), radius, sigma, rng.uniform(-135, -45)) / 255.0
        layer = layer[..., np.newaxis]
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1)
        img = blend * img + (1 - blend) * np.maximum(img, grey * 1.5 + 0.5)
        out[i] = np.uint8(np.clip(img + layer + np.rot90(layer, k=2), 0, 1) * 255)
    return out


def reference_elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator):
    """cv2 affine warp of three jittered points (BORDER_REFLECT_101), then displacement by
    skimage-blurred uniform fields (mode "reflect", truncate 3) with SciPy's
    ``map_coordinates`` (order 1, mode "reflect")."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    alpha, sigma, jitter = ELASTIC[severity - 1]
    centre = np.float32((32, 32)) // 2
    half = 32 // 3
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    xx, yy, zz = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
    out = np.empty_like(x)
    for i, img in enumerate(x):
        img = np.asarray(img, np.float32) / 255.0
        pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32)
        m = cv2.getAffineTransform(pts1, pts2)
        img = cv2.warpAffine(img, m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        dx, dy = ((gaussian(rng.uniform(-1, 1, size=(32, 32)), sigma, mode="reflect",
                            truncate=3) * alpha).astype(np.float32)[..., np.newaxis]
                  for _ in range(2))
        indices = (yy + dy).reshape(-1, 1), (xx + dx).reshape(-1, 1), zz.reshape(-1, 1)
        y = map_coordinates(img, indices, order=1, mode="reflect").reshape(img.shape)
        out[i] = np.uint8(np.clip(y, 0, 1) * 255)
    return out


def _plasma_fractal(rng: np.random.Generator, mapsize: int = 32,
                    wibbledecay: float = 3) -> np.ndarray:
    """The reference ``plasma_fractal`` (diamond-square), ``[mapsize, mapsize]`` in [0, 1]."""
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # fillsquares
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # filldiamonds
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def reference_fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, wibbledecay = FOG[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        img = img / 255.0
        max_val = img.max()
        img = img + strength * _plasma_fractal(rng, wibbledecay=wibbledecay)[:32, :32, None]
        out[i] = np.uint8(np.clip(img * max_val / (max_val + strength), 0, 1) * 255)
    return out


def reference_spatter(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's OpenCV pipeline: water (severities 1-3; Canny, distance transform,
    histogram equalisation, emboss, the pale turquoise added) or mud (4-5, brown painted
    over). As in the reference, the liquid layer is cast to uint8 unclipped."""
    import cv2
    from skimage.filters import gaussian

    loc, scale, sigma, threshold, intensity, mud = SPATTER[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        img = np.asarray(img, np.float32) / 255.0
        liquid = gaussian(rng.normal(size=(32, 32), loc=loc, scale=scale), sigma=sigma)
        liquid[liquid < threshold] = 0
        if not mud:
            liquid = (liquid * 255).astype(np.uint8)
            dist = 255 - cv2.Canny(liquid, 50, 150)
            dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
            dist = cv2.equalizeHist(dist)
            ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
            dist = cv2.filter2D(dist, cv2.CV_8U, ker)
            dist = cv2.blur(dist, (3, 3)).astype(np.float32)
            m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
            with np.errstate(invalid="ignore", divide="ignore"):
                m /= np.max(m, axis=(0, 1))
            m *= intensity
            ones = np.ones_like(m[..., :1])
            color = np.concatenate((175 / 255.0 * ones, 238 / 255.0 * ones,
                                    238 / 255.0 * ones), axis=2)
            color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
            y = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
            y = cv2.cvtColor(np.clip(y + m * color, 0, 1), cv2.COLOR_BGRA2BGR)
        else:
            m = np.where(liquid > threshold, 1, 0)
            m = gaussian(m.astype(np.float32), sigma=intensity)
            m[m < 0.8] = 0
            ones = np.ones_like(img[..., :1])
            color = np.concatenate((63 / 255.0 * ones, 42 / 255.0 * ones, 20 / 255.0 * ones),
                                   axis=2)
            color *= m[..., np.newaxis]
            img *= 1 - m[..., np.newaxis]
            y = np.clip(img + color, 0, 1)
        with np.errstate(invalid="ignore"):
            out[i] = np.uint8(y * 255)
    return out

DETERMINISTIC = {
    "contrast": reference_contrast,
    "gaussian_blur": reference_gaussian_blur,
    "defocus_blur": reference_defocus_blur,
    "zoom_blur": reference_zoom_blur,
    "brightness": reference_brightness,
    "saturate": reference_saturate,
    "pixelate": reference_pixelate,
    "jpeg_compression": reference_jpeg_compression,
}

RANDOM = {
    "gaussian_noise": reference_gaussian_noise,
    "shot_noise": reference_shot_noise,
    "impulse_noise": reference_impulse_noise,
    "speckle_noise": reference_speckle_noise,
    "glass_blur": reference_glass_blur,
    "motion_blur": reference_motion_blur,
    "elastic_transform": reference_elastic_transform,
    "snow": reference_snow,
    "fog": reference_fog,
    "spatter": reference_spatter,
}

# Random corruptions whose reference needs ImageMagick through Wand.
NEEDS_WAND = frozenset({"motion_blur", "snow"})


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in grey levels of two images on the 0..255 scale."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def measure(crops: int, draws: int, quantize: bool, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from anp_jax import corruptions

    x8 = photo_crops(crops, seed)
    x = jnp.asarray(x8 / 255.0, jnp.float32)
    results: dict = {"crops": crops, "draws": draws, "seed": seed}

    layers = reference_frost_layers()
    rng = np.random.default_rng(seed + 1)
    key = jax.random.PRNGKey(seed)
    random = {"frost": lambda x8, s, g: reference_frost(x8, s, layers, g), **RANDOM}
    skipped = sorted(NEEDS_WAND) if not wand_available() else []
    if skipped:
        print(f"skipping {', '.join(skipped)}: their reference needs Wand and ImageMagick "
              "(apt-get install libmagickwand-dev; pip install Wand)")
    results["skipped"] = skipped
    for n, (name, reference) in enumerate(random.items()):
        if name in skipped:
            continue
        results[name] = {}
        for severity in range(1, 6):
            ref, ours, ours_q = [], [], []
            for d in range(draws):
                ref.append(mean_abs(reference(x8, severity, rng), x8))
                k = jax.random.fold_in(key, 100 * n + 10 * severity + d)
                y = corruptions.corrupt(name, x, severity, k)
                ours.append(mean_abs(255.0 * np.asarray(y), x8))
                if quantize:
                    y = corruptions.corrupt(name, x, severity, k, quantize=True)
                    ours_q.append(mean_abs(255.0 * np.asarray(y), x8))
            row = {"ours": float(np.mean(ours)), "reference": float(np.mean(ref))}
            row["ratio"] = row["ours"] / row["reference"]
            if quantize:
                row["ours_quantized"] = float(np.mean(ours_q))
                row["ratio_quantized"] = row["ours_quantized"] / row["reference"]
            results[name][severity] = row
    rows = results["frost"].values()
    results["frost_mean_ratio"] = float(np.mean([r["ratio"] for r in rows]))
    if quantize:
        results["frost_mean_ratio_quantized"] = float(np.mean([r["ratio_quantized"]
                                                              for r in rows]))

    for name, reference in DETERMINISTIC.items():
        results[name] = {}
        for severity in range(1, 6):
            ref = reference(x8, severity)
            ours = 255.0 * np.asarray(corruptions.corrupt(name, x, severity))
            row = {"ours": mean_abs(ours, x8), "reference": mean_abs(ref, x8),
                   "diff_float": mean_abs(ours, ref)}
            row["ratio"] = row["ours"] / row["reference"]
            if quantize:
                ours_q = 255.0 * np.asarray(corruptions.corrupt(name, x, severity,
                                                                quantize=True))
                row["ours_quantized"] = mean_abs(ours_q, x8)
                row["ratio_quantized"] = row["ours_quantized"] / row["reference"]
                row["diff_quantized"] = mean_abs(ours_q, ref)
                row["exact_quantized"] = float(np.mean(np.abs(ours_q - ref) < 0.5))
            results[name][severity] = row

    results["mean_ratio"] = {name: float(np.mean([r["ratio"] for r in results[name].values()]))
                             for name in (*random, *DETERMINISTIC) if name in results}
    if quantize:
        results["mean_ratio_quantized"] = {
            name: float(np.mean([r["ratio_quantized"] for r in results[name].values()]))
            for name in results["mean_ratio"]}
    return results


def print_table(results: dict) -> None:
    print(f"{results['crops']} crops, {results['draws']} draws each; grey levels (0..255)")
    print(f"{'corruption':<17} sev {'ours':>7} {'ref':>7} {'ratio':>6} {'ours_q':>7} "
          f"{'ratio_q':>7} {'|d|':>6} {'|d|_q':>6} {'exact_q':>7}")
    for name in results["mean_ratio"]:
        for severity, row in results[name].items():
            def cell(key: str, fmt: str, row: dict = row) -> str:
                return format(row.get(key, math.nan), fmt)

            print(f"{name:<17} {severity:>3} {cell('ours', '7.3f')} {cell('reference', '7.3f')} "
                  f"{cell('ratio', '6.3f')} {cell('ours_quantized', '7.3f')} "
                  f"{cell('ratio_quantized', '7.3f')} {cell('diff_float', '6.3f')} "
                  f"{cell('diff_quantized', '6.3f')} {cell('exact_quantized', '7.3f')}")
    line = f"frost mean ratio (ours / reference): {results['frost_mean_ratio']:.3f}"
    if "frost_mean_ratio_quantized" in results:
        line += f", quantized {results['frost_mean_ratio_quantized']:.3f}"
    print(line)
    print("mean ratio over severities (ours / reference), quantized:")
    for name, ratio in results["mean_ratio"].items():
        quantized = results.get("mean_ratio_quantized", {}).get(name, math.nan)
        print(f"  {name:<17} {ratio:6.3f} {quantized:6.3f}")
    if results.get("skipped"):
        print(f"not measured (Wand missing): {', '.join(results['skipped'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=200)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--no-quantize", action="store_true",
                        help="skip quantize=True (library versions without it)")
    args = parser.parse_args(argv)
    results = measure(args.crops, args.draws, not args.no_quantize, args.seed)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
