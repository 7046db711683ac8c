"""What the experiment scripts share: command line, runs, statistics, tables and plots.

Every script is one command with ``anp-jax``'s flags (absl, ``ml_collections``)::

    python -m experiments.NAME --out DIR [--seeds 0,1,2,3,4] [--epochs N] [--config FILE]
                               [--config.FIELD=VALUE ...] [--attacks IDS] [--corruptions IDS]
                               [--autoattack standard|quick|none] [--autoattack_budgets B]
                               [--autoattack_examples N] [--sections corruptions,stability]
                               [--cpu_devices N]

and writes into ``DIR``: ``results.md`` (Markdown tables), PNG plots and ``results.json`` (the
settings and every run's numbers, per seed). Each run trains one config with
:func:`anp_jax.trainer.train_and_evaluate` in its own workdir, then the evaluation engine
(:func:`anp_jax.report.make_report`) runs AutoAttack (standard by default, at the budget of
the first PGD attack) and the ``--sections`` asked for on the trained model; on CPU the
runs train on one device and the evaluation pmaps over one XLA host device per core
(``--cpu_devices``, as ``anp-jax eval`` does).  A run whose
workdir already holds the metrics of the same config is not trained again, and its
evaluation (``evaluation.json``) is reused while the plan is the same (pass ``--rerun`` to
do everything afresh), so an interrupted script picks up where it stopped.  Workdirs are
``STORE/seedS-HASH`` (``STORE``: ``--store``, default ``DIR/runs``; ``HASH``: of the config),
so scripts given the same ``--store`` share the runs they have in common.  Every finished
run's figures are also kept in ``DIR/ledger.json`` (keyed by the config's and the plan's
hashes), so a script given the same ``--out`` on another machine, without the store (a
study's ``DIR`` can be committed, the workdirs with their checkpoints need not be), reuses
them instead of training and evaluating again.  The ledgers of the studies beside ``DIR``
(``DIR/../*/ledger.json``) are read too: a run one of them finished with the same config
and evaluation plan is copied into this ledger instead of being repeated.

Headline numbers of a run: clean accuracy; the reported robust accuracy per budget (the
per-example worst case over the attacks run there: AutoAttack where it ran), with the
attack named; FGSM and PGD alone as diagnostics; and the mean accuracy over the evaluated
corruptions (by default the 19 CIFAR-10-C corruptions at severity 3).
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
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
import types
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from anp_jax import io as io_lib

DEFAULT_SEEDS = "0,1,2,3,4"
DEFAULT_SEVERITY = 3


# ----------------------------------------------------------------------------- command line

class Parser:
    """A script's command line: ``anp-jax``'s absl flags (:func:`anp_jax.cli.parse_config_flags`:
    ``--config=FILE``, ``--config.FIELD=VALUE``, ``--[no]compile_cache``) plus the options every
    script takes and its own (``add_argument``: ``--NAME`` with a default, a help line and a
    type; ``action="store_true"`` for a boolean).  :meth:`error` exits with one line."""

    def __init__(self, description: str, default_epochs: int):
        self.description = description
        self._flags: dict[str, list] = {}  # name -> [default, help, type]
        self.add_argument("--out", help="output directory (tables, plots, JSON, runs); "
                          "required")
        self.add_argument("--seeds", default=DEFAULT_SEEDS,
                          help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
        self.add_argument("--epochs", type=int,
                          help=f"epochs per run (default: {default_epochs} for the embedded "
                               "digits config, the config's num_epochs with --config)")
        self.add_argument("--attacks",
                          help="comma-separated attack ids to evaluate (default: the config's "
                               "eval.attacks); the first fgsm* and pgd* ids are the table's "
                               "diagnostic columns")
        self.add_argument("--corruptions", default="all",
                          help=f"comma-separated corruption ids, 'all' (the 19 at severity "
                               f"{DEFAULT_SEVERITY}, the default), 'all:S' (the 19 at severity "
                               "S), 'none' or 'config' (the config's eval.corruptions)")
        self.add_argument("--autoattack", default="standard",
                          help="AutoAttack version run on every trained model for the robust "
                               "column: standard (the default), quick (a quick look, not a "
                               "result) or none")
        self.add_argument("--autoattack_budgets",
                          help="comma-separated budgets of AutoAttack, e.g. linf_0.1,l2_1.0 "
                               "(default: the budget of the first pgd* attack)")
        self.add_argument("--autoattack_examples", type=int, default=0,
                          help="AutoAttack on the first N test images (default 0: all)")
        self.add_argument("--sections", default="",
                          help="more sections of the evaluation engine run on every trained "
                               "model (comma-separated): corruptions (the 19 corruptions at "
                               "severities 1-5), stability (CIFAR-10-P-style flip "
                               "probability), insensitivity")
        self.add_argument("--store",
                          help="where the runs' workdirs go (default OUT/runs); scripts given "
                               "the same store share the runs they have in common (same "
                               "config, seed and evaluation)")
        self.add_argument("--rerun", action="store_true",
                          help="train every run again even if its workdir holds its metrics")
        self.add_argument("--cpu_devices", type=int, default=-1,
                          help="on CPU, split the host into this many XLA devices for the "
                               "evaluation (-1, the default: one per core; 0: leave XLA_FLAGS "
                               "alone); the runs still train on one device")

    def add_argument(self, flag: str, *, default=None, help: str = "", type=str,
                     action: str | None = None) -> None:
        kind = bool if action == "store_true" else type
        self._flags[flag.lstrip("-")] = [False if kind is bool else default, help, kind]

    def set_defaults(self, **defaults) -> None:
        for name, value in defaults.items():
            self._flags[name][0] = value

    @staticmethod
    def error(message: str):
        raise SystemExit(f"error: {message}")

    def parse_args(self, argv: Sequence[str], prog: str):
        """``(options, config, flag values)``; options have one attribute per flag."""
        from absl import flags

        from anp_jax import cli

        define_of = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                     float: flags.DEFINE_float, str: flags.DEFINE_string}

        def define(fv) -> None:
            for name, (default, text, kind) in self._flags.items():
                define_of[kind](name, default, text, flag_values=fv)

        try:
            fv, config = cli.parse_config_flags(list(argv), define, prog=prog,
                                                require_workdir=False,
                                                help_text=self.description)
        except cli.UsageError as err:
            self.error(str(err))
        options = types.SimpleNamespace(**{name: fv[name].value for name in self._flags})
        return options, config, fv


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
    plan: object = None  # anp_jax.report.Plan run on every trained model, or None
    # The config file's own ``anp`` section, before the command line's ``--config.anp.*``
    # overrides: the fields a run without noise does not read are taken from it
    # (:func:`without_unread_noise`), or None.
    file_anp: object = None
    # Devices the runs train on when their config says -1 (all): 1 when the script split the
    # CPU into host devices for the evaluation (--cpu_devices) and runs on CPU, else None.
    train_devices: int | None = None


def parser(description: str, default_epochs: int) -> Parser:
    """The options every script takes; scripts add their own."""
    return Parser(description, default_epochs)


def load_config(path: str | None):
    """The config of ``path`` (a file defining ``get_config()``, optionally ``FILE:ARG``),
    or the embedded default: loaded as ``anp-jax`` loads it."""
    from anp_jax import cli

    try:
        return cli.load_config_file(path)
    except cli.UsageError as err:
        raise SystemExit(f"error: --config: {err}") from None


def corruption_ids(spec: str, config) -> tuple[str, ...]:
    from anp_jax.corruptions import CORRUPTIONS

    spec = spec.strip()
    if spec == "config":
        return tuple(config.eval.corruptions)
    if spec == "none":
        return ()
    if spec == "all" or spec.startswith("all:"):
        severity = int(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_SEVERITY
        return tuple(f"{name}_{severity}" for name in CORRUPTIONS)
    return tuple(s for s in (part.strip() for part in spec.split(",")) if s)


def _budgets(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        norm, _, eps = part.partition("_")
        try:
            value = float(eps)
        except ValueError:
            value = -1.0
        if norm not in ("linf", "l2") or value <= 0:
            Parser.error(f"--autoattack_budgets: {part!r} is not NORM_EPS "
                         "(e.g. linf_0.1, l2_1.0)")
        out.append((norm, value))
    return tuple(out)


def evaluation_plan(options, config, pgd_id: str | None):
    """The evaluation engine's plan run on every trained model (None: nothing beyond the
    trainer's own evaluation): AutoAttack at the table's budget(s) and ``--sections``."""
    from anp_jax import report
    from anp_jax.evaluation import attacks as attack_eval

    sections = tuple(s.strip() for s in options.sections.split(",") if s.strip())
    allowed = ("corruptions", "stability", "insensitivity")
    bad = [s for s in sections if s not in allowed]
    if bad:
        Parser.error(f"--sections: unknown {', '.join(bad)}; choose from "
                     f"{', '.join(allowed)}")
    version = options.autoattack
    if version not in ("standard", "quick", "none"):
        Parser.error(f"--autoattack: {version!r}; choose standard, quick or none")
    budgets = ()
    if version != "none":
        if options.autoattack_budgets:
            budgets = _budgets(options.autoattack_budgets)
        elif pgd_id is not None:
            _, norm, eps, _ = attack_eval.parse_id(pgd_id)
            budgets = ((norm, eps),)
        else:
            Parser.error("--autoattack needs --autoattack_budgets (no pgd* attack to take "
                         "the budget from)")
        sections = ("autoattack", *sections)
    if not sections:
        return None
    return dataclasses.replace(
        report.make_plan(config.dataset), sections=sections,
        autoattack=None if version == "none" else version, autoattack_budgets=budgets,
        autoattack_examples=options.autoattack_examples or None,
        autoattack_sanity_examples=0)


def parse(p: Parser, argv: Sequence[str] | None, script: str,
          default_epochs: int) -> tuple[types.SimpleNamespace, Settings]:
    """Parses ``argv``; builds the base config (epochs, evaluation, overrides applied)."""
    from anp_jax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    args, config, fv = p.parse_args(argv, f"python -m experiments.{script}")
    if not args.out:
        p.error("--out is required")
    # Before JAX starts its backends. The evaluation pmaps over every local device (AutoAttack
    # about 20% faster on 2 cores with 2 devices); training stays on one device, so a run's
    # result and its hash do not depend on the split.
    try:
        split = cli.split_host(args.cpu_devices)
    except ValueError as err:
        p.error(str(err))
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not seeds:
        p.error("--seeds: give at least one seed")
    config_path = fv["config"].config_filename if any(
        a.startswith("--config=") or a == "--config" for a in argv) else None
    epochs = args.epochs
    if epochs is None:
        epochs = int(config.num_epochs) if config_path else default_epochs
    if epochs < 1:
        p.error("--epochs must be >= 1")
    config.num_epochs = epochs
    if args.attacks is not None:
        config.eval.attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    config.eval.corruptions = corruption_ids(args.corruptions, config)
    attacks = tuple(config.eval.attacks)
    pgd = next((a for a in attacks if a.startswith("pgd")), None)
    fgsm = next((a for a in attacks if a.startswith("fgsm")), None)
    plan = evaluation_plan(args, config, pgd)
    os.makedirs(args.out, exist_ok=True)
    cli.setup_compile_cache(fv.compile_cache, fv.compile_cache_dir)
    cli.keep_freed_memory(fv.tune_malloc)
    command = "python -m experiments." + script + (" " + shlex.join(argv) if argv else "")
    file_anp = cli.load_config_file(fv["config"].config_filename).anp
    return args, Settings(script=script, out=args.out, seeds=seeds, epochs=epochs, base=config,
                          config_path=config_path, rerun=args.rerun,
                          store=args.store or os.path.join(args.out, "runs"), command=command,
                          pgd_id=pgd, fgsm_id=fgsm, plan=plan,
                          train_devices=1 if split else None, file_anp=file_anp)


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


# The noise fields that set a replay's updates per mini-batch (the k schedule).
_K_FIELDS = ("schedule", "boundaries", "k_values", "k")


def without_unread_noise(config, file_anp):
    """``config`` with the ``anp`` fields its method does not read taken from ``file_anp``
    (the config file's own ``anp`` section).

    A run without noise (vanilla, adversarial training) reads no ``anp`` field, and a
    replay (``replay``, ``replay_<at>``) only those of its k schedule: so a study that
    changes the noise on the command line (``--config.anp.eps_values=...``) trains the
    same controls as the study without the change, with the same hash, workdir and ledger
    entry, instead of training them again.  Runs with noise are returned unchanged.
    """
    from anp_jax.trainer import is_replay

    if file_anp is None or config.method.startswith("anp"):
        return config
    keep = _K_FIELDS if is_replay(config.method) else ()
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.anp = file_anp.copy_and_resolve_references()
        for field in keep:
            if field in config.anp:
                out.anp[field] = config.anp[field]
        if keep and out.anp.schedule == "piecewise":  # unread, but sized to the table
            zeros = (0.0,) * (len(out.anp.boundaries) + 1)
            out.anp.eps_values, out.anp.alpha_values = zeros, zeros
    return out


def _describe(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# Config fields added after runs were cached, with the value that behaves as before they
# existed: at that value a field is left out of the run's hash, so adding it does not make
# the finished runs (their workdirs and ledger entries) unrecognisable.
_LATER_FIELDS = {("adv", "norm"): "linf"}


def _hashed_fields(config: dict) -> dict:
    out = json.loads(json.dumps(config))
    for path, neutral in _LATER_FIELDS.items():
        *parents, leaf = path
        node = out
        for part in parents:
            node = node.get(part, {})
        if node.get(leaf, neutral) == neutral:
            node.pop(leaf, None)
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


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
        self.ledger_path = os.path.join(settings.out, "ledger.json")
        self.ledger: dict[str, dict] = {}
        if os.path.exists(self.ledger_path):
            try:
                with open(self.ledger_path) as f:
                    self.ledger = json.load(f)["runs"]
            except (OSError, ValueError, KeyError, TypeError):
                raise SystemExit(f"error: {self.ledger_path} is not a ledger of runs; move "
                                 "it away to start afresh") from None
        # The ledgers of the other studies beside this one (DIR/../*/ledger.json): a run
        # they finished with the same config and plan is taken from there, not repeated.
        self.shared: dict[str, tuple[str, dict]] = {}
        here = os.path.realpath(settings.out)
        for other in sorted(glob.glob(os.path.join(os.path.dirname(here), "*", "ledger.json"))):
            if os.path.realpath(os.path.dirname(other)) == here:
                continue
            try:
                with open(other) as f:
                    runs = json.load(f)["runs"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a ledger (that study's own script says so)
            study = os.path.basename(os.path.dirname(other))
            for entry, record in runs.items():
                self.shared.setdefault(entry, (study, record))
        plan = None if settings.plan is None else _jsonable(dataclasses.asdict(settings.plan))
        self.plan_digest = _digest(plan)
        self.num_classes = num_classes(settings.base)

    def run(self, name: str, config, seed: int, *, schedule_overrides: Mapping | None = None,
            **meta) -> dict:
        from anp_jax.trainer import train_and_evaluate

        config = without_unread_noise(variant(config, seed=seed), self.settings.file_anp)
        key = {"config": _hashed_fields(_jsonable(config.to_dict())),
               "schedule_overrides": {k: _describe(v)
                                      for k, v in (schedule_overrides or {}).items()}}
        digest = _digest(key)
        workdir = os.path.join(self.settings.store, f"seed{seed}-{digest}")
        entry = f"seed{seed}-{digest}/{self.plan_digest}"
        if not self.settings.rerun and (entry in self.ledger or entry in self.shared):
            source = "ledger"
            if entry not in self.ledger:  # copied, so this study's directory stands alone
                study, self.ledger[entry] = self.shared[entry]
                os.makedirs(self.settings.out, exist_ok=True)
                io_lib.write_json_atomic(self.ledger_path, {"runs": self.ledger}, indent=1)
                source = f"ledger of {study}"
            record = self.ledger[entry]
            self.records.setdefault(name, {})[seed] = record
            self.meta.setdefault(name, dict(meta))
            log(f"[{self.settings.script}] {name} seed {seed}: clean {record['clean']:.3f}  "
                f"robust {fmt_num(record['robust'])} ({source})")
            return record
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
            import jax

            train_config = config
            if self.settings.train_devices and config.num_devices == -1 \
                    and jax.default_backend() == "cpu":
                train_config = variant(config, num_devices=self.settings.train_devices)
            metrics = train_and_evaluate(train_config, workdir, log=lambda m: None,
                                         progress=False, **kwargs)
            # Free the run's compiled programs: XLA:CPU keeps every executable's code in a
            # limited JIT memory, and a script compiles dozens of runs in one process
            # ("LLVM ERROR: Unable to allocate section memory" otherwise).
            jax.clear_caches()
            io_lib.write_json_atomic(key_path, key, indent=1)
            cached = ""
        else:
            cached = " (cached)"
        evaluation = self.evaluate(workdir) if self.settings.plan is not None else None
        record = summarize(metrics, self.settings, evaluation)
        record["wall_seconds"] = time.perf_counter() - t0
        record["workdir"] = workdir
        self.records.setdefault(name, {})[seed] = record
        self.meta.setdefault(name, dict(meta))
        self.ledger[entry] = _jsonable(record)
        io_lib.write_json_atomic(self.ledger_path, {"runs": self.ledger}, indent=1)
        log(f"[{self.settings.script}] {name} seed {seed}: clean {record['clean']:.3f}  "
            f"robust {fmt_num(record['robust'])} ({record['robust_attack']})  "
            f"pgd {fmt_num(record['pgd'])}  corruption {fmt_num(record['corruption'])}  "
            f"train {record['train_seconds']:.1f} s{cached}")
        return record

    def evaluate(self, workdir: str) -> dict:
        """The evaluation engine's report of the trained run with the script's plan
        (:func:`anp_jax.report.make_report`), kept in ``WORKDIR/evaluation.json`` and reused
        while the plan is the same."""
        from anp_jax import report

        path = os.path.join(workdir, "evaluation.json")
        key = _jsonable(dataclasses.asdict(self.settings.plan))
        if not self.settings.rerun and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("plan") == key:
                return saved["report"]
        try:
            name = f"[{self.settings.script}] {os.path.basename(workdir)}:"
            out = report.make_report(workdir, plan=self.settings.plan,
                                     log=lambda m: log(f"{name} {m.strip()}"))
        except report.ReportError as err:
            raise SystemExit(f"error: evaluating {workdir}: {err}") from None
        import jax

        jax.clear_caches()
        out = _jsonable(out)
        io_lib.write_json_atomic(path, {"plan": key, "report": out}, indent=1)
        return out

    def at_chance(self, record: dict) -> bool:
        """Whether a run ended at chance (:func:`anp_jax.evaluation.sanity.ended_at_chance`)."""
        from anp_jax.evaluation import sanity

        return sanity.ended_at_chance(record["clean"], self.num_classes)

    def trained(self, name: str) -> dict[int, dict]:
        """The seeds of ``name`` that trained (:meth:`at_chance` runs left out): the runs
        every mean and paired difference of the tables is taken over."""
        return {s: r for s, r in self.records.get(name, {}).items() if not self.at_chance(r)}

    def values(self, name: str, key: str, seeds: Sequence[int] | None = None) -> list[float]:
        runs = self.trained(name)
        seeds = runs.keys() if seeds is None else seeds
        return [runs[s][key] for s in seeds if s in runs and runs[s][key] is not None]

    def deltas(self, name: str, reference: str, key: str) -> list[float]:
        """Per-seed differences ``name - reference`` over the seeds both have (paired)."""
        a, b = self.trained(name), self.trained(reference)
        return [a[s][key] - b[s][key] for s in a if s in b
                and a[s][key] is not None and b[s][key] is not None]

    def dump(self) -> dict:
        return {"runs": [{"name": n, "seed": s, **self.meta.get(n, {}), **r,
                          **({"ended_at_chance": True} if self.at_chance(r) else {})}
                         for n, per_seed in self.records.items() for s, r in per_seed.items()]}


def num_classes(config) -> int | None:
    """The number of classes of the config's data set (None when it is not known)."""
    from anp_jax.data import registry

    spec = registry.DATASETS.get(str(getattr(config, "dataset", "")))
    return None if spec is None else spec.num_classes


def at_chance_section(runner: Runner) -> str:
    """The runs left out of the means and differences because they ended at chance, named
    with their clean accuracy and final training loss (empty when there are none)."""
    failed = [(n, s, r) for n, per_seed in runner.records.items()
              for s, r in sorted(per_seed.items()) if runner.at_chance(r)]
    if not failed:
        return ""
    lines = [f"- `{n}` seed {s}: clean {r['clean']:.3f}, final training loss "
             f"{fmt_num(r.get('final_train_loss'))}" for n, s, r in failed]
    loss = f" (ln {runner.num_classes} = {math.log(runner.num_classes):.3f})"
    return ("Runs that ended at chance (clean accuracy at most 1.5 times chance: the model "
            "predicts nearly one class), left out of every mean, difference and plot; the "
            f"table's cell says how many seeds remain. Their final training loss{loss}:\n"
            + "\n".join(lines))


def summarize(metrics: dict, settings: Settings, evaluation: dict | None = None) -> dict:
    """The figures of one run.

    ``robust`` is the reported robust accuracy at the table's budget (the first AutoAttack
    budget of the script's plan, else that of the PGD attack) with the attack that gives it
    in ``robust_attack``, and ``robust_budgets`` the same per budget key: the per-example
    worst case over every attack run there (AutoAttack's record of ``evaluation``, else the
    trainer's ``metrics["robust_accuracy"]``).  ``fgsm`` and ``pgd`` are those attacks alone
    (diagnostics).  With the plan's corruption section, ``corruption`` is the mean accuracy
    over its corruptions and severities (else over the trainer's corruptions); with its
    stability section, ``mfp`` is the mean flip probability."""
    from anp_jax.evaluation import attacks as attack_eval

    corr = metrics.get("corruption", {})
    adv = metrics.get("adversarial", {})
    worst = dict(metrics.get("robust_accuracy") or {})
    headline = None
    if settings.pgd_id:
        _, norm, eps, _ = attack_eval.parse_id(settings.pgd_id)
        headline = attack_eval.budget_key(norm, eps)
    extra = {}
    if evaluation is not None:
        worst.update(evaluation.get("robust_accuracy") or {})
        plan = settings.plan
        if plan is not None and plan.autoattack_budgets:
            headline = attack_eval.budget_key(*plan.autoattack_budgets[0])
        if "corruptions" in evaluation:
            corr = evaluation["corruptions"]["accuracy"]
            extra["corruption_family_error"] = evaluation["corruptions"].get("family_error")
        if "stability" in evaluation:
            extra["mfp"] = evaluation["stability"]["mfp"]
            extra["flip_probability"] = evaluation["stability"]["flip_probability"]
        if "insensitivity" in evaluation:
            extra["insensitivity"] = evaluation["insensitivity"]
    head = worst.get(headline, {}) if headline else {}
    return {
        "clean": metrics["clean_accuracy"],
        "robust": head.get("accuracy"),
        "robust_attack": head.get("attack"),
        "robust_budgets": {k: r.get("accuracy") for k, r in worst.items()},
        "robust_attacks": {k: r.get("attack") for k, r in worst.items()},
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
        **extra,
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
        "- robust columns: the reported robust accuracy, per example the worst case over "
        f"every attack run at the budget ({_robust_source(settings)}; the attack is named "
        f"beside the first); PGD column: `{settings.pgd_id}` alone; FGSM column: "
        f"`{settings.fgsm_id}` alone (diagnostics); corruption column: mean over "
        f"{_corruption_text(settings)}",
    ]
    plan = settings.plan
    if plan is not None and "stability" in plan.sections:
        lines.append(f"- mFP: mean flip probability over the CIFAR-10-P-style perturbation "
                     f"sequences ({plan.num_frames} frames; lower is more stable)")
    return lines


def _robust_source(settings: Settings) -> str:
    plan = settings.plan
    if plan is None or not plan.autoattack_budgets:
        return "the trainer's attacks"
    n = plan.autoattack_examples
    return (f"AutoAttack {plan.autoattack} on {'the first ' + str(n) if n else 'all'} test "
            f"images")


def _corruption_text(settings: Settings) -> str:
    plan = settings.plan
    if plan is not None and "corruptions" in plan.sections:
        return (f"the {len(plan.corruptions)} corruptions at severities "
                f"{', '.join(map(str, plan.severities))}")
    ids = settings.base.eval.corruptions
    return f"{len(ids)} corruption(s) ({_short_list(ids)})"


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
        if section:  # a section with nothing to say is left out
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


def _budget_label(key: str) -> str:
    norm, _, eps = key.partition("_")
    return f"{'L-inf' if norm == 'linf' else 'L2'} {eps}"


def robust_budgets(runner: Runner) -> list[str]:
    """The budget keys of the robust columns: the script's AutoAttack budgets, else the PGD
    attack's."""
    from anp_jax.evaluation import attacks as attack_eval

    settings = runner.settings
    if settings.plan is not None and settings.plan.autoattack_budgets:
        return [attack_eval.budget_key(n, e) for n, e in settings.plan.autoattack_budgets]
    if settings.pgd_id:
        _, norm, eps, _ = attack_eval.parse_id(settings.pgd_id)
        return [attack_eval.budget_key(norm, eps)]
    return []


def accuracy_header(runner: Runner) -> list[str]:
    """The header of :func:`accuracy_columns`: clean, the reported robust accuracy per
    budget (the first with its attack), FGSM and PGD alone, mean corruption[, mFP]."""
    budgets = robust_budgets(runner)
    robust = [f"robust {_budget_label(k)} (worst case{', attack' if i == 0 else ''})"
              for i, k in enumerate(budgets)]
    plan = runner.settings.plan
    mfp = ["mFP (stability)"] if plan is not None and "stability" in plan.sections else []
    return ["clean", *robust, "FGSM", "PGD", "mean corruption", *mfp]


def robust_cell(runner: Runner, name: str, budget: str | None = None,
                with_attack: bool = True) -> str:
    """The reported robust accuracy of one run name at ``budget`` (default: the first
    robust column's), the per-example worst case over the attacks run, with the attack that
    gives it, e.g. ``0.412 (AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000))``."""
    budget = budget or (robust_budgets(runner) or [None])[0]
    runs = runner.trained(name).values()
    values = [r["robust_budgets"][budget] for r in runs
              if r.get("robust_budgets", {}).get(budget) is not None]
    attacks = sorted({r["robust_attacks"][budget] for r in runs
                      if r.get("robust_attacks", {}).get(budget)})
    value = fmt(values)
    return f"{value} ({'; '.join(attacks)})" if attacks and with_attack else value


def accuracy_columns(runner: Runner, name: str) -> list[str]:
    """The :func:`accuracy_header` cells of one run name."""
    robust = [robust_cell(runner, name, k, with_attack=i == 0)
              for i, k in enumerate(robust_budgets(runner))]
    plan = runner.settings.plan
    mfp = [fmt(runner.values(name, "mfp"), 4)] if plan is not None and \
        "stability" in plan.sections else []
    clean = fmt(runner.values(name, "clean"))
    kept, ran = len(runner.trained(name)), len(runner.records.get(name, {}))
    if kept < ran:
        clean += f" ({kept} of {ran} seeds; {ran - kept} at chance)"
    return [clean, *robust,
            *(fmt(runner.values(name, key)) for key in ("fgsm", "pgd", "corruption")), *mfp]


def masking_notes(runner: Runner, names: Sequence[str], settings: Settings) -> list[str]:
    """Signs of gradient masking in each run (per seed): the failed checks of
    :func:`anp_jax.evaluation.sanity.attack_checks` on its attack accuracies (PGD above
    FGSM at the same budget, an attack doing better at a larger budget, ...), and the
    reported worst case above PGD alone at PGD's budget.  That last check needs both on
    the same images: with AutoAttack on the first N test images and PGD on all of them it
    is not made (the subset's own accuracy differs by its sampling error)."""
    from anp_jax.evaluation import sanity

    pgd_budget = None
    same_images = settings.plan is None or not settings.plan.autoattack_examples
    if settings.pgd_id and same_images:
        from anp_jax.evaluation import attacks as attack_eval

        _, norm, eps, _ = attack_eval.parse_id(settings.pgd_id)
        pgd_budget = attack_eval.budget_key(norm, eps)
    notes = []
    for name in names:
        for seed, rec in runner.trained(name).items():
            notes += [f"{name} seed {seed}: {c['detail']}" for c in
                      sanity.attack_checks(rec["adversarial"], tolerance=1e-9)
                      if not c["passed"]]
            worst = (rec.get("robust_budgets") or {}).get(pgd_budget)
            if worst is not None and rec.get("pgd") is not None and worst > rec["pgd"] + 1e-9:
                notes.append(f"{name} seed {seed}: the reported worst case at {pgd_budget} "
                             f"({worst:.4f}, {rec['robust_attacks'][pgd_budget]}) is above "
                             f"{settings.pgd_id} alone ({rec['pgd']:.4f})")
    return notes


def masking_section(notes: Sequence[str]) -> str:
    if not notes:
        return ("Gradient-masking check: in every run PGD did no better than FGSM at the same "
                "budget, and no attack did better at a larger budget.")
    shown = "\n".join(f"- {n}" for n in notes[:20])
    more = f"\n- ... and {len(notes) - 20} more" if len(notes) > 20 else ""
    return ("Gradient-masking check FAILED for some runs (a stronger attack did worse); "
            "treat their robustness with suspicion:\n" + shown + more)
