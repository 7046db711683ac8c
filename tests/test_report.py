"""``anp-jax eval`` (anp_jax.report) end to end on a tiny digits model, its errors, and the
analyses of anp_jax.analysis against independent computations."""

from __future__ import annotations

import json
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli

from anp_jax import analysis, report
from anp_jax.evaluation import corruptions as corruption_eval
from anp_jax.models import PerturbableModel


def _in_unit(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A digits model trained for 3 epochs, its workdir and a copy (source and baseline).

    Trained by ``anp-jax train`` in a process with one CPU device (this one has eight)."""
    root = tmp_path_factory.mktemp("report")
    workdir = str(root / "run")
    proc = run_cli(["train", f"--workdir={workdir}", "--config.num_epochs=3",
                    "--config.eval.attacks=()", "--config.eval.corruptions=()",
                    "--config.num_devices=1"], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = str(root / "other")
    shutil.copytree(workdir, other)
    return workdir, other


@pytest.fixture(scope="module")
def quick(trained, data_dir):
    """One quick report by ``anp-jax eval`` (one CPU device), with transfer from and mCE
    normalised by an identical copy.

    In a fresh process: in this one (after the session's in-process data preparation) the
    iterative attacks have been seen to run some 50 times slower.
    """
    workdir, other = trained
    with open(os.path.join(workdir, "metrics.json")) as f:
        before = json.load(f)
    t0 = time.perf_counter()
    proc = run_cli(["eval", f"--workdir={workdir}", f"--source_workdir={other}",
                    f"--baseline_workdir={other}", "--quick"], data_dir)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.json")) as f:
        after = json.load(f)
    return proc, before, after, seconds


def test_quick_report_sections(quick):
    _, before, after, _ = quick
    r = after["report"]
    plan = report.make_plan("digits", quick=True)
    assert r["quick"] is True and r["num_examples"] == 359 and r["dataset"] == "digits"
    assert abs(r["clean_accuracy"] - before["clean_accuracy"]) < 1e-6
    assert r["clean_accuracy"] > 0.6

    a = r["attacks"]
    for name in ("fgsm_linf", "stepll_linf", f"pgd{plan.steps}_linf", f"mifgsm{plan.steps}_linf",
                 f"apgd{plan.steps}_linf"):
        for eps in plan.linf_budgets:
            head, norm = name.split("_")
            assert _in_unit(a["accuracy"][f"{head}_{norm}_{eps:g}"]), (name, eps)
    for eps in plan.l2_budgets:
        assert _in_unit(a["accuracy"][f"pgd{plan.steps}_l2_{eps:g}"])
    assert all(_in_unit(v) for v in a["accuracy"].values())
    assert all(_in_unit(v) for v in a["random_noise"].values())
    curve = a["accuracy_vs_budget"]
    assert curve["budgets"][0] == 0.0 and curve["budgets"][-1] >= 1.0
    assert curve["accuracy"][0] == r["clean_accuracy"]
    assert all(_in_unit(v) for v in curve["accuracy"])
    assert curve["accuracy"][-1] <= 0.1  # an unbounded attack wins

    transfer = a["transfer"]["accuracy"]
    assert set(transfer) == {f"{n}_linf_{e:g}" for n in ("fgsm", f"pgd{plan.steps}")
                             for e in plan.linf_budgets}
    # The source is an identical copy and the random starts are shared: transfer = white-box.
    for aid, acc in transfer.items():
        assert acc == pytest.approx(a["accuracy"][aid], abs=1e-9), aid

    c = r["corruptions"]
    assert set(c["accuracy"]) == {f"{n}_{s}" for n in plan.corruptions for s in plan.severities}
    assert all(_in_unit(v) for v in c["accuracy"].values())
    assert set(c["error"]) == set(plan.corruptions)
    assert _in_unit(c["mce"])
    assert c["mce"] == pytest.approx(np.mean(list(c["error"].values())))
    # The baseline is the same model on the same corrupted images.
    assert c["baseline_source"] == "evaluated"
    assert c["normalized_mce"] == pytest.approx(1.0)
    assert c["relative_mce"] in (None, pytest.approx(1.0))

    s = r["stability"]
    from anp_jax import stability
    assert set(s["flip_probability"]) == set(stability.PERTURBATIONS)
    assert all(_in_unit(v) for v in s["flip_probability"].values())
    assert s["mfp"] == pytest.approx(np.mean(list(s["flip_probability"].values())))

    ins = r["insensitivity"]
    assert ins["points"] == ["input", "conv1", "conv2", "fc1"]
    for p in ins["points"]:
        change = ins["per_point"][p]["relative_logit_change"]
        assert len(change) == len(plan.sigmas)
        assert all(v >= 0 for v in change) and change[0] <= change[-1]  # more noise, more change
        assert all(_in_unit(v) for v in ins["per_point"][p]["flip_rate"])

    b = r["boundary_distance"]
    assert 0 < b["mean_min"] <= b["mean_mean"] <= b["max_distance"] == pytest.approx(8.0)
    assert _in_unit(b["censored_fraction"])
    assert b["num_examples"] == min(359, plan.boundary_examples)


def test_quick_report_sanity_and_warnings(quick):
    r = quick[2]["report"]
    checks = r["sanity"]["checks"]
    names = {c["name"] for c in checks}
    assert {"large_budget_reaches_zero", "accuracy_falls_with_budget",
            "more_steps_not_weaker"} <= names
    assert any(n.startswith("pgd_not_weaker_than_fgsm@") for n in names)
    assert any(n.startswith("random_noise_weaker_than_pgd@") for n in names)
    assert any(n.startswith("white_box_not_weaker_than_transfer@") for n in names)
    assert all(isinstance(c["passed"], bool) and c["detail"] for c in checks)
    assert r["sanity"]["passed"], [c for c in checks if not c["passed"]]
    assert r["warnings"] == []


def test_quick_report_keeps_metrics_and_writes_plots(quick, trained):
    _, before, after, _ = quick
    assert set(before) | {"report"} == set(after)
    for key, value in before.items():
        assert after[key] == value, key
    workdir = trained[0]
    plots = after["report"]["plots"]
    assert set(plots) == {"accuracy_vs_budget", "corruption_severity", "insensitivity"}
    for rel in plots.values():
        with open(os.path.join(workdir, rel), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(workdir) if "tmp" in n]


def test_quick_report_prints_a_table(trained, quick):
    proc = quick[0]
    assert proc.stdout == report.format_report(quick[2]["report"], trained[0]) + "\n" + \
        proc.stdout.splitlines()[-1] + "\n"
    for needle in ("clean accuracy", "attack (linf)", "mCE", "mFP", "boundary distance",
                   "sanity checks", "insensitivity", "merged into"):
        assert needle in proc.stdout
    assert "WARNING" not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_load_run_gives_config_logits_and_test_split(trained):
    """anp_jax.load_run: the accuracy of its logits_fn over its test batches, computed here
    by hand, is the trainer's clean accuracy."""
    import anp_jax

    workdir = trained[1]
    metrics = json.loads(open(os.path.join(workdir, "metrics.json")).read())
    run = anp_jax.load_run(workdir, num_devices=1, log=lambda m: None)
    assert run.config.to_dict() == metrics["config"] and run.config.dataset == "digits"
    correct = seen = 0
    for batch in run.test_batches():
        mask = batch["mask"].reshape(-1)
        images = batch["image"].reshape((-1,) + batch["image"].shape[2:])
        logits = np.asarray(run.logits_fn(images))
        assert logits.shape == (len(mask), 10)
        correct += int(np.sum((logits.argmax(-1) == batch["label"].reshape(-1)) & mask))
        seen += int(mask.sum())
    assert seen == metrics["num_test_examples"] == 359
    assert correct / seen == pytest.approx(metrics["clean_accuracy"], abs=1e-9)


def test_report_with_autoattack_reports_its_record(trained, monkeypatch):
    """With an AutoAttack cascade installed (a stand-in that fools every odd image), the
    reported number at its budget is its worst case with the clean errors, over the images
    it ran on (the combination with other attacks: tests/test_evaluation.py)."""
    import dataclasses

    import anp_jax

    def cascade(apply_fn, params, batch_stats, images, labels, *, norm, eps, version, seed,
                devices):
        variables = {"params": params, "batch_stats": batch_stats}
        pred = np.asarray(apply_fn(variables, images, train=False)).argmax(-1)
        robust = (pred == labels) & (np.arange(len(labels)) % 2 == 0)
        return {"robust_accuracy": float(robust.mean()), "robust": robust,
                "stages": {"apgd-ce": float(robust.mean())}}

    from anp_jax.evaluation import autoattack

    monkeypatch.setattr(autoattack, "autoattack", cascade)
    plan = dataclasses.replace(report.make_plan("digits", quick=True),
                               sections=("clean", "autoattack"))
    assert plan.autoattack == "quick" and plan.autoattack_budgets == (("linf", 0.1),)
    plan = dataclasses.replace(plan, autoattack_examples=50)
    r = report.make_report(trained[1], plan=plan, log=lambda m: None)
    rec, aa = r["robust_accuracy"]["linf_0.1"], r["autoattack"]["records"]["linf_0.1"]
    run = anp_jax.load_run(trained[1], num_devices=1, log=lambda m: None)
    batch = next(iter(run.test_batches()))
    images = batch["image"].reshape((-1, 8, 8, 1))[:50]
    pred = np.asarray(run.logits_fn(images)).argmax(-1)
    expected = np.mean((pred == batch["label"].reshape(-1)[:50]) & (np.arange(50) % 2 == 0))
    assert rec["accuracy"] == pytest.approx(expected) == aa["robust_accuracy"]
    assert rec["num_examples"] == aa["num_examples"] == 50
    assert rec["attack"] == aa["attack"] and rec["attack"].startswith("AutoAttack quick preset")
    assert rec["autoattack"]["stages"] == aa["stages"]
    assert "robust" not in aa and "robust" not in rec["autoattack"]  # no per-example flags
    json.dumps(r)  # what merge_into_metrics writes
    text = report.format_report(r, trained[1])
    assert text.index("robust accuracy (the reported number") < \
        text.index(f"{aa['attack']} at linf 0.1: ")


def _one_line_error(capsys, rc, code=2):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and err.startswith("anp-jax: error:"), err
    return err


def test_errors_are_one_line(tmp_path, capsys, trained):
    assert "does not exist" in _one_line_error(
        capsys, report.main([f"--workdir={tmp_path / 'nowhere'}"]))
    assert "metrics.json" in _one_line_error(capsys, report.main([f"--workdir={tmp_path}"]))
    (tmp_path / "metrics.json").write_text("{not json")
    assert "JSON" in _one_line_error(capsys, report.main([f"--workdir={tmp_path}"]))
    (tmp_path / "metrics.json").write_text(json.dumps({"clean_accuracy": 0.5}))
    assert "config" in _one_line_error(capsys, report.main([f"--workdir={tmp_path}"]))
    metrics = json.loads(open(os.path.join(trained[0], "metrics.json")).read())
    metrics.pop("report", None)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "no checkpoint" in _one_line_error(capsys, report.main([f"--workdir={tmp_path}"]))
    (tmp_path / "checkpoints").mkdir()
    assert "no checkpoint" in _one_line_error(capsys, report.main([f"--workdir={tmp_path}"]))
    assert "--workdir" in _one_line_error(capsys, report.main([]))
    assert "bogus" in _one_line_error(capsys, report.main([f"--workdir={tmp_path}", "--bogus"]))
    assert report.main(["--help"]) == 0
    assert "--baseline_workdir" in capsys.readouterr().out


def test_mismatched_checkpoint_is_an_error_and_is_kept(tmp_path, capsys, trained):
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(trained[1], "checkpoints"), workdir / "checkpoints")
    metrics = json.loads(open(os.path.join(trained[1], "metrics.json")).read())
    metrics["config"]["model"] = "lenet"
    (workdir / "metrics.json").write_text(json.dumps(metrics))
    steps = sorted(os.listdir(workdir / "checkpoints"))
    err = _one_line_error(capsys, report.main([f"--workdir={workdir}"]))
    assert "does not fit" in err and "LeNet" in err
    assert sorted(os.listdir(workdir / "checkpoints")) == steps  # nothing moved aside
    assert "report" not in json.loads((workdir / "metrics.json").read_text())


def test_merge_keeps_keys_and_is_atomic(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"a": 1}, "x": [1, 2],
                                                       "report": {"old": 1}}))
    report.merge_into_metrics(str(tmp_path), {"clean_accuracy": np.float32(0.5),
                                              "bad": float("nan"), "n": np.int64(3)})
    out = json.loads((tmp_path / "metrics.json").read_text())
    assert out == {"config": {"a": 1}, "x": [1, 2],
                   "report": {"clean_accuracy": 0.5, "bad": None, "n": 3}}
    assert os.listdir(tmp_path) == ["metrics.json"]


