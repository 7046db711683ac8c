"""Where the noise goes: ANP on each single perturbation point, the shallow half, the deep half.

    python -m experiments.layers --out runs/exp/layers [--seeds 0,1,2,3,4] [--epochs 10]
                                 [--points all|none|input,conv1,...]
                                 [--groups all|none|hidden,shallow,deep,all]

For every selection of layers: the robustness it gains (PGD and mean corruption accuracy
minus vanilla's and minus replay's) and what it costs in clean accuracy. Replay (the same
k updates per mini-batch, no noise) separates the noise's effect from the extra updates'.
The paper's claim checked here: shallow layers matter more than deep ones. Writes
``results.md``, ``gain.png``, ``accuracy.png`` and ``results.json``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from experiments import common

DEFAULT_EPOCHS = 10


def selections(points: Sequence[str]) -> list[tuple[str, str]]:
    """``(run name, anp.layers)``: each single point, the hidden points (every point but
    the input, when the model has an input point), the shallow half, the deep half, all.
    With an odd number of points the middle one goes to the shallow half."""
    n = len(points)
    shallow = (n + 1) // 2
    out = [(f"anp:{p}", p) for p in points]
    if n > 2 and points[0] == "input":
        out.append(("anp:hidden", f"deep {n - 1}"))
    out += [(f"anp:shallow {shallow}", f"shallow {shallow}"),
            (f"anp:deep {n - shallow}", f"deep {n - shallow}"),
            ("anp:all", "all")]
    return out


GROUPS = ("hidden", "shallow", "deep", "all")


def chosen_selections(points: Sequence[str], point_spec: str = "all",
                      group_spec: str = "all") -> list[tuple[str, str]]:
    """The :func:`selections` that ``--points`` and ``--groups`` keep (each ``all``,
    ``none`` or a comma-separated list); ValueError naming an unknown point or group."""
    def chosen(spec: str, known: Sequence[str], flag: str, what: str) -> set[str]:
        if spec == "all":
            return set(known)
        names = {s.strip() for s in spec.split(",") if s.strip()} - {"none"}
        bad = names - set(known)
        if bad:
            raise ValueError(f"{flag}: unknown {', '.join(sorted(bad))}; {what} "
                             f"{', '.join(known)}")
        return names

    keep_points = chosen(point_spec, points, "--points", "the model has")
    keep_groups = chosen(group_spec, GROUPS, "--groups", "choose from")
    return [(name, layers) for name, layers in selections(points)
            if (layers in keep_points if layers in points
                else name.removeprefix("anp:").split()[0] in keep_groups)]


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__, DEFAULT_EPOCHS)
    p.add_argument("--points", default="all",
                   help="comma-separated single points to try (default: every point; "
                        "none: no single point)")
    p.add_argument("--groups", default="all",
                   help="comma-separated groups of points to try among " +
                        ", ".join(GROUPS) + " (default: all of them; none: no group)")
    args, settings = common.parse(p, argv, "layers", DEFAULT_EPOCHS)
    from anp_jax.models import create_model

    points = tuple(create_model(settings.base.model).perturbation_points())
    try:
        sel = chosen_selections(points, args.points, args.groups)
    except ValueError as err:
        p.error(str(err))

    runner = common.Runner(settings)
    base = settings.base
    for seed in settings.seeds:
        runner.run("vanilla", common.variant(base, method="vanilla"), seed, layers="")
        runner.run("replay", common.variant(base, method="replay"), seed, layers="")
        for name, layers in sel:
            runner.run(name, common.variant(base, method="anp", anp__layers=layers), seed,
                       layers=layers)
        report(runner, settings, points, sel)
    return 0


def report(runner: common.Runner, settings: common.Settings, points: Sequence[str],
           sel: Sequence[tuple[str, str]]) -> None:
    names = ["vanilla", "replay"] + [n for n, _ in sel]
    rows = []
    for name in names:
        if name not in runner.records:
            continue
        layers = runner.records[name][next(iter(runner.records[name]))]["perturbed_layers"]
        rows.append([
            f"`{name}`", ", ".join(layers) or "none", *common.accuracy_columns(runner, name),
            _d(runner, name, "vanilla", "robust"), _d(runner, name, "replay", "robust"),
            _d(runner, name, "replay", "corruption"),
            _d(runner, name, "vanilla", "clean", negate=True),
        ])
    header = ["run", "perturbed points", *common.accuracy_header(runner),
              "robust gain vs vanilla", "robust gain vs replay", "corruption gain vs replay",
              "clean cost vs vanilla"]
    n = len(points)
    shallow, deep = f"anp:shallow {(n + 1) // 2}", f"anp:deep {n - (n + 1) // 2}"
    lines = []
    if shallow in runner.records and deep in runner.records:
        for key, what in (("robust", "robust accuracy"), ("corruption", "mean corruption accuracy"),
                          ("clean", "clean accuracy")):
            d = runner.deltas(shallow, deep, key)
            if d:
                lines.append(f"- shallow half minus deep half, {what}: "
                             f"{common.fmt(d, signed=True)} ({common.verdict(d)})")
    singles = [(n_, lay) for n_, lay in sel if lay in points and n_ in runner.records]
    if singles:
        best = max(singles, key=lambda s: common.mean_std(runner.deltas(s[0], "replay",
                                                                        "robust"))[0])
        lines.append(f"- single point with the largest robust gain over replay: `{best[1]}` "
                     f"({common.fmt(runner.deltas(best[0], 'replay', 'robust'), signed=True)})")
    sections = [
        "## ANP by perturbed layers (equal epochs)",
        f"Perturbation points of `{settings.base.model}`, shallow to deep: "
        + ", ".join(f"`{p}`" for p in points) + ".",
        common.table(header, rows),
        "Gains: accuracy minus the reference's; cost: vanilla's clean accuracy minus the "
        "run's (positive = the run is less accurate). Mean ± std of per-seed differences.",
        "## Shallow versus deep",
        "\n".join(lines) or "- (needs the shallow and deep runs)",
        common.masking_section(common.masking_notes(runner, names, settings)),
        common.at_chance_section(runner),
    ]
    labels = [n_ for n_ in names[2:] if n_ in runner.records]
    plots = []
    if "replay" in runner.records and labels:
        series = {"robust gain vs replay": [runner.deltas(x, "replay", "robust") for x in labels],
                  "corruption gain vs replay": [runner.deltas(x, "replay", "corruption")
                                                for x in labels],
                  "clean gain vs vanilla": [runner.deltas(x, "vanilla", "clean")
                                            for x in labels]}
        common.bar_chart(os.path.join(settings.out, "gain.png"),
                         [x.removeprefix("anp:") for x in labels], series,
                         "accuracy difference", "What ANP on each selection of layers gives",
                         hline=0.0)
        plots.append("gain.png")
    acc_labels = [n_ for n_ in names if n_ in runner.records]
    common.bar_chart(os.path.join(settings.out, "accuracy.png"), acc_labels,
                     {k: [runner.values(x, key) for x in acc_labels]
                      for k, key in (("clean", "clean"), ("robust", "robust"),
                                     ("mean corruption", "corruption"))},
                     "accuracy", "Accuracy by perturbed layers")
    plots.append("accuracy.png")
    common.write_results(settings, "Layers", sections, runner.dump(), plots)


def _d(runner, name, ref, key, negate=False) -> str:
    if name == ref or ref not in runner.records:
        return ""
    d = runner.deltas(name, ref, key)
    return common.fmt([-x for x in d] if negate else d, signed=True)


if __name__ == "__main__":
    sys.exit(main())
