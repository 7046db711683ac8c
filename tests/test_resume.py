"""Resuming is safe: a changed config is refused before anything on disk changes, allowed
changes resume, and only really unreadable checkpoints are set aside."""

import json
import os

import jax
import numpy as np
import pytest
from flax import jax_utils

from anp_jax import checkpoint, cli, noise, train, trainer
from anp_jax.configs.default import get_config
from anp_jax.models import create_model

QUIET = dict(log=lambda m: None, progress=False)


def _config(epochs=1, **fields):
    c = get_config()
    c.num_epochs, c.num_devices, c.lr_schedule = epochs, 1, "constant"
    c.eval.attacks, c.eval.corruptions, c.eval_every_epochs = (), (), 0
    with c.ignore_type():
        for name, value in fields.items():
            c[name] = value
    return c


def _snapshot(root):
    """Every file under ``root``: relative path -> bytes."""
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("resume") / "run")
    metrics = trainer.train_and_evaluate(_config(), workdir, **QUIET)
    return workdir, metrics


def test_config_json_is_the_resolved_config(finished_run):
    workdir, _ = finished_run
    stored = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert stored["num_devices"] == 1 and stored["num_processes"] == 1  # -1 resolved
    assert stored["anp"]["layers"] == "all" and stored["eval"]["attacks"] == []
    assert stored["num_epochs"] == 1 and stored["dataset"] == "digits"


@pytest.mark.parametrize("argv, named", [
    (["--config.anp.layers=shallow 2"], ["anp.layers: 'all' -> 'shallow 2'"]),
    (["--config.seed=3", "--config.anp.epsilon=0.5"],
     ["seed: 0 -> 3", "anp.epsilon: 1.0 -> 0.5"]),
    # The cosine rate stretches with num_epochs: the trained mini-batches would change.
    (["--config.num_epochs=2", "--config.lr_schedule=cosine"],
     ["lr_schedule: 'constant' -> 'cosine'"]),
    (["--config.num_devices=2"], ["num_devices: 1 -> 2"]),
])
def test_changed_config_stops_and_touches_nothing(finished_run, argv, named, capsys):
    workdir, _ = finished_run
    before = _snapshot(workdir)
    base = ["--config.num_devices=1", "--config.lr_schedule=constant",
            "--config.eval.attacks=()", "--config.eval.corruptions=()",
            "--config.eval_every_epochs=0", "--config.num_epochs=1"]
    code = cli.main(["train", f"--workdir={workdir}", *base, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("anp-jax: error:"), err
    for text in named:
        assert text in err, err
    assert "nothing was changed" in err
    assert _snapshot(workdir) == before  # checkpoints, config.json, metrics.json: same bytes
    assert not any(name.startswith("checkpoints/corrupt") for name in before)


def test_fewer_epochs_are_refused(finished_run):
    workdir, _ = finished_run
    with pytest.raises(trainer.ResumeError, match="num_epochs"):
        trainer.train_and_evaluate(_config(num_epochs=0.5), workdir, **QUIET)


def test_allowed_changes_resume(finished_run, tmp_path):
    """Evaluation, logging and checkpoint settings may change, and num_epochs may grow
    when the schedules do not depend on it; the run resumes from its checkpoint."""
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run[0], workdir)
    logs = []
    metrics = trainer.train_and_evaluate(
        _config(epochs=2, log_every_steps=7, keep_checkpoints=2, checkpoint_every_steps=22),
        workdir, log=logs.append, progress=False)
    assert any("resumed from checkpoint at mini-batch 44" in m for m in logs), logs
    assert metrics["batches"] == 88 and metrics["steps"] == 2 * 88
    stored = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert stored["num_epochs"] == 2 and stored["log_every_steps"] == 7


@pytest.mark.parametrize("epochs, secs, saved", [(1.5, 0.0, [44, 66]), (2, 1e6, [88])])
def test_epoch_checkpoints_at_most_every_min_secs(data_dir, tmp_path, epochs, secs, saved):
    """Epoch checkpoints younger than checkpoint_min_secs are skipped; the end is saved,
    on an epoch boundary or not."""
    workdir = tmp_path / "run"
    config = _config(epochs=3, keep_checkpoints=5, checkpoint_min_secs=secs)
    with config.ignore_type():
        config.num_epochs = epochs
    trainer.train_and_evaluate(config, str(workdir), **QUIET)
    mngr = checkpoint.manager(str(workdir / "checkpoints"))
    assert sorted(mngr.all_steps()) == saved


def _state(layers, batch=32):
    model = create_model("digits_cnn")
    state = train.create_train_state(model, jax.random.PRNGKey(0), (batch, 8, 8, 1),
                                     train.make_optimizer("sgd"), noise.anp(), layers)
    devices = jax.local_devices()[:1]
    return jax_utils.replicate(state, devices), devices


def test_mismatched_checkpoint_is_an_error_not_corrupt(tmp_path):
    """A readable checkpoint of another state (other noise points) is never moved aside."""
    mngr = checkpoint.manager(str(tmp_path / "ckpt"))
    state, devices = _state(("input", "conv1"))
    checkpoint.save(mngr, state, {"batches": 0})
    before = sorted(os.listdir(tmp_path / "ckpt"))
    other, _ = _state(("input", "conv1", "conv2", "fc1"))
    logged = []
    with pytest.raises(checkpoint.CheckpointMismatchError, match="conv2"):
        checkpoint.restore_latest(mngr, other, devices, logged.append)
    assert sorted(os.listdir(tmp_path / "ckpt")) == before and not logged
    restored, loop = checkpoint.restore_latest(mngr, state, devices, logged.append)
    np.testing.assert_array_equal(restored.noise.injection["conv1"],
                                  state.noise.injection["conv1"])
    assert loop == {"batches": 0}


def test_fields_added_later_at_their_default_are_no_difference():
    old = {"seed": 0, "anp": {"k": 2}}
    defaults = {"seed": 0, "anp": {"k": 2, "new_rule": "none"}, "lr_decay_offset": 0}
    new = {"seed": 0, "anp": {"k": 2, "new_rule": "none"}, "lr_decay_offset": 0}
    assert trainer.config_differences(old, new, defaults) == []
    new["anp"]["new_rule"] = "scaled"
    assert trainer.config_differences(old, new, defaults) == [("anp.new_rule", None, "scaled")]
    assert trainer.config_differences(old, dict(new, seed=1), defaults)[-1] == ("seed", 0, 1)
