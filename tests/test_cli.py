"""The ``anp-jax`` command end to end on the embedded default, and its errors."""

import json

import pytest
from conftest import run_cli

from anp_jax import cli

FAST = ["--config.num_epochs=3", "--config.eval.attacks=('fgsm_linf_0.1','pgd10_linf_0.1')",
        "--config.eval.corruptions=('gaussian_noise_3',)"]


def test_train_end_to_end(data_dir, tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli(["train", f"--workdir={workdir}", *FAST], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in ("config", "clean_accuracy", "adversarial", "corruption", "final_train_loss",
                "train_seconds", "steps", "num_devices"):
        assert key in metrics
    assert metrics["config"]["method"] == "anp"
    assert metrics["num_test_examples"] == 359
    assert 0.6 < metrics["clean_accuracy"] <= 1.0
    assert set(metrics["adversarial"]) == {"fgsm_linf_0.1", "pgd10_linf_0.1"}
    assert metrics["adversarial"]["pgd10_linf_0.1"] <= metrics["clean_accuracy"]
    assert set(metrics["corruption"]) == {"gaussian_noise_3"}
    # k=2 updates per mini-batch, 44 mini-batches per epoch.
    assert metrics["steps"] == 3 * 44 * 2
    assert "clean accuracy" in proc.stdout and "metrics written to" in proc.stdout


@pytest.mark.parametrize("override, culprit", [
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.anp.epsilon=-0.5", "anp.epsilon"),
    ("--config.anp.k=0", "anp.k"),
    ("--config.anp.layers=input,conv9", "conv9"),
    ("--config.model=alexnet", "model"),
    ("--config.dataset=svhn", "dataset"),
    ("--config.method=magic", "method"),
    ("--config.dtype=float16", "dtype"),
    ("--config.input_pipeline=fast", "input_pipeline"),
    ("--config.eval.attacks=('pgd10_l7_0.1',)", "pgd10_l7_0.1"),
])
def test_config_errors_are_one_line(override, culprit, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", f"--workdir={workdir}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("anp-jax: error:")
    assert culprit in err
    assert not (workdir / "metrics.json").exists()


def test_usage_errors(tmp_path, capsys):
    assert cli.main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["train"]) == 2
    assert "--workdir" in capsys.readouterr().err
    assert cli.main(["train", f"--workdir={tmp_path}", "--bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_missing_dataset_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty_tfds"
    code = cli.main(["train", f"--workdir={tmp_path / 'run'}", "--config.dataset=mnist",
                     "--config.model=lenet", f"--config.data_dir={empty}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "'mnist' not found" in err and str(empty) in err and "tfds build mnist" in err


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main(["train", f"--workdir={tmp_path}", "--config=/no/such/config.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/no/such/config.py" in err
