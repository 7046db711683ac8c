"""Noise schedules side by side: constant, official (stretched), linear and cosine warm-up,
and one a user writes in a few lines.

    python -m experiments.schedules --out runs/exp/schedules [--seeds 0,1,2,3,4] [--epochs 10]
        [--warmup 0.25]

- constant: eps, alpha and k of the config throughout;
- official: the authors' CIFAR-10 table (clean, eps 0.3, 1.0, 0.3, clean; k 1/3/3/3/1)
  stretched from 120 epochs to ``--epochs``;
- linear, cosine: eps rises from 0 to the config's eps over the first ``--warmup`` of the
  epochs, then stays;
- user: :func:`user_eps_schedule` below, a plain function of the epoch (eps rises and falls
  as half a sine, with the same mean eps as constant).

The controls are vanilla and replay with each schedule's k (constant k; the official k
table). Writes ``results.md``, ``schedules.png`` (eps over epochs), ``accuracy.png`` and
``results.json``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from experiments import common

DEFAULT_EPOCHS = 10
SCHEDULES = ("constant", "official", "linear", "cosine", "user")


def user_eps_schedule(num_epochs: float, eps: float):
    """A schedule written by a user: eps peaks mid-training and fades out (half a sine),
    scaled so that its mean over training equals ``eps``."""
    peak = eps * math.pi / 2

    def schedule(epoch):
        return peak * jnp.sin(jnp.pi * jnp.clip(jnp.asarray(epoch, jnp.float32) / num_epochs,
                                                0.0, 1.0))

    return schedule


def as_piecewise(config, fn, num_epochs: int):
    """``fn`` tabulated once per epoch (at mid-epoch) as a ``piecewise`` config: the way to
    run a function schedule with a trainer that takes schedules only from the config."""
    a = config.anp
    bounds = tuple(float(e) for e in range(1, num_epochs))
    eps = tuple(float(fn(e + 0.5)) for e in range(num_epochs))
    return common.variant(config, anp__schedule="piecewise", anp__boundaries=bounds,
                          anp__eps_values=eps, anp__alpha_values=(float(a.alpha),) * num_epochs,
                          anp__k_values=(int(a.k),) * num_epochs)


def plan(base, epochs: int, warmup: float):
    """``[(name, config, schedule_overrides, eps function, role)]``."""
    from anp_jax.trainer import make_schedules

    v = common.variant
    w = max(warmup * epochs, 1e-3)
    anp = {
        "constant": v(base, method="anp", anp__schedule="constant"),
        "official": v(base, method="anp", anp__schedule="official"),
        "linear": v(base, method="anp", anp__schedule="linear", anp__warmup_epochs=w),
        "cosine": v(base, method="anp", anp__schedule="cosine", anp__warmup_epochs=w),
    }
    out = [(name, cfg, None, make_schedules(cfg)["eps"], "anp") for name, cfg in anp.items()]
    user = user_eps_schedule(epochs, float(base.anp.epsilon))
    const = anp["constant"]
    out.append(("user", const, {"eps": user}, user, "anp"))
    out += [
        ("vanilla", v(base, method="vanilla"), None, None, "control"),
        (f"replay k={base.anp.k}", v(base, method="replay", anp__schedule="constant"), None,
         None, "control"),
        ("replay official k", v(base, method="replay", anp__schedule="official"), None, None,
         "control"),
    ]
    return out, user


def control_of(name: str, k: int) -> str:
    return "replay official k" if name == "official" else f"replay k={k}"


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__, DEFAULT_EPOCHS)
    p.add_argument("--warmup", type=float, default=0.25,
                   help="linear/cosine warm-up as a fraction of the epochs (default 0.25)")
    p.add_argument("--schedules", default="all",
                   help="comma-separated subset of " + ", ".join(SCHEDULES) + " (default all)")
    args, settings = common.parse(p, argv, "schedules", DEFAULT_EPOCHS)
    if not 0 < args.warmup <= 1:
        p.error("--warmup must be in (0, 1]")
    runs, user = plan(settings.base, settings.epochs, args.warmup)
    if args.schedules != "all":
        chosen = {s.strip() for s in args.schedules.split(",") if s.strip()}
        bad = chosen - {r[0] for r in runs if r[4] == "anp"}
        if bad:
            p.error(f"--schedules: unknown {', '.join(sorted(bad))}; choose from "
                    + ", ".join(SCHEDULES))
        # keep the chosen schedules, vanilla and the replay controls they need
        k = int(settings.base.anp.k)
        need = chosen | {"vanilla"} | {control_of(n, k) for n in chosen}
        runs = [r for r in runs if r[0] in need]
    runner = common.Runner(settings)
    for seed in settings.seeds:
        for name, cfg, overrides, _, role in runs:
            runner.run(name, cfg, seed, schedule_overrides=overrides, role=role,
                       schedule=cfg.anp.schedule if role == "anp" else "")
        report(runner, settings, runs, user)
    return 0


def _curve(fn, epochs: int, n: int = 400):
    xs = np.linspace(0, epochs, n, endpoint=False)
    return xs, np.array([float(fn(x)) for x in xs])


def report(runner: common.Runner, settings: common.Settings, runs, user) -> None:
    from anp_jax.trainer import make_schedules

    epochs, k = settings.epochs, int(settings.base.anp.k)
    rows = []
    for name, cfg, overrides, eps_fn, role in runs:
        if name not in runner.records:
            continue
        if role == "anp":
            _, eps = _curve(eps_fn, epochs)
            _, ks = _curve(make_schedules(cfg)["k"], epochs)
            ctrl = control_of(name, k)
            cells = [f"{eps.mean():.2f}", f"{ks.mean():.2f}"]
            deltas = [common.fmt(runner.deltas(name, ctrl, key), signed=True)
                      for key in ("robust", "corruption", "clean")]
        else:
            steps, batches = runner.values(name, "steps"), runner.values(name, "batches")
            cells = ["0", f"{steps[0] / batches[0]:.2f}" if steps else "n/a"]
            ctrl, deltas = "", ["", "", ""]
        how = ""
        if name == "user":
            how = " (function via schedule_overrides)" if overrides else \
                " (function tabulated per epoch as piecewise)"
        rows.append([f"`{name}`{how}", *cells, *common.accuracy_columns(runner, name),
                     f"`{ctrl}`" if ctrl else "", *deltas])
    header = ["schedule", "mean eps", "mean k", *common.accuracy_header(runner),
              "control", "Δ robust vs control", "Δ corruption vs control", "Δ clean vs control"]
    sections = ["## Noise schedules (equal epochs)", common.table(header, rows),
                "The user-written schedule (`experiments/schedules.py`):",
                "```python\n" + _source(user_eps_schedule) + "```",
                common.masking_section(common.masking_notes(runner, list(runner.records),
                                                            settings)),
                common.at_chance_section(runner)]
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, _, overrides, eps_fn, role in runs:
        if role != "anp":
            continue
        xs, ys = _curve(eps_fn, epochs)
        ax.plot(xs, ys, label=name)
        if name == "user" and not overrides:
            xs, ys = _curve(user, epochs)
            ax.plot(xs, ys, linestyle=":", color="gray", label="user (as written)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("eps")
    ax.set_title("Noise magnitude over training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(settings.out, "schedules.png"), dpi=110)
    plt.close(fig)
    labels = [r[0] for r in runs if r[0] in runner.records]
    common.bar_chart(os.path.join(settings.out, "accuracy.png"), labels,
                     {c: [runner.values(x, key) for x in labels]
                      for c, key in (("clean", "clean"), ("robust", "robust"),
                                     ("mean corruption", "corruption"))},
                     "accuracy", "Accuracy by noise schedule")
    common.write_results(settings, "Noise schedules", sections, runner.dump(),
                         ["schedules.png", "accuracy.png"])


def _source(fn) -> str:
    import inspect

    return inspect.getsource(fn)


if __name__ == "__main__":
    sys.exit(main())
