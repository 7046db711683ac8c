"""Tests for anp_jax.attacks on a small MLP trained on scikit-learn's 8x8 digits."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from anp_jax import attacks
from anp_jax.evaluation import autoattack

LINF_EPS = 0.1
L2_EPS = 0.5
IDS = (
    "fgsm_linf_0.1",
    "fgsm_l2_0.5",
    "stepll_linf_0.1",
    "mifgsm10_linf_0.1",
    "pgd10_linf_0.1",
    "pgd10_l2_0.5",
    "apgd10_linf_0.1",
    "apgd10_l2_0.5",
)
NORMED = ("fgsm", "pgd", "apgd")  # attacks with a `norm` argument
RANDOM = ("pgd", "apgd")  # attacks with an `rng` argument


def _mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _train_mlp(x: np.ndarray, y: np.ndarray, hidden: int = 32, steps: int = 300) -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    dim = int(np.prod(x.shape[1:]))
    params = {
        "w1": jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
        "b2": jnp.zeros(10),
    }
    tx = optax.adam(1e-2)

    def loss(p: dict) -> jax.Array:
        logits = _mlp(p, x)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry: tuple, _: None) -> tuple[tuple, None]:
        p, opt_state = carry
        updates, opt_state = tx.update(jax.grad(loss)(p), opt_state)
        return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
        (params, tx.init(params))
    )
    return params


@pytest.fixture(scope="module")
def model() -> tuple:
    """(logits_fn, x_test [256, 8, 8, 1] in [0, 1], y_test [256]) of an MLP trained on digits."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:1656]
    params = _train_mlp(x[train], y[train])
    return functools.partial(_mlp, params), jnp.asarray(x[test]), jnp.asarray(y[test])


def _jitted(logits_fn, id_: str, **extra):
    """The attack named by ``id_`` jitted with everything but (x, y, eps) static."""
    name, norm, _, steps = attacks.parse_attack_id(id_)
    kwargs = dict(extra)
    if steps is not None:
        kwargs["num_steps"] = steps
    if name in NORMED:
        kwargs["norm"] = norm
    return jax.jit(functools.partial(attacks.ATTACKS[name], logits_fn, **kwargs))


@pytest.fixture(scope="module")
def adversarial(model) -> dict[str, jax.Array]:
    """Adversarial test images for every id of IDS, crafted with a traced ``eps``."""
    logits_fn, x, y = model
    out = {}
    for id_ in IDS:
        name, _, eps, _ = attacks.parse_attack_id(id_)
        extra = {"rng": jax.random.key(1)} if name in RANDOM else {}
        out[id_] = _jitted(logits_fn, id_, **extra)(x, y, jnp.float32(eps))
    return out


def _mean_ce(logits_fn, x: jax.Array, y: jax.Array) -> float:
    return float(optax.losses.softmax_cross_entropy_with_integer_labels(logits_fn(x), y).mean())


def _acc(logits_fn, x: jax.Array, y: jax.Array) -> float:
    return float(attacks.accuracy(logits_fn, x, y))


def test_clean_accuracy(model):
    logits_fn, x, y = model
    acc = _acc(logits_fn, x, y)
    assert acc > 0.9
    assert acc == pytest.approx(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == np.asarray(y)))


@pytest.mark.parametrize("id_", IDS)
def test_attack_in_budget_and_raises_loss(model, adversarial, id_):
    logits_fn, x, y = model
    _, norm, eps, _ = attacks.parse_attack_id(id_)
    x_adv = adversarial[id_]
    assert x_adv.shape == x.shape
    assert x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0
    assert float(x_adv.max()) <= 1.0
    delta = np.asarray(x_adv - x).reshape(x.shape[0], -1)
    if norm == "linf":
        assert np.abs(delta).max() <= eps + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
    assert _mean_ce(logits_fn, x_adv, y) > _mean_ce(logits_fn, x, y) + 0.5
    assert _acc(logits_fn, x_adv, y) < _acc(logits_fn, x, y)


@pytest.mark.parametrize("norm", attacks.NORMS)
def test_attack_strength_ordering(model, adversarial, norm):
    logits_fn, _, y = model
    eps = f"{LINF_EPS if norm == 'linf' else L2_EPS:g}"
    acc = {n: _acc(logits_fn, adversarial[f"{n}_{norm}_{eps}"], y) for n in ("fgsm", "pgd10")}
    acc["apgd10"] = _acc(logits_fn, adversarial[f"apgd10_{norm}_{eps}"], y)
    assert acc["pgd10"] <= acc["fgsm"]
    assert acc["apgd10"] <= acc["pgd10"] + 0.02


