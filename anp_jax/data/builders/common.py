"""What the project's TFDS builders share."""

from __future__ import annotations

import tensorflow_datasets as tfds


def image_classification_info(builder: tfds.core.DatasetBuilder, description: str,
                              shape: tuple[int, int, int], label: tfds.features.ClassLabel,
                              homepage: str) -> tfds.core.DatasetInfo:
    """The ``DatasetInfo`` of an ``{"image": uint8 [H, W, C], "label": class}`` data set,
    supervised as ``(image, label)``."""
    return tfds.core.DatasetInfo(
        builder=builder, description=description,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=shape),
                                             "label": label}),
        supervised_keys=("image", "label"), homepage=homepage)
