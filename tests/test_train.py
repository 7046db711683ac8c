"""The ANP train step against independent computations of the same quantities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anp_jax import noise, train, trainer
from anp_jax.models import DigitsCNN

B = 6
LR = 0.1


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.uniform(size=(B, 8, 8, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, size=B), jnp.int32)}


def _manual_forward(params, x, noise_by_point, captured=None):
    """DigitsCNN written out with lax ops; adds noise at, and records, the named points."""
    captured = {} if captured is None else captured

    def at(name, z):
        captured[name] = z
        return z + noise_by_point.get(name, 0.0)

    def conv(h, p):
        out = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + p["bias"]

    h = at("input", x)
    h = jax.nn.relu(at("conv1", conv(h, params["Conv_0"])))
    h = jax.nn.relu(at("conv2", conv(h, params["Conv_1"])))
    b, hh, ww, c = h.shape
    h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4)).reshape(b, -1)
    h = jax.nn.relu(at("fc1", h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]))
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def _manual_loss(params, x, y, noise_by_point):
    logits = _manual_forward(params, x, noise_by_point)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _grad_at_point(params, batch, noise_by_point, point):
    """dloss/dz at ``point``: the gradient of the loss with respect to an offset there."""
    captured = {}
    _manual_forward(params, batch["image"], noise_by_point, captured)

    def loss_of_offset(delta):
        shifted = dict(noise_by_point)
        shifted[point] = noise_by_point.get(point, 0.0) + delta
        return _manual_loss(params, batch["image"], batch["label"], shifted)

    return jax.grad(loss_of_offset)(jnp.zeros_like(captured[point]))


def _normalise(g, norm):
    flat = g.reshape(g.shape[0], -1)
    n = jnp.linalg.norm(flat, axis=1) if norm == "l2" else jnp.max(jnp.abs(flat), axis=1)
    return g / n.reshape((-1,) + (1,) * (g.ndim - 1))


@pytest.fixture(scope="module")
def model():
    return DigitsCNN(width=8)


def _state(model, layers, norm="l2", momentum=0.0, weight_decay=0.0):
    tx = train.make_optimizer("sgd", momentum=momentum, weight_decay=weight_decay)
    return train.create_train_state(model, jax.random.PRNGKey(0), (B, 8, 8, 1), tx,
                                    noise.anp(norm=norm), layers)


_step = jax.jit(train.train_step)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("k", [1, 3])
def test_registers_equal_normalised_activation_gradients(model, norm, k):
    layers = ("input", "conv1", "fc1")
    eps, alpha = 0.7, 0.6
    state = _state(model, layers, norm)
    batch = _batch()
    new_state, _ = _step(state, batch, {"eps": eps, "alpha": alpha, "k": k, "lr": LR})

    # Independent: k progressive steps written out by hand (plain SGD, cut networks).
    params = state.params
    registers = {p: 0.0 for p in layers}
    for _ in range(k):
        noise_by_point = {p: eps / k * registers[p] for p in layers}
        grads = {p: _grad_at_point(params, batch, noise_by_point, p) for p in layers}
        param_grads = jax.grad(_manual_loss)(params, batch["image"], batch["label"],
                                             noise_by_point)
        params = jax.tree.map(lambda w, g: w - LR * g, params, param_grads)
        registers = {p: alpha * registers[p] + _normalise(grads[p], norm) for p in layers}

    got_registers = new_state.noise.transform[1].register
    for p in layers:
        np.testing.assert_allclose(got_registers[p], registers[p], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(new_state.noise.injection[p], eps / k * registers[p],
                                   rtol=2e-4, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 new_state.params, params)
    assert int(new_state.step) == k and int(new_state.batches) == 1


def test_eps_zero_equals_plain_training(model):
    """ANP with eps=0 makes the same updates as plain SGD written with optax directly."""
    batch = _batch(1)
    state = _state(model, ("input", "conv1", "conv2", "fc1"), momentum=0.9, weight_decay=5e-4)
    new_state, _ = _step(state, batch, {"eps": 0.0, "alpha": 0.5, "k": 2, "lr": LR})

    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(LR, momentum=0.9))
    params, opt_state = state.params, tx.init(state.params)

    def plain_loss(p):
        logits = model.apply({"params": p}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    for _ in range(2):
        updates, opt_state = tx.update(jax.grad(plain_loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_state.params, params)


def test_evaluation_ignores_noise(model):
    batch = _batch(2)
    state = _state(model, ("input", "conv1"))
    state, _ = _step(state, batch, {"eps": 5.0, "alpha": 1.0, "k": 2, "lr": LR})
    assert float(jnp.abs(state.noise.injection["input"]).max()) > 0
    logits = train.predict(state, batch["image"])
    expected = _manual_forward(state.params, batch["image"], {})
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_zero_gradients_give_zero_noise(model):
    state = _state(model, ("input", "conv1", "conv2", "fc1"))
    state = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
    new_state, metrics = _step(state, _batch(3), {"eps": 1.0, "alpha": 1.0, "k": 3, "lr": LR})
    for leaf in jax.tree.leaves(new_state.noise.injection):
        assert np.all(np.isfinite(leaf))
    # The first update only moves the last layer's bias, so every activation gradient
    # below it is exactly zero at the first progressive step; the input gradient stays
    # zero while the convolution kernels are zero.
    assert float(jnp.abs(new_state.noise.injection["input"]).max()) == 0.0
    assert np.isfinite(float(metrics["loss"]))
    zero = noise.anp().update({"z": jnp.zeros((2, 3))}, noise.anp().init(
        {"z": jnp.zeros((2, 3))}), eps=1.0, alpha=1.0, k=1)
    np.testing.assert_array_equal(zero[0]["z"], 0.0)


def test_k_changes_without_recompiling(model):
    state = _state(model, ("conv1",))
    traces = []

    def counted(*args):
        traces.append(1)
        return train.train_step(*args)

    step = jax.jit(counted)
    for k in (1, 2, 3):
        hp = {"eps": np.float32(0.5 * k), "alpha": np.float32(0.5), "k": np.int32(k),
              "lr": np.float32(LR)}
        state, _ = step(state, _batch(k), hp)
    assert int(state.step) == 6
    assert len(traces) == 1


def test_pmap_single_device_matches_jit(model):
    state = _state(model, ("input", "conv1"))
    batch = _batch(4)
    hp = {"eps": 0.5, "alpha": 0.5, "k": 2, "lr": LR}
    expected, _ = _step(state, batch, hp)
    p_step = jax.pmap(functools.partial(train.train_step, axis_name="batch"),
                      axis_name="batch", in_axes=(0, 0, None))
    rep = jax.tree.map(lambda x: x[None], state)
    got, _ = p_step(rep, jax.tree.map(lambda x: x[None], batch), hp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6),
                 got.params, expected.params)


def test_mixed_precision_registers_are_bf16_and_match_float32(model):
    """``dtype=bfloat16``: the noise (registers and injection) has the activations' bf16
    dtype and size, parameters and optimiser state stay float32, and the registers point
    the same way as the hand-written float32 computation's."""
    layers = ("input", "conv1", "fc1")
    bf16 = DigitsCNN(width=8, dtype=jnp.bfloat16)
    state = _state(bf16, layers)
    batch = _batch()
    new_state, metrics = _step(state, batch, {"eps": 0.7, "alpha": 0.6, "k": 1, "lr": LR})
    registers = new_state.noise.transform[1].register
    captured = {}
    _manual_forward(state.params, batch["image"], {}, captured)
    for p in layers:
        assert registers[p].dtype == jnp.bfloat16 == new_state.noise.injection[p].dtype
        assert registers[p].shape == captured[p].shape  # no larger than the activation
        expected = _normalise(_grad_at_point(state.params, batch, {}, p), "l2")
        got = np.asarray(registers[p], np.float32).reshape(B, -1)
        want = np.asarray(expected).reshape(B, -1)
        cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.99, (p, cos)
    for leaf in jax.tree.leaves((new_state.params, new_state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("k", [1, 2])
def test_noise_norm_is_that_of_the_last_injected_noise(model, k):
    """Registers reset per mini-batch: with k = 1 nothing is ever injected (ANP is plain
    training); with k = 2 the second pass carries (eps/2) * g/||g||_2 at each point, an L2
    norm of eps/2 per example and point."""
    layers = ("input", "conv1", "fc1")
    eps = 0.8
    _, metrics = _step(_state(model, layers), _batch(), {"eps": eps, "alpha": 0.5, "k": k,
                                                          "lr": LR})
    expected = 0.0 if k == 1 else len(layers) * eps / 2
    np.testing.assert_allclose(float(metrics["noise_norm"]), expected, rtol=1e-5, atol=1e-6)


def _config_step(model, layers, batch, hp, **anp_fields):
    """One train step (plain SGD) with the noise transform the trainer builds from
    ``config.anp`` updated with ``anp_fields``; returns the initial and the new state."""
    from anp_jax import trainer
    from anp_jax.configs import default

    config = default.get_config()
    config.anp.update(anp_fields)
    tx = train.make_optimizer("sgd", momentum=0.0, weight_decay=0.0)
    state = train.create_train_state(model, jax.random.PRNGKey(0), (B, 8, 8, 1), tx,
                                     trainer.build_noise_transform(config), layers)
    return state, _step(state, batch, hp)[0]


def _hand_anp(params, batch, layers, eps, alpha, k, sum_input_grad=False, relative=False):
    """The k progressive steps by hand (plain SGD, cut networks): the parameters after
    them and the noise of the next forward pass.  ``sum_input_grad``: the input's gradient
    is the sum over the steps so far (the official code's .grad); ``relative``: the noise
    times the per-example L2 norm of the activation at the point in the pass that gave
    the gradient."""
    registers = {p: 0.0 for p in layers}
    noise_by_point = {p: 0.0 for p in layers}
    input_grad = 0.0
    for _ in range(k):
        captured = {}
        _manual_forward(params, batch["image"], noise_by_point, captured)
        grads = {p: _grad_at_point(params, batch, noise_by_point, p) for p in layers}
        param_grads = jax.grad(_manual_loss)(params, batch["image"], batch["label"],
                                             noise_by_point)
        params = jax.tree.map(lambda w, g: w - LR * g, params, param_grads)
        if sum_input_grad:
            input_grad = input_grad + grads["input"]
            grads["input"] = input_grad
        registers = {p: alpha * registers[p] + _normalise(grads[p], "l2") for p in layers}
        noise_by_point = {p: eps / k * registers[p] for p in layers}
        if relative:
            for p in layers:
                norm = jnp.linalg.norm(captured[p].reshape(B, -1), axis=1)
                noise_by_point[p] = noise_by_point[p] * norm.reshape(
                    (B,) + (1,) * (captured[p].ndim - 1))
    return params, noise_by_point


def test_accumulated_input_gradient_follows_the_official_code(model):
    """``anp.accumulate_input_grad``: over k = 3 progressive steps the input's register is
    built from g1, g1+g2, g1+g2+g3 (the official code never zeroes the input's ``.grad``),
    a hidden point's from the current step's gradient."""
    layers = ("input", "conv1", "fc1")
    hp = {"eps": 0.7, "alpha": 0.6, "k": 3, "lr": LR}
    batch = _batch(5)
    state, new_state = _config_step(model, layers, batch, hp, accumulate_input_grad=True)
    params, injection = _hand_anp(state.params, batch, layers, 0.7, 0.6, 3,
                                  sum_input_grad=True)
    for p in layers:
        np.testing.assert_allclose(new_state.noise.injection[p], injection[p],
                                   rtol=2e-4, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 new_state.params, params)


def test_noise_scaled_by_activation_norm(model):
    """``anp.scale_by_activation_norm``: the injection at a point is the official one times
    the per-example L2 norm of the activation there (before the point's own noise), taken
    in the forward pass that gave the gradient."""
    layers = ("input", "conv2", "fc1")
    hp = {"eps": 0.3, "alpha": 0.5, "k": 2, "lr": LR}
    batch = _batch(6)
    state, new_state = _config_step(model, layers, batch, hp, scale_by_activation_norm=True)
    _, injection = _hand_anp(state.params, batch, layers, 0.3, 0.5, 2, relative=True)
    for p in layers:
        np.testing.assert_allclose(new_state.noise.injection[p], injection[p],
                                   rtol=2e-4, atol=2e-5)
    from anp_jax import trainer
    from anp_jax.configs import default

    config = default.get_config()
    config.anp.update({"scale_by_activation_norm": True, "init": "gaussian"})
    with pytest.raises(trainer.ConfigError, match="anp.init"):
        trainer.build_noise_transform(config)


@pytest.mark.parametrize("offset", [0, 1])
def test_step_learning_rate_drops_like_torch_steplr(offset):
    """The official CIFAR-10 config steps PyTorch's StepLR(step_size=30, gamma=0.1) at the
    start of every epoch: during (0-indexed) epoch e the rate is 0.05 * 0.1 ** ((e + 1) //
    30), so it drops at epochs 29, 59 and 89, and (its 120th step) once more for the last
    epoch, 119; offset 0 is the plain "every 30 epochs"."""
    from anp_jax import trainer
    from anp_jax.configs import cifar10

    config = cifar10.get_config()
    assert config.lr_decay_offset == 1  # the official recipe
    config.lr_decay_offset = offset
    lr = trainer.make_schedules(config)["lr"]
    for epoch in range(120):
        want = 0.05 * 0.1 ** ((epoch + offset) // 30)
        for frac in (0.0, 0.5, 0.999):  # constant within the epoch
            np.testing.assert_allclose(float(lr(epoch + frac)), want, rtol=1e-6)
    drops = [e for e in range(1, 120) if float(lr(e)) < float(lr(e - 1))]
    assert drops == ([29, 59, 89, 119] if offset else [30, 60, 90])


@pytest.mark.parametrize("peak", [1.0, 0.3])
def test_official_schedule_stretched_with_its_peak(peak):
    """``anp.schedule="official"`` over 12 epochs: the authors' 120-epoch table (clean, then
    eps 0.3 / 1.0 / 0.3 with alpha 0.7 / 1.0 / 0.7 and k 3, then clean, changing at epochs
    40, 60, 80, 100) a tenth as long, its eps column times ``anp.epsilon``; the replay
    control reads only its k column, and vanilla none."""
    from anp_jax import trainer
    from anp_jax.configs import default

    config = default.get_config()
    config.num_epochs, config.method = 12, "anp"
    config.anp.update({"schedule": "official", "epsilon": peak, "alpha": 0.2, "k": 5})
    table = [(0.0, 0.0, 0.0, 1), (3.99, 0.0, 0.0, 1), (4.0, 0.3, 0.7, 3), (5.5, 0.3, 0.7, 3),
             (6.0, 1.0, 1.0, 3), (7.9, 1.0, 1.0, 3), (8.0, 0.3, 0.7, 3), (10.0, 0.0, 0.0, 1),
             (11.99, 0.0, 0.0, 1)]
    for method in ("anp", "replay", "vanilla"):
        config.method = method
        got = trainer.make_schedules(config)
        for epoch, eps, alpha, k in table:
            noisy = method == "anp"
            np.testing.assert_allclose(float(got["eps"](epoch)), peak * eps * noisy, rtol=1e-6)
            np.testing.assert_allclose(float(got["alpha"](epoch)), alpha * noisy, rtol=1e-6)
            assert int(got["k"](epoch)) == (1 if method == "vanilla" else k), (method, epoch)


def test_without_next_noise_the_updates_are_the_same_and_the_last_noise_is_kept(model):
    """``next_noise=False`` (the trainer's step): the same parameters and metrics as the full
    step over k = 3 unrolled updates, and ``state.noise`` is the noise of the third forward
    pass, written out by hand: eps/k * (alpha * n1 + n2) with n_i the normalised gradients
    of the first two passes."""
    layers = ("input", "conv1", "fc1")
    eps, alpha, k = 0.7, 0.6, 3
    hp = {"eps": eps, "alpha": alpha, "k": k, "lr": LR}
    batch = _batch(3)
    state = _state(model, layers)
    full = jax.jit(functools.partial(train.train_step, static_k=k))
    lean = jax.jit(functools.partial(train.train_step, static_k=k, next_noise=False))
    want_state, want_metrics = full(state, batch, hp)
    got_state, got_metrics = lean(state, batch, hp)
    jax.tree.map(np.testing.assert_array_equal, got_state.params, want_state.params)
    jax.tree.map(np.testing.assert_array_equal, got_metrics, want_metrics)

    params, registers = state.params, {p: 0.0 for p in layers}
    for _ in range(k - 1):
        noise_by_point = {p: eps / k * registers[p] for p in layers}
        grads = {p: _grad_at_point(params, batch, noise_by_point, p) for p in layers}
        param_grads = jax.grad(_manual_loss)(params, batch["image"], batch["label"],
                                             noise_by_point)
        params = jax.tree.map(lambda w, g: w - LR * g, params, param_grads)
        registers = {p: alpha * registers[p] + _normalise(grads[p], "l2") for p in layers}
    for p in layers:
        np.testing.assert_allclose(got_state.noise.injection[p], eps / k * registers[p],
                                   rtol=2e-4, atol=2e-5)


def test_report_warns_when_the_model_ended_at_chance():
    """A collapsed run (the model predicts one class) says so under its metrics; a trained
    one, or metrics of an older run without ``num_classes``, does not."""
    base = {"adversarial": {}, "corruption": {}, "robust_accuracy": {}, "steps": 10,
            "train_seconds": 1.0, "num_devices": 1, "final_train_loss": 2.3026}
    collapsed = trainer.format_report({**base, "clean_accuracy": 0.1, "num_classes": 10})
    assert collapsed.splitlines()[-1].startswith(
        "warning: the model ended at chance (10 classes; ln 10 = 2.3026)")
    assert "warning" not in trainer.format_report(
        {**base, "clean_accuracy": 0.83, "num_classes": 10})
    assert "warning" not in trainer.format_report({**base, "clean_accuracy": 0.1})
