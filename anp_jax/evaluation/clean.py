"""Clean accuracy and test loss of the noise-free model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import optax

from anp_jax.evaluation.runner import Model, Runner, correct


class Evaluator:
    """Top-1 accuracy and mean cross-entropy (nats) on the split.

    After :meth:`run`, ``self.correct`` holds the per-example correctness ``[N]`` (the
    zero perturbation of the worst case, see :mod:`anp_jax.evaluation.robust`).
    """

    name = "clean"

    def __init__(self, runner: Runner):
        self.runner = runner
        self.correct: np.ndarray | None = None

    def per_example(self, model: Model) -> dict[str, np.ndarray]:
        """``{"correct": bool [N], "loss": f32 [N], "prediction": int [N]}``."""
        apply_fn = model.apply_fn

        def fn(variables, batch, rng):
            del rng
            logits = Model.logits(apply_fn, variables)(batch["image"])
            return {"correct": correct(logits, batch["label"]),
                    "loss": optax.losses.softmax_cross_entropy_with_integer_labels(
                        logits, batch["label"]),
                    "prediction": logits.argmax(-1)}

        return self.runner.map(fn, model.variables, cache_key=("clean", model.arch),
                               rng=self.runner.key("clean"))

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``accuracy``, ``loss`` and ``num_examples``."""
        out = self.per_example(model)
        self.correct = out["correct"]
        yield "accuracy", self.runner.mean(out["correct"])
        yield "loss", self.runner.mean(out["loss"])
        yield "num_examples", self.runner.num_examples
