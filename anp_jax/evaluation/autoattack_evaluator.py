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
    """Robust accuracy under AutoAttack at each ``(norm, eps)`` of ``budgets``.

    Args:
      runner: the split; AutoAttack runs on this process's first ``max_examples`` real
        examples (all by default).
      budgets: ``[(norm, eps), ...]``, pixels in [0, 1].
      version: ``"standard"`` or ``"quick"``.
      seed: seeds the cascade's random starts.

    After :meth:`run`, ``self.records[budget key]`` is the record with ``norm``, ``eps``,
    ``version``, ``attack`` (a description), ``robust_accuracy``, ``num_examples``,
    ``stages``, ``seconds`` and the per-example ``robust`` flags.
    """

    name = "autoattack"

    def __init__(self, runner: Runner, budgets: Sequence[tuple[str, float]], *,
                 version: str = "standard", max_examples: int | None = None, seed: int = 0,
                 log: Callable[[str], None] = lambda m: None):
        if version not in VERSIONS:
            raise ValueError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, "
                             f"got {version!r}")
        self.runner, self.budgets, self.version = runner, tuple(budgets), version
        self.max_examples, self.seed, self.log = max_examples, seed, log
        self.records: dict[str, dict] = {}

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``records``: ``{budget key: record without the per-example flags}``."""
        from anp_jax.evaluation import autoattack

        images, labels = self.runner.arrays(self.max_examples)
        variables = model.variables
        for norm, eps in self.budgets:
            t0 = time.perf_counter()
            out = dict(autoattack.autoattack(
                model.apply_fn, variables["params"], variables.get("batch_stats", {}),
                images, labels, norm=norm, eps=eps, version=self.version, seed=self.seed,
                devices=self.runner.local_devices))
            robust = np.asarray(out.pop("robust"), bool).reshape(-1)
            record = {**out, "norm": norm, "eps": eps, "version": self.version,
                      "attack": VERSIONS[self.version],
                      "robust_accuracy": float(out["robust_accuracy"]),
                      "num_examples": int(robust.size), "stages": out.get("stages"),
                      "seconds": time.perf_counter() - t0, "robust": robust}
            self.records[budget_key(norm, eps)] = record
            self.log(f"  AutoAttack {self.version} {norm} {eps:g}: "
                     f"{record['robust_accuracy']:.4f} ({record['seconds']:.1f} s)")
        yield "records", {k: {f: v for f, v in r.items() if f != "robust"}
                          for k, r in self.records.items()}