def test_accuracy_falls_with_traced_eps(model):
    logits_fn, x, y = model
    attack = _jitted(logits_fn, "pgd10_linf_0.1", rng=jax.random.key(2))
    accs = []
    for eps in (0.0, 0.03, 0.1, 0.2):
        x_adv = attack(x, y, jnp.float32(eps))
        if eps == 0.0:
            np.testing.assert_array_equal(x_adv, x)
        accs.append(_acc(logits_fn, x_adv, y))
    assert attack._cache_size() == 1  # eps is traced: one compilation for all budgets
    assert accs[0] == _acc(logits_fn, x, y)
    assert all(b <= a for a, b in itertools.pairwise(accs))
    assert accs[0] > 0.9
    assert accs[-1] < 0.1


def test_random_noise_hurts_less_than_pgd(model, adversarial):
    logits_fn, x, y = model
    signs = jax.random.rademacher(jax.random.key(3), x.shape, x.dtype)
    x_noise = jnp.clip(x + LINF_EPS * signs, 0.0, 1.0)
    pgd_acc = _acc(logits_fn, adversarial["pgd10_linf_0.1"], y)
    assert _acc(logits_fn, x_noise, y) > pgd_acc + 0.3


@pytest.fixture(scope="module")
def softmax_regression() -> tuple:
    """(logits_fn, W [64, 10], b [10], x [6, 8, 8, 1], y [6]) of a random softmax regression."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    b = rng.normal(size=10).astype(np.float32)
    x = rng.uniform(size=(6, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=6).astype(np.int32)

    def logits_fn(images: jax.Array) -> jax.Array:
        return images.reshape(images.shape[0], -1) @ w + b

    return logits_fn, w, b, jnp.asarray(x), jnp.asarray(y)


def _analytic_grad(w: np.ndarray, b: np.ndarray, x: jax.Array, labels: np.ndarray) -> np.ndarray:
    """dCE/dx = W (softmax(W^T x + b) - onehot(label)) for softmax regression, in float64."""
    flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    logits = flat @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return ((p - np.eye(10)[labels]) @ w.T).reshape(x.shape)


def test_single_step_attacks_match_analytic_gradient(softmax_regression):
    logits_fn, w, b, x, y = softmax_regression
    eps = 0.05
    grad = _analytic_grad(w, b, x, np.asarray(y))
    x_np = np.asarray(x)
    expected = np.clip(x_np + eps * np.sign(grad), 0, 1)
    np.testing.assert_allclose(attacks.fgsm(logits_fn, x, y, eps), expected, atol=1e-6)
    # One MI-FGSM step of size eps is FGSM (the L1 normalisation does not change signs).
    np.testing.assert_allclose(
        attacks.mi_fgsm(logits_fn, x, y, eps, num_steps=1), expected, atol=1e-6
    )

    eps_l2 = 0.5
    unit = grad / np.linalg.norm(grad.reshape(len(grad), -1), axis=1)[:, None, None, None]
    expected_l2 = np.clip(x_np + eps_l2 * unit, 0, 1)
    np.testing.assert_allclose(
        attacks.fgsm(logits_fn, x, y, eps_l2, norm="l2"), expected_l2, atol=1e-5
    )

    least_likely = np.argmin(np.asarray(logits_fn(x)), axis=1)
    grad_ll = _analytic_grad(w, b, x, least_likely)
    expected_ll = np.clip(x_np - eps * np.sign(grad_ll), 0, 1)
    np.testing.assert_allclose(attacks.step_ll(logits_fn, x, y, eps), expected_ll, atol=1e-6)


def test_transfer_crafts_on_source(softmax_regression, model):
    """The evaluation's transfer attack: images crafted on the source, scored on the target."""
    from anp_jax.evaluation import Model, Runner
    from anp_jax.evaluation import attacks as attack_eval

    source, _, _, x, y = softmax_regression
    target = model[0]

    def as_model(fn):
        return Model(lambda variables, images, train=False: fn(images), {"params": {}})

    runner = Runner([{"image": np.asarray(x)[None], "label": np.asarray(y)[None],
                      "mask": np.ones((1, len(y)), bool)}], devices=jax.local_devices()[:1])
    ev = attack_eval.Evaluator(runner, ["fgsm_linf_0.05"], source=as_model(source))
    x_adv = attacks.fgsm(source, x, y, 0.05)
    np.testing.assert_array_equal(ev.correct(as_model(target), "fgsm_linf_0.05"),
                                  np.argmax(np.asarray(target(x_adv)), -1) == np.asarray(y))


