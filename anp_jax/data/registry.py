"""The registry of data sets and how each one is found, prepared and read.

Every data set, the project's own included, is read through a TFDS builder:

=======================================  ===========  =========  ==========================
``config.dataset``                       classes      images     input path
=======================================  ===========  =========  ==========================
``digits`` (embedded, no download)       10           8x8x1      in memory
``fashion_mnist`` (local IDX files)      10           28x28x1    in memory
``mnist``                                10           28x28x1    in memory
``cifar10``                              10           32x32x3    in memory
``cifar10_corrupted/<corruption>_<s>``   10           32x32x3    in memory (test: CIFAR-10-C)
``imagenet2012`` (manual download)       1000         224x224x3  tf.data stream
``imagenet2012_corrupted/<c>_<s>``       1000         224x224x3  tf.data stream (test: -C)
=======================================  ===========  =========  ==========================

``digits`` and ``fashion_mnist`` are built by this project's builders
(:mod:`anp_jax.data.builders`) from files already on the machine, never downloaded; the
others are TFDS's own builders.

The corrupted sets have a test split only: they train on the training split of the clean set
(``DatasetSpec.train_from``) and evaluate on the corrupted one, so ``config.dataset`` is the
only thing a user changes.  ``<s>`` is the severity 1..5; the corruption names are TFDS's
(``frosted_glass_blur`` and ``elastic`` for CIFAR-10-C), and the names of
:mod:`anp_jax.corruptions` (``glass_blur``, ``elastic_transform``) are accepted as aliases.

:func:`load_split` reads a split that fits in host memory into NumPy arrays (uint8 images);
the batching of those arrays and the tf.data stream of the large sets are in
:mod:`anp_jax.data.sources`.

A data set that is not there raises :class:`DatasetError` with one line that says which one,
where TFDS looked, and how to get it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os

import numpy as np


class DatasetError(Exception):
    """A data set that cannot be found or read; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the trainer needs to know of a data set.

    Attributes:
      tfds_name: TFDS name, with the builder config if any (``cifar10_corrupted/fog_3``).
      num_classes: number of classes.
      image_shape: ``(H, W, C)`` of the images the model sees (ImageNet: the 224x224 crops).
      train_split, test_split: split names.
      embedded: built by this project's builder (``builders.BUILDERS[tfds_name]``) from
        files on the machine, never downloaded.
      train_from: the ``DATASETS`` key whose ``train_split`` is used for training ("" for
        this one); the corrupted sets, which have a test split only, train on the clean set.
      streaming: too large for host memory: read through the tf.data pipeline.
      train_preprocess, eval_preprocess: host preprocessing of the tf.data pipeline:
        ``"decode"`` (fixed-size images), ``"random_resized_crop"`` (decode, random crop of
        8-100% of the area, resize, flip: ImageNet training), ``"center_crop"`` (decode,
        central crop of 224/256 of the shorter side, resize: ImageNet evaluation).
      manual_files: files that TFDS needs in ``<data_dir>/downloads/manual/`` because it
        cannot download them (ImageNet).
      archives: the original files TFDS downloads; put there by hand, they are used
        instead of downloading (offline machines).
    """

    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_split: str = "train"
    test_split: str = "test"
    embedded: bool = False
    train_from: str = ""
    streaming: bool = False
    train_preprocess: str = "decode"
    eval_preprocess: str = "decode"
    manual_files: tuple[str, ...] = ()
    archives: tuple[str, ...] = ()


# The 19 corruptions of CIFAR-10-C as TFDS names them, and the names used elsewhere.
CIFAR10_CORRUPTIONS: tuple[str, ...] = (
    "brightness", "contrast", "defocus_blur", "elastic", "fog", "frost", "frosted_glass_blur",
    "gaussian_blur", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur",
    "pixelate", "saturate", "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur")
CIFAR10_ALIASES = {"glass_blur": "frosted_glass_blur", "elastic_transform": "elastic"}
IMAGENET_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression", "gaussian_blur", "saturate",
    "spatter", "speckle_noise")
SEVERITIES = (1, 2, 3, 4, 5)

IMAGENET_TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_TAR = "ILSVRC2012_img_val.tar"

_IMAGENET = dict(num_classes=1000, image_shape=(224, 224, 3), streaming=True,
                 train_preprocess="random_resized_crop")


def _build_registry() -> dict[str, DatasetSpec]:
    reg = {
        "digits": DatasetSpec("digits", 10, (8, 8, 1), embedded=True),
        "fashion_mnist": DatasetSpec("fashion_mnist_idx", 10, (28, 28, 1), embedded=True),
        "mnist": DatasetSpec("mnist", 10, (28, 28, 1), archives=(
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
        "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), archives=("cifar-10-binary.tar.gz",)),
        "imagenet2012": DatasetSpec(
            "imagenet2012", test_split="validation", eval_preprocess="center_crop",
            manual_files=(IMAGENET_TRAIN_TAR, IMAGENET_VAL_TAR), **_IMAGENET),
    }
    names = {c: c for c in CIFAR10_CORRUPTIONS} | CIFAR10_ALIASES
    for name, tfds_config in names.items():
        for s in SEVERITIES:
            reg[f"cifar10_corrupted/{name}_{s}"] = DatasetSpec(
                f"cifar10_corrupted/{tfds_config}_{s}", 10, (32, 32, 3), train_from="cifar10",
                archives=("CIFAR-10-C.tar",))
    for name in IMAGENET_CORRUPTIONS:
        for s in SEVERITIES:
            # ImageNet-C images are already the 224x224 central crops: decode only.
            reg[f"imagenet2012_corrupted/{name}_{s}"] = DatasetSpec(
                f"imagenet2012_corrupted/{name}_{s}", test_split="validation",
                train_from="imagenet2012", manual_files=(IMAGENET_VAL_TAR,), **_IMAGENET)
    return reg


DATASETS: dict[str, DatasetSpec] = _build_registry()


def describe_datasets() -> str:
    """The data set names, short: the corrupted families as patterns."""
    return ("digits, fashion_mnist, mnist, cifar10, cifar10_corrupted/<corruption>_<1-5>, "
            "imagenet2012, imagenet2012_corrupted/<corruption>_<1-5>")


def default_data_dir() -> str:
    """TFDS's data directory: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def manual_dir(data_dir: str | None = None) -> str:
    """Where TFDS looks for files downloaded by hand: ``<data_dir>/downloads/manual``."""
    return os.path.join(data_dir or default_data_dir(), "downloads", "manual")


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        family, _, config = name.partition("/")
        hint = ""
        if family in ("cifar10_corrupted", "imagenet2012_corrupted"):
            known = CIFAR10_CORRUPTIONS + tuple(CIFAR10_ALIASES) \
                if family == "cifar10_corrupted" else IMAGENET_CORRUPTIONS
            hint = (f"; {family} needs '<corruption>_<severity 1-5>', corruptions: "
                    f"{', '.join(sorted(known))}")
        else:
            close = difflib.get_close_matches(name, DATASETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}; choose from: {describe_datasets()}"
                           f"{hint}")
    return DATASETS[name]


