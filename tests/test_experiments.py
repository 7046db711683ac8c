"""The experiment scripts and the Colab notebook run end to end with tiny settings.

Each script's ``main`` trains 1 epoch on 1 seed with a minimal evaluation (FGSM, a 2-step
PGD and one corruption) and must write its Markdown table, its plots and its JSON of
per-seed numbers. The notebook is executed top to bottom with nbclient (install cell
skipped, 1 epoch per run) and must produce its plot.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import cli_env
from procs import PATIENT_COLLECTIVES, with_repo_on_path, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY = ["--seeds", "0", "--epochs", "1", "--attacks", "fgsm_linf_0.1,pgd2_linf_0.1",
        "--corruptions", "gaussian_noise_3", "--config.num_devices=2", "--autoattack", "none"]
# In-process calls (those that train and evaluate nothing, or fail on their arguments): no
# persistent compilation cache (a process-wide setting the other tests should not inherit).
IN_PROCESS = ["--nocompile_cache"]
PNG = b"\x89PNG\r\n\x1a\n"


def _study(script, args, data_dir, split=False):
    """``python -m experiments.SCRIPT ARGS`` on two CPU devices, as a user runs it: the
    studies' trainings and evaluations compile with XLA's full optimisation (the test
    process compiles quickly but runs slowly) and share the session's compilation cache.
    ``split``: XLA_FLAGS without a device count, so the script splits the CPU itself."""
    env = with_repo_on_path(cli_env(data_dir, devices=2))
    if split:
        env["XLA_FLAGS"] = PATIENT_COLLECTIVES
    proc = subprocess.run([sys.executable, "-m", f"experiments.{script}", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _outputs(out, plots):
    md = (out / "results.md").read_text()
    assert md.startswith("# ") and "|---|" in md
    assert "command: `python -m experiments." in md
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0] and data["epochs"] == 1
    for plot in plots:
        assert (out / plot).read_bytes()[:8] == PNG, plot
        assert f"]({plot})" in md
    for run in data["runs"]:
        assert run["seed"] == 0 and 0.0 <= run["clean"] <= 1.0
    return md, data


def _names(data):
    return {run["name"] for run in data["runs"]}


def test_methods(data_dir, tmp_path):
    from experiments import methods

    out = tmp_path / "methods"
    args = [*TINY, "--methods", "anp,vanilla,replay"]
    _study("methods", ["--out", str(out), *args], data_dir)
    args = ["--out", str(out), *args, *IN_PROCESS]
    md, data = _outputs(out, ["accuracy.png", "delta.png"])
    assert _names(data) == {"vanilla", "replay", "anp"}
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["replay"]["steps"] == 2 * runs["vanilla"]["steps"] == runs["anp"]["steps"]
    assert set(runs["anp"]["adversarial"]) == {"fgsm_linf_0.1", "pgd2_linf_0.1"}
    assert runs["anp"]["pgd"] == runs["anp"]["adversarial"]["pgd2_linf_0.1"]
    assert runs["anp"]["corruption"] == runs["anp"]["corruptions"]["gaussian_noise_3"]
    assert "Δ robust vs replay" in md and "ANP vs replay, robust accuracy" in md
    assert md.index("`vanilla`") < md.index("`replay`") < md.index("`anp`")

    # A second call finds every run done and trains nothing.
    metrics = sorted(out.glob("runs/*/metrics.json"))
    assert len(metrics) == 3
    stamps = [p.stat().st_mtime_ns for p in metrics]
    assert methods.main(args) == 0
    assert [p.stat().st_mtime_ns for p in metrics] == stamps

    # Without the store (another machine, a committed results directory) the ledger's
    # figures are reused: nothing is trained and the tables come out the same.
    import shutil

    shutil.rmtree(out / "runs")
    assert methods.main(args) == 0
    assert not (out / "runs").exists()
    again = json.loads((out / "results.json").read_text())
    assert {(r["name"], r["clean"], r["pgd"]) for r in again["runs"]} == \
        {(r["name"], r["clean"], r["pgd"]) for r in data["runs"]}

    # Another study beside this one takes the runs it shares from this ledger: its own
    # ledger gets a copy, nothing is trained, and the figures are the same.
    other = tmp_path / "other"
    assert methods.main(["--out", str(other), *TINY, "--methods", "anp,vanilla",
                         *IN_PROCESS]) == 0
    assert not (other / "runs").exists() and not (out / "runs").exists()
    copied = json.loads((other / "ledger.json").read_text())["runs"]
    mine = json.loads((out / "ledger.json").read_text())["runs"]
    assert len(copied) == 2 and all(mine[k] == v for k, v in copied.items())
    shared = json.loads((other / "results.json").read_text())
    assert {(r["name"], r["clean"], r["pgd"]) for r in shared["runs"]} == \
        {(r["name"], r["clean"], r["pgd"]) for r in data["runs"] if r["name"] != "replay"}


def test_autoattack_column(data_dir, tmp_path):
    """The robust column is AutoAttack's worst case, named, and its evaluation is cached.
    The script splits the CPU into 2 host devices (--cpu_devices): the run trains on one
    (config num_devices -1), the evaluation runs on both."""
    from experiments import methods

    out = tmp_path / "aa"
    args = ["--out", str(out), "--seeds", "0", "--epochs", "1", "--attacks", "pgd2_linf_0.1",
            "--corruptions", "none", "--autoattack", "quick",
            "--autoattack_examples", "32", "--methods", "vanilla"]
    _study("methods", [*args, "--cpu_devices=2"], data_dir, split=True)
    args += IN_PROCESS
    workdir = next(out.glob("runs/*/config.json")).parent
    assert json.loads((workdir / "config.json").read_text())["num_devices"] == 1
    assert json.loads((workdir / "evaluation.json").read_text())["report"]["num_devices"] == 2
    data = json.loads((out / "results.json").read_text())
    (run,) = data["runs"]
    assert run["robust_attack"].startswith("AutoAttack quick preset")
    assert run["robust"] == run["robust_budgets"]["linf_0.1"]
    assert run["robust"] * 32 == pytest.approx(round(run["robust"] * 32))  # 32 images
    saved = json.loads(next(out.glob("runs/*/evaluation.json")).read_text())
    record = saved["report"]["robust_accuracy"]["linf_0.1"]
    assert record["num_examples"] == 32 and record["accuracy"] == run["robust"]
    md = (out / "results.md").read_text()
    assert "AutoAttack quick on the first 32 test images" in md
    assert "robust L-inf 0.1 (worst case, attack)" in md
    evaluation = next(out.glob("runs/*/evaluation.json"))
    stamp = evaluation.stat().st_mtime_ns
    assert methods.main(args) == 0  # trained and evaluated: nothing is redone
    assert evaluation.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="--autoattack_budgets"):
        methods.main([*args, "--autoattack_budgets", "linf"])


def test_layers(data_dir, tmp_path):
    from experiments import layers

    assert layers.selections(("input", "conv1", "conv2", "fc1")) == [
        ("anp:input", "input"), ("anp:conv1", "conv1"), ("anp:conv2", "conv2"),
        ("anp:fc1", "fc1"), ("anp:hidden", "deep 3"), ("anp:shallow 2", "shallow 2"),
        ("anp:deep 2", "deep 2"), ("anp:all", "all")]
    assert layers.selections(("a", "b", "c"))[3:5] == [("anp:shallow 2", "shallow 2"),
                                                       ("anp:deep 1", "deep 1")]
    four = ("input", "conv1", "conv2", "fc1")
    assert layers.chosen_selections(four, "input", "hidden") == [
        ("anp:input", "input"), ("anp:hidden", "deep 3")]
    assert layers.chosen_selections(four, "none", "shallow,all") == [
        ("anp:shallow 2", "shallow 2"), ("anp:all", "all")]
    assert layers.chosen_selections(four) == layers.selections(four)
    with pytest.raises(ValueError, match="--groups: unknown middle"):
        layers.chosen_selections(four, "all", "middle")
    with pytest.raises(ValueError, match="--points: unknown fc9"):
        layers.chosen_selections(four, "fc9")
    out = tmp_path / "layers"
    _study("layers", ["--out", str(out), *TINY, "--points", "conv1",
                      "--groups", "shallow,deep"], data_dir)
    md, data = _outputs(out, ["gain.png", "accuracy.png"])
    assert _names(data) == {"vanilla", "replay", "anp:conv1", "anp:shallow 2", "anp:deep 2"}
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["anp:shallow 2"]["perturbed_layers"] == ["input", "conv1"]
    assert runs["anp:deep 2"]["perturbed_layers"] == ["conv2", "fc1"]
    assert runs["replay"]["perturbed_layers"] == []
    assert "shallow half minus deep half" in md and "clean cost vs vanilla" in md


def test_hparams(data_dir, tmp_path):
    from experiments import hparams

    grids = {"eps": [0.5, 1.0], "alpha": [0.0, 0.5], "k": [1, 2]}
    assert hparams.plan(grids, (1.0, 0.5, 2), 2) == [
        (1.0, 0.5, 2), (0.5, 0.5, 2), (1.0, 0.0, 2), (1.0, 0.5, 1)]
    # alpha acts only from the third progressive step: its sweep runs at k = 3
    assert hparams.plan(grids, (1.0, 0.5, 2), 3) == [
        (1.0, 0.5, 2), (0.5, 0.5, 2), (1.0, 0.0, 3), (1.0, 0.5, 3), (1.0, 0.5, 1)]
    out = tmp_path / "hparams"
    args = ["--out", str(out), *TINY, "--eps", "0.5", "--alpha", "0.5", "--k", "2",
            "--alpha_k", "2"]
    _study("hparams", args, data_dir)
    md, data = _outputs(out, ["sweeps.png"])
    assert _names(data) == {"replay k=2", "anp eps=1 alpha=0.5 k=2", "anp eps=0.5 alpha=0.5 k=2"}
    assert "### eps" in md and "### alpha" in md and "### k" in md


def test_schedules(data_dir, tmp_path):
    from anp_jax.trainer import make_schedules
    from experiments import common, schedules

    config = common.load_config(None)
    config.num_epochs = 4
    fn = schedules.user_eps_schedule(4, 1.0)
    assert float(fn(0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(fn(2.0)) == pytest.approx(1.0 * 3.14159265 / 2, rel=1e-5)
    table = make_schedules(schedules.as_piecewise(config, fn, 4))
    assert float(table["eps"](2.5)) == pytest.approx(float(fn(2.5)), rel=1e-5)
    assert int(table["k"](2.5)) == config.anp.k

    out = tmp_path / "schedules"
    _study("schedules", ["--out", str(out), *TINY, "--schedules", "constant,user"], data_dir)
    md, data = _outputs(out, ["schedules.png", "accuracy.png"])
    assert _names(data) == {"constant", "user", "vanilla", "replay k=2"}
    assert "def user_eps_schedule" in md
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["user"]["clean"] != runs["constant"]["clean"] or \
        runs["user"]["pgd"] != runs["constant"]["pgd"]


def test_cost(data_dir, tmp_path):
    out = tmp_path / "cost"
    _study("cost", ["--out", str(out), *TINY, "--epochs", "2", "--methods", "anp"], data_dir)
    md = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert (out / "cost.png").read_bytes()[:8] == PNG
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"vanilla", "anp"}
    for run in runs.values():
        assert len(run["cumulative_seconds"]) == 2 and run["seconds_per_epoch"] > 0
    assert runs["vanilla"]["relative_cost"] == pytest.approx(1.0)
    assert runs["anp"]["relative_cost"] > 0
    assert "relative to vanilla" in md


def test_common_helpers():
    from experiments import common

    assert common.fmt([0.5]) == "0.500"
    assert common.fmt([0.5, 0.7]) == "0.600 ± 0.141"
    assert common.fmt([0.1, 0.3], signed=True) == "+0.200 ± 0.141"
    assert common.fmt([]) == "n/a"
    assert common.verdict([0.1, 0.11, 0.09, 0.1, 0.1]) == "higher"
    assert common.verdict([0.1, -0.1, 0.05, -0.05]) == "within spread"
    p = common.parser("doc", 10)
    _, config, _ = p.parse_args(["--out", "x", "--config.anp.epsilon=2.5",
                                 "--config.anp.layers=shallow 2"], "prog")
    assert config.anp.epsilon == 2.5 and config.anp.layers == "shallow 2"
    with pytest.raises(SystemExit, match="anp.nonsense"):
        p.parse_args(["--out", "x", "--config.anp.nonsense=1"], "prog")
    config = common.load_config(None)
    assert len(common.corruption_ids("all", config)) == 19
    assert common.corruption_ids("all:5", config)[0] == "gaussian_noise_5"
    assert common.corruption_ids("config", config) == tuple(config.eval.corruptions)
    v = common.variant(config, method="replay", anp__k=3)
    assert (v.method, v.anp.k, config.anp.k) == ("replay", 3, 2)


def test_controls_do_not_depend_on_the_noise_fields_they_do_not_read():
    """A study that changes only the noise (``--config.anp.*``) trains the controls of the
    study without the change: vanilla and adversarial training read no noise field, a
    replay only its k schedule. Checked on what the trainer builds from each config."""
    from anp_jax import trainer
    from anp_jax.configs.default import get_config
    from experiments import common

    file_anp = get_config().anp
    p = common.parser("doc", 4)
    _, noisy, _ = p.parse_args(["--out", "x", "--config.anp.schedule=piecewise",
                                "--config.anp.boundaries=(1.0,2.0,3.0)",
                                "--config.anp.eps_values=(0.0,0.05,0.1,0.0)",
                                "--config.anp.alpha_values=(0.0,0.5,1.0,0.0)",
                                "--config.anp.k_values=(1,3,3,1)",
                                "--config.anp.scale_by_activation_norm=true"], "prog")
    noisy.num_epochs = 4
    for method in ("vanilla", "pgd_at"):
        c = common.without_unread_noise(common.variant(noisy, method=method), file_anp)
        assert c.anp.to_dict() == file_anp.to_dict() and c.method == method
        assert c.num_epochs == 4 and trainer.selected_layers(c, ("input", "conv1")) == ()
    for method in ("replay", "replay_trades"):
        given = common.variant(noisy, method=method)
        c = common.without_unread_noise(given, file_anp)
        trainer.validate_config(c)  # a table of four rows keeps four rows
        assert not c.anp.scale_by_activation_norm and c.anp.layers == file_anp.layers
        other = common.variant(given, anp__eps_values=(0.0, 0.5, 1.0, 0.0))
        assert common.without_unread_noise(other, file_anp).to_dict() == c.to_dict()
        a, b = trainer.make_schedules(given), trainer.make_schedules(c)
        for epoch in (0.5, 1.5, 2.5, 3.5):  # the given k schedule (1, 3, 3, 1), no noise
            assert int(a["k"](epoch)) == int(b["k"](epoch)) == (1 if epoch in (0.5, 3.5) else 3)
            assert float(b["eps"](epoch)) == 0.0
    anp = common.variant(noisy, method="anp_pgd_at")
    assert common.without_unread_noise(anp, file_anp) is anp  # noise runs: unchanged


def test_masking_notes_compare_like_with_like():
    """A reported worst case above PGD alone is flagged only when both ran on the same
    images: AutoAttack on the first 1,000 test images against PGD on all of them is two
    samples, and the easier subset may score higher without any masking."""
    import types

    from experiments import common

    rec = {"adversarial": {"fgsm_linf_0.1": 0.50, "pgd2_linf_0.1": 0.40}, "pgd": 0.40,
           "robust_budgets": {"linf_0.1": 0.45}, "robust_attacks": {"linf_0.1": "AA"}}
    runner = types.SimpleNamespace(records={"anp": {0: rec}},
                                   trained=lambda name: {"anp": {0: rec}}.get(name, {}))

    def notes(autoattack_examples):
        plan = types.SimpleNamespace(autoattack_examples=autoattack_examples)
        settings = types.SimpleNamespace(pgd_id="pgd2_linf_0.1", plan=plan)
        return common.masking_notes(runner, ["anp"], settings)

    (note,) = notes(None)  # the same (all) images: 0.45 above 0.40 is a failed check
    assert note.startswith("anp seed 0: the reported worst case at linf_0.1 (0.4500")
    assert notes(1000) == []  # a subset against all images: not compared
    rec["adversarial"]["pgd2_linf_0.1"] = 0.55  # PGD above FGSM: flagged on any subset
    assert len(notes(1000)) == 1


def test_runs_at_chance_are_left_out_and_named(tmp_path):
    """A run that ended at chance (a collapsed model predicting one class) is left out of
    the means, the paired differences and the masking checks, the table cell says how many
    seeds remain, and a section names the run with its training loss."""
    import types

    from experiments import common

    def rec(clean, robust, loss):
        return {"clean": clean, "robust": robust, "fgsm": robust, "pgd": robust,
                "corruption": clean, "final_train_loss": loss, "adversarial": {},
                "robust_budgets": {"linf_0.1": robust}, "robust_attacks": {"linf_0.1": "AA"}}

    settings = types.SimpleNamespace(out=str(tmp_path / "study"), plan=None,
                                     base=types.SimpleNamespace(dataset="fashion_mnist"),
                                     pgd_id="pgd2_linf_0.1", fgsm_id=None)
    runner = common.Runner(settings)
    assert runner.num_classes == 10
    runner.records = {"anp": {0: rec(0.83, 0.63, 0.60), 1: rec(0.10, 0.11, 2.3029),
                              2: rec(0.85, 0.65, 0.55)},
                      "replay": {0: rec(0.90, 0.20, 0.20), 1: rec(0.90, 0.16, 0.21),
                                 2: rec(0.89, 0.18, 0.22)}}
    assert runner.values("anp", "clean") == [0.83, 0.85]
    assert runner.deltas("anp", "replay", "robust") == pytest.approx([0.43, 0.47])
    assert runner.values("replay", "clean") == [0.90, 0.90, 0.89]
    cells = common.accuracy_columns(runner, "anp")
    assert cells[0] == "0.840 ± 0.014 (2 of 3 seeds; 1 at chance)"
    assert common.robust_cell(runner, "anp", "linf_0.1") == "0.640 ± 0.014 (AA)"
    assert common.masking_notes(runner, ["anp"], settings) == []
    section = common.at_chance_section(runner)
    assert "- `anp` seed 1: clean 0.100, final training loss 2.303" in section
    assert "(ln 10 = 2.303)" in section and "seed 0" not in section
    (dumped,) = [r for r in runner.dump()["runs"] if r.get("ended_at_chance")]
    assert (dumped["name"], dumped["seed"]) == ("anp", 1)
    runner.records["anp"].pop(1)
    assert common.at_chance_section(runner) == ""
    assert common.accuracy_columns(runner, "anp")[0] == "0.840 ± 0.014"


def test_notebook(data_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    monkeypatch.setenv("ANP_SKIP_INSTALL", "1")
    monkeypatch.setenv("ANP_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("ANP_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("PYTHONPATH", with_repo_on_path({})["PYTHONPATH"])
    nb = nbformat.read(os.path.join(ROOT, "experiments", "anp_in_colab.ipynb"), as_version=4)
    install = next(c for c in nb.cells if c.cell_type == "code")
    assert "%pip install" in install.source and "ANP_SKIP_INSTALL" in install.source
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (out / "schedules.png").read_bytes()[:8] == PNG
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the plot cell shows no figure"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "nothing to install" in text and "== constant" in text
    assert "== linear warm-up" in text
