"""Time per parameter update: plain training, ANP, the replay control, adversarial training.

    python -m benchmarks.step_time [--json FILE] [--model NAME] [--batch N] [--methods A,B]
        [--iters N] [--repeats N] [--dtype float32|bfloat16] [--torch] [--diagnose]
    python -m benchmarks.step_time --trainer [--trainer-epochs SHORT,LONG]
    python -m benchmarks.step_time --suite cpu [--models A,B] [--in-process]
        [--results-md benchmarks/RESULTS.md]

In one process, on the same model, data shape and batch, it compiles one train step per
method with :func:`anp_jax.train.train_step` (donated state), warms each up, then times
``--repeats`` rounds; in each round every method, in an order rotated from round to
round, runs a block of ``--iters`` mini-batches right next to a block of plain training,
blocking until the results are ready.  Reported:

* ``per_update_ms``: median wall-clock milliseconds per *parameter update* (a step with
  ``k`` updates per mini-batch counts ``k``: ANP k=3, replay k=3, Free-AT);
* ``ratios``: per method, the median over rounds of its time per update divided by that
  of the block of plain training timed right next to it (adjacent pairs, so slow phases
  of a shared machine cancel out); on CPU also ``cpu_ratios``, the same with the
  process's CPU time, steadier when other work competes for the cores;
* ``images_per_second``: batch / time per update (images through forward + backward);
* ``memory``: XLA's buffer assignment of each compiled step (arguments, outputs, aliased
  donated buffers, temporaries; ``peak_bytes`` = arguments + outputs - aliased +
  temporaries), and on GPU the device's ``peak_bytes_in_use`` after that method's
  warm-up (process-wide and cumulative);
* ``registers``: bytes of ANP's noise registers (``r``, one per perturbed activation,
  batch included), of the whole noise state (registers + the injection buffer), and as
  fractions of the perturbed activations' bytes and of the ANP k=1 step's peak; for both
  float32 and bfloat16 models;
* ``flops_per_update`` (XLA's cost analysis), ``tflops`` and, where the device's peak is
  known (``--peak-tflops``, or an H100/H200), ``mfu``.

Methods: plain training, ANP at every point (k = 1, 2, 3), the replay control (k = 2, 3),
``input_floor`` (plain training that also computes d loss / d input: the gradient ANP's
input point needs and plain training does not, so the floor of ANP with that point),
ANP k=2 at every point but the input, and adversarial training; ``--methods`` picks some.

Synthetic data: uniform pixels in [0, 1] and random labels.  Models (``--model``): every
name of :data:`anp_jax.models.MODELS` (32x32x3, batch 128), with ``digits_cnn`` at 8x8x1
(the default), ``lenet`` at 28x28x1, ``resnet50`` at 224x224x3 with 1000 classes, and the
small CPU shapes ``vgg11_small``, ``resnet18_small`` (quarter width, 32x32x3, batch 32)
and ``fmnist_vgg`` (the Fashion-MNIST studies' BatchNorm VGG at 28x28x1, or a narrow
VGG-11 standing in for it until it is registered).  Steps are unrolled on CPU
(``static_k``, as the trainer does there); elsewhere ``k`` is a ``lax.fori_loop`` unless
``--unroll yes``.

``--trainer`` times the real training loop, :func:`anp_jax.trainer.train_and_evaluate`
with the default config, against its bare jitted step in the same process (see
:func:`trainer_comparison`).  ``--suite cpu`` runs the CPU models with the methods that
compare ANP with plain training, each model in a fresh process (``--in-process``: all in
this one), then ``--trainer``; ``--results-md`` writes the tables
with the command, the machine, the load and the date into a Markdown file.

``--torch`` adds the PyTorch implementation of :mod:`benchmarks.torch_anp` (digits CNN and
VGG-16) to the same rounds and reports anp-jax's speed over it.  ``--diagnose`` adds
variants that locate ANP's overhead (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anp_jax import noise as noise_lib
from anp_jax import train
from anp_jax.adversarial import Adversary
from anp_jax.configs import default as default_config
from anp_jax.models import MODELS, PERTURBATIONS, create_model, select_layers
from anp_jax.trainer import DTYPES


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: a name of :data:`anp_jax.models.MODELS`, its module options,
    the image shape of its data and the batch it is timed at by default."""

    model: str
    image_shape: tuple[int, int, int]
    options: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 10
    batch: int = 128
    note: str = ""


# The Fashion-MNIST studies' BatchNorm VGG, by its registry name; until it is registered,
# a narrow VGG-11 at the same 28x28x1 shape stands in for it.
STUDY_VGG = "vgg8"


def model_specs() -> dict[str, ModelSpec]:
    """``--model`` names: every model of the registry (32x32x3, batch 128, unless listed
    here) and the small CPU shapes of ``--suite cpu``."""
    specs = {name: ModelSpec(name, (32, 32, 3)) for name in MODELS}
    specs.update({
        "digits_cnn": ModelSpec("digits_cnn", (8, 8, 1), note="8x8 digits (the default job)"),
        "lenet": ModelSpec("lenet", (28, 28, 1), note="LeNet-5 at 28x28x1 (Fashion-MNIST)"),
        "resnet50": ModelSpec("resnet50", (224, 224, 3), num_classes=1000),
        "vgg11_small": ModelSpec("vgg11", (32, 32, 3), (("width", 0.25),), batch=32,
                                 note="VGG-11 (BN) at quarter width, 32x32x3"),
        "resnet18_small": ModelSpec("resnet18", (32, 32, 3), (("width", 16),), batch=32,
                                    note="ResNet-18 at quarter width, 32x32x3"),
    })
    if STUDY_VGG in MODELS:
        specs["fmnist_vgg"] = ModelSpec(STUDY_VGG, (28, 28, 1),
                                        note=f"the Fashion-MNIST study's {STUDY_VGG}, 28x28x1")
    else:
        specs["fmnist_vgg"] = ModelSpec("vgg11", (28, 28, 1), (("width", 0.125),),
                                        note=f"stand-in for {STUDY_VGG} (not registered yet): "
                                        "VGG-11 (BN) at 1/8 width, 28x28x1")
    return specs