def resolve_split(name: str, split: str) -> tuple[str, str]:
    """The ``DATASETS`` key whose builder holds ``split`` of data set ``name``, and the split.

    The corrupted sets train on the clean set: ``("cifar10_corrupted/fog_3", "train")`` is
    ``("cifar10", "train")``.
    """
    spec = get_spec(name)
    if spec.train_from and split == spec.train_split:
        return spec.train_from, split
    return name, split


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _how_to_get(name: str, spec: DatasetSpec, data_dir: str) -> str:
    """One sentence (no newline) on how to get data set ``name`` into ``data_dir``."""
    manual = manual_dir(data_dir)
    build = f"`tfds build {spec.tfds_name} --data_dir={data_dir}`"
    if spec.manual_files:
        have = [f for f in spec.manual_files if os.path.exists(os.path.join(manual, f))]
        missing = [f for f in spec.manual_files if f not in have]
        text = (f"TFDS cannot download it: register at https://image-net.org/download-images, "
                f"put {' and '.join(spec.manual_files)} (the tar files as distributed, not "
                f"unpacked) in {manual}/, then pass --config.download=True or run {build}")
        if spec.tfds_name.startswith("imagenet2012_corrupted"):
            text += (" (preparing ImageNet-C also downloads 6 frost images from GitHub and "
                     "needs opencv-python, scikit-image, scipy and wand/ImageMagick)")
        if have and missing:
            text += f"; found {', '.join(have)} but not {', '.join(missing)}"
        elif have:
            text = (f"the archives are in {manual}/: pass --config.download=True (or run "
                    f"{build}) to prepare it; for ImageNet this takes hours")
        return text
    text = (f"prepare it with {build} on a machine with internet and copy "
            f"{os.path.join(data_dir, spec.tfds_name.split('/')[0])} here, or pass "
            "--config.download=True")
    if spec.archives:
        text += (f" (offline: put the original {', '.join(spec.archives)} in {manual}/ "
                 "first, TFDS then uses them instead of downloading)")
    return text


