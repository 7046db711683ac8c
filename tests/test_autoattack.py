"""Tests for anp_jax.evaluation.autoattack against independent computations."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from anp_jax.evaluation import autoattack as aa

# The paper's p_j (Croce & Hein 2020, Sec. 3.2) worked out by hand:
# 0.22, then p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
PAPER_P = (0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99)


def _linear(w: jax.Array, b: jax.Array, z: jax.Array) -> jax.Array:
    return z.reshape(z.shape[0], -1) @ w + b


def _linear_model(seed: int, dim: int = 16, classes: int = 10, batch: int = 32,
                  low: float = 0.3, high: float = 0.7):
    """(logits_fn, w [D, K], b [K], x [B, 4, 4, 1], y [B]) of a random linear classifier; the
    labels are its predictions on x."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(dim, classes)), jnp.float32)
    b = jnp.asarray(rng.normal(size=classes), jnp.float32)
    side = int(math.isqrt(dim))
    x = jnp.asarray(rng.uniform(low, high, size=(batch, side, side, 1)), jnp.float32)
    fn = functools.partial(_linear, w, b)
    return fn, w, b, x, jnp.argmax(fn(x), -1)


def _dist(a: np.ndarray, b: np.ndarray, norm: str) -> np.ndarray:
    d = (np.asarray(a) - np.asarray(b)).reshape(len(a), -1)
    return np.abs(d).max(-1) if norm == "linf" else np.sqrt((d ** 2).sum(-1))


# ------------------------------------------------------------------------------ APGD schedule


@pytest.mark.parametrize("num_steps", [100, 50, 30])
def test_apgd_checkpoints_follow_the_paper(num_steps):
    expected = sorted({math.ceil(p * num_steps - 1e-9) for p in PAPER_P} - {0, num_steps})
    assert aa.apgd_checkpoints(num_steps) == expected
    if num_steps == 100:
        assert expected == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_halves_the_step_at_every_checkpoint_when_the_loss_never_increases():
    # Constant logits: the loss never increases, so condition 1 holds at every checkpoint
    # and the step size is 2 eps / 2^(checkpoints passed).
    num_steps, eps = 30, 0.1
    x = jnp.full((3, 4, 4, 1), 0.5)

    def constant(z: jax.Array) -> jax.Array:
        return jnp.zeros((z.shape[0], 10)) + 0.0 * jnp.sum(z)

    result = aa.apgd(constant, x, jnp.zeros(3, jnp.int32), eps, rng=jax.random.key(0),
                     num_steps=num_steps)
    checkpoints = [math.ceil(p * num_steps - 1e-9) for p in PAPER_P if p * num_steps < 29.5]
    expected = [2 * eps * 0.5 ** sum(w <= k for w in checkpoints) for k in range(num_steps)]
    np.testing.assert_allclose(result.step_sizes[:, 0], expected, rtol=1e-6)
    assert float(result.step_sizes[-1, 0]) < 2 * eps / 64  # it did halve, 7 times


# ------------------------------------------------------------------------------ losses


def test_dlr_losses_and_margin_match_their_definitions():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(12, 10)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    y[:4] = logits[:4].argmax(-1)  # some examples correct, some not
    t = (y + 1 + rng.integers(0, 9, 12)) % 10
    dlr, dlr_t, marg = [], [], []
    for z, label, target in zip(logits, y, t):
        pi = sorted(z, reverse=True)
        best_other = max(v for i, v in enumerate(z) if i != label)
        dlr.append(-(z[label] - best_other) / (pi[0] - pi[2]))
        dlr_t.append(-(z[label] - z[target]) / (pi[0] - 0.5 * (pi[2] + pi[3])))
        marg.append(z[label] - best_other)
    np.testing.assert_allclose(aa.dlr_loss(jnp.asarray(logits), jnp.asarray(y)), dlr,
                               rtol=1e-5)
    np.testing.assert_allclose(
        aa.dlr_loss_targeted(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(t)), dlr_t,
        rtol=1e-5)
    np.testing.assert_allclose(aa.margin(jnp.asarray(logits), jnp.asarray(y)), marg, rtol=1e-5)
    for rank in (2, 5, 10):
        np.testing.assert_array_equal(aa.target_class(jnp.asarray(logits), rank),
                                      np.argsort(-logits, axis=-1)[:, rank - 1])


# ------------------------------------------------------------------------------ APGD-T


