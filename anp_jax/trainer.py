"""The training job: config in, trained model, checkpoints and ``metrics.json`` out.

``train_and_evaluate(config, workdir)`` validates the config, reads the data set through
TFDS, trains with :func:`anp_jax.train.train_step` under ``jax.pmap`` over the local
devices (one device is fine), checkpoints with Orbax and resumes from the newest
checkpoint in ``workdir``, then evaluates the noise-free model and writes
``workdir/metrics.json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils

from anp_jax import checkpoint as ckpt_lib
from anp_jax import data as data_lib
from anp_jax import evaluation as eval_lib
from anp_jax import noise as noise_lib
from anp_jax import schedules
from anp_jax import train as train_lib
from anp_jax.adversarial import Adversary
from anp_jax.data import augment as augment_lib
from anp_jax.models import MODELS, create_model, select_layers

# Adversarial-training methods and the adversary they use; "anp_" + any of them adds ANP.
ADVERSARIES = {"pgd_at": "pgd", "trades": "trades", "fast_at": "fast", "free_at": "free"}
METHODS = ("vanilla", "anp", "replay", *ADVERSARIES, *(f"anp_{m}" for m in ADVERSARIES))
ANP_SCHEDULES = ("constant", "official", "linear", "cosine", "piecewise")
LR_SCHEDULES = ("constant", "cosine", "step")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example, a non-finite loss)."""


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
    need(config.num_epochs > 0, "num_epochs", "must be > 0")
    need(config.batch_size > 0, "batch_size", "must be > 0")
    need(config.learning_rate > 0, "learning_rate", "must be > 0")
    need(config.lr_schedule in LR_SCHEDULES, "lr_schedule",
         f"choose from {', '.join(LR_SCHEDULES)}")
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
    try:
        points = create_model(config.model).perturbation_points()
        select_layers(config.anp.layers, points, config.model)
    except ValueError as err:
        raise ConfigError(f"config.anp.layers={config.anp.layers!r}: {err}") from None
    for attack in config.eval.attacks:
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
    """``eps``, ``alpha``, ``k`` and ``lr`` as functions of the (fractional) epoch."""
    a = config.anp
    if a.schedule == "official":
        noise = schedules.official_cifar10(config.num_epochs)
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
        if config.method == "replay":
            k = noise["k"]
        noise = {"eps": schedules.constant(0.0), "alpha": schedules.constant(0.0), "k": k}
    if config.method.endswith("free_at"):  # Free-AT replays each mini-batch
        noise["k"] = schedules.constant(config.adv.replays)
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        noise["lr"] = schedules.cosine(lr, 0.0, config.num_epochs)
    elif config.lr_schedule == "step":
        n = int(math.ceil(config.num_epochs / config.lr_decay_epochs))
        bounds = [config.lr_decay_epochs * i for i in range(1, n)]
        noise["lr"] = schedules.piecewise_constant(
            bounds, [lr * config.lr_decay_factor ** i for i in range(n)])
    else:
        noise["lr"] = schedules.constant(lr)
    return noise


