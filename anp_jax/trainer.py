"""The training job: config in, trained model, checkpoints, learning curves and metrics out.

``train_and_evaluate(config, workdir)`` validates the config, checks it against the one
the workdir was started with (``workdir/config.json``), reads the data set through TFDS,
trains with :func:`anp_jax.train.train_step` under ``jax.pmap`` over the local devices
(one device is fine), checkpoints with Orbax and resumes from the newest checkpoint in
``workdir``, writes learning curves (TensorBoard event files through clu's metric writers,
and the same rows in ``workdir/metrics.jsonl``), then evaluates the noise-free model and
writes ``workdir/metrics.json``.  ``workdir`` may be any path ``etils.epath`` reads
(``gs://bucket/run`` included).

Files in ``workdir``:

==================  ===================================================================
``config.json``     the resolved config of the run (``num_devices`` resolved, plus
                    ``num_processes``), written when the run starts
``checkpoints/``    Orbax checkpoints, named by the mini-batches done
``metrics.jsonl``   one JSON row per ``log_every_steps`` mini-batches (train columns) and
                    per ``eval_every_epochs`` epochs (eval columns); see ``LOG_COLUMNS``
``events.out.*``    the same scalars as TensorBoard event files (``config.tensorboard``)
``metrics.json``    the final metrics, written only by a run that finished
==================  ===================================================================

The loop keeps the host out of the way of the device: the schedules (eps, alpha, k, lr)
and the augmentation key are computed inside the compiled step from the mini-batch
counter in the state, the step's metrics are written into a small buffer on the device
and fetched once per log interval, and the host synchronises only at log, epoch,
checkpoint and evaluation points.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import jax_utils

from anp_jax import attacks as attacks_lib
from anp_jax import checkpoint as ckpt_lib
from anp_jax import data as data_lib
from anp_jax import evaluation as eval_lib
from anp_jax import io as io_lib
from anp_jax import noise as noise_lib
from anp_jax import schedules
from anp_jax import train as train_lib
from anp_jax.adversarial import Adversary
from anp_jax.data import augment as augment_lib
from anp_jax.evaluation import sanity
from anp_jax.models import MODELS, create_model, select_layers

# Adversarial-training methods and the adversary they use; "anp_" + any of them adds ANP.
ADVERSARIES = {"pgd_at": "pgd", "trades": "trades", "fast_at": "fast", "free_at": "free"}
# The controls of the combinations: each adversarial training with ANP's k updates per
# mini-batch and no noise, as "replay" is ANP's (Free-AT replays every mini-batch already).
AT_REPLAYS = tuple(f"replay_{m}" for m in ADVERSARIES if m != "free_at")
METHODS = ("vanilla", "anp", "replay", *ADVERSARIES, *(f"anp_{m}" for m in ADVERSARIES),
           *AT_REPLAYS)
ANP_SCHEDULES = ("constant", "official", "linear", "cosine", "piecewise")
LR_SCHEDULES = ("constant", "cosine", "step")


def is_replay(method: str) -> bool:
    """Whether ``method`` is a control that replays ANP's k updates without noise."""
    return method == "replay" or method in AT_REPLAYS


# Config fields that may differ when a run resumes: they do not change the trained model.
# ``eval`` stands for every ``eval.*`` field.  ``num_epochs`` may grow (never shrink) as
# long as the eps/alpha/k/lr schedules of the mini-batches already trained stay the same
# (not so for lr_schedule="cosine" or anp.schedule="official", which stretch with it).
RESUMABLE_FIELDS = ("eval", "eval_every_epochs", "log_every_steps", "tensorboard",
                    "checkpoint_every_steps", "checkpoint_min_secs", "keep_checkpoints",
                    "prefetch_batches",
                    "data_dir", "download", "num_epochs")

# metrics.jsonl columns (and TensorBoard tags, "step" aside).
TRAIN_COLUMNS = ("step", "epoch", "train_loss", "train_accuracy", "noise_norm", "eps",
                 "alpha", "k", "lr")
EVAL_COLUMNS = ("step", "epoch", "eval_clean_accuracy", "eval_robust_accuracy")
LOG_COLUMNS = TRAIN_COLUMNS + EVAL_COLUMNS[2:]

# Learning-curve rows reach metrics.jsonl and the event files at least this often (seconds).
_FLUSH_SECS = 30.0

# Exit statuses of a run stopped by a signal (the shell's 128 + signal number).
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}

# Per-step metrics kept in the device buffer, in this order.
_STEP_METRICS = ("loss", "accuracy", "noise_norm", "params_finite")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


class ResumeError(ConfigError):
    """The workdir holds a run of another config; nothing was changed."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example, a non-finite loss)."""


