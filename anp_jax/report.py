"""``anp-jax eval``: an honest robustness report of a trained model.

    anp-jax eval --workdir=DIR [--source_workdir=DIR2] [--baseline_workdir=DIR3] [--quick]

Reloads the run with :func:`anp_jax.load_run` (config, newest checkpoint, the test split
through the run's own input pipeline), evaluates the model without noise with the evaluators
of :mod:`anp_jax.evaluation` that the plan names, and merges a ``report`` section into
``DIR/metrics.json`` (all other keys are kept; the file is replaced atomically).  It prints a
table and writes PNG plots into ``DIR/report/``.

The sections (see ``docs/evaluation.md``): ``robust_accuracy`` (the reported number: per
threat model and budget, the per-example worst case over every attack run, AutoAttack
included where it is installed), ``attacks`` (each attack alone: diagnostics), ``autoattack``,
``corruptions`` (by family), ``stability``, ``insensitivity``, ``boundary_distance``,
``sanity`` and ``warnings``, ``plots``, ``learning_curves``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

USAGE = ("usage: anp-jax eval --workdir=DIR [--source_workdir=DIR2] "
         "[--baseline_workdir=DIR3] [--quick]")

PLOT_DIR = "report"
SECTIONS = ("clean", "attacks", "autoattack", "corruptions", "stability", "insensitivity",
            "boundary_distance")


class ReportError(Exception):
    """A problem with the command line, a workdir, its config or its checkpoints."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise ReportError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anp-jax eval", usage=USAGE.removeprefix("usage: "),
        description="Robustness report of a trained model: worst-case robust accuracy, "
                    "attacks, corruptions, stability, insensitivity, boundary distance and "
                    "sanity checks. Merges a 'report' section into DIR/metrics.json and "
                    "writes plots into DIR/report/.")
    parser.add_argument("--workdir", required=True,
                        help="the run to evaluate (its metrics.json and checkpoints/)")
    parser.add_argument("--source_workdir", default=None,
                        help="a run whose model crafts black-box transfer attacks")
    parser.add_argument("--baseline_workdir", default=None,
                        help="a run whose corruption errors normalise the mCE")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced set of attacks, budgets, corruptions and frames")
    return parser