SPECS = model_specs()
# The CPU suite: the models of issue 16 at shapes that time in seconds on 2 cores.
CPU_SUITE = ("digits_cnn", "lenet", "fmnist_vgg", "vgg11_small", "resnet18_small")
SUITE_METHODS = ("plain", "anp_k2", "replay_k2", "input_floor")
MD_BEGIN, MD_END = "<!-- step_time: begin -->", "<!-- step_time: end -->"
LEARNING_RATE = 0.01
# Dense peak TFLOP/s by device kind (NVIDIA's data sheets; float32 matmuls and convolutions
# run as TF32 under JAX's default precision on these GPUs).  Override with --peak-tflops.
PEAK_TFLOPS = {"H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},  # H100 SXM
               "H100 PCIe": {"bfloat16": 756.5, "float32": 378.0},
               "H200": {"bfloat16": 989.4, "float32": 494.7}}


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of training: ANP (on the points ``layers`` selects) or not, ``k`` updates per
    mini-batch, an adversary."""

    name: str
    anp: bool
    k: int
    adversary: Adversary | None = None
    noise_tx: Callable[[], optax.GradientTransformationExtraArgs] = noise_lib.anp
    layers: str = "all"  # a selection of anp_jax.models.select_layers, for ANP
    skip_first: int = 0  # leave out the first points of that selection
    # train_step's next_noise: False is the trainer's step (no noise made after the last
    # update); the input floor needs True, its "noise" is the input gradient itself.
    next_noise: bool = False
    description: str = ""


def _identity_noise() -> optax.GradientTransformationExtraArgs:
    return noise_lib.scale(1.0)


def methods(diagnose: bool = False) -> list[Method]:
    """The timed methods; attack budgets and Free-AT's replays from the default config."""
    adv = default_config.get_config().adv
    out = [
        Method("plain", False, 1, description="plain training"),
        Method("anp_k1", True, 1, description="ANP, all points, k=1"),
        Method("anp_k2", True, 2, description="ANP, all points, k=2 (2 updates)"),
        Method("anp_k3", True, 3, description="ANP, all points, k=3 (3 updates)"),
        Method("replay_k2", False, 2, description="replay: k=2 updates, no noise"),
        Method("replay_k3", False, 3, description="replay: k=3 updates, no noise"),
        # The one point whose gradient plain training does not compute: the step of ANP
        # k=1 at the input alone with the identity as noise transform (the noise of its
        # only forward pass is zero) is plain training plus d loss / d input.
        Method("input_floor", True, 1, noise_tx=_identity_noise, layers="input", next_noise=True,
               description="floor: plain training + d loss/d input"),
        Method("anp_k2_no_input", True, 2, skip_first=1,
               description="ANP k=2 at every point but the input"),
        Method("pgd_at", False, 1, Adversary("pgd", adv.epsilon, adv.step_size, adv.steps),
               description=f"PGD-AT, {adv.steps} steps"),
        Method("trades", False, 1, Adversary("trades", adv.epsilon, adv.step_size, adv.steps,
                                             adv.beta),
               description=f"TRADES, {adv.steps} steps"),
        Method("fast_at", False, 1, Adversary("fast", adv.epsilon, adv.step_size),
               description="Fast-AT (FGSM, random start)"),
        Method("free_at", False, adv.replays, Adversary("free", adv.epsilon, adv.step_size),
               description=f"Free-AT, {adv.replays} replays"),
    ]
    if diagnose:
        out += [
            Method("anp_k1_no_normalize", True, 1,
                   noise_tx=lambda: optax.chain(noise_lib.accumulate(),
                                                noise_lib.scale_by_eps_over_k()),
                   description="ANP k=1 without the per-example L2 normalisation"),
            Method("anp_k2_input_only", True, 2, layers="input",
                   description="ANP k=2 at the input only"),
            Method("anp_k2_deep", True, 2, skip_first=2,
                   description="ANP k=2 at every point but the input and the first layer"),
        ]
    return out


def _layers(method: Method, points: Sequence[str]) -> tuple[str, ...]:
    """The perturbation points ``method`` perturbs, among the model's ``points``."""
    if not method.anp:
        return ()
    return select_layers(method.layers, points)[method.skip_first:]


# ----------------------------------------------------------------------------- devices


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_device() -> dict[str, Any]:
    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "platform": dev.platform,
            "device_kind": dev.device_kind, "jax": jax.__version__,
            "host_cpu": cpu_model(), "host_cores": cpu_cores()}
    if dev.platform == "cpu":
        info["description"] = f"CPU: {info['host_cpu']}, {info['host_cores']} cores"
    else:
        info["description"] = f"{dev.platform.upper()}: {dev.device_kind}"
    return info


def peak_tflops(device: dict[str, Any], dtype: str, override: float | None) -> float | None:
    if override:
        return override
    for name, peaks in PEAK_TFLOPS.items():
        if device["platform"] == "gpu" and name in device["device_kind"]:
            return peaks[dtype]
    return None


# ----------------------------------------------------------------------------- measures


def _bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def memory_report(compiled: Any) -> dict[str, int]:
    """XLA's buffer assignment of a compiled step, in bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        m = None
    if m is None:
        return {}
    out = {"argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes)}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


def flop_count(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def perturbation_shapes(model_name: str, batch: int, dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every perturbation point (the ``perturbations`` collection)."""
    model = build_model(model_name, dtype)
    x = jax.ShapeDtypeStruct((batch,) + SPECS[model_name].image_shape, jnp.float32)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               {"params": key, "dropout": key}, x)
    return dict(variables[PERTURBATIONS])


