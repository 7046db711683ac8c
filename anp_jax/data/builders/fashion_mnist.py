"""Fashion-MNIST from its four original IDX files, as a TFDS data set (no download).

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 70,000 grey-scale 28x28 images of 10 clothing
classes, 60,000 for training and 10,000 for testing.  The files are read from
``<data_dir>/downloads/manual/`` (for users who downloaded the originals) or else from
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``); each
file may be gzipped or not.  Debian recompressed the originals, so the ``.gz`` files differ
from zalandoresearch's while their content does not: each file is checked against the
SHA-256 of its *uncompressed* content (``SHA256``).
"""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from anp_jax.data.builders.common import image_classification_info

# Where Debian's ``dataset-fashion-mnist`` puts the files; searched after the manual dir.
SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

# The IDX files of each split: (images, labels).
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# SHA-256 of the uncompressed content of the original files (zalandoresearch/fashion-mnist).
SHA256 = {
    "train-images-idx3-ubyte":
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte":
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte":
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte":
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

IMAGE_SHAPE = (28, 28)
_UBYTE = 0x08  # the IDX type code of unsigned bytes


class SourceFilesError(OSError):
    """A source file that is missing, damaged or not the original; the message is one line."""


def find_files(dirs: tuple[str, ...]) -> dict[str, str]:
    """The path of each of the four files: the first of ``dirs`` that has it, ``.gz`` or not.

    Raises :class:`SourceFilesError` naming the files that none of ``dirs`` holds.
    """
    found, missing = {}, []
    for name in SHA256:
        paths = [os.path.join(d, name + ext) for d in dirs for ext in ("", ".gz")]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise SourceFilesError(
            f"Fashion-MNIST file(s) {', '.join(missing)} (.gz or uncompressed) not found in "
            f"{' or '.join(dirs)}: run `apt-get install dataset-fashion-mnist`, or put the "
            f"four original IDX files in {dirs[0]}/")
    return found


def read_checked(path: str, name: str) -> bytes:
    """The uncompressed content of ``path``, checked against ``SHA256[name]``."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            content = f.read()
    except (OSError, EOFError) as err:
        raise SourceFilesError(f"{path}: cannot be read ({err})") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != SHA256[name]:
        raise SourceFilesError(
            f"{path}: wrong checksum: the SHA-256 of its uncompressed content is "
            f"{digest}, the original {name} has {SHA256[name]}; replace it with the "
            "original file")
    return content


def parse_idx(content: bytes, path: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions as a uint8 array.

    The format: two zero bytes, the type code (0x08: unsigned byte), the number of
    dimensions, one big-endian uint32 per dimension, then the values in C order.
    """
    if len(content) < 4 + 4 * ndim or content[:2] != b"\0\0" or content[2] != _UBYTE \
            or content[3] != ndim:
        raise SourceFilesError(f"{path}: not an IDX file of unsigned bytes with {ndim} "
                               "dimension(s)")
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", ndim, offset=4))
    values = np.frombuffer(content, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise SourceFilesError(f"{path}: {values.size} values for the IDX shape {shape}")
    return values.reshape(shape)


def read_split(paths: dict[str, str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, 28, 28, 1]`` and labels int64 ``[N]`` of ``split`` (checked)."""
    image_name, label_name = FILES[split]
    images = parse_idx(read_checked(paths[image_name], image_name), paths[image_name], 3)
    labels = parse_idx(read_checked(paths[label_name], label_name), paths[label_name], 1)
    if images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels) or \
            (labels.size and labels.max() >= len(CLASS_NAMES)):
        raise SourceFilesError(
            f"{paths[image_name]}, {paths[label_name]}: {images.shape} images and "
            f"{labels.shape} labels, expected [N, 28, 28] and N labels below 10")
    return images[..., None], labels.astype(np.int64)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from the original IDX files on this machine.

    60,000 training and 10,000 test images, uint8 ``[28, 28, 1]``, labels 0..9 named by
    ``CLASS_NAMES``.  Registered with TFDS as ``fashion_mnist_idx`` (TFDS's own
    ``fashion_mnist`` downloads the files and checks the gzipped bytes, which Debian's
    recompressed files fail); the project's data set is ``config.dataset="fashion_mnist"``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return image_classification_info(
            self, "Fashion-MNIST: 28x28 grey-scale images of 10 clothing classes.",
            IMAGE_SHAPE + (1,), tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "https://github.com/zalandoresearch/fashion-mnist")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # TFDS's manual dir (``<data_dir>/downloads/manual``), then Debian's location.
        manual = os.path.join(os.fspath(dl_manager.download_dir), "manual")
        paths = find_files((manual, *SYSTEM_DIRS))
        # Read and check everything before TFDS writes anything.
        splits = {split: read_split(paths, split) for split in FILES}
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": int(label)}
