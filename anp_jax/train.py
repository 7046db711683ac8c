"""The train state and the pure train steps (plain training and ANP).

One step function serves plain training, ANP and the "replay" control:

* it receives one mini-batch and the hyper-parameters of that mini-batch
  (``eps``, ``alpha``, ``k``, ``lr``: traced scalars, so schedules never recompile);
* it makes ``k`` parameter updates on the mini-batch (``lax.fori_loop``), as the
  official ANP code does.  Each forward pass adds the current noise at the selected
  perturbation points; the single backward pass returns the gradients of the parameters
  *and* of the perturbations, which are ``dloss/dz`` at every selected point;
* the noise transform (:mod:`anp_jax.noise`) turns those activation gradients into the
  noise of the next forward pass.

With no selected layers it is plain training (``k`` replays of each mini-batch when
``k > 1``); with ``eps = 0`` it is the replay control.

Under ``jax.pmap`` pass ``axis_name``: gradients and metrics are averaged across
devices, the models' BatchNorm statistics are synchronised (they were built with the same
``axis_name``) and each device keeps the noise registers of its own examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from anp_jax import adversarial
from anp_jax import noise as noise_lib
from anp_jax.adversarial import Adversary
from anp_jax.models import ACTIVATIONS, PERTURBATIONS

PyTree = Any
Batch = Mapping[str, jax.Array]  # {"image": [B, H, W, C] float in [0, 1], "label": [B] int}


@struct.dataclass
class NoiseState:
    """The noise of the next forward pass and the noise transform's state (registers)."""

    injection: PyTree  # {point name: [B, ...]} in the activation dtype
    transform: PyTree


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    ``step`` counts parameter updates (``k`` per mini-batch), ``batches`` counts
    mini-batches (the position in the data).
    """

    step: jax.Array
    batches: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    noise: NoiseState
    adv_delta: jax.Array  # Free-AT's input perturbation, [B, H, W, C] (zeros otherwise)
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    noise_tx: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)
    layers: tuple[str, ...] = struct.field(pytree_node=False, default=())
    reset_noise: bool = struct.field(pytree_node=False, default=True)


def create_train_state(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...],
                       tx: optax.GradientTransformation,
                       noise_tx: optax.GradientTransformationExtraArgs | None = None,
                       layers: tuple[str, ...] = (), reset_noise: bool = True) -> TrainState:
    """Initialises a train state.

    Args:
      model: a model of :mod:`anp_jax.models`.
      rng: PRNG key; split into parameter init and the training stream (the noise's
        random starts are drawn from the training stream, see :func:`reset_noise`).
      image_shape: ``[B, H, W, C]``, with ``B`` the batch per device: the noise registers
        are shaped by it.
      tx: the optimizer; build it with ``optax.inject_hyperparams`` so that the step can
        set ``learning_rate`` (see :func:`make_optimizer`).
      noise_tx: the noise transform, an optax transform over ``{point: [B, ...]}`` (default
        :func:`anp_jax.noise.anp`); ``update`` gets the step's hyper-parameters, ``key``
        (reset only) and ``activations`` as extra arguments.
      layers: the perturbation points to perturb (names, in model order).
      reset_noise: reset the registers at every mini-batch (the official rule).
    """
    noise_tx = noise_tx or noise_lib.anp()
    init_rng, _, train_rng = jax.random.split(rng, 3)
    # Compiled once: initialising op by op is slow for deep models.
    variables = jax.jit(lambda r: model.init({"params": r, "dropout": r},
                                             jnp.zeros(image_shape, jnp.float32),
                                             train=False))(init_rng)
    perturbations = variables.get(PERTURBATIONS, {})
    template = {name: jnp.zeros_like(perturbations[name]) for name in layers}
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        batches=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        noise=NoiseState(template, noise_tx.init(template)),
        adv_delta=jnp.zeros(image_shape, jnp.float32),
        rng=train_rng,
        apply_fn=model.apply,
        tx=tx,
        noise_tx=noise_tx,
        layers=tuple(layers),
        reset_noise=reset_noise,
    )


def make_optimizer(name: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                   nesterov: bool = False) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay (the official setup), or Adam(W).

    The learning rate is a hyper-parameter set by the train step at every mini-batch
    (``hparams["lr"]``), so it follows a schedule of the epoch, whatever ``k`` is.
    """
    def sgd(learning_rate: float) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(learning_rate, momentum=momentum or None,
                                     nesterov=nesterov))

    def adam(learning_rate: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate, weight_decay=weight_decay)

    makers = {"sgd": sgd, "adam": adam}
    if name not in makers:
        raise ValueError(f"unknown optimizer {name!r}; choose from: {', '.join(makers)}")
    return optax.inject_hyperparams(makers[name])(learning_rate=0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _set_learning_rate(opt_state: optax.OptState, lr: jax.Array) -> optax.OptState:
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, jnp.asarray(hyper["learning_rate"]).dtype)
    return opt_state._replace(hyperparams=hyper)


