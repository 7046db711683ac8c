"""The hidden-layer analyses of :mod:`anp_jax.analysis` over a split: noise insensitivity per
perturbation point and the empirical decision-boundary distance."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from anp_jax import analysis
from anp_jax.evaluation.runner import Model, Runner

_METRICS = ("relative_logit_change", "kl", "flipped", "correct")


class InsensitivityEvaluator:
    """Means over the split of :func:`anp_jax.analysis.noise_insensitivity` at each
    perturbation point of the model and each relative noise magnitude of ``sigmas``."""

    name = "insensitivity"

    def __init__(self, runner: Runner, sigmas: Sequence[float] = (0.05, 0.1, 0.2, 0.5)):
        self.runner, self.sigmas = runner, tuple(sigmas)

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``sigmas``, ``points``, ``metric``, ``per_point`` (``relative_logit_change``,
        ``kl``, ``flip_rate``, ``accuracy_drop``: lists over the sigmas) and
        ``mean_relative_logit_change``."""
        apply_fn, points = model.apply_fn, model.points

        def fn(args, batch, rng):
            variables, sigmas = args
            out = analysis.noise_insensitivity(apply_fn, variables, batch["image"],
                                               batch["label"], rng, sigmas, points)
            return {p: {m: jnp.swapaxes(out[p][m], 0, 1) for m in _METRICS} for p in points} \
                | {"clean": out["clean"]["correct"]}  # per example first: [B, S]

        raw = self.runner.map(fn, (model.variables, np.asarray(self.sigmas, np.float32)),
                              cache_key=("insensitivity", model.arch, points),
                              rng=self.runner.key("insensitivity"))
        mean = lambda v: [self.runner.mean(v[:, j]) for j in range(v.shape[1])]  # noqa: E731
        clean = self.runner.mean(raw["clean"])
        per_point = {}
        for p in points:
            per_point[p] = {"relative_logit_change": mean(raw[p]["relative_logit_change"]),
                            "kl": mean(raw[p]["kl"]), "flip_rate": mean(raw[p]["flipped"]),
                            "accuracy_drop": [clean - a for a in mean(raw[p]["correct"])]}
        yield "sigmas", list(self.sigmas)
        yield "points", list(points)
        yield "metric", "relative_logit_change"
        yield "per_point", per_point
        yield "mean_relative_logit_change", {
            p: sum(v["relative_logit_change"]) / len(self.sigmas) for p, v in per_point.items()}


class BoundaryEvaluator:
    """Means of :func:`anp_jax.analysis.boundary_distance` (L2, random orthonormal
    directions) over the first ``max_examples`` test images.

    ``max_distance`` defaults to ``sqrt(H W C)``, the diameter of the pixel cube.  The images
    go in small batches (about 2**20 input values per device and model call).
    """

    name = "boundary_distance"

    def __init__(self, runner: Runner, *, num_directions: int = 8, coarse: int = 10,
                 fine: int = 6, max_examples: int = 1000, max_distance: float | None = None):
        self.runner, self.num_directions = runner, num_directions
        self.coarse, self.fine, self.max_examples = coarse, fine, max_examples
        self.max_distance = max_distance

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``num_directions``, ``max_distance``, ``resolution``, ``norm``,
        ``mean_min``, ``mean_mean``, ``censored_fraction`` and ``num_examples``."""
        images, _ = self.runner.arrays(self.max_examples)
        shape = images.shape[1:]
        max_distance = self.max_distance or math.sqrt(math.prod(shape))
        per_image = self.num_directions * 2 * max(self.coarse, self.fine) * math.prod(shape)
        per_device = max(1, min(-(-len(images) // self.runner.n_dev), (1 << 20) // per_image))
        sub = self.runner.subset(self.max_examples, per_device)
        apply_fn = model.apply_fn
        n_dir, coarse, fine = self.num_directions, self.coarse, self.fine

        def fn(args, batch, rng):
            variables, max_d = args
            out = analysis.boundary_distance(Model.logits(apply_fn, variables), batch["image"],
                                             rng, num_directions=n_dir, max_distance=max_d,
                                             coarse=coarse, fine=fine)
            return {k: out[k] for k in ("min", "mean", "censored")}

        out = sub.map(fn, (model.variables, np.float32(max_distance)),
                      cache_key=("boundary", model.arch, n_dir, coarse, fine),
                      rng=sub.key("boundary"))
        yield "num_directions", n_dir
        yield "max_distance", max_distance
        yield "resolution", max_distance / (coarse * fine)
        yield "norm", "l2"
        yield "mean_min", sub.mean(out["min"])
        yield "mean_mean", sub.mean(out["mean"])
        yield "censored_fraction", sub.mean(out["censored"])
        yield "num_examples", sub.num_examples
