"""AutoAttack as an evaluator: a thin wrapper of :func:`anp_jax.evaluation.autoattack.autoattack`.

The cascade itself (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein 2020) lives in
``anp_jax/evaluation/autoattack.py``, a host-level function over whole arrays::

    autoattack(apply_fn, params, batch_stats, images, labels, *, norm, eps,
               version="standard" | "quick", seed, devices) -> record

whose record holds at least ``robust_accuracy`` and ``robust`` (per-example bool), and
usually ``stages`` (robust accuracy after each attack of the cascade) and the attacks'
parameters.  This module only feeds it the split and shapes its record for
:func:`anp_jax.evaluation.robust.worst_case`; it is the one place to adapt if that signature
changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from anp_jax.evaluation.attacks import budget_key
from anp_jax.evaluation.runner import Model, Runner

VERSIONS = {
    "standard": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000)",
    "quick": "AutoAttack quick preset (cheaper than standard; a quick look, not a result)",
}


class Evaluator:
    """Robust accuracy under AutoAttack at each ``(norm, eps)`` of ``budgets``, with its
    sanity checks (:func:`anp_jax.evaluation.autoattack.sanity_checks`).

    Args:
      runner: the split; AutoAttack runs on this process's first ``max_examples`` real
        examples (all by default).
      budgets: ``[(norm, eps), ...]``, pixels in [0, 1].
      version: ``"standard"`` or ``"quick"``.
      seed: seeds the cascade's random starts.
      sanity_examples: the sanity runs (the cascade at twice the iterations, Square alone,
        APGD-T alone) attack the first this many examples of the split at the last (largest)
        budget only, to bound their cost (0: no sanity runs): there the attacks converge
        slowest and the cascade, with few survivors, is cheapest.  The checks compare them
        with the main cascade's outcome on the same examples
        (:func:`~anp_jax.evaluation.autoattack.restrict`).
      tolerance: of the sanity checks, in robust accuracy.

    After :meth:`run`, ``self.records[budget key]`` is the record with ``norm``, ``eps``,
    ``version``, ``attack`` (a description), ``robust_accuracy``, ``num_examples``,
    ``stages``, ``seconds`` (per attack and ``total``) and the per-example ``robust``
    flags; ``self.checks`` and ``self.warnings`` are those of the sanity checks, and
    ``self.sanity`` describes them
    (budget, examples, the runs' robust accuracies and seconds).
    """

    name = "autoattack"

    def __init__(self, runner: Runner, budgets: Sequence[tuple[str, float]], *,
                 version: str = "standard", max_examples: int | None = None, seed: int = 0,
                 sanity_examples: int = 200, tolerance: float = 0.01,
                 log: Callable[[str], None] = lambda m: None):
        if version not in VERSIONS:
            raise ValueError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, "
                             f"got {version!r}")
        self.runner, self.budgets, self.version = runner, tuple(budgets), version
        self.max_examples, self.seed, self.log = max_examples, seed, log
        self.sanity_examples, self.tolerance = sanity_examples, tolerance
        self.records: dict[str, dict] = {}
        self.checks: list[dict] = []
        self.warnings: list[str] = []
        self.sanity: dict | None = None

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``records`` (``{budget key: record without the per-example flags}``) and,
        when sanity runs ran, ``sanity`` (``{"norm", "eps", "num_examples", "runs", "checks",
        "warnings"}``)."""
        from anp_jax.evaluation import autoattack

        images, labels = self.runner.arrays(self.max_examples)
        variables = model.variables
        args = (model.apply_fn, variables["params"], variables.get("batch_stats", {}))
        kwargs = dict(version=self.version, seed=self.seed, devices=self.runner.local_devices)
        last = len(self.budgets) - 1
        for i, (norm, eps) in enumerate(self.budgets):
            t0 = time.perf_counter()
            k = min(self.sanity_examples, len(labels)) if i == last else 0
            out = dict(autoattack.autoattack(*args, images, labels, norm=norm, eps=eps,
                                             **kwargs))
            # The checks compare the sanity runs with this cascade on the same examples.
            subset = autoattack.restrict(out, slice(0, k)) if k else None
            out.pop("fooled_at", None)
            robust = np.asarray(out.pop("robust"), bool).reshape(-1)
            record = {**out, "norm": norm, "eps": eps, "version": self.version,
                      "attack": VERSIONS[self.version],
                      "robust_accuracy": float(out["robust_accuracy"]),
                      "num_examples": int(robust.size), "stages": out.get("stages"),
                      "seconds": out.get("seconds") or {"total": time.perf_counter() - t0},
                      "robust": robust}
            self.records[budget_key(norm, eps)] = record
            self.log(f"  AutoAttack {self.version} {norm} {eps:g}: "
                     f"{record['robust_accuracy']:.4f} ({time.perf_counter() - t0:.1f} s)")
            if k:
                t0 = time.perf_counter()
                runs = autoattack.sanity_runs(*args, images[:k], labels[:k], norm=norm,
                                              eps=eps, **kwargs)
                self.checks, self.warnings = autoattack.sanity_checks(
                    subset, runs, self.tolerance)
                self.sanity = {
                    "norm": norm, "eps": eps, "num_examples": k,
                    "subset": f"the first {k} test examples at the last AutoAttack budget",
                    "reported_on_subset": subset["robust_accuracy"],
                    "runs": {name: {"robust_accuracy": r["robust_accuracy"],
                                    "seconds": r["seconds"]["total"],
                                    "attacks": r["attacks"]} for name, r in runs.items()},
                    "checks": self.checks, "warnings": self.warnings,
                    "seconds": time.perf_counter() - t0}
                self.log(f"  AutoAttack sanity runs on {k} examples at {norm} {eps:g}: "
                         f"{self.sanity['seconds']:.1f} s")
        yield "records", {key: {f: v for f, v in r.items() if f != "robust"}
                          for key, r in self.records.items()}
        if self.sanity is not None:
            yield "sanity", self.sanity
