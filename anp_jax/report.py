"""``anp-jax eval``: an honest robustness report of a trained model.

    anp-jax eval --workdir=DIR [--source_workdir=DIR2] [--baseline_workdir=DIR3] [--quick]

Reloads the model from the newest checkpoint in ``DIR/checkpoints`` and the config stored in
``DIR/metrics.json``, evaluates it without noise on the whole test split and merges a
``report`` section into ``DIR/metrics.json`` (all other keys are kept; the file is replaced
atomically).  It prints a table and writes PNG plots into ``DIR/report/``.

The sections of the report (see ``docs/evaluation.md``):

* ``attacks``: FGSM, StepLL, PGD (L-inf and L2, random start), MI-FGSM and APGD-CE at a grid
  of budgets chosen from the data set, accuracy per attack id
  (:func:`anp_jax.attacks.attack_id`); uniform random noise of the same L-inf budgets; PGD
  accuracy against the budget up to the whole pixel range; black-box transfer from
  ``--source_workdir``'s model.
* ``corruptions``: the 19 corruptions x severities 1..5, error per corruption, mCE
  (unnormalised) and, with ``--baseline_workdir``, the normalised and relative mCE of
  Hendrycks & Dietterich.
* ``stability``: flip probability of each perturbation sequence, and mFP.
* ``insensitivity``: relative change of the logits under relative Gaussian noise at each
  perturbation point (:func:`anp_jax.analysis.noise_insensitivity`).
* ``boundary_distance``: empirical decision-boundary distance along random orthonormal
  directions (:func:`anp_jax.analysis.boundary_distance`).
* ``sanity``: the checks of Carlini et al. against gradient masking; ``warnings`` lists the
  failed ones.
* ``plots``: paths of the PNG files, relative to ``DIR``.

Every attack is one compiled program whatever its budget (the budget is a traced argument);
white-box and transfer attacks share it when the two models have the same architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

USAGE = ("usage: anp-jax eval --workdir=DIR [--source_workdir=DIR2] "
         "[--baseline_workdir=DIR3] [--quick]")

PLOT_DIR = "report"
PyTree = Any


class ReportError(Exception):
    """A problem with the command line, a workdir, its config or its checkpoints."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise ReportError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anp-jax eval", usage=USAGE.removeprefix("usage: "),
        description="Robustness report of a trained model: attacks, corruptions, "
                    "stability, insensitivity, boundary distance and sanity checks. Merges "
                    "a 'report' section into DIR/metrics.json and writes plots into "
                    "DIR/report/.")
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
    """The evaluation grid.  Budgets are in [0, 1] pixel units."""

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
    tolerance: float = 0.02  # of the sanity checks (fraction of the split)
    zero_threshold: float = 0.1  # PGD accuracy at the largest budget must be below this


_BUDGETS = {  # data set -> (linf, l2, PGD curve)
    "digits": ((0.05, 0.1, 0.2, 0.3), (0.5, 1.0, 2.0),
               (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)),
    "mnist": ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0), (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)),
    "cifar10": ((2 / 255, 4 / 255, 8 / 255, 16 / 255), (0.25, 0.5, 1.0),
                tuple(v / 255 for v in (1, 2, 4, 8, 16, 32, 64, 255))),
}
_QUICK_CORRUPTIONS = ("gaussian_noise", "impulse_noise", "brightness", "contrast")


