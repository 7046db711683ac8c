"""The report's figures, PNG files for a reader: every title names the run (model, method,
perturbed layers, eps) and every curve its attack with its parameters.

* ``accuracy_vs_budget``: accuracy against the budget for each attack (L-inf and L2, log
  scale), the reported worst case per budget, uniform noise, transfer attacks;
* ``corruption_severity``: a heatmap of accuracy, corruption x severity, the corruptions
  grouped by family (noise, blur, weather, digital);
* ``insensitivity``: relative logit change per perturbation point and sigma;
* ``learning_curves`` (when the run wrote ``metrics.jsonl``): training loss and accuracy,
  and the periodic clean test accuracy, against the step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from anp_jax.evaluation.attacks import describe, parse_id
from anp_jax.evaluation.corruptions import FAMILY_OF, by_family

CURVES_FILE = "metrics.jsonl"
CURVE_COLUMNS = ("step", "train_loss", "train_accuracy", "eval_clean_accuracy")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def run_title(config: Mapping[str, Any]) -> str:
    """``"vgg16, anp (layers all, eps 0.5), cifar10"``: what a figure of this run shows."""
    method = config.get("method") or "?"
    detail = []
    anp = config.get("anp") or {}
    if str(method).startswith("anp"):
        detail.append(f"layers {anp.get('layers')}, eps {anp.get('epsilon', 0):g}")
    adv = config.get("adv") or {}
    if method not in ("vanilla", "anp", "replay") and adv:
        detail.append(f"AT eps {adv.get('epsilon', 0):g}")
    method = f"{method} ({'; '.join(detail)})" if detail else method
    return f"{config.get('model')}, {method}, {config.get('dataset')}"


def _label(key: str) -> str:
    """A legend entry naming the attack and its parameters (norm and budget left out: the
    axes give them)."""
    prefix, _, attack = key.rpartition(" ")
    text = describe(attack)
    name, params = text.split(" (", 1)
    params = ", ".join(p for p in params.rstrip(")").split(", ")[1:])
    return f"{prefix + ' ' if prefix else ''}{name}" + (f" ({params})" if params else "")


def accuracy_vs_budget(report: dict, title: str, path: str) -> None:
    plt = _pyplot()
    a, clean = report["attacks"], report["clean_accuracy"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    axes = {"linf": ax1, "l2": ax2}
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ids = {**a["accuracy"], **a["random_noise"],
           **{f"transfer {k}": v for k, v in (a.get("transfer") or {}).get("accuracy",
                                                                             {}).items()}}
    labels = {}
    for key, acc in ids.items():
        prefix, _, attack = key.rpartition(" ")
        name, norm, eps, steps = parse_id(attack)
        family = (f"{prefix} {name}{steps or ''}".strip(), norm)
        series.setdefault(family, []).append((eps, acc))
        labels.setdefault(family, _label(key))
    for (family, norm), points in sorted(series.items()):
        style = "--" if "uniform" in family else ":" if "transfer" in family else "-"
        axes[norm].plot(*zip(*sorted(points)), style, lw=1, marker=".",
                        label=labels[family, norm])
    for norm, ax in axes.items():
        worst = sorted((r["eps"], r["accuracy"]) for r in report.get("robust_accuracy",
                                                                       {}).values()
                       if r["norm"] == norm)
        if worst:
            ax.plot(*zip(*worst), "k-o", lw=2.5, label="reported: worst case per example")
        ax.axhline(clean, color="grey", lw=0.8, ls="-.", label="clean")
        ax.set_xscale("log")
        ticks = sorted({e for (_, n), pts in series.items() if n == norm for e, _ in pts})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(f"{'L-inf' if norm == 'linf' else 'L2'} budget (pixels in [0, 1], "
                      "log scale)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5)
    fig.suptitle(f"{title}: accuracy under attack", fontsize=10)
    _save(plt, fig, path)


def corruption_heatmap(report: dict, title: str, path: str) -> None:
    plt = _pyplot()
    c = report["corruptions"]
    severities = c["severities"]
    names = by_family(list(c["error"]))
    values = [[c["accuracy"][f"{n}_{s}"] for s in severities] for n in names]
    fig, ax = plt.subplots(figsize=(5.5 + 0.3 * len(severities), 0.32 * len(names) + 1.8))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), [f"{FAMILY_OF.get(n, '?')}: {n}" for n in names],
                  fontsize=7)
    for i in range(1, len(names)):  # a line between families
        if FAMILY_OF.get(names[i]) != FAMILY_OF.get(names[i - 1]):
            ax.axhline(i - 0.5, color="white", lw=2)
    ax.set_xlabel("severity")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(f"{title}\naccuracy under corruption (clean {report['clean_accuracy']:.3f}, "
                 f"mCE {c['mce']:.3f} unnormalised)", fontsize=9)
    _save(plt, fig, path)


def insensitivity(report: dict, title: str, path: str) -> None:
    plt = _pyplot()
    ins = report["insensitivity"]
    points, sigmas = ins["points"], ins["sigmas"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(points) + 3), 4))
    width = 0.8 / len(sigmas)
    for j, sigma in enumerate(sigmas):
        values = [ins["per_point"][p]["relative_logit_change"][j] for p in points]
        ax.bar([i + (j - (len(sigmas) - 1) / 2) * width for i in range(len(points))], values,
               width, label=f"sigma {sigma:g} (noise norm / activation norm)")
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels(points, rotation=45 if len(points) > 6 else 0)
    ax.set_ylabel("relative logit change (lower = more insensitive)")
    ax.set_title(f"{title}\nGaussian noise at one perturbation point", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)


def read_curves(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` (one JSON object per line) that have a
    ``step``; [] when there is no such file."""
    from etils import epath

    path = epath.Path(workdir) / CURVES_FILE  # local or gs://
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
    return rows


def learning_curves(rows: list[dict], title: str, path: str) -> list[str]:
    """Plots the columns of :data:`CURVE_COLUMNS` that ``rows`` have; returns them."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    shown = ["step"]
    for ax, column, label in ((ax1, "train_loss", "training loss"),
                              (ax2, "train_accuracy", "training accuracy"),
                              (ax2, "eval_clean_accuracy", "clean test accuracy")):
        points = [(r["step"], r[column]) for r in rows
                  if isinstance(r.get(column), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
            shown.append(column)
    ax1.set_ylabel("loss (nats)")
    ax2.set_ylabel("accuracy")
    for ax in (ax1, ax2):
        ax.set_xlabel("step (parameter updates)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: learning curves", fontsize=10)
    _save(plt, fig, path)
    return shown


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
