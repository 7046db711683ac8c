"""Adversarial training (PGD-AT, TRADES, Fast-AT, Free-AT) and its combination with ANP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anp_jax import adversarial, noise, train
from anp_jax.adversarial import Adversary
from anp_jax.models import DigitsCNN

B = 8
EPS = 0.1
HP = {"eps": np.float32(1.0), "alpha": np.float32(0.5), "k": np.int32(2),
      "lr": np.float32(0.1)}


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(size=(B, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, B), jnp.int32)}
    model = DigitsCNN(width=8)
    tx = train.make_optimizer("sgd", momentum=0.0, weight_decay=0.0)
    plain = train.create_train_state(model, jax.random.PRNGKey(0), (B, 8, 8, 1), tx)
    anp = train.create_train_state(model, jax.random.PRNGKey(0), (B, 8, 8, 1), tx,
                                   noise.anp(), ("input", "conv1"))
    return model, batch, plain, anp


def _ce(model, params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y).mean()


@pytest.mark.parametrize("kind", ["pgd", "fast", "trades"])
def test_attack_inputs_stay_in_budget_and_raise_the_loss(setup, kind):
    model, batch, state, _ = setup
    adv = Adversary(kind, EPS, EPS / 4, steps=5)
    fn = functools.partial(model.apply, {"params": state.params})
    x_adv = jax.jit(lambda r: adversarial.adversarial_inputs(
        adv, fn, batch["image"], batch["label"], jnp.zeros_like(batch["image"]), r,
        unroll=True))(jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(x_adv - batch["image"]))) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if kind == "trades":
        kl = adversarial.kl_divergence(fn(batch["image"]), fn(x_adv))
        assert float(kl.mean()) > 1e-6
    else:
        assert _ce(model, state.params, x_adv, batch["label"]) > \
            _ce(model, state.params, batch["image"], batch["label"])


@pytest.mark.parametrize("kind", ["pgd", "fast", "trades"])
def test_l2_attack_inputs_stay_in_the_l2_ball_and_raise_the_loss(setup, kind):
    model, batch, state, _ = setup
    eps = 0.5
    adv = Adversary(kind, eps, eps / 4, steps=5, norm="l2")
    fn = functools.partial(model.apply, {"params": state.params})
    x = batch["image"]
    x_adv = jax.jit(lambda r: adversarial.adversarial_inputs(
        adv, fn, x, batch["label"], jnp.zeros_like(x), r, unroll=True))(jax.random.PRNGKey(1))
    norms = np.sqrt(np.sum(np.square(np.asarray(x_adv - x)), axis=(1, 2, 3)))
    assert norms.max() <= eps + 1e-5
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0.1  # not an L-inf 0.1 attack
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if kind == "trades":
        assert float(adversarial.kl_divergence(fn(x), fn(x_adv)).mean()) > 1e-6
    else:
        assert _ce(model, state.params, x_adv, batch["label"]) > \
            _ce(model, state.params, x, batch["label"])


def test_l2_pgd_on_a_linear_model_reaches_the_closed_form_worst_case():
    """Two classes, logits ``x W``: the cross-entropy's input gradient points along
    ``w_other - w_label`` everywhere, so the worst L2 perturbation of norm eps (far from the
    box's faces) is ``eps (w_other - w_label) / ||w_other - w_label||``."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
    x = jnp.full((4, 8, 8, 1), 0.5, jnp.float32)
    y = jnp.asarray([0, 1, 0, 1], jnp.int32)
    eps = 0.3
    adv = Adversary("pgd", eps, eps / 2, steps=40, norm="l2")
    x_adv = adversarial.adversarial_inputs(adv, lambda z: z.reshape(4, -1) @ w, x, y,
                                           jnp.zeros_like(x), jax.random.PRNGKey(0), True)
    d = np.asarray(w[:, 1] - w[:, 0])
    for i, label in enumerate([0, 1, 0, 1]):
        direction = d if label == 0 else -d
        want = 0.5 + eps * direction / np.linalg.norm(direction)
        np.testing.assert_allclose(np.asarray(x_adv[i]).reshape(-1), want, atol=1e-4)


def test_free_at_l2_delta_is_the_normalised_gradient(setup):
    model, batch, state, _ = setup
    eps = 0.5
    step = jax.jit(functools.partial(train.train_step, static_k=1,
                                     adversary=Adversary("free", eps, eps, norm="l2")))
    new, _ = step(state, batch, dict(HP, k=np.int32(1)))
    g = np.asarray(jax.grad(lambda x: _ce(model, state.params, x, batch["label"]))(
        batch["image"]))
    want = eps * g / np.sqrt(np.sum(g ** 2, axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(np.asarray(new.adv_delta), want, rtol=1e-4, atol=1e-6)


def test_free_at_delta_follows_the_input_gradient(setup):
    """First replay: delta = eps * sign(dloss/dx) at the clean batch (delta starts at 0)."""
    model, batch, state, _ = setup
    step = jax.jit(functools.partial(train.train_step, static_k=1,
                                     adversary=Adversary("free", EPS, EPS)))
    new, _ = step(state, batch, dict(HP, k=np.int32(1)))
    g = jax.grad(lambda x: _ce(model, state.params, x, batch["label"]))(batch["image"])
    np.testing.assert_array_equal(new.adv_delta, EPS * np.sign(g))


def test_trades_with_beta_zero_is_plain_training(setup):
    model, batch, state, _ = setup
    step = jax.jit(functools.partial(train.train_step, static_k=1,
                                     adversary=Adversary("trades", EPS, EPS / 4, 3, beta=0.0)))
    new, _ = step(state, batch, dict(HP, k=np.int32(1)))
    grads = jax.grad(lambda p: _ce(model, p, batch["image"], batch["label"]))(state.params)
    expected = jax.tree.map(lambda p, g: p - HP["lr"] * g, state.params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new.params, expected)


@pytest.mark.parametrize("kind", ["pgd", "trades", "fast", "free"])
def test_every_method_alone_and_with_anp(setup, kind):
    _, batch, plain, anp = setup
    adv = Adversary(kind, EPS, EPS / 4, steps=2)
    step = jax.jit(functools.partial(train.train_step, static_k=2, adversary=adv))
    alone, m1 = step(plain, batch, HP)
    combined, m2 = step(anp, batch, HP)
    assert np.isfinite(float(m1["loss"])) and np.isfinite(float(m2["loss"]))
    assert int(alone.step) == 2 and int(combined.step) == 2
    # ANP's registers are filled on top of the adversary, and change the updates.
    assert float(jnp.abs(combined.noise.injection["conv1"]).max()) > 0
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                            alone.params, combined.params)))
    assert diff > 1e-6


