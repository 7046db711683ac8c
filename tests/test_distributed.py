"""pmap over 8 fake devices, two processes through jax.distributed, and checkpoints that
survive SIGKILL and corruption."""

import functools
import json
import os
import re
import shutil
import signal
import socket
import time

import jax
import numpy as np
import pytest
from conftest import run_cli, start_cli
from flax import jax_utils

from anp_jax import checkpoint, noise, train
from anp_jax.models import VGG

GLOBAL_BATCH = 16
LAYERS = ("input", "conv1", "conv2")


def _run_on(n_devices, batches):
    model = VGG(depth=11, dropout=0.0, width=0.25, axis_name="batch")
    tx = train.make_optimizer("sgd", momentum=0.9, weight_decay=5e-4)
    state = train.create_train_state(model, jax.random.PRNGKey(0),
                                     (GLOBAL_BATCH // n_devices, 8, 8, 3), tx,
                                     noise.anp(), LAYERS)
    devices = jax.local_devices()[:n_devices]
    state = jax_utils.replicate(state, devices)
    step = jax.pmap(functools.partial(train.train_step, axis_name="batch", static_k=2),
                    axis_name="batch", in_axes=(0, 0, None), devices=devices)
    hp = {"eps": np.float32(0.5), "alpha": np.float32(0.7), "k": np.int32(2),
          "lr": np.float32(0.01)}  # larger rates make this tiny VGG chaotic
    for batch in batches:
        sharded = jax.tree.map(lambda x: x.reshape((n_devices, -1) + x.shape[1:]), batch)
        state, metrics = step(state, sharded, hp)
    return state, metrics


def test_eight_devices_match_one_with_cross_replica_batchnorm():
    assert jax.local_device_count() == 8
    rng = np.random.default_rng(0)
    batches = [{"image": rng.uniform(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32),
                "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}
               for _ in range(3)]
    one, m1 = _run_on(1, batches)
    eight, m8 = _run_on(8, batches)
    # Float sums in another order: differences of ~1e-5 (the noise moves params ~1e-2).
    close = functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-4)
    jax.tree.map(lambda a, b: close(a[0], b[0]), one.params, eight.params)
    jax.tree.map(lambda a, b: close(a[0], b[0]), one.batch_stats, eight.batch_stats)
    # Each device holds the registers of its own examples: together, the global ones.
    # Normalised gradients amplify the rounding differences a little: compare directions.
    for name in LAYERS:
        a = np.asarray(one.noise.injection[name]).reshape(GLOBAL_BATCH, -1)
        b = np.asarray(eight.noise.injection[name]).reshape(GLOBAL_BATCH, -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        assert np.all(na > 0)
        np.testing.assert_allclose(nb, na, rtol=1e-2)
        assert np.min(np.sum(a * b, axis=1) / (na * nb)) > 0.999
    close(m1["loss"][0], m8["loss"][0])


FAST = ["--config.eval.attacks=('fgsm_linf_0.1',)",
        "--config.eval.corruptions=('gaussian_noise_1',)"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numbers(metrics):
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "config")}


def _train_rows(workdir):
    """The training rows of ``metrics.jsonl`` (learning curves), in order."""
    with open(workdir / "metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if "train_loss" in row]


def _losses(workdir):
    return [row["train_loss"] for row in _train_rows(workdir)]


def test_two_processes_match_one(data_dir, tmp_path):
    args = ["train", "--config.num_epochs=1", "--config.log_every_steps=1", *FAST]
    single = run_cli([*args, f"--workdir={tmp_path / 'single'}"], data_dir, devices=4)
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    workdir = tmp_path / "multi"
    procs = [start_cli([*args, f"--workdir={workdir}",
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}"], data_dir, devices=2) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a = json.loads((tmp_path / "single" / "metrics.json").read_text())
    b = json.loads((workdir / "metrics.json").read_text())
    assert a["num_devices"] == b["num_devices"] == 4 and b["num_processes"] == 2
    # The first updates agree to float32 round-off: each process read its half of every
    # batch and the gradients were averaged over both.
    la, lb = _losses(tmp_path / "single"), _losses(workdir)
    assert len(la) == len(lb) == 44
    np.testing.assert_allclose(lb[:2], la[:2], rtol=1e-5)
    # Later, ANP amplifies round-off (vanilla runs agree to 1e-7 over the epoch): runs
    # whose sums go in another order (one process with 8, 4, 2 or 1 devices; two with 4 or
    # 2) follow one of two trajectories that part from the fourth update on. Measured
    # between the two: final loss 1.6e-4 apart, clean accuracy 2 of 359 images.
    np.testing.assert_allclose(b["final_train_loss"], a["final_train_loss"], rtol=1e-2)
    assert abs(a["clean_accuracy"] - b["clean_accuracy"]) <= 0.02
    # Each process evaluated its own half of the test split; the counts were summed over
    # both processes, every example once.
    assert a["num_test_examples"] == b["num_test_examples"] == 359


EPOCHS = 2
RESUMABLE = ["train", f"--config.num_epochs={EPOCHS}", "--config.checkpoint_every_steps=8",
             *FAST]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli([*RESUMABLE, f"--workdir={workdir}"], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir, json.loads((workdir / "metrics.json").read_text())


def _finished_steps(workdir):
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) \
        if root.exists() else []


def test_sigkill_then_resume_matches_uninterrupted(reference_run, data_dir, tmp_path):
    workdir = tmp_path / "killed"
    proc = start_cli([*RESUMABLE, f"--workdir={workdir}"], data_dir)
    deadline = time.time() + 300
    while not _finished_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    steps = _finished_steps(workdir)
    assert steps and max(steps) < EPOCHS * 44, steps  # killed partway
    assert not (workdir / "metrics.json").exists()
    resumed = run_cli([*RESUMABLE, f"--workdir={workdir}"], data_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint" in resumed.stderr
    got = json.loads((workdir / "metrics.json").read_text())
    assert _numbers(got) == _numbers(reference_run[1])


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_then_resume_matches_uninterrupted(reference_run, data_dir, tmp_path,
                                                        signum, status):
    """SIGTERM/SIGINT mid-run: the step in flight finishes, a checkpoint of the mini-batches
    done is saved, one line says so, the exit status is 143/130; the rerun ends with the
    uninterrupted run's metrics, bit for bit."""
    workdir = tmp_path / "stopped"
    proc = start_cli([*RESUMABLE, f"--workdir={workdir}"], data_dir)
    deadline = time.time() + 300
    while not _finished_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere between checkpoints
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-2000:]
    lines = [line for line in err.splitlines() if "stopped by" in line]
    assert len(lines) == 1, err[-2000:]
    done = int(re.search(r"after mini-batch (\d+)", lines[0]).group(1))
    assert signal.Signals(signum).name in lines[0]
    assert done in _finished_steps(workdir) and done < EPOCHS * 44
    assert not (workdir / "metrics.json").exists()
    resumed = run_cli([*RESUMABLE, f"--workdir={workdir}"], data_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint at mini-batch {done}" in resumed.stderr
    got = json.loads((workdir / "metrics.json").read_text())
    assert _numbers(got) == _numbers(reference_run[1])
    steps = [r["step"] for r in _train_rows(workdir)]
    assert steps == sorted(set(steps))  # no row twice


def test_corrupt_newest_checkpoint_falls_back(reference_run, data_dir, tmp_path):
    workdir = tmp_path / "corrupt"
    shutil.copytree(reference_run[0], workdir)
    (workdir / "metrics.json").unlink()
    steps = _finished_steps(workdir)
    newest = workdir / "checkpoints" / str(steps[-1])
    for root, _, files in os.walk(newest / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    proc = run_cli([*RESUMABLE, f"--workdir={workdir}"], data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and str(newest) in lines[0]
    assert (workdir / "checkpoints" / f"corrupt-{steps[-1]}").exists()  # kept, set aside
    got = json.loads((workdir / "metrics.json").read_text())
    assert _numbers(got) == _numbers(reference_run[1])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    workdir = tmp_path / "nan"
    proc = run_cli(["train", f"--workdir={workdir}", "--config.learning_rate=100",
                    "--config.checkpoint_every_steps=1", *FAST], data_dir)
    assert proc.returncode == 1
    err = re.split(r"[\r\n]+", proc.stderr.strip())[-1]
    assert "non-finite" in err and err.startswith("anp-jax: error:")
    mngr = checkpoint.manager(str(workdir / "checkpoints"))
    assert mngr.all_steps(), "the good checkpoints before the divergence are kept"
    template = train.create_train_state(
        __import__("anp_jax.models", fromlist=["x"]).create_model("digits_cnn"),
        jax.random.PRNGKey(0), (32, 8, 8, 1), train.make_optimizer("sgd"), noise.anp(),
        ("input", "conv1", "conv2", "fc1"))
    devices = jax.local_devices()[:1]
    restored, _ = checkpoint.restore_latest(mngr, jax_utils.replicate(template, devices),
                                            devices)
    for leaf in jax.tree.leaves(restored.params):
        assert np.all(np.isfinite(leaf))