# ---------------------------------------------------------------------------------------------
# Pieces, against independent computations
# ---------------------------------------------------------------------------------------------


def test_corruption_summary_by_hand():
    acc = {"a_1": 0.9, "a_2": 0.7, "b_1": 0.8, "b_2": 0.8}
    base = {"a_1": 0.8, "a_2": 0.6, "b_1": 0.9, "b_2": 0.9}
    out = corruption_eval.summary(acc, 0.95, ("a", "b"), (1, 2), base, 0.9)
    assert out["error"] == pytest.approx({"a": 0.2, "b": 0.2})
    assert out["mce"] == pytest.approx(0.2)
    # normalised: (0.1 + 0.3) / (0.2 + 0.4) and (0.2 + 0.2) / (0.1 + 0.1)
    assert out["normalized_error"] == pytest.approx({"a": 0.4 / 0.6, "b": 2.0})
    assert out["normalized_mce"] == pytest.approx((0.4 / 0.6 + 2.0) / 2)
    # relative: sum(E - 0.05) / sum(E_base - 0.1); b's baseline never exceeds its clean error
    assert out["relative_error"]["a"] == pytest.approx((0.05 + 0.25) / (0.1 + 0.3))
    assert out["relative_error"]["b"] is None
    assert out["relative_mce"] == pytest.approx(0.3 / 0.4)