def _registers(state_noise: train.NoiseState) -> Any:
    """The ``AccumulateState`` registers inside a noise transform's state."""
    is_acc = lambda x: isinstance(x, noise_lib.AccumulateState)  # noqa: E731
    return [s.register for s in jax.tree.leaves(state_noise.transform, is_leaf=is_acc)
            if is_acc(s)]


def register_report(model_name: str, batch: int, dtype: str) -> dict[str, Any]:
    """Noise-register bytes of an ANP train state on every point, for ``dtype``, computed
    from the (abstract) train state itself."""
    model = build_model(model_name, dtype)
    layers = model.perturbation_points()
    shape = (batch,) + SPECS[model_name].image_shape
    state = jax.eval_shape(lambda: train.create_train_state(
        model, jax.random.PRNGKey(0), shape, train.make_optimizer("sgd"), noise_lib.anp(),
        layers))
    registers = _registers(state.noise)
    acts = perturbation_shapes(model_name, batch, dtype)
    act_bytes = _bytes([acts[name] for name in layers])
    reg_bytes = _bytes(registers)
    noise_bytes = _bytes(state.noise)
    return {
        "dtype": dtype,
        "points": {name: {"shape": list(state.noise.injection[name].shape),
                          "dtype": str(state.noise.injection[name].dtype),
                          "bytes": _bytes(state.noise.injection[name])} for name in layers},
        "register_bytes": reg_bytes,
        "noise_state_bytes": noise_bytes,
        "perturbed_activation_bytes": act_bytes,
        "register_fraction_of_activations": reg_bytes / act_bytes,
        "noise_state_fraction_of_activations": noise_bytes / act_bytes,
    }


# ----------------------------------------------------------------------------- runners


def build_model(model_name: str, dtype: str = "float32"):
    """The model of ``--model model_name`` (a key of :data:`SPECS`)."""
    spec = SPECS[model_name]
    return create_model(spec.model, num_classes=spec.num_classes, dtype=DTYPES[dtype],
                        **dict(spec.options))


