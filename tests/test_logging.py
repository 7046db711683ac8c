"""Learning curves: metrics.jsonl rows and TensorBoard event files, checked against the
schedules' formulas, a hand-written evaluation and each other; no rows duplicated on resume."""

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils

from anp_jax import checkpoint, data, noise, trainer
from anp_jax.configs.default import get_config
from anp_jax.models import create_model
from anp_jax.train import create_train_state, make_optimizer, predict

PER_EPOCH = 44  # 1,438 digits / batch 32
CURVE = 64


def _config(epochs):
    c = get_config()
    c.num_epochs, c.num_devices = epochs, 1
    # The rate halves every epoch: an independent formula, and num_epochs may grow.
    c.lr_schedule, c.lr_decay_epochs, c.lr_decay_factor = "step", 1, 0.5
    c.log_every_steps, c.eval_every_epochs = 10, 1
    c.eval.attacks, c.eval.corruptions, c.eval.curve_examples = (), (), CURVE
    c.eval.curve_attack = "fgsm_linf_0.1"  # quick to compile
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("curves") / "run")
    metrics = trainer.train_and_evaluate(_config(2), workdir, log=lambda m: None,
                                         progress=False)
    return workdir, metrics, _rows(workdir)


def test_train_rows(run):
    _, metrics, rows = run
    train_rows = [r for r in rows if "train_loss" in r]
    # Every 10 mini-batches and at the end of each epoch.
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 44, 50, 60, 70, 80, 88]
    for row in train_rows:
        assert set(trainer.TRAIN_COLUMNS) <= set(row)
        batch = row["step"] - 1  # the hyper-parameters of the last mini-batch of the row
        assert row["epoch"] == row["step"] / PER_EPOCH
        np.testing.assert_allclose(row["lr"], 0.05 * 0.5 ** (batch // PER_EPOCH), rtol=1e-6)
        assert (row["eps"], row["alpha"], row["k"]) == (1.0, 0.5, 2)
        # k = 2, registers reset per mini-batch: the second pass carries eps/2 at each of
        # the 4 points (input, conv1, conv2, fc1).
        np.testing.assert_allclose(row["noise_norm"], 4 * 1.0 / 2, rtol=1e-5)
        assert 0.0 <= row["train_accuracy"] <= 1.0 and math.isfinite(row["train_loss"])
    # The rows of the last epoch, weighted by their mini-batches, average to the epoch's loss.
    last = [r for r in train_rows if r["step"] > PER_EPOCH]
    counts = np.diff([PER_EPOCH] + [r["step"] for r in last])
    np.testing.assert_allclose(sum(c * r["train_loss"] for c, r in zip(counts, last))
                               / PER_EPOCH, metrics["final_train_loss"], rtol=1e-6)


def test_eval_rows_match_a_hand_written_evaluation(run):
    workdir, _, rows = run
    eval_rows = [r for r in rows if "eval_clean_accuracy" in r]
    assert [r["step"] for r in eval_rows] == [44, 88]
    for row in eval_rows:
        assert 0.0 <= row["eval_robust_accuracy"] <= row["eval_clean_accuracy"] <= 1.0
    # The final parameters on the first 64 test images, evaluated here by hand.
    model = create_model("digits_cnn", num_classes=10)
    layers = ("input", "conv1", "conv2", "fc1")
    template = create_train_state(model, jax.random.PRNGKey(0), (32, 8, 8, 1),
                                  make_optimizer("sgd"), noise.anp(), layers)
    devices = jax.local_devices()[:1]
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    state, _ = checkpoint.restore_latest(mngr, jax_utils.replicate(template, devices), devices)
    state = jax.tree.map(checkpoint.first_replica, state)
    images, labels = data.load_split("digits", "test")
    logits = predict(state, jnp.asarray(data.to_float(images[:CURVE])))
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[:CURVE]))
    assert eval_rows[-1]["eval_clean_accuracy"] == expected


def test_event_files_hold_the_same_scalars(run):
    workdir, _, rows = run
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    files = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert files
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert set(trainer.LOG_COLUMNS) - {"step"} <= tags, tags
    for tag in ("train_loss", "lr", "eval_clean_accuracy"):
        events = acc.Tensors(tag)
        want = [(r["step"], r[tag]) for r in rows if tag in r]
        got = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events]
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


def test_resume_does_not_duplicate_rows(run, tmp_path):
    """Rows after the newest checkpoint (written by a run that died before its next
    checkpoint) are dropped on resume and written again once."""
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 100, "epoch": 100 / PER_EPOCH, "train_loss": -1.0}) + "\n")
    trainer.train_and_evaluate(_config(3), workdir, log=lambda m: None, progress=False)
    rows = _rows(workdir)
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert train_steps == [10, 20, 30, 40, 44, 50, 60, 70, 80, 88,
                           90, 100, 110, 120, 130, 132]
    assert all(r["train_loss"] > 0 for r in rows if "train_loss" in r)
    assert [r["step"] for r in rows if "eval_clean_accuracy" in r] == [44, 88, 132]
    assert rows[:len(run[2])] == run[2]  # the first run's rows, unchanged