def _forward(params: PyTree, injection: PyTree, batch_stats: PyTree, state: TrainState,
             images: jax.Array, rng: jax.Array) -> tuple[jax.Array, PyTree, PyTree]:
    """Training-mode logits with noise ``injection``, the updated batch statistics, and
    the activations at the points of ``injection`` (before their noise)."""
    variables = {"params": params, PERTURBATIONS: injection}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    logits, updates = state.apply_fn(variables, images, train=True,
                                     mutable=["batch_stats", ACTIVATIONS], rngs={"dropout": rng})
    activations = {name: updates[ACTIVATIONS][name] for name in injection}
    return logits, updates.get("batch_stats", batch_stats), activations


def _loss_fn(params: PyTree, injection: PyTree, images: jax.Array, state: TrainState,
             batch: Batch, rng: jax.Array, adversary: Adversary | None
             ) -> tuple[jax.Array, tuple[jax.Array, PyTree, PyTree]]:
    """Cross-entropy on ``images`` (TRADES: CE on the clean batch + beta * KL to
    ``images``), with the noise ``injection`` in every forward pass; the auxiliary output
    is the logits, batch statistics and activations (at the points, on ``images``)."""
    if adversary is not None and adversary.kind == "trades":
        logits, batch_stats, _ = _forward(params, injection, state.batch_stats, state,
                                          batch["image"], rng)
        logits_adv, batch_stats, activations = _forward(params, injection, batch_stats, state,
                                                        images, rng)
        robust = jnp.mean(adversarial.kl_divergence(logits, logits_adv))
        return cross_entropy(logits, batch["label"]) + adversary.beta * robust, \
            (logits, batch_stats, activations)
    logits, batch_stats, activations = _forward(params, injection, state.batch_stats, state,
                                                images, rng)
    return cross_entropy(logits, batch["label"]), (logits, batch_stats, activations)


def _attack_model(state: TrainState, rng: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """The model as the training-time attacks see it: training mode, no noise, no update
    of the running statistics."""
    return lambda images: _forward(state.params, {}, state.batch_stats, state, images, rng)[0]


def reset_noise(state: TrainState, hparams: Mapping[str, jax.Array],
                axis_name: str | None = None) -> NoiseState:
    """Fresh registers for a new mini-batch, and the noise of its first forward pass: the
    update of zero gradients with ``key`` (a random start's draw, per mini-batch and
    device) and zero ``activations`` (none is known before the first forward pass)."""
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.batches), 1)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    zeros = jax.tree.map(jnp.zeros_like, state.noise.injection)
    injection, transform = state.noise_tx.update(zeros, state.noise_tx.init(zeros), None,
                                                 key=rng, activations=zeros, **hparams)
    return NoiseState(injection, transform)


