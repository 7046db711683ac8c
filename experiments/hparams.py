"""ANP's hyper-parameters swept one at a time around the default: eps, alpha and k.

    python -m experiments.hparams --out runs/exp/hparams [--seeds 0,1,2,3,4] [--epochs 10]
        [--eps 0.25,0.5,1,2,4] [--alpha 0,0.25,0.5,0.75,1] [--k 1,2,3,4]

While one is swept the others keep the config's values. The sweep uses the config's
schedule if it is constant, linear or cosine (eps is then the final value), and the constant
schedule otherwise (the piecewise table sets eps, alpha and k, the official one alpha and k).
The control for a run with k progressive steps is replay with the same k (no noise); replay
with k = 1 is vanilla.
Writes ``results.md``, ``sweeps.png`` and ``results.json``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from experiments import common

DEFAULT_EPOCHS = 10
DEFAULT_EPS = "0.25,0.5,1,2,4"
DEFAULT_ALPHA = "0,0.25,0.5,0.75,1"
DEFAULT_K = "1,2,3,4"


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


def anp_name(eps: float, alpha: float, k: int) -> str:
    return f"anp eps={eps:g} alpha={alpha:g} k={k}"


def replay_name(k: int) -> str:
    return f"replay k={k}"


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__, DEFAULT_EPOCHS)
    p.add_argument("--eps", default=DEFAULT_EPS, help=f"eps values (default {DEFAULT_EPS})")
    p.add_argument("--alpha", default=DEFAULT_ALPHA,
                   help=f"alpha values (default {DEFAULT_ALPHA})")
    p.add_argument("--k", default=DEFAULT_K, help=f"k values (default {DEFAULT_K})")
    p.add_argument("--alpha_k", type=int, default=None,
                   help="k of the alpha sweep (default: the config's k, at least 3; alpha "
                        "only acts from the third progressive step on when the registers "
                        "are reset per mini-batch)")
    args, settings = common.parse(p, argv, "hparams", DEFAULT_EPOCHS)
    try:
        grids = {"eps": _floats(args.eps), "alpha": _floats(args.alpha),
                 "k": [int(v) for v in _floats(args.k)]}
    except ValueError as err:
        p.error(f"bad sweep values: {err}")
    if any(v < 1 for v in grids["k"]):
        p.error("--k values must be >= 1")
    if settings.base.anp.schedule in ("official", "piecewise"):
        # these schedules take alpha and k from their tables: sweep a constant one
        common.log(f"[hparams] anp.schedule={settings.base.anp.schedule!r} ignores anp.alpha "
                   "and anp.k; sweeping with anp.schedule='constant'")
        settings.base.anp.schedule = "constant"
    a = settings.base.anp
    default = (float(a.epsilon), float(a.alpha), int(a.k))
    alpha_k = args.alpha_k or max(3, default[2])
    if alpha_k < 1:
        p.error("--alpha_k must be >= 1")
    runs = plan(grids, default, alpha_k)

    runner = common.Runner(settings)
    for seed in settings.seeds:
        for k in sorted({r[2] for r in runs} | {default[2]}):
            control = common.variant(settings.base, method="vanilla") if k == 1 else \
                common.variant(settings.base, method="replay", anp__k=k)
            runner.run(replay_name(k), control, seed, k=k, control=True)
        for eps, alpha, k in runs:
            runner.run(anp_name(eps, alpha, k), common.variant(
                settings.base, method="anp", anp__epsilon=eps, anp__alpha=alpha, anp__k=k),
                seed, eps=eps, alpha=alpha, k=k)
        report(runner, settings, grids, default, alpha_k)
    return 0


def sweep_points(grids, default, key, alpha_k: int) -> list[tuple]:
    """``(eps, alpha, k)`` of one sweep: the default with ``key`` varied (the alpha sweep
    at ``k = alpha_k``), the default value included."""
    i = ("eps", "alpha", "k").index(key)
    base = list(default)
    if key == "alpha":
        base[2] = alpha_k
    out = []
    for v in sorted(set(grids[key]) | {default[i]}):
        point = list(base)
        point[i] = v
        out.append(tuple(point))
    return out


def plan(grids: dict[str, list], default: tuple[float, float, int],
         alpha_k: int) -> list[tuple]:
    """The distinct (eps, alpha, k) of the three one-at-a-time sweeps, default included."""
    runs = [default]
    for key in ("eps", "alpha", "k"):
        runs += [p for p in sweep_points(grids, default, key, alpha_k) if p not in runs]
    return runs


def report(runner: common.Runner, settings: common.Settings, grids, default,
           alpha_k: int) -> None:
    sections = ["## One-at-a-time sweeps (equal epochs)",
                f"Default: eps {default[0]:g}, alpha {default[1]:g}, k {default[2]}. The "
                "control of a run with k steps is replay with that k (k = 1: vanilla). "
                f"The alpha sweep runs at k = {alpha_k}: with registers reset per "
                "mini-batch, alpha first acts at the third progressive step (the register "
                "is 0 before the first step, and the second step's noise is the first "
                "gradient alone), so at k <= 2 every alpha trains the same model. For the "
                "same reason ANP with k = 1 is vanilla training exactly."]
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    names = []
    for ax, key in zip(axes, ("eps", "alpha", "k")):
        i = ("eps", "alpha", "k").index(key)
        rows = []
        xs, curves = [], {"clean": [], "robust": [], "mean corruption": []}
        for point in sweep_points(grids, default, key, alpha_k):
            name = anp_name(*point)
            if name not in runner.records:
                continue
            names.append(name)
            ctrl = replay_name(point[2])
            rows.append([f"{point[i]:g}" + (" (default)" if point[i] == default[i] else ""),
                         *common.accuracy_columns(runner, name),
                         common.fmt(runner.deltas(name, ctrl, "robust"), signed=True),
                         common.fmt(runner.deltas(name, ctrl, "corruption"), signed=True),
                         common.fmt(runner.deltas(name, ctrl, "clean"), signed=True)])
            xs.append(point[i])
            for label, metric in (("clean", "clean"), ("robust", "robust"),
                                  ("mean corruption", "corruption")):
                curves[label].append(common.mean_std(runner.values(name, metric)))
        sections += [f"### {key}", common.table(
            [key, *common.accuracy_header(runner), "Δ robust vs replay (same k)",
             "Δ corruption vs replay", "Δ clean vs replay"], rows)]
        for (label, stats), color in zip(curves.items(), ("C0", "C1", "C2")):
            if xs:
                ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats],
                            marker="o", capsize=3, label=f"ANP {label}", color=color)
        # the controls: replay at the default k (a curve over k for the k sweep)
        if key == "k":
            ks = [k for k in sorted(set(grids["k"]) | {default[2]})
                  if replay_name(k) in runner.records]
            for (label, metric), color in zip((("clean", "clean"), ("robust", "robust"),
                                               ("mean corruption", "corruption")),
                                              ("C0", "C1", "C2")):
                st = [common.mean_std(runner.values(replay_name(k), metric)) for k in ks]
                ax.errorbar(ks, [s[0] for s in st], yerr=[s[1] for s in st], marker="s",
                            linestyle="--", capsize=3, color=color, alpha=0.6,
                            label=f"replay {label}")
        elif replay_name(xk := alpha_k if key == "alpha" else default[2]) in runner.records:
            for metric, color in (("clean", "C0"), ("robust", "C1"), ("corruption", "C2")):
                m, _ = common.mean_std(runner.values(replay_name(xk), metric))
                ax.axhline(m, color=color, linestyle="--", alpha=0.6)
        if key == "eps" and xs and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(key)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{key} swept" + (f" at k={alpha_k}" if key == "alpha" else "")
                     + " (dashed: replay control)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(settings.out, "sweeps.png"), dpi=110)
    plt.close(fig)
    ctrl_rows = [[f"`{n}`", *common.accuracy_columns(runner, n)]
                 for n in runner.records if n.startswith("replay")]
    sections += ["### controls",
                 common.table(["control", *common.accuracy_header(runner)], ctrl_rows),
                 common.masking_section(common.masking_notes(runner, list(runner.records),
                                                             settings)),
                 common.at_chance_section(runner)]
    common.write_results(settings, "Hyper-parameters", sections, runner.dump(),
                         ["sweeps.png"])


if __name__ == "__main__":
    sys.exit(main())
