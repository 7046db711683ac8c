"""The reported robust accuracy: per threat model and budget, the worst case over every attack.

An example counts as robust at a budget only if it is classified correctly clean and under
every attack run at that budget (quick diagnostics, uniform noise, transfer attacks and, where
it ran, AutoAttack): the per-example worst case, which no single attack can overstate.  The
record of each budget names the attacks and their own accuracies, so a reader sees which
attack decided::

    {"linf_0.1": {"norm": "linf", "eps": 0.1, "accuracy": 0.86, "num_examples": 359,
                  "attack": "worst case over FGSM, PGD-10 (per example)",
                  "attacks": {"fgsm_linf_0.1": 0.91, "pgd10_linf_0.1": 0.87},
                  "strongest_single": "pgd10_linf_0.1"}}

With AutoAttack the ``attack`` reads ``"AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square
5000) + worst case over ..."`` and the AutoAttack record is kept under ``autoattack``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from anp_jax.evaluation.attacks import budget_key, describe
from anp_jax.evaluation.runner import Runner

# label -> (norm, eps, per-example correctness [N])
Flags = Mapping[str, tuple[str, float, np.ndarray]]


def _short(label: str) -> str:
    """``"pgd10_linf_0.1" -> "PGD-10"``; ``"transfer fgsm_linf_0.1" -> "transfer FGSM"``."""
    prefix, _, attack = label.rpartition(" ")
    short = describe(attack).split(" (")[0]
    return f"{prefix} {short}" if prefix else short


def worst_case(runner: Runner, clean: np.ndarray, flags: Flags,
               autoattack: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """The robust-accuracy records, one per budget of ``flags`` (and of ``autoattack``).

    Args:
      runner: the split (for sums over processes).
      clean: per-example clean correctness ``[N]``.
      flags: ``{label: (norm, eps, correct [N])}`` of every attack run.
      autoattack: ``{budget key: record}`` of :mod:`anp_jax.evaluation.autoattack_evaluator`,
        whose ``"robust"`` is per-example ``[n]`` over the first ``n`` examples (then the
        whole record is over those ``n``).

    Returns:
      ``{budget key: {"norm", "eps", "accuracy", "num_examples", "attack", "attacks",
      "strongest_single"[, "autoattack"]}}``, L-inf first, by budget.
    """
    groups: dict[str, dict] = {}
    for label, (norm, eps, correct) in flags.items():
        g = groups.setdefault(budget_key(norm, eps), {"norm": norm, "eps": eps, "flags": {}})
        g["flags"][label] = correct
    for key, record in (autoattack or {}).items():
        groups.setdefault(key, {"norm": record["norm"], "eps": record["eps"], "flags": {}})
    out = {}
    for key in sorted(groups, key=lambda k: (groups[k]["norm"] != "linf", groups[k]["eps"])):
        g = groups[key]
        aa = (autoattack or {}).get(key)
        n = len(clean) if aa is None else len(aa["robust"])
        robust = np.asarray(clean[:n], bool).copy()
        own = {}
        for label, correct in g["flags"].items():
            robust &= correct[:n]
            own[label] = runner.mean(correct) if aa is None else float(np.mean(correct[:n]))
        names = ", ".join(_short(label) for label in g["flags"])
        if aa is not None:
            robust &= np.asarray(aa["robust"], bool)
            own[aa["attack"]] = aa["robust_accuracy"]
            attack = aa["attack"] + (f" + worst case over {names}" if names else "")
            total = float(np.mean(robust)) if n else float("nan")
            count = n
        else:
            attack = f"worst case over {names} (per example)"
            total = runner.mean(robust)
            count = runner.num_examples
        record = {"norm": g["norm"], "eps": g["eps"], "accuracy": total,
                  "num_examples": count, "attack": attack, "attacks": own,
                  "strongest_single": min(own, key=own.get) if own else None}
        if aa is not None:
            record["autoattack"] = {k: v for k, v in aa.items() if k != "robust"}
        out[key] = record
    return out


def table_lines(records: Mapping[str, dict]) -> list[str]:
    """The records of :func:`worst_case` as a text table, headed as the reported number when
    AutoAttack ran, else as a quick look: the worst case over quick attacks such as PGD-10
    is only an upper bound (on ANP models PGD-10 at L-inf 0.2 gave about twice AutoAttack's
    figure)."""
    if not records:
        return []
    rows = [["budget", "accuracy", "images", "attack"]] + [
        [key.replace("_", " "), f"{r['accuracy']:.4f}", str(r["num_examples"]), r["attack"]]
        for key, r in records.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    if any("autoattack" in r for r in records.values()):
        lines = ["robust accuracy (the reported number: an image counts only if it is "
                 "classified correctly clean and under every attack at the budget):"]
    else:
        lines = ["robust accuracy without AutoAttack (a quick look, an upper bound on the "
                 "number to report: an image counts only if it is classified correctly clean "
                 "and under every attack at the budget; `anp-jax eval` runs AutoAttack "
                 "standard):"]
    for row in rows:
        lines.append("  " + "  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]),
                                       row[2].rjust(widths[2]), row[3]]))
    return lines