# ---------------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The evaluation grid: which evaluators run (``sections``) and their settings.
    Budgets are in [0, 1] pixel units."""

    linf_budgets: tuple[float, ...]
    l2_budgets: tuple[float, ...]
    curve_budgets: tuple[float, ...]  # PGD accuracy vs budget; the last one is huge
    steps: int  # PGD, MI-FGSM and APGD iterations
    more_steps: int  # PGD iterations of the "more steps" sanity check, at the L-inf budget
    # where the PGD accuracy is closest to 0.5 (the most informative one)
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    num_frames: int
    sigmas: tuple[float, ...]  # relative noise of the insensitivity
    num_directions: int
    coarse: int
    fine: int
    boundary_examples: int  # at most this many test images for the boundary distance
    autoattack: str | None = None  # AutoAttack version (None: not installed, not run)
    autoattack_budgets: tuple[tuple[str, float], ...] = ()  # (norm, eps) it runs at
    autoattack_examples: int | None = None  # at most this many test images (None: all)
    autoattack_sanity_examples: int = 200  # its sanity runs: this many images, last budget
    sections: tuple[str, ...] = SECTIONS
    tolerance: float = 0.02  # of the sanity checks (fraction of the split)
    zero_threshold: float = 0.1  # PGD accuracy at the largest budget must be below this


_BUDGETS = {  # data set -> (linf, l2, PGD curve)
    "digits": ((0.05, 0.1, 0.2, 0.3), (0.5, 1.0, 2.0),
               (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)),
    "mnist": ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0), (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)),
    "fashion_mnist": ((0.05, 0.1, 0.2), (0.5, 1.0, 2.0), (0.02, 0.05, 0.1, 0.2, 0.3, 1.0)),
    "cifar10": ((2 / 255, 4 / 255, 8 / 255, 16 / 255), (0.25, 0.5, 1.0),
                tuple(v / 255 for v in (1, 2, 4, 8, 16, 32, 64, 255))),
    "imagenet2012": ((1 / 255, 2 / 255, 4 / 255), (1.0, 3.0),
                     tuple(v / 255 for v in (1, 2, 4, 16, 255))),
}
# AutoAttack's budgets (norm, eps): the headline ones, where robust accuracy is neither ~1
# nor 0.
_AUTOATTACK_BUDGETS = {"digits": (("linf", 0.1), ("linf", 0.2)), "mnist": (("linf", 0.3),),
                       "fashion_mnist": (("linf", 0.05), ("linf", 0.1), ("l2", 1.0)),
                       "cifar10": (("linf", 8 / 255),), "imagenet2012": (("linf", 4 / 255),)}
_QUICK_CORRUPTIONS = ("gaussian_noise", "impulse_noise", "brightness", "contrast")


def make_plan(dataset: str, quick: bool = False) -> Plan:
    """The grid for ``dataset``: the paper's 8/255 and 16/255 for CIFAR-10, the usual
    MNIST and ImageNet budgets, and budgets of the same relative strength for the 8x8
    digits (CIFAR-10's for another data set).  AutoAttack (standard; ``quick``: its quick
    preset on at most 500 images) runs at the headline L-inf budget(s) of the data set
    (digits: 0.1 and 0.2; Fashion-MNIST: 0.05, 0.1 and L2 1.0; CIFAR-10: 8/255; MNIST: 0.3;
    ImageNet: 4/255; ``quick``: its first L-inf budget), with its sanity checks on the first
    200 test images at the last budget (not with ``quick``, a quick look)."""
    from anp_jax import corruptions
    family = dataset.split("/")[0].replace("_corrupted", "")
    linf, l2, curve = _BUDGETS.get(family, _BUDGETS["cifar10"])
    version = "quick" if quick else "standard"
    aa_budgets = _AUTOATTACK_BUDGETS.get(family, _AUTOATTACK_BUDGETS["cifar10"])
    if quick:
        linf = (linf[1], linf[-1])
        return Plan(linf_budgets=linf, l2_budgets=(l2[1],),
                    curve_budgets=(linf[0], linf[-1], curve[-1]), steps=5, more_steps=10,
                    corruptions=_QUICK_CORRUPTIONS,
                    severities=(1, 3, 5), num_frames=4, sigmas=(0.1, 0.5), num_directions=4,
                    coarse=8, fine=4, boundary_examples=128, autoattack=version,
                    autoattack_budgets=(("linf", linf[0]),), autoattack_examples=500,
                    autoattack_sanity_examples=0)
    return Plan(linf_budgets=linf, l2_budgets=l2, curve_budgets=curve, steps=10,
                more_steps=20,
                corruptions=tuple(corruptions.CORRUPTIONS), severities=(1, 2, 3, 4, 5),
                num_frames=10, sigmas=(0.05, 0.1, 0.2, 0.5), num_directions=8, coarse=10,
                fine=6, boundary_examples=1000, autoattack=version,
                autoattack_budgets=aa_budgets)


# ---------------------------------------------------------------------------------------------
# The report: the plan's evaluators, run in order
# ---------------------------------------------------------------------------------------------


def _load(workdir: str, log: Callable[[str], None]):
    from anp_jax.evaluation.run import RunError, load_run

    try:  # on every local device, whatever the training used (`anp-jax eval --cpu_devices`)
        return load_run(workdir, num_devices=-1, log=log)
    except RunError as err:
        raise ReportError(str(err)) from None


def sanity_checks(attacks_section: dict, clean: float, plan: Plan) -> list[dict]:
    """The checks of :mod:`anp_jax.evaluation.sanity` on the report's attack section."""
    from anp_jax.evaluation import sanity

    curve = attacks_section["accuracy_vs_budget"]
    checks = sanity.attack_checks({**attacks_section["accuracy"],
                                   **attacks_section["random_noise"]}, clean, plan.tolerance)
    checks += sanity.curve_checks(curve["budgets"], curve["accuracy"],
                                  f"PGD-{plan.steps} L-inf", plan.zero_threshold,
                                  plan.tolerance)
    transfer = attacks_section.get("transfer")
    if transfer is not None:
        checks += sanity.transfer_checks(attacks_section["accuracy"], transfer["accuracy"],
                                         plan.tolerance)
    return checks


