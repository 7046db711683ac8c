"""The ``anp-jax`` command end to end on the embedded default, and its errors."""

import json
import re
import subprocess
import sys

import pytest
from conftest import cli_env

from anp_jax import cli

FAST = ["--config.num_epochs=3", "--config.eval.attacks=('fgsm_linf_0.1','pgd10_linf_0.1')",
        "--config.eval.corruptions=('gaussian_noise_3',)"]


# What TensorFlow's and absl's C++ logging print when nobody silences them.
NATIVE_LOG = re.compile(r"absl::InitializeLog|oneDNN custom operations|^[IWEF]\d{4} ",
                        re.MULTILINE)


def test_train_end_to_end(data_dir, tmp_path):
    workdir = tmp_path / "run"
    env = cli_env(data_dir)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "GRPC_VERBOSITY"):
        env.pop(name, None)  # the command must silence them itself
    proc = subprocess.run([sys.executable, "-m", "anp_jax", "train", f"--workdir={workdir}",
                           *FAST], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not NATIVE_LOG.search(proc.stderr), proc.stderr[:3000]
    lines = proc.stderr.splitlines()
    assert any(line.startswith("compiling the train step") for line in lines), lines
    epochs = [line for line in lines if re.match(r"epoch \d+/3: loss [\d.]+, accuracy "
                                                   r"[\d.]+, eps 1, [\d.]+ s$", line)]
    assert len(epochs) == 3, lines
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
    ("--config.method=replay_free_at", "method"),  # Free-AT replays every batch already
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


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_lists_flags_and_every_config_field(command, capsys):
    from anp_jax.configs.default import get_config

    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--[no]compile_cache" in out
    assert ("--coordinator_address" in out) == (command == "train")
    assert ("--source_workdir" in out) == (command == "eval")

    def leaves(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for field, value in leaves(get_config().to_dict()):
        assert f"--config.{field}={value!r}" in out, field
    # With its meaning, from the comments of configs/default.py.
    assert re.search(r"--config\.anp\.epsilon=1\.0\n\s+eps: noise magnitude", out)
    assert re.search(r"--config\.num_epochs=30\n\s+passes over the training split", out)


def test_top_level_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out and "143" in out


@pytest.mark.parametrize("override, message", [
    ("--config.num_epoch=3", "unknown config field 'num_epoch' (did you mean 'num_epochs'?)"),
    ("--config.anp.epsilonn=1", "unknown config field 'anp.epsilonn' (did you mean "
                                "'anp.epsilon'?)"),
])
def test_misspelt_field_is_one_line_with_a_suggestion(override, message, tmp_path, capsys):
    assert cli.main(["train", f"--workdir={tmp_path}", override]) == 2
    assert capsys.readouterr().err == f"anp-jax: error: {message}\n"


def test_shared_parser_takes_extra_flags():
    """Scripts reuse the parser with flags of their own and get the same overrides."""
    from absl import flags

    def extra(fv):
        flags.DEFINE_integer("seeds", 5, "number of seeds", flag_values=fv)

    fv, config = cli.parse_config_flags(["--seeds=2", "--config.anp.k=3"], extra,
                                        require_workdir=False)
    assert fv.seeds == 2 and config.anp.k == 3 and config.num_epochs == 30
    with pytest.raises(cli.UsageError, match="did you mean 'batch_size'"):
        cli.parse_config_flags(["--config.batchsize=3"], extra, require_workdir=False)


def test_keep_freed_memory_is_glibcs_and_optional():
    assert cli.keep_freed_memory(False) is False  # --notune_malloc: the allocator untouched
    if sys.platform.startswith("linux"):  # glibc's mallopt accepts both settings
        assert cli.keep_freed_memory(True) is True


def test_split_host_sets_one_cpu_device_per_core_unless_told(monkeypatch):
    import os

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert cli.split_host() == cores
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={cores}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert cli.split_host(3) == 3
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0",
                                               "--xla_force_host_platform_device_count=3"]
    # A count the user set, or 0, leaves XLA_FLAGS alone.
    assert cli.split_host(5) is None and "count=3" in os.environ["XLA_FLAGS"]
    monkeypatch.delenv("XLA_FLAGS")
    assert cli.split_host(0) is None and "XLA_FLAGS" not in os.environ


def test_eval_rejects_a_negative_device_count(tmp_path, capsys):
    assert cli.main(["eval", f"--workdir={tmp_path}", "--cpu_devices=-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cpu_devices" in err
