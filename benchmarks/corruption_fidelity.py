"""Fidelity of :mod:`anp_jax.corruptions` to the reference CIFAR-10-C generator.

    python -m benchmarks.corruption_fidelity [--crops 200] [--draws 4] [--json FILE]
        [--no-quantize]

On ``--crops`` 32x32 uint8 crops of scikit-learn's two sample photographs (random square
windows of 64 to 427 px, reduced with Pillow's BOX filter, as CIFAR images are reduced
photographs), every severity of

* the random ``frost``, ``gaussian_noise``, ``shot_noise``, ``impulse_noise`` and
  ``speckle_noise``, against the reference formulas of ``make_cifar_c.py`` written here in
  NumPy (scikit-image's ``random_noise`` for impulse noise); frost: the photograph read with
  ``cv2.imread`` (one of ``frost1.png`` .. ``frost5.jpg``, the reference's
  ``np.random.randint(5)``), ``cv2.resize`` by 0.2, a random 32x32 crop,
  ``np.uint8(np.clip(a x + b frost, 0, 255))``. Both sides are random, so the measure is the
  mean absolute change from the clean image, ``--draws`` draws per crop on each side;
* the deterministic ``contrast``, ``gaussian_blur``, ``defocus_blur``, ``zoom_blur``,
  ``brightness``, ``saturate``, ``pixelate`` and ``jpeg_compression``, against their reference
  formulas (NumPy, SciPy, OpenCV, scikit-image's HSV, Pillow's BOX resampling and JPEG codec)
  with the reference's final ``np.uint8``: the mean change, and the mean absolute difference
  from the reference's uint8 output, with and without ``quantize=True``.

The other six (``glass_blur``, ``motion_blur``, ``elastic_transform``, ``snow``, ``fog``,
``spatter``) need ImageMagick or long
re-implementations and are not measured here.

Reported per corruption and severity, in grey levels (0..255): ``ours`` and ``reference``
mean change and their ``ratio`` (``ours_quantized``, ``ratio_quantized`` with
``quantize=True``), and for the deterministic ones ``diff_float`` and ``diff_quantized`` (mean
|ours - reference|) and ``exact_quantized`` (the fraction of values equal to the reference's).
``--no-quantize`` skips the quantised runs (for versions of the library without the option).
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


def reference_zoom_blur(x: np.ndarray, severity: int) -> np.ndarray:
    from scipy import ndimage

    zooms = np.arange(1, ZOOM_STOPS[severity - 1], 0.01)
    out = np.empty_like(x)
    for i, img in enumerate((x / 255.0).astype(np.float32)):
        acc = np.zeros_like(img)
        for z in zooms:
            ch = int(np.ceil(32 / z))
            top = (32 - ch) // 2
            zoomed = ndimage.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
            trim = (zoomed.shape[0] - 32) // 2
            acc += zoomed[trim : trim + 32, trim : trim + 32]
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
}


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
    for n, (name, reference) in enumerate(random.items()):
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
    return results


def print_table(results: dict) -> None:
    print(f"{results['crops']} crops, {results['draws']} draws each; grey levels (0..255)")
    print(f"{'corruption':<17} sev {'ours':>7} {'ref':>7} {'ratio':>6} {'ours_q':>7} "
          f"{'ratio_q':>7} {'|d|':>6} {'|d|_q':>6} {'exact_q':>7}")
    for name in ("frost", *RANDOM, *DETERMINISTIC):
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
