"""Data sets through TFDS and the host-side input pipeline.

Every data set, the embedded digits included, is read through a TFDS builder.  Splits that
fit in host memory are read once into NumPy arrays; the training stream is then a pure
function of ``(seed, epoch, batch index)`` (a fresh permutation per epoch, the last partial
batch dropped so that the noise registers keep one shape), which makes the data position a
single integer that a checkpoint can store.  Evaluation covers the whole split: the last
batch is padded and masked, never dropped.

Batches are ``{"image": float32 [..., H, W, C] in [0, 1], "label": int32 [...]}``; for
pmap the leading axes are ``[devices, per_device_batch]``.  With several processes, each
reads only its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np


class DatasetError(Exception):
    """A data set that cannot be found or read; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the trainer needs to know of a data set."""

    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_split: str = "train"
    test_split: str = "test"
    embedded: bool = False  # built locally, no download


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, (8, 8, 1), embedded=True),
    "mnist": DatasetSpec("mnist", 10, (28, 28, 1)),
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3)),
}


def default_data_dir() -> str:
    """TFDS's data directory: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return DATASETS[name]


def _builder(name: str, data_dir: str | None, download: bool):
    import tensorflow_datasets as tfds

    spec = get_spec(name)
    data_dir = data_dir or default_data_dir()
    if spec.embedded:
        from anp_jax import datasets  # registers the project's builders

        builder = {"digits": datasets.Digits}[name](data_dir=data_dir)
    else:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if spec.embedded or download:
        try:
            builder.download_and_prepare()
        except Exception as err:  # a failed download: report it in one line
            raise DatasetError(f"dataset {name!r} could not be prepared in {data_dir}: "
                               f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
        return builder
    raise DatasetError(
        f"dataset {name!r} not found in {data_dir} (TFDS name {spec.tfds_name!r}); "
        f"prepare it with `tfds build {spec.tfds_name} --data_dir={data_dir}` on a machine "
        "with internet, or pass --config.download=True")


def load_split(name: str, split: str, data_dir: str | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split: ``images`` uint8 ``[N, H, W, C]`` and ``labels`` int32 ``[N]``."""
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir, download)
    if split not in builder.info.splits:
        raise DatasetError(f"dataset {name!r} has no split {split!r}; "
                           f"it has: {', '.join(builder.info.splits)}")
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int32)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1]."""
    return images.astype(np.float32) / 255.0


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full batches per epoch (the remainder is dropped)."""
    return num_examples // global_batch


def train_batch(images: np.ndarray, labels: np.ndarray, seed: int, index: int,
                global_batch: int, num_devices: int, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
    """Global training batch number ``index`` (counted from the start of training).

    Each epoch is a fresh permutation of the split, drawn from ``(seed, epoch)``.  Returns
    this process's slice, shaped ``[num_devices, per_device_batch, ...]``.
    """
    per_epoch = steps_per_epoch(len(images), global_batch)
    epoch, position = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
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