def _attack_section(pgd, fgsm, noise, curve, more):
    plan = report.make_plan("digits", quick=True)
    acc = {}
    for eps, p, f in zip(plan.linf_budgets, pgd, fgsm):
        acc[f"pgd{plan.steps}_linf_{eps:g}"] = p
        acc[f"fgsm_linf_{eps:g}"] = f
    eps = plan.linf_budgets[0]
    acc[f"pgd{plan.more_steps}_linf_{eps:g}"] = more
    return plan, {
        "accuracy": acc,
        "random_noise": {f"uniform_linf_{e:g}": v for e, v in zip(plan.linf_budgets, noise)},
        "accuracy_vs_budget": {"budgets": [0.0, *plan.curve_budgets], "accuracy": curve},
        "more_steps": {"steps": plan.more_steps, "budget": eps},
    }


def test_sanity_checks_flag_gradient_masking():
    plan, good = _attack_section([0.5, 0.1], [0.7, 0.4], [0.9, 0.85], [0.95, 0.5, 0.1, 0.0],
                                 0.49)
    assert all(c["passed"] for c in report.sanity_checks(good, 0.95, plan))
    # PGD weaker than FGSM, no convergence to 0, non-monotone curve, more steps weaker,
    # random noise stronger than PGD.
    plan, bad = _attack_section([0.8, 0.6], [0.5, 0.4], [0.3, 0.2], [0.95, 0.8, 0.6, 0.7],
                                0.9)
    failed = {c["name"].split("@")[0] for c in report.sanity_checks(bad, 0.95, plan)
              if not c["passed"]}
    assert failed == {"pgd_not_weaker_than_fgsm", "large_budget_reaches_zero",
                      "accuracy_falls_with_budget", "more_steps_not_weaker",
                      "random_noise_weaker_than_pgd"}


