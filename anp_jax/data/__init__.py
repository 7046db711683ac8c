"""Data: the registry of data sets, the project's TFDS builders, input sources, augmentation.

Following ``config.dataset`` from the trainer:

1. :mod:`anp_jax.data.registry`: ``get_spec(name)`` is what the trainer needs to know of a
   data set (classes, image shape, splits, in memory or streamed); ``get_builder`` finds
   or prepares its TFDS builder; ``load_split`` reads a split into NumPy arrays.
2. :mod:`anp_jax.data.builders`: the project's own TFDS builders (``digits``,
   ``fashion_mnist``), built from files on the machine; the other sets are TFDS's.
3. :mod:`anp_jax.data.sources`: ``create_source(config, spec, num_devices,
   process_index, process_count)``, the one object the trainer reads batches from (in
   memory or a tf.data stream).
4. :mod:`anp_jax.data.augment`: pad/crop/flip on the device, inside the training step.

Each module depends only on those above it.  The names below are the public API::

    from anp_jax import data as data_lib
    spec = data_lib.get_spec("fashion_mnist")
    source = data_lib.create_source(config, spec)
"""

from anp_jax.data.registry import (
    CIFAR10_ALIASES,
    CIFAR10_CORRUPTIONS,
    DATASETS,
    IMAGENET_CORRUPTIONS,
    IMAGENET_TRAIN_TAR,
    IMAGENET_VAL_TAR,
    SEVERITIES,
    DatasetError,
    DatasetSpec,
    default_data_dir,
    describe_datasets,
    get_builder,
    get_spec,
    load_split,
    manual_dir,
    resolve_split,
)
from anp_jax.data.sources import (
    PIPELINES,
    InMemorySource,
    StreamingSource,
    create_source,
    eval_batches,
    steps_per_epoch,
    to_float,
    train_batch,
)

__all__ = [
    "CIFAR10_ALIASES", "CIFAR10_CORRUPTIONS", "DATASETS", "IMAGENET_CORRUPTIONS",
    "IMAGENET_TRAIN_TAR", "IMAGENET_VAL_TAR", "PIPELINES", "SEVERITIES", "DatasetError",
    "DatasetSpec", "InMemorySource", "StreamingSource", "create_source", "default_data_dir",
    "describe_datasets", "eval_batches", "get_builder", "get_spec", "load_split",
    "manual_dir", "resolve_split", "steps_per_epoch", "to_float", "train_batch",
]
