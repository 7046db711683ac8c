"""Accuracy under the attacks of :mod:`anp_jax.attacks` (quick diagnostics) and uniform noise.

Attacks are named by ids (``pgd10_linf_0.1``, ``fgsm_l2_0.5``; :func:`anp_jax.attacks.attack_id`)
and ``uniform_linf_E`` (uniform random noise in the L-inf ball, the random baseline).  Each
kind of attack (name, norm, steps) is one compiled program whatever its budget (the budget is
a traced argument), shared by white-box and transfer attacks when the two models share an
architecture; the random starts of an attack id are the same for every model.

:class:`Evaluator` keeps every attack's per-example correctness (``self.flags``) for the
worst case of :mod:`anp_jax.evaluation.robust`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anp_jax import attacks
from anp_jax.evaluation.runner import Model, Runner, correct

UNIFORM = "uniform"
_NAMES = {"fgsm": "FGSM", "stepll": "Step-LL", "pgd": "PGD", "mifgsm": "MI-FGSM",
          "apgd": "APGD-CE", UNIFORM: "uniform noise"}
_NORMS = {"linf": "L-inf", "l2": "L2"}


def parse_id(attack: str) -> tuple[str, str, float, int | None]:
    """``"pgd10_linf_0.1" -> ("pgd", "linf", 0.1, 10)``; ``"uniform_linf_0.1"`` too.

    Raises ValueError naming the id and the known attacks.
    """
    head, _, budget = attack.rpartition("_")
    if head == f"{UNIFORM}_linf":
        try:
            return UNIFORM, "linf", float(budget), None
        except ValueError:
            pass
    try:
        return attacks.parse_attack_id(attack)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unknown attack {attack!r} ({err}); known attacks: "
                         f"{', '.join((*attacks.ATTACKS, UNIFORM))}") from None


def validate_attack_id(attack: str) -> None:
    """Raises ValueError with a clear message if ``attack`` is not a known attack id."""
    parse_id(attack)


def budget_key(norm: str, eps: float) -> str:
    """``("linf", 0.1) -> "linf_0.1"``: the key of a threat model and budget."""
    return f"{norm}_{eps:g}"


def describe(attack: str) -> str:
    """The attack of an id with its parameters, for tables and figures, e.g.
    ``"PGD-10 (L-inf 0.1, step 2.5 eps/10, random start)"``."""
    name, norm, eps, steps = parse_id(attack)
    label = _NAMES[name] + (f"-{steps}" if steps else "")
    detail = {"pgd": f", step 2.5 eps/{steps}, random start",
              "mifgsm": f", step eps/{steps}, momentum 1",
              "apgd": f", {steps} iterations, random start"}.get(name, "")
    return f"{label} ({_NORMS[norm]} {eps:g}{detail})"


def craft(name: str, norm: str, eps: float | jax.Array, steps: int | None,
          fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
          rng: jax.Array) -> jax.Array:
    """Adversarial (or, for ``"uniform"``, randomly perturbed) images ``[B, H, W, C]`` of
    attack ``name`` with ``norm``, budget ``eps`` (may be traced) and ``steps``."""
    if name == UNIFORM:
        return jnp.clip(x + jax.random.uniform(rng, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
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


class Evaluator:
    """Accuracy under each attack id, white-box or crafted on a ``source`` model (transfer).

    Args:
      runner: the split.
      attacks: attack ids, e.g. ``("fgsm_linf_0.1", "pgd10_linf_0.1")``.
      source: craft on this model instead of the evaluated one (black-box transfer); the
        random starts are those of the white-box attack of the same id.
      log: progress lines (one per attack kind, with its time).

    After :meth:`run`, ``self.flags[label] = (norm, eps, correct [N])`` per attack, the
    label being the id (``"transfer " + id`` with a source).
    """

    name = "attacks"

    def __init__(self, runner: Runner, attacks: Sequence[str] = (), *,
                 source: Model | None = None, log: Callable[[str], None] = lambda m: None):
        for attack in attacks:
            validate_attack_id(attack)
        self.runner, self.attacks, self.source, self.log = runner, tuple(attacks), source, log
        self.flags: dict[str, tuple[str, float, np.ndarray]] = {}

    def correct(self, model: Model, attack: str) -> np.ndarray:
        """Per-example correctness ``[N]`` of ``model`` under ``attack``."""
        name, norm, eps, steps = parse_id(attack)
        kind = (name, norm, steps)
        source = self.source or model
        target_fn, source_fn = model.apply_fn, source.apply_fn

        def fn(args, batch, rng):
            target_vars, source_vars, eps_ = args
            x_adv = craft(name, norm, eps_, steps, Model.logits(source_fn, source_vars),
                          batch["image"], batch["label"], rng)
            return correct(Model.logits(target_fn, target_vars)(x_adv), batch["label"])

        return self.runner.map(fn, (model.variables, source.variables, np.float32(eps)),
                               cache_key=("attack", kind, model.arch, source.arch),
                               rng=self.runner.key(attack))

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``accuracy``: ``{id: accuracy}``."""
        accuracy: dict[str, float] = {}
        kinds: dict[tuple, list[str]] = {}  # one compiled program per kind
        for attack in self.attacks:
            name, norm, _, steps = parse_id(attack)
            kinds.setdefault((name, norm, steps), []).append(attack)
        for (name, norm, steps), ids in kinds.items():
            t0 = time.perf_counter()
            for attack in ids:
                flags = self.correct(model, attack)
                label = attack if self.source is None else f"transfer {attack}"
                self.flags[label] = (norm, parse_id(attack)[2], flags)
                accuracy[attack] = self.runner.mean(flags)
            self.log(f"  {'transfer ' if self.source else ''}{name}{steps or ''} {norm} "
                     f"({len(ids)} budget(s)): {time.perf_counter() - t0:.1f} s")
        yield "accuracy", {a: accuracy[a] for a in self.attacks}


