"""The step-time benchmark runs end to end and its JSON is complete and consistent."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from anp_jax.models import PERTURBATIONS, create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RATIO_KEYS = ("anp_k1", "anp_k3", "replay_k3", "pgd_at", "trades", "fast_at", "free_at")
BATCH = 16


def _perturbation_bytes(dtype):
    """Bytes of every perturbation point of the digits CNN at BATCH, from the model's
    ``perturbations`` collection (abstract evaluation, nothing computed)."""
    model = create_model("digits_cnn", dtype=dtype)
    key = jax.random.PRNGKey(0)
    x = jax.ShapeDtypeStruct((BATCH, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               {"params": key, "dropout": key}, x)
    return {name: (tuple(s.shape), math.prod(s.shape) * jnp.dtype(s.dtype).itemsize)
            for name, s in variables[PERTURBATIONS].items()}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step_time.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    # Unoptimised XLA code compiles some 3x faster; the test checks the report, not speed.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_time", "--iters", "1", "--repeats", "2",
         "--warmup", "0", "--batch", str(BATCH), "--json", str(out), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratios" in proc.stdout and "anp_k1" in proc.stdout
    with open(out) as f:
        return json.load(f)


def test_json_has_every_ratio(result):
    assert set(RATIO_KEYS) <= set(result["ratios"])
    for key in RATIO_KEYS:
        value = result["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for field in ("device", "model", "batch", "date", "per_update_ms", "images_per_second",
                  "memory", "registers"):
        assert field in result, field
    assert result["model"] == "digits_cnn" and result["batch"] == BATCH
    methods = ("plain",) + RATIO_KEYS
    for name in methods:
        assert result["per_update_ms"][name] > 0
        assert result["images_per_second"][name] > 0
        assert result["memory"][name]["peak_bytes"] > 0
        assert result["params_finite"][name] == 1.0
    assert result["methods"]["anp_k3"]["k"] == 3 and result["methods"]["replay_k3"]["k"] == 3
    assert result["device"]["host_cores"] >= 1


def test_register_sizes_match_the_activations(result):
    reg = result["registers"]
    f32 = _perturbation_bytes(jnp.float32)
    bf16 = _perturbation_bytes(jnp.bfloat16)
    total32 = sum(b for _, b in f32.values())
    assert reg["dtype"] == "float32"
    assert set(reg["points"]) == set(f32)
    for name, (shape, nbytes) in f32.items():
        assert tuple(reg["points"][name]["shape"]) == shape
        assert reg["points"][name]["bytes"] == nbytes
    assert reg["register_bytes"] == total32 == reg["measured_register_bytes"]
    assert reg["perturbed_activation_bytes"] == total32
    assert reg["register_fraction_of_activations"] == pytest.approx(1.0)
    # The noise state holds the registers and the injection of the next forward pass.
    assert reg["noise_state_bytes"] == 2 * total32
    assert reg["by_dtype"]["float32"]["register_bytes"] == total32
    assert reg["by_dtype"]["bfloat16"]["register_bytes"] == sum(b for _, b in bf16.values())
    assert reg["by_dtype"]["bfloat16"]["register_bytes"] * 2 == total32
    assert 0 < reg["register_fraction_of_anp_k1_peak"] < 1


def test_torch_comparison_is_skipped_without_torch(monkeypatch):
    from benchmarks import step_time

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    messages = []
    args = step_time.parse_args(["--torch"])
    runners, info = step_time._torch_runners(args, messages.append)
    assert runners == {} and "skipped" in info
    assert any("not installed" in m for m in messages)


def test_torch_anp_registers_and_timing():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_anp

    trainer = torch_anp.Trainer("digits_cnn", batch=4, k=2, anp=True, eps=1.0, alpha=0.0,
                                device="cpu")
    loss = trainer.train_batch(trainer.x, trainer.y)
    assert math.isfinite(float(loss))
    model = trainer.model
    for name in model.points:
        r = getattr(model, f"r_{name}")
        assert r is not None and r.shape[0] == 4
        # alpha = 0: the register is the last normalised gradient, norm 1 per example.
        norms = r.flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4), name
    assert torch_anp.time_per_update("digits_cnn", batch=4, k=1, iters=1, repeats=1,
                                     warmup=1) > 0


def test_proposed_step_makes_the_same_updates():
    """The --diagnose prototype changes what is computed, never the parameter updates."""
    from anp_jax import noise, train
    from benchmarks import step_time

    batch = step_time.synthetic_batch("digits_cnn", 8)
    hp = {"eps": jnp.float32(1.0), "alpha": jnp.float32(0.5), "k": jnp.int32(2),
          "lr": jnp.float32(0.05)}
    make = step_time._state_factory("digits_cnn", "float32", (8, 8, 8, 1), True, noise.anp)
    ref, ref_metrics = jax.jit(functools.partial(train.train_step, static_k=2))(
        make(jax.random.PRNGKey(0)), batch, hp)
    new, new_metrics = jax.jit(functools.partial(step_time.proposed_train_step, static_k=2))(
        make(jax.random.PRNGKey(0)), batch, hp)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(new.params)):
        assert jnp.array_equal(a, b)
    assert float(ref_metrics["loss"]) == float(new_metrics["loss"])
    assert int(new.step) == 2 and int(new.batches) == 1
