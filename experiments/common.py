"""What the experiment scripts share: command line, runs, statistics, tables and plots.

Every script is one command::

    python -m experiments.NAME --out DIR [--seeds 0,1,2,3,4] [--epochs N] [--config FILE]
                               [--set FIELD=VALUE ...] [--attacks IDS] [--corruptions IDS]

and writes into ``DIR``: ``results.md`` (Markdown tables), PNG plots and ``results.json`` (the
settings and every run's numbers, per seed). Each run trains one config with
:func:`anp_jax.trainer.train_and_evaluate` in its own workdir; a run
whose workdir already holds the metrics of the same config is not trained again (pass
``--rerun`` to train everything afresh), so an interrupted script picks up where it stopped.
Workdirs are ``STORE/seedS-HASH`` (``STORE``: ``--store``, default ``DIR/runs``; ``HASH``: of
the config), so scripts given the same ``--store`` share the runs they have in common.

Headline numbers of a run: clean accuracy; accuracy under the first FGSM and the first PGD
attack of the evaluation; and the mean accuracy over the evaluated corruptions (by default
the 19 CIFAR-10-C corruptions at severity 3).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from anp_jax import io as io_lib

DEFAULT_SEEDS = "0,1,2,3,4"
DEFAULT_SEVERITY = 3


# ----------------------------------------------------------------------------- command line

def parser(description: str, default_epochs: int) -> argparse.ArgumentParser:
    """The options every script takes; scripts add their own."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (tables, plots, JSON, runs)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run (default: {default_epochs} for the embedded digits "
                        "config, the config's num_epochs with --config)")
    p.add_argument("--config", default=None,
                   help="an ml_collections config file defining get_config(), e.g. "
                        "experiments/configs/cifar10_vgg16.py (default: the embedded digits "
                        "config, anp_jax/configs/default.py)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set batch_size=64 (repeatable)")
    p.add_argument("--attacks", default=None,
                   help="comma-separated attack ids to evaluate (default: the config's "
                        "eval.attacks); the first fgsm* and pgd* ids are the table's columns")
    p.add_argument("--corruptions", default="all",
                   help=f"comma-separated corruption ids, 'all' (the 19 at severity "
                        f"{DEFAULT_SEVERITY}, the default), 'all:S' (the 19 at severity S) "
                        "or 'config' (the config's eval.corruptions)")
    p.add_argument("--store", default=None,
                   help="where the runs' workdirs go (default DIR/runs); scripts given the "
                        "same store share the runs they have in common (same config, seed "
                        "and evaluation)")
    p.add_argument("--rerun", action="store_true",
                   help="train every run again even if its workdir holds its metrics")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (DIR/.jax_cache)")
    return p


@dataclasses.dataclass
class Settings:
    """The parsed command line of one script."""

    script: str
    out: str
    seeds: tuple[int, ...]
    epochs: int
    base: object  # ml_collections.ConfigDict: the config every run starts from
    config_path: str | None
    rerun: bool
    store: str
    command: str
    pgd_id: str | None
    fgsm_id: str | None


def load_config(path: str | None):
    """The config of ``path`` (a file defining ``get_config()``, optionally ``FILE:ARG``),
    or the embedded default: loaded as ``anp-jax`` loads it."""
    from anp_jax import cli

    try:
        return cli.load_config_file(path)
    except cli.UsageError as err:
        raise SystemExit(f"error: --config: {err}") from None


def apply_override(config, assignment: str) -> None:
    """``FIELD=VALUE`` (``FIELD`` may be dotted; ``VALUE`` a Python literal or a string)."""
    field, sep, text = assignment.partition("=")
    if not sep or not field:
        raise SystemExit(f"error: --set {assignment!r}: expected FIELD=VALUE")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = field.split(".")
    node = config
    try:
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(leaf)
        node[leaf] = value
    except (KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"error: --set {assignment!r}: {err}") from None


