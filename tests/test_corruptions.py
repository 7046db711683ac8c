"""Tests of anp_jax.corruptions: contract, severity ordering, noise statistics and reference
formulas re-computed independently with NumPy, SciPy, colorsys and Pillow."""

from __future__ import annotations

import colorsys
import functools
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_sample_image

from anp_jax import corruptions as C

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks.corruption_fidelity import reference_clipped_zoom  # noqa: E402

KEY = jax.random.PRNGKey(0)
LUMA = np.array([0.299, 0.587, 0.114])
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
    "spatter",
}


@functools.cache
def photos(size: int, height: int | None = None) -> np.ndarray:
    """Four natural RGB photos ``[4, height, size, 3]`` in [0, 1] (scikit-learn's samples)."""
    crops = (
        ("china.jpg", (100, 0, 527, 427)),
        ("flower.jpg", (150, 0, 577, 427)),
        ("china.jpg", (0, 0, 427, 427)),
        ("flower.jpg", (0, 0, 427, 427)),
    )
    out = []
    for name, box in crops:
        img = Image.fromarray(load_sample_image(name)).crop(box)
        out.append(np.asarray(img.resize((size, height or size), Image.BILINEAR)) / 255.0)
    return np.stack(out).astype(np.float32)


# name -> (images, checked severities); one compilation per image shape serves all severities.
IMAGE_SETS = {
    "rgb32": (photos(32), range(1, 6)),
    "grey16": ((photos(16) @ LUMA)[..., None].astype(np.float32), range(1, 6)),
    "rgb24x20": (photos(20, 24)[:2], (1, 5)),
}


@functools.cache
def outputs(name: str, image_set: str) -> dict[int, np.ndarray]:
    images, severities = IMAGE_SETS[image_set]
    x = jnp.asarray(images)
    return {s: np.asarray(C.corrupt(name, x, s, KEY)) for s in severities}


def mean_change(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.abs(np.asarray(y, np.float64) - x).mean())


def assert_non_decreasing(values: list[float], tol: float = 1e-4) -> None:
    assert all(b >= a - tol for a, b in zip(values, values[1:], strict=False)), values


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------


def test_names_and_functions() -> None:
    assert len(C.CORRUPTIONS) == 19
    assert C.CORRUPTIONS[0] == "gaussian_noise"
    assert C.CORRUPTIONS[-1] == "spatter"
    for name in C.CORRUPTIONS:
        assert callable(getattr(C, name))
    assert C.corruption_id("gaussian_noise", 3) == "gaussian_noise_3"
    assert C.corruption_id("jpeg_compression", 5) == "jpeg_compression_5"


@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_range(name: str, image_set: str) -> None:
    images, _ = IMAGE_SETS[image_set]
    for severity, y in outputs(name, image_set).items():
        assert y.shape == images.shape, (severity, y.shape)
        assert y.dtype == np.float32
        assert np.isfinite(y).all()
        assert y.min() >= 0.0 and y.max() <= 1.0, (severity, y.min(), y.max())


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_severity_zero_is_identity(name: str) -> None:
    x = jnp.asarray(photos(32))
    np.testing.assert_array_equal(np.asarray(C.corrupt(name, x, 0, KEY)), photos(32))
    np.testing.assert_array_equal(np.asarray(getattr(C, name)(x, 0, KEY)), photos(32))


def test_function_matches_corrupt() -> None:
    x = jnp.asarray(photos(32))
    np.testing.assert_array_equal(
        np.asarray(C.fog(x, 2, KEY)), np.asarray(C.corrupt("fog", x, 2, KEY))
    )


def test_jit_with_static_name_and_severity() -> None:
    x = jnp.asarray(photos(32))
    jitted = jax.jit(C.corrupt, static_argnames=("name", "severity"))
    for name in ("gaussian_noise", "pixelate"):
        np.testing.assert_allclose(
            np.asarray(jitted(name, x, 3, KEY)), outputs(name, "rgb32")[3], atol=1e-5
        )


