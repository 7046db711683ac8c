"""A trained run in one call: :func:`load_run`.

    run = anp_jax.load_run("runs/anp")
    run.config                    # the resolved config the run trained with (ConfigDict)
    logits = run.logits_fn(images)  # float32 [B, H, W, C] in [0, 1] -> [B, K], no noise
    for batch in run.test_batches():  # the test split as the run saw it (padded + "mask")
        ...

The config is read from ``<workdir>/config.json`` when the run wrote one, otherwise from the
``config`` section of ``<workdir>/metrics.json``; the parameters and batch statistics from
the newest readable checkpoint in ``<workdir>/checkpoints`` (read-only: nothing is moved or
deleted), whatever the training method and number of devices.  The test split comes through
the run's own input pipeline (:func:`anp_jax.data.create_source`), so streaming data
sets (ImageNet) work as the in-memory ones do.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from anp_jax import checkpoint as ckpt_lib
from anp_jax import data as data_lib
from anp_jax import io as io_lib
from anp_jax.evaluation.runner import Model

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


class RunError(Exception):
    """A workdir that cannot be loaded: missing, no config, no (fitting) checkpoint."""


def read_metrics(workdir: str) -> dict:
    """``workdir/metrics.json`` as a dict with a ``config`` dict; RunError otherwise."""
    if not epath.Path(workdir).is_dir():  # local or gs://
        raise RunError(f"workdir {workdir} does not exist")
    path = os.path.join(workdir, METRICS_FILE)
    if not epath.Path(path).is_file():
        raise RunError(f"no {METRICS_FILE} in {workdir}; train first with "
                       f"`anp-jax train --workdir={workdir}`")
    try:
        metrics = io_lib.read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        raise RunError(f"{path} has no 'config' section (was it written by anp-jax train?)")
    return metrics


def read_config(workdir: str) -> tuple[dict, dict]:
    """``(config, metrics)`` of a run: the config from ``config.json`` if the run wrote one,
    else from ``metrics.json`` (``metrics`` is {} when there is none yet)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if epath.Path(path).is_file():
        try:
            config = io_lib.read_json(path)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise RunError(f"{path} is not readable JSON: {err}") from None
        config.pop("num_processes", None)  # recorded beside the config fields, not one
        metrics_path = os.path.join(workdir, METRICS_FILE)
        metrics = read_metrics(workdir) if epath.Path(metrics_path).is_file() else {}
        return config, metrics
    metrics = read_metrics(workdir)
    return metrics["config"], metrics


def _value(config: dict, key: str, where: str, kind: type) -> Any:
    value = config.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RunError(f"{where}: config.{key}={value!r} is missing or invalid")
    return value


def image_shape(config: dict, spec: data_lib.DatasetSpec) -> tuple[int, int, int]:
    """``(H, W, C)`` of the run's images (``config.image_size`` for streaming sets)."""
    h, w, c = spec.image_shape
    size = config.get("image_size") or 0
    return (size, size, c) if spec.streaming and size else (h, w, c)


_MODULES: dict[tuple, Any] = {}


def build_model(config: dict, where: str = METRICS_FILE) -> tuple[Any, data_lib.DatasetSpec]:
    """The Flax module of a stored config and its data set's spec.

    Runs of the same architecture share one module object, hence compiled programs.
    """
    from anp_jax import trainer
    from anp_jax.models import MODELS, create_model

    dataset = _value(config, "dataset", where, str)
    name = _value(config, "model", where, str)
    if dataset not in data_lib.DATASETS:
        raise RunError(f"{where}: unknown dataset {dataset!r}")
    if name not in MODELS:
        raise RunError(f"{where}: unknown model {name!r}")
    if config.get("dtype", "float32") not in trainer.DTYPES:
        raise RunError(f"{where}: unknown dtype {config.get('dtype')!r}")
    spec = data_lib.DATASETS[dataset]
    options = trainer.model_options(config)
    key = (name, spec.num_classes, *sorted((k, str(v)) for k, v in options.items()))
    if key not in _MODULES:
        _MODULES[key] = create_model(name, num_classes=spec.num_classes, **options)
    return _MODULES[key], spec


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