def test_plans_use_the_papers_cifar_budgets():
    plan = report.make_plan("cifar10")
    assert 8 / 255 in plan.linf_budgets and 16 / 255 in plan.linf_budgets
    assert plan.curve_budgets[-1] >= 1.0
    assert len(plan.corruptions) == 19 and plan.severities == (1, 2, 3, 4, 5)
    quick_plan = report.make_plan("digits", quick=True)
    assert len(quick_plan.corruptions) < 19 and quick_plan.steps < plan.steps


def test_boundary_distance_of_a_linear_classifier():
    rng = np.random.RandomState(0)
    shape = (4, 4, 1)
    w = rng.randn(*shape).astype(np.float32)
    bias = np.float32(0.3)
    x = rng.rand(6, *shape).astype(np.float32)

    def logits_fn(images):
        score = jnp.sum(images * w, axis=(1, 2, 3)) + bias
        return jnp.stack([jnp.zeros_like(score), score], -1)

    dirs = analysis.random_orthonormal_directions(jax.random.PRNGKey(1), 6, shape, 5)
    flat = np.asarray(dirs).reshape(6, 5, -1)
    np.testing.assert_allclose(np.einsum("bnd,bmd->bnm", flat, flat),
                               np.broadcast_to(np.eye(5), (6, 5, 5)), atol=1e-5)
    # The Q of numpy's (LAPACK's) QR of the same Gaussian draws, signed so that R's
    # diagonal is positive.
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, 16, 5)), np.float64)
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    np.testing.assert_allclose(flat, np.swapaxes(q, 1, 2), atol=1e-5)
    # No LAPACK call (its batched kernels deadlocked the evaluation on 2 CPU devices).
    hlo = jax.jit(lambda k: analysis.random_orthonormal_directions(k, 6, shape, 5)).lower(
        jax.random.PRNGKey(1)).as_text()
    assert "custom_call" not in hlo and "lapack" not in hlo
    max_d, coarse, fine = 6.0, 12, 10
    out = jax.jit(lambda x_, d_: analysis.boundary_distance(
        logits_fn, x_, directions=d_, max_distance=max_d, coarse=coarse, fine=fine))(x, dirs)
    margin = np.abs(np.einsum("bhwc,hwc->b", x, w) + bias)
    exact = margin[:, None] / np.abs(flat @ w.reshape(-1))  # |w.x + b| / |w.d|
    expected = np.minimum(exact, max_d)
    resolution = max_d / (coarse * fine)
    got = np.asarray(out["distances"])
    assert np.all(got >= expected - 1e-4) and np.all(got <= expected + resolution + 1e-4)
    np.testing.assert_allclose(out["min"], got.min(1))
    np.testing.assert_allclose(out["mean"], got.mean(1))
    np.testing.assert_allclose(out["censored"], (exact > max_d).mean(1))
    assert 0 < (exact > max_d).mean() < 1  # both cases are exercised