def test_invalid_arguments() -> None:
    x = jnp.asarray(photos(32))
    with pytest.raises(ValueError, match="unknown corruption 'blurry'"):
        C.corrupt("blurry", x, 1, KEY)
    with pytest.raises(ValueError, match="unknown corruption 'blurry'"):
        C.corruption_id("blurry", 1)
    for severity in (6, -1, True, 2.0):
        with pytest.raises(ValueError, match="severity"):
            C.corrupt("contrast", x, severity, KEY)
    with pytest.raises(ValueError, match="severity"):
        C.corruption_id("contrast", 9)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        C.gaussian_noise(x, 1)
    with pytest.raises(ValueError, match="shape"):
        C.contrast(x[0], 1)
    with pytest.raises(ValueError, match="shape"):
        C.contrast(jnp.zeros((1, 8, 8, 2)), 1)
    with pytest.raises(ValueError, match="dtype"):
        C.contrast(jnp.zeros((1, 8, 8, 3), jnp.uint8), 1)


def test_examples_get_independent_draws() -> None:
    twins = jnp.asarray(photos(20, 24)[:1].repeat(2, axis=0))  # the rgb24x20 shape
    for name in sorted(RANDOM):
        y = np.asarray(C.corrupt(name, twins, 5, KEY))
        assert not np.allclose(y[0], y[1]), name


# ---------------------------------------------------------------------------------------------
# Strength grows with severity
# ---------------------------------------------------------------------------------------------

# Measured on the natural photos: the mean absolute change from the clean image.
PLAIN_MONOTONE = [
    name
    for name in C.CORRUPTIONS
    if name
    not in {"snow", "frost", "glass_blur", "saturate", "pixelate", "spatter", "elastic_transform"}
]


@pytest.mark.parametrize("name", PLAIN_MONOTONE)
def test_change_grows_with_severity(name: str) -> None:
    changes = [mean_change(outputs(name, "rgb32")[s], photos(32)) for s in range(1, 6)]
    assert_non_decreasing(changes)
    assert changes[0] > 0


def test_frost_layer_grows_with_severity() -> None:
    """Frost blends ``a x + b frost`` with the image weight ``a`` falling from 1 to 0.75, so
    on bright photos the change need not grow; on a black image it is ``b frost`` alone."""
    black = jnp.zeros_like(jnp.asarray(photos(32)))
    changes = [float(C.frost(black, s, KEY).mean()) for s in range(1, 6)]
    assert_non_decreasing(changes)
    assert changes[0] > 0


def test_snow_grows_with_severity_on_average() -> None:
    """Snow is added on a brightened image, so it saturates on bright photos: measure it on a
    black image. There the reference's severities 2 and 3 lay about as much snow (severity 3's
    lower threshold is offset by its 1.75x zoom, whose interpolation lowers the noise's
    variance), so one draw can reverse them; the expectation, over 8 draws of 4 images, grows."""
    black = jnp.zeros_like(jnp.asarray(photos(32)))
    keys = jax.random.split(KEY, 8)
    changes = [np.mean([float(C.snow(black, s, k).mean()) for k in keys]) for s in range(1, 6)]
    assert_non_decreasing(changes)