def synthetic_batch(model_name: str, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    """Uniform pixels in [0, 1] and random labels, ``[batch, *image_shape]``."""
    rng = np.random.default_rng(seed)
    spec = SPECS[model_name]
    shape = (batch,) + spec.image_shape
    return {"image": jnp.asarray(rng.uniform(size=shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, spec.num_classes, batch), jnp.int32)}


@functools.cache
def _state_factory(model_name: str, dtype: str, image_shape: tuple[int, ...],
                   layers: tuple[str, ...] | bool,
                   noise_tx: Callable[[], optax.GradientTransformationExtraArgs]
                   ) -> Callable[[jax.Array], train.TrainState]:
    """A jitted :func:`anp_jax.train.create_train_state` (one compilation, where running it
    op by op would compile dozens of small programs), shared by methods with the same
    kind of state; every call returns fresh buffers.  ``layers``: the perturbation points
    (``True``: all of them, ``False``: none)."""
    model = build_model(model_name, dtype)
    if isinstance(layers, bool):
        layers = model.perturbation_points() if layers else ()

    def create(key: jax.Array) -> train.TrainState:
        return train.create_train_state(model, key, image_shape, train.make_optimizer("sgd"),
                                        noise_tx(), layers)

    return jax.jit(create)


class JaxRunner:
    """A compiled train step of one method and its (donated) state."""

    def __init__(self, method: Method, model_name: str, dtype: str,
                 batch: dict[str, jax.Array], unroll: bool, seed: int = 0):
        self.method, self.k = method, method.k
        config = default_config.get_config()
        self.hparams = {"eps": jnp.float32(config.anp.epsilon if method.anp else 0.0),
                        "alpha": jnp.float32(config.anp.alpha if method.anp else 0.0),
                        "k": jnp.int32(method.k), "lr": jnp.float32(LEARNING_RATE)}
        self.batch = batch
        layers = _layers(method, build_model(model_name, dtype).perturbation_points())
        self.state = _state_factory(model_name, dtype, tuple(batch["image"].shape), layers,
                                    method.noise_tx)(jax.random.PRNGKey(seed))
        fn = functools.partial(train.train_step, static_k=method.k if unroll else None,
                               adversary=method.adversary, next_noise=method.next_noise)
        self.unroll = unroll
        self.lowered = jax.jit(fn, donate_argnums=(0,)).lower(self.state, batch, self.hparams)
        self.compiled: Any = None
        self.compile_seconds = 0.0
        self.memory: dict[str, int] = {}
        self.flops_per_update: float | None = None
        self.metrics: dict[str, jax.Array] = {}

    def compile(self) -> JaxRunner:
        """Compiles the step (XLA releases the GIL: runners compile in parallel threads)."""
        start = time.perf_counter()
        self.compiled = self.lowered.compile()
        self.compile_seconds = time.perf_counter() - start
        self.memory = memory_report(self.compiled)
        method, unroll, batch = self.method, self.unroll, self.batch
        flops = flop_count(self.compiled)
        if flops is not None and not unroll:
            # A loop body is counted once: count on the unrolled program instead.
            unrolled = functools.partial(train.train_step, static_k=method.k,
                                         adversary=method.adversary)
            try:
                cost = jax.jit(unrolled).lower(self.state, batch, self.hparams).cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                flops = float(cost["flops"])
            except Exception:
                flops = None
        self.flops_per_update = None if flops is None else flops / method.k
        return self

    def run(self, n: int) -> None:
        state, metrics = self.state, self.metrics
        for _ in range(n):
            state, metrics = self.compiled(state, self.batch, self.hparams)
        jax.block_until_ready((state, metrics))
        self.state, self.metrics = state, metrics


class TorchRunner:
    """The PyTorch ANP trainer of :mod:`benchmarks.torch_anp` behind the same interface."""

    def __init__(self, name: str, model_name: str, batch: int, k: int, anp: bool, dtype: str):
        from benchmarks import torch_anp

        config = default_config.get_config()
        self.method = Method(name, anp, k, description=f"PyTorch {'ANP' if anp else 'plain'} "
                             f"k={k}")
        self.k = k
        self.trainer = torch_anp.Trainer(model_name, batch, k, anp, eps=config.anp.epsilon,
                                         alpha=config.anp.alpha, lr=LEARNING_RATE, dtype=dtype)
        self.compile_seconds = 0.0
        self.memory: dict[str, int] = {}
        self.flops_per_update = None

    def run(self, n: int) -> None:
        self.trainer.run(n)


def _measure(runner: Any, iters: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per update of ``iters`` mini-batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    runner.run(iters)
    n = iters * runner.k
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def time_interleaved(runners: dict[str, Any], iters: int, repeats: int, warmup: int,
                     log: Callable[[str], None], baseline: str = "plain"
                     ) -> tuple[dict[str, dict[str, list[float]]],
                                dict[str, dict[str, list[float]]]]:
    """Times every runner against ``baseline`` in adjacent pairs.

    Each round visits the other runners in an order rotated from round to round; for each
    it times a block of ``baseline`` and a block of the runner back to back (baseline first
    in even rounds, second in odd ones, so that a trend in the machine's speed cancels).
    Returns the seconds per update of every block (``{"wall": [...], "cpu": [...]}`` per
    runner) and, per runner, the ratio to the baseline block next to it in every round.
    """
    for runner in runners.values():
        if warmup:
            runner.run(warmup)
    others = [name for name in runners if name != baseline]
    times = {name: {"wall": [], "cpu": []} for name in runners}
    ratios = {name: {"wall": [], "cpu": []} for name in others}
    for rep in range(repeats):
        shift = rep % max(len(others), 1)
        for name in others[shift:] + others[:shift]:
            pair = (baseline, name) if rep % 2 == 0 else (name, baseline)
            got = {n: _measure(runners[n], iters) for n in pair}
            for n, (wall, cpu) in got.items():
                times[n]["wall"].append(wall)
                times[n]["cpu"].append(cpu)
            for i, clock in enumerate(("wall", "cpu")):
                ratios[name][clock].append(got[name][i] / got[baseline][i])
        log(f"  round {rep + 1}/{repeats} done")
    return times, ratios


def _quartiles(values: Sequence[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--model", choices=tuple(SPECS), default="digits_cnn")
    p.add_argument("--batch", type=int, default=None,
                   help="mini-batch size (default: the model's, 128 or 32 for *_small)")
    p.add_argument("--methods", default="",
                   help="comma-separated methods to time (default: all); plain always runs")
    p.add_argument("--suite", choices=("cpu",), default=None,
                   help=f"cpu: models {', '.join(CPU_SUITE)} with methods "
                   f"{', '.join(SUITE_METHODS)}, then --trainer")
    p.add_argument("--models", default="",
                   help=f"--suite: these models only (comma-separated; default: "
                   f"{','.join(CPU_SUITE)})")
    p.add_argument("--in-process", action="store_true",
                   help="--suite: time every model in this process (default: each in a "
                   "fresh one)")
    p.add_argument("--trainer", action="store_true",
                   help="time anp_jax.trainer.train_and_evaluate (the default config) "
                   "against its bare jitted step")
    p.add_argument("--trainer-epochs", default="2,22",
                   help="the two run lengths (epochs) whose difference is the trainer's "
                   "steady state")
    p.add_argument("--results-md", default=None,
                   help="write the tables, command, machine and date into this Markdown "
                   f"file, between {MD_BEGIN} and {MD_END} (appended if absent)")
    p.add_argument("--iters", type=int, default=3,
                   help="mini-batches of each method per timed round")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (medians over them)")
    p.add_argument("--warmup", type=int, default=2, help="untimed mini-batches per method")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="computation dtype of the model (parameters stay float32)")
    p.add_argument("--unroll", choices=("auto", "yes", "no"), default="auto",
                   help="unroll the k updates (auto: on CPU, as the trainer does)")
    p.add_argument("--torch", action="store_true",
                   help="also time the PyTorch ANP of benchmarks.torch_anp (if installed)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads (0: PyTorch's default)")
    p.add_argument("--diagnose", action="store_true",
                   help="also time variants that locate ANP's overhead")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s, for MFU")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc's allocator alone (default: what anp-jax's command lines "
                        "do, anp_jax.cli.keep_freed_memory)")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    for field in ("iters", "repeats"):
        if getattr(args, field) < 1:
            p.error(f"--{field} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    known = [m.name for m in methods(True)]
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name in args.methods:
        if name not in known:
            p.error(f"--methods: unknown method {name!r}; choose from: {', '.join(known)}")
    try:
        epochs = tuple(int(e) for e in args.trainer_epochs.split(","))
    except ValueError:
        epochs = ()
    if len(epochs) != 2 or not 0 < epochs[0] < epochs[1]:
        p.error(f"--trainer-epochs {args.trainer_epochs!r}: expected two run lengths "
                "SHORT,LONG (whole epochs) with 0 < SHORT < LONG")
    args.trainer_epochs = epochs
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for name in args.models:
        if name not in SPECS:
            p.error(f"--models: unknown model {name!r}; choose from: {', '.join(SPECS)}")
    return args


def _torch_runners(args: argparse.Namespace, log: Callable[[str], None]
                   ) -> tuple[dict[str, TorchRunner], dict[str, Any] | None]:
    if "torch" not in sys.modules:
        # OpenMP threads that spin while they wait slow PyTorch down many times over on a
        # shared machine; passive waiting costs nothing measurable on an idle one.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        log("PyTorch is not installed: skipping the PyTorch comparison "
            "(pip install torch to include it)")
        return {}, {"skipped": "PyTorch is not installed"}
    from benchmarks import torch_anp

    if args.model not in torch_anp.MODELS:
        log(f"no PyTorch ANP model for {args.model}: skipping the PyTorch comparison "
            f"(available: {', '.join(torch_anp.MODELS)})")
        return {}, {"skipped": f"no PyTorch model for {args.model}"}
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    runners = {
        "torch_plain": TorchRunner("torch_plain", args.model, args.batch, 1, False, args.dtype),
        "torch_anp_k1": TorchRunner("torch_anp_k1", args.model, args.batch, 1, True,
                                    args.dtype),
        "torch_anp_k3": TorchRunner("torch_anp_k3", args.model, args.batch, 3, True,
                                    args.dtype),
    }
    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(next(iter(runners.values())).trainer.device),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    return runners, info


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None],
                  command: str = "") -> dict[str, Any]:
    device = describe_device()
    unroll = device["platform"] == "cpu" if args.unroll == "auto" else args.unroll == "yes"
    args = argparse.Namespace(**vars(args))
    args.batch = args.batch or SPECS[args.model].batch
    batch = synthetic_batch(args.model, args.batch)
    log(f"{args.model}, batch {args.batch}, {args.dtype}, on {device['description']}")
    runners: dict[str, Any] = {}
    gpu_peaks: dict[str, int] = {}
    dev = jax.devices()[0]
    start = time.perf_counter()
    chosen = set(args.methods) | {"plain"}
    for method in methods(args.diagnose or bool(args.methods)):
        if args.methods and method.name not in chosen:
            continue
        runners[method.name] = JaxRunner(method, args.model, args.dtype, batch, unroll)
    log(f"  traced {len(runners)} steps in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, min(cpu_cores(), 4))) as pool:
        for runner in pool.map(JaxRunner.compile, runners.values()):
            log(f"  compiled {runner.method.name} in {runner.compile_seconds:.1f} s")
    log(f"  compiled everything in {time.perf_counter() - start:.1f} s")
    torch_info = None
    if args.torch:
        torch_runners, torch_info = _torch_runners(args, log)
        runners.update(torch_runners)
    for name, runner in runners.items():
        runner.run(args.warmup)
        stats = (dev.memory_stats() or {}) if device["platform"] != "cpu" else {}
        if "peak_bytes_in_use" in stats and not name.startswith("torch_"):
            gpu_peaks[name] = int(stats["peak_bytes_in_use"])
    log(f"  warmed up {len(runners)} methods")
    times, pairs = time_interleaved(runners, args.iters, args.repeats, 0, log)

    peak = peak_tflops(device, args.dtype, args.peak_tflops)
    wall = {name: t["wall"] for name, t in times.items()}
    cpu = {name: t["cpu"] for name, t in times.items()}
    jax_names = [name for name in runners if not name.startswith("torch_")]
    result: dict[str, Any] = {
        "device": device,
        "model": args.model,
        "model_spec": {"model": SPECS[args.model].model,
                       "options": dict(SPECS[args.model].options),
                       "note": SPECS[args.model].note},
        "image_shape": list(SPECS[args.model].image_shape),
        "load_average": os.getloadavg()[0],
        "process": os.getpid(),
        "batch": args.batch,
        "dtype": args.dtype,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "settings": {"iters": args.iters, "repeats": args.repeats, "warmup": args.warmup,
                     "unroll": unroll, "learning_rate": LEARNING_RATE},
        "methods": {name: {"k": runners[name].k,
                           "description": runners[name].method.description}
                    for name in runners},
        "per_update_ms": {name: 1e3 * statistics.median(wall[name]) for name in runners},
        "per_update_ms_quartiles": {name: [1e3 * q for q in _quartiles(wall[name])]
                                    for name in runners},
        "ratios": {name: statistics.median(pairs[name]["wall"])
                   for name in jax_names if name != "plain"},
        "ratio_quartiles": {name: _quartiles(pairs[name]["wall"])
                            for name in jax_names if name != "plain"},
    }
    if device["platform"] == "cpu":
        result["cpu_per_update_ms"] = {name: 1e3 * statistics.median(cpu[name])
                                       for name in runners}
        result["cpu_ratios"] = {name: statistics.median(pairs[name]["cpu"])
                                for name in jax_names if name != "plain"}
    result["images_per_second"] = {name: args.batch / (ms / 1e3)
                                   for name, ms in result["per_update_ms"].items()}
    result["memory"] = {name: dict(runners[name].memory) for name in jax_names}
    for name, peak_in_use in gpu_peaks.items():
        # Process-wide and cumulative: every earlier method's state is still alive.
        result["memory"][name]["device_peak_bytes_in_use_after_warmup"] = peak_in_use
    result["compile_seconds"] = {name: runners[name].compile_seconds for name in jax_names}
    result["flops_per_update"] = {name: runners[name].flops_per_update for name in jax_names}
    result["tflops"] = {name: (f / (result["per_update_ms"][name] / 1e3) / 1e12
                               if f else None)
                        for name, f in result["flops_per_update"].items()}
    result["peak_tflops"] = peak
    result["mfu"] = ({name: (t / peak if t else None) for name, t in result["tflops"].items()}
                     if peak else None)

    registers = {d: register_report(args.model, args.batch, d) for d in DTYPES}
    reg = dict(registers[args.dtype])
    anp_runner = runners.get("anp_k1")
    reg["measured_register_bytes"] = (_bytes(_registers(anp_runner.state.noise))
                                      if anp_runner else None)
    anp_peak = anp_runner.memory.get("peak_bytes") if anp_runner else None
    reg["register_fraction_of_anp_k1_peak"] = (reg["register_bytes"] / anp_peak
                                               if anp_peak else None)
    reg["by_dtype"] = {d: {key: registers[d][key] for key in
                           ("register_bytes", "noise_state_bytes",
                            "perturbed_activation_bytes")} for d in DTYPES}
    result["registers"] = reg
    finite = {name: float(runners[name].metrics["params_finite"]) for name in jax_names}
    result["params_finite"] = finite
    if torch_info is not None:
        if "skipped" not in torch_info:
            ms = result["per_update_ms"]
            torch_info["per_update_ms"] = {n: ms[f"torch_{n}"]
                                           for n in ("plain", "anp_k1", "anp_k3")}
            rel = {n: statistics.median(pairs[n]["wall"]) for n in pairs}
            rel["plain"] = 1.0
            torch_info["anp_k1_over_plain"] = rel["torch_anp_k1"] / rel["torch_plain"]
            # anp-jax's speed over PyTorch's (> 1: anp-jax is faster), each PyTorch block
            # and each JAX block timed next to a block of anp-jax's plain training.
            torch_info["speedup"] = {n: rel[f"torch_{n}"] / rel[n]
                                     for n in ("plain", "anp_k1", "anp_k3")}
            if device["platform"] == "cpu":
                rel = {n: statistics.median(pairs[n]["cpu"]) for n in pairs}
                rel["plain"] = 1.0
                torch_info["cpu_speedup"] = {n: rel[f"torch_{n}"] / rel[n]
                                             for n in ("plain", "anp_k1", "anp_k3")}
        result["torch"] = torch_info
    return result


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The results as a text table."""
    cpu = "cpu_ratios" in result
    head = ["method", "k", "ms/update", "ratio", "IQR"] + (["cpu ratio"] if cpu else []) + \
        ["img/s", "peak MiB", "GFLOP/upd"]
    rows = []
    for name, info in result["methods"].items():
        ratio = 1.0 if name == "plain" else result["ratios"].get(name)
        quart = result["ratio_quartiles"].get(name)
        row = [name, str(info["k"]), f"{result['per_update_ms'][name]:.2f}",
               "-" if ratio is None else f"{ratio:.3f}",
               "-" if not quart else f"{quart[0]:.2f}-{quart[1]:.2f}"]
        if cpu:
            c = 1.0 if name == "plain" else result["cpu_ratios"].get(name)
            row.append("-" if c is None else f"{c:.3f}")
        mem = result["memory"].get(name, {})
        flops = result["flops_per_update"].get(name)
        row += [f"{result['images_per_second'][name]:.0f}", _mib(mem.get("peak_bytes")),
                "-" if not flops else f"{flops / 1e9:.3f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = [f"{result['model']} batch {result['batch']} {result['dtype']}, "
             f"{result['device']['description']}, {result['date']}",
             fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    reg = result["registers"]
    lines.append("")
    lines.append(f"noise registers ({reg['dtype']}): {reg['register_bytes']:,} bytes = "
                 f"{reg['register_fraction_of_activations']:.2f} x the perturbed activations "
                 f"({reg['perturbed_activation_bytes']:,} bytes); whole noise state "
                 f"{reg['noise_state_bytes']:,} bytes; "
                 + (f"{reg['register_fraction_of_anp_k1_peak']:.1%} of the ANP k=1 step's peak"
                    if reg.get("register_fraction_of_anp_k1_peak") else ""))
    lines.append("registers by dtype: " + "; ".join(
        f"{d} {v['register_bytes']:,} bytes" for d, v in reg["by_dtype"].items()))
    if result.get("mfu"):
        lines.append("MFU: " + ", ".join(f"{n} {v:.1%}" for n, v in result["mfu"].items()
                                         if v is not None)
                     + f" (peak {result['peak_tflops']} TFLOP/s)")
    t = result.get("torch")
    if t:
        if "skipped" in t:
            lines.append(f"PyTorch: skipped ({t['skipped']})")
        else:
            lines.append(f"PyTorch {t['version']} on {t['device']}, {t['threads']} threads: "
                         + ", ".join(f"{n} {v:.2f} ms" for n, v in t["per_update_ms"].items())
                         + f"; its ANP k=1 / plain = {t['anp_k1_over_plain']:.3f}")
            lines.append("anp-jax speed over PyTorch (x, > 1: anp-jax faster): " + ", ".join(
                f"{n} {v:.2f}" for n, v in t["speedup"].items())
                + ("; by CPU time: " + ", ".join(f"{n} {v:.2f}" for n, v in
                                                  t["cpu_speedup"].items())
                   if "cpu_speedup" in t else ""))
    bad = [n for n, v in result["params_finite"].items() if v != 1.0]
    if bad:
        lines.append(f"warning: non-finite parameters after timing: {', '.join(bad)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- trainer


def _bare_step_runner(config: Any) -> tuple[Callable[[int], float], int]:
    """The trainer's step for ``config`` (the default job: digits CNN, ANP k=2, batch 32)
    as a bare jitted, donated, unrolled ``train_step`` on one synthetic mini-batch; returns
    a function ``n -> seconds per update of n mini-batches`` and ``k``."""
    if config.model not in SPECS:
        raise ValueError(f"--trainer: no benchmark shape for model {config.model!r}")
    anp = config.method == "anp"
    k = int(config.anp.k) if config.method in ("anp", "replay") else 1
    method = Method("trainer_step", anp, k, layers=config.anp.layers if anp else "all")
    runner = JaxRunner(method, config.model, config.dtype,
                       synthetic_batch(config.model, config.batch_size), unroll=True)
    runner.hparams.update(eps=jnp.float32(config.anp.epsilon if anp else 0.0),
                          alpha=jnp.float32(config.anp.alpha if anp else 0.0),
                          lr=jnp.float32(config.learning_rate))
    runner.compile()
    runner.run(3)

    def per_update(n: int) -> float:
        start = time.perf_counter()
        runner.run(n)
        return (time.perf_counter() - start) / (n * k)

    return per_update, k


def trainer_comparison(epochs: tuple[int, int], log: Callable[[str], None]
                       ) -> dict[str, Any]:
    """The trainer's steady state against its bare step, side by side in one process.

    ``anp_jax.trainer.train_and_evaluate`` runs the default config (with a fresh work
    directory each time) for ``epochs[0]`` epochs (untimed: it warms up whatever a loop
    keeps between runs, a compilation cache for instance), then ``epochs[1]`` and
    ``epochs[0]`` epochs again.  Its steady state per update is the difference of the
    two timed runs' ``train_seconds`` (the time in the training loop, compilation
    included) divided by the difference of their ``steps``; the same with the wall time
    of the whole call (training and evaluation) is reported too.  Blocks of the bare
    jitted step, one epoch of mini-batches each, are timed before, between and after the
    runs; their median is the reference.
    """
    import copy
    import tempfile

    from anp_jax import trainer as trainer_lib

    base = default_config.get_config()
    bare, k = _bare_step_runner(base)
    runs: list[dict[str, Any]] = []
    bare_blocks: list[float] = []
    batches_per_epoch = None

    def run(num_epochs: int) -> dict[str, Any]:
        config = copy.deepcopy(base)
        config.num_epochs = num_epochs
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            metrics = trainer_lib.train_and_evaluate(config, workdir, log=lambda m: None,
                                                     progress=False)
            wall = time.perf_counter() - start
        out = {"epochs": num_epochs, "wall_seconds": wall,
               "train_seconds": float(metrics.get("train_seconds", float("nan"))),
               "steps": int(metrics["steps"])}
        log(f"  trainer, {num_epochs:g} epochs: {out['steps']} updates, "
            f"{out['train_seconds']:.2f} s in the loop, {wall:.2f} s in all")
        return out

    for num_epochs in (epochs[0], epochs[1], epochs[0]):
        block = max(8, batches_per_epoch or 32)
        bare_blocks.append(bare(block))
        runs.append(run(num_epochs))
        batches_per_epoch = int(round(runs[-1]["steps"] / k / num_epochs))
    bare_blocks.append(bare(max(8, batches_per_epoch)))
    long, short = runs[1], runs[2]
    steps = long["steps"] - short["steps"]
    loop = (long["train_seconds"] - short["train_seconds"]) / steps
    whole = (long["wall_seconds"] - short["wall_seconds"]) / steps
    bare_ms = 1e3 * statistics.median(bare_blocks)
    return {
        "config": {"model": base.model, "method": base.method, "k": k,
                   "batch_size": base.batch_size, "dataset": base.dataset},
        "runs": runs,
        "bare_step_ms_per_update": bare_ms,
        "bare_step_ms_per_update_blocks": [1e3 * b for b in bare_blocks],
        "trainer_ms_per_update": 1e3 * loop,
        "trainer_ms_per_update_whole_call": 1e3 * whole,
        "trainer_over_bare": 1e3 * loop / bare_ms,
        "trainer_whole_call_over_bare": 1e3 * whole / bare_ms,
        "first_run_extra_seconds": runs[0]["wall_seconds"] - short["wall_seconds"],
        "load_average": os.getloadavg()[0],
    }


def format_trainer(t: dict[str, Any]) -> str:
    c = t["config"]
    return "\n".join([
        f"trainer ({c['model']}, {c['method']} k={c['k']}, batch {c['batch_size']}): "
        f"{t['trainer_ms_per_update']:.2f} ms per update in the loop "
        f"({t['trainer_ms_per_update_whole_call']:.2f} ms by whole calls) against "
        f"{t['bare_step_ms_per_update']:.2f} ms for the bare step: "
        f"{t['trainer_over_bare']:.3f}x ({t['trainer_whole_call_over_bare']:.3f}x)",
        "runs: " + "; ".join(f"{r['epochs']:g} epochs {r['steps']} updates "
                             f"{r['train_seconds']:.2f} s loop / {r['wall_seconds']:.2f} s all"
                             for r in t["runs"])])


# ----------------------------------------------------------------------------- suite


def _model_argv(args: argparse.Namespace, name: str, methods_: Sequence[str],
                json_path: str) -> list[str]:
    """The command line that times one model of the suite on its own (see run_suite)."""
    argv = ["--model", name, "--methods", ",".join(methods_), "--iters", str(args.iters),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dtype",
            args.dtype, "--unroll", args.unroll, "--json", json_path, "--quiet"]
    if args.no_tune_malloc:
        argv.append("--no-tune-malloc")
    if args.peak_tflops is not None:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def run_suite(args: argparse.Namespace, log: Callable[[str], None],
              command: str) -> dict[str, Any]:
    """``--suite cpu``: every model of ``--models`` (default :data:`CPU_SUITE`) at its
    default batch with the methods of :data:`SUITE_METHODS` (or ``--methods``), then the
    trainer comparison.  Each model is timed in a fresh process, as a user's run would be,
    so that none runs in the heap, threads and caches an earlier one left (in one run the
    Fashion VGG's plain step took 48.7 ms third in the suite and 35.5 ms alone right after;
    benchmarks/RESULTS.md, sections A and D); ``--in-process`` times them all here."""
    results = []
    methods_ = args.methods or SUITE_METHODS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in args.models or CPU_SUITE:
        if args.in_process:
            sub = argparse.Namespace(**vars(args))
            sub.model, sub.batch, sub.methods = name, None, methods_
            results.append(run_benchmark(sub, log, command))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.json")
                log(f"{name}: a process of its own")
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.step_time",
                     *_model_argv(args, name, methods_, path)],
                    cwd=root, stdout=subprocess.DEVNULL, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"step_time --suite: timing {name} failed (exit "
                                     f"{done.returncode})")
                with open(path) as f:
                    results.append(json.load(f))
        log(format_table(results[-1]))
    return {"suite": args.suite, "command": command, "date": results[0]["date"],
            "device": results[0]["device"], "models": results,
            "isolated": not args.in_process}


def _md_table(result: dict[str, Any]) -> list[str]:
    spec = result.get("model_spec", {})
    head = (f"**{result['model']}** ({spec.get('note') or spec.get('model', '')}), "
            f"batch {result['batch']}, {result['dtype']}: plain "
            f"{result['per_update_ms']['plain']:.2f} ms per update; load average "
            f"{result.get('load_average', float('nan')):.1f}")
    lines = [head, "", "| method | k | ms/update | ratio (IQR) | cpu ratio | GFLOP/update |",
             "|---|---|---|---|---|---|"]
    for name, info in result["methods"].items():
        if name.startswith("torch_"):
            continue
        ratio = 1.0 if name == "plain" else result["ratios"][name]
        quart = result["ratio_quartiles"].get(name)
        cpu = 1.0 if name == "plain" else result.get("cpu_ratios", {}).get(name)
        flops = result["flops_per_update"].get(name)
        lines.append(f"| {info['description']} (`{name}`) | {info['k']} | "
                     f"{result['per_update_ms'][name]:.2f} | {ratio:.3f}"
                     + (f" ({quart[0]:.2f}-{quart[1]:.2f})" if quart else "")
                     + f" | {'-' if cpu is None else f'{cpu:.3f}'} | "
                     + ("-" if not flops else f"{flops / 1e9:.3f}") + " |")
    if "anp_k2" in result["ratios"] and "input_floor" in result["ratios"]:
        over = [f"{r['anp_k2'] / r['input_floor']:.3f} ({clock})" for clock, r in
                (("wall", result["ratios"]), ("cpu", result.get("cpu_ratios"))) if r]
        lines += ["", "ANP k=2 over the input floor (plain + d loss/d input): "
                  + ", ".join(over)]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The run as Markdown: command, machine, date, a table per model, the trainer."""
    models = result.get("models") or ([result] if "methods" in result else [])
    device = result.get("device") or (models[0]["device"] if models else describe_device())
    lines = [MD_BEGIN, "",
             f"Generated by `{result.get('command', '')}` on {result.get('date', '')}; "
             f"machine: {device['description']}, jax {device['jax']}; load average "
             f"{os.getloadavg()[0]:.1f} at the end of the run"
             + (f"; the whole run took {result['run_seconds']:.0f} s"
                if "run_seconds" in result else "")
             + ("; large host allocations from the heap (`anp_jax.cli.keep_freed_memory`, "
                "as anp-jax's command lines)" if result.get("heap_allocator") else "")
             + ".", ""]
    for r in models:
        lines += _md_table(r) + [""]
    t = result.get("trainer")
    if t:
        c = t["config"]
        lines += [f"**The trainer against its bare step** (the default config: {c['model']}, "
                  f"{c['method']} k={c['k']}, batch {c['batch_size']}, {c['dataset']}; load "
                  f"average {t['load_average']:.1f}):", "",
                  "| | ms per update | over the bare step |", "|---|---|---|",
                  f"| bare jitted `train_step` (median of "
                  f"{len(t['bare_step_ms_per_update_blocks'])} blocks) | "
                  f"{t['bare_step_ms_per_update']:.2f} | 1 |",
                  f"| `train_and_evaluate`, steady state of the loop (`train_seconds`) | "
                  f"{t['trainer_ms_per_update']:.2f} | {t['trainer_over_bare']:.3f} |",
                  f"| the same from whole calls (wall time, evaluation included) | "
                  f"{t['trainer_ms_per_update_whole_call']:.2f} | "
                  f"{t['trainer_whole_call_over_bare']:.3f} |", "",
                  "Runs (epochs, updates, seconds in the loop, seconds in all): "
                  + "; ".join(f"{r['epochs']:g}, {r['steps']}, {r['train_seconds']:.2f}, "
                              f"{r['wall_seconds']:.2f}" for r in t["runs"])
                  + " (the first is the warm-up).", ""]
    lines.append(MD_END)
    return "\n".join(lines)


