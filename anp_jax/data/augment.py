"""Data augmentation on device, in JAX, with an explicit RNG.

The official ANP code trains CIFAR-10 with ``RandomCrop(32, padding=4)`` (zero padding) and
``RandomHorizontalFlip()``; :func:`pad_crop_flip` is that, for a whole batch at once: pure,
jit-able, a fresh crop offset and flip for every example, the same output for the same key.

Use it inside the (p)mapped training step, on the batch that comes from the input pipeline::

    from anp_jax.data import augment

    aug = augment.get(config.augment)                    # "none" or "pad_crop_flip"
    def step(state, batch, hp, rng):                     # pmap(..., in_axes=(0, 0, None, None))
        batch = augment.augment_batch(aug, rng, batch, axis_name="batch")
        return train_step(state, batch, hp)
    state, metrics = p_step(state, batch, hp, augment.batch_key(config.seed, index))

``batch_key(seed, index)`` depends only on the seed and the batch index, so a run that
resumes from a checkpoint sees the same augmented batches; under pmap ``augment_batch`` folds
in the device's position on ``axis_name`` so that devices (and hosts) draw differently.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]

AUGMENTATIONS = ("none", "pad_crop_flip", "flip")

# Keeps the augmentation stream apart from other uses of PRNGKey(seed).
_AUGMENT_STREAM = 0x61756720  # "aug "


def _flat(images: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """``[..., H, W, C]`` to ``[B, H, W, C]``; returns the leading shape to restore."""
    if images.ndim < 4:
        raise ValueError(f"images must be [..., H, W, C] with a batch axis, got shape "
                         f"{images.shape}")
    lead = images.shape[:-3]
    return images.reshape((-1,) + images.shape[-3:]), lead


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Flips each image left-right with probability 1/2 (``[..., H, W, C]``)."""
    x, lead = _flat(images)
    flip = jax.random.bernoulli(rng, 0.5, (x.shape[0],))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    return x.reshape(lead + x.shape[1:])


def pad_crop(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Zero-pads by ``pad`` on each side and crops back to ``H x W`` at a random offset.

    Each example gets its own offset, uniform in ``[0, 2 * pad]`` along each axis: the crop
    is a window of the padded image, as torchvision's ``RandomCrop(size, padding=pad)``.
    """
    x, lead = _flat(images)
    b, h, w, c = x.shape
    if pad == 0:
        return images
    ky, kx = jax.random.split(rng)
    dy = jax.random.randint(ky, (b,), 0, 2 * pad + 1)
    dx = jax.random.randint(kx, (b,), 0, 2 * pad + 1)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = jax.vmap(lambda img, y, z: jax.lax.dynamic_slice(img, (y, z, 0), (h, w, c)))
    return crop(padded, dy, dx).reshape(lead + (h, w, c))


def pad_crop_flip(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """The official CIFAR-10 augmentation: pad ``pad`` + random crop + horizontal flip.

    Args:
      rng: a JAX PRNG key.
      images: ``[..., H, W, C]`` (any leading batch axes), pixels in [0, 1].
      pad: zero padding on each side before the crop.

    Returns:
      Augmented images, same shape and dtype.
    """
    k_crop, k_flip = jax.random.split(rng)
    return random_flip(k_flip, pad_crop(k_crop, images, pad))


def identity(rng: jax.Array, images: jax.Array) -> jax.Array:
    del rng
    return images


def get(name: str) -> AugmentFn:
    """The augmentation called ``name`` (``config.augment``): see ``AUGMENTATIONS``."""
    fns = {"none": identity, "pad_crop_flip": pad_crop_flip, "flip": random_flip}
    if name not in fns:
        raise ValueError(f"unknown augmentation {name!r}; choose from "
                         f"{', '.join(AUGMENTATIONS)}")
    return fns[name]


def batch_key(seed: int, index: int) -> jax.Array:
    """The augmentation key of training batch ``index``: a pure function of both."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _AUGMENT_STREAM)
    return jax.random.fold_in(key, index)


def augment_batch(fn: AugmentFn | str, rng: jax.Array, batch: dict,
                  axis_name: str | None = None) -> dict:
    """``batch`` with ``fn`` applied to ``batch["image"]``; other entries are untouched.

    Under ``pmap``/``shard_map`` pass ``axis_name``: the key is folded with the device's
    index on that axis, so that every device draws its own crops and flips.
    """
    fn = get(fn) if isinstance(fn, str) else fn
    if fn is identity:
        return batch
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return dict(batch, image=fn(rng, batch["image"]))
