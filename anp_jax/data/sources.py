"""Input sources, in the style of Flax's ImageNet example: what the trainer reads.

:func:`create_source` gives the trainer one object per run, whatever the data set:

==============================  =====================================================
``source.train_batch(i)``       global training batch ``i`` (this process's slice),
                                numpy ``{"image": f32 [devices, per_device, H, W, C],
                                "label": i32 [devices, per_device]}``
``source.train_iter(start)``    the same batches from ``start`` on, prefetched to the
                                devices (``flax.jax_utils.prefetch_to_device``)
``source.eval_batches()``       the whole evaluation split, the last batch padded and
                                masked (``mask``), the same number of batches on every
                                process
``source.steps_per_epoch``      training batches per epoch (full batches only)
``source.num_train_examples``   size of the training split
``source.image_shape``          ``(H, W, C)`` of the batches (for ``init``)
``source.spec``                 the data set's :class:`~anp_jax.data.registry.DatasetSpec`
==============================  =====================================================

Two kinds of source, chosen by ``config.input_pipeline`` (``"auto"``: by the data set):

* :class:`InMemorySource` (``digits``, ``fashion_mnist``, ``mnist``, ``cifar10``,
  ``cifar10_corrupted/*``): the splits are read once into host memory as uint8
  (:func:`anp_jax.data.registry.load_split`); the training stream is then a pure function
  of ``(seed, epoch, batch index)`` (:func:`train_batch`: a fresh permutation per epoch, the
  last partial batch dropped so that the noise registers keep one shape), which makes the
  data position a single integer that a checkpoint can store.  Evaluation covers the whole
  split (:func:`eval_batches`): the last batch is padded and masked, never dropped.
* :class:`StreamingSource` (``imagenet2012``, ``imagenet2012_corrupted/*``; any set with
  ``config.input_pipeline="stream"``): a tf.data pipeline over the TFDS files.  Training:
  this process's part of the split (``tfds.even_splits``), files and examples shuffled with
  seeds drawn from ``(seed, epoch, process)``, epochs chained (``repeat``), batches of
  ``batch_size / processes`` with the remainder dropped, JPEG decode and random-resized crop
  + flip on the host (stateless ops, seeded per example), prefetch.  ``train_batch(i)``
  reads the stream in order; asked for another index (a resumed run) it rebuilds the
  stream at that index, skipping the examples before it *before* decoding them, so resuming
  gives exactly the batches an uninterrupted run would have had.  Evaluation: decode +
  central crop + resize, every example once.

Pixels are float32 in [0, 1] in both (``to_float``); a model that wants standardised inputs
does it inside (``mean``/``std`` attributes), so attack budgets stay in pixel units.
Augmentation of the small sets (pad, crop, flip) runs on the device
(:mod:`anp_jax.data.augment`).  With several processes, each reads only its own slice of
every global batch.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from anp_jax.data import registry
from anp_jax.data.registry import DatasetError, DatasetSpec

PIPELINES = ("auto", "memory", "stream")
CROP_PADDING = 32  # ImageNet evaluation: central crop of size/(size+32) of the shorter side


def _cfg(config: Any, field: str, default: Any) -> Any:
    value = config.get(field, default) if hasattr(config, "get") else default
    return default if value is None else value


def create_source(config: Any, spec: DatasetSpec | None = None,
                  num_devices: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, *, data_dir: str | None = None
                  ) -> InMemorySource | StreamingSource:
    """The input of a training run described by ``config``.

    Args:
      config: the run's config (``dataset``, ``data_dir``, ``download``, ``batch_size``,
        ``seed``, ``num_epochs``, ``eval.batch_size``; optional ``input_pipeline``
        (``"auto"``, ``"memory"``, ``"stream"``), ``image_size`` (0: the data set's),
        ``shuffle_buffer_size``, ``prefetch_batches``).
      spec: ``registry.get_spec(config.dataset)`` unless given.
      num_devices: local devices that share a batch (default: ``config.num_devices``, -1
        meaning all local devices).
      process_index, process_count: this process and how many (default: JAX's).
      data_dir: overrides ``config.data_dir``.

    Raises:
      DatasetError: the data set is not there (one line: which, where, how to get it), or
        ``batch_size`` does not fit it (not a multiple of the devices of all processes, or
        larger than the training split).
    """
    import jax

    spec = spec or registry.get_spec(config.dataset)
    if num_devices is None:
        n = _cfg(config, "num_devices", -1)
        num_devices = jax.local_device_count() if n == -1 else n
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    data_dir = data_dir or _cfg(config, "data_dir", "") or None
    kind = _cfg(config, "input_pipeline", "auto")
    if kind not in PIPELINES:
        raise DatasetError(f"config.input_pipeline={kind!r}: choose from "
                           f"{', '.join(PIPELINES)}")
    if kind == "auto":
        kind = "stream" if spec.streaming else "memory"
    if config.batch_size % (num_devices * process_count):
        raise DatasetError(
            f"config.batch_size={config.batch_size}: must be a multiple of the "
            f"{num_devices * process_count} devices")
    shards = num_devices * process_count
    eval_batch = -(-config.eval.batch_size // shards) * shards
    common = dict(name=config.dataset, spec=spec, global_batch=config.batch_size,
                  eval_batch=eval_batch, num_devices=num_devices,
                  process_index=process_index, process_count=process_count,
                  seed=config.seed)
    if kind == "memory":
        return InMemorySource(data_dir=data_dir, download=bool(config.download), **common)
    return StreamingSource(
        data_dir=data_dir, download=bool(config.download),
        num_epochs=float(config.num_epochs),
        image_size=int(_cfg(config, "image_size", 0)),
        shuffle_buffer_size=int(_cfg(config, "shuffle_buffer_size", 10_000)),
        prefetch_batches=int(_cfg(config, "prefetch_batches", 4)), **common)


# ---------------------------------------------------------------------------------------
# In memory: pure functions of the arrays


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1]."""
    return images.astype(np.float32) / 255.0


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full batches per epoch (the remainder is dropped)."""
    return num_examples // global_batch


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in ``epoch``: a permutation drawn from ``(seed, epoch)``.

    Read-only; computed once per epoch (every batch of the epoch asks for it).
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def train_batch(images: np.ndarray, labels: np.ndarray, seed: int, index: int,
                global_batch: int, num_devices: int, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
    """Global training batch number ``index`` (counted from the start of training).

    Each epoch is a fresh permutation of the split, drawn from ``(seed, epoch)``.  Returns
    this process's slice, shaped ``[num_devices, per_device_batch, ...]``.
    """
    per_epoch = steps_per_epoch(len(images), global_batch)
    epoch, position = divmod(index, per_epoch)
    order = epoch_order(seed, epoch, len(images))
    chosen = order[position * global_batch:(position + 1) * global_batch]
    per_process = global_batch // process_count
    chosen = chosen[process_index * per_process:(process_index + 1) * per_process]
    return {
        "image": to_float(images[chosen]).reshape((num_devices, -1) + images.shape[1:]),
        "label": labels[chosen].reshape(num_devices, -1),
    }


def eval_batches(images: np.ndarray, labels: np.ndarray, global_batch: int,
                 num_devices: int, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order, the last batch padded; ``mask`` marks real examples.

    Yields this process's slice of each global batch, shaped
    ``[num_devices, per_device_batch, ...]``.
    """
    n = len(images)
    per_process = global_batch // process_count
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)
        idx = idx[process_index * per_process:(process_index + 1) * per_process]
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield {
            "image": to_float(images[idx]).reshape((num_devices, -1) + images.shape[1:]),
            "label": labels[idx].reshape(num_devices, -1),
            "mask": mask.reshape(num_devices, -1),
        }


