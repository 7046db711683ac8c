"""Data sets through TFDS's real builders, the input pipelines and the experiment configs.

Everything is offline.  The tests write small data sets in the original on-disk formats and
run TFDS's own builders on them:

* CIFAR-10: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin`` (records of
  1 label byte + 3072 pixel bytes, planes R, G, B) and ``batches.meta.txt``; TFDS's
  ``cifar10`` builder runs with ``DownloadManager.download_and_extract`` patched to return
  that directory (as TFDS's own builder tests do).
* CIFAR-10-C: ``CIFAR-10-C/gaussian_noise.npy`` (5 severities stacked) and ``labels.npy``,
  through TFDS's ``cifar10_corrupted`` builder the same way.
* Fashion-MNIST: the four IDX files (``tests/test_fashion_mnist.py`` writes them) in
  ``<data_dir>/downloads/manual/``, through the project's builder, checked against their
  own SHA-256 digests.
* ImageNet: ``ILSVRC2012_img_train.tar`` (one tar of JPEGs per synset) and
  ``ILSVRC2012_img_val.tar`` in ``<data_dir>/downloads/manual/``, prepared by TFDS's
  ``imagenet2012`` builder through ``anp_jax.data`` with ``download=True``, exactly the path
  a user takes.

Each CIFAR image carries its own index in two pixels, so the tests can tell examples apart
after shuffling, sharding and padding.
"""

import importlib.util
import io
import os
import tarfile
from unittest import mock

import jax
import numpy as np
import pytest
from procs import ROOT, with_repo_on_path, xla_flags
from test_fashion_mnist import N_TEST as N_FASHION_TEST
from test_fashion_mnist import N_TRAIN as N_FASHION_TRAIN
from test_fashion_mnist import write_files as write_fashion_mnist

from anp_jax import cli, trainer
from anp_jax import data as data_lib
from anp_jax import train as train_lib
from anp_jax.configs.default import get_config as default_config
from anp_jax.data import augment
from anp_jax.data import sources as ip
from anp_jax.data.builders import fashion_mnist
from anp_jax.models import create_model

CONFIGS = ("mnist_lenet", "cifar10_vgg16", "cifar10_resnet18", "imagenet_resnet50",
           "fashion_lenet", "fashion_vgg")
N_PER_FILE, N_TEST, N_VAL = 20, 31, 10  # CIFAR: 5 x 20 training, 31 test images
WNIDS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet classes: 0, 1, 2


# ---------------------------------------------------------------------------------------
# Small data sets in the original formats


def write_cifar10(root, seed=0):
    """CIFAR-10 binary batches; returns (train images, train labels, test images, labels)."""
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n")
    rng = np.random.default_rng(seed)
    files = [(f"data_batch_{i}.bin", N_PER_FILE) for i in range(1, 6)]
    out, idx = {}, 0
    for fname, n in files + [("test_batch.bin", N_TEST)]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        ids = np.arange(idx, idx + n)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
        labels = (ids * 7 % 10).astype(np.uint8)
        records = np.concatenate(
            [labels[:, None], images.transpose(0, 3, 1, 2).reshape(n, 3072)], axis=1)
        with open(os.path.join(d, fname), "wb") as f:
            f.write(records.astype(np.uint8).tobytes())
        out[fname] = (images, labels.astype(np.int32))
        idx += n
    train = [out[f] for f, _ in files]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            *out["test_batch.bin"])


def write_cifar10_c(root, test_labels, seed=1):
    """``CIFAR-10-C/gaussian_noise.npy`` (5 severities of the test images) and labels."""
    d = os.path.join(root, "CIFAR-10-C")
    os.makedirs(d, exist_ok=True)
    images = np.random.default_rng(seed).integers(0, 256, (5 * N_TEST, 32, 32, 3), np.uint8)
    np.save(os.path.join(d, "gaussian_noise.npy"), images)
    np.save(os.path.join(d, "labels.npy"), np.tile(test_labels, 5).astype(np.uint8))
    return images