class Preempted(Exception):  # noqa: N818 (a stop, not an error)
    """SIGTERM or SIGINT: the run saved a checkpoint and stopped; ``signum`` says which."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_status = EXIT_STATUS.get(signum, 143)


# Compute dtypes: "bfloat16" is mixed precision (activations, noise registers and matrix
# multiplies in bfloat16; parameters, optimiser state and the loss in float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_options(config: ml_collections.ConfigDict | dict) -> dict:
    """The model's keyword arguments set by a config (or its stored dict): the compute
    ``dtype`` and the standardisation ``mean``/``std``."""
    out = {"dtype": DTYPES[config.get("dtype") or "float32"]}
    for field in ("mean", "std"):
        if config.get(field):
            out[field] = tuple(float(v) for v in config.get(field))
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first bad field."""
    def need(cond: bool, field: str, what: str) -> None:
        if not cond:
            value = config
            for part in field.split("."):
                value = value[part]
            raise ConfigError(f"config.{field}={value!r}: {what}")

    need(config.dataset in data_lib.DATASETS, "dataset",
         f"unknown dataset; choose from {', '.join(data_lib.DATASETS)}")
    need(config.model in MODELS, "model", f"unknown model; choose from {', '.join(MODELS)}")
    need(config.method in METHODS, "method", f"choose from {', '.join(METHODS)}")
    need(config.adv.epsilon >= 0, "adv.epsilon", "must be >= 0")
    need(config.adv.steps >= 1, "adv.steps", "must be >= 1")
    need(config.adv.replays >= 1, "adv.replays", "must be >= 1")
    need(config.adv.get("norm", "linf") in ("linf", "l2"), "adv.norm", "choose from linf, l2")
    need(config.num_epochs > 0, "num_epochs", "must be > 0")
    need(config.batch_size > 0, "batch_size", "must be > 0")
    need(config.learning_rate > 0, "learning_rate", "must be > 0")
    need(config.lr_schedule in LR_SCHEDULES, "lr_schedule",
         f"choose from {', '.join(LR_SCHEDULES)}")
    need(config.get("lr_decay_offset", 0) >= 0, "lr_decay_offset", "must be >= 0")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.anp.epsilon >= 0, "anp.epsilon", "must be >= 0")
    need(config.anp.alpha >= 0, "anp.alpha", "must be >= 0")
    need(int(config.anp.k) == config.anp.k and config.anp.k >= 1, "anp.k",
         "must be an integer >= 1")
    need(config.anp.norm in ("l2", "linf", "sign"), "anp.norm", "choose from l2, linf, sign")
    need(config.anp.init in ("none", "gaussian", "uniform"), "anp.init",
         "choose from none, gaussian, uniform")
    need(config.anp.schedule in ANP_SCHEDULES, "anp.schedule",
         f"choose from {', '.join(ANP_SCHEDULES)}")
    if config.anp.schedule == "piecewise":
        n = len(config.anp.boundaries) + 1
        for field in ("eps_values", "alpha_values", "k_values"):
            need(len(config.anp[field]) == n, f"anp.{field}",
                 f"needs {n} values (one more than anp.boundaries)")
        need(min(config.anp.eps_values) >= 0, "anp.eps_values", "must be >= 0")
        need(min(config.anp.k_values) >= 1, "anp.k_values", "must be >= 1")
    need(config.anp.warmup_epochs > 0, "anp.warmup_epochs", "must be > 0")
    need(config.num_devices == -1 or config.num_devices >= 1, "num_devices",
         "must be -1 (all) or >= 1")
    need(config.num_devices <= jax.local_device_count(), "num_devices",
         f"only {jax.local_device_count()} local devices")
    need(config.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    need(config.get("dtype", "float32") in DTYPES, "dtype", f"choose from {', '.join(DTYPES)}")
    need(config.get("input_pipeline", "auto") in data_lib.PIPELINES, "input_pipeline",
         f"choose from {', '.join(data_lib.PIPELINES)}")
    need(config.get("image_size", 0) >= 0, "image_size", "must be >= 0 (0: the data set's)")
    need(config.get("prefetch_batches", 2) >= 0, "prefetch_batches", "must be >= 0")
    need(len(config.get("mean", ())) in (0, 1, 3), "mean", "needs 0, 1 or 3 values")
    need(len(config.get("std", ())) in (0, 1, 3) and all(v > 0 for v in config.get("std", ())),
         "std", "needs 0, 1 or 3 values, all > 0")
    need(config.get("augment", "none") in augment_lib.AUGMENTATIONS, "augment",
         f"choose from {', '.join(augment_lib.AUGMENTATIONS)}")
    need(config.get("log_every_steps", 50) >= 1, "log_every_steps", "must be >= 1")
    need(config.get("eval_every_epochs", 0) >= 0, "eval_every_epochs", "must be >= 0 (0: never)")
    need(config.eval.get("curve_examples", 256) >= 1, "eval.curve_examples", "must be >= 1")
    try:
        points = create_model(config.model).perturbation_points()
        select_layers(config.anp.layers, points, config.model)
    except ValueError as err:
        raise ConfigError(f"config.anp.layers={config.anp.layers!r}: {err}") from None
    for attack in (*config.eval.attacks, *([config.eval.curve_attack]
                                           if config.eval.get("curve_attack") else [])):
        try:
            eval_lib.validate_attack_id(attack)
        except ValueError as err:
            raise ConfigError(f"config.eval.attacks: {err}") from None
    for corruption in config.eval.corruptions:
        try:
            eval_lib.parse_corruption_id(corruption)
        except ValueError as err:
            raise ConfigError(f"config.eval.corruptions: {err}") from None


def make_schedules(config: ml_collections.ConfigDict) -> dict[str, schedules.Schedule]:
    """``eps``, ``alpha``, ``k`` and ``lr`` as functions of the (fractional) epoch.

    Every one is jnp-traceable: the trainer evaluates them inside the compiled step.
    """
    a = config.anp
    if a.schedule == "official":
        noise = schedules.official_cifar10(config.num_epochs, a.epsilon)
    elif a.schedule == "piecewise":
        noise = {"eps": schedules.piecewise_constant(a.boundaries, a.eps_values),
                 "alpha": schedules.piecewise_constant(a.boundaries, a.alpha_values),
                 "k": schedules.piecewise_constant(a.boundaries, a.k_values)}
    else:
        ramp = {"constant": lambda: schedules.constant(a.epsilon),
                "linear": lambda: schedules.linear(0.0, a.epsilon, a.warmup_epochs),
                "cosine": lambda: schedules.cosine(0.0, a.epsilon, a.warmup_epochs)}
        noise = {"eps": ramp[a.schedule](), "alpha": schedules.constant(a.alpha),
                 "k": schedules.constant(a.k)}
    if not config.method.startswith("anp"):
        k = schedules.constant(1)
        if is_replay(config.method):
            k = noise["k"]
        noise = {"eps": schedules.constant(0.0), "alpha": schedules.constant(0.0), "k": k}
    if config.method.endswith("free_at"):  # Free-AT replays each mini-batch
        noise["k"] = schedules.constant(config.adv.replays)
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        noise["lr"] = schedules.cosine(lr, 0.0, config.num_epochs)
    elif config.lr_schedule == "step":
        noise["lr"] = schedules.step_decay(lr, config.lr_decay_epochs, config.lr_decay_factor,
                                           config.num_epochs,
                                           offset=config.get("lr_decay_offset", 0))
    else:
        noise["lr"] = schedules.constant(lr)
    return noise


def hparams_at(scheds: Mapping[str, schedules.Schedule], epoch: float | jax.Array
               ) -> dict[str, jax.Array]:
    """The hyper-parameters of one mini-batch at ``epoch`` (a number or a traced scalar):
    ``k`` as int32, the others as float32."""
    return {name: jnp.asarray(fn(epoch), jnp.int32 if name == "k" else jnp.float32)
            for name, fn in scheds.items()}


def build_noise_transform(config: ml_collections.ConfigDict
                          ) -> optax.GradientTransformationExtraArgs:
    """The noise transform of ``config.anp``: :func:`anp_jax.noise.anp`, its gradients at
    the input summed over the progressive steps first (``accumulate_input_grad``, as the
    official code does), its noise scaled by each point's activation norm after
    (``scale_by_activation_norm``)."""
    a = config.anp
    relative = a.get("scale_by_activation_norm", False)
    if relative and a.init != "none":
        raise ConfigError(f"config.anp.init={a.init!r}: a random start precedes the first "
                          "forward pass, so anp.scale_by_activation_norm would scale it to "
                          "zero; use anp.init='none'")
    tx = noise_lib.anp(norm=a.norm, init=None if a.init == "none" else a.init)
    if a.get("accumulate_input_grad", False):
        tx = optax.chain(optax.masked(noise_lib.accumulate_gradients(),
                                      noise_lib.point_mask("input")), tx)
    return optax.chain(tx, noise_lib.scale_by_activation_norm()) if relative else tx


def make_adversary(config: ml_collections.ConfigDict) -> Adversary | None:
    """The adversary of an adversarial-training method, or None."""
    kind = ADVERSARIES.get(config.method.removeprefix("anp_").removeprefix("replay_"))
    if kind is None:
        return None
    a = config.adv
    return Adversary(kind, a.epsilon, a.step_size, a.steps, a.beta, a.get("norm", "linf"))


def selected_layers(config: ml_collections.ConfigDict, points: tuple[str, ...]) -> tuple[str, ...]:
    if not config.method.startswith("anp"):
        return ()
    return select_layers(config.anp.layers, points, config.model)


def curve_attack(config: ml_collections.ConfigDict) -> str:
    """The quick attack of the learning curves: ``config.eval.curve_attack``, or PGD-10 at
    the norm and budget of the first of ``config.eval.attacks`` (L-inf 0.1 if none)."""
    if config.eval.get("curve_attack"):
        return config.eval.curve_attack
    for attack in config.eval.attacks:
        _, norm, eps, _ = attacks_lib.parse_attack_id(attack)
        return f"pgd10_{norm}_{attack.rsplit('_', 1)[1]}" if eps else "pgd10_linf_0.1"
    return "pgd10_linf_0.1"


# --------------------------------------------------------------------------------------
# Files in the workdir


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int) -> dict:
    """What ``config.json`` holds: the config as JSON, ``num_devices`` resolved to the
    devices of each process, and ``num_processes``."""
    out = json.loads(json.dumps(config.to_dict()))
    out["num_devices"], out["num_processes"] = num_devices, num_processes
    return out