def corruption_ids(spec: str, config) -> tuple[str, ...]:
    from anp_jax.corruptions import CORRUPTIONS

    spec = spec.strip()
    if spec == "config":
        return tuple(config.eval.corruptions)
    if spec == "all" or spec.startswith("all:"):
        severity = int(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_SEVERITY
        return tuple(f"{name}_{severity}" for name in CORRUPTIONS)
    return tuple(s for s in (part.strip() for part in spec.split(",")) if s)


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, script: str,
          default_epochs: int) -> tuple[argparse.Namespace, Settings]:
    """Parses ``argv``; builds the base config (epochs, evaluation, overrides applied)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not seeds:
        p.error("--seeds: give at least one seed")
    config = load_config(args.config)
    for assignment in args.set:
        apply_override(config, assignment)
    epochs = args.epochs
    if epochs is None:
        epochs = int(config.num_epochs) if args.config else default_epochs
    if epochs < 1:
        p.error("--epochs must be >= 1")
    config.num_epochs = epochs
    if args.attacks is not None:
        config.eval.attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    config.eval.corruptions = corruption_ids(args.corruptions, config)
    attacks = tuple(config.eval.attacks)
    pgd = next((a for a in attacks if a.startswith("pgd")), None)
    fgsm = next((a for a in attacks if a.startswith("fgsm")), None)
    os.makedirs(args.out, exist_ok=True)
    if not args.no_compile_cache:
        enable_compile_cache(os.path.join(args.out, ".jax_cache"))
    command = "python -m experiments." + script + (" " + shlex.join(argv) if argv else "")
    return args, Settings(script=script, out=args.out, seeds=seeds, epochs=epochs, base=config,
                          config_path=args.config, rerun=args.rerun,
                          store=args.store or os.path.join(args.out, "runs"), command=command,
                          pgd_id=pgd, fgsm_id=fgsm)


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache: the runs of a script compile the same train and
    evaluation steps over and over; with the cache each is compiled once. Left alone if
    the user configured a cache directory already."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- runs

def variant(base, **fields):
    """A copy of ``base`` with ``fields`` set; nested fields as ``anp__epsilon=2.0``."""
    config = base.copy_and_resolve_references()
    for key, value in fields.items():
        *parents, leaf = key.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def _describe(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _train_accepts_overrides() -> bool:
    from anp_jax.trainer import train_and_evaluate

    return "schedule_overrides" in inspect.signature(train_and_evaluate).parameters


class Runner:
    """Trains and evaluates configs, one workdir per (run name, seed); collects the records.

    ``records[name][seed]`` is a flat dict: ``clean``, ``fgsm``, ``pgd``, ``corruption``
    (mean over the evaluated corruptions), ``adversarial`` and ``corruptions`` (per id),
    ``train_seconds``, ``steps``, ``batches``, ``epochs``, ``wall_seconds``.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.records: dict[str, dict[int, dict]] = {}
        self.meta: dict[str, dict] = {}

    def run(self, name: str, config, seed: int, *, schedule_overrides: Mapping | None = None,
            **meta) -> dict:
        from anp_jax.trainer import train_and_evaluate

        config = variant(config, seed=seed)
        key = {"config": _jsonable(config.to_dict()),
               "schedule_overrides": {k: _describe(v)
                                      for k, v in (schedule_overrides or {}).items()}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        workdir = os.path.join(self.settings.store, f"seed{seed}-{digest}")
        key_path = os.path.join(workdir, "experiment.json")
        metrics_path = os.path.join(workdir, "metrics.json")
        metrics = None
        if not self.settings.rerun and os.path.exists(metrics_path) \
                and os.path.exists(key_path):
            with open(key_path) as f:
                if json.load(f) == key:
                    with open(metrics_path) as g:
                        metrics = json.load(g)
        t0 = time.perf_counter()
        if metrics is None:
            if os.path.exists(workdir):
                shutil.rmtree(workdir)
            os.makedirs(workdir)
            kwargs = {}
            if schedule_overrides:
                kwargs["schedule_overrides"] = dict(schedule_overrides)
            metrics = train_and_evaluate(config, workdir, log=lambda m: None, progress=False,
                                         **kwargs)
            # Free the run's compiled programs: XLA:CPU keeps every executable's code in a
            # limited JIT memory, and a script compiles dozens of runs in one process
            # ("LLVM ERROR: Unable to allocate section memory" otherwise).
            import jax

            jax.clear_caches()
            io_lib.write_json_atomic(key_path, key, indent=1)
            cached = ""
        else:
            cached = " (cached)"
        record = summarize(metrics, self.settings)
        record["wall_seconds"] = time.perf_counter() - t0
        record["workdir"] = workdir
        self.records.setdefault(name, {})[seed] = record
        self.meta.setdefault(name, dict(meta))
        log(f"[{self.settings.script}] {name} seed {seed}: clean {record['clean']:.3f}  "
            f"robust {fmt_num(record['robust'])} ({record['robust_attack']})  "
            f"pgd {fmt_num(record['pgd'])}  corruption {fmt_num(record['corruption'])}  "
            f"train {record['train_seconds']:.1f} s{cached}")
        return record

    def values(self, name: str, key: str, seeds: Sequence[int] | None = None) -> list[float]:
        runs = self.records.get(name, {})
        seeds = runs.keys() if seeds is None else seeds
        return [runs[s][key] for s in seeds if s in runs and runs[s][key] is not None]

    def deltas(self, name: str, reference: str, key: str) -> list[float]:
        """Per-seed differences ``name - reference`` over the seeds both have (paired)."""
        a, b = self.records.get(name, {}), self.records.get(reference, {})
        return [a[s][key] - b[s][key] for s in a if s in b
                and a[s][key] is not None and b[s][key] is not None]

    def dump(self) -> dict:
        return {"runs": [{"name": n, "seed": s, **self.meta.get(n, {}), **r}
                         for n, per_seed in self.records.items() for s, r in per_seed.items()]}


def summarize(metrics: dict, settings: Settings) -> dict:
    """The figures of one run: ``robust`` is the reported robust accuracy (the per-example
    worst case over every attack run, ``metrics["robust_accuracy"]``) at the budget of the
    PGD attack, with the attack that gives it in ``robust_attack``; ``fgsm`` and ``pgd`` are
    those attacks alone (diagnostics)."""
    from anp_jax.evaluation import attacks as attack_eval

    corr = metrics.get("corruption", {})
    adv = metrics.get("adversarial", {})
    worst = {}
    if settings.pgd_id:
        _, norm, eps, _ = attack_eval.parse_id(settings.pgd_id)
        worst = (metrics.get("robust_accuracy") or {}).get(attack_eval.budget_key(norm, eps),
                                                           {})
    return {
        "clean": metrics["clean_accuracy"],
        "robust": worst.get("accuracy"),
        "robust_attack": worst.get("attack"),
        "fgsm": adv.get(settings.fgsm_id) if settings.fgsm_id else None,
        "pgd": adv.get(settings.pgd_id) if settings.pgd_id else None,
        "corruption": float(np.mean(list(corr.values()))) if corr else None,
        "adversarial": adv,
        "corruptions": corr,
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "batches": metrics["batches"],
        "epochs": metrics["epochs"],
        "final_train_loss": metrics.get("final_train_loss"),
        "perturbed_layers": metrics.get("perturbed_layers", []),
    }


# ----------------------------------------------------------------------------- statistics

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs for no values."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` of the values (just the mean for one value, ``n/a`` for none)."""
    if not values:
        return "n/a"
    m, s = mean_std(values)
    head = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return head if len(values) == 1 else f"{head} ± {s:.{digits}f}"


def verdict(deltas: Sequence[float]) -> str:
    """Whether a paired difference is a finding: its mean exceeds its spread (2 std errors)."""
    if len(deltas) < 2:
        return "one seed"
    m, s = mean_std(deltas)
    se = s / math.sqrt(len(deltas))
    if abs(m) <= 2 * se:
        return "within spread"
    return "higher" if m > 0 else "lower"


# ----------------------------------------------------------------------------- output

def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"JAX {jax.__version__} on {jax.default_backend()} ({kind}, "
            f"{jax.local_device_count()} local device(s))")