def write_markdown(path: str, text: str) -> None:
    """Replaces the generated block of ``path`` (between the markers) with ``text``, or
    appends it; written atomically."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    if MD_BEGIN in old and MD_END in old:
        head, rest = old.split(MD_BEGIN, 1)
        new = head + text + rest.split(MD_END, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + text + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from anp_jax import cli

    args = parse_args(argv)
    heap = cli.keep_freed_memory(not args.no_tune_malloc)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    command = ("python -m benchmarks.step_time " + " ".join(
        list(argv) if argv is not None else sys.argv[1:])).strip()
    start = time.perf_counter()
    if args.suite:
        result = run_suite(args, log, command)
    elif args.trainer and "--model" not in (argv if argv is not None else sys.argv[1:]):
        result = {"command": command, "date": datetime.date.today().isoformat(),
                  "device": describe_device()}
    else:
        result = run_benchmark(args, log, command)
        print(format_table(result))
        print("ratios (time per update / plain): " + json.dumps(
            {k: round(v, 3) for k, v in result["ratios"].items()}))
    if args.trainer or args.suite:
        log("the trainer against its bare step")
        result["trainer"] = trainer_comparison(args.trainer_epochs, log)
        print(format_trainer(result["trainer"]))
    result["run_seconds"] = time.perf_counter() - start
    result["heap_allocator"] = heap
    if args.suite:
        for r in result["models"]:
            print(format_table(r))
    if args.results_md:
        write_markdown(args.results_md, markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