# ---------------------------------------------------------------------------------------
# The sources


class _Source:
    """What both kinds of source share.

    Attributes:
      name: the ``DATASETS`` key (``config.dataset``); spec: its ``DatasetSpec``.
      global_batch: training examples per step, over all devices of all processes.
      eval_batch: evaluation examples per batch, over all processes (a multiple of the
        devices of all processes).
      num_devices: local devices that share a batch; process_index, process_count: this
        process and how many.
      seed: the data order's seed.
    """

    def __init__(self, *, name: str, spec: DatasetSpec, global_batch: int, eval_batch: int,
                 num_devices: int, process_index: int, process_count: int, seed: int):
        self.name, self.spec, self.seed = name, spec, seed
        self.global_batch, self.eval_batch = global_batch, eval_batch
        self.num_devices = num_devices
        self.process_index, self.process_count = process_index, process_count

    @property
    def local_batch_size(self) -> int:
        """Training examples per batch on this process."""
        return self.global_batch // self.process_count

    @property
    def per_device_batch_size(self) -> int:
        return self.local_batch_size // self.num_devices

    def _check_steps(self, examples: int) -> None:
        if self.steps_per_epoch < 1:
            raise DatasetError(
                f"config.batch_size={self.global_batch}: larger than the {examples} "
                f"training examples of {self.name!r}")

    def train_batch(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train_iter(self, start: int = 0, prefetch: int = 2,
                   devices: Sequence[Any] | None = None,
                   stop: int | None = None) -> Iterator[dict]:
        """Training batches ``start, start + 1, ...`` (up to ``stop``, excluded, if given),
        sharded over ``devices`` (default: the first ``num_devices`` local devices, pmap's
        order) and prefetched ``prefetch`` batches ahead; with ``prefetch=0``, host numpy
        batches."""
        indices = itertools.count(start) if stop is None else range(start, stop)
        batches = (self.train_batch(i) for i in indices)
        if not prefetch:
            return batches
        import jax
        from flax import jax_utils

        devices = list(devices or jax.local_devices()[:self.num_devices])
        if len(devices) != self.num_devices:
            raise ValueError(f"{len(devices)} devices for batches split {self.num_devices} "
                             "ways")
        return jax_utils.prefetch_to_device(batches, prefetch, devices)


class InMemorySource(_Source):
    """Both splits in host memory; ``train_batch`` is pure in ``(seed, index)``."""

    def __init__(self, *, data_dir: str | None = None, download: bool = False,
                 arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
                 **common: Any):
        """``common``: the attributes of :class:`_Source`; ``arrays``: train images and
        labels, eval images and labels, instead of reading the data set."""
        super().__init__(**common)
        if arrays is None:
            train = registry.load_split(self.name, self.spec.train_split, data_dir, download)
            test = registry.load_split(self.name, self.spec.test_split, data_dir, download)
            arrays = (*train, *test)
        self.train_images, self.train_labels, self.eval_images, self.eval_labels = arrays
        self._check_steps(len(self.train_images))

    @property
    def num_train_examples(self) -> int:
        return len(self.train_images)

    @property
    def num_eval_examples(self) -> int:
        return len(self.eval_images)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train_images), self.global_batch)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def train_batch(self, index: int) -> dict[str, np.ndarray]:
        return train_batch(self.train_images, self.train_labels, self.seed, index,
                                    self.global_batch, self.num_devices, self.process_index,
                                    self.process_count)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return eval_batches(self.eval_images, self.eval_labels, self.eval_batch,
                                     self.num_devices, self.process_index, self.process_count)


