"""Training time per epoch of every method, relative to vanilla.

    python -m experiments.cost --out runs/exp/cost [--seeds 0,1,2,3,4] [--epochs 4]

Each run trains ``--epochs`` epochs (no robustness evaluation) and checkpoints after every
epoch; the trainer's checkpoints record the cumulative training seconds, so the time of
each epoch after the first is read back from them. The first epoch, which holds the
compilation, is left out: a method's time per epoch is the median over its later epochs,
then mean ± std over seeds. Relative cost is paired by seed (method / vanilla). Training
time includes one checkpoint save per epoch for every method alike.
Writes ``results.md``, ``cost.png`` and ``results.json``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from experiments import common
from experiments.methods import chosen_methods

DEFAULT_EPOCHS = 4


def epoch_seconds(workdir: str) -> list[float]:
    """Cumulative training seconds at the end of each epoch, read from the checkpoints."""
    import orbax.checkpoint as ocp

    from anp_jax import checkpoint as ckpt_lib

    mngr = ckpt_lib.manager(os.path.join(workdir, "checkpoints"), 1000)
    try:
        out = []
        for step in sorted(mngr.all_steps()):
            loop = mngr.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
            out.append(float(dict(loop["loop"])["train_seconds"]))
        return out
    finally:
        mngr.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__, DEFAULT_EPOCHS)
    p.add_argument("--methods", default="all", help="comma-separated methods (default: all)")
    p.set_defaults(corruptions="", attacks="", autoattack="none")
    args, settings = common.parse(p, argv, "cost", DEFAULT_EPOCHS)
    if settings.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch, with compilation, is not timed)")
    methods = chosen_methods(p, args.methods)
    if "vanilla" not in methods:
        methods = ("vanilla", *methods)
    methods = tuple(sorted(methods, key=lambda m: m != "vanilla"))
    base = common.variant(settings.base, checkpoint_every_steps=-1, checkpoint_min_secs=0.0,
                          keep_checkpoints=settings.epochs + 1)

    runner = common.Runner(settings)
    for seed in settings.seeds:
        for method in methods:
            rec = runner.run(method, common.variant(base, method=method), seed, method=method)
            cumulative = epoch_seconds(rec["workdir"])
            per_epoch = list(np.diff(cumulative)) if len(cumulative) > 1 else []
            rec["cumulative_seconds"] = cumulative
            rec["epoch_seconds"] = per_epoch
            rec["first_epoch_seconds"] = cumulative[0] if cumulative else None
            rec["seconds_per_epoch"] = float(np.median(per_epoch)) if per_epoch else None
        for method in methods:
            for seed, rec in runner.records.get(method, {}).items():
                van = runner.records.get("vanilla", {}).get(seed)
                if van and van.get("seconds_per_epoch") and rec.get("seconds_per_epoch"):
                    rec["relative_cost"] = rec["seconds_per_epoch"] / van["seconds_per_epoch"]
        report(runner, settings, methods)
    return 0


def report(runner: common.Runner, settings: common.Settings, methods: Sequence[str]) -> None:
    rows = []
    for m in methods:
        if m not in runner.records:
            continue
        recs = list(runner.records[m].values())
        per = [r["seconds_per_epoch"] for r in recs if r.get("seconds_per_epoch")]
        rel = [r["relative_cost"] for r in recs if r.get("relative_cost")]
        first = [r["first_epoch_seconds"] for r in recs if r.get("first_epoch_seconds")]
        upd = recs[0]["steps"] / recs[0]["batches"]
        rows.append([f"`{m}`", f"{upd:g}", common.fmt(per, 2), common.fmt(rel, 2),
                     common.fmt([u / upd for u in rel], 2) if rel else "n/a",
                     common.fmt(first, 1)])
    header = ["method", "updates / mini-batch", "s / epoch", "relative to vanilla",
              "relative per parameter update", "first epoch s (incl. compile)"]
    sections = [
        "## Training time per epoch",
        common.table(header, rows),
        f"Time per epoch: the median over epochs 2..{settings.epochs} of one run (the first "
        "epoch holds the compilation and is left out), mean ± std over seeds. Relative: "
        "paired by seed with vanilla. 'Per parameter update' divides by the updates per "
        "mini-batch: ANP's claim is that one of its updates costs about one plain update. "
        "At equal wall-clock time a method of relative cost c trains 1/c of vanilla's epochs.",
    ]
    labels = [m for m in methods if m in runner.records]
    series = {"relative time per epoch": [[r["relative_cost"] for r in
                                           runner.records[m].values() if r.get("relative_cost")]
                                          for m in labels]}
    common.bar_chart(os.path.join(settings.out, "cost.png"), labels, series,
                     "time per epoch / vanilla's", "Training cost relative to vanilla",
                     hline=1.0)
    common.write_results(settings, "Training cost", sections, runner.dump(), ["cost.png"])


if __name__ == "__main__":
    sys.exit(main())
