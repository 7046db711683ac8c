"""Robustness metrics over a whole split: clean, adversarial and corruption accuracy.

The model is evaluated without noise.  Every batch goes through one pmapped function
that returns, per metric, the number of correctly classified real (unmasked) examples;
the counts are summed over batches and devices, so each example counts exactly once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anp_jax import attacks, corruptions
from anp_jax import data as data_lib
from anp_jax.train import logits_fn

PyTree = object


def parse_corruption_id(corruption: str) -> tuple[str, int]:
    """``"gaussian_noise_3"`` -> ``("gaussian_noise", 3)``; ValueError if unknown."""
    name, _, severity = corruption.rpartition("_")
    if name not in corruptions.CORRUPTIONS or not severity.isdigit() \
            or not 1 <= int(severity) <= 5:
        raise ValueError(f"unknown corruption {corruption!r}: expected NAME_SEVERITY with "
                         f"severity 1..5 and NAME one of {', '.join(corruptions.CORRUPTIONS)}")
    return name, int(severity)


def validate_attack_id(attack: str) -> None:
    """Raises ValueError with a clear message if ``attack`` is not a known attack id."""
    try:
        name, _, _, _ = attacks.parse_attack_id(attack)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unknown attack {attack!r} ({err})") from None
    if name not in attacks.ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known attacks: {', '.join(attacks.ATTACKS)}")


def run_attack(attack: str, fn: Callable[[jax.Array], jax.Array], x: jax.Array,
               y: jax.Array, rng: jax.Array) -> jax.Array:
    """Adversarial images for the attack id ``attack`` (e.g. ``pgd10_linf_0.1``)."""
    name, norm, eps, steps = attacks.parse_attack_id(attack)
    return craft(name, norm, eps, steps, fn, x, y, rng)


def craft(name: str, norm: str, eps: float | jax.Array, steps: int | None,
          fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
          rng: jax.Array) -> jax.Array:
    """Adversarial images of attack ``name`` (``fgsm``, ``stepll``, ``pgd``, ``mifgsm``,
    ``apgd``) with ``norm``, budget ``eps`` (may be traced) and ``steps``."""
    if name == "fgsm":
        return attacks.fgsm(fn, x, y, eps, norm=norm)
    if name == "stepll":
        return attacks.step_ll(fn, x, y, eps)
    if name == "pgd":
        return attacks.pgd(fn, x, y, eps, rng=rng, num_steps=steps, norm=norm)
    if name == "mifgsm":
        return attacks.mi_fgsm(fn, x, y, eps, num_steps=steps)
    if name == "apgd":
        return attacks.apgd_ce(fn, x, y, eps, rng=rng, num_steps=steps, norm=norm)
    raise ValueError(f"unknown attack {name!r}")


def _correct(fn: Callable, images: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum((jnp.argmax(fn(images), -1) == labels) & mask)


def _eval_batch(params: PyTree, batch_stats: PyTree, batch: dict, rng: jax.Array, *,
                apply_fn: Callable, attack_ids: Sequence[str],
                corruption_ids: Sequence[str], axis_name: str) -> dict[str, jax.Array]:
    fn = logits_fn(apply_fn, params, batch_stats)
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    counts = {"clean": _correct(fn, x, y, mask), "loss_sum": jnp.sum(
        jnp.where(mask, _per_example_ce(fn(x), y), 0.0))}
    for i, attack in enumerate(attack_ids):
        x_adv = run_attack(attack, fn, x, y, jax.random.fold_in(rng, i))
        counts[f"attack/{attack}"] = _correct(fn, x_adv, y, mask)
    for i, corruption in enumerate(corruption_ids):
        name, severity = parse_corruption_id(corruption)
        x_c = corruptions.corrupt(name, x, severity, jax.random.fold_in(rng, 1000 + i))
        counts[f"corruption/{corruption}"] = _correct(fn, x_c, y, mask)
    counts["count"] = jnp.sum(mask)
    return jax.lax.psum(counts, axis_name)


def _per_example_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def evaluate(apply_fn: Callable, params: PyTree, batch_stats: PyTree, images: np.ndarray,
             labels: np.ndarray, *, attack_ids: Sequence[str] = (),
             corruption_ids: Sequence[str] = (), batch_size: int = 512, seed: int = 0,
             devices: Sequence[jax.Device] | None = None) -> dict:
    """Accuracy of the noise-free model on a whole split, clean and under attack/corruption.

    Args:
      apply_fn, params, batch_stats: the model (unreplicated parameters).
      images, labels: the split, uint8 ``[N, H, W, C]`` and int ``[N]``.
      attack_ids: e.g. ``("fgsm_linf_0.1", "pgd10_linf_0.1")``; budgets in [0, 1] pixels.
      corruption_ids: e.g. ``("gaussian_noise_3",)``.
      batch_size: global evaluation batch (rounded up to a multiple of the devices).
      seed: seeds the random starts of attacks and the random corruptions.

    Returns:
      ``{"clean_accuracy", "loss", "adversarial": {id: acc}, "corruption": {id: acc},
      "num_examples"}``, accuracies as fractions of the whole split.
    """
    devices = list(devices or jax.local_devices())
    n_dev = len(devices)
    batch_size = -(-batch_size // n_dev) * n_dev
    return evaluate_batches(apply_fn, params, batch_stats,
                            data_lib.eval_batches(images, labels, batch_size, n_dev),
                            attack_ids=attack_ids, corruption_ids=corruption_ids, seed=seed,
                            devices=devices)


def evaluate_batches(apply_fn: Callable, params: PyTree, batch_stats: PyTree,
                     batches: Iterable[dict], *, attack_ids: Sequence[str] = (),
                     corruption_ids: Sequence[str] = (), seed: int = 0,
                     devices: Sequence[jax.Device] | None = None) -> dict:
    """:func:`evaluate` over ``batches`` of ``{"image", "label", "mask"}`` shaped
    ``[devices, per_device, ...]`` (``input_pipeline`` sources' ``eval_batches()``).

    ``devices=None`` runs over every device of every process (multi-host: each process
    gives the batches of its own shard, the same number of them on every process, and the
    counts are summed over all processes); otherwise over ``devices`` of this process.
    """
    p_eval = jax.pmap(functools.partial(
        _eval_batch, apply_fn=apply_fn, attack_ids=tuple(attack_ids),
        corruption_ids=tuple(corruption_ids), axis_name="batch"),
        axis_name="batch", in_axes=(None, None, 0, None),
        devices=list(devices) if devices is not None else None)
    totals: dict[str, float] = {}
    rng = jax.random.PRNGKey(seed)
    for i, batch in enumerate(batches):
        counts = p_eval(params, batch_stats, batch, jax.random.fold_in(rng, i))
        for key, value in counts.items():
            totals[key] = totals.get(key, 0.0) + float(np.asarray(value.addressable_shards[0]
                                                                  .data).reshape(()))
    count = totals.get("count", 0.0)
    if not count:
        raise ValueError("evaluation split is empty")
    return {
        "clean_accuracy": totals["clean"] / count,
        "loss": totals["loss_sum"] / count,
        "adversarial": {a: totals[f"attack/{a}"] / count for a in attack_ids},
        "corruption": {c: totals[f"corruption/{c}"] / count for c in corruption_ids},
        "num_examples": int(count),
    }