# ---------------------------------------------------------------------------------------
# tf.data


def _tf():
    import tensorflow as tf

    # The host pipeline must not take GPU or TPU memory away from JAX.
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
    return tf


def _shard_sizes(n: int, count: int) -> list[int]:
    """Examples per process with ``tfds.even_splits(drop_remainder=False)``."""
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


def _seed(*parts: int) -> int:
    """A 31-bit seed drawn from integers (stable across machines)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0]
               >> 1)


def _decode(tf, image_bytes, channels: int):
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    return image


def _resize(tf, image, size: int):
    return tf.image.resize([image], [size, size], method=tf.image.ResizeMethod.BICUBIC)[0]


def _decode_and_center_crop(tf, image_bytes, size: int):
    """Flax's ImageNet evaluation crop: centre, ``size/(size+32)`` of the shorter side."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    h, w = shape[0], shape[1]
    crop = tf.cast((size / (size + CROP_PADDING)) * tf.cast(tf.minimum(h, w), tf.float32),
                   tf.int32)
    window = tf.stack([((h - crop) + 1) // 2, ((w - crop) + 1) // 2, crop, crop])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    return _resize(tf, image, size)


def _decode_and_random_crop(tf, image_bytes, size: int, seed):
    """Flax's ImageNet training crop (Inception-style), with a stateless seed."""
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=bbox, seed=seed, min_object_covered=0.1,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(box_size)
    window = tf.stack([offset_y, offset_x, height, width])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    # No box found after max_attempts: the whole image comes back; use the central crop.
    bad = tf.reduce_sum(tf.cast(tf.equal(shape, tf.shape(image)), tf.int32)) >= 3
    return tf.cond(bad, lambda: _decode_and_center_crop(tf, image_bytes, size),
                   lambda: _resize(tf, image, size))


def preprocess(tf, kind: str, image_bytes, image_shape: tuple[int, int, int], seed=None,
               stored_shape: tuple[int, int, int] | None = None):
    """An encoded image to ``image_shape``.

    ``"decode"`` returns uint8 when the images are stored at ``image_shape`` already and
    resizes them (float32) when ``stored_shape`` differs; the other kinds return float32 in
    [0, 1].  ``seed`` (int ``[2]``) drives the random crop and flip.
    """
    size, _, channels = image_shape
    if kind == "decode":
        image = _decode(tf, image_bytes, channels)
        stored_shape = stored_shape or image_shape
        image.set_shape(stored_shape)
        if tuple(stored_shape) == tuple(image_shape):
            return image
        image = _resize(tf, image, size)
        image = tf.reshape(image, image_shape)
        return tf.clip_by_value(image / 255.0, 0.0, 1.0)
    if kind == "random_resized_crop":
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = _decode_and_random_crop(tf, image_bytes, size, crop_seed)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    elif kind == "center_crop":
        image = _decode_and_center_crop(tf, image_bytes, size)
    else:
        raise ValueError(f"unknown preprocessing {kind!r}")
    image = tf.reshape(image, image_shape)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


class StreamingSource(_Source):
    """A tf.data pipeline over the TFDS files (see the module docstring)."""

    def __init__(self, *, num_epochs: float = 1.0, data_dir: str | None = None,
                 download: bool = False, image_size: int = 0,
                 shuffle_buffer_size: int = 10_000, prefetch_batches: int = 4,
                 output_dtype: str = "float32", **common: Any):
        """``common``: the attributes of :class:`_Source`."""
        import tensorflow_datasets as tfds

        super().__init__(**common)
        name, spec, process_index, process_count = (
            self.name, self.spec, self.process_index, self.process_count)
        self._tf_mod, self._tfds = _tf(), tfds
        self.num_epochs = num_epochs
        self.shuffle_buffer_size = shuffle_buffer_size
        self.prefetch_batches = prefetch_batches
        self.output_dtype = output_dtype
        h, w, c = spec.image_shape
        self.image_shape = (image_size, image_size, c) if image_size else (h, w, c)

        train_name, train_split = registry.resolve_split(name, spec.train_split)
        eval_name, eval_split = registry.resolve_split(name, spec.test_split)
        self._train_builder = registry.get_builder(train_name, data_dir, download,
                                                   for_dataset=name)
        self._eval_builder = registry.get_builder(eval_name, data_dir, download,
                                                  for_dataset=name)
        self._train_pre = registry.get_spec(train_name).train_preprocess
        self._eval_pre = registry.get_spec(eval_name).eval_preprocess
        self._train_stored = self._stored_shape(self._train_builder)
        self._eval_stored = self._stored_shape(self._eval_builder)
        for builder, split, what in ((self._train_builder, train_split, train_name),
                                     (self._eval_builder, eval_split, eval_name)):
            if split not in builder.info.splits:
                raise DatasetError(
                    f"dataset {what!r} in {builder.data_dir} has no split {split!r}; it has: "
                    f"{', '.join(builder.info.splits) or 'none'}")
        if output_dtype == "uint8" and (self._train_pre != "decode"
                                        or self._train_stored != self.image_shape):
            raise ValueError("output_dtype='uint8' needs images stored at the output size")

        self.num_train_examples = builder_n = self._train_builder.info.splits[
            train_split].num_examples
        self._train_split = tfds.even_splits(train_split, n=process_count)[process_index]
        # Every process takes the same number of steps: the smallest shard decides.
        self._steps = (builder_n // process_count) // self.local_batch_size
        self.num_eval_examples = n_eval = self._eval_builder.info.splits[
            eval_split].num_examples
        self._eval_split = tfds.even_splits(eval_split, n=process_count)[process_index]
        local_eval = self.eval_batch // process_count
        self.num_eval_batches = -(-_shard_sizes(n_eval, process_count)[0] // local_eval)
        self._check_steps(builder_n)
        self._iter: Iterator | None = None
        self._next = -1

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def _stored_shape(self, builder) -> tuple[int, int, int] | None:
        """Shape of the stored images when fixed (CIFAR, ImageNet-C), else None."""
        shape = builder.info.features["image"].shape
        return tuple(shape) if None not in shape else None

    # -- training -----------------------------------------------------------------------

    def _options(self):
        tf = self._tf_mod
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_optimization.map_parallelization = True
        return options

    def _epoch(self, epoch: int, start_step: int):
        """Batches ``start_step ..`` of ``epoch`` on this process (a tf.data.Dataset)."""
        tf, tfds = self._tf_mod, self._tfds
        read_config = tfds.ReadConfig(
            shuffle_seed=_seed(self.seed, epoch, self.process_index, 1),
            options=self._options())
        ds = self._train_builder.as_dataset(
            split=self._train_split, shuffle_files=True, read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
        ds = ds.shuffle(self.shuffle_buffer_size,
                        seed=_seed(self.seed, epoch, self.process_index, 2),
                        reshuffle_each_iteration=False)
        b = self.local_batch_size
        ds = ds.take(self._steps * b).enumerate().skip(start_step * b)
        example_seed = _seed(self.seed, epoch, self.process_index, 3)
        kind, shape, stored = self._train_pre, self.image_shape, self._train_stored

        def prepare(i, ex):
            seed = tf.stack([tf.constant(example_seed, tf.int64), i])
            return {"image": preprocess(tf, kind, ex["image"], shape, seed, stored),
                    "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(b, drop_remainder=True)

    def _train_dataset(self, start: int):
        """The training stream from global batch ``start`` to the end of training."""
        tf = self._tf_mod
        first, position = divmod(start, self._steps)
        last = max(first + 1, math.ceil(self.num_epochs))
        ds = self._epoch(first, position)
        for epoch in range(first + 1, last):  # repeat: one reshuffled pass per epoch
            ds = ds.concatenate(self._epoch(epoch, 0))
        if self.output_dtype == "float32" and ds.element_spec["image"].dtype == tf.uint8:
            ds = ds.map(lambda x: dict(x, image=tf.cast(x["image"], tf.float32) / 255.0),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(self.prefetch_batches).with_options(self._options())

    def _host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = self.num_devices
        return {k: v.reshape((n, -1) + v.shape[1:]) for k, v in batch.items()}

    def train_batch(self, index: int) -> dict[str, np.ndarray]:
        """Global training batch ``index`` (this process's slice), from the stream."""
        if self._iter is None or index != self._next:
            self._iter = iter(self._tfds.as_numpy(self._train_dataset(index)))
        try:
            batch = next(self._iter)
        except StopIteration:  # past num_epochs: go on with more epochs
            self._iter = iter(self._tfds.as_numpy(self._train_dataset(index)))
            batch = next(self._iter)
        self._next = index + 1
        return self._host_batch(batch)

    # -- evaluation ---------------------------------------------------------------------

    def eval_dataset(self):
        """This process's part of the evaluation split, batched, the last batch partial."""
        tf, tfds = self._tf_mod, self._tfds
        ds = self._eval_builder.as_dataset(
            split=self._eval_split, shuffle_files=False,
            read_config=tfds.ReadConfig(options=self._options()),
            decoders={"image": tfds.decode.SkipDecoding()})
        kind, shape, stored = self._eval_pre, self.image_shape, self._eval_stored

        def prepare(ex):
            image = preprocess(tf, kind, ex["image"], shape, stored_shape=stored)
            if image.dtype == tf.uint8:
                image = tf.cast(image, tf.float32) / 255.0
            return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(self.eval_batch // self.process_count).prefetch(self.prefetch_batches)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The evaluation split, each example once: partial batches padded, ``mask`` False
        on the padding; every process yields ``num_eval_batches`` batches."""
        local = self.eval_batch // self.process_count
        count = 0
        for batch in self._tfds.as_numpy(self.eval_dataset()):
            n = len(batch["label"])
            mask = np.arange(local) < n
            out = {k: np.concatenate([v, np.zeros((local - n,) + v.shape[1:], v.dtype)])
                   for k, v in batch.items()}
            out["mask"] = mask
            count += 1
            yield self._host_batch(out)
        while count < self.num_eval_batches:  # this process's shard is one example short
            count += 1
            yield self._host_batch({
                "image": np.zeros((local,) + self.image_shape, np.float32),
                "label": np.zeros((local,), np.int32),
                "mask": np.zeros((local,), bool)})