def test_pgd_restarts_keep_first_fooling_or_highest_loss(model):
    logits_fn, x, y = model
    eps = jnp.float32(0.05)
    key = jax.random.key(5)
    single = jax.jit(functools.partial(attacks.pgd, logits_fn, num_steps=3))
    runs = np.stack([single(x, y, eps, rng=k) for k in jax.random.split(key, 3)])
    combined = jax.jit(functools.partial(attacks.pgd, logits_fn, num_steps=3, restarts=3))(
        x, y, eps, rng=key
    )
    logits = np.stack([np.asarray(logits_fn(jnp.asarray(r))) for r in runs])  # [3, B, K]
    losses = np.stack(
        [optax.losses.softmax_cross_entropy_with_integer_labels(lg, y) for lg in logits]
    )
    fooled = logits.argmax(-1) != np.asarray(y)[None]
    # Some but not all examples are fooled by a run, so both selection rules are exercised.
    assert 0 < fooled.any(0).sum() < x.shape[0]
    chosen = np.where(fooled.any(0), fooled.argmax(0), losses.argmax(0))
    np.testing.assert_allclose(combined, runs[chosen, np.arange(x.shape[0])], atol=1e-5)


def test_apgd_checkpoints():
    assert autoattack.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert autoattack.apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert autoattack.apgd_checkpoints(1) == []


def test_apgd_one_step_returns_better_of_start_and_step(softmax_regression):
    logits_fn, _, _, x, y = softmax_regression
    eps, key = 0.05, jax.random.key(6)
    x0 = attacks.uniform_start(key, x, eps, "linf")
    grad0 = jax.grad(
        lambda z: optax.losses.softmax_cross_entropy_with_integer_labels(logits_fn(z), y).sum()
    )(x0)
    # The first step has size 2 * eps and no momentum, so it lands on the ball's corner.
    x1 = jnp.clip(x + eps * jnp.sign(grad0), 0, 1)
    loss0, loss1 = (
        optax.losses.softmax_cross_entropy_with_integer_labels(logits_fn(z), y) for z in (x0, x1)
    )
    expected = jnp.where((loss1 > loss0)[:, None, None, None], x1, x0)
    np.testing.assert_allclose(
        attacks.apgd_ce(logits_fn, x, y, eps, rng=key, num_steps=1), expected, atol=1e-6
    )


def test_attack_id_round_trip():
    cases = {
        "fgsm_linf_0.1": ("fgsm", "linf", 0.1, None),
        "pgd10_linf_0.1": ("pgd", "linf", 0.1, 10),
        "pgd20_l2_0.5": ("pgd", "l2", 0.5, 20),
        "apgd10_linf_0.03": ("apgd", "linf", 0.03, 10),
        "mifgsm10_linf_0.03": ("mifgsm", "linf", 0.03, 10),
        "stepll_linf_0.03": ("stepll", "linf", 0.03, None),
        "pgd100_linf_1e-05": ("pgd", "linf", 1e-5, 100),
    }
    for id_, parsed in cases.items():
        assert attacks.parse_attack_id(id_) == parsed
        name, norm, eps, steps = parsed
        assert attacks.attack_id(name, norm, eps, steps) == id_
        assert attacks.attack_id(*attacks.parse_attack_id(id_)) == id_
    assert attacks.attack_id("pgd", "linf", 8 / 255, 7) == "pgd7_linf_0.0313725"
    for bad in ("foo10_linf_0.1", "pgd10_l3_0.1", "pgd10_linf_", "pgd0_linf_0.1", "pgd_linf_x"):
        with pytest.raises(ValueError, match="not an attack id"):
            attacks.parse_attack_id(bad)
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.attack_id("foo", "linf", 0.1)
    with pytest.raises(ValueError, match="steps"):
        attacks.attack_id("pgd", "linf", 0.1, 0)


def test_unknown_norm_is_rejected(softmax_regression):
    logits_fn, _, _, x, y = softmax_regression
    with pytest.raises(ValueError, match="norm"):
        attacks.fgsm(logits_fn, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(logits_fn, x, y, 0.1, rng=jax.random.key(0), norm="l1")
