"""Every training method over the seeds: clean, FGSM, PGD and mean corruption accuracy.

    python -m experiments.methods --out runs/exp/methods [--seeds 0,1,2,3,4] [--epochs 10]

Methods: vanilla, anp, replay (the control: ANP's k updates per mini-batch without noise),
PGD-AT, TRADES, Fast-AT, Free-AT, each of the four combined with ANP, and the controls of
the combinations: replay_pgd_at, replay_trades and replay_fast_at (the adversarial training
with ANP's k updates per mini-batch and no noise, so that a combination's gain over its
control is the noise's, not the extra updates'). All at equal epochs
(the paper's way); ``experiments.cost`` gives the time each takes. Writes ``results.md``,
``accuracy.png``, ``delta.png`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from experiments import common

DEFAULT_EPOCHS = 10


def method_names() -> tuple[str, ...]:
    from anp_jax.trainer import METHODS

    return tuple(METHODS)


def chosen_methods(p, text: str) -> tuple[str, ...]:
    """The methods of ``--methods`` (``all`` or comma-separated names); a parser error
    naming any unknown one."""
    known = method_names()
    methods = known if text == "all" else tuple(m.strip() for m in text.split(",")
                                                if m.strip())
    unknown = [m for m in methods if m not in known]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return methods


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__, DEFAULT_EPOCHS)
    p.add_argument("--methods", default="all",
                   help="comma-separated methods (default: all of " +
                        ", ".join(method_names()) + ")")
    args, settings = common.parse(p, argv, "methods", DEFAULT_EPOCHS)
    methods = chosen_methods(p, args.methods)
    # The controls go first: every comparison is against vanilla and replay.
    methods = tuple(sorted(methods, key=lambda m: (m not in ("vanilla", "replay"), 0)))

    runner = common.Runner(settings)
    for seed in settings.seeds:
        for method in methods:
            runner.run(method, common.variant(settings.base, method=method), seed,
                       method=method)
        report(runner, settings, methods)
    return 0


def report(runner: common.Runner, settings: common.Settings, methods: Sequence[str]) -> None:
    rows = []
    for m in methods:
        upd = runner.values(m, "steps")
        batches = runner.values(m, "batches")
        per_batch = f"{upd[0] / batches[0]:g}" if upd and batches else "n/a"
        plain = m.removeprefix("anp_")
        ref = plain if m.startswith("anp_") and plain in runner.records else None
        rows.append([
            f"`{m}`", per_batch, *common.accuracy_columns(runner, m),
            _delta(runner, m, "vanilla", "robust"), _delta(runner, m, "replay", "robust"),
            _delta(runner, m, "replay", "corruption"),
            _delta(runner, m, ref, "robust") if ref else "",
            _delta(runner, m, f"replay_{plain}", "robust") if m.startswith("anp_") else "",
            common.fmt(runner.values(m, "train_seconds"), 1),
        ])
    header = ["method", "updates / mini-batch", *common.accuracy_header(runner),
              "Δ robust vs vanilla", "Δ robust vs replay", "Δ corruption vs replay",
              "Δ robust vs same AT without ANP", "Δ robust vs same AT replay",
              "train s (incl. compile)"]
    sections = [
        "## Accuracy by method (equal epochs)",
        common.table(header, rows),
        "Δ columns: mean ± std of the per-seed differences (same seed = same initialisation "
        "and data order). Train seconds include compilation; see the cost experiment for "
        "time per epoch.",
        "## Findings",
        "\n".join(findings(runner, methods)),
        common.masking_section(common.masking_notes(runner, methods, settings)),
        common.at_chance_section(runner),
    ]
    labels = [m for m in methods if m in runner.records]
    series = {col: [runner.values(m, key) for m in labels]
              for col, key in (("clean", "clean"), ("robust", "robust"),
                               ("mean corruption", "corruption"))}
    common.bar_chart(os.path.join(settings.out, "accuracy.png"), labels, series, "accuracy",
                     f"Accuracy by method ({settings.epochs} epochs, "
                     f"{len(settings.seeds)} seed(s))")
    others = [m for m in labels if m != "replay"]
    if "replay" in runner.records:
        dseries = {label: [runner.deltas(m, "replay", key) for m in others]
                   for label, key in (("clean", "clean"), ("robust", "robust"),
                                      ("mean corruption", "corruption"))}
        common.bar_chart(os.path.join(settings.out, "delta.png"), others, dseries,
                         "accuracy minus replay's", "Gain over the replay control",
                         hline=0.0)
    plots = ["accuracy.png"] + (["delta.png"] if "replay" in runner.records else [])
    common.write_results(settings, "Methods", sections, runner.dump(), plots)


def _delta(runner: common.Runner, name: str, ref: str, key: str) -> str:
    if name == ref or ref not in runner.records or name not in runner.records:
        return ""
    return common.fmt(runner.deltas(name, ref, key), signed=True)


def findings(runner: common.Runner, methods: Sequence[str]) -> list[str]:
    """The paper's claims, checked against these runs (paired by seed)."""
    out = []
    recs = runner.records

    def claim(text: str, name: str, ref: str, key: str) -> None:
        if name in recs and ref in recs and runner.deltas(name, ref, key):
            d = runner.deltas(name, ref, key)
            out.append(f"- {text}: {common.fmt(d, signed=True)} ({common.verdict(d)})")

    claim("ANP vs vanilla, robust accuracy", "anp", "vanilla", "robust")
    claim("ANP vs replay, robust accuracy (what the noise adds)", "anp", "replay", "robust")
    claim("ANP vs vanilla, mean corruption accuracy", "anp", "vanilla", "corruption")
    claim("ANP vs replay, mean corruption accuracy", "anp", "replay", "corruption")
    claim("ANP vs vanilla, clean accuracy", "anp", "vanilla", "clean")
    for at in ("pgd_at", "trades", "fast_at", "free_at"):
        claim(f"anp_{at} vs {at}, robust accuracy", f"anp_{at}", at, "robust")
        claim(f"anp_{at} vs {at}, mean corruption accuracy", f"anp_{at}", at, "corruption")
        claim(f"anp_{at} vs replay_{at}, robust accuracy (what the noise adds to {at})",
              f"anp_{at}", f"replay_{at}", "robust")
    return out or ["- (needs the runs of vanilla, replay and anp)"]


if __name__ == "__main__":
    sys.exit(main())