def make_plan(dataset: str, quick: bool = False) -> Plan:
    """The grid for ``dataset``: the paper's 8/255 and 16/255 for CIFAR-10, the usual
    MNIST budgets, and budgets of the same relative strength for the 8x8 digits."""
    from anp_jax import corruptions

    linf, l2, curve = _BUDGETS.get(dataset, _BUDGETS["cifar10"])
    if quick:
        linf = (linf[1], linf[-1])
        return Plan(linf_budgets=linf, l2_budgets=(l2[1],),
                    curve_budgets=(linf[0], linf[-1], curve[-1]), steps=5, more_steps=10,
                    corruptions=_QUICK_CORRUPTIONS,
                    severities=(1, 3, 5), num_frames=4, sigmas=(0.1, 0.5), num_directions=4,
                    coarse=8, fine=4, boundary_examples=128)
    return Plan(linf_budgets=linf, l2_budgets=l2, curve_budgets=curve, steps=10,
                more_steps=20,
                corruptions=tuple(corruptions.CORRUPTIONS), severities=(1, 2, 3, 4, 5),
                num_frames=10, sigmas=(0.05, 0.1, 0.2, 0.5), num_directions=8, coarse=10,
                fine=6, boundary_examples=1000)


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A trained model read back from its workdir."""

    workdir: str
    metrics: dict
    config: dict
    model: Any  # a module of anp_jax.models
    variables: dict  # {"params": ..., "batch_stats": ...}
    step: int  # the checkpoint's data position (mini-batches)
    image_shape: tuple[int, int, int]
    num_classes: int


def read_metrics(workdir: str) -> dict:
    """``workdir/metrics.json`` as a dict with a ``config`` dict; ReportError otherwise."""
    if not os.path.isdir(workdir):
        raise ReportError(f"workdir {workdir} does not exist")
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
        raise ReportError(f"no metrics.json in {workdir}; train first with "
                          f"`anp-jax train --workdir={workdir}`")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        raise ReportError(f"{path} has no 'config' section (was it written by anp-jax "
                          "train?)")
    return metrics


def _config_value(config: dict, key: str, path: str, kind: type | tuple[type, ...]) -> Any:
    value = config.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ReportError(f"{path}: config.{key}={value!r} is missing or invalid")
    return value


def build_model(config: dict, path: str = "metrics.json"):
    """The Flax module, image shape and number of classes of a stored config."""
    from anp_jax import data as data_lib
    from anp_jax import trainer
    from anp_jax.models import MODELS, create_model

    dataset = _config_value(config, "dataset", path, str)
    name = _config_value(config, "model", path, str)
    if dataset not in data_lib.DATASETS:
        raise ReportError(f"{path}: unknown dataset {dataset!r}")
    if name not in MODELS:
        raise ReportError(f"{path}: unknown model {name!r}")
    spec = data_lib.DATASETS[dataset]
    if config.get("dtype", "float32") not in trainer.DTYPES:
        raise ReportError(f"{path}: unknown dtype {config.get('dtype')!r}")
    options = trainer.model_options(config)
    key = (name, spec.num_classes, *sorted((k, str(v)) for k, v in options.items()))
    if key not in _MODELS:  # one module per architecture: runs that share it share programs
        _MODELS[key] = create_model(name, num_classes=spec.num_classes, **options)
    h, w, c = spec.image_shape
    size = config.get("image_size") or 0
    image_shape = (size, size, c) if spec.streaming and size else (h, w, c)
    return _MODELS[key], image_shape, spec.num_classes


_MODELS: dict[tuple, Any] = {}


def _shapes(tree: PyTree) -> PyTree:
    import jax
    import numpy as np

    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def restore_variables(workdir: str, model, image_shape: tuple[int, ...],
                      log: Callable[[str], None]) -> tuple[dict, int]:
    """``({"params", "batch_stats"}, step)`` of the newest readable checkpoint in
    ``workdir/checkpoints``.

    Reads only the parameters and batch statistics (any number of devices, any training
    method); never moves or deletes a checkpoint.  An unreadable checkpoint is reported with
    ``log`` and the previous one is tried; parameters that do not fit ``model`` are an
    error.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from anp_jax import checkpoint as ckpt_lib

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ReportError(f"no checkpoint in {workdir} (no checkpoints/ directory); train "
                          f"first with `anp-jax train --workdir={workdir}`")
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, *image_shape)), train=False))
    want_params = _shapes(expected["params"])
    want_stats = _shapes(expected.get("batch_stats", {}))
    mngr = ckpt_lib.manager(directory)
    reason = "no checkpoint"
    config_model = type(model).__name__
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise ReportError(f"no checkpoint in {directory}; train first with "
                              f"`anp-jax train --workdir={workdir}`")
        for step in steps:
            path = os.path.join(directory, str(step))
            try:
                tree = mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore()))["state"]
                params, stats = tree["params"], tree.get("batch_stats") or {}
            except Exception as err:  # unreadable: report, keep, try the previous one
                text = str(err).strip().splitlines()
                reason = f"{type(err).__name__}: {text[0][:200] if text else ''}"
                log(f"checkpoint {path} is unreadable ({reason}); trying the previous one")
                continue
            if _shapes(params) != want_params or _shapes(stats) != want_stats:
                raise ReportError(f"checkpoint {path} does not fit the config's model "
                                  f"{config_model!r} (was metrics.json edited, or written by "
                                  "another run?)")
            variables = {"params": jax.tree.map(jnp.asarray, params)}
            if stats:
                variables["batch_stats"] = jax.tree.map(jnp.asarray, stats)
            return variables, int(step)
    finally:
        mngr.close()
    raise ReportError(f"no readable checkpoint in {directory} ({reason})")


def load_run(workdir: str, log: Callable[[str], None] = lambda m: None) -> Run:
    """Reads ``workdir``'s config and newest checkpoint into a :class:`Run`."""
    metrics = read_metrics(workdir)
    config = metrics["config"]
    model, image_shape, num_classes = build_model(
        config, os.path.join(workdir, "metrics.json"))
    variables, step = restore_variables(workdir, model, image_shape, log)
    return Run(workdir, metrics, config, model, variables, step, tuple(image_shape),
               num_classes)


def _load_test_split(config: dict):
    from anp_jax import data as data_lib

    spec = data_lib.get_spec(config["dataset"])
    try:
        return data_lib.load_split(config["dataset"], spec.test_split,
                                   config.get("data_dir") or None,
                                   bool(config.get("download", False)))
    except data_lib.DatasetError as err:
        raise ReportError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Batched evaluation (pmap over the devices; one program per attack kind)
# ---------------------------------------------------------------------------------------------