def test_apgd_targeted_reaches_its_target_on_a_linear_model():
    # Classes 2 and 3 get bias -100: the target (rank 2) is whichever of 0 and 1 is not y, the
    # DLR denominator is nearly constant, and APGD-T maximises z_t - z_y over the ball.
    fn, w, _, x, _ = _linear_model(2, classes=4, batch=32)
    b = jnp.asarray([0.0, 0.3, -100.0, -100.0])
    fn = functools.partial(_linear, w, b)
    y = jnp.argmax(fn(x), -1)
    eps = 0.1
    target = 1 - np.asarray(y)
    np.testing.assert_array_equal(aa.target_class(fn(x), 2), target)
    # Closed form: the largest z_t - z_y over the linf ball and the box.
    v = np.asarray(w)[:, target].T - np.asarray(w)[:, y].T  # [B, D]
    xf = np.asarray(x).reshape(len(y), -1)
    corner = np.clip(xf + eps * np.sign(v), 0, 1)
    gap = (v * corner).sum(-1) + np.asarray(b)[target] - np.asarray(b)[y]
    reachable, unreachable = gap > 0.02, gap < -0.02
    assert reachable.sum() >= 5 and unreachable.sum() >= 5
    result = aa.apgd_targeted(fn, x, y, eps, rng=jax.random.key(3), target_rank=2,
                              num_steps=20)
    logits = np.asarray(fn(result.x_best))
    i = np.arange(len(y))
    np.testing.assert_allclose(logits[i, target] - logits[i, y], gap, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(-1)[reachable], target[reachable])
    np.testing.assert_array_equal(np.asarray(result.fooled), gap > 0)
    assert np.all(_dist(result.x_best, x, "linf") <= eps + 1e-6)


# ------------------------------------------------------------------------------ FAB