def sharpness(y: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    return float(np.abs(np.diff(y, axis=1)).mean() + np.abs(np.diff(y, axis=2)).mean())


def test_glass_blur_grows_in_sweeps_and_blur() -> None:
    """Severities 1-3 make one pixel-shuffling sweep and 4-5 two, each group with a growing
    Gaussian blur before and after. The blur smooths the shuffle noise away, so within a group
    the change from the clean image can shrink while the image gets blurrier; the right measures
    are the number of sweeps (two change more than one) and, within a group, the sharpness."""
    out = outputs("glass_blur", "rgb32")
    changes = [mean_change(out[s], photos(32)) for s in range(1, 6)]
    assert min(changes[3:]) > max(changes[:3])
    edges = [sharpness(out[s]) for s in range(1, 6)]
    assert edges[0] > edges[1] > edges[2]
    assert edges[3] > edges[4]


def test_saturate_grows_within_each_direction() -> None:
    """The reference's severities 1-2 desaturate (x0.3, x0.1) and 3-5 oversaturate (x1.5 and
    more), so the change is monotone within each direction, not across them."""
    changes = [mean_change(outputs("saturate", "rgb32")[s], photos(32)) for s in range(1, 6)]
    assert changes[0] < changes[1]
    assert changes[2] < changes[3] < changes[4]


def test_saturate_one_channel_is_identity() -> None:
    x = IMAGE_SETS["grey16"][0]
    for y in outputs("saturate", "grey16").values():
        np.testing.assert_array_equal(y, x)


def test_pixelate_loses_more_detail_with_severity() -> None:
    """Pillow's BOX resampling aliases, so on a given photo the change depends on how edges
    fall on the pixel grid; on white noise (detail at every position) it grows with the
    downsampling ratio."""
    noise = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    changes = [mean_change(C.pixelate(noise, s), np.asarray(noise)) for s in range(1, 6)]
    assert_non_decreasing(changes)


def test_spatter_grows_within_each_kind() -> None:
    """Severities 1-3 add translucent water, 4-5 paint opaque mud over smaller areas: different
    kinds of damage, each growing with severity."""
    changes = [mean_change(outputs("spatter", "rgb32")[s], photos(32)) for s in range(1, 6)]
    assert 0 < changes[0] < changes[1] < changes[2]
    assert 0 < changes[3] < changes[4]


def test_elastic_components_follow_the_reference() -> None:
    """The reference's affine jitter shrinks with severity (0.08 to 0.03 of the image size)
    while the elastic displacement grows (none at severity 1), so the total change is not
    monotone; each component is."""
    x = jnp.asarray(photos(32))
    k_affine, k_field = jax.random.split(KEY)
    affine = jax.jit(C._affine_jitter)
    displace = jax.jit(C._elastic_displace)
    affine_changes, elastic_changes = [], []
    for severity in range(1, 6):
        alpha, taps, jitter = C._elastic_params(severity)
        affine_changes.append(mean_change(affine(x, jitter, k_affine), photos(32)))
        elastic_changes.append(mean_change(displace(x, alpha, taps, k_field), photos(32)))
    assert_non_decreasing(affine_changes[::-1])
    assert elastic_changes[0] < 1e-6
    assert_non_decreasing(elastic_changes)


# ---------------------------------------------------------------------------------------------
# Noise statistics (mid-grey images, no clipping)
# ---------------------------------------------------------------------------------------------


def grey(level: float) -> jax.Array:
    return jnp.full((4, 32, 32, 3), level, jnp.float32)


@pytest.mark.parametrize("severity", range(1, 6))
def test_gaussian_noise_std(severity: int) -> None:
    sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    diff = np.asarray(C.gaussian_noise(grey(0.5), severity, KEY)) - 0.5
    assert abs(diff.mean()) < 0.05 * sigma
    assert diff.std() == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("severity", range(1, 6))
def test_shot_noise_poisson_variance(severity: int) -> None:
    c = (500, 250, 100, 75, 50)[severity - 1]
    y = np.asarray(C.shot_noise(grey(0.5), severity, KEY))
    assert y.mean() == pytest.approx(0.5, abs=0.01)
    assert y.var() == pytest.approx(0.5 / c, rel=0.06)  # Var(Poisson(0.5 c) / c)
    np.testing.assert_allclose(y * c, np.round(y * c), atol=1e-3)  # counts / c


@pytest.mark.parametrize("severity", range(1, 6))
def test_impulse_noise_fraction(severity: int) -> None:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    y = np.asarray(C.impulse_noise(grey(0.5), severity, KEY))
    changed = y != 0.5
    n = changed.size
    assert abs(changed.mean() - amount) < 4 * np.sqrt(amount * (1 - amount) / n)
    assert set(np.unique(y[changed])) <= {0.0, 1.0}
    assert (y == 1.0).sum() == pytest.approx((y == 0.0).sum(), rel=0.3)


@pytest.mark.parametrize("severity", range(1, 6))
def test_speckle_noise_scales_with_intensity(severity: int) -> None:
    c = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    for level in (0.25, 0.5):
        diff = np.asarray(C.speckle_noise(grey(level), severity, KEY)) - level
        assert diff.std() == pytest.approx(level * c, rel=0.03)
    assert np.asarray(C.speckle_noise(grey(0.0), severity, KEY)).max() == 0.0


# ---------------------------------------------------------------------------------------------
# Deterministic corruptions against independent re-computations of the reference
# ---------------------------------------------------------------------------------------------


def hsv_map(x: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn(h, s, v) -> (h, s, v)`` per pixel with colorsys."""
    flat = x.reshape(-1, 3).astype(np.float64)
    out = [colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*p))) for p in flat]
    return np.clip(np.array(out), 0, 1).reshape(x.shape)


@pytest.mark.parametrize("severity", range(1, 6))
def test_brightness_matches_hsv_reference(severity: int) -> None:
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    expected = hsv_map(photos(32), lambda h, s, v: (h, s, min(v + c, 1.0)))
    np.testing.assert_allclose(outputs("brightness", "rgb32")[severity], expected, atol=2e-5)
    x = IMAGE_SETS["grey16"][0]
    np.testing.assert_allclose(outputs("brightness", "grey16")[severity], np.clip(x + c, 0, 1))


@pytest.mark.parametrize("severity", range(1, 6))
def test_saturate_matches_hsv_reference(severity: int) -> None:
    a, b = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
    expected = hsv_map(photos(32), lambda h, s, v: (h, min(max(s * a + b, 0.0), 1.0), v))
    np.testing.assert_allclose(outputs("saturate", "rgb32")[severity], expected, atol=2e-5)


@pytest.mark.parametrize("image_set", ["rgb32", "grey16"])
def test_contrast_matches_reference(image_set: str) -> None:
    x = IMAGE_SETS[image_set][0].astype(np.float64)
    means = x.mean(axis=(1, 2), keepdims=True)
    for severity, c in enumerate((0.75, 0.5, 0.4, 0.3, 0.15), 1):
        expected = np.clip((x - means) * c + means, 0, 1)
        np.testing.assert_allclose(outputs("contrast", image_set)[severity], expected, atol=1e-6)


@pytest.mark.parametrize("image_set", ["rgb32", "grey16", "rgb24x20"])
def test_pixelate_matches_pillow_box(image_set: str) -> None:
    x, severities = IMAGE_SETS[image_set]
    h, w = x.shape[1:3]
    for severity in severities:
        c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
        expected = np.empty_like(x)
        for i in np.ndindex(x.shape[0], x.shape[3]):
            img = Image.fromarray(x[i[0], :, :, i[1]], mode="F")
            small = img.resize((int(w * c), int(h * c)), Image.BOX)
            expected[i[0], :, :, i[1]] = np.asarray(small.resize((w, h), Image.BOX))
        np.testing.assert_allclose(outputs("pixelate", image_set)[severity], expected, atol=1e-5)


@pytest.mark.parametrize("image_set", ["rgb32", "grey16"])
def test_gaussian_blur_matches_scipy(image_set: str) -> None:
    x = IMAGE_SETS[image_set][0].astype(np.float64)
    for severity, sigma in enumerate((0.4, 0.6, 0.7, 0.8, 1.0), 1):
        expected = ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(
            outputs("gaussian_blur", image_set)[severity], expected, atol=1e-5
        )


def test_gaussian_blur_scales_with_image_size() -> None:
    x = photos(64).astype(np.float64)
    expected = ndimage.gaussian_filter(x, (0, 2.0, 2.0, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(C.gaussian_blur(jnp.asarray(photos(64)), 5), expected, atol=1e-5)


def reference_disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.disk for radius <= 8 (17x17 grid, 3x3 Gaussian with reflect-101 border)."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    return ndimage.correlate(disk, np.outer(g, g), mode="mirror")


@pytest.mark.parametrize("image_set", ["rgb32", "grey16"])
def test_defocus_blur_matches_reference(image_set: str) -> None:
    x = IMAGE_SETS[image_set][0].astype(np.float64)
    params = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
    for severity, (radius, alias_blur) in enumerate(params, 1):
        kernel = reference_disk(radius, alias_blur)[None, :, :, None]
        expected = np.clip(ndimage.correlate(x, kernel, mode="mirror"), 0, 1)
        np.testing.assert_allclose(
            outputs("defocus_blur", image_set)[severity], expected, atol=1e-5
        )


def test_zoom_blur_matches_reference() -> None:
    x = photos(32).astype(np.float64)
    for severity, stop in enumerate((1.06, 1.11, 1.16, 1.21, 1.26), 1):
        zooms = np.arange(1, stop, 0.01)
        expected = []
        for img in x:
            out = sum(reference_clipped_zoom(img, z) for z in zooms)
            expected.append((img + out) / (len(zooms) + 1))
        np.testing.assert_allclose(outputs("zoom_blur", "rgb32")[severity], expected, atol=1e-5)


@pytest.mark.parametrize("image_set", ["rgb32", "grey16"])
def test_jpeg_compression_close_to_pillow(image_set: str) -> None:
    """Pillow encodes uint8 images with libjpeg's integer DCT, so the match is close, not exact:
    the simulation's error must be within 10% of Pillow's and the two must differ by far less
    than either differs from the clean image."""
    x = IMAGE_SETS[image_set][0]
    u8 = np.round(x * 255).astype(np.uint8)
    x8 = u8 / 255.0
    ours_all = {s: np.asarray(C.jpeg_compression(jnp.asarray(x8, jnp.float32), s)) for s in (1, 5)}
    for severity, quality in ((1, 80), (5, 40)):
        expected = []
        for img in u8:
            buf = io.BytesIO()
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
                buf, "JPEG", quality=quality
            )
            expected.append(np.asarray(Image.open(buf)).reshape(img.shape) / 255.0)
        expected = np.stack(expected)
        ours = ours_all[severity]
        pillow_error = mean_change(expected, x8)
        assert mean_change(ours, x8) == pytest.approx(pillow_error, rel=0.1)
        assert mean_change(ours, expected) < 0.25 * pillow_error


# ---------------------------------------------------------------------------------------------
# Random corruptions: reference structure
# ---------------------------------------------------------------------------------------------


def test_glass_blur_moves_pixels_up_left_only() -> None:
    """With no blur (sigma 0.05 is nearly none), glass blur copies into each inner pixel one of
    its neighbours up and/or left (offsets in [-1, 0]) and leaves the border untouched."""
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 12, 12, 1))
    taps = C._gaussian_taps(0.0, 4.0)
    y = np.asarray(C._glass_blur_kernel(x, taps, 1, KEY, delta=1))
    x = np.asarray(x)
    for b, r, c in np.ndindex(2, 12, 12):
        inner = 2 <= r <= 11 and 2 <= c <= 11
        sources = (
            {x[b, r + dy, c + dx, 0] for dy in (-1, 0) for dx in (-1, 0)}
            if inner
            else {x[b, r, c, 0]}
        )
        assert y[b, r, c, 0] in sources


def test_fog_keeps_the_image_maximum_order() -> None:
    """Fog scales ``x + c f`` by ``max(x) / (max(x) + c)``, so nothing exceeds ``max(x)``."""
    x = photos(32) * 0.8
    y = np.asarray(C.fog(jnp.asarray(x), 5, KEY))
    assert (y.max(axis=(1, 2, 3)) <= x.max(axis=(1, 2, 3)) + 1e-6).all()
    assert mean_change(y, x) > 0.05


# ---------------------------------------------------------------------------------------------
# Frost: the reference's photographs
# ---------------------------------------------------------------------------------------------

FROST_SHAPES = {  # the five photographs the reference draws from, (rows, columns)
    "frost1.png": (600, 900),
    "frost2.png": (315, 560),
    "frost3.png": (315, 560),
    "frost4.jpg": (350, 527),
    "frost5.jpg": (495, 660),
}


def reference_frost_photo(name: str) -> np.ndarray:
    """A frost photograph as the reference reads it (``cv2.imread``, BGR), located through the
    package metadata of ``imagecorruptions``, returned as RGB uint8."""
    import importlib.metadata

    import cv2

    dist = importlib.metadata.distribution("imagecorruptions")
    return cv2.imread(str(dist.locate_file(f"imagecorruptions/frost/{name}")))[..., ::-1]


def test_frost_photographs_load_offline(monkeypatch) -> None:
    """The photographs come from the installed package: no network, and the package's code
    (which imports OpenCV and scikit-image) is not imported."""
    import socket
    import sys

    def no_network(*args, **kwargs):
        raise AssertionError("frost tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delitem(sys.modules, "imagecorruptions", raising=False)
    C._frost_photos.cache_clear()
    C._frost_layers.cache_clear()
    loaded = C._frost_photos()
    assert "imagecorruptions" not in sys.modules
    assert len(loaded) == len(FROST_SHAPES)
    for photo, (name, shape) in zip(loaded, FROST_SHAPES.items(), strict=True):
        assert photo.dtype == np.uint8 and photo.shape == (*shape, 3), name
        np.testing.assert_array_equal(photo, reference_frost_photo(name))
    y = np.asarray(C.frost(jnp.zeros((2, 16, 16, 3)), 1, KEY))
    assert 0 < y.mean() <= 0.2


def test_frost_without_the_package_names_it(monkeypatch) -> None:
    import importlib.util

    C._frost_photos.cache_clear()
    C._frost_layers.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install imagecorruptions"):
        C.frost(jnp.zeros((1, 8, 8, 3)), 1, KEY)
    monkeypatch.undo()
    C._frost_photos.cache_clear()


def locate(target: np.ndarray, layers: list[np.ndarray], tol: float) -> list[tuple[int, int]]:
    """``(photo, row, col)`` windows of ``layers`` equal to ``target`` ``[h, w, C]`` within
    ``tol``, among the reference's crop starts ``[0, size - h)``."""
    h, w = target.shape[:2]
    hits = []
    for i, layer in enumerate(layers):
        starts = layer[: layer.shape[0] - h, : layer.shape[1] - w]
        for r, c in np.argwhere(np.abs(starts - target[0, 0]).max(axis=-1) <= tol):
            if np.abs(layer[r : r + h, c : c + w] - target).max() <= tol:
                hits.append((i, r, c))
    return hits


@pytest.mark.parametrize(
    "images",
    [photos(32), IMAGE_SETS["grey16"][0], IMAGE_SETS["rgb24x20"][0], photos(64)[:1]],
    ids=["rgb32", "grey16", "rgb24x20", "rgb64"],
)
def test_frost_is_the_reference_blend_of_a_photo_crop(images: np.ndarray) -> None:
    """Each example is ``np.uint8(clip(a x + b crop))`` of the reference, with ``crop`` an
    ``H x W`` window of a frost photograph resized as ``cv2.resize(photo, fx=0.2 s)``
    (``s = max(1, min(H, W) / 32)``) at a start the reference can draw; the luminance of the
    RGB crop for grey images. The window is found on a black image (``b crop`` alone), whose
    draw is the same as the photographs' for the same key and shape."""
    import cv2

    b, h, w, c = images.shape
    zoom = 0.2 * max(1.0, min(h, w) / 32)
    layers = []
    for name in FROST_SHAPES:
        rgb = cv2.resize(reference_frost_photo(name), (0, 0), fx=zoom, fy=zoom)
        layers.append(rgb.astype(np.float64) if c == 3 else (rgb @ LUMA)[..., None])
    key = jax.random.PRNGKey(7)
    found = np.asarray(C.frost(jnp.zeros(images.shape), 5, key)) * 255.0 / 0.45
    # OpenCV's fixed-point bilinear weights can differ by one level where it interpolates.
    tol = 1e-3 if zoom == 0.2 else 1.0 + 1e-3
    crops = []
    for example in found:
        hits = locate(example, layers, tol)
        assert hits, "not a crop of a frost photograph at a reference start"
        i, r, col = hits[0]
        crops.append(layers[i][r : r + h, col : col + w])
    crops = np.stack(crops)

    x8 = np.floor(images * 255.0).astype(np.float64)
    for severity, (a, weight) in {1: (1.0, 0.2), 3: (0.9, 0.4)}.items():
        expected = np.clip(a * x8 + weight * crops, 0, 255)
        x = jnp.asarray(x8 / 255.0, jnp.float32)
        ours = np.asarray(C.frost(x, severity, key)) * 255.0
        np.testing.assert_allclose(ours, expected, atol=1e-3 if zoom == 0.2 else 0.5)
        ours_u8 = np.round(np.asarray(C.frost(x, severity, key, quantize=True)) * 255.0)
        diff = np.abs(ours_u8 - np.uint8(expected))
        exact = 0.99 if zoom == 0.2 else 0.95
        assert diff.max() <= 1 and (diff == 0).mean() > exact, (diff.max(), (diff == 0).mean())


@pytest.mark.parametrize("image_set", ["rgb32", "grey16"])
@pytest.mark.parametrize(
    "name", ["frost", "contrast", "gaussian_blur", "fog", "pixelate", "motion_blur"]
)
def test_quantize_equals_uint8_of_the_float_result(name: str, image_set: str) -> None:
    """``quantize=True`` is ``np.uint8(255 y) / 255`` (truncation, the reference's final cast)
    of the float result ``y``; for pixelate and motion blur, whose reference output is already
    uint8 from Pillow or ImageMagick, the rounded ``np.uint8(255 y + 0.5) / 255``."""
    x = jnp.asarray(IMAGE_SETS[image_set][0])
    y = np.asarray(C.corrupt(name, x, 3, KEY))
    q = np.asarray(C.corrupt(name, x, 3, KEY, quantize=True))
    assert q.dtype == np.float32 and q.shape == y.shape
    levels = np.round(q * 255.0)
    np.testing.assert_allclose(q * 255.0, levels, atol=1e-3)
    offset = 0.5 if name in ("pixelate", "motion_blur") else 0.0
    np.testing.assert_array_equal(levels, np.uint8(255.0 * y + offset))


def test_quantize_keeps_uint8_images_and_jits() -> None:
    u8 = np.round(photos(32) * 255.0)
    x = jnp.asarray(u8 / 255.0, jnp.float32)
    for name in ("contrast", "pixelate"):
        np.testing.assert_array_equal(np.asarray(C.corrupt(name, x, 0, quantize=True)), x)
    jitted = jax.jit(C.corrupt, static_argnames=("name", "severity", "quantize"))
    y = np.asarray(C.corrupt("contrast", x, 2))
    expected = np.uint8(255.0 * y)
    np.testing.assert_array_equal(
        np.round(255.0 * np.asarray(jitted("contrast", x, 2, quantize=True))), expected
    )


def test_fidelity_benchmark_runs() -> None:
    """``benchmarks/corruption_fidelity.py`` on 4 crops: every row is complete, and with
    ``quantize=True`` contrast equals the reference's uint8 output value for value."""
    from benchmarks import corruption_fidelity

    results = corruption_fidelity.measure(crops=4, draws=1, quantize=True)
    names = [n for n in ("frost", *corruption_fidelity.RANDOM,
                         *corruption_fidelity.DETERMINISTIC)
             if n not in results.get("skipped", ())]
    # Only the two of ImageMagick's motion blur may be skipped (no Wand installed).
    assert set(results.get("skipped", ())) <= set(corruption_fidelity.NEEDS_WAND)
    assert len(names) >= 17
    for name in names:
        assert sorted(results[name]) == [1, 2, 3, 4, 5], name
        for row in results[name].values():
            assert np.isfinite(row["ratio"]) and np.isfinite(row["ratio_quantized"]), name
    assert all(row["exact_quantized"] == 1.0 for row in results["contrast"].values())
    assert 0.5 < results["frost_mean_ratio"] < 2.0