def _stable_key(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _craft(kind: tuple, fn: Callable, x, y, eps, rng):
    """Adversarial (or randomly perturbed) images for an attack ``kind`` = (name, norm,
    steps); ``eps`` may be traced."""
    import jax
    import jax.numpy as jnp

    from anp_jax import evaluate

    name, norm, steps = kind
    if name == "uniform":
        return jnp.clip(x + jax.random.uniform(rng, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
    return evaluate.craft(name, norm, eps, steps, fn, x, y, rng)


class Evaluator:
    """Evaluates models on one split, batch by batch, under ``jax.pmap`` over ``devices``."""

    def __init__(self, images, labels, batch_size: int, devices: Sequence, seed: int = 0):
        import jax

        from anp_jax import data as data_lib

        self.devices = list(devices)
        self.n_dev = len(self.devices)
        self.batch_size = -(-max(batch_size, 1) // self.n_dev) * self.n_dev
        self.num_examples = len(images)
        self.image_shape = tuple(images.shape[1:])
        self.batches = list(data_lib.eval_batches(images, labels, self.batch_size, self.n_dev))
        # RngBitGenerator keys for attacks and analyses: on CPU each random field compiles
        # ~1 s faster than with threefry.  The corruptions and perturbation sequences keep
        # threefry keys (jax.random.poisson, used by shot_noise, needs threefry).
        self.key = jax.random.key(seed, impl="rbg")
        self.data_key = jax.random.PRNGKey(seed)
        self._programs: dict[tuple, Callable] = {}

    def _key(self, *names: str | int, data: bool = False) -> Any:
        import jax

        key = self.data_key if data else self.key
        for name in names:
            key = jax.random.fold_in(key, name if isinstance(name, int) else _stable_key(name))
        return key

    def _pmap(self, cache_key: tuple, fn: Callable, in_axes: tuple) -> Callable:
        import jax

        if cache_key not in self._programs:
            self._programs[cache_key] = jax.pmap(fn, axis_name="batch", in_axes=in_axes,
                                                 devices=self.devices)
        return self._programs[cache_key]

    # -- clean, corrupted and perturbed images: one program -----------------------------
    def _predict_program(self, run: Run) -> Callable:
        import jax.numpy as jnp

        def predict(variables, images):
            return jnp.argmax(run.model.apply(variables, images, train=False), -1)

        return self._pmap(("predict", id(run.model)), predict, (None, 0))

    def predictions(self, run: Run, transform: Callable | None = None) -> Any:
        """Top-1 predictions ``[N]`` (int) on the split, after ``transform(x_flat, i)``
        (``x_flat`` ``[batch, H, W, C]``, ``i`` the batch index) if given; ``transform``
        may return ``[F, batch, H, W, C]`` (frames), giving ``[F, N]``."""
        import numpy as np

        program = self._predict_program(run)
        out = []
        for i, batch in enumerate(self.batches):
            x = batch["image"]
            if transform is not None:
                flat = x.reshape((-1,) + self.image_shape)
                t = transform(flat, i)
                frames = t if t.ndim == flat.ndim + 1 else t[None]
                preds = [np.asarray(program(run.variables, f.reshape(x.shape))).reshape(-1)
                         for f in frames]
                pred = np.stack(preds) if t.ndim == flat.ndim + 1 else preds[0]
            else:
                pred = np.asarray(program(run.variables, x)).reshape(-1)
            out.append(pred[..., batch["mask"].reshape(-1)])
        return np.concatenate(out, axis=-1)

    def labels(self):
        import numpy as np

        return np.concatenate([b["label"].reshape(-1)[b["mask"].reshape(-1)]
                               for b in self.batches])

    def accuracy(self, run: Run, transform: Callable | None = None) -> float:
        import numpy as np

        return float(np.mean(self.predictions(run, transform) == self.labels()))

    # -- attacks ------------------------------------------------------------------------
    def attack_accuracy(self, target: Run, kind: tuple, eps: float,
                        source: Run | None = None, name: str = "") -> float:
        """Accuracy of ``target`` on images crafted with attack ``kind`` on ``source``
        (white-box when ``source`` is None), budget ``eps``."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from anp_jax.train import logits_fn

        source = source or target
        target_model, source_model = target.model, source.model

        def counts(target_vars, source_vars, batch, eps_, rng):
            rng = jax.random.fold_in(rng, jax.lax.axis_index("batch"))
            src = logits_fn(source_model.apply, source_vars["params"],
                            source_vars.get("batch_stats", {}))
            x_adv = _craft(kind, src, batch["image"], batch["label"], eps_, rng)
            logits = target_model.apply(target_vars, x_adv, train=False)
            correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
            return jnp.sum(correct)  # per device; summed on the host

        program = self._pmap(("attack", kind, id(target_model), id(source_model)), counts,
                             (None, None, 0, None, None))
        total = 0
        eps_ = np.float32(eps)
        for i, batch in enumerate(self.batches):
            rng = self._key(name or repr(kind), f"{eps:g}", i)
            total += int(np.sum(np.asarray(program(target.variables, source.variables, batch,
                                                   eps_, rng))))
        return total / self.num_examples

    # -- analyses -----------------------------------------------------------------------
    def insensitivity(self, run: Run, sigmas: Sequence[float]) -> dict:
        """Means over the split of :func:`anp_jax.analysis.noise_insensitivity`."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from anp_jax import analysis

        model = run.model
        points = tuple(model.perturbation_points())

        def sums(variables, batch, rng, sigmas_):
            rng = jax.random.fold_in(rng, jax.lax.axis_index("batch"))
            out = analysis.noise_insensitivity(model.apply, variables, batch["image"],
                                               batch["label"], rng, sigmas_, points)
            mask = batch["mask"].astype(jnp.float32)
            return jax.tree.map(lambda v: jnp.sum(v * mask, -1), out)

        program = self._pmap(("insensitivity", id(model)), sums, (None, 0, None, None))
        total = None
        sig = np.asarray(sigmas, np.float32)
        for i, batch in enumerate(self.batches):
            out = jax.tree.map(lambda v: np.sum(np.asarray(v, np.float64), axis=0),
                               program(run.variables, batch, self._key("insensitivity", i),
                                       sig))
            total = out if total is None else jax.tree.map(np.add, total, out)
        return jax.tree.map(lambda v: v / self.num_examples, total)

    def boundary(self, run: Run, plan: Plan, max_distance: float) -> dict:
        """Means of :func:`anp_jax.analysis.boundary_distance` over (up to
        ``plan.boundary_examples``) test images."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from anp_jax import analysis
        from anp_jax.train import logits_fn

        model = run.model
        images = np.concatenate([b["image"].reshape((-1,) + self.image_shape)[
            b["mask"].reshape(-1)] for b in self.batches])[:plan.boundary_examples]
        n = len(images)
        # Keep the model's batches near 2**20 input values per device.
        per_image = plan.num_directions * 2 * max(plan.coarse, plan.fine) * math.prod(
            self.image_shape)
        chunk = max(1, min(-(-n // self.n_dev), (1 << 20) // per_image))

        def sums(variables, batch, rng, max_d):
            rng = jax.random.fold_in(rng, jax.lax.axis_index("batch"))
            fn = logits_fn(model.apply, variables["params"], variables.get("batch_stats", {}))
            out = analysis.boundary_distance(
                fn, batch["image"], rng, num_directions=plan.num_directions,
                max_distance=max_d, coarse=plan.coarse, fine=plan.fine)
            mask = batch["mask"].astype(jnp.float32)
            return {k: jnp.sum(out[k] * mask) for k in ("min", "mean", "censored")}

        program = self._pmap(("boundary", id(model), plan), sums, (None, 0, None, None))
        totals = {"min": 0.0, "mean": 0.0, "censored": 0.0}
        step = chunk * self.n_dev
        for i, start in enumerate(range(0, n, step)):
            idx = np.arange(start, start + step)
            mask = idx < n
            batch = {"image": images[np.where(mask, idx, 0)].reshape(
                (self.n_dev, chunk) + self.image_shape), "mask": mask.reshape(self.n_dev, chunk)}
            out = program(run.variables, batch, self._key("boundary", i),
                          np.float32(max_distance))
            for k in totals:
                totals[k] += float(np.sum(np.asarray(out[k], np.float64)))
        return {k: v / n for k, v in totals.items()} | {"num_examples": n}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _attack_kinds(plan: Plan) -> list[tuple[str, str, int | None]]:
    """(attack name, norm, steps) of the main grid."""
    s = plan.steps
    return [("fgsm", "linf", None), ("stepll", "linf", None), ("pgd", "linf", s),
            ("mifgsm", "linf", s), ("apgd", "linf", s), ("pgd", "l2", s)]


def _budgets(plan: Plan, norm: str) -> tuple[float, ...]:
    return plan.linf_budgets if norm == "linf" else plan.l2_budgets


def _attack_section(ev: Evaluator, run: Run, plan: Plan, clean: float,
                    source: Run | None, log: Callable[[str], None]) -> dict:
    from anp_jax import attacks

    def grid(name: str, norm: str, steps: int | None, budgets: Sequence[float],
             source_: Run | None = None, label: str = "") -> dict[str, float]:
        t0 = time.perf_counter()
        out = {}
        for eps in budgets:
            aid = attacks.attack_id(name, norm, eps, steps)
            # Transfer attacks use the white-box keys: both start from the same points.
            out[aid] = ev.attack_accuracy(run, (name, norm, steps), eps, source=source_,
                                          name=aid)
        log(f"  {label}{name}{steps or ''} {norm}: {time.perf_counter() - t0:.1f} s")
        return out

    accuracy: dict[str, float] = {}
    for name, norm, steps in _attack_kinds(plan):
        accuracy.update(grid(name, norm, steps, _budgets(plan, norm)))
    # The "more steps" sanity check, where PGD's accuracy is closest to 0.5.
    pgd = {eps: accuracy[attacks.attack_id("pgd", "linf", eps, plan.steps)]
           for eps in plan.linf_budgets}
    more_eps = min(plan.linf_budgets, key=lambda e: abs(pgd[e] - 0.5))
    curve_extra = [e for e in plan.curve_budgets
                   if attacks.attack_id("pgd", "linf", e, plan.steps) not in accuracy]

    accuracy.update(grid("pgd", "linf", plan.more_steps, (more_eps,)))
    accuracy.update(grid("pgd", "linf", plan.steps, curve_extra, label="curve "))
    random_noise = {f"uniform_linf_{eps:g}": ev.attack_accuracy(
        run, ("uniform", "linf", None), eps, name=f"uniform{eps:g}")
        for eps in plan.linf_budgets}
    transfer = [grid(name, "linf", steps, plan.linf_budgets, source, "transfer ")
                for name, steps in (("fgsm", None), ("pgd", plan.steps))] if source else []
    curve = [clean] + [accuracy[attacks.attack_id("pgd", "linf", e, plan.steps)]
                       for e in plan.curve_budgets]
    section = {
        "budgets": {"linf": list(plan.linf_budgets), "l2": list(plan.l2_budgets)},
        "steps": plan.steps,
        "more_steps": {"steps": plan.more_steps, "budget": more_eps},
        "accuracy": accuracy,
        "random_noise": random_noise,
        "accuracy_vs_budget": {"attack": f"pgd{plan.steps}_linf",
                               "budgets": [0.0, *plan.curve_budgets], "accuracy": curve},
    }
    if source is not None:
        section["transfer"] = {"source_workdir": source.workdir,
                               "source_model": source.config.get("model"),
                               "source_method": source.config.get("method"),
                               "accuracy": {k: v for t in transfer for k, v in t.items()}}
    return section


def corruption_accuracies(ev: Evaluator, run: Run, plan: Plan) -> dict[str, float]:
    """Accuracy per corruption id (``name_severity``) of the plan, on the whole split."""
    import numpy as np

    from anp_jax import corruptions

    labels = ev.labels()

    def one(name: str) -> dict[str, float]:
        out = {}
        for severity in plan.severities:
            cid = corruptions.corruption_id(name, severity)

            def transform(x, i, severity=severity, cid=cid):
                key = ev._key("corruption", cid, i, data=True)
                return np.asarray(corruptions.corrupt(name, x, severity, key))

            out[cid] = float(np.mean(ev.predictions(run, transform) == labels))
        return out

    return {cid: acc for name in plan.corruptions for cid, acc in one(name).items()}


def tfds_corruption_accuracies(ev: Evaluator, run: Run, names: Sequence[str],
                               severities: Sequence[int], family: str = "cifar10_corrupted",
                               data_dir: str | None = None) -> dict:
    """Accuracy on the corrupted test sets of TFDS (``family/<name>_<severity>``, for
    CIFAR-10 the original CIFAR-10-C images of Hendrycks & Dietterich) that are prepared in
    ``data_dir``; the ids that are not are listed under ``unavailable`` (never downloaded
    here: the report must not depend on the network)."""
    import numpy as np

    from anp_jax import data as data_lib

    accuracy, unavailable = {}, []
    for name in names:
        for severity in severities:
            cid = f"{name}_{severity}"
            try:
                images, labels = data_lib.load_split(f"{family}/{cid}", "test", data_dir,
                                                     False)
            except data_lib.DatasetError:
                unavailable.append(cid)
                continue
            other = Evaluator(images, labels, ev.batch_size, ev.devices)
            other._programs = ev._programs  # same model, same program
            accuracy[cid] = float(np.mean(other.predictions(run) == other.labels()))
    out: dict[str, Any] = {"dataset": family, "accuracy": accuracy, "unavailable": unavailable}
    if accuracy:
        out["mean_accuracy"] = sum(accuracy.values()) / len(accuracy)
    return out


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def corruption_summary(accuracy: dict[str, float], clean: float, plan_corruptions: Sequence[str],
                       severities: Sequence[int], baseline: dict[str, float] | None = None,
                       baseline_clean: float | None = None) -> dict:
    """Errors per corruption (mean over severities), mCE, and with a baseline the
    normalised mCE (mean over corruptions of sum_s E / sum_s E_base) and the relative mCE
    (mean of sum_s (E - E_clean) / sum_s (E_base - E_base_clean)); a corruption whose
    baseline denominator is not positive is left out of those means (value None)."""
    error = {}
    for name in plan_corruptions:
        errs = [1.0 - accuracy[f"{name}_{s}"] for s in severities]
        error[name] = sum(errs) / len(errs)
    out: dict[str, Any] = {"accuracy": accuracy, "severities": list(severities),
                           "error": error, "mce": _mean(list(error.values()))}
    if baseline is not None:
        normalized, relative = {}, {}
        for name in plan_corruptions:
            e = [1.0 - accuracy[f"{name}_{s}"] for s in severities]
            b = [1.0 - baseline[f"{name}_{s}"] for s in severities]
            normalized[name] = sum(e) / sum(b) if sum(b) > 0 else None
            num = sum(x - (1.0 - clean) for x in e)
            den = sum(x - (1.0 - baseline_clean) for x in b)
            relative[name] = num / den if den > 0 else None
        out["baseline_error"] = {n: sum(1.0 - baseline[f"{n}_{s}"] for s in severities)
                                 / len(severities) for n in plan_corruptions}
        out["baseline_clean_accuracy"] = baseline_clean
        out["normalized_error"] = normalized
        out["normalized_mce"] = _mean(list(normalized.values()))
        out["relative_error"] = relative
        out["relative_mce"] = _mean(list(relative.values()))
    return out


def _baseline_corruptions(ev: Evaluator, baseline_dir: str, run: Run, plan: Plan,
                          log: Callable[[str], None]) -> tuple[dict[str, float], float, str]:
    """The baseline's corruption accuracies: from its report if it has every id we need,
    otherwise by evaluating its model on the same corrupted images."""
    metrics = read_metrics(baseline_dir)
    if metrics["config"].get("dataset") != run.config.get("dataset"):
        raise ReportError(f"baseline {baseline_dir} was trained on "
                          f"{metrics['config'].get('dataset')!r}, not "
                          f"{run.config.get('dataset')!r}")
    needed = [f"{n}_{s}" for n in plan.corruptions for s in plan.severities]
    stored = ((metrics.get("report") or {}).get("corruptions") or {}).get("accuracy") or {}
    clean = (metrics.get("report") or {}).get("clean_accuracy",
                                                metrics.get("clean_accuracy"))
    if all(isinstance(stored.get(c), (int, float)) for c in needed) and isinstance(
            clean, (int, float)):
        return {c: float(stored[c]) for c in needed}, float(clean), "report"
    log(f"  evaluating the baseline model of {baseline_dir} on the corruptions")
    baseline = load_run(baseline_dir, log)
    return corruption_accuracies(ev, baseline, plan), ev.accuracy(baseline), "evaluated"


def _stability_section(ev: Evaluator, run: Run, plan: Plan) -> dict:
    import numpy as np

    from anp_jax import stability

    fp = {}
    for name in stability.PERTURBATIONS:
        def transform(x, i, name=name):
            key = ev._key("stability", name, i, data=True)
            return np.asarray(stability.perturbation_sequence(name, x, plan.num_frames, key))

        preds = ev.predictions(run, transform)  # [F, N]
        fp[name] = float(stability.flip_probability(
            preds, noise_perturbation=name == "gaussian_noise"))
    return {"num_frames": plan.num_frames, "flip_probability": fp,
            "mfp": sum(fp.values()) / len(fp)}


def _insensitivity_section(ev: Evaluator, run: Run, plan: Plan) -> dict:
    raw = ev.insensitivity(run, plan.sigmas)
    points = list(run.model.perturbation_points())
    per_point = {p: {metric: [float(v) for v in raw[p][metric]] for metric in
                     ("relative_logit_change", "kl", "flipped", "correct")}
                 for p in points}
    clean = float(raw["clean"]["correct"])
    for p in points:
        per_point[p]["accuracy_drop"] = [clean - a for a in per_point[p].pop("correct")]
        per_point[p]["flip_rate"] = per_point[p].pop("flipped")
    return {
        "sigmas": list(plan.sigmas),
        "points": points,
        "metric": "relative_logit_change",
        "per_point": per_point,
        "mean_relative_logit_change": {p: _mean(per_point[p]["relative_logit_change"])
                                       for p in points},
    }


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def sanity_checks(attacks_section: dict, clean: float, plan: Plan) -> list[dict]:
    """Carlini et al.'s checks against gradient masking, on the attack section."""
    from anp_jax import attacks

    acc = attacks_section["accuracy"]
    tol = plan.tolerance
    s = plan.steps
    checks = []
    for eps in plan.linf_budgets:
        pgd = acc[attacks.attack_id("pgd", "linf", eps, s)]
        fgsm = acc[attacks.attack_id("fgsm", "linf", eps)]
        checks.append(_check(f"pgd_not_weaker_than_fgsm@{eps:g}", pgd <= fgsm + tol,
                             f"PGD-{s} {pgd:.4f} vs FGSM {fgsm:.4f} at linf {eps:g}"))
    curve = attacks_section["accuracy_vs_budget"]
    big_eps, big_acc = curve["budgets"][-1], curve["accuracy"][-1]
    checks.append(_check("large_budget_reaches_zero", big_acc <= plan.zero_threshold,
                         f"PGD-{s} accuracy {big_acc:.4f} at linf {big_eps:g} "
                         f"(must be <= {plan.zero_threshold:g})"))
    rises = [(a, b, e0, e1) for a, b, e0, e1 in zip(
        curve["accuracy"], curve["accuracy"][1:], curve["budgets"], curve["budgets"][1:])
        if b > a + tol]
    checks.append(_check(
        "accuracy_falls_with_budget", not rises,
        "PGD accuracy never rises with the budget" if not rises else "; ".join(
            f"{a:.4f} at {e0:g} -> {b:.4f} at {e1:g}" for a, b, e0, e1 in rises)))
    eps = attacks_section["more_steps"]["budget"]
    few = acc[attacks.attack_id("pgd", "linf", eps, s)]
    many = acc[attacks.attack_id("pgd", "linf", eps, plan.more_steps)]
    checks.append(_check("more_steps_not_weaker", many <= few + tol,
                         f"PGD-{plan.more_steps} {many:.4f} vs PGD-{s} {few:.4f} at "
                         f"linf {eps:g}"))
    for eps in plan.linf_budgets:
        noise = attacks_section["random_noise"][f"uniform_linf_{eps:g}"]
        pgd = acc[attacks.attack_id("pgd", "linf", eps, s)]
        checks.append(_check(f"random_noise_weaker_than_pgd@{eps:g}", noise >= pgd - tol,
                             f"uniform noise {noise:.4f} vs PGD-{s} {pgd:.4f} at linf "
                             f"{eps:g}"))
    checks.append(_check("attacks_not_above_clean", all(
        v <= clean + tol for v in acc.values()),
        f"every attack accuracy <= clean {clean:.4f} (+{tol:g})"))
    transfer = attacks_section.get("transfer")
    if transfer is not None:
        for eps in plan.linf_budgets:
            aid = attacks.attack_id("pgd", "linf", eps, s)
            white, black = acc[aid], transfer["accuracy"][aid]
            checks.append(_check(f"white_box_not_weaker_than_transfer@{eps:g}",
                                 white <= black + tol,
                                 f"white-box PGD-{s} {white:.4f} vs transfer {black:.4f} at "
                                 f"linf {eps:g}"))
    return checks


def make_report(workdir: str, source_workdir: str | None = None,
                baseline_workdir: str | None = None, quick: bool = False,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Computes the report of ``workdir`` (without writing anything)."""
    import jax

    t_start = time.perf_counter()
    run = load_run(workdir, log)
    source = None
    if source_workdir is not None:
        source = load_run(source_workdir, log)
        if source.config.get("dataset") != run.config.get("dataset"):
            raise ReportError(f"source {source_workdir} was trained on "
                              f"{source.config.get('dataset')!r}, not "
                              f"{run.config.get('dataset')!r}")
    if baseline_workdir is not None:
        read_metrics(baseline_workdir)  # fail early on a bad baseline
    images, labels = _load_test_split(run.config)
    plan = make_plan(run.config["dataset"], quick)
    n_dev = run.config.get("num_devices", -1)
    local = jax.local_devices()
    devices = local if not isinstance(n_dev, int) or n_dev < 1 else local[:n_dev]
    batch_size = (run.config.get("eval") or {}).get("batch_size", 512)
    ev = Evaluator(images, labels, int(batch_size), devices, int(run.config.get("seed", 0)))

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        log(f"{label}...")
        t0 = time.perf_counter()
        out = fn()
        timings[label] = time.perf_counter() - t0
        log(f"{label}: {timings[label]:.1f} s")
        return out

    timings: dict[str, float] = {}
    clean = timed("clean", lambda: ev.accuracy(run))
    attacks_section = timed("attacks", lambda: _attack_section(ev, run, plan, clean, source,
                                                               log))

    def corruptions_section() -> dict:
        accuracy = corruption_accuracies(ev, run, plan)
        base = base_clean = None
        origin = None
        if baseline_workdir is not None:
            base, base_clean, origin = _baseline_corruptions(ev, baseline_workdir, run, plan,
                                                             log)
        out = corruption_summary(accuracy, clean, plan.corruptions, plan.severities, base,
                                 base_clean)
        if baseline_workdir is not None:
            out["baseline_workdir"] = baseline_workdir
            out["baseline_source"] = origin
        if run.config["dataset"] == "cifar10":  # the original CIFAR-10-C too, when prepared
            out["tfds"] = tfds_corruption_accuracies(
                ev, run, plan.corruptions, plan.severities, "cifar10_corrupted",
                run.config.get("data_dir") or None)
        return out

    corruption = timed("corruptions", corruptions_section)
    stability_section = timed("stability", lambda: _stability_section(ev, run, plan))
    insensitivity = timed("insensitivity", lambda: _insensitivity_section(ev, run, plan))
    max_distance = math.sqrt(math.prod(run.image_shape))
    boundary = timed("boundary_distance", lambda: ev.boundary(run, plan, max_distance))
    checks = sanity_checks(attacks_section, clean, plan)
    warnings = [f"sanity check {c['name']} failed: {c['detail']} (possible gradient "
                "masking; do not trust the attack numbers)" for c in checks
                if not c["passed"]]
    return {
        "checkpoint_step": run.step,
        "dataset": run.config["dataset"],
        "model": run.config["model"],
        "method": run.config.get("method"),
        "num_examples": ev.num_examples,
        "num_devices": ev.n_dev,
        "quick": quick,
        "clean_accuracy": clean,
        "attacks": attacks_section,
        "corruptions": corruption,
        "stability": stability_section,
        "insensitivity": insensitivity,
        "boundary_distance": {
            "num_directions": plan.num_directions, "max_distance": max_distance,
            "resolution": max_distance / (plan.coarse * plan.fine), "norm": "l2",
            "mean_min": boundary["min"], "mean_mean": boundary["mean"],
            "censored_fraction": boundary["censored"],
            "num_examples": boundary["num_examples"]},
        "sanity": {"checks": checks, "passed": all(c["passed"] for c in checks)},
        "warnings": warnings,
        "timings": timings,
        "seconds": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------------------------
# Output: plots, table, metrics.json
# ---------------------------------------------------------------------------------------------


def write_plots(report: dict, workdir: str) -> dict[str, str]:
    """PNG plots into ``workdir/report/``; returns ``{name: path relative to workdir}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from anp_jax import attacks

    out_dir = os.path.join(workdir, PLOT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        paths[name] = os.path.join(PLOT_DIR, f"{name}.png")

    a = report["attacks"]
    clean = report["clean_accuracy"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = a["accuracy_vs_budget"]
    positive = [(b, v) for b, v in zip(curve["budgets"], curve["accuracy"]) if b > 0]
    ax1.plot(*zip(*positive), "k-o", lw=2, label=f"{curve['attack']} (to a huge budget)")
    by_attack: dict[str, list[tuple[float, float]]] = {}
    for aid, acc in a["accuracy"].items():
        name, norm, eps, steps = attacks.parse_attack_id(aid)
        by_attack.setdefault(f"{name}{steps or ''}_{norm}", []).append((eps, acc))
    for eps_acc in (a["random_noise"],):
        by_attack["uniform noise_linf"] = sorted(
            (float(k.rsplit("_", 1)[1]), v) for k, v in eps_acc.items())
    if a.get("transfer"):
        for aid, acc in a["transfer"]["accuracy"].items():
            name, norm, eps, steps = attacks.parse_attack_id(aid)
            by_attack.setdefault(f"transfer {name}{steps or ''}_{norm}", []).append((eps, acc))
    for label, pts in sorted(by_attack.items()):
        if label == curve["attack"]:
            continue
        ax = ax1 if label.endswith("_linf") else ax2
        style = "--" if "noise" in label else ":" if "transfer" in label else "-"
        ax.plot(*zip(*sorted(pts)), style, marker="x" if "transfer" in label else ".",
                label=label.replace("_", " "))
    ticks = {"L-inf": sorted({*a["budgets"]["linf"], *(b for b, _ in positive)}),
             "L2": sorted(a["budgets"]["l2"])}
    for ax, norm in ((ax1, "L-inf"), (ax2, "L2")):
        ax.axhline(clean, color="grey", lw=0.8, ls="-.", label="clean")
        ax.set_xscale("log")
        ax.set_xticks(ticks[norm], [f"{t:.3g}" for t in ticks[norm]], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(f"{norm} budget (pixels in [0, 1], log scale)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("accuracy under attack")
    save(fig, "accuracy_vs_budget")

    c = report["corruptions"]
    severities = c["severities"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(c["error"])
    colours = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        ax.plot([0, *severities], [clean] + [c["accuracy"][f"{name}_{s}"] for s in severities],
                lw=0.9, alpha=0.8, color=colours(i % 20), ls="-" if i < 20 else "--",
                label=name)
    mean = [clean] + [sum(c["accuracy"][f"{n}_{s}"] for n in names) / len(names)
                      for s in severities]
    ax.plot([0, *severities], mean, "k-o", lw=2.5, label="mean")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([0, *severities])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax.set_title(f"common corruptions (mCE {c['mce']:.3f})")
    save(fig, "corruption_severity")

    ins = report["insensitivity"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(ins["points"]) + 3), 4))
    width = 0.8 / len(ins["sigmas"])
    for j, sigma in enumerate(ins["sigmas"]):
        values = [ins["per_point"][p]["relative_logit_change"][j] for p in ins["points"]]
        ax.bar([i + (j - (len(ins["sigmas"]) - 1) / 2) * width for i in
                range(len(ins["points"]))], values, width, label=f"sigma {sigma:g}")
    ax.set_xticks(range(len(ins["points"])))
    ax.set_xticklabels(ins["points"], rotation=45 if len(ins["points"]) > 6 else 0)
    ax.set_ylabel("relative logit change (lower = more insensitive)")
    ax.set_title("insensitivity to relative noise per point")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save(fig, "insensitivity")
    return paths


def format_report(report: dict, workdir: str) -> str:
    """A readable table of the report, for the terminal."""
    from anp_jax import attacks

    lines = [f"robustness report of {workdir} (checkpoint {report['checkpoint_step']}, "
             f"{report['model']} on {report['dataset']}, method {report['method']}, "
             f"{report['num_examples']} test images{', quick' if report['quick'] else ''})",
             f"clean accuracy {report['clean_accuracy']:.4f}", ""]
    a = report["attacks"]
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
    c = report["corruptions"]
    sev = c["severities"]
    cw = max(len(n) for n in c["error"]) + 2
    lines.append(f"{'corruption error':<{cw}}" + "".join(f"{'s' + str(s):>7}" for s in sev)
                 + f"{'mean':>8}" + (f"{'norm.':>8}" if "normalized_error" in c else ""))
    for name, err in c["error"].items():
        line = f"{name:<{cw}}" + "".join(f"{1 - c['accuracy'][f'{name}_{s}']:7.3f}"
                                         for s in sev) + f"{err:8.3f}"
        if "normalized_error" in c:
            v = c["normalized_error"][name]
            line += f"{v:8.3f}" if v is not None else f"{'-':>8}"
        lines.append(line)
    summary = f"mCE {c['mce']:.4f} (unnormalised)"
    if "normalized_mce" in c:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
        summary += (f"; normalised mCE {fmt(c['normalized_mce'])}, relative mCE "
                    f"{fmt(c['relative_mce'])} (baseline {c['baseline_workdir']})")
    lines += [summary, ""]
    t = c.get("tfds")
    if t:
        if t["accuracy"]:
            lines.append(f"TFDS {t['dataset']}: mean accuracy {t['mean_accuracy']:.4f} over "
                         f"{len(t['accuracy'])} prepared set(s)")
        if t["unavailable"]:
            lines.append(f"TFDS {t['dataset']}: {len(t['unavailable'])} set(s) not prepared "
                         "in the data dir (not evaluated)")
        lines.append("")
    s = report["stability"]
    lines.append(f"flip probability over {s['num_frames']} frames: " + ", ".join(
        f"{k} {v:.4f}" for k, v in s["flip_probability"].items()) + f"; mFP {s['mfp']:.4f}")
    ins = report["insensitivity"]
    pw = max(len(p) for p in ins["points"]) + 2
    lines += ["", f"{'insensitivity (rel. logit change)':<{max(pw, 36)}}" + "".join(
        f"{'sigma ' + format(v, 'g'):>12}" for v in ins["sigmas"])]
    for p in ins["points"]:
        lines.append(f"{p:<{max(pw, 36)}}" + "".join(
            f"{v:12.4f}" for v in ins["per_point"][p]["relative_logit_change"]))
    b = report["boundary_distance"]
    lines += ["", f"boundary distance (L2, {b['num_directions']} random orthonormal directions, "
                  f"{b['num_examples']} images): worst-case {b['mean_min']:.3f}, mean "
                  f"{b['mean_mean']:.3f}, censored at {b['max_distance']:.3g}: "
                  f"{b['censored_fraction']:.1%}", "", "sanity checks:"]
    for check in report["sanity"]["checks"]:
        lines.append(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: "
                     f"{check['detail']}")
    for w in report["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def merge_into_metrics(workdir: str, report: dict) -> str:
    """Sets ``metrics["report"]`` in ``workdir/metrics.json`` (re-read now, so that every
    other key is kept), written atomically (temporary file + ``os.replace``)."""
    path = os.path.join(workdir, "metrics.json")
    metrics = read_metrics(workdir)
    metrics["report"] = _jsonable(report)
    tmp = f"{path}.report-tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
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
    try:
        report = make_report(args.workdir, args.source_workdir, args.baseline_workdir,
                             args.quick, log)
        report["plots"] = write_plots(report, args.workdir)
        path = merge_into_metrics(args.workdir, report)
    except ReportError as err:
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
