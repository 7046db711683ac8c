"""Evaluation of trained models: one batched, pmapped runner and one module per kind of
evaluation (attacks, AutoAttack, corruptions, stability, hidden-layer analysis).

==================================  =========================================================
``runner``                          :class:`Runner`: the masked, pmapped map over a split
``clean``                           clean accuracy and loss
``attacks``                         FGSM, PGD, ... and uniform noise: quick diagnostics
``autoattack_evaluator``            AutoAttack (``autoattack.py``'s cascade) as an evaluator
``robust``                          the reported number: per-example worst case per budget
``corruptions``                     common corruptions by family (noise, blur, weather,
                                    digital), mCE
``stability``                       flip probability of perturbation sequences, mFP
``analysis``                        noise insensitivity per point, boundary distance
``sanity``                          checks against gradient masking and weak attacks
``plots``                           the report's figures
``run``                             :func:`load_run`: a trained run in one call
==================================  =========================================================

Every evaluator is built from a runner and its settings and has ``run(model)`` yielding
``(key, value)`` pairs of its section.  The trainer's end-of-run evaluation
(:func:`evaluate_batches`) and ``anp-jax eval`` (:mod:`anp_jax.report`) are lists of these
evaluators with different settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from anp_jax.evaluation import attacks, clean, corruptions, robust
from anp_jax.evaluation.attacks import validate_attack_id
from anp_jax.evaluation.corruptions import parse_corruption_id
from anp_jax.evaluation.runner import Model, Runner

__all__ = ["Model", "Runner", "evaluate_batches", "parse_corruption_id", "validate_attack_id"]

PyTree = Any


def evaluate_batches(apply_fn: Callable, params: PyTree, batch_stats: PyTree,
                     batches: Callable[[], Iterable[dict]] | Iterable[dict], *,
                     attack_ids: Sequence[str] = (), corruption_ids: Sequence[str] = (),
                     seed: int = 0, devices: Sequence[jax.Device] | None = None) -> dict:
    """The trainer's end-of-run evaluation of the noise-free model on a whole split.

    Args:
      apply_fn, params, batch_stats: the model (unreplicated parameters).
      batches: ``{"image", "label", "mask"}`` batches shaped ``[devices, per_device, ...]``
        (data sources' ``eval_batches``; pass the method itself, not its
        iterator, for a split too large to keep in host memory).
      attack_ids: e.g. ``("fgsm_linf_0.1", "pgd10_linf_0.1")``; budgets in [0, 1] pixels.
      corruption_ids: e.g. ``("gaussian_noise_3",)``.
      seed: seeds the random starts of attacks and the random corruptions.
      devices: None for every device of every process (multi-host: each process gives the
        batches of its own shard, the same number of them), else these local devices.

    Returns:
      ``{"clean_accuracy", "loss", "num_examples", "adversarial": {id: accuracy} (each
      attack alone: diagnostics), "corruption": {id: accuracy}, "robust_accuracy":
      {budget key: record}}`` (the records of :func:`anp_jax.evaluation.robust.worst_case`:
      the per-example worst case over the attacks of each budget, the number to report);
      accuracies are fractions of the whole split.
    """
    runner = Runner(batches, devices=devices, seed=seed)
    model = Model(apply_fn, {"params": params, "batch_stats": batch_stats or {}})
    clean_ev = clean.Evaluator(runner)
    base = dict(clean_ev.run(model))
    attack_ev = attacks.Evaluator(runner, attack_ids)
    adversarial = dict(attack_ev.run(model))["accuracy"]
    corruption = dict(corruptions.Evaluator(runner, corruption_ids).run(model))["accuracy"]
    return {
        "clean_accuracy": base["accuracy"],
        "loss": base["loss"],
        "num_examples": base["num_examples"],
        "adversarial": adversarial,
        "corruption": corruption,
        "robust_accuracy": robust.worst_case(runner, clean_ev.correct, attack_ev.flags),
    }
