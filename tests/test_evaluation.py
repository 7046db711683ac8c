"""The evaluation engine (anp_jax.evaluation) against independent computations: the runner's
masked, pmapped map, the worst case, the AutoAttack wrapper, corruption families, the
sanity checks, the learning-curve plot, atomic JSON, and ``anp-jax eval`` on ImageNet."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_cli

from anp_jax import corruptions as corruption_lib
from anp_jax import io as io_lib
from anp_jax.evaluation import Model, Runner, autoattack_evaluator, clean, plots, robust, sanity
from anp_jax.evaluation import corruptions as corruption_eval
from anp_jax.evaluation.runner import padded_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linear(n=37, seed=0):
    """A linear classifier on 4x4x1 images, its Model, the images and labels."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(16, 5)).astype(np.float32)
    x = rng.uniform(size=(n, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int32)

    def apply(variables, images, train=False):
        return images.reshape(images.shape[0], -1) @ variables["params"]["w"]

    return Model(apply, {"params": {"w": jnp.asarray(w)}}), x, y, x.reshape(n, -1) @ w


def test_runner_counts_every_example_once_in_order():
    model, x, y, logits = _linear()
    devices = jax.local_devices()[:4]
    batches = padded_batches(x, y, 3, len(devices))  # 37 examples in batches of 12
    assert len(batches) == 4 and int(sum(b["mask"].sum() for b in batches)) == 37
    calls = []

    def make():
        calls.append(1)
        return iter(batches)

    runner = Runner(make, devices=devices)
    out = clean.Evaluator(runner).per_example(model)
    np.testing.assert_array_equal(out["prediction"], logits.argmax(-1))
    np.testing.assert_array_equal(runner.labels(), y)
    result = dict(clean.Evaluator(runner).run(model))
    assert result["num_examples"] == 37
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    assert result["loss"] == pytest.approx(float(np.mean(ce)), rel=1e-5)
    assert len(calls) == 1  # small splits are read once and kept
    # A one-shot iterator works too (kept after its only pass).
    again = Runner(iter(batches), devices=devices)
    assert dict(clean.Evaluator(again).run(model))["accuracy"] == result["accuracy"]
    images, labels = again.arrays(10)
    np.testing.assert_array_equal(images, x[:10])
    np.testing.assert_array_equal(labels, y[:10])


def test_runner_frames_keep_the_split_order():
    model, x, y, _ = _linear(n=13)
    runner = Runner(padded_batches(x, y, 2, 4), devices=jax.local_devices()[:4])

    def frames(images, i):
        del i
        return np.stack([images, 1.0 - images])

    from anp_jax.evaluation.runner import predictions

    pred = predictions(runner, model, frames)
    w = np.asarray(model.variables["params"]["w"])
    assert pred.shape == (2, 13)
    np.testing.assert_array_equal(pred[0], (x.reshape(13, -1) @ w).argmax(-1))
    np.testing.assert_array_equal(pred[1], ((1.0 - x).reshape(13, -1) @ w).argmax(-1))


class _Split:
    """Stands in for a runner in the worst case: sums of one process."""

    def __init__(self, n):
        self.num_examples = n

    def total(self, values):
        return float(np.sum(values))

    def mean(self, values):
        return float(np.sum(values)) / self.num_examples


def test_worst_case_is_per_example():
    n = 10
    clean_ok = np.ones(n, bool)
    clean_ok[9] = False
    a = np.ones(n, bool)
    a[[0, 1]] = False  # attack a fools 0, 1
    b = np.ones(n, bool)
    b[[2, 9]] = False  # attack b fools 2 (and the misclassified 9)
    flags = {"fgsm_linf_0.1": ("linf", 0.1, a), "pgd10_linf_0.1": ("linf", 0.1, b),
             "pgd10_l2_0.5": ("l2", 0.5, a)}
    out = robust.worst_case(_Split(n), clean_ok, flags)
    assert list(out) == ["linf_0.1", "l2_0.5"]
    r = out["linf_0.1"]
    # Robust: correct clean and under both attacks: 3..8.
    assert r["accuracy"] == pytest.approx(6 / 10)
    assert r["attacks"] == {"fgsm_linf_0.1": 0.8, "pgd10_linf_0.1": 0.8}
    assert r["num_examples"] == 10 and r["eps"] == 0.1 and r["norm"] == "linf"
    assert r["attack"] == "worst case over FGSM, PGD-10 (per example)"
    assert out["l2_0.5"]["accuracy"] == pytest.approx(7 / 10)  # 2..8
    # AutoAttack over the first 6 examples fooling example 3: robust 4, 5 of 0..5.
    aa = {"linf_0.1": {"norm": "linf", "eps": 0.1, "attack": "AutoAttack standard (...)",
                       "robust_accuracy": 5 / 6, "robust": np.arange(6) != 3, "stages": []}}
    r = robust.worst_case(_Split(n), clean_ok, flags, aa)["linf_0.1"]
    assert r["num_examples"] == 6 and r["accuracy"] == pytest.approx(2 / 6)
    assert r["attack"].startswith("AutoAttack standard") and "worst case over" in r["attack"]
    assert "robust" not in r["autoattack"] and r["autoattack"]["robust_accuracy"] == 5 / 6


def test_autoattack_evaluator_feeds_the_split_and_keeps_the_flags(monkeypatch):
    model, x, y, logits = _linear(n=11)
    seen = {}

    def fake(apply_fn, params, batch_stats, images, labels, *, norm, eps, version, seed,
             devices):
        seen.update(images=images, labels=labels, norm=norm, eps=eps, version=version)
        pred = np.asarray(apply_fn({"params": params}, images)).argmax(-1)
        robust_flags = (pred == labels) & (np.arange(len(labels)) % 2 == 0)
        return {"robust_accuracy": robust_flags.mean(), "robust": robust_flags,
                "stages": {"apgd-ce": robust_flags.mean()}}

    from anp_jax.evaluation import autoattack

    monkeypatch.setattr(autoattack, "autoattack", fake)
    runner = Runner(padded_batches(x, y, 2, 4), devices=jax.local_devices()[:4])
    ev = autoattack_evaluator.Evaluator(runner, [("linf", 0.1)], version="quick",
                                        max_examples=9, sanity_examples=0)
    records = dict(ev.run(model))["records"]
    np.testing.assert_array_equal(seen["labels"], y[:9])
    np.testing.assert_array_equal(seen["images"], x[:9])
    assert (seen["norm"], seen["eps"], seen["version"]) == ("linf", 0.1, "quick")
    expected = (logits[:9].argmax(-1) == y[:9]) & (np.arange(9) % 2 == 0)
    r = records["linf_0.1"]
    assert r["robust_accuracy"] == pytest.approx(expected.mean()) and r["num_examples"] == 9
    assert "robust" not in r and r["attack"].startswith("AutoAttack quick")
    np.testing.assert_array_equal(ev.records["linf_0.1"]["robust"], expected)
    with pytest.raises(ValueError, match="version"):
        autoattack_evaluator.Evaluator(runner, [], version="strong")


def _stage_record(flags_after, clean_flags):
    """A cascade record by hand: per-stage per-example robust flags -> accuracies."""
    stages = [{"attack": name, "num_attacked": 0, "robust_accuracy": float(np.mean(f)),
               "seconds": 1.0} for name, f in flags_after]
    fooled_at = np.where(clean_flags, -1, 0)
    for i, (_, f) in reversed(list(enumerate(flags_after, 1))):
        fooled_at[~np.asarray(f) & np.asarray(clean_flags)] = i  # the first stage wins
    return {"norm": "linf", "eps": 0.1, "version": "standard",
            "clean_accuracy": float(np.mean(clean_flags)), "stages": stages,
            "robust_accuracy": stages[-1]["robust_accuracy"],
            "robust_accuracy_after": {s["attack"]: s["robust_accuracy"] for s in stages},
            "seconds": {"clean": 0.5, "total": 4.5}, "attacks": [],
            "robust": [bool(r) for r in flags_after[-1][1]], "fooled_at": fooled_at.tolist()}


def test_autoattack_sanity_catches_a_weakened_attack(monkeypatch):
    """A stand-in cascade whose doubled run is 0.05 lower (an unconverged attack): the
    evaluator's strength check fails with a warning; the sanity runs see only the subset
    and are compared with the cascade's outcome on it; the reported record is over all
    examples."""
    from anp_jax.evaluation import autoattack as real

    model, x, y, _ = _linear(n=20)
    calls = []

    def cascade(apply_fn, params, batch_stats, images, labels, *, norm, eps, version, seed,
                devices, double=False, only=None):
        n = len(labels)
        calls.append((n, double, only))
        robust_flags = np.arange(n) % 4 != 0  # 3 of 4 robust
        if double:  # 2 of 20 more fooled per 20: 0.05 lower
            robust_flags = robust_flags & (np.arange(n) % 10 != 1)
        clean_flags = np.ones(n, bool)
        after_ce = np.arange(n) % 4 != 0
        return _stage_record([("apgd-ce", after_ce), ("apgd-t", robust_flags),
                              ("fab-t", robust_flags), ("square", robust_flags)], clean_flags)

    def sanity_runs(*args, **kwargs):
        return {"double": cascade(*args, double=True, **kwargs),
                "square": cascade(*args, only=("square",), **kwargs),
                "apgd-t": cascade(*args, only=("apgd-t",), **kwargs)}

    import anp_jax.evaluation

    stand_in = types.SimpleNamespace(autoattack=cascade, sanity_runs=sanity_runs,
                                     sanity_checks=real.sanity_checks,  # the real checks
                                     restrict=real.restrict)
    monkeypatch.setitem(sys.modules, "anp_jax.evaluation.autoattack", stand_in)
    monkeypatch.setattr(anp_jax.evaluation, "autoattack", stand_in)
    runner = Runner(padded_batches(x, y, 2, 4), devices=jax.local_devices()[:4])
    ev = autoattack_evaluator.Evaluator(runner, [("linf", 0.1), ("linf", 0.2)],
                                        sanity_examples=8)
    out = dict(ev.run(model))
    # Each budget: all 20 (one cascade); at the last, the sanity runs on the first 8.
    assert [c[0] for c in calls] == [20, 20, 8, 8, 8]
    by_name = {c["name"]: c for c in ev.checks}
    # Subset of 8: reported robust 6/8 = 0.75; doubled: examples 0, 4 (%4) and 1 (%10)
    # fooled -> 5/8 = 0.625, lower by more than 0.01.
    assert not by_name["double_iterations_agree"]["passed"]
    assert by_name["cascade_never_raises"]["passed"]
    assert by_name["gradient_free_not_stronger"]["passed"]
    assert len(ev.warnings) == 1 and "double_iterations_agree" in ev.warnings[0]
    assert "0.7500" in ev.warnings[0] and "0.6250" in ev.warnings[0]
    sanity_out = out["sanity"]
    assert sanity_out["num_examples"] == 8 and (sanity_out["norm"], sanity_out["eps"]) == (
        "linf", 0.2)
    assert sanity_out["runs"]["double"]["robust_accuracy"] == pytest.approx(0.625)
    assert sanity_out["reported_on_subset"] == pytest.approx(0.75)
    # The record over 20: 15 / 20 robust (indices % 4 != 0).
    r = out["records"]["linf_0.2"]
    assert r["num_examples"] == 20 and r["robust_accuracy"] == pytest.approx(15 / 20)
    assert r["stages"][0]["robust_accuracy"] == pytest.approx(15 / 20)
    assert r["seconds"]["total"] == pytest.approx(4.5)
    assert "robust" not in r and "fooled_at" not in r
    np.testing.assert_array_equal(ev.records["linf_0.2"]["robust"], np.arange(20) % 4 != 0)
    # A converged attack (doubled run equal) passes: no warning.
    calls.clear()
    monkeypatch.setattr(stand_in, "sanity_runs", lambda *a, **k: {"double": cascade(*a, **k)})
    ev = autoattack_evaluator.Evaluator(runner, [("linf", 0.1)], sanity_examples=8)
    dict(ev.run(model))
    assert ev.warnings == [] and all(c["passed"] for c in ev.checks)


def test_corruption_families_as_imagenet_c():
    names = [n for family in corruption_eval.FAMILIES.values() for n in family]
    assert sorted(names) == sorted(corruption_lib.CORRUPTIONS) and len(names) == 19
    assert corruption_eval.FAMILIES["noise"][:3] == ("gaussian_noise", "shot_noise",
                                                     "impulse_noise")
    assert corruption_eval.by_family(["contrast", "fog", "gaussian_noise"]) == [
        "gaussian_noise", "fog", "contrast"]
    acc = {"gaussian_noise_1": 0.9, "gaussian_noise_2": 0.7, "shot_noise_1": 0.6,
           "shot_noise_2": 0.6, "fog_1": 0.5, "fog_2": 0.3}
    out = corruption_eval.summary(acc, 0.95, ("gaussian_noise", "shot_noise", "fog"), (1, 2))
    assert out["family_error"] == pytest.approx({"noise": (0.2 + 0.4) / 2, "weather": 0.6})
    with pytest.raises(ValueError, match="unknown corruption 'fog_9'"):
        corruption_eval.parse_corruption_id("fog_9")


def test_sanity_checks_by_hand():
    ok = {"fgsm_linf_0.1": 0.6, "pgd10_linf_0.1": 0.4, "pgd20_linf_0.1": 0.39,
          "pgd10_linf_0.2": 0.1, "uniform_linf_0.1": 0.9}
    assert all(c["passed"] for c in sanity.attack_checks(ok, clean=0.95))
    bad = {"fgsm_linf_0.1": 0.3, "pgd10_linf_0.1": 0.5, "pgd20_linf_0.1": 0.6,
           "pgd10_linf_0.2": 0.7, "uniform_linf_0.1": 0.2}
    failed = {c["name"] for c in sanity.attack_checks(bad, clean=0.65) if not c["passed"]}
    assert failed == {"pgd_not_weaker_than_fgsm@0.1", "more_steps_not_weaker",
                      "random_noise_weaker_than_pgd@0.1", "accuracy_falls_with_budget@pgd10_linf",
                      "attacks_not_above_clean"}
    assert len(sanity.warnings(sanity.attack_checks(bad))) == 4


def test_learning_curves_and_titles(tmp_path):
    rows = [{"step": s, "train_loss": 2.0 / (s + 1), "train_accuracy": s / 10} for s in range(5)]
    rows.append({"step": 4, "eval_clean_accuracy": 0.5})
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 5, "train_lo'
    (tmp_path / plots.CURVES_FILE).write_text(text)
    got = plots.read_curves(str(tmp_path))
    assert got == rows  # the line cut short is skipped
    path = str(tmp_path / "curves.png")
    assert plots.learning_curves(got, "t", path) == ["step", "train_loss", "train_accuracy",
                                                      "eval_clean_accuracy"]
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plots.read_curves(str(tmp_path / "nowhere")) == []
    title = plots.run_title({"model": "vgg16", "method": "anp", "dataset": "cifar10",
                             "anp": {"layers": "all", "epsilon": 0.5}})
    assert title == "vgg16, anp (layers all, eps 0.5), cifar10"


def test_write_json_atomic(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"old": 1}')
    io_lib.write_json_atomic(str(path), {"a": np.float32(0.5), "b": float("nan"),
                                         "c": (np.int64(2), np.arange(2))})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": None, "c": [2, [0, 1]]}
    assert os.listdir(tmp_path) == ["m.json"]


def test_eval_on_fake_imagenet(tmp_path):
    """``anp-jax train`` on the fake ImageNet JPEGs of the data tests with the ImageNet config
    (LeNet at 32x32: ResNet-50 is too slow here), then the report through the streaming
    input pipeline, with a small plan (the sections are tested on the digits)."""
    from test_data import N_VAL, write_imagenet

    from anp_jax import data as data_lib
    from anp_jax import report

    tfds_dir = str(tmp_path / "tfds")
    write_imagenet(data_lib.manual_dir(tfds_dir))
    data_lib.get_builder("imagenet2012", tfds_dir, download=True)
    workdir = str(tmp_path / "run")
    config = os.path.join(ROOT, "experiments", "configs", "imagenet_resnet50.py")
    proc = run_cli(["train", f"--workdir={workdir}", f"--config={config}",
                    "--config.model=lenet", "--config.image_size=32", "--config.method=vanilla",
                    "--config.batch_size=8", "--config.eval.batch_size=4",
                    "--config.num_epochs=1", "--config.num_devices=1",
                    f"--config.data_dir={tfds_dir}",
                    "--config.eval.attacks=('fgsm_linf_0.01', 'pgd2_linf_0.01')",
                    "--config.eval.corruptions=()"], tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads(open(os.path.join(workdir, "metrics.json")).read())
    worst = before["robust_accuracy"]["linf_0.01"]
    assert worst["accuracy"] <= min(before["adversarial"].values())
    assert worst["attacks"] == before["adversarial"]

    plan = dataclasses.replace(
        report.make_plan("imagenet2012", quick=True), linf_budgets=(0.01,), l2_budgets=(1.0,),
        curve_budgets=(0.01, 1.0), steps=2, more_steps=3, corruptions=("contrast",),
        severities=(1,), sections=("clean", "attacks", "corruptions"))
    r = report.make_report(workdir, plan=plan, log=lambda m: None)
    assert r["dataset"] == "imagenet2012" and r["num_examples"] == N_VAL
    assert abs(r["clean_accuracy"] - before["clean_accuracy"]) < 1e-6
    # The same model, attack id and random starts as the trainer's: the same numbers (up to
    # one image: this process compiles with another XLA optimisation level).
    assert abs(r["attacks"]["accuracy"]["pgd2_linf_0.01"]
               - before["adversarial"]["pgd2_linf_0.01"]) <= 1 / N_VAL + 1e-9
    assert set(r["robust_accuracy"]) == {"linf_0.01", "linf_1", "l2_1"}
    assert r["title"] == "lenet, vanilla, imagenet2012"
    r["plots"] = report.write_plots(r, workdir)
    assert set(r["plots"]) == {"accuracy_vs_budget", "corruption_severity"}
    report.merge_into_metrics(workdir, r)
    text = report.format_report(json.loads(open(os.path.join(workdir, "metrics.json")).read())[
        "report"], workdir)
    # No AutoAttack in this plan: the worst case over the quick attacks is headed as an
    # upper bound, not as the number to report.
    assert text.index("robust accuracy without AutoAttack (a quick look, an upper bound") < \
        text.index("diagnostics")
    assert "robust accuracy (the reported number" not in text