def _jpeg(rng, h, w):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_imagenet(manual, per_class=6, seed=0):
    """The two ImageNet tar files as distributed, with a few small JPEGs of random sizes."""
    os.makedirs(manual, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = lambda: (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    with tarfile.open(os.path.join(manual, data_lib.IMAGENET_TRAIN_TAR), "w") as outer:
        for wnid in WNIDS:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in range(per_class):
                    _add(inner, f"{wnid}_{k}.JPEG", _jpeg(rng, *size()))
            _add(outer, f"{wnid}.tar", buf.getvalue())
    with tarfile.open(os.path.join(manual, data_lib.IMAGENET_VAL_TAR), "w") as tar:
        for k in range(1, N_VAL + 1):
            _add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", _jpeg(rng, *size()))


def write_mnist(root, n_train=40, n_test=12, seed=2):
    """MNIST's IDX files (as ``download_and_extract`` leaves them: un-gzipped)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        paths[f"{split}_data"] = os.path.join(root, f"{split}-images-idx3-ubyte")
        paths[f"{split}_labels"] = os.path.join(root, f"{split}-labels-idx1-ubyte")
        header = np.array([2051, n, 28, 28], ">u4").tobytes()
        with open(paths[f"{split}_data"], "wb") as f:
            f.write(header + images.tobytes())
        with open(paths[f"{split}_labels"], "wb") as f:
            f.write(np.array([2049, n], ">u4").tobytes() + labels.tobytes())
    return paths


def prepare_with_local_files(name, data_dir, src):
    """Runs TFDS's builder ``name`` with its download replaced by the local ``src``."""
    import tensorflow_datasets as tfds

    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           lambda self, url: src):
        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_data")
    src, tfds_dir = str(root / "src"), str(root / "tfds")
    train_x, train_y, test_x, test_y = write_cifar10(src)
    corrupted = write_cifar10_c(src, test_y)
    prepare_with_local_files("cifar10", tfds_dir, src)
    prepare_with_local_files("cifar10_corrupted/gaussian_noise_3", tfds_dir, src)
    from tensorflow_datasets.image_classification import mnist

    with mock.patch.multiple(mnist, _TRAIN_EXAMPLES=40, _TEST_EXAMPLES=12):
        prepare_with_local_files("mnist", tfds_dir, write_mnist(str(root / "mnist")))
    write_imagenet(data_lib.manual_dir(tfds_dir))
    data_lib.get_builder("imagenet2012", tfds_dir, download=True)  # the user's way
    _, digests = write_fashion_mnist(data_lib.manual_dir(tfds_dir))
    with mock.patch.dict(fashion_mnist.SHA256, digests), \
            mock.patch.object(fashion_mnist, "SYSTEM_DIRS", ()):  # not the real files
        data_lib.get_builder("fashion_mnist", tfds_dir)
    return {"dir": tfds_dir, "train": (train_x, train_y), "test": (test_x, test_y),
            "corrupted": corrupted}


def ids_of(images):
    """The index written into each CIFAR image (images float in [0, 1] or uint8)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round(images * 255).astype(np.int64)
    return images[..., 0, 0, 0].astype(np.int64) + 256 * images[..., 0, 0, 1].astype(np.int64)


def cfg(dataset="cifar10", data_dir="", batch=8, eval_batch=16, seed=0, **fields):
    config = default_config()
    config.dataset, config.data_dir = dataset, data_dir
    config.batch_size, config.eval.batch_size, config.seed = batch, eval_batch, seed
    config.num_epochs = 3
    for key, value in fields.items():
        config[key] = value
    return config


def source(fake, dataset="cifar10", num_devices=2, process_index=0, process_count=1,
           **fields):
    return ip.create_source(cfg(dataset, fake["dir"], **fields), num_devices=num_devices,
                            process_index=process_index, process_count=process_count)


# ---------------------------------------------------------------------------------------
# Registry and errors


def test_registry_covers_the_tfds_configs():
    import tensorflow_datasets as tfds

    spec = data_lib.get_spec("imagenet2012")
    assert (spec.num_classes, spec.image_shape, spec.train_split, spec.test_split) == \
        (1000, (224, 224, 3), "train", "validation")
    assert spec.streaming and spec.manual_files == ("ILSVRC2012_img_train.tar",
                                                    "ILSVRC2012_img_val.tar")
    assert data_lib.get_spec("mnist").image_shape == (28, 28, 1)
    assert data_lib.get_spec("cifar10").image_shape == (32, 32, 3)
    for family, corruptions in (("cifar10_corrupted", data_lib.CIFAR10_CORRUPTIONS),
                                ("imagenet2012_corrupted", data_lib.IMAGENET_CORRUPTIONS)):
        tfds_configs = {c.name for c in tfds.builder_cls(family).BUILDER_CONFIGS}
        ours = {n for n in data_lib.DATASETS if n.startswith(family + "/")}
        assert len(corruptions) == 19 and len(tfds_configs) == 95
        # Every corruption and severity, and every name maps to a real TFDS config.
        assert {f"{family}/{c}" for c in tfds_configs} <= ours
        assert {data_lib.DATASETS[n].tfds_name.split("/")[1] for n in ours} == tfds_configs
    glass = data_lib.get_spec("cifar10_corrupted/glass_blur_2")  # project name as alias
    assert glass.tfds_name == "cifar10_corrupted/frosted_glass_blur_2"
    assert data_lib.resolve_split("cifar10_corrupted/fog_1", "train") == ("cifar10", "train")
    assert data_lib.resolve_split("cifar10_corrupted/fog_1", "test") == \
        ("cifar10_corrupted/fog_1", "test")
    assert data_lib.resolve_split("imagenet2012_corrupted/fog_1", "train") == \
        ("imagenet2012", "train")


@pytest.mark.parametrize("name, hint", [
    ("cifa10", "did you mean 'cifar10'"),
    ("cifar10_corrupted/fog_9", "<severity 1-5>"),
    ("cifar10_corrupted/rain_1", "frosted_glass_blur"),
])
def test_unknown_dataset_is_one_line(name, hint):
    with pytest.raises(data_lib.DatasetError) as err:
        data_lib.get_spec(name)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and name in msg and hint in msg


@pytest.mark.parametrize("name, split, needles", [
    ("mnist", "train", ["'mnist'", "tfds build mnist", "train-images-idx3-ubyte.gz"]),
    ("cifar10", "test", ["'cifar10'", "tfds build cifar10", "cifar-10-binary.tar.gz",
                         "cifar10/3.0.2"]),
    ("cifar10_corrupted/gaussian_noise_3", "test",
     ["'cifar10_corrupted/gaussian_noise_3'", "CIFAR-10-C.tar"]),
    ("cifar10_corrupted/gaussian_noise_3", "train",
     ["'cifar10' (the training split of 'cifar10_corrupted/gaussian_noise_3')"]),
    ("imagenet2012", "train", ["'imagenet2012'", "downloads/manual/",
                               "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
                               "image-net.org"]),
    ("imagenet2012_corrupted/fog_2", "validation",
     ["'imagenet2012_corrupted/fog_2'", "ILSVRC2012_img_val.tar", "frost"]),
])
def test_missing_dataset_says_which_where_and_how(tmp_path, name, split, needles):
    empty = str(tmp_path / "empty")
    with pytest.raises(data_lib.DatasetError) as err:
        data_lib.load_split(name, split, empty)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    assert f"not found in {empty}" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert not os.listdir(tmp_path)  # looking does not create anything


def test_imagenet_download_without_archives_is_one_line(tmp_path):
    with pytest.raises(data_lib.DatasetError) as err:
        data_lib.get_builder("imagenet2012", str(tmp_path), download=True)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert "could not be prepared" in msg and data_lib.manual_dir(str(tmp_path)) in msg


def test_a_copy_prepared_meanwhile_by_another_job_is_used(tmp_path):
    """Jobs started together on a fresh data_dir: the one whose copy TFDS cannot move into
    place (another job's is there) reads that copy instead of failing."""
    from anp_jax.data.builders import Digits

    data_dir = str(tmp_path)
    prepare = Digits.download_and_prepare

    def beaten(self, **kwargs):
        prepare(Digits(data_dir=data_dir), **kwargs)  # the other job finishes first
        raise FileExistsError(f"Cannot rename {data_dir}/digits/incomplete.X_1.0.0. "
                              f"Destination {data_dir}/digits/1.0.0 already exists.")

    with mock.patch.object(Digits, "download_and_prepare", beaten):
        images, labels = data_lib.load_split("digits", "test", data_dir)
    assert images.shape == (359, 8, 8, 1) and labels.shape == (359,)
    with mock.patch.object(Digits, "download_and_prepare",
                           side_effect=OSError("disk full")), pytest.raises(
            data_lib.DatasetError, match="could not be prepared.*disk full"):
        data_lib.load_split("digits", "test", str(tmp_path / "other"))


# ---------------------------------------------------------------------------------------
# The real builders on real-format files


def test_cifar10_through_tfds_builder(fake):
    train_x, train_y, test_x, test_y = (*fake["train"], *fake["test"])
    for split, (want_x, want_y) in (("train", (train_x, train_y)), ("test", (test_x, test_y))):
        x, y = data_lib.load_split("cifar10", split, fake["dir"])
        assert x.shape == want_x.shape and x.dtype == np.uint8 and y.dtype == np.int32
        order = np.argsort(ids_of(x))
        base = 0 if split == "train" else len(train_x)
        np.testing.assert_array_equal(ids_of(x)[order], base + np.arange(len(want_x)))
        np.testing.assert_array_equal(x[order], want_x)  # pixel for pixel, RGB order
        np.testing.assert_array_equal(y[order], want_y)


def test_cifar10_corrupted_trains_on_cifar10(fake):
    x, _ = data_lib.load_split("cifar10_corrupted/gaussian_noise_3", "train", fake["dir"])
    assert sorted(ids_of(x)) == list(range(5 * N_PER_FILE))  # CIFAR-10's training split
    x, y = data_lib.load_split("cifar10_corrupted/gaussian_noise_3", "test", fake["dir"])
    severity3 = fake["corrupted"][2 * N_TEST:3 * N_TEST]
    assert x.shape == (N_TEST, 32, 32, 3)
    assert sorted(map(bytes, x)) == sorted(map(bytes, severity3))
    assert sorted(y) == sorted(fake["test"][1])


def test_report_evaluates_prepared_cifar10_c(fake):
    """The report's TFDS CIFAR-10-C section: accuracy on each prepared set equals the
    model's accuracy on the original .npy images, computed directly; the rest is listed
    as not prepared."""
    from anp_jax.evaluation import Model, Runner
    from anp_jax.evaluation import corruptions as corruption_eval

    model = create_model("digits_cnn", num_classes=10)
    x0 = np.zeros((1, 32, 32, 3), np.float32)
    variables = dict(model.init(jax.random.PRNGKey(3), x0, train=False))
    test_x, test_y = fake["test"]

    def make_runner(images, labels):
        return Runner(list(data_lib.eval_batches(images, labels, 8, 2)),
                      devices=jax.local_devices()[:2])

    out = corruption_eval.tfds_accuracies(Model.from_module(model, variables),
                                          ["gaussian_noise", "fog"], (2, 3), make_runner,
                                          data_dir=fake["dir"])
    assert sorted(out["unavailable"]) == ["fog_2", "fog_3", "gaussian_noise_2"]
    images = fake["corrupted"][2 * N_TEST:3 * N_TEST].astype(np.float32) / 255
    pred = np.argmax(model.apply(variables, images, train=False), -1)
    expected = float(np.mean(pred == test_y))  # labels.npy holds the test labels per severity
    assert out["accuracy"] == {"gaussian_noise_3": pytest.approx(expected, abs=1e-6)}
    assert out["mean_accuracy"] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------
# Pipelines


def check_batch(batch, lead, image_shape):
    assert batch["image"].shape == lead + image_shape and batch["image"].dtype == np.float32
    assert batch["label"].shape == lead and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def epoch_ids(src, epoch=0):
    steps = src.steps_per_epoch
    return np.concatenate([ids_of(src.train_batch(i)["image"]).ravel()
                           for i in range(epoch * steps, (epoch + 1) * steps)])


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_train_batches(fake, pipeline):
    src = source(fake, input_pipeline=pipeline)
    assert type(src).__name__ == {"memory": "InMemorySource", "stream": "StreamingSource"}[
        pipeline]
    assert (src.num_train_examples, src.steps_per_epoch, src.image_shape) == \
        (100, 12, (32, 32, 3))
    batch = src.train_batch(0)
    check_batch(batch, (2, 4), (32, 32, 3))
    train_x, train_y = fake["train"]
    ids = ids_of(batch["image"])  # the pixels and labels are those of the files
    np.testing.assert_allclose(batch["image"], train_x[ids] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], train_y[ids])
    # One epoch: distinct examples, 96 of the 100 (the remainder is dropped).
    first = epoch_ids(src)
    assert len(set(first)) == len(first) == 96
    assert list(epoch_ids(src, 1)) != list(first)  # reshuffled every epoch
    # Determinism: a fresh source (a resumed run) at batch 17 gives the same batch.
    later = src.train_batch(17)
    fresh = source(fake, input_pipeline=pipeline)
    for key in ("image", "label"):
        np.testing.assert_array_equal(fresh.train_batch(17)[key], later[key])
    other = source(fake, input_pipeline=pipeline, seed=1)
    assert not np.array_equal(other.train_batch(0)["label"], batch["label"]) or \
        not np.array_equal(other.train_batch(0)["image"], batch["image"])


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_process_shards_are_disjoint_and_cover_the_split(fake, pipeline):
    # 2 processes, global batch 10: 5 per process, 10 steps, 50 examples per process.
    shards = [source(fake, num_devices=1, process_index=p, process_count=2, batch=10,
                     input_pipeline=pipeline) for p in range(2)]
    seen = [epoch_ids(s) for s in shards]
    assert all(s.steps_per_epoch == 10 for s in shards)
    assert all(len(set(ids)) == len(ids) == 50 for ids in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(100))
    check_batch(shards[1].train_batch(3), (1, 5), (32, 32, 3))


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
@pytest.mark.parametrize("process_count, eval_batch", [(1, 8), (3, 15), (3, 12)])
def test_eval_counts_every_example_once(fake, pipeline, process_count, eval_batch):
    counted, batches = [], []
    test_x, test_y = fake["test"]
    for p in range(process_count):
        src = source(fake, num_devices=1, process_index=p, process_count=process_count,
                     eval_batch=eval_batch, batch=process_count, input_pipeline=pipeline)
        got = list(src.eval_batches())
        batches.append(len(got))
        for b in got:
            local = eval_batch // process_count
            assert b["image"].shape == (1, local, 32, 32, 3) and b["mask"].dtype == bool
            assert b["image"].dtype == np.float32
            ids = ids_of(b["image"])[b["mask"]]
            np.testing.assert_array_equal(b["label"][b["mask"]], test_y[ids - 100])
            counted.extend(ids)
    assert len(set(batches)) == 1  # the same number of batches on every process
    assert sorted(counted) == list(range(100, 100 + N_TEST))


def test_imagenet_stream(fake):
    src = source(fake, "imagenet2012", image_size=32, batch=4, eval_batch=4)
    assert (src.num_train_examples, src.num_eval_examples, src.image_shape) == \
        (18, N_VAL, (32, 32, 3))
    assert src.steps_per_epoch == 4 and src.spec.num_classes == 1000
    batch = src.train_batch(0)
    check_batch(batch, (2, 2), (32, 32, 3))
    assert set(np.unique([src.train_batch(i)["label"] for i in range(4)])) == {0, 1, 2}
    assert batch["image"].std() > 0.05  # real pixels, not padding
    # Random-resized crops are drawn per example from the seed: a fresh source agrees,
    # the next epoch differs.
    fresh = source(fake, "imagenet2012", image_size=32, batch=4, eval_batch=4)
    np.testing.assert_array_equal(fresh.train_batch(5)["image"], src.train_batch(5)["image"])
    np.testing.assert_array_equal(fresh.train_batch(0)["image"], batch["image"])
    assert not np.array_equal(src.train_batch(4)["image"], batch["image"])
    evals = list(src.eval_batches())
    assert [int(b["mask"].sum()) for b in evals] == [4, 4, 2]
    again = list(src.eval_batches())
    for a, b in zip(evals, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["image"].shape == (2, 2, 32, 32, 3) and 0 <= a["image"].min() <= 1
    # Full size, as the ResNet-50 config uses it.
    full = source(fake, "imagenet2012", batch=2, eval_batch=2, num_devices=1)
    check_batch(full.train_batch(0), (1, 2), (224, 224, 3))


def test_imagenet_corrupted_trains_on_imagenet(fake):
    # ImageNet-C is not prepared (it needs the frost images from GitHub): a clear message.
    with pytest.raises(data_lib.DatasetError) as err:
        source(fake, "imagenet2012_corrupted/fog_2")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "'imagenet2012_corrupted/fog_2'" in msg


def test_train_iter_prefetches_to_devices(fake):
    src = source(fake, num_devices=2)
    devices = jax.local_devices()[:2]
    it = src.train_iter(3, prefetch=2, devices=devices)
    first = next(it)
    assert isinstance(first["image"], jax.Array) and first["image"].shape == (2, 4, 32, 32, 3)
    assert {s.device for s in first["image"].addressable_shards} == set(devices)
    np.testing.assert_array_equal(np.asarray(first["label"]), src.train_batch(3)["label"])


def test_trainer_recipe(fake):
    """The calls the trainer makes (source, state, pmapped step with augmentation, eval),
    in a fresh process (see ``run_main``)."""
    out = run_main("recipe", fake["dir"])
    assert out["eval_examples"] == N_TEST and out["finite"]
    assert out["image_shape"] == [2, 4, 32, 32, 3]


# ---------------------------------------------------------------------------------------
# Experiment configs


def load_config(name):
    path = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(), path


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
    config, _ = load_config(name)
    trainer.validate_config(config)
    assert set(default_config().keys()) <= set(config.keys())  # same field names
    assert config.augment in augment.AUGMENTATIONS
    assert config.input_pipeline in ip.PIPELINES
    spec = data_lib.get_spec(config.dataset)
    if name == "cifar10_vgg16":
        assert (config.model, config.anp.schedule, config.num_epochs, config.optimizer,
                config.learning_rate, config.momentum, config.weight_decay,
                config.lr_schedule, config.lr_decay_epochs, config.lr_decay_factor,
                config.batch_size, config.anp.layers, config.augment) == \
            ("vgg16", "official", 120, "sgd", 0.05, 0.9, 5e-4, "step", 30, 0.1, 128, "all",
             "pad_crop_flip")
    if name == "imagenet_resnet50":
        assert spec.streaming and spec.num_classes == 1000 and config.batch_size >= 1024


@pytest.mark.parametrize("name", CONFIGS)
def test_config_without_data_fails_in_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())  # as if Debian's files were not here
    config, path = load_config(name)
    empty = tmp_path / "no_data"
    rc = cli.main(["train", f"--workdir={tmp_path / 'run'}", f"--config={path}",
                   f"--config.data_dir={empty}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("anp-jax: error: dataset"), err
    assert f"'{config.dataset}'" in err[0] and str(empty) in err[0]
    if config.dataset == "imagenet2012":
        assert "downloads/manual/" in err[0] and "ILSVRC2012_img_train.tar" in err[0]


def test_mnist_through_tfds_builder(fake):
    x, y = data_lib.load_split("mnist", "train", fake["dir"])
    assert x.shape == (40, 28, 28, 1) and x.dtype == np.uint8 and y.max() < 10
    src = source(fake, "mnist")
    check_batch(src.train_batch(0), (2, 4), (28, 28, 1))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_first_steps(name, fake, tmp_path):
    """Each config trains on CPU, in a fresh process, on small data of the right shape:
    the fake MNIST and CIFAR-10 through TFDS's builders; for ImageNet the fake JPEGs through
    the tf.data stream (random-resized crops of 32x32: 224x224 ResNet-50 is too slow for 2
    CPU cores), evaluated on every validation image."""
    steps = 2 if name == "mnist_lenet" else 1
    out = run_main("start", name, fake["dir"], str(tmp_path / "run"), str(steps))
    assert out["batches"] == steps and out["finite"]
    assert out["num_test_examples"] == {"mnist_lenet": 12, "imagenet_resnet50": N_VAL,
                                        "fashion_lenet": N_FASHION_TEST,
                                        "fashion_vgg": N_FASHION_TEST}.get(name, N_TEST)


# ---------------------------------------------------------------------------------------
# Runs in a fresh process: two CPU devices, and XLA's quick compilation (the models are
# compiled, not optimised: VGG-16 and the ResNets compile several times faster on CPU).

FAST_XLA = xla_flags(2, "--xla_backend_optimization_level=0",
                     "--xla_llvm_disable_expensive_passes=true")


def run_main(*args, timeout=600):
    import json
    import subprocess
    import sys

    env = with_repo_on_path(dict(os.environ, XLA_FLAGS=FAST_XLA, TF_CPP_MIN_LOG_LEVEL="3"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main_start(name, data_dir, workdir, steps):
    config, _ = load_config(name)
    with config.unlocked():
        config.data_dir = data_dir
        config.batch_size, config.eval.batch_size = 8, 16
        config.num_devices = 2  # with one of several, flax's unreplicate keeps the axis
        config.eval.attacks, config.eval.corruptions = (), ()
        if config.dataset == "imagenet2012":
            config.image_size = 32  # the real stream, cropped small: ResNet-50 on 2 cores
    n_train = {"mnist": 40, "cifar10": 100, "imagenet2012": 6 * len(WNIDS),
               "fashion_mnist": N_FASHION_TRAIN}[config.dataset]
    with config.ignore_type():
        config.num_epochs = int(steps) / (n_train // config.batch_size)
    metrics = trainer.train_and_evaluate(config, workdir, log=lambda m: None, progress=False)
    if config.dataset == "cifar10":  # the config's own input path and augmentation
        src = ip.create_source(config, process_index=0, process_count=1)
        out = augment.get(config.augment)(jax.random.PRNGKey(0), src.train_batch(0)["image"])
        assert out.shape == (2, 4, 32, 32, 3)
    return {"batches": metrics["batches"], "finite": bool(np.isfinite(
        metrics["final_train_loss"])), "num_test_examples": metrics["num_test_examples"]}


def _main_recipe(data_dir):
    from flax import jax_utils

    config = cfg("cifar10", data_dir, batch=8, model="lenet", augment="pad_crop_flip",
                 input_pipeline="stream")
    devices = jax.local_devices()[:2]
    src = ip.create_source(config, num_devices=len(devices), process_index=0,
                           process_count=1)
    model = create_model(config.model, num_classes=src.spec.num_classes, axis_name="batch")
    state = train_lib.create_train_state(
        model, jax.random.PRNGKey(0), (src.per_device_batch_size,) + src.image_shape,
        train_lib.make_optimizer("sgd"))
    state = jax_utils.replicate(state, devices)
    aug = augment.get(config.augment)

    def step(state, batch, hp, rng):
        batch = augment.augment_batch(aug, rng, batch, axis_name="batch")
        return train_lib.train_step(state, batch, hp, axis_name="batch", static_k=1)

    p_step = jax.pmap(step, axis_name="batch", in_axes=(0, 0, None, None), devices=devices)
    hp = {"eps": np.float32(0), "alpha": np.float32(0), "k": np.int32(1),
          "lr": np.float32(0.01)}
    it = src.train_iter(0, devices=devices)
    for i in range(2):
        batch = next(it)
        state, metrics = p_step(state, batch, hp, augment.batch_key(config.seed, i))
    return {"eval_examples": sum(int(b["mask"].sum()) for b in src.eval_batches()),
            "finite": bool(np.isfinite(np.asarray(metrics["loss"])).all()),
            "image_shape": list(batch["image"].shape)}


if __name__ == "__main__":
    import json
    import sys

    command, *rest = sys.argv[1:]
    result = {"start": _main_start, "recipe": _main_recipe}[command](*rest)
    print(json.dumps(result))