def _baseline_corruptions(ctx: _Context, baseline_dir: str) -> tuple[dict, float, str]:
    """The baseline's corruption accuracies: from its report if it has every id we need,
    otherwise by evaluating its model on the same corrupted images."""
    from anp_jax.evaluation import clean, corruptions
    from anp_jax.evaluation.run import RunError, read_metrics

    try:
        metrics = read_metrics(baseline_dir)
    except RunError as err:
        raise ReportError(str(err)) from None
    dataset = ctx.run.config.get("dataset")
    if metrics["config"].get("dataset") != dataset:
        raise ReportError(f"baseline {baseline_dir} was trained on "
                          f"{metrics['config'].get('dataset')!r}, not {dataset!r}")
    plan = ctx.plan
    needed = [f"{n}_{s}" for n in plan.corruptions for s in plan.severities]
    stored = ((metrics.get("report") or {}).get("corruptions") or {}).get("accuracy") or {}
    stored_clean = (metrics.get("report") or {}).get("clean_accuracy",
                                                       metrics.get("clean_accuracy"))
    if all(isinstance(stored.get(c), (int, float)) for c in needed) and isinstance(
            stored_clean, (int, float)):
        return {c: float(stored[c]) for c in needed}, float(stored_clean), "report"
    ctx.log(f"  evaluating the baseline model of {baseline_dir} on the corruptions")
    model = _load(baseline_dir, ctx.log).model
    accuracy = dict(corruptions.Evaluator(ctx.runner, needed).run(model))["accuracy"]
    return accuracy, dict(clean.Evaluator(ctx.runner).run(model))["accuracy"], "evaluated"


@dataclasses.dataclass
class _Context:
    """What the sections share while the report is made."""

    run: Any  # anp_jax.evaluation.run.TrainedRun
    runner: Any  # anp_jax.evaluation.Runner
    plan: Plan
    log: Callable[[str], None]
    source: Any = None  # the TrainedRun of --source_workdir
    baseline_workdir: str | None = None
    sections: dict = dataclasses.field(default_factory=dict)
    evaluators: dict = dataclasses.field(default_factory=dict)


def _clean(ctx: _Context) -> dict:
    from anp_jax.evaluation import clean

    ev = ctx.evaluators["clean"] = clean.Evaluator(ctx.runner)
    return dict(ev.run(ctx.run.model))


def _attacks(ctx: _Context) -> dict:
    from anp_jax.evaluation import attacks

    plan, source = ctx.plan, ctx.source
    info = None if source is None else {
        "source_workdir": source.workdir, "source_model": source.config.get("model"),
        "source_method": source.config.get("method")}
    ev = ctx.evaluators["attacks"] = attacks.GridEvaluator(
        ctx.runner, linf_budgets=plan.linf_budgets, l2_budgets=plan.l2_budgets,
        curve_budgets=plan.curve_budgets, steps=plan.steps, more_steps=plan.more_steps,
        clean_accuracy=ctx.sections["clean"]["accuracy"],
        source=None if source is None else source.model, source_info=info, log=ctx.log)
    return dict(ev.run(ctx.run.model))


def _autoattack(ctx: _Context) -> dict | None:
    from anp_jax.evaluation import autoattack_evaluator

    plan = ctx.plan
    if plan.autoattack is None:
        ctx.log("  AutoAttack is not installed (anp_jax/evaluation/autoattack.py); the worst "
                "case is over the diagnostic attacks only")
        return None
    ev = ctx.evaluators["autoattack"] = autoattack_evaluator.Evaluator(
        ctx.runner, plan.autoattack_budgets, version=plan.autoattack,
        max_examples=plan.autoattack_examples, seed=ctx.runner.seed,
        sanity_examples=plan.autoattack_sanity_examples, log=ctx.log)
    return dict(ev.run(ctx.run.model))