@pytest.mark.parametrize("method", ["anp_free_at", "anp_trades"])
def test_combined_methods_train_under_pmap_and_resume_exactly(method, data_dir, tmp_path):
    """The trainer runs ANP + adversarial training on 2 devices and checkpoints the whole
    state (Free-AT's perturbation and the noise registers included): one epoch, then a
    second one resumed from the checkpoint, ends exactly where two epochs in one go end."""
    from anp_jax import trainer
    from anp_jax.configs.default import get_config

    def config(epochs):
        c = get_config()
        c.method, c.num_epochs, c.num_devices = method, epochs, 2
        c.batch_size, c.lr_schedule, c.adv.steps, c.adv.replays = 128, "constant", 2, 2
        c.eval.attacks, c.eval.corruptions = (), ()
        return c

    quiet = dict(log=lambda m: None, progress=False)
    whole = trainer.train_and_evaluate(config(2), str(tmp_path / "whole"), **quiet)
    trainer.train_and_evaluate(config(1), str(tmp_path / "split"), **quiet)
    resumed = trainer.train_and_evaluate(config(2), str(tmp_path / "split"), **quiet)
    # 2 updates per mini-batch: Free-AT's 2 replays (ANP's noise rides on them), or k = 2.
    assert whole["steps"] == resumed["steps"] == 2 * whole["batches"] == 2 * 2 * 11
    for key in ("clean_accuracy", "test_loss", "final_train_loss"):
        assert resumed[key] == whole[key], key
    assert np.isfinite(whole["final_train_loss"]) and whole["clean_accuracy"] > 0.3


@pytest.mark.parametrize("at,kind", [("pgd_at", "pgd"), ("trades", "trades"),
                                     ("fast_at", "fast")])
def test_at_replay_is_the_combination_without_its_noise(at, kind):
    """``replay_<at>``, the control of ``anp_<at>``: the same adversary and the same number
    of updates per mini-batch (the official schedule stretched over 4 epochs: 1 in the
    clean first third and last sixth, 3 between), no noise at any point."""
    from anp_jax import trainer
    from anp_jax.configs.default import get_config

    def build(method):
        c = get_config()
        c.method, c.num_epochs, c.anp.schedule = method, 4, "official"
        return (trainer.make_schedules(c), trainer.make_adversary(c),
                trainer.selected_layers(c, ("input", "conv1", "conv2", "fc1")))

    rep, rep_adv, rep_layers = build(f"replay_{at}")
    comb, comb_adv, comb_layers = build(f"anp_{at}")
    alone, alone_adv, _ = build(at)
    assert rep_adv == comb_adv == alone_adv and rep_adv.kind == kind
    assert rep_layers == () and len(comb_layers) == 4
    for epoch, k in [(0.0, 1), (1.2, 1), (1.5, 3), (2.5, 3), (3.2, 3), (3.5, 1)]:
        assert int(rep["k"](epoch)) == int(comb["k"](epoch)) == k, epoch
        assert float(rep["eps"](epoch)) == float(rep["alpha"](epoch)) == 0.0
        assert int(alone["k"](epoch)) == 1
    assert float(comb["eps"](2.5)) == 1.0
