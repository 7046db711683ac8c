"""scikit-learn's bundled handwritten digits as a TFDS data set (no download needed)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from anp_jax.data.builders.common import image_classification_info

# A fixed, stratified split: 20% of every class goes to the test split.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of a stratified split, the same on every machine."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(TEST_FRACTION * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class Digits(tfds.core.GeneratorBasedBuilder):
    """8x8 grey-scale handwritten digits (UCI, as bundled with scikit-learn).

    1,797 images, 10 classes; pixel values 0..16 are rescaled to 0..255.
    Splits: ``train`` (1,438 images) and ``test`` (359 images), stratified.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return image_classification_info(
            self, "scikit-learn's bundled 8x8 handwritten digits.", (8, 8, 1),
            tfds.features.ClassLabel(num_classes=10),
            "https://scikit-learn.org/stable/datasets/toy_dataset.html")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        train, test = split_indices(labels)
        return {
            "train": self._generate_examples(images[train], labels[train], train),
            "test": self._generate_examples(images[test], labels[test], test),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                           indices: np.ndarray):
        for image, label, index in zip(images, labels, indices):
            yield int(index), {"image": image, "label": int(label)}