@dataclasses.dataclass
class TrainedRun:
    """A trained model read back from its workdir (see :func:`load_run`).

    Attributes:
      workdir: where it was read from.
      config: the resolved config of the run.
      metrics: ``metrics.json`` ({} when the run has not finished).
      module: the Flax module; ``variables`` its ``{"params", "batch_stats"}``.
      step: the checkpoint's data position (mini-batches trained).
      devices: the local devices the evaluation uses (the run's ``config.num_devices``).
    """

    workdir: str
    config: ml_collections.ConfigDict
    metrics: dict
    module: Any
    variables: dict
    step: int
    devices: list

    @property
    def model(self) -> Model:
        """The model for :mod:`anp_jax.evaluation`'s evaluators."""
        return Model.from_module(self.module, self.variables)

    @functools.cached_property
    def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
        """``images -> logits`` of the trained model without noise (jitted): float32
        ``[B, H, W, C]`` in [0, 1] -> ``[B, num_classes]``."""
        apply = jax.jit(lambda v, x: self.module.apply(v, x, train=False))
        return functools.partial(apply, self.variables)

    @functools.cached_property
    def source(self) -> Any:
        """The run's input pipeline (``data.create_source``) for evaluation on
        :attr:`devices`: ``source.eval_batches()`` is the test split as the run saw it."""
        config = ml_collections.ConfigDict(self.config.to_dict())
        shards = len(self.devices) * jax.process_count()
        config.batch_size = -(-int(config.batch_size) // shards) * shards
        try:
            return data_lib.create_source(config, num_devices=len(self.devices))
        except data_lib.DatasetError as err:
            raise RunError(str(err)) from None

    def test_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The test split, ``{"image": f32 [D, b, H, W, C], "label", "mask"}`` batches with
        ``D = len(devices)``, the last one padded (``mask`` False on the padding)."""
        return self.source.eval_batches()


def load_run(workdir: str, *, num_devices: int | None = None,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> TrainedRun:
    """The trained run in ``workdir``: config, model without noise, test split.

    Args:
      workdir: a directory written by ``anp-jax train``.
      num_devices: local devices for evaluation (default: the run's ``config.num_devices``,
        -1 meaning all).
      log: where to report an unreadable checkpoint (the previous one is then used).

    Raises:
      RunError: one line naming the problem (no workdir, no config, no readable checkpoint,
        a checkpoint that does not fit the config's model).
    """
    config, metrics = read_config(workdir)
    where = os.path.join(workdir, CONFIG_FILE if not metrics else METRICS_FILE)
    module, spec = build_model(config, where)
    shape = image_shape(config, spec)
    directory = os.path.join(workdir, "checkpoints")
    try:
        params, batch_stats, step = ckpt_lib.restore_variables(directory, log)
    except ckpt_lib.CheckpointError as err:
        raise RunError(f"{err}; train first with `anp-jax train --workdir={workdir}`") from None
    expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, *shape)), train=False))
    if (_shapes(params) != _shapes(expected["params"])
            or _shapes(batch_stats) != _shapes(expected.get("batch_stats", {}))):
        raise RunError(f"checkpoint {os.path.join(directory, str(step))} does not fit the "
                       f"config's model {type(module).__name__!r} (was the config edited, or "
                       "written by another run?)")
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    if batch_stats:
        variables["batch_stats"] = jax.tree.map(jnp.asarray, batch_stats)
    n = num_devices if num_devices is not None else config.get("num_devices", -1)
    local = jax.local_devices()
    devices = local if not isinstance(n, int) or n < 1 else local[:n]
    return TrainedRun(workdir, ml_collections.ConfigDict(config), metrics, module, variables,
                      step, devices)
