"""Time per parameter update: plain training, ANP, the replay control, adversarial training.

    python -m benchmarks.step_time [--json FILE] [--model digits_cnn|vgg16|resnet18|resnet50]
        [--batch N] [--iters N] [--repeats N] [--dtype float32|bfloat16] [--torch]

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

Synthetic data: uniform pixels in [0, 1] and random labels.  Models: ``digits_cnn`` at
8x8x1 (default, batch 128, for CPU), ``vgg16`` and ``resnet18`` at 32x32x3, ``resnet50``
at 224x224x3 with 1000 classes.  Steps are unrolled on CPU (``static_k``, as the trainer
does there); elsewhere ``k`` is a ``lax.fori_loop`` unless ``--unroll yes``.

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
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anp_jax import adversarial, train
from anp_jax import noise as noise_lib
from anp_jax.adversarial import Adversary
from anp_jax.configs import default as default_config
from anp_jax.models import PERTURBATIONS, create_model
from anp_jax.trainer import DTYPES

IMAGE_SHAPES = {"digits_cnn": (8, 8, 1), "vgg16": (32, 32, 3), "resnet18": (32, 32, 3),
                "resnet50": (224, 224, 3)}
NUM_CLASSES = {"resnet50": 1000}
RATIO_KEYS = ("anp_k1", "anp_k3", "replay_k3", "pgd_at", "trades", "fast_at", "free_at")
LEARNING_RATE = 0.01
# Dense peak TFLOP/s by device kind (NVIDIA's data sheets; float32 matmuls and convolutions
# run as TF32 under JAX's default precision on these GPUs).  Override with --peak-tflops.
PEAK_TFLOPS = {"H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},  # H100 SXM
               "H100 PCIe": {"bfloat16": 756.5, "float32": 378.0},
               "H200": {"bfloat16": 989.4, "float32": 494.7}}


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of training: ANP or not, ``k`` updates per mini-batch, an adversary."""

    name: str
    anp: bool
    k: int
    adversary: Adversary | None = None
    noise_tx: Callable[[], optax.GradientTransformationExtraArgs] = noise_lib.anp
    step: Callable | None = None  # a train step other than train.train_step (--diagnose)
    stateless_noise: bool = False  # keep no noise in the train state (--diagnose)
    description: str = ""


def methods(diagnose: bool = False) -> list[Method]:
    """The timed methods; attack budgets and Free-AT's replays from the default config."""
    adv = default_config.get_config().adv
    out = [
        Method("plain", False, 1, description="plain training"),
        Method("anp_k1", True, 1, description="ANP, all points, k=1"),
        Method("anp_k3", True, 3, description="ANP, all points, k=3 (3 updates)"),
        Method("replay_k3", False, 3, description="replay: k=3 updates, no noise"),
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
            Method("anp_k1_skip_last", True, 1, step=proposed_train_step,
                   description="ANP k=1, no noise update after the last update"),
            Method("anp_k1_proposed", True, 1, step=proposed_train_step, stateless_noise=True,
                   description="ANP k=1, prototype of the recommended train step"),
            Method("anp_k3_proposed", True, 3, step=proposed_train_step, stateless_noise=True,
                   description="ANP k=3, prototype of the recommended train step"),
        ]
    return out