def _archives_present(spec: DatasetSpec, data_dir: str) -> bool:
    files = spec.manual_files or spec.archives
    return bool(files) and all(os.path.exists(os.path.join(manual_dir(data_dir), f))
                               for f in files)


def get_builder(name: str, data_dir: str | None = None, download: bool = False,
                for_dataset: str | None = None):
    """The prepared TFDS builder of ``DATASETS[name]``, preparing it when allowed.

    Raises :class:`DatasetError` (one line: which data set, where TFDS looked, how to get
    it) when it is not prepared and cannot be.  ``for_dataset`` names the data set the
    caller asked for when it differs (the clean set that a corrupted one trains on).
    """
    import tensorflow_datasets as tfds

    from anp_jax.data import builders  # registers the project's builders with TFDS

    spec = get_spec(name)
    data_dir = data_dir or default_data_dir()
    what = repr(name) if not for_dataset or for_dataset == name else \
        f"{name!r} (the training split of {for_dataset!r})"
    def open_builder():
        if spec.embedded:
            return builders.BUILDERS[spec.tfds_name](data_dir=data_dir)
        with _quiet_absl():  # "Variant folder ... has no dataset_info.json" when absent
            return tfds.builder(spec.tfds_name, data_dir=data_dir)

    try:
        builder = open_builder()
    except Exception as err:  # e.g. an unknown builder config, a missing dependency
        raise DatasetError(f"dataset {what} cannot be opened in {data_dir}: "
                           f"{_first_line(err)}") from None
    if builder.is_prepared():
        return builder
    if spec.embedded or download:
        # Manual archives (ImageNet) or the original archives in the manual dir: no network
        # needed, so do not ask GCS for a prepared copy (it would wait for a timeout).
        offline = bool(spec.manual_files) or _archives_present(spec, data_dir)
        config = tfds.download.DownloadConfig(try_download_gcs=not (spec.embedded or offline))
        try:
            builder.download_and_prepare(download_config=config)
        except builders.SourceFilesError as err:  # the project's builders say it all
            raise DatasetError(f"dataset {what} could not be prepared in {data_dir}: {err}"
                               ) from None
        except Exception as err:  # a failed download or preparation: report it in one line
            # Jobs started together on a fresh data_dir prepare it side by side: TFDS then
            # fails to move all but the first copy into place, and that one is complete.
            builder = open_builder()
            if builder.is_prepared():
                return builder
            raise DatasetError(
                f"dataset {what} could not be prepared in {data_dir}: {_first_line(err)}; "
                f"{_how_to_get(name, spec, data_dir)}") from None
        return builder
    raise DatasetError(
        f"dataset {what} not found in {data_dir} (TFDS looked for {builder.data_dir}); "
        f"{_how_to_get(name, spec, data_dir)}")


def load_split(name: str, split: str, data_dir: str | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split: ``images`` uint8 ``[N, H, W, C]`` and ``labels`` int32 ``[N]``.

    For a corrupted set the training split is the clean set's (``resolve_split``).  The
    streaming sets (ImageNet) do not fit in memory: use :func:`anp_jax.data.create_source`.
    """
    import tensorflow_datasets as tfds

    source, split = resolve_split(name, split)
    builder = get_builder(source, data_dir, download, for_dataset=name)
    if split not in builder.info.splits:
        raise DatasetError(f"dataset {source!r} has no split {split!r}; "
                           f"it has: {', '.join(builder.info.splits)}")
    if get_spec(source).streaming:
        raise DatasetError(f"dataset {name!r} is too large to read into memory; it streams "
                           "through anp_jax.data.create_source")
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int32)