class GridEvaluator:
    """The report's attack section: a grid of attacks x budgets, uniform noise, the PGD
    accuracy against the budget up to the whole pixel range, PGD with more steps where its
    accuracy is closest to 0.5, and transfer from a ``source`` model.

    Args:
      runner: the split.
      linf_budgets, l2_budgets: the grid, pixels in [0, 1].
      curve_budgets: budgets of the PGD curve; the last one covers the pixel range.
      steps: iterations of PGD, MI-FGSM and APGD; ``more_steps``: of the "more steps" check.
      clean_accuracy: the curve's value at budget 0.
      source: the model of the transfer attacks (FGSM and PGD at the L-inf budgets).

    After :meth:`run`, ``self.flags`` as :class:`Evaluator`'s, over every attack run.
    """

    name = "attacks"

    def __init__(self, runner: Runner, *, linf_budgets: Sequence[float],
                 l2_budgets: Sequence[float], curve_budgets: Sequence[float], steps: int,
                 more_steps: int, clean_accuracy: float, source: Model | None = None,
                 source_info: dict | None = None, log: Callable[[str], None] = lambda m: None):
        self.runner, self.log = runner, log
        self.linf, self.l2, self.curve = tuple(linf_budgets), tuple(l2_budgets), tuple(
            curve_budgets)
        self.steps, self.more_steps, self.clean = steps, more_steps, clean_accuracy
        self.source, self.source_info = source, source_info or {}
        self.flags: dict[str, tuple[str, float, np.ndarray]] = {}

    def kinds(self) -> list[tuple[str, str, int | None]]:
        """(attack name, norm, steps) of the main grid."""
        s = self.steps
        return [("fgsm", "linf", None), ("stepll", "linf", None), ("pgd", "linf", s),
                ("mifgsm", "linf", s), ("apgd", "linf", s), ("pgd", "l2", s)]

    def _grid(self, model: Model, ids: Sequence[str], source: Model | None = None
              ) -> dict[str, float]:
        ev = Evaluator(self.runner, ids, source=source, log=self.log)
        accuracy = dict(ev.run(model))["accuracy"]
        self.flags.update(ev.flags)
        return accuracy

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``budgets``, ``steps``, ``more_steps``, ``accuracy``, ``random_noise``,
        ``accuracy_vs_budget`` and, with a source, ``transfer``."""
        s = self.steps
        budgets = {"linf": self.linf, "l2": self.l2}
        accuracy = self._grid(model, [attacks.attack_id(name, norm, eps, steps)
                                      for name, norm, steps in self.kinds()
                                      for eps in budgets[norm]])
        pgd = {eps: accuracy[attacks.attack_id("pgd", "linf", eps, s)] for eps in self.linf}
        more_eps = min(self.linf, key=lambda e: abs(pgd[e] - 0.5))
        curve_ids = [attacks.attack_id("pgd", "linf", e, s) for e in self.curve]
        accuracy.update(self._grid(model, [attacks.attack_id("pgd", "linf", more_eps,
                                                             self.more_steps)]
                                   + [i for i in curve_ids if i not in accuracy]))
        random_noise = self._grid(model, [f"{UNIFORM}_linf_{eps:g}" for eps in self.linf])
        yield "budgets", {"linf": list(self.linf), "l2": list(self.l2)}
        yield "steps", s
        yield "more_steps", {"steps": self.more_steps, "budget": more_eps}
        yield "accuracy", accuracy
        yield "random_noise", random_noise
        yield "accuracy_vs_budget", {
            "attack": f"pgd{s}_linf", "description": describe(curve_ids[0]).split(" (")[0]
            + f" (L-inf, step 2.5 eps/{s}, random start)",
            "budgets": [0.0, *self.curve],
            "accuracy": [self.clean] + [accuracy[i] for i in curve_ids]}
        if self.source is not None:
            ids = [attacks.attack_id(name, "linf", eps, steps) for name, steps in
                   (("fgsm", None), ("pgd", s)) for eps in self.linf]
            yield "transfer", {**self.source_info,
                               "accuracy": self._grid(model, ids, self.source)}