def _corruptions(ctx: _Context) -> dict:
    from anp_jax import data as data_lib
    from anp_jax.evaluation import corruptions
    from anp_jax.evaluation.runner import Runner

    plan, runner = ctx.plan, ctx.runner
    ids = [f"{n}_{s}" for n in plan.corruptions for s in plan.severities]
    accuracy = dict(corruptions.Evaluator(runner, ids).run(ctx.run.model))["accuracy"]
    base = base_clean = origin = None
    if ctx.baseline_workdir is not None:
        base, base_clean, origin = _baseline_corruptions(ctx, ctx.baseline_workdir)
    out = corruptions.summary(accuracy, ctx.sections["clean"]["accuracy"], plan.corruptions,
                              plan.severities, base, base_clean)
    if ctx.baseline_workdir is not None:
        out["baseline_workdir"] = ctx.baseline_workdir
        out["baseline_source"] = origin
    if ctx.run.config.get("dataset") == "cifar10":  # the original CIFAR-10-C too, if prepared
        batch = ctx.run.source.eval_batch

        def make_runner(images, labels):
            return Runner(list(data_lib.eval_batches(images, labels, batch, runner.n_dev)),
                          devices=runner.local_devices, programs=runner.programs)

        out["tfds"] = corruptions.tfds_accuracies(
            ctx.run.model, plan.corruptions, plan.severities, make_runner,
            "cifar10_corrupted", ctx.run.config.get("data_dir") or None)
    return out


def _stability(ctx: _Context) -> dict:
    from anp_jax.evaluation import stability

    return dict(stability.Evaluator(ctx.runner, ctx.plan.num_frames).run(ctx.run.model))


def _insensitivity(ctx: _Context) -> dict:
    from anp_jax.evaluation import analysis

    return dict(analysis.InsensitivityEvaluator(ctx.runner, ctx.plan.sigmas).run(
        ctx.run.model))


def _boundary(ctx: _Context) -> dict:
    from anp_jax.evaluation import analysis

    plan = ctx.plan
    return dict(analysis.BoundaryEvaluator(
        ctx.runner, num_directions=plan.num_directions, coarse=plan.coarse, fine=plan.fine,
        max_examples=plan.boundary_examples).run(ctx.run.model))


_SECTION_FNS: dict[str, Callable[[_Context], dict | None]] = {
    "clean": _clean, "attacks": _attacks, "autoattack": _autoattack,
    "corruptions": _corruptions, "stability": _stability, "insensitivity": _insensitivity,
    "boundary_distance": _boundary}


