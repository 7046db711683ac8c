"""Tests of anp_jax.stability: perturbation sequences and the flip probability."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from anp_jax import stability as S

KEY = jax.random.PRNGKey(0)
RS = np.random.RandomState(0)
# Smooth random images (blurred noise) of two sizes and channel counts.
IMAGES = {
    "rgb": ndimage.gaussian_filter(RS.rand(2, 32, 32, 3), (0, 1.5, 1.5, 0)).astype(np.float32),
    "grey": ndimage.gaussian_filter(RS.rand(3, 16, 20, 1), (0, 1.0, 1.0, 0)).astype(np.float32),
}
for _images in IMAGES.values():
    _lo = _images.min(axis=(1, 2, 3), keepdims=True)
    _images[:] = (_images - _lo) / (_images.max(axis=(1, 2, 3), keepdims=True) - _lo)


def change(frames: np.ndarray, x: np.ndarray) -> list[float]:
    return [float(np.abs(f - x).mean()) for f in frames]


@pytest.mark.parametrize("images", list(IMAGES))
@pytest.mark.parametrize("name", S.PERTURBATIONS)
def test_sequence_shape_range_and_growth(name: str, images: str) -> None:
    x = IMAGES[images]
    frames = np.asarray(S.perturbation_sequence(name, jnp.asarray(x), 6, KEY))
    assert frames.shape == (6, *x.shape)
    assert frames.dtype == np.float32
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    changes = change(frames, x)
    tol = 0.02 if name == "gaussian_blur" else 1e-6  # blur's first frame has sigma 0.3 px
    assert changes[0] < tol
    assert all(b >= a - 1e-6 for a, b in zip(changes, changes[1:], strict=False)), changes
    assert changes[-1] > 0.01


def test_noise_sequence_scales_one_fixed_field() -> None:
    x = jnp.full((2, 16, 16, 3), 0.5)
    frames = np.asarray(S.perturbation_sequence("gaussian_noise", x, 4, KEY)) - 0.5
    np.testing.assert_array_equal(frames[0], 0.0)
    sigmas = 0.06 * np.linspace(0, 1, 4)
    fields = frames[1:] / sigmas[1:, None, None, None, None]
    np.testing.assert_allclose(fields[0], fields[2], atol=1e-4)
    np.testing.assert_allclose(fields[1], fields[2], atol=1e-4)
    assert fields[2].std() == pytest.approx(1.0, rel=0.05)
    assert not np.allclose(fields[2][0], fields[2][1])  # each image has its own field


def test_translate_shifts_by_whole_pixels_with_zero_fill() -> None:
    x = IMAGES["rgb"]  # 32 wide: shifts 0, 1, 2, 3, 4 px over 5 frames
    frames = np.asarray(S.perturbation_sequence("translate", jnp.asarray(x), 5))
    for shift in range(5):
        expected = np.zeros_like(x)
        expected[:, :, shift:] = x[:, :, : 32 - shift]
        np.testing.assert_allclose(frames[shift], expected, atol=1e-6)


def test_rotate_matches_scipy() -> None:
    x = IMAGES["grey"]
    frames = np.asarray(S.perturbation_sequence("rotate", jnp.asarray(x), 4))
    for i, angle in enumerate((0.0, 5.0, 10.0, 15.0)):
        for b in range(x.shape[0]):
            expected = ndimage.rotate(
                x[b, :, :, 0], angle, reshape=False, order=1, mode="grid-constant"
            )
            np.testing.assert_allclose(frames[i, b, :, :, 0], expected, atol=1e-5)


def test_zoom_matches_scipy() -> None:
    x = IMAGES["grey"]
    frames = np.asarray(S.perturbation_sequence("zoom", jnp.asarray(x), 3))
    centre = (np.array(x.shape[1:3]) - 1) / 2
    for i, scale in enumerate((1.0, 1.1, 1.2)):
        for b in range(x.shape[0]):
            expected = ndimage.affine_transform(
                x[b, :, :, 0],
                np.diag([1 / scale, 1 / scale]),
                offset=centre - centre / scale,
                order=1,
                mode="nearest",
            )
            np.testing.assert_allclose(frames[i, b, :, :, 0], expected, atol=1e-5)


def test_blur_sequence_matches_scipy() -> None:
    x = IMAGES["rgb"]
    frames = np.asarray(S.perturbation_sequence("gaussian_blur", jnp.asarray(x), 4))
    for i, sigma in enumerate((0.3, 0.45, 0.6, 0.75)):
        expected = ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(frames[i], expected, atol=1e-5)


def test_sequence_is_jittable() -> None:
    x = jnp.asarray(IMAGES["grey"])
    jitted = jax.jit(S.perturbation_sequence, static_argnames=("name", "num_frames"))
    for name in ("gaussian_noise", "rotate"):
        np.testing.assert_allclose(
            jitted(name, x, 3, KEY), S.perturbation_sequence(name, x, 3, KEY), atol=1e-6
        )


def test_sequence_invalid_arguments() -> None:
    x = jnp.asarray(IMAGES["grey"])
    with pytest.raises(ValueError, match="unknown perturbation 'shear'"):
        S.perturbation_sequence("shear", x, 4, KEY)
    with pytest.raises(ValueError, match="num_frames"):
        S.perturbation_sequence("rotate", x, 1)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        S.perturbation_sequence("gaussian_noise", x, 4)


def test_flip_probability_hand_computed() -> None:
    # Frames x examples. Example 0: 0 1 1 0, example 1: 1 1 2 2.
    predictions = jnp.array([[0, 1], [1, 1], [1, 2], [0, 2]])
    # Consecutive frames: example 0 flips 2 of 3 times, example 1 once -> (2/3 + 1/3) / 2.
    assert float(S.flip_probability(predictions)) == pytest.approx(0.5)
    # Against the first frame: example 0 differs in 2 of 3 frames, example 1 in 2 of 3.
    assert float(S.flip_probability(predictions, noise_perturbation=True)) == pytest.approx(2 / 3)
    assert float(S.flip_probability(jnp.zeros((5, 3), jnp.int32))) == 0.0
    alternating = jnp.array([[0], [1], [0], [1]])
    assert float(S.flip_probability(alternating)) == 1.0
    assert float(S.flip_probability(alternating, noise_perturbation=True)) == pytest.approx(2 / 3)
    jitted = jax.jit(S.flip_probability, static_argnames="noise_perturbation")
    assert float(jitted(predictions)) == pytest.approx(0.5)


def test_flip_probability_invalid_shape() -> None:
    with pytest.raises(ValueError, match="num_frames"):
        S.flip_probability(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="num_frames"):
        S.flip_probability(jnp.zeros((1, 4), jnp.int32))