def hparams_at(scheds: dict[str, schedules.Schedule], epoch: float) -> dict[str, np.ndarray]:
    """The hyper-parameters of one mini-batch, as host scalars of fixed dtypes."""
    return {name: np.asarray(fn(epoch), np.int32 if name == "k" else np.float32)
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
    kind = ADVERSARIES.get(config.method.removeprefix("anp_"))
    if kind is None:
        return None
    a = config.adv
    return Adversary(kind, a.epsilon, a.step_size, a.steps, a.beta)


def selected_layers(config: ml_collections.ConfigDict, points: tuple[str, ...]) -> tuple[str, ...]:
    if not config.method.startswith("anp"):
        return ()
    return select_layers(config.anp.layers, points, config.model)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def format_report(metrics: dict) -> str:
    """A readable table of the metrics, for the terminal."""
    rows = [("clean accuracy", metrics["clean_accuracy"])]
    rows += [(f"adversarial {k}", v) for k, v in metrics["adversarial"].items()]
    rows += [(f"corruption {k}", v) for k, v in metrics["corruption"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{name:<{width}}  {value:8.4f}" for name, value in rows]
    lines.append(f"final train loss {metrics['final_train_loss']:.4f}; "
                 f"{metrics['steps']} updates in {metrics['train_seconds']:.1f} s "
                 f"on {metrics['num_devices']} device(s)")
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                       progress: bool = True,
                       schedule_overrides: dict[str, schedules.Schedule] | None = None) -> dict:
    """Trains, checkpoints, resumes, evaluates; returns and writes the metrics.

    ``schedule_overrides`` replaces schedules of :func:`make_schedules` (keys ``eps``,
    ``alpha``, ``k``, ``lr``) with functions of the fractional epoch, e.g. one of your own:
    ``train_and_evaluate(config, workdir, schedule_overrides={"eps": my_eps})``.
    """
    validate_config(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    local = jax.local_devices()
    devices = local if config.num_devices == -1 else local[:config.num_devices]
    n_dev = len(devices)
    spec = data_lib.get_spec(config.dataset)
    source = data_lib.create_source(config, spec, n_dev, process_index, process_count)
    per_epoch = source.steps_per_epoch
    total = int(round(config.num_epochs * per_epoch))

    model = create_model(config.model, num_classes=spec.num_classes, axis_name="batch",
                         **model_options(config))
    layers = selected_layers(config, model.perturbation_points())
    per_device = config.batch_size // (n_dev * process_count)
    state = train_lib.create_train_state(
        model, jax.random.PRNGKey(config.seed), (per_device,) + tuple(source.image_shape),
        train_lib.make_optimizer(config.optimizer, config.momentum, config.weight_decay),
        build_noise_transform(config), layers, config.anp.reset_per_batch)
    state = jax_utils.replicate(state, devices)

    os.makedirs(workdir, exist_ok=True)
    every = config.get("checkpoint_every_steps", -1)
    every = per_epoch if every in (-1, 0) else every
    mngr = ckpt_lib.manager(os.path.join(workdir, "checkpoints"),
                            config.get("keep_checkpoints", 3))
    loop = {"epoch_loss_sum": 0.0, "epoch_batches": 0, "last_epoch_loss": float("nan"),
            "train_seconds": 0.0}
    restored = ckpt_lib.restore_latest(mngr, state, devices, log)
    if restored is not None:
        state, loop = restored
        if is_main:
            log(f"resumed from checkpoint at mini-batch {loop['batches']} in {workdir}")
    # Give the state the sharding that pmap returns, so the step compiles only once.
    state = jax.pmap(lambda s: s, devices=devices if process_count == 1 else None)(state)
    start = int(np.asarray(state.batches)[0])

    scheds = dict(make_schedules(config), **(schedule_overrides or {}))
    adversary = make_adversary(config)
    unroll = config.get("unroll_k", "auto")
    unroll = jax.default_backend() == "cpu" if unroll == "auto" else bool(unroll)
    compiled: dict[int | None, Callable] = {}

    augment = augment_lib.get(config.get("augment", "none"))

    def step_fn(state: train_lib.TrainState, batch: dict, hp: dict, rng: jax.Array,
                k: int | None):
        batch = augment_lib.augment_batch(augment, rng, batch, axis_name="batch")
        return train_lib.train_step(state, batch, hp, axis_name="batch", static_k=k,
                                    adversary=adversary)

    def p_step(state: train_lib.TrainState, batch: dict, hp: dict, index: int):
        k = int(hp["k"]) if unroll else None
        if k not in compiled:
            compiled[k] = jax.pmap(
                functools.partial(step_fn, k=k), axis_name="batch",
                in_axes=(0, 0, None, None), donate_argnums=(0,),
                devices=devices if process_count == 1 else None)
        return compiled[k](state, batch, hp, augment_lib.batch_key(config.seed, index))
    pending: list[tuple[jax.Array, jax.Array]] = []

    def flush() -> None:
        fetched = jax.device_get(pending)
        pending.clear()
        losses = [float(loss) for loss, _ in fetched]
        if not all(math.isfinite(x) and finite == 1.0 for x, (_, finite) in
                   zip(losses, fetched)):
            raise TrainingError(
                f"non-finite training loss at mini-batch <= {i + 1}; stopped. The last good "
                f"checkpoint is in {mngr.directory} (try a smaller learning rate or eps)")
        loop["epoch_loss_sum"] += sum(losses)
        loop["epoch_batches"] += len(losses)

    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="batch", leave=False,
                   mininterval=1.0, file=sys.stderr)
    t0 = time.perf_counter()
    i = start
    batches = source.train_iter(start, prefetch=config.get("prefetch_batches", 2),
                                devices=devices, stop=total)
    try:
        for i in range(start, total):
            hp = hparams_at(scheds, i / per_epoch)
            batch = next(batches)
            state, metrics = p_step(state, batch, hp, i)
            pending.append((metrics["loss"][0], metrics["params_finite"][0]))
            if (i + 1) % per_epoch == 0:
                flush()
                loop["last_epoch_loss"] = loop["epoch_loss_sum"] / max(loop["epoch_batches"], 1)
                loop["epoch_loss_sum"], loop["epoch_batches"] = 0.0, 0
            if bar is not None and ((i + 1) % config.log_every_steps == 0 or i + 1 == total):
                bar.set_postfix(epoch=f"{(i + 1) / per_epoch:.1f}",
                                loss=f"{float(metrics['loss'][0]):.3f}",
                                eps=f"{float(hp['eps']):.2f}", k=int(hp["k"]))
                bar.update(i + 1 - bar.n)
            if (i + 1) % every == 0 or i + 1 == total:
                flush()
                loop["train_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                loop["batches"] = i + 1
                ckpt_lib.save(mngr, state, loop)
    finally:
        if bar is not None:
            bar.close()
    if pending:
        flush()
    mngr.close()

    params = jax.tree.map(ckpt_lib.first_replica, state.params)
    batch_stats = jax.tree.map(ckpt_lib.first_replica, state.batch_stats)
    results = eval_lib.evaluate_batches(
        state.apply_fn, params, batch_stats, source.eval_batches,
        attack_ids=tuple(config.eval.attacks), corruption_ids=tuple(config.eval.corruptions),
        seed=config.seed, devices=devices if process_count == 1 else None)
    final_loss = loop["last_epoch_loss"]
    if not math.isfinite(final_loss) and loop["epoch_batches"]:
        final_loss = loop["epoch_loss_sum"] / loop["epoch_batches"]
    metrics = {
        "config": config.to_dict(),
        "clean_accuracy": results["clean_accuracy"],
        "adversarial": results["adversarial"],
        "corruption": results["corruption"],
        "robust_accuracy": results["robust_accuracy"],
        "test_loss": results["loss"],
        "num_test_examples": results["num_examples"],
        "final_train_loss": final_loss,
        "train_seconds": loop["train_seconds"],
        "steps": int(np.asarray(state.step)[0]),
        "batches": total,
        "epochs": config.num_epochs,
        "num_devices": n_dev * process_count,
        "num_processes": process_count,
        "perturbed_layers": list(layers),
    }
    if is_main:
        _write_json(os.path.join(workdir, "metrics.json"), metrics)
    return metrics