def settings_lines(settings: Settings) -> list[str]:
    c = settings.base
    lines = [
        f"- command: `{settings.command}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {machine()}",
        f"- config: {settings.config_path or 'embedded default (anp_jax/configs/default.py)'}; "
        f"dataset `{c.dataset}`, model `{c.model}`, {settings.epochs} epochs, batch "
        f"{c.batch_size}, lr {c.learning_rate} ({c.lr_schedule}); ANP layers `{c.anp.layers}`, "
        f"eps {c.anp.epsilon}, alpha {c.anp.alpha}, k {c.anp.k}, norm {c.anp.norm}, "
        f"schedule {c.anp.schedule}",
        f"- seeds: {', '.join(map(str, settings.seeds))} (mean ± sample std over seeds; "
        "differences are paired by seed)",
        "- robust column: the reported robust accuracy, per example the worst case over "
        f"every attack run at the budget of `{settings.pgd_id}` (the attack named beside it); "
        f"PGD column: `{settings.pgd_id}` alone; FGSM column: `{settings.fgsm_id}` alone "
        "(diagnostics); corruption "
        f"column: mean over {len(c.eval.corruptions)} corruption(s) "
        f"({_short_list(c.eval.corruptions)})",
    ]
    return lines


def _short_list(items: Sequence[str], n: int = 4) -> str:
    items = list(items)
    if len(items) <= n:
        return ", ".join(f"`{i}`" for i in items) or "none"
    return ", ".join(f"`{i}`" for i in items[:n]) + f", ... ({len(items)} in all)"