def train_step(state: TrainState, batch: Batch, hparams: Mapping[str, jax.Array],
               axis_name: str | None = None, static_k: int | None = None,
               adversary: Adversary | None = None, next_noise: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One mini-batch: ``hparams["k"]`` parameter updates with progressive noise.

    Args:
      state: the train state (per device under pmap).
      batch: ``{"image": [B, H, W, C], "label": [B]}``.
      hparams: scalars ``eps``, ``alpha``, ``k`` (int) and ``lr`` for this mini-batch.
      axis_name: the pmap axis, or None on a single device without pmap.
      static_k: if given, the ``k`` updates are unrolled in the traced program and
        ``hparams["k"]`` is ignored (one compilation per value of ``k``).  XLA:CPU runs
        convolution gradients inside loops and conditionals several times slower than
        outside them (3 to 4 times per update on LeNet), so the trainer unrolls on CPU;
        on GPU and TPU the default, a ``lax.fori_loop`` over a traced ``k``, compiles
        once for every ``k``.
      adversary: adversarial training (PGD-AT, TRADES, Fast-AT, Free-AT; see
        :mod:`anp_jax.adversarial`); each of the ``k`` updates crafts its own input.
        Combined with ANP when the state has perturbation points.
      next_noise: with ``False``, registers reset per mini-batch and ``static_k``, the
        noise after the last of the ``k`` updates is not made: the next mini-batch resets
        the registers anyway, so the returned state keeps the noise of the last forward pass
        instead, and the last update needs no activation gradients (at the input point they
        cost a convolution of their own: on LeNet at batch 128 that update is ~7% faster).
        The parameters, batch statistics, optimizer state and metrics are the same bits;
        only ``state.noise`` differs.  The trainer passes ``False`` where it applies.

    Returns:
      The new state and metrics averaged over the ``k`` updates (and devices): ``loss``
      (mean cross-entropy under noise), ``accuracy`` and ``noise_norm`` (mean per-example
      L2 norm of the noise injected in the last forward pass, summed over points),
      ``params_finite`` (1.0 when every parameter is finite after the updates).
    """
    hparams = {name: jnp.asarray(v) for name, v in hparams.items()}
    if state.reset_noise:
        noise_state = reset_noise(state, hparams, axis_name)
    else:  # registers persist: only the first mini-batch starts afresh (random start)
        def fresh() -> NoiseState:
            return reset_noise(state, hparams, axis_name)
        noise_state = jax.lax.cond(state.batches == 0, fresh, lambda: state.noise)
    grad_fn = jax.value_and_grad(_loss_fn, argnums=(0, 1, 2), has_aux=True)

    def injected_norm(injection: PyTree) -> jax.Array:
        return sum((jnp.mean(noise_lib.per_example_norm(v)) for v in
                    jax.tree.leaves(injection)), jnp.zeros((), jnp.float32))

    def body(i: jax.Array, carry: tuple, last: bool = False) -> tuple:
        st, noise, loss_sum, correct_sum, _ = carry
        rng = jax.random.fold_in(st.rng, st.step)
        if axis_name is not None:  # dropout masks and random starts differ between devices
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        attack_rng, rng = jax.random.split(rng)
        images = adversarial.adversarial_inputs(
            adversary, _attack_model(st, rng), batch["image"], batch["label"], st.adv_delta,
            attack_rng, unroll=static_k is not None)
        (loss, (logits, batch_stats, activations)), (grads, noise_grads, input_grads) = grad_fn(
            st.params, noise.injection, images, st, batch, rng, adversary)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        opt_state = _set_learning_rate(st.opt_state, hparams["lr"])
        updates, opt_state = st.tx.update(grads, opt_state, st.params)
        params = optax.apply_updates(st.params, updates)
        if last:  # the next noise would be discarded: keep this pass's (see next_noise)
            new_noise = noise
        else:
            new_noise = NoiseState(*st.noise_tx.update(noise_grads, noise.transform, None,
                                                       activations=activations, **hparams))
        st = st.replace(step=st.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state,
                        adv_delta=adversarial.update_free_delta(adversary, st.adv_delta,
                                                                input_grads))
        correct = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return (st, new_noise, loss_sum + loss, correct_sum + correct,
                injected_norm(noise.injection))

    zero = jnp.zeros((), jnp.float32)
    carry = (state, noise_state, zero, zero, zero)
    if static_k is None:
        k = jnp.maximum(hparams["k"].astype(jnp.int32), 1)
        carry = jax.lax.fori_loop(0, k, body, carry)
    else:
        k = static_k
        skip_last = not next_noise and state.reset_noise
        for i in range(static_k):
            carry = body(jnp.int32(i), carry, last=skip_last and i == static_k - 1)
    state, noise_state, loss_sum, correct_sum, noise_norm = carry
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in
                                  jax.tree.leaves(state.params)])).astype(jnp.float32)
    metrics = {"loss": loss_sum / k, "accuracy": correct_sum / k, "noise_norm": noise_norm,
               "params_finite": finite}
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    state = state.replace(batches=state.batches + 1, noise=noise_state)
    return state, metrics


def predict(state: TrainState, images: jax.Array) -> jax.Array:
    """Logits of the model without noise (evaluation mode)."""
    return logits_fn(state.apply_fn, state.params, state.batch_stats)(images)


def logits_fn(apply_fn: Callable, params: PyTree, batch_stats: PyTree
              ) -> Callable[[jax.Array], jax.Array]:
    """The evaluation-mode model as a function ``images -> logits`` (for attacks)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats

    def fn(images: jax.Array) -> jax.Array:
        return apply_fn(variables, images, train=False)

    return fn
