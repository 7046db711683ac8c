"""Checks against gradient masking and under-strength attacks (Carlini et al., "On
Evaluating Adversarial Robustness", 2019), on accuracies per attack id.

Each check is ``{"name", "passed", "detail"}``.  :func:`attack_checks` runs the checks that
need nothing but ``{attack id: accuracy}`` (the trainer's metrics, the experiments' runs, the
report's grid); :func:`curve_checks` those of an accuracy-vs-budget curve.  Passing checks do
not prove robustness; a failing one proves a problem with the evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from anp_jax.evaluation.attacks import UNIFORM, parse_id

Check = dict


def check(name: str, passed: bool, detail: str) -> Check:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _where(norm: str, eps: float) -> str:
    return f"{eps:g}" if norm == "linf" else f"{norm}_{eps:g}"


def ended_at_chance(clean_accuracy: float, num_classes: int | None) -> bool:
    """Whether a trained model ended at chance: clean accuracy at most 1.5 / ``num_classes``
    (it predicts nearly one class, so its robust accuracy measures nothing). False when the
    number of classes is not known."""
    return bool(num_classes) and clean_accuracy <= 1.5 / num_classes


def attack_checks(accuracy: Mapping[str, float], clean: float | None = None,
                  tolerance: float = 0.02) -> list[Check]:
    """The checks on ``{attack id: accuracy}``:

    * ``pgd_not_weaker_than_fgsm@E``: the PGD with the fewest steps at budget E is at most
      FGSM's accuracy + tolerance;
    * ``more_steps_not_weaker``: at every budget with several PGD step counts, more steps
      are at most fewer steps' accuracy + tolerance;
    * ``random_noise_weaker_than_pgd@E``: uniform noise's accuracy is at least PGD's -
      tolerance;
    * ``accuracy_falls_with_budget@ATTACK``: no attack does better at a larger budget
      (by more than the tolerance);
    * ``attacks_not_above_clean`` (when ``clean`` is given).
    """
    parsed = {aid: parse_id(aid) for aid in accuracy}
    by_budget: dict[tuple[str, float], dict[tuple[str, int | None], float]] = {}
    for aid, (name, norm, eps, steps) in parsed.items():
        by_budget.setdefault((norm, eps), {})[(name, steps)] = accuracy[aid]
    checks = []
    for (norm, eps), accs in sorted(by_budget.items()):
        pgds = sorted((s, a) for (n, s), a in accs.items() if n == "pgd")
        where = _where(norm, eps)
        if pgds and ("fgsm", None) in accs:
            (s, pgd), fgsm = pgds[0], accs[("fgsm", None)]
            checks.append(check(f"pgd_not_weaker_than_fgsm@{where}", pgd <= fgsm + tolerance,
                                f"PGD-{s} {pgd:.4f} vs FGSM {fgsm:.4f} at {norm} {eps:g}"))
        for (s0, few), (s1, many) in zip(pgds, pgds[1:]):
            checks.append(check("more_steps_not_weaker", many <= few + tolerance,
                                f"PGD-{s1} {many:.4f} vs PGD-{s0} {few:.4f} at {norm} "
                                f"{eps:g}"))
        if pgds and (UNIFORM, None) in accs:
            (s, pgd), noise = pgds[0], accs[(UNIFORM, None)]
            checks.append(check(f"random_noise_weaker_than_pgd@{where}",
                                noise >= pgd - tolerance,
                                f"uniform noise {noise:.4f} vs PGD-{s} {pgd:.4f} at {norm} "
                                f"{eps:g}"))
    families: dict[str, list[tuple[float, float]]] = {}
    for aid, (name, norm, eps, steps) in parsed.items():
        families.setdefault(f"{name}{steps or ''}_{norm}", []).append((eps, accuracy[aid]))
    for family, points in sorted(families.items()):
        points.sort()
        rises = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in zip(points, points[1:])
                 if a1 > a0 + tolerance]
        if len(points) > 1:
            checks.append(check(
                f"accuracy_falls_with_budget@{family}", not rises,
                f"{family} accuracy never rises with the budget" if not rises else "; ".join(
                    f"{a0:.4f} at {e0:g} -> {a1:.4f} at {e1:g}" for e0, a0, e1, a1 in rises)))
    if clean is not None:
        checks.append(check("attacks_not_above_clean",
                            all(v <= clean + tolerance for v in accuracy.values()),
                            f"every attack accuracy <= clean {clean:.4f} (+{tolerance:g})"))
    return checks


def curve_checks(budgets: Sequence[float], accuracy: Sequence[float], attack: str,
                 zero_threshold: float = 0.1, tolerance: float = 0.02) -> list[Check]:
    """``large_budget_reaches_zero`` (accuracy at the largest budget at most
    ``zero_threshold``: an attack that works wins when the budget covers the pixel range) and
    ``accuracy_falls_with_budget`` (the curve never rises by more than the tolerance)."""
    checks = [check("large_budget_reaches_zero", accuracy[-1] <= zero_threshold,
                    f"{attack} accuracy {accuracy[-1]:.4f} at {budgets[-1]:g} "
                    f"(must be <= {zero_threshold:g})")]
    rises = [(a, b, e0, e1) for a, b, e0, e1 in zip(accuracy, accuracy[1:], budgets,
                                                    budgets[1:]) if b > a + tolerance]
    checks.append(check(
        "accuracy_falls_with_budget", not rises,
        f"{attack} accuracy never rises with the budget" if not rises else "; ".join(
            f"{a:.4f} at {e0:g} -> {b:.4f} at {e1:g}" for a, b, e0, e1 in rises)))
    return checks


def transfer_checks(white: Mapping[str, float], transfer: Mapping[str, float],
                    tolerance: float = 0.02) -> list[Check]:
    """``white_box_not_weaker_than_transfer@E``: white-box PGD at most the transfer PGD of
    the same id + tolerance (a black-box attack beating the white-box one means masking)."""
    checks = []
    for aid in transfer:
        name, norm, eps, steps = parse_id(aid)
        if name == "pgd" and aid in white:
            checks.append(check(f"white_box_not_weaker_than_transfer@{_where(norm, eps)}",
                                white[aid] <= transfer[aid] + tolerance,
                                f"white-box PGD-{steps} {white[aid]:.4f} vs transfer "
                                f"{transfer[aid]:.4f} at {norm} {eps:g}"))
    return checks


def warnings(checks: Sequence[Check]) -> list[str]:
    """One message per failed check."""
    return [f"sanity check {c['name']} failed: {c['detail']} (possible gradient masking or "
            "too weak an attack; do not trust the attack numbers)"
            for c in checks if not c["passed"]]