def write_results(settings: Settings, title: str, sections: Sequence[str], raw: dict,
                  plots: Sequence[str] = ()) -> None:
    """Writes ``results.md`` (title, settings, sections, plots) and ``results.json``."""
    md = [f"# {title}", "", *settings_lines(settings), ""]
    for section in sections:
        md += [section, ""]
    for plot in plots:
        md += [f"![{plot}]({plot})", ""]
    with open(os.path.join(settings.out, "results.md"), "w") as f:
        f.write("\n".join(md).rstrip() + "\n")
    payload = {
        "script": settings.script,
        "command": settings.command,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "seeds": list(settings.seeds),
        "epochs": settings.epochs,
        "config_path": settings.config_path,
        "base_config": _jsonable(settings.base.to_dict()),
        "pgd_id": settings.pgd_id,
        "fgsm_id": settings.fgsm_id,
        **raw,
    }
    io_lib.write_json_atomic(os.path.join(settings.out, "results.json"), _jsonable(payload),
                             indent=1)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: str, labels: Sequence[str], series: Mapping[str, Sequence[Sequence[float]]],
              ylabel: str, title: str, hline: float | None = None) -> None:
    """Grouped bars: one group per label, one bar per series, mean with a std error bar.
    ``series[name][i]`` holds the per-seed values of label ``i``."""
    plt = pyplot()
    n, m = len(labels), max(len(series), 1)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * n * m + 2), 4.2))
    x = np.arange(n)
    for j, (name, per_label) in enumerate(series.items()):
        stats = [mean_std(list(v)) for v in per_label]
        means = [0.0 if math.isnan(s[0]) else s[0] for s in stats]
        errs = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
        ax.bar(x + (j - (m - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=name)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ACCURACY_HEADER = ("clean", "robust (worst case, attack)", "FGSM", "PGD", "mean corruption")


def robust_cell(runner: Runner, name: str) -> str:
    """The reported robust accuracy of one run name (worst case over the attacks run, at the
    PGD budget) with the attack that gives it, e.g. ``0.412 (worst case over FGSM, PGD-10
    (per example))``."""
    attacks = sorted({r["robust_attack"] for r in runner.records.get(name, {}).values()
                      if r.get("robust_attack")})
    value = fmt(runner.values(name, "robust"))
    return f"{value} ({'; '.join(attacks)})" if attacks else value


def accuracy_columns(runner: Runner, name: str) -> list[str]:
    """The :data:`ACCURACY_HEADER` cells of one run name: clean, the reported robust
    accuracy with its attack, FGSM and PGD alone (diagnostics), mean corruption."""
    return [fmt(runner.values(name, "clean")), robust_cell(runner, name),
            *(fmt(runner.values(name, key)) for key in ("fgsm", "pgd", "corruption"))]


def masking_notes(runner: Runner, names: Sequence[str], settings: Settings) -> list[str]:
    """Signs of gradient masking in each run (per seed): the failed checks of
    :func:`anp_jax.evaluation.sanity.attack_checks` on its attack accuracies (PGD above
    FGSM at the same budget, an attack doing better at a larger budget, ...)."""
    from anp_jax.evaluation import sanity

    del settings
    notes = []
    for name in names:
        for seed, rec in runner.records.get(name, {}).items():
            notes += [f"{name} seed {seed}: {c['detail']}" for c in
                      sanity.attack_checks(rec["adversarial"], tolerance=1e-9)
                      if not c["passed"]]
    return notes


def masking_section(notes: Sequence[str]) -> str:
    if not notes:
        return ("Gradient-masking check: in every run PGD did no better than FGSM at the same "
                "budget, and no attack did better at a larger budget.")
    shown = "\n".join(f"- {n}" for n in notes[:20])
    more = f"\n- ... and {len(notes) - 20} more" if len(notes) > 20 else ""
    return ("Gradient-masking check FAILED for some runs (a stronger attack did worse); "
            "treat their robustness with suspicion:\n" + shown + more)


def train_accepts_overrides() -> bool:
    """Whether this anp_jax's ``train_and_evaluate`` takes ``schedule_overrides``."""
    return _train_accepts_overrides()