def make_report(workdir: str, source_workdir: str | None = None,
                baseline_workdir: str | None = None, quick: bool = False,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                plan: Plan | None = None) -> dict:
    """Computes the report of ``workdir`` (without writing anything).

    ``plan`` (default :func:`make_plan` of the run's data set) names the sections and their
    settings; ``clean`` always runs; ``robust_accuracy`` combines ``attacks`` and
    ``autoattack``, ``sanity`` checks ``attacks``.
    """
    from anp_jax.evaluation import plots, robust, sanity
    from anp_jax.evaluation.runner import Runner

    t_start = time.perf_counter()
    run = _load(workdir, log)
    source = None
    if source_workdir is not None:
        source = _load(source_workdir, log)
        if source.config.get("dataset") != run.config.get("dataset"):
            raise ReportError(f"source {source_workdir} was trained on "
                              f"{source.config.get('dataset')!r}, not "
                              f"{run.config.get('dataset')!r}")
    if baseline_workdir is not None:
        from anp_jax.evaluation.run import RunError, read_metrics

        try:
            read_metrics(baseline_workdir)  # fail early on a bad baseline
        except RunError as err:
            raise ReportError(str(err)) from None
    plan = plan or make_plan(run.config["dataset"], quick)
    from anp_jax.evaluation.run import RunError

    try:
        runner = Runner(run.source.eval_batches, devices=run.devices,
                        seed=int(run.config.get("seed", 0)))
    except RunError as err:
        raise ReportError(str(err)) from None
    ctx = _Context(run, runner, plan, log, source, baseline_workdir)
    timings: dict[str, float] = {}
    for name in ("clean", *(s for s in plan.sections if s != "clean")):
        log(f"{name}...")
        t0 = time.perf_counter()
        out = _SECTION_FNS[name](ctx)
        timings[name] = time.perf_counter() - t0
        log(f"{name}: {timings[name]:.1f} s")
        if out is not None:
            ctx.sections[name] = out
    sections = ctx.sections
    clean = sections["clean"]["accuracy"]
    report: dict[str, Any] = {
        "title": plots.run_title(run.config),
        "checkpoint_step": run.step,
        "dataset": run.config["dataset"],
        "model": run.config["model"],
        "method": run.config.get("method"),
        "num_examples": runner.num_examples,
        "num_devices": runner.n_dev,
        "quick": quick,
        "clean_accuracy": clean,
    }
    attack_ev, aa = ctx.evaluators.get("attacks"), ctx.evaluators.get("autoattack")
    if attack_ev is not None or aa is not None:
        report["robust_accuracy"] = robust.worst_case(
            runner, ctx.evaluators["clean"].correct, attack_ev.flags if attack_ev else {},
            aa.records if aa is not None else None)
    checks = sanity_checks(sections["attacks"], clean, plan) if "attacks" in sections else []
    for name in plan.sections:
        if name in sections and name not in ("clean", "boundary_distance"):
            report[name] = sections[name]
    if "boundary_distance" in sections:
        b = sections["boundary_distance"]
        report["boundary_distance"] = {
            "num_directions": b["num_directions"], "max_distance": b["max_distance"],
            "resolution": b["resolution"], "norm": b["norm"], "mean_min": b["mean_min"],
            "mean_mean": b["mean_mean"], "censored_fraction": b["censored_fraction"],
            "num_examples": b["num_examples"]}
    warnings = sanity.warnings(checks)
    if aa is not None and aa.sanity is not None:  # AutoAttack's own: strength and masking
        checks = checks + aa.checks
        warnings = warnings + aa.warnings
    report["sanity"] = {"checks": checks, "passed": all(c["passed"] for c in checks)}
    report["warnings"] = warnings
    report["timings"] = timings
    report["seconds"] = time.perf_counter() - t_start
    return report


# ---------------------------------------------------------------------------------------------
# Output: plots, table, metrics.json
# ---------------------------------------------------------------------------------------------


def _save_figure(draw: Callable[[str], Any], dst: str) -> Any:
    """``draw(local_path)`` into a temporary file, copied to ``dst`` (local or ``gs://``,
    through :mod:`etils.epath`); returns what ``draw`` returns."""
    import tempfile

    from etils import epath

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(dst))
        out = draw(local)
        epath.Path(dst).write_bytes(epath.Path(local).read_bytes())
    return out


def write_plots(report: dict, workdir: str) -> dict[str, str]:
    """PNG plots of the report's sections into ``workdir/report/`` (local or ``gs://``);
    returns ``{name: path relative to workdir}``."""
    from etils import epath

    from anp_jax.evaluation import plots

    out_dir = os.path.join(workdir, PLOT_DIR)
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    title = report.get("title") or f"{report.get('model')}, {report.get('method')}"
    figures = (("accuracy_vs_budget", "attacks", plots.accuracy_vs_budget),
               ("corruption_severity", "corruptions", plots.corruption_heatmap),
               ("insensitivity", "insensitivity", plots.insensitivity))
    paths = {}
    for name, section, draw in figures:
        if section in report:
            _save_figure(functools.partial(draw, report, title),
                         os.path.join(out_dir, f"{name}.png"))
            paths[name] = os.path.join(PLOT_DIR, f"{name}.png")
    return paths


