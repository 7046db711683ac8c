"""Adversarial training inputs: PGD-AT, TRADES, Fast-AT and Free-AT, to combine with ANP.

An :class:`Adversary` says how the input of each parameter update is made from the clean
mini-batch.  The train step (:func:`anp_jax.train.train_step`) calls
:func:`adversarial_inputs` before every update and :func:`update_free_delta` after it;
ANP's hidden-layer noise is added on top, in the same forward pass, whatever the
adversary.  Attacks during training see the model in training mode (batch statistics,
no running-average update) and without ANP noise.

Budgets are in the data's [0, 1] pixel scale, L-infinity (the methods' own) or L2 (each
method with its steps along the normalised gradient, projected onto the L2 ball).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from anp_jax import attacks

KINDS = ("pgd", "trades", "fast", "free")
NORMS = attacks.NORMS  # the attacks' norms, one list


@dataclasses.dataclass(frozen=True)
class Adversary:
    """How to craft training inputs (static: part of the compiled program).

    Attributes:
      kind: ``"pgd"`` (Madry et al.: PGD with random start), ``"trades"`` (Zhang et al.:
        KL attack, loss CE + beta * KL), ``"fast"`` (Wong et al.: one FGSM step from a
        random start, step 1.25 * epsilon), ``"free"`` (Shafahi et al.: the input
        perturbation is updated with the input gradient of every replay's own backward
        pass and carried over to the next mini-batch).
      epsilon: budget in pixel units, in ``norm``.
      step_size: attack step (PGD, TRADES); Fast-AT uses 1.25 * epsilon, Free-AT epsilon.
      steps: attack steps (PGD, TRADES).
      beta: TRADES' weight of the robustness (KL) term.
      norm: ``"linf"`` (steps along the gradient's sign, random starts uniform in the cube)
        or ``"l2"`` (steps along ``g / ||g||_2``, random starts uniform in the L2 ball,
        TRADES' start as in L-inf); every iterate is projected onto the ball and [0, 1].
        Fast-AT in L2 is single-step L2 adversarial training from a random start.
    """

    kind: str
    epsilon: float
    step_size: float
    steps: int = 7
    beta: float = 6.0
    norm: str = "linf"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown adversary {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown adversary norm {self.norm!r}; choose from "
                             f"{', '.join(NORMS)}")


LogitsFn = Callable[[jax.Array], jax.Array]


def _loop(n: int, body: Callable, init, unroll: bool):
    if unroll:
        for i in range(n):
            init = body(i, init)
        return init
    return jax.lax.fori_loop(0, n, body, init)


def _project(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Per-example KL(p || q) between the softmax distributions, ``[B]``."""
    log_p, log_q = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def adversarial_inputs(adv: Adversary | None, fn: LogitsFn, x: jax.Array, y: jax.Array,
                       delta: jax.Array, rng: jax.Array, unroll: bool) -> jax.Array:
    """The input of one update: ``x`` itself, or its adversarial version.

    Args:
      adv: the adversary, or None for clean inputs.
      fn: the model in training mode without noise, ``images -> logits``.
      x, y: clean images ``[B, H, W, C]`` in [0, 1] and labels ``[B]``.
      delta: Free-AT's carried perturbation, shaped like ``x``.
      rng: randomness of the random starts.
      unroll: unroll the attack steps (fast on CPU) instead of a ``lax.fori_loop``.
    """
    if adv is None:
        return x
    eps = adv.epsilon
    if adv.kind == "free":
        return jnp.clip(x + delta, 0.0, 1.0)
    if adv.kind == "trades":
        target = jax.lax.stop_gradient(fn(x))
        start = x + 0.001 * jax.random.normal(rng, x.shape, x.dtype)

        def objective(z: jax.Array) -> jax.Array:
            return jnp.sum(kl_divergence(target, fn(z)))

        step, steps = adv.step_size, adv.steps
    else:
        start = (x + jax.random.uniform(rng, x.shape, x.dtype, -eps, eps)
                 if adv.norm == "linf" else attacks.uniform_start(rng, x, eps, "l2"))

        def objective(z: jax.Array) -> jax.Array:
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(fn(z), y))

        step, steps = ((1.25 * eps, 1) if adv.kind == "fast" else (adv.step_size, adv.steps))
    grad = jax.grad(objective)
    if adv.norm == "linf":
        def project(z: jax.Array) -> jax.Array:
            return _project(z, x, eps)
    else:
        def project(z: jax.Array) -> jax.Array:
            return attacks.project(z, x, eps, "l2")

    def body(i, z: jax.Array) -> jax.Array:
        del i
        return project(z + step * attacks.ascent_direction(grad(z), adv.norm))

    return jax.lax.stop_gradient(_loop(steps, body, project(start), unroll))


def update_free_delta(adv: Adversary | None, delta: jax.Array, input_grad: jax.Array
                      ) -> jax.Array:
    """Free-AT: ``delta <- clip(delta + eps * sign(dloss/dx), -eps, eps)`` (L2: ``delta +
    eps g / ||g||_2`` projected onto the ball); else unchanged."""
    if adv is None or adv.kind != "free":
        return delta
    if adv.norm == "l2":
        moved = delta + adv.epsilon * attacks.ascent_direction(input_grad, "l2")
        return moved * jnp.minimum(1.0, adv.epsilon / (attacks.per_example_norm(moved)
                                                       + 1e-12))
    return jnp.clip(delta + adv.epsilon * jnp.sign(input_grad), -adv.epsilon, adv.epsilon)
