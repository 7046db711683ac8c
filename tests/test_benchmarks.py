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
from procs import ROOT, with_repo_on_path

from anp_jax.models import PERTURBATIONS, create_model

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RATIO_KEYS = ("anp_k1", "anp_k3", "replay_k3", "pgd_at", "trades", "fast_at", "free_at",
              "anp_k2", "replay_k2", "input_floor", "anp_k2_no_input")
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
    env = with_repo_on_path(dict(os.environ))
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
    assert result["methods"]["anp_k2"]["k"] == 2 and result["methods"]["replay_k2"]["k"] == 2
    assert result["methods"]["input_floor"]["k"] == 1
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


def test_method_points_and_floor_state():
    """Which points each method perturbs; the floor's step is plain training plus the
    input gradient, which it hands back as the noise of the input point."""
    from anp_jax import train
    from benchmarks import step_time

    points = ("input", "conv1", "conv2", "fc1")
    by_name = {m.name: m for m in step_time.methods(diagnose=True)}
    assert step_time._layers(by_name["plain"], points) == ()
    assert step_time._layers(by_name["replay_k2"], points) == ()
    assert step_time._layers(by_name["anp_k2"], points) == points
    assert step_time._layers(by_name["input_floor"], points) == ("input",)
    assert step_time._layers(by_name["anp_k2_no_input"], points) == points[1:]
    assert step_time._layers(by_name["anp_k2_deep"], points) == points[2:]

    batch = step_time.synthetic_batch("digits_cnn", 4)
    runner = step_time.JaxRunner(by_name["input_floor"], "digits_cnn", "float32", batch,
                                 unroll=True)
    runner.compile()
    before = runner.state
    params = before.params  # read before the donating call
    ref = jax.tree.map(lambda x: x.copy(), params)

    def loss(p, images):
        logits = before.apply_fn({"params": p}, images, train=True)
        return train.cross_entropy(logits, batch["label"])

    grad_params, grad_input = jax.grad(loss, argnums=(0, 1))(ref, batch["image"])
    runner.run(1)
    got = runner.state.noise.injection["input"]
    assert jnp.allclose(got, grad_input, rtol=1e-4, atol=1e-7)
    # The parameters moved as plain SGD with momentum and weight decay on a zero
    # momentum buffer would move them: -lr * (g + wd * w).
    moved = jax.tree.map(lambda w, g: w - step_time.LEARNING_RATE * (g + 5e-4 * w), ref,
                         grad_params)
    for a, b in zip(jax.tree.leaves(runner.state.params), jax.tree.leaves(moved)):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_study_vgg_is_picked_by_name(monkeypatch):
    from benchmarks import step_time

    monkeypatch.delitem(step_time.MODELS, step_time.STUDY_VGG, raising=False)
    spec = step_time.model_specs()["fmnist_vgg"]
    assert spec.model == "vgg11" and spec.image_shape == (28, 28, 1)
    monkeypatch.setitem(step_time.MODELS, step_time.STUDY_VGG, step_time.MODELS["vgg11"])
    spec = step_time.model_specs()["fmnist_vgg"]
    assert spec.model == step_time.STUDY_VGG and spec.image_shape == (28, 28, 1)
    assert spec.options == ()


def test_trainer_comparison_is_the_difference_of_two_runs(monkeypatch):
    """A loop that costs 1.5 s of start-up plus 4 ms per update, against a bare step of
    2 ms per update: 4 ms per update in the loop, 2x the bare step."""
    from anp_jax import trainer
    from benchmarks import step_time

    calls = []

    def fake_train(config, workdir, log=None, progress=True):
        steps = int(round(config.num_epochs * 45)) * 2
        calls.append((config.num_epochs, workdir))
        return {"train_seconds": 1.5 + 0.004 * steps, "steps": steps}

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_train)
    monkeypatch.setattr(step_time, "_bare_step_runner", lambda config: (lambda n: 0.002, 2))
    t = step_time.trainer_comparison((1, 3), lambda m: None)
    assert [c[0] for c in calls] == [1, 3, 1]
    assert len({c[1] for c in calls}) == 3  # a fresh work directory for every run
    assert t["trainer_ms_per_update"] == pytest.approx(4.0)
    assert t["bare_step_ms_per_update"] == pytest.approx(2.0)
    assert t["trainer_over_bare"] == pytest.approx(2.0)
    assert [r["steps"] for r in t["runs"]] == [90, 270, 90]


def test_results_markdown_block_is_replaced(tmp_path):
    from benchmarks import step_time

    path = tmp_path / "RESULTS.md"
    path.write_text("# Title\n\nkept above\n")
    step_time.write_markdown(str(path), f"{step_time.MD_BEGIN}\nfirst\n{step_time.MD_END}")
    assert path.read_text() == (f"# Title\n\nkept above\n{step_time.MD_BEGIN}\nfirst\n"
                                f"{step_time.MD_END}\n")
    path.write_text(path.read_text() + "kept below\n")
    step_time.write_markdown(str(path), f"{step_time.MD_BEGIN}\nsecond\n{step_time.MD_END}")
    assert path.read_text() == (f"# Title\n\nkept above\n{step_time.MD_BEGIN}\nsecond\n"
                                f"{step_time.MD_END}\nkept below\n")


def test_suite_times_each_model_in_a_process_of_its_own(monkeypatch):
    from benchmarks import step_time

    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.chdir(os.path.dirname(ROOT))  # the suite finds the benchmarks itself
    args = step_time.parse_args(["--suite", "cpu", "--models", "digits_cnn", "--methods",
                                 "anp_k2", "--iters", "1", "--repeats", "1", "--warmup", "0"])
    suite = step_time.run_suite(args, lambda message: None, "step_time --suite cpu")
    assert suite["isolated"] and [r["model"] for r in suite["models"]] == ["digits_cnn"]
    model = suite["models"][0]
    assert model["process"] != os.getpid()
    assert model["ratios"]["anp_k2"] > 0 and model["per_update_ms"]["plain"] > 0
    assert "**digits_cnn**" in step_time.markdown(suite)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--suite", "cpu", "--models", "no_such_model"])