def write_learning_curves(workdir: str, title: str) -> dict | None:
    """The learning curves of ``workdir/metrics.jsonl`` (written during training) as
    ``workdir/report/learning_curves.png`` (local or ``gs://``); None when the run wrote no
    curves."""
    from etils import epath

    from anp_jax.evaluation import plots

    rows = plots.read_curves(workdir)
    if not rows:
        return None
    epath.Path(os.path.join(workdir, PLOT_DIR)).mkdir(parents=True, exist_ok=True)
    rel = os.path.join(PLOT_DIR, "learning_curves.png")
    columns = _save_figure(functools.partial(plots.learning_curves, rows, title),
                           os.path.join(workdir, rel))
    return {"plot": rel, "rows": len(rows), "columns": columns}


def format_report(report: dict, workdir: str) -> str:
    """A readable table of the report, for the terminal: the reported worst case first,
    then the diagnostics."""
    from anp_jax import attacks
    from anp_jax.evaluation import robust
    from anp_jax.evaluation.corruptions import FAMILY_OF

    lines = [f"robustness report of {workdir} (checkpoint {report['checkpoint_step']}, "
             f"{report.get('title', report['model'])}, "
             f"{report['num_examples']} test images{', quick' if report['quick'] else ''})",
             f"clean accuracy {report['clean_accuracy']:.4f}", ""]
    robust_lines = robust.table_lines(report.get("robust_accuracy") or {})
    lines += robust_lines + ([""] if robust_lines else [])
    a = report.get("attacks")
    if a:
        lines.append("diagnostics: each attack alone (quick checks, not the reported number)")
        rows: dict[str, dict[float, float]] = {}
        for aid, acc in a["accuracy"].items():
            name, norm, eps, steps = attacks.parse_attack_id(aid)
            rows.setdefault(f"{name}{steps or ''} {norm}", {})[eps] = acc
        for key, acc in a["random_noise"].items():
            rows.setdefault("uniform noise linf", {})[float(key.rsplit("_", 1)[1])] = acc
        for aid, acc in (a.get("transfer") or {}).get("accuracy", {}).items():
            name, norm, eps, steps = attacks.parse_attack_id(aid)
            rows.setdefault(f"transfer {name}{steps or ''} {norm}", {})[eps] = acc
        width = max(len(r) for r in rows) + 2
        for norm in ("linf", "l2"):
            budgets = a["budgets"][norm]
            lines.append(f"{'attack (' + norm + ')':<{width}}" + "".join(
                f"{b:>9.4g}" for b in budgets))
            for label, values in rows.items():
                if label.endswith(norm):
                    lines.append(f"{label:<{width}}" + "".join(
                        f"{values[b]:9.4f}" if b in values else f"{'':>9}" for b in budgets))
            lines.append("")
        curve = a["accuracy_vs_budget"]
        lines.append(f"{curve['attack']} accuracy vs budget: " + ", ".join(
            f"{b:.4g}: {v:.3f}" for b, v in zip(curve["budgets"], curve["accuracy"])))
        lines.append("")
    aa = (report.get("autoattack") or {}).get("records") or {}
    for key, r in aa.items():
        stages = r.get("stages")
        lines.append(f"{r['attack']} at {key.replace('_', ' ')}: {r['robust_accuracy']:.4f} "
                     f"over {r['num_examples']} images ({r['seconds']['total']:.1f} s)"
                     + (f"; stages {stages}" if stages else ""))
    if aa:
        lines.append("")
    c = report.get("corruptions")
    if c:
        sev = c["severities"]
        cw = max(len(n) + len(FAMILY_OF.get(n, "?")) + 2 for n in c["error"]) + 2
        lines.append(f"{'corruption error':<{cw}}" + "".join(f"{'s' + str(s):>7}" for s in sev)
                     + f"{'mean':>8}" + (f"{'norm.':>8}" if "normalized_error" in c else ""))
        for name, err in c["error"].items():
            label = f"{FAMILY_OF.get(name, '?')}: {name}"
            line = f"{label:<{cw}}" + "".join(f"{1 - c['accuracy'][f'{name}_{s}']:7.3f}"
                                              for s in sev) + f"{err:8.3f}"
            if "normalized_error" in c:
                v = c["normalized_error"][name]
                line += f"{v:8.3f}" if v is not None else f"{'-':>8}"
            lines.append(line)
        summary = f"mCE {c['mce']:.4f} (unnormalised)"
        if c.get("family_error"):
            summary += "; by family " + ", ".join(f"{f} {e:.3f}"
                                                  for f, e in c["family_error"].items())
        if "normalized_mce" in c:
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            summary += (f"; normalised mCE {fmt(c['normalized_mce'])}, relative mCE "
                        f"{fmt(c['relative_mce'])} (baseline {c['baseline_workdir']})")
        lines += [summary, ""]
        t = c.get("tfds")
        if t:
            if t["accuracy"]:
                lines.append(f"TFDS {t['dataset']}: mean accuracy {t['mean_accuracy']:.4f} "
                             f"over {len(t['accuracy'])} prepared set(s)")
            if t["unavailable"]:
                lines.append(f"TFDS {t['dataset']}: {len(t['unavailable'])} set(s) not "
                             "prepared in the data dir (not evaluated)")
            lines.append("")
    s = report.get("stability")
    if s:
        lines.append(f"flip probability over {s['num_frames']} frames: " + ", ".join(
            f"{k} {v:.4f}" for k, v in s["flip_probability"].items()) + f"; mFP {s['mfp']:.4f}")
    ins = report.get("insensitivity")
    if ins:
        pw = max(max(len(p) for p in ins["points"]) + 2, 36)
        lines += ["", f"{'insensitivity (rel. logit change)':<{pw}}" + "".join(
            f"{'sigma ' + format(v, 'g'):>12}" for v in ins["sigmas"])]
        for p in ins["points"]:
            lines.append(f"{p:<{pw}}" + "".join(
                f"{v:12.4f}" for v in ins["per_point"][p]["relative_logit_change"]))
    b = report.get("boundary_distance")
    if b:
        lines += ["", f"boundary distance (L2, {b['num_directions']} random orthonormal "
                      f"directions, {b['num_examples']} images): worst-case {b['mean_min']:.3f}, "
                      f"mean {b['mean_mean']:.3f}, censored at {b['max_distance']:.3g}: "
                      f"{b['censored_fraction']:.1%}"]
    lines += ["", "sanity checks:"]
    for check in report["sanity"]["checks"]:
        lines.append(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: "
                     f"{check['detail']}")
    for w in report["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def merge_into_metrics(workdir: str, report: dict) -> str:
    """Sets ``metrics["report"]`` in ``workdir/metrics.json`` (re-read now, so that every
    other key is kept), written atomically (:func:`anp_jax.io.write_json_atomic`)."""
    from anp_jax import io as io_lib
    from anp_jax.evaluation.run import RunError, read_metrics

    try:
        metrics = read_metrics(workdir)
    except RunError as err:
        raise ReportError(str(err)) from None
    metrics["report"] = report
    path = os.path.join(workdir, "metrics.json")
    io_lib.write_json_atomic(path, metrics)
    return path


def main(argv: list[str] | None = None) -> int:
    """``anp-jax eval ARGS``; returns the exit status (0, 2 for errors, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args = _parser().parse_args(argv)
    except ReportError as err:
        print(f"anp-jax: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    log = functools.partial(print, file=sys.stderr)
    from anp_jax import data as data_lib

    try:
        report = make_report(args.workdir, args.source_workdir, args.baseline_workdir,
                             args.quick, log)
        report["plots"] = write_plots(report, args.workdir)
        curves = write_learning_curves(args.workdir, report["title"])
        if curves is not None:
            report["learning_curves"] = curves
        path = merge_into_metrics(args.workdir, report)
    except (ReportError, data_lib.DatasetError) as err:
        print(f"anp-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anp-jax: interrupted; metrics.json is unchanged", file=sys.stderr)
        return 130
    except Exception as err:  # anything unexpected: still one line
        text = str(err).strip().splitlines()
        print(f"anp-jax: error: {type(err).__name__}: {text[0] if text else ''}",
              file=sys.stderr)
        return 1
    print(format_report(report, args.workdir))
    print(f"report ({report['seconds']:.1f} s) merged into {path}; plots in "
          f"{os.path.join(args.workdir, PLOT_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
