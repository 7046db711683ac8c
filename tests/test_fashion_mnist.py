"""Fashion-MNIST through the project's TFDS builder, on small IDX files written here.

The tests never read the real files: the builder's system directory is pointed at a
temporary one and the expected SHA-256 digests are those of the files the tests write.
"""

import gzip
import hashlib
import os
import re

import numpy as np
import pytest

from anp_jax import data as data_lib
from anp_jax.data.builders import fashion_mnist as fm

# The published class names (zalandoresearch/fashion-mnist README), in label order.
PUBLISHED_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
N_TRAIN, N_TEST = 30, 12


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format written by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_split(n, offset, seed):
    """Images whose pixels (0, 0) and (0, 1) hold their index; labels index % 10."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1] = ids % 256, ids // 256
    return images, (ids % 10).astype(np.uint8)


def write_files(directory, gzipped=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
    """The four files (those in ``gzipped`` as .gz); returns the arrays and the SHA-256 of
    each file's uncompressed content."""
    os.makedirs(directory, exist_ok=True)
    train, test = make_split(N_TRAIN, 0, 0), make_split(N_TEST, N_TRAIN, 1)
    arrays = {"train-images-idx3-ubyte": train[0], "train-labels-idx1-ubyte": train[1],
              "t10k-images-idx3-ubyte": test[0], "t10k-labels-idx1-ubyte": test[1]}
    digests = {}
    for name, array in arrays.items():
        content = idx_bytes(array)
        digests[name] = hashlib.sha256(content).hexdigest()
        if name in gzipped:
            with gzip.open(os.path.join(directory, name + ".gz"), "wb") as f:
                f.write(content)
        else:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)
    return {"train": train, "test": test}, digests


@pytest.fixture
def system_dir(tmp_path, monkeypatch):
    """An empty stand-in for /usr/share/datasets/fashion-mnist."""
    path = tmp_path / "system"
    path.mkdir()
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (str(path),))
    return str(path)


def check_split(data_dir, split, want):
    x, y = data_lib.load_split("fashion_mnist", split, data_dir)
    images, labels = want
    assert x.shape == (len(images), 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    ids = x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 1, 0].astype(int)
    order = np.argsort(ids)
    offset = 0 if split == "train" else N_TRAIN
    np.testing.assert_array_equal(ids[order], offset + np.arange(len(images)))
    np.testing.assert_array_equal(x[order, ..., 0], images)  # pixel for pixel
    np.testing.assert_array_equal(y[order], labels)


def test_registry_and_class_names():
    spec = data_lib.get_spec("fashion_mnist")
    assert (spec.num_classes, spec.image_shape, spec.train_split, spec.test_split) == \
        (10, (28, 28, 1), "train", "test")
    assert spec.embedded and not spec.streaming
    assert list(fm.CLASS_NAMES) == PUBLISHED_NAMES


def test_manual_dir_gz_and_plain(tmp_path, system_dir, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    want, digests = write_files(data_lib.manual_dir(data_dir))
    monkeypatch.setattr(fm, "SHA256", digests)
    for split in ("train", "test"):
        check_split(data_dir, split, want[split])
    builder = data_lib.get_builder("fashion_mnist", data_dir)
    assert builder.info.features["label"].names == PUBLISHED_NAMES
    assert builder.info.splits["train"].num_examples == N_TRAIN


def test_system_dir_and_manual_dir_first(tmp_path, system_dir, monkeypatch):
    """The files from the system directory (Debian's); a file in the manual dir wins."""
    want, digests = write_files(system_dir, gzipped=tuple(fm.SHA256))  # all .gz, as Debian
    monkeypatch.setattr(fm, "SHA256", digests)
    data_dir = str(tmp_path / "tfds")
    manual = data_lib.manual_dir(data_dir)
    os.makedirs(manual)
    # A bad copy of one file in the system dir: the good one in the manual dir is used.
    good = os.path.join(system_dir, "t10k-images-idx3-ubyte.gz")
    os.replace(good, os.path.join(manual, "t10k-images-idx3-ubyte.gz"))
    with open(good, "wb") as f:
        f.write(b"not the file")
    check_split(data_dir, "test", want["test"])
    check_split(data_dir, "train", want["train"])


def test_missing_files_is_one_line(tmp_path, system_dir):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(data_lib.DatasetError) as err:
        data_lib.load_split("fashion_mnist", "train", data_dir)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    assert "'fashion_mnist'" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert data_lib.manual_dir(data_dir) in msg and system_dir in msg
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert not os.path.exists(os.path.join(data_dir, "fashion_mnist_idx", "1.0.0"))  # no data


def test_wrong_checksum_is_one_line(tmp_path, system_dir, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    _, digests = write_files(data_lib.manual_dir(data_dir))
    # The labels file as the test wrote it, but expected with another digest.
    wrong = hashlib.sha256(b"another file").hexdigest()
    monkeypatch.setattr(fm, "SHA256", dict(digests, **{"train-labels-idx1-ubyte": wrong}))
    with pytest.raises(data_lib.DatasetError) as err:
        data_lib.load_split("fashion_mnist", "test", data_dir)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    path = os.path.join(data_lib.manual_dir(data_dir), "train-labels-idx1-ubyte")
    assert f"{path}: wrong checksum" in msg
    assert digests["train-labels-idx1-ubyte"] in msg and wrong in msg
    assert not os.path.exists(os.path.join(data_dir, "fashion_mnist_idx", "1.0.0"))


@pytest.mark.parametrize("content, needle", [
    (bytes([0, 0, 0x08, 1]), "not an IDX file"),  # labels header where images belong
    (bytes([0, 0, 0x0D, 3]) + bytes(12), "not an IDX file"),  # float32, not ubyte
    (bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
     + bytes(100), "100 values for the IDX shape (2, 28, 28)"),
])
def test_parse_idx_rejects_bad_files(content, needle):
    with pytest.raises(fm.SourceFilesError, match=re.escape(needle)):
        fm.parse_idx(content, "f", 3)


def test_parse_idx_reads_the_format():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fm.parse_idx(idx_bytes(array), "f", 3), array)