def _resumable(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


def config_differences(old: Mapping, new: Mapping, defaults: Mapping | None = None
                       ) -> list[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` for every field that differs (dotted names).

    A field that ``old`` lacks (added to the config after that run started) and whose new
    value is its value in ``defaults`` is no difference: new fields default to the old
    behaviour.
    """
    a, b = _flat(old), _flat(new)
    d = _flat(defaults or {})
    missing = object()
    out = []
    for field in sorted(set(a) | set(b)):
        va, vb = a.get(field, missing), b.get(field, missing)
        if va is missing and field in d and d[field] == vb:
            continue
        if va != vb:
            out.append((field, None if va is missing else va, None if vb is missing else vb))
    return out


def _same_schedules(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                    batches: int, per_epoch: int) -> bool:
    """Whether both configs give the same eps/alpha/k/lr on mini-batches ``0..batches-1``."""
    a, b = make_schedules(old), make_schedules(new)

    @jax.jit
    def table(index: jax.Array) -> jax.Array:
        def one(i):
            ha, hb = hparams_at(a, i / per_epoch), hparams_at(b, i / per_epoch)
            return jnp.all(jnp.asarray([jnp.all(ha[n] == hb[n]) for n in ha]))
        return jnp.all(jax.lax.map(one, index))

    return bool(table(jnp.arange(batches, dtype=jnp.int32)))


def check_resume(config: ml_collections.ConfigDict, resolved: dict, workdir: epath.Path,
                 per_epoch: int) -> None:
    """Raises :class:`ResumeError` (one line: the differing fields and both values) if
    ``workdir`` holds a run (checkpoints or ``metrics.json``) of a config that differs in a
    field that changes the trained model.  Reads only; touches nothing."""
    has_run = (workdir / "metrics.json").exists() or ckpt_lib.has_checkpoints(
        workdir / "checkpoints")
    if not has_run:
        return
    old = None
    if (workdir / "config.json").exists():
        old = json.loads((workdir / "config.json").read_text())
    elif (workdir / "metrics.json").exists():  # a workdir of an older version
        old = json.loads((workdir / "metrics.json").read_text()).get("config")
    if old is None:
        return
    from anp_jax.configs import default as default_config

    diffs = config_differences(old, resolved, json.loads(json.dumps(
        default_config.get_config().to_dict())))
    blocking = [d for d in diffs if not _resumable(d[0])]
    if not blocking and any(f == "num_epochs" for f, _, _ in diffs):
        try:
            old_config = ml_collections.ConfigDict(old)
            old_epochs = float(old["num_epochs"])
        except (TypeError, ValueError, KeyError):
            old_config, old_epochs = None, math.inf
        grows = config.num_epochs >= old_epochs
        if old_config is None or not grows or not _same_schedules(
                old_config, config, int(round(old_epochs * per_epoch)), per_epoch):
            why = ("fewer epochs than the run's" if not grows else "the schedules stretch "
                   "with it and would change on the mini-batches already trained")
            blocking = [(f"num_epochs ({why})", old_epochs, config.num_epochs)]
    if blocking:
        changes = "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in blocking)
        raise ResumeError(
            f"{workdir} holds a run of another config ({changes}); nothing was changed: "
            f"use another --workdir, or the run's values (fields that may change on "
            f"resume: {', '.join(f + '.*' if f == 'eval' else f for f in RESUMABLE_FIELDS)})")


class JsonlWriter:
    """A clu ``MetricWriter`` of scalars as JSON lines: ``{"step": ..., name: value}``.

    Rows are kept in memory and the whole file is rewritten atomically at every
    :meth:`flush` (so it works on object stores such as GCS, where files cannot be
    appended to).  ``resume_step`` keeps the existing rows up to that step and drops those
    after it (the resumed run writes them again), so rows are never duplicated.
    """

    def __init__(self, path: epath.PathLike, resume_step: int | None = None):
        self.path = epath.Path(path)
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line) if line.strip() else None
                if row is not None and row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        self._dirty = True

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.rows.append({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}})
        self._dirty = True

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams  # config.json holds them

    def flush(self) -> None:
        if self._dirty:
            io_lib.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
            self._dirty = False

    def close(self) -> None:
        self.flush()


def _plain(value: Any) -> Any:
    value = np.asarray(value).item()
    return value


def _make_writer(workdir: epath.Path, resume_step: int | None, tensorboard: bool):
    """A clu MultiWriter of TensorBoard event files (``workdir``) and metrics.jsonl."""
    from clu import metric_writers
    from clu.metric_writers import interface

    class _Jsonl(JsonlWriter, interface.MetricWriter):
        def write_summaries(self, step, values, metadata=None):
            del step, values, metadata

        write_images = write_videos = write_texts = write_summaries

        def write_audios(self, step, audios, *, sample_rate):
            del step, audios, sample_rate

        def write_histograms(self, step, arrays, num_buckets=None):
            del step, arrays, num_buckets

    writers = [_Jsonl(workdir / "metrics.jsonl", resume_step)]
    if tensorboard:
        writers.append(metric_writers.SummaryWriter(str(workdir)))
    return metric_writers.MultiWriter(writers)


# --------------------------------------------------------------------------------------
# Signals


class _StopSignals:
    """SIGTERM and SIGINT ask the loop to stop after the step in flight.

    One process: a Python handler records the signal.  Several processes (after
    ``jax.distributed.initialize``): JAX's preemption service catches SIGTERM and makes
    every process agree on the step to stop at
    (``multihost_utils.reached_preemption_sync_point``); SIGINT is turned into a SIGTERM to
    this process, so that it goes through the same agreement.
    """

    def __init__(self) -> None:
        self.multi = jax.process_count() > 1  # jax.distributed is initialised
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set in the main thread
        wanted = (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT)
        for signum in wanted:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = self.signum or signum
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def should_stop(self, batches: int) -> bool:
        """Called after every step with the mini-batches done (the same on all processes)."""
        if self.multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(batches):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Interval:
    """Host sums of the step metrics since the last log row (float64, in step order)."""

    loss: float = 0.0
    accuracy: float = 0.0
    noise_norm: float = 0.0
    count: int = 0


class _Run:
    """Everything a training run sets up: data, state, compiled steps, checkpoints, logs."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: epath.PathLike,
                 log: Callable[[str], None], progress: bool,
                 schedule_overrides: Mapping[str, schedules.Schedule] | None,
                 checkpoints: bool = True):
        self.t_start = time.perf_counter()
        validate_config(config)
        self.config, self.log, self.progress = config, log, progress
        self.workdir = epath.Path(workdir)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.is_main = self.process_index == 0
        local = jax.local_devices()
        self.devices = local if config.num_devices == -1 else local[:config.num_devices]
        self.pmap_devices = self.devices if self.process_count == 1 else None
        n_dev = len(self.devices)
        # XLA:CPU can deadlock when steps with a collective queue up on several devices of
        # one process (one device's part waits in the all-reduce, the other's launch never
        # gets a slot): there, each step waits for the one before.
        self.step_by_step = self.devices[0].platform == "cpu" and n_dev > 1
        if config.batch_size % (n_dev * self.process_count):
            raise ConfigError(f"config.batch_size={config.batch_size}: must be a multiple of "
                              f"the {n_dev * self.process_count} devices")
        self.spec = data_lib.get_spec(config.dataset)
        t_data = time.perf_counter()
        self.source = data_lib.create_source(config, self.spec, n_dev,
                                                   self.process_index, self.process_count)
        self.data_seconds = time.perf_counter() - t_data
        self.per_epoch = self.source.steps_per_epoch
        self.total = int(round(config.num_epochs * self.per_epoch))

        # The config check comes first: nothing is written, renamed or read as a
        # checkpoint before it passes.
        self.resolved = resolved_config(config, n_dev, self.process_count)
        check_resume(config, self.resolved, self.workdir, self.per_epoch)
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            io_lib.write_json_atomic(self.workdir / "config.json", self.resolved)

        model = create_model(config.model, num_classes=self.spec.num_classes,
                             axis_name="batch", **model_options(config))
        self.layers = selected_layers(config, model.perturbation_points())
        per_device = config.batch_size // (n_dev * self.process_count)
        state = train_lib.create_train_state(
            model, jax.random.PRNGKey(config.seed), (per_device,) + tuple(self.source.image_shape),
            train_lib.make_optimizer(config.optimizer, config.momentum, config.weight_decay),
            build_noise_transform(config), self.layers, config.anp.reset_per_batch)
        state = jax_utils.replicate(state, self.devices)

        every = config.get("checkpoint_every_steps", -1)
        self.checkpoint_every = self.per_epoch if every in (-1, 0) else every
        # epoch checkpoints at most this often (seconds); explicit intervals are kept exactly
        self.checkpoint_min_secs = float(config.get("checkpoint_min_secs", 0.0)) \
            if every in (-1, 0) else 0.0
        self.mngr = None
        self.loop = {"epoch_loss_sum": 0.0, "epoch_batches": 0,
                     "last_epoch_loss": float("nan"), "train_seconds": 0.0,
                     "curve_eval_seconds": 0.0}
        self.resumed = False
        if checkpoints:
            self.mngr = ckpt_lib.manager(self.workdir / "checkpoints",
                                         config.get("keep_checkpoints", 3))
            restored = ckpt_lib.restore_latest(self.mngr, state, self.devices, log)
            if restored is not None:
                state, self.loop = restored
                self.resumed = True
        # One process: the step is jit(shard_map) over a mesh of the devices (what pmap
        # does, without pmap's per-call Python work); several: pmap, which converts between
        # host-local and global arrays.  The identity gives the state the sharding that the
        # step returns, so the step compiles only once.
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
        self.sharding = jax.NamedSharding(self.mesh, jax.P("batch"))
        if self.process_count == 1:
            self._identity = jax.jit(lambda s: s, out_shardings=self.sharding)
        else:
            self._identity = jax.pmap(lambda s: s)
        self.state = self._identity(state)
        self.start = int(np.asarray(ckpt_lib.first_replica(self.state.batches)))
        if self.resumed and self.is_main:
            log(f"resumed from checkpoint at mini-batch {self.start} in {self.workdir}")

        self.scheds = dict(make_schedules(config), **(schedule_overrides or {}))
        self.hp_names = tuple(self.scheds)
        self.adversary = make_adversary(config)
        unroll = config.get("unroll_k", "auto")
        self.unroll = jax.default_backend() == "cpu" if unroll == "auto" else bool(unroll)
        self.k_table = self._k_table() if self.unroll else None
        self.augment = augment_lib.get(config.get("augment", "none"))
        self.log_every = int(config.get("log_every_steps", 50))
        self.buffer_len = max(1, min(self.log_every, self.per_epoch, self.checkpoint_every))
        self.compiled: dict[int | None, Callable] = {}
        self.epoch_accuracy = (0.0, 0)  # host sum and count over the epoch so far

    # -- the compiled step ------------------------------------------------------------

    def _k_table(self) -> np.ndarray:
        """``k`` of every mini-batch (the unrolled step needs it on the host)."""
        k = self.scheds["k"]
        per_epoch = self.per_epoch
        table = jax.jit(lambda idx: jax.lax.map(
            lambda i: jnp.asarray(k(i / per_epoch), jnp.int32), idx))
        return np.asarray(table(jnp.arange(self.total, dtype=jnp.int32)))

    def _step_fn(self, state: train_lib.TrainState, buffer: jax.Array, batch: dict, *,
                 k: int | None) -> tuple[train_lib.TrainState, jax.Array]:
        index = state.batches
        hp = hparams_at(self.scheds, index / self.per_epoch)
        rng = augment_lib.batch_key(self.config.seed, index)
        batch = augment_lib.augment_batch(self.augment, rng, batch, axis_name="batch")
        state, metrics = train_lib.train_step(state, batch, hp, axis_name="batch",
                                              static_k=k, adversary=self.adversary,
                                              next_noise=False)
        # the step's metrics and hyper-parameters: the log rows need no host-side schedules
        values = jnp.stack([jnp.asarray(metrics[m], jnp.float32) for m in _STEP_METRICS]
                           + [jnp.asarray(hp[n], jnp.float32) for n in self.hp_names])
        buffer = jax.lax.dynamic_update_slice(buffer, values[:, None],
                                              (0, index % self.buffer_len))
        return state, buffer

    def step(self, i: int) -> Callable:
        """The compiled step for mini-batch ``i`` (one program per k when unrolled)."""
        k = int(self.k_table[i]) if self.unroll else None
        if k not in self.compiled:
            if self.is_main and self.progress:
                self.log(f"compiling the train step{f' (k={k})' if k is not None else ''} "
                         f"...")
            fn = functools.partial(self._step_fn, k=k)
            if self.process_count == 1:
                self.compiled[k] = jax.jit(jax.shard_map(
                    _per_device(fn), mesh=self.mesh, in_specs=jax.P("batch"),
                    out_specs=jax.P("batch")), donate_argnums=(0, 1))
            else:
                self.compiled[k] = jax.pmap(fn, axis_name="batch", donate_argnums=(0, 1))
        return self.compiled[k]

    def new_buffer(self) -> jax.Array:
        zeros = np.zeros((len(_STEP_METRICS) + len(self.hp_names), self.buffer_len),
                         np.float32)
        return self._identity(jax_utils.replicate(zeros, self.devices))

    def batches(self, start: int, stop: int) -> Iterable[dict]:
        """Training batches ``start .. stop - 1`` on the devices, ``prefetch_batches`` ahead."""
        ahead = max(1, self.config.get("prefetch_batches", 2))
        if self.process_count > 1:
            return self.source.train_iter(start, prefetch=ahead, devices=self.devices,
                                          stop=stop)
        return _prefetch((jax.device_put(b, self.sharding) for b in
                          self.source.train_iter(start, prefetch=0, stop=stop)), ahead)

    # -- the loop ------------------------------------------------------------------------

    def train(self, writer=None, stop_at: int | None = None,
              signals: _StopSignals | None = None) -> None:
        """Trains from ``self.start`` to ``stop_at`` (default: the end of the run)."""
        stop_at = self.total if stop_at is None else stop_at
        buffer = self.new_buffer()
        interval = _Interval()
        first = self.start
        pending_from = self.start  # first mini-batch whose metrics are still in the buffer
        t0 = time.perf_counter()
        epoch_t0 = t0
        last_save = last_flush = t0
        last_hp: dict[str, float] = {}
        state = self.state
        eval_every = self.config.get("eval_every_epochs", 0)

        def due(checkpoint: bool, final: bool) -> bool:
            """Whether to save now: every interval, epoch checkpoints no more often than
            ``checkpoint_min_secs`` (process 0's clock decides for every process)."""
            if final:
                return True
            if not checkpoint or not self.checkpoint_min_secs:
                return checkpoint
            wanted = time.perf_counter() - last_save >= self.checkpoint_min_secs
            if self.process_count > 1:
                from jax.experimental import multihost_utils

                wanted = bool(multihost_utils.broadcast_one_to_all(np.int32(wanted)))
            return wanted

        def fetch(upto: int) -> None:
            """Reads the buffer's metrics of mini-batches ``pending_from .. upto - 1``."""
            nonlocal pending_from, last_hp
            if upto == pending_from:
                return
            values = np.asarray(ckpt_lib.first_replica(buffer), np.float64)
            n = len(_STEP_METRICS)
            last_hp = dict(zip(self.hp_names, values[n:, (upto - 1) % self.buffer_len]))
            for j in range(pending_from, upto):
                loss, acc, nnorm, finite = values[:n, j % self.buffer_len]
                if not (math.isfinite(loss) and finite == 1.0):
                    raise TrainingError(
                        f"non-finite training loss at mini-batch {j + 1}; stopped. The last "
                        f"good checkpoint is in {self.workdir / 'checkpoints'} (try a smaller "
                        f"learning rate or eps)")
                self.loop["epoch_loss_sum"] += float(np.float32(loss))
                self.loop["epoch_batches"] += 1
                self.epoch_accuracy = (self.epoch_accuracy[0] + acc, self.epoch_accuracy[1] + 1)
                interval.loss += float(np.float32(loss))
                interval.accuracy += acc
                interval.noise_norm += nnorm
                interval.count += 1
            pending_from = upto

        def log_row(done: int) -> None:
            nonlocal interval
            if writer is None or not interval.count:
                return
            hp = {n: float(v) for n, v in last_hp.items()}  # those of mini-batch done - 1
            hp["k"] = int(self.k_table[done - 1]) if self.unroll else int(round(hp["k"]))
            writer.write_scalars(done, {
                "epoch": done / self.per_epoch, "train_loss": interval.loss / interval.count,
                "train_accuracy": interval.accuracy / interval.count,
                "noise_norm": interval.noise_norm / interval.count, **hp})
            interval = _Interval()

        batches = iter(self.batches(self.start, stop_at))
        try:
            for i in range(self.start, stop_at):
                state, buffer = self.step(i)(state, buffer, next(batches))
                done = i + 1
                if i == first or self.step_by_step:
                    jax.block_until_ready(buffer)
                if i == first:
                    if self.is_main and self.progress:
                        since = time.perf_counter() - self.t_start
                        self.log(f"first training step done {since:.1f} s after the run "
                                 f"started ({self.data_seconds:.1f} s of it reading the data; "
                                 f"{_since_process_start():.1f} s after the process started)")
                stop = signals is not None and signals.should_stop(done)
                end_of_epoch = done % self.per_epoch == 0
                log_point = done % self.log_every == 0 or end_of_epoch
                checkpoint = due(done % self.checkpoint_every == 0, done == stop_at or stop)
                if not (log_point or checkpoint or done == stop_at):
                    continue
                fetch(done)
                if log_point or done == stop_at or stop:
                    log_row(done)
                if end_of_epoch:
                    epoch = done // self.per_epoch
                    self.loop["last_epoch_loss"] = (self.loop["epoch_loss_sum"]
                                                    / max(self.loop["epoch_batches"], 1))
                    self.loop["epoch_loss_sum"], self.loop["epoch_batches"] = 0.0, 0
                    now = time.perf_counter()
                    if self.is_main and self.progress:
                        hp = last_hp
                        self.log(f"epoch {epoch}/{math.ceil(self.total / self.per_epoch)}: "
                                 f"loss {self.loop['last_epoch_loss']:.4f}, accuracy "
                                 f"{self.epoch_accuracy[0] / max(self.epoch_accuracy[1], 1):.4f}"
                                 f", eps "
                                 f"{float(hp['eps']):.3g}, {now - epoch_t0:.1f} s")
                    epoch_t0 = now
                    self.epoch_accuracy = (0.0, 0)
                    if eval_every and epoch % eval_every == 0:
                        t_eval = time.perf_counter()
                        self.curve_eval(state, done, writer)
                        # evaluation, not training: kept out of train_seconds
                        spent = time.perf_counter() - t_eval
                        self.loop["curve_eval_seconds"] = \
                            self.loop.get("curve_eval_seconds", 0.0) + spent
                        t0 += spent
                # Every flush rewrites metrics.jsonl (a few requests on a bucket): at
                # checkpoints, so that the rows a resumed run keeps are on disk, and at most
                # every _FLUSH_SECS in between; the end and a stop close the writer.
                if writer is not None and (checkpoint or
                                           time.perf_counter() - last_flush >= _FLUSH_SECS):
                    writer.flush()
                    last_flush = time.perf_counter()
                if checkpoint and self.mngr is not None:
                    self.loop["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.loop["batches"] = done
                    ckpt_lib.save(self.mngr, state, self.loop)
                    last_save = time.perf_counter()
                if stop:
                    self.state = state
                    raise Preempted(signals.signum,
                                    f"stopped by {signal.Signals(signals.signum).name} after "
                                    f"mini-batch {done} of {self.total}; checkpoint saved in "
                                    f"{self.workdir / 'checkpoints'}; run the same command to "
                                    f"resume")
        finally:
            self.state = state
            close = getattr(batches, "close", None)
            if close is not None:  # stops and joins the prefetch thread (preemption, errors)
                close()
        self.loop["train_seconds"] += time.perf_counter() - t0 if self.mngr is None else 0.0
        self.start = stop_at

    def curve_eval(self, state: train_lib.TrainState, done: int, writer) -> None:
        """Clean and quick robust accuracy on the first ``eval.curve_examples`` examples."""
        params = jax.tree.map(ckpt_lib.first_replica, state.params)
        batch_stats = jax.tree.map(ckpt_lib.first_replica, state.batch_stats)
        attack = curve_attack(self.config)
        results = eval_lib.evaluate_batches(
            state.apply_fn, params, batch_stats,
            _first_examples(self.source.eval_batches(),
                            self.config.eval.get("curve_examples", 256), self.process_count),
            attack_ids=(attack,), seed=self.config.seed, devices=self.pmap_devices)
        if writer is None:  # not the main process
            return
        writer.write_scalars(done, {"epoch": done / self.per_epoch,
                                    "eval_clean_accuracy": results["clean_accuracy"],
                                    "eval_robust_accuracy": results["adversarial"][attack]})

    def evaluate(self) -> dict:
        """The final evaluation of the noise-free model, and the metrics."""
        config, state = self.config, self.state
        params = jax.tree.map(ckpt_lib.first_replica, state.params)
        batch_stats = jax.tree.map(ckpt_lib.first_replica, state.batch_stats)
        results = eval_lib.evaluate_batches(
            state.apply_fn, params, batch_stats, self.source.eval_batches,
            attack_ids=tuple(config.eval.attacks), corruption_ids=tuple(config.eval.corruptions),
            seed=config.seed, devices=self.pmap_devices)
        final_loss = self.loop["last_epoch_loss"]
        if not math.isfinite(final_loss) and self.loop["epoch_batches"]:
            final_loss = self.loop["epoch_loss_sum"] / self.loop["epoch_batches"]
        return {
            "config": config.to_dict(),
            "clean_accuracy": results["clean_accuracy"],
            "adversarial": results["adversarial"],
            "corruption": results["corruption"],
            "robust_accuracy": results["robust_accuracy"],
            "test_loss": results["loss"],
            "num_test_examples": results["num_examples"],
            "num_classes": self.spec.num_classes,
            "final_train_loss": final_loss,
            "train_seconds": self.loop["train_seconds"],
            "curve_eval_seconds": self.loop.get("curve_eval_seconds", 0.0),
            "steps": int(np.asarray(ckpt_lib.first_replica(state.step))),
            "batches": self.total,
            "epochs": config.num_epochs,
            "num_devices": len(self.devices) * self.process_count,
            "num_processes": self.process_count,
            "perturbed_layers": list(self.layers),
        }


def _per_device(fn: Callable) -> Callable:
    """``fn`` of one device's arrays, as a function of ``[1, ...]`` blocks (shard_map's view
    of arrays sharded on their leading axis, pmap's convention)."""
    def blocks(*args):
        out = fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    return blocks


def _prefetch(items: Iterable, ahead: int) -> Iterable:
    """``items``, produced in order by a background thread up to ``ahead`` items before they
    are used: the host builds and transfers the next batches while the device computes."""
    import queue as queue_lib

    queue: queue_lib.Queue = queue_lib.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def offer(item: Any) -> bool:
        """Puts ``item`` on the queue unless the consumer stopped; False if it did."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except queue_lib.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as err:  # noqa: BLE001 (re-raised in the consumer)
            offer(err)

    thread = threading.Thread(target=produce, daemon=True, name="anp-jax-prefetch")
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()  # no thread may still be moving data when the process exits


def _first_examples(batches: Iterable[dict], n: int, process_count: int) -> Iterable[dict]:
    """The batches holding the first ``n`` examples (``n / process_count`` of each
    process's slice), the rest masked out: a fixed subset of the evaluation split."""
    left = -(-n // process_count)
    for batch in batches:
        if left <= 0:
            return
        mask = np.asarray(batch["mask"]).copy()
        flat = mask.reshape(-1)
        keep = np.cumsum(flat) <= left
        left -= int(np.sum(flat & keep))
        yield dict(batch, mask=(flat & keep).reshape(mask.shape))


def _since_process_start() -> float:
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 (a log line only)
        return float("nan")


def format_report(metrics: dict) -> str:
    """A readable table of the metrics, for the terminal: the reported robust accuracy (per
    budget, the per-example worst case over the attacks run, with the attack named) first,
    then the diagnostics (each attack alone, corruptions), labelled as such."""
    from anp_jax.evaluation import robust

    lines = [f"clean accuracy {metrics['clean_accuracy']:.4f}", ""]
    worst = robust.table_lines(metrics.get("robust_accuracy") or {})
    lines += worst + ([""] if worst else [])
    rows = [(f"adversarial {k}", v) for k, v in metrics["adversarial"].items()]
    rows += [(f"corruption {k}", v) for k, v in metrics["corruption"].items()]
    if rows:
        width = max(len(name) for name, _ in rows)
        lines.append("diagnostics: each attack or corruption alone (not the reported robust "
                     "accuracy)")
        lines += [f"{'metric':<{width}}  accuracy", f"{'-' * width}  --------"]
        lines += [f"{name:<{width}}  {value:8.4f}" for name, value in rows]
    lines.append(f"final train loss {metrics['final_train_loss']:.4f}; "
                 f"{metrics['steps']} updates in {metrics['train_seconds']:.1f} s "
                 f"on {metrics['num_devices']} device(s)")
    classes = metrics.get("num_classes")
    if sanity.ended_at_chance(metrics["clean_accuracy"], classes):
        lines.append(f"warning: the model ended at chance ({classes} classes; ln {classes} = "
                     f"{math.log(classes):.4f}): training collapsed, and its robust figures "
                     "measure nothing. The learning curve's noise_norm falls to 0 when every "
                     "gradient has vanished; try a schedule that starts without noise (the "
                     "official shape, or a warm-up)")
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                       log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                       progress: bool = True,
                       schedule_overrides: dict[str, schedules.Schedule] | None = None) -> dict:
    """Trains, checkpoints, resumes, logs learning curves, evaluates; returns and writes
    the metrics (``workdir/metrics.json``, only once the run has finished).

    ``schedule_overrides`` replaces schedules of :func:`make_schedules` (keys ``eps``,
    ``alpha``, ``k``, ``lr``) with jnp-traceable functions of the fractional epoch, e.g.
    ``train_and_evaluate(config, workdir, schedule_overrides={"eps": my_eps})`` (they are
    evaluated inside the compiled step; they are not part of ``config.json``).

    Raises:
      ConfigError: a bad field; :class:`ResumeError` if ``workdir`` holds a run of another
        config (nothing on disk is touched).
      TrainingError: a non-finite loss (the last good checkpoint stays).
      Preempted: SIGTERM or SIGINT during training; a checkpoint of the mini-batches done
        was saved (``exit_status``: 143 and 130).
    """
    run = _Run(config, workdir, log, progress, schedule_overrides)
    writer = None
    if run.is_main:
        writer = _make_writer(run.workdir, run.start if run.resumed else 0,
                              bool(config.get("tensorboard", True)))
    try:
        with _StopSignals() as signals:
            run.train(writer, signals=signals)
    finally:
        if writer is not None:
            writer.close()
        run.mngr.close()
    metrics = run.evaluate()
    if run.is_main:
        io_lib.write_json_atomic(run.workdir / "metrics.json", metrics)
    return metrics


def time_per_batch(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                   batches: int = 100, repeats: int = 5, warmup: int = 20) -> dict:
    """Steady-state time per mini-batch of the trainer's loop against the bare step.

    Runs the real loop (threaded prefetch, the compiled wrapper with in-step schedules and
    keys, the device metric buffer, log rows into ``workdir``; no checkpoints) and the bare
    jitted :func:`anp_jax.train.train_step` (one device batch, fixed host hyper-parameters)
    in alternating blocks of ``batches`` mini-batches, ``repeats`` times each, after
    ``warmup`` mini-batches of each (compilation).  Wall and process CPU time (all threads)
    are taken per block.

    Returns ``{"trainer_s", "bare_s", "ratio", "trainer_cpu_s", "bare_cpu_s", "cpu_ratio",
    "batches", "repeats"}``: seconds per mini-batch, the fastest block of each (the one least
    disturbed by other work on the machine), and their ratios.
    """
    with config.unlocked(), config.ignore_type():
        config.eval_every_epochs = 0
    run = _Run(config, workdir, log=lambda m: None, progress=False, schedule_overrides=None,
               checkpoints=False)
    writer = _make_writer(run.workdir, None, tensorboard=False)
    run.total = max(run.total, warmup + repeats * batches)
    run.k_table = run._k_table() if run.unroll else None
    run.train(writer, stop_at=warmup)
    jax.block_until_ready(run.state)

    one = jax.tree.map(ckpt_lib.first_replica, run.state)
    host_batch = jax.tree.map(lambda x: x[0], run.source.train_batch(0))
    hp = {n: np.asarray(v) for n, v in hparams_at(run.scheds, warmup / run.per_epoch).items()}
    k = int(run.k_table[warmup]) if run.unroll else None
    bare = jax.jit(functools.partial(train_lib.train_step, static_k=k,
                                     adversary=run.adversary, next_noise=False),
                   donate_argnums=(0,))
    batch = jax.device_put(host_batch)
    for _ in range(warmup):
        one, _ = bare(one, batch, hp)
    jax.block_until_ready(one)

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - t) / batches, (time.process_time() - c) / batches

    def trainer_block() -> None:
        run.train(writer, stop_at=run.start + batches)
        jax.block_until_ready(run.state)

    def bare_block() -> None:
        nonlocal one
        for _ in range(batches):
            one, _ = bare(one, batch, hp)
        jax.block_until_ready(one)

    trainer_t, bare_t = [], []
    for _ in range(repeats):
        trainer_t.append(timed(trainer_block))
        bare_t.append(timed(bare_block))
    writer.close()
    tw, tc = min(w for w, _ in trainer_t), min(c for _, c in trainer_t)
    bw, bc = min(w for w, _ in bare_t), min(c for _, c in bare_t)
    return {"trainer_s": tw, "bare_s": bw, "ratio": tw / bw, "trainer_cpu_s": tc,
            "bare_cpu_s": bc, "cpu_ratio": tc / bc, "batches": batches, "repeats": repeats}