class _Toy(PerturbableModel):
    """Logits = W x + b at point "live"; point "dead" does not reach the logits."""

    def perturbation_points(self):
        return ("input", "dead", "live")

    @nn.compact
    def __call__(self, x, train=False):
        x = self.perturb("input", x)
        flat = x.reshape((x.shape[0], -1))
        dead = self.perturb("dead", nn.Dense(5, name="dead_dense")(flat))
        live = self.perturb("live", nn.Dense(3, name="live_dense")(flat))
        del dead
        return live


def test_insensitivity_of_a_toy_model():
    model = _Toy()
    x = jax.random.uniform(jax.random.PRNGKey(0), (7, 3, 3, 1))
    y = jnp.arange(7) % 3
    variables = model.init(jax.random.PRNGKey(1), x)
    variables = {"params": variables["params"]}
    logits, acts = analysis.capture_points(model.apply, variables, x)
    dense = variables["params"]["live_dense"]
    by_hand = x.reshape(7, -1) @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(acts["live"], by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["input"], x)

    sigmas = (0.1, 0.5)
    out = jax.jit(lambda v, x_, y_, r: analysis.noise_insensitivity(
        model.apply, v, x_, y_, r, sigmas, model.perturbation_points()))(
        variables, x, y, jax.random.PRNGKey(2))
    # Noise the logits do not depend on changes nothing.
    np.testing.assert_array_equal(out["dead"]["relative_logit_change"], 0.0)
    np.testing.assert_array_equal(out["dead"]["flipped"], 0.0)
    np.testing.assert_allclose(out["dead"]["kl"], 0.0, atol=1e-7)
    # Noise on the logits themselves: the relative change is sigma, exactly.
    np.testing.assert_allclose(out["live"]["relative_logit_change"],
                               np.broadcast_to(np.array(sigmas)[:, None], (2, 7)), rtol=1e-4)
    change = np.asarray(out["input"]["relative_logit_change"])
    assert change.shape == (2, 7) and np.all(change > 0)
    np.testing.assert_allclose(change[1], 5 * change[0], rtol=1e-4)  # linear in the noise
    np.testing.assert_allclose(out["clean"]["correct"],
                               (np.argmax(by_hand, -1) == np.asarray(y)).astype(np.float32))


def test_relative_noise_norm():
    z = jnp.concatenate([jnp.zeros((1, 4, 4, 2)),
                         jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))])
    n = analysis.relative_noise(jax.random.PRNGKey(1), z, 0.3)
    norms = np.sqrt(np.sum(np.asarray(n) ** 2, axis=(1, 2, 3)))
    expected = 0.3 * np.sqrt(np.sum(np.asarray(z) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, expected, rtol=1e-5, atol=1e-7)
    assert norms[0] == 0.0


def test_representation_change_is_zero_without_noise():
    model = _Toy()
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 3, 3, 1))
    variables = {"params": model.init(jax.random.PRNGKey(1), x)["params"]}
    points = model.perturbation_points()
    zero = analysis.representation_change(model.apply, variables, x, jax.random.PRNGKey(2),
                                          0.0, points)
    for p in points:
        np.testing.assert_allclose(zero[p], 0.0, atol=1e-6)
    some = analysis.representation_change(model.apply, variables, x, jax.random.PRNGKey(2),
                                          0.2, points)
    np.testing.assert_allclose(some["input"], 0.2, rtol=1e-4)
