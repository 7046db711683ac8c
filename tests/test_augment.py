"""On-device augmentation: pad + random crop + horizontal flip, pure and per example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anp_jax.data import augment


def images(n=64, h=8, w=8, c=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, h, w, c)), jnp.float32)


def find_window(out, x, pad):
    """The offsets (dy, dx) and flip of ``out`` as a window of the zero-padded ``x``."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    hits = []
    for flip in (False, True):
        target = out[:, ::-1] if flip else out
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(padded[dy:dy + h, dx:dx + w], target):
                    hits.append((dy, dx, flip))
    return hits


def test_crop_is_a_window_of_the_padded_image_and_flip_is_a_flip():
    x = images()
    out = np.asarray(augment.pad_crop_flip(jax.random.PRNGKey(0), x, pad=4))
    assert out.shape == x.shape and out.dtype == np.float32
    found = []
    for i in range(len(x)):
        hits = find_window(out[i], np.asarray(x[i]), 4)
        assert len(hits) == 1, i  # random pixels: exactly one window and orientation
        found.append(hits[0])
    offsets = {(dy, dx) for dy, dx, _ in found}
    flips = [f for _, _, f in found]
    # Per-example randomness: many offsets, both orientations, all offsets within range.
    assert len(offsets) > 20 and 0.2 < np.mean(flips) < 0.8
    assert all(0 <= dy <= 8 and 0 <= dx <= 8 for dy, dx in offsets)


def test_flip_only_and_crop_only():
    x = images(32)
    flipped = np.asarray(augment.random_flip(jax.random.PRNGKey(1), x))
    is_flip = [np.array_equal(f, np.asarray(o)[:, ::-1]) for f, o in zip(flipped, x)]
    same = [np.array_equal(f, np.asarray(o)) for f, o in zip(flipped, x)]
    assert all(a or b for a, b in zip(is_flip, same)) and any(is_flip) and any(same)
    cropped = np.asarray(augment.pad_crop(jax.random.PRNGKey(2), x, pad=2))
    for c, o in zip(cropped, np.asarray(x)):
        assert any(not flip for _, _, flip in find_window(c, o, 2))
    np.testing.assert_array_equal(augment.pad_crop(jax.random.PRNGKey(2), x, pad=0), x)


def test_same_key_same_result_and_jit():
    x = images()
    key = jax.random.PRNGKey(3)
    a = augment.pad_crop_flip(key, x)
    np.testing.assert_array_equal(a, augment.pad_crop_flip(key, x))
    np.testing.assert_array_equal(a, jax.jit(augment.pad_crop_flip, static_argnames="pad")(
        key, x, pad=4))
    assert not np.array_equal(a, augment.pad_crop_flip(jax.random.PRNGKey(4), x))


def test_leading_axes_and_batch_key():
    x = images(16).reshape(2, 8, 8, 8, 3)  # [devices, per_device, H, W, C]
    out = augment.pad_crop_flip(jax.random.PRNGKey(0), x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(
        out.reshape(16, 8, 8, 3), augment.pad_crop_flip(jax.random.PRNGKey(0),
                                                        x.reshape(16, 8, 8, 3)))
    k = augment.batch_key(0, 5)
    np.testing.assert_array_equal(k, augment.batch_key(0, 5))
    assert not np.array_equal(k, augment.batch_key(0, 6))
    assert not np.array_equal(k, augment.batch_key(1, 5))


def test_under_pmap_every_device_draws_its_own():
    n = jax.local_device_count()
    x = jnp.broadcast_to(images(4), (n, 4, 8, 8, 3))  # the same images on every device
    batch = {"image": x, "label": jnp.zeros((n, 4), jnp.int32)}
    fn = jax.pmap(lambda b, k: augment.augment_batch("pad_crop_flip", k, b, axis_name="d"),
                  axis_name="d", in_axes=(0, None))
    out = fn(batch, augment.batch_key(0, 0))
    again = fn(batch, augment.batch_key(0, 0))
    np.testing.assert_array_equal(out["image"], again["image"])
    np.testing.assert_array_equal(out["label"], batch["label"])
    if n > 1:
        assert not np.array_equal(out["image"][0], out["image"][1])
    for d in range(n):  # still windows of the padded originals
        for i in range(4):
            assert find_window(np.asarray(out["image"][d, i]), np.asarray(x[0, i]), 4)


def test_names():
    x = images(4)
    assert augment.get("none") is augment.identity
    assert augment.augment_batch("none", jax.random.PRNGKey(0), {"image": x})["image"] is x
    with pytest.raises(ValueError, match="pad_crop_flip"):
        augment.get("cutout")