def _bisect_box_min_norm(w: np.ndarray, r: float, lo: np.ndarray, hi: np.ndarray,
                         norm: str) -> float:
    """min ||d|| s.t. w . d = r, lo <= d <= hi, by bisection on the scale of the ray."""
    s = np.sign(r) if r else 1.0
    w, r = w * s, abs(r)

    def d_of(lam):
        raw = lam * (np.sign(w) if norm == "linf" else w)
        return np.clip(raw, lo, hi)

    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if w @ d_of(mid) < r else (low, mid)
    d = d_of(high)
    return float(np.abs(d).max() if norm == "linf" else np.sqrt((d ** 2).sum()))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_with_the_box_matches_bisection(norm):
    rng = np.random.default_rng(4)
    p = rng.uniform(0, 1, size=(8, 12))
    p[:, :3] = rng.choice([0.0, 1.0], size=(8, 3))  # pixels on the box's faces
    w = rng.normal(size=(8, 12))
    r = rng.normal(size=8) * 1.5
    d = np.asarray(aa.project_on_hyperplane(jnp.asarray(w), jnp.asarray(r), jnp.asarray(-p),
                                            jnp.asarray(1 - p), norm))
    np.testing.assert_allclose((w * d).sum(-1), r, rtol=1e-4, atol=1e-5)
    assert np.all(p + d >= -1e-6) and np.all(p + d <= 1 + 1e-6)
    got = np.abs(d).max(-1) if norm == "linf" else np.sqrt((d ** 2).sum(-1))
    want = [_bisect_box_min_norm(w[i], r[i], -p[i], 1 - p[i], norm) for i in range(8)]
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_out_of_reach_is_the_box_corner(norm):
    """Where no point of the box reaches ``w . d = r``, the closest is the corner that
    pushes every coordinate to its side in the direction of ``sign(r) w``."""
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 1, size=(6, 10))
    w = rng.normal(size=(6, 10))
    w[:, 0] = 0.0  # a coordinate the hyperplane does not see stays put
    sign = np.where(np.arange(6) % 2, -1.0, 1.0)
    r = sign * (np.abs(w).sum(-1) + 1.0)  # beyond |w| . 1 >= any reachable w . d
    d = np.asarray(aa.project_on_hyperplane(jnp.asarray(w), jnp.asarray(r), jnp.asarray(-p),
                                            jnp.asarray(1 - p), norm))
    s_w = sign[:, None] * w
    corner = np.where(s_w > 0, 1 - p, np.where(s_w < 0, -p, 0.0))
    np.testing.assert_allclose(d, corner, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_closed_form_minimal_perturbation_of_a_linear_classifier(norm):
    # Classes other than y and t get bias -100, so only the t-vs-y boundary matters.
    fn, w, b, x, y = _linear_model(5, classes=4, batch=16)
    y = jnp.zeros(16, jnp.int32)
    b = jnp.asarray([1.0, 0.0, -100.0, -100.0])
    fn = functools.partial(_linear, w, b)
    keep = np.asarray(jnp.argmax(fn(x), -1) == 0)
    result = aa.fab_targeted(fn, x, y, target_rank=2, num_steps=100, norm=norm)
    v = np.asarray(w[:, 1] - w[:, 0])
    gap = np.asarray(fn(x)[:, 0] - fn(x)[:, 1])
    closed = gap / (np.abs(v).sum() if norm == "linf" else np.sqrt((v ** 2).sum()))
    # The box does not bind: no pixel of the minimal perturbation moves by 0.25 or more.
    pixel = closed if norm == "linf" else gap * np.abs(v).max() / (v ** 2).sum()
    assert keep.sum() >= 8 and np.all(pixel[keep] < 0.25)
    dist = np.asarray(result.distance)[keep]
    assert np.all(dist >= closed[keep] * (1 - 1e-4))
    np.testing.assert_allclose(dist, closed[keep], rtol=2e-3)
    np.testing.assert_allclose(_dist(result.x_adv, x, norm)[keep], dist, rtol=1e-5)
    adv = np.asarray(result.x_adv)
    assert adv.min() >= 0 and adv.max() <= 1
    assert np.all(np.asarray(jnp.argmax(fn(result.x_adv), -1))[keep] != 0)


# ------------------------------------------------------------------------------ Square


def test_square_p_schedule():
    assert aa.square_p(0, 5000) == 0.8
    assert aa.square_p(5, 5000) == 0.8  # it = 10: halved only above 10
    assert aa.square_p(6, 5000) == 0.4  # it = 12
    assert aa.square_p(4999, 5000) == pytest.approx(0.8 / 512)
    assert aa.square_p(100, 1000) == pytest.approx(0.8 / 16)  # it = 1000
    sizes = aa.square_sizes(5000, 8, 8, "l2")
    assert set(sizes.tolist()) <= {3, 5, 7, 8} and sizes[0] == 7 and sizes[-1] == 3


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_on_a_linear_model(norm, eps):
    fn, w, b, x, _ = _linear_model(6, dim=64, batch=48)
    w = w / 8
    fn = functools.partial(_linear, w, b)
    y = jnp.argmax(fn(x), -1)
    xf = np.asarray(x).reshape(len(y), -1)
    wn, bn, yn = np.asarray(w), np.asarray(b), np.asarray(y)
    # Closed form, per class j: z_j - z_y at x plus the largest gain over the ball (for l2
    # ignoring the box, which the perturbations here do not reach: x is in [0.3, 0.7]).
    base, gain = [], []
    for j in range(10):
        v = wn[:, j][None] - wn[:, yn].T
        base.append(np.where(j == yn, -np.inf, (v * xf).sum(-1) + bn[j] - bn[yn]))
        gain.append(eps * (np.abs(v).sum(-1) if norm == "linf" else np.sqrt((v ** 2).sum(-1))))
    base, gain = np.stack(base), np.stack(gain)
    easy = np.max(base + 0.5 * gain, 0) > 0  # adversarial with half of the best gain
    impossible = np.max(base + gain, 0) < 0
    assert easy.sum() >= 8
    state = jax.jit(functools.partial(aa.square, fn, num_queries=400, norm=norm))(
        x, y, eps, rng=jax.random.key(7))
    fooled = np.asarray(state.margin) <= 0
    assert fooled[easy].mean() >= 0.9
    assert not fooled[impossible].any()
    np.testing.assert_array_equal(fooled, np.asarray(jnp.argmax(fn(state.x_best), -1)) != yn)
    assert np.all(_dist(state.x_best, x, norm) <= eps * (1 + 1e-5))
    assert float(state.x_best.min()) >= 0 and float(state.x_best.max()) <= 1


# ------------------------------------------------------------------------------ cascade


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        return nn.Dense(10)(nn.relu(nn.Dense(48)(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def trained():
    """(apply_fn, params, x_test [160, 8, 8, 1], y_test) of an MLP trained on digits."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:1560]
    model = _MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(3e-3)

    def step(carry, _):
        p, opt = carry
        grads = jax.grad(lambda q: optax.losses.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": q}, x[train]), y[train]).mean())(p)
        updates, opt = tx.update(grads, opt)
        return (optax.apply_updates(p, updates), opt), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=400))(
        (params, tx.init(params)))
    return model.apply, params, x[test], y[test]


def _independent_pgd(apply_fn, params, x, y, eps, steps=50, restarts=5, seed=0):
    """Per-example robustness to L-inf PGD (CE), ``restarts`` uniform starts, step 2.5 eps /
    steps; an example counts as fooled if any iterate of any restart is misclassified."""
    fn = functools.partial(apply_fn, {"params": params})
    grad = jax.grad(lambda z: optax.losses.softmax_cross_entropy_with_integer_labels(
        fn(z), y).sum())

    @jax.jit
    def one(key):
        z = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0, 1)

        def body(carry, _):
            z, fooled = carry
            z = jnp.clip(jnp.clip(z + 2.5 * eps / steps * jnp.sign(grad(z)), x - eps,
                                  x + eps), 0, 1)
            return (z, fooled | (jnp.argmax(fn(z), -1) != y)), None

        (_, fooled), _ = jax.lax.scan(body, (z, jnp.argmax(fn(z), -1) != y), None,
                                      length=steps)
        return fooled

    fooled = np.array(jnp.argmax(fn(x), -1) != y)
    for r in range(restarts):
        fooled |= np.asarray(one(jax.random.key(seed + r)))
    return ~fooled


def test_standard_autoattack_is_at_most_an_independent_pgd(trained):
    apply_fn, params, x, y = trained
    eps = 0.1
    record = aa.autoattack(apply_fn, params, {}, x, y, eps=eps, devices=jax.devices()[:2],
                           square_chunk=1000)
    pgd_robust = _independent_pgd(apply_fn, params, jnp.asarray(x), jnp.asarray(y), eps)
    assert 0.1 < pgd_robust.mean() < 0.9  # a budget where the comparison means something
    assert record["robust_accuracy"] <= pgd_robust.mean()
    robust = np.asarray(record["robust"])
    assert robust.shape == (len(y),) and robust.mean() == record["robust_accuracy"]
    # Only a handful of examples that PGD fools may survive AutoAttack.
    assert (robust & ~pgd_robust).sum() <= 2
    assert [s["attack"] for s in record["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert record["attacks"][1]["num_targets"] == 9 and record["attacks"][3][
        "num_queries"] == 5000


def test_cascade_never_raises_robust_accuracy_and_checks(trained):
    apply_fn, params, x, y = trained
    args = (apply_fn, params, {}, x, y)
    kwargs = dict(eps=0.08, version="quick", devices=jax.devices()[:2])
    record = aa.autoattack(*args, **kwargs)
    clean = np.mean(np.argmax(np.asarray(apply_fn({"params": params}, x)), -1) == y)
    assert record["clean_accuracy"] == pytest.approx(clean)
    curve = [clean] + [s["robust_accuracy"] for s in record["stages"]]
    assert all(b <= a for a, b in zip(curve, curve[1:]))
    assert record["stages"][0]["num_attacked"] == round(clean * len(y))
    assert record["robust_accuracy"] == curve[-1]
    # A subset's record from the per-example stages: the whole set gives back the cascade's
    # own counts; the first 10 examples their flags and their clean accuracy.
    whole = aa.restrict(record, slice(None))
    assert whole["clean_accuracy"] == pytest.approx(clean)
    for mine, theirs in zip(whole["stages"], record["stages"]):
        assert mine["num_attacked"] == theirs["num_attacked"]
        assert mine["robust_accuracy"] == pytest.approx(theirs["robust_accuracy"])
    part = aa.restrict(record, slice(0, 10))
    pred = np.argmax(np.asarray(apply_fn({"params": params}, x[:10])), -1)
    assert part["num_examples"] == 10 and part["clean_accuracy"] == np.mean(pred == y[:10])
    assert part["robust"] == record["robust"][:10]
    assert part["robust_accuracy"] == np.mean(record["robust"][:10])
    alone = {name: aa.autoattack(*args, only=(name,), **kwargs)["robust_accuracy"]
             for name in ("apgd-ce", "apgd-t", "square")}
    for name, acc in alone.items():
        assert record["robust_accuracy"] <= acc + 1.0 / len(y), name
    checks, warnings = aa.sanity_checks(record, {
        "square": {"robust_accuracy": alone["square"]},
        "apgd-t": {"robust_accuracy": alone["apgd-t"]},
        "double": {"robust_accuracy": record["robust_accuracy"] - 0.05}})
    by_name = {c["name"]: c["passed"] for c in checks}
    assert by_name["cascade_never_raises"] and by_name["gradient_free_not_stronger"]
    assert not by_name["double_iterations_agree"]  # 0.05 lower at twice the iterations
    assert len(warnings) == sum(not c["passed"] for c in checks)
    assert "double_iterations_agree" in warnings[0]
