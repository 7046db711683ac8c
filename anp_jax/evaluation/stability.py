"""Perturbation stability (CIFAR-10-P style): the flip probability of each sequence of
:mod:`anp_jax.stability` and their mean, mFP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from anp_jax import stability
from anp_jax.evaluation.runner import Model, Runner, predictions


class Evaluator:
    """Flip probability over ``num_frames`` frames of every perturbation sequence, scored
    against the first frame for noise and the previous frame otherwise."""

    name = "stability"

    def __init__(self, runner: Runner, num_frames: int = 10):
        self.runner, self.num_frames = runner, num_frames

    def flip_probability(self, model: Model, perturbation: str) -> float:
        base = self.runner.key("stability", perturbation, data=True)

        def transform(x: np.ndarray, i: int) -> np.ndarray:
            import jax

            return np.asarray(stability.perturbation_sequence(
                perturbation, x, self.num_frames, jax.random.fold_in(base, i)))

        preds = predictions(self.runner, model, transform)  # [F, N]
        local = float(stability.flip_probability(
            preds, noise_perturbation=perturbation == "gaussian_noise"))
        return self.runner.total(local * preds.shape[1]) / self.runner.num_examples

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``num_frames``, ``flip_probability`` (per sequence) and ``mfp``."""
        fp = {name: self.flip_probability(model, name) for name in stability.PERTURBATIONS}
        yield "num_frames", self.num_frames
        yield "flip_probability", fp
        yield "mfp", sum(fp.values()) / len(fp)