def proposed_train_step(state: train.TrainState, batch: train.Batch,
                        hparams: dict[str, jax.Array], static_k: int,
                        adversary: Adversary | None = None,
                        template: dict[str, jax.ShapeDtypeStruct] | None = None
                        ) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """A prototype of the change to :func:`anp_jax.train.train_step` that RESULTS.md
    recommends, for ``--diagnose`` only (single device, unrolled ``k``).

    With registers reset at every mini-batch, the noise made after the last of the ``k``
    updates is never used: this step neither asks for the activation gradients of the last
    update nor runs the noise transform after it, reports ``noise_norm`` of the last noise
    actually injected, and hands the (reset-anyway) noise state back unchanged instead of
    writing new registers.  With ``template`` (the shapes of the perturbation points) the
    state carries no noise at all: the registers are made, used and dropped inside the
    step.  The parameter updates are those of ``train_step``.
    """
    hparams = {name: jnp.asarray(v) for name, v in hparams.items()}
    skip_last = state.reset_noise
    if template is not None:  # only the shapes are needed to reset the registers
        zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in template.items()}
        noise_state = train.reset_noise(state.replace(noise=train.NoiseState(zeros, ())),
                                        hparams)
    else:
        noise_state = train.reset_noise(state, hparams) if state.reset_noise else state.noise
    zero = jnp.zeros((), jnp.float32)
    st, noise, loss_sum, correct_sum = state, noise_state, zero, zero
    for i in range(static_k):
        last = skip_last and i == static_k - 1
        rng = jax.random.fold_in(st.rng, st.step)
        attack_rng, rng = jax.random.split(rng)
        images = adversarial.adversarial_inputs(
            adversary, train._attack_model(st, rng), batch["image"], batch["label"],
            st.adv_delta, attack_rng, unroll=True)
        argnums = (0, 2) if last else (0, 1, 2)
        grad_fn = jax.value_and_grad(train._loss_fn, argnums=argnums, has_aux=True)
        (loss, (logits, batch_stats, activations)), grads = grad_fn(
            st.params, noise.injection, images, st, batch, rng, adversary)
        param_grads, input_grads = grads[0], grads[-1]
        opt_state = train._set_learning_rate(st.opt_state, hparams["lr"])
        updates, opt_state = st.tx.update(param_grads, opt_state, st.params)
        params = optax.apply_updates(st.params, updates)
        if not last:
            injection, transform = st.noise_tx.update(grads[1], noise.transform, None,
                                                      activations=activations, **hparams)
            noise = train.NoiseState(injection, transform)
        st = st.replace(step=st.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state,
                        adv_delta=adversarial.update_free_delta(adversary, st.adv_delta,
                                                                input_grads))
        loss_sum = loss_sum + loss
        correct_sum = correct_sum + jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    noise_norm = sum((jnp.mean(noise_lib.per_example_norm(v)) for v in
                      jax.tree.leaves(noise.injection)), zero)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in
                                  jax.tree.leaves(st.params)])).astype(jnp.float32)
    metrics = {"loss": loss_sum / static_k, "accuracy": correct_sum / static_k,
               "noise_norm": noise_norm, "params_finite": finite}
    kept = state.noise if skip_last else noise
    return st.replace(batches=st.batches + 1, noise=kept), metrics


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
    x = jax.ShapeDtypeStruct((batch,) + IMAGE_SHAPES[model_name], jnp.float32)
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
    shape = (batch,) + IMAGE_SHAPES[model_name]
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
    return create_model(model_name, num_classes=NUM_CLASSES.get(model_name, 10),
                        dtype=DTYPES[dtype])


def synthetic_batch(model_name: str, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shape = (batch,) + IMAGE_SHAPES[model_name]
    return {"image": jnp.asarray(rng.uniform(size=shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, NUM_CLASSES.get(model_name, 10), batch),
                                 jnp.int32)}


@functools.cache
def _state_factory(model_name: str, dtype: str, image_shape: tuple[int, ...], anp: bool,
                   noise_tx: Callable[[], optax.GradientTransformationExtraArgs]
                   ) -> Callable[[jax.Array], train.TrainState]:
    """A jitted :func:`anp_jax.train.create_train_state` (one compilation, where running it
    op by op would compile dozens of small programs), shared by methods with the same
    kind of state; every call returns fresh buffers."""
    model = build_model(model_name, dtype)
    layers = model.perturbation_points() if anp else ()

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
        self.state = _state_factory(model_name, dtype, tuple(batch["image"].shape), method.anp,
                                    method.noise_tx)(jax.random.PRNGKey(seed))
        if method.step is not None:
            fn = functools.partial(method.step, static_k=method.k, adversary=method.adversary)
            if method.stateless_noise:
                noise = self.state.noise
                template = {name: jax.ShapeDtypeStruct(v.shape, v.dtype)
                            for name, v in noise.injection.items()}
                empty = self.state.noise_tx.init({})
                self.state = self.state.replace(noise=train.NoiseState({}, empty))
                fn = functools.partial(fn, template=template)
        else:
            fn = functools.partial(train.train_step, static_k=method.k if unroll else None,
                                   adversary=method.adversary)
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
        if flops is not None and not unroll and method.step is None:
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
    p.add_argument("--model", choices=tuple(IMAGE_SHAPES), default="digits_cnn")
    p.add_argument("--batch", type=int, default=128)
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
    args = p.parse_args(argv)
    for field in ("batch", "iters", "repeats"):
        if getattr(args, field) < 1:
            p.error(f"--{field} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
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
    batch = synthetic_batch(args.model, args.batch)
    log(f"{args.model}, batch {args.batch}, {args.dtype}, on {device['description']}")
    runners: dict[str, Any] = {}
    gpu_peaks: dict[str, int] = {}
    dev = jax.devices()[0]
    start = time.perf_counter()
    for method in methods(args.diagnose):
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
        "image_shape": list(IMAGE_SHAPES[args.model]),
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
    anp_state = runners["anp_k1"].state
    reg["measured_register_bytes"] = _bytes(_registers(anp_state.noise))
    anp_peak = runners["anp_k1"].memory.get("peak_bytes")
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    command = "python -m benchmarks.step_time " + " ".join(
        list(argv) if argv is not None else sys.argv[1:])
    result = run_benchmark(args, log, command.strip())
    print(format_table(result))
    print("ratios (time per update / plain): " + json.dumps(
        {k: round(v, 3) for k, v in result["ratios"].items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
