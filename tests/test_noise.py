"""The noise transforms against hand computations in numpy, jitted and not."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anp_jax import noise, train
from anp_jax.models import DigitsCNN

HP = {"eps": 0.6, "alpha": 0.5, "k": 3}


def _grads(seed=0):
    """Two points: ``a`` [3, 4] with a zero example, ``b`` [3, 2, 2]."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, 4)).astype(np.float32)
    a[1] = 0.0
    return {"a": a, "b": rng.normal(size=(3, 2, 2)).astype(np.float32)}


def _np_unit(g, ord="l2"):
    flat = g.reshape(g.shape[0], -1)
    n = np.sqrt((flat ** 2).sum(1)) if ord == "l2" else np.abs(flat).max(1)
    out = np.zeros_like(flat)
    out[n > 0] = flat[n > 0] / n[n > 0, None]
    return out.reshape(g.shape)


def _np_norm(x):
    return np.sqrt((x.reshape(x.shape[0], -1) ** 2).sum(1)).reshape((-1,) + (1,) * (x.ndim - 1))


def _assert_tree_close(got, want, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


class TransformsTest(chex.TestCase):

    def _run(self, tx, steps, **extra):
        """Applies ``tx`` to each pytree of ``steps`` in turn; returns every output."""
        update = self.variant(lambda g, s, hp: tx.update(g, s, **hp))
        state, outs = tx.init(steps[0]), []
        for g in steps:
            out, state = update(g, state, dict(HP, **extra))
            outs.append(out)
        return outs

    @chex.variants(with_jit=True, without_jit=True)
    def test_normalize(self):
        g = _grads()
        for ord in ("l2", "linf"):
            (out,) = self._run(noise.normalize(ord), [g])
            _assert_tree_close(out, {p: _np_unit(v, ord) for p, v in g.items()})
            np.testing.assert_array_equal(out["a"][1], 0.0)  # zero gradient: zero, no NaN
        with pytest.raises(ValueError, match="unknown norm"):
            noise.normalize("l1")

    @chex.variants(with_jit=True, without_jit=True)
    def test_sign_and_scale(self):
        g = _grads()
        (out,) = self._run(noise.sign(), [g])
        _assert_tree_close(out, {p: np.sign(v) for p, v in g.items()})
        (out,) = self._run(noise.scale(-2.5), [g])
        _assert_tree_close(out, {p: -2.5 * v for p, v in g.items()})
        (out,) = self._run(noise.scale(lambda hp: 3.0 * hp["eps"]), [g])
        _assert_tree_close(out, {p: 1.8 * v for p, v in g.items()}, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale_by_eps_over_k(self):
        g = _grads()
        (out,) = self._run(noise.scale_by_eps_over_k(), [g])
        _assert_tree_close(out, {p: 0.2 * v for p, v in g.items()}, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_project_l2_and_linf(self):
        # Example 0 has L2 norm 0.5 (inside the ball of radius 1), example 1 norm 5.
        g = {"z": np.array([[0.3, 0.4], [3.0, -4.0]], np.float32)}
        (out,) = self._run(noise.project(1.0), [g])
        np.testing.assert_allclose(out["z"], [[0.3, 0.4], [0.6, -0.8]], rtol=1e-6)
        (out,) = self._run(noise.project(), [g])  # radius eps = 0.6
        np.testing.assert_allclose(out["z"], [[0.3, 0.4], [0.36, -0.48]], rtol=1e-6)
        (out,) = self._run(noise.project(0.35, "linf"), [g])
        np.testing.assert_allclose(out["z"], [[0.3, 0.35], [0.35, -0.35]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_accumulate(self):
        steps = [_grads(s) for s in range(3)]
        outs = self._run(noise.accumulate(), steps)  # alpha = HP["alpha"] = 0.5
        r = {p: np.zeros_like(v) for p, v in steps[0].items()}
        for g, out in zip(steps, outs):
            r = {p: 0.5 * r[p] + g[p] for p in r}
            _assert_tree_close(out, r, rtol=1e-5)
        outs = self._run(noise.accumulate(0.25), steps)  # a fixed alpha wins over the arg
        np.testing.assert_allclose(outs[1]["b"], 0.25 * steps[0]["b"] + steps[1]["b"],
                                   rtol=1e-6)
        outs = self._run(noise.accumulate_gradients(), steps)
        _assert_tree_close(outs[2], {p: sum(s[p] for s in steps) for p in r}, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_init_adds_a_draw_only_with_a_key(self):
        g = _grads()
        tx = noise.random_init("uniform", 0.5)
        with_key = self.variant(lambda g, key: tx.update(g, tx.init(g), key=key, **HP)[0])
        without = self.variant(lambda g: tx.update(g, tx.init(g), **HP)[0])
        first = with_key(g, jax.random.PRNGKey(0))
        again = with_key(g, jax.random.PRNGKey(0))
        other = with_key(g, jax.random.PRNGKey(1))
        _assert_tree_close(without(g), g)  # no key: gradients pass through
        for p in g:
            draw = np.asarray(first[p]) - g[p]
            assert np.abs(draw).max() <= 0.5 + 1e-6 and np.abs(draw).min() > 0
            np.testing.assert_array_equal(first[p], again[p])  # the key decides the draw
            assert not np.allclose(first[p], other[p])
        assert not np.allclose(np.asarray(first["a"]) - g["a"],  # leaves draw independently
                               (np.asarray(first["b"]) - g["b"]).reshape(3, 4))

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_init_statistics(self):
        zeros = {"x": jnp.zeros((4, 25_000)), "y": jnp.zeros((2, 25_000))}
        for kind, scale, std in (("gaussian", 2.0, 2.0), ("uniform", 1.5, 1.5 / np.sqrt(3))):
            tx = noise.random_init(kind, scale)
            draw = self.variant(lambda g, key, tx=tx: tx.update(g, tx.init(g), key=key)[0])(
                zeros, jax.random.PRNGKey(3))
            for v in draw.values():
                v = np.asarray(v)
                assert abs(v.mean()) < 0.02 * scale, kind
                np.testing.assert_allclose(v.std(), std, rtol=0.02)
                if kind == "uniform":
                    assert v.min() >= -scale and v.max() <= scale
            corr = np.corrcoef(np.asarray(draw["x"][:2]).ravel(), np.asarray(draw["y"]).ravel())
            assert abs(corr[0, 1]) < 0.03
        with pytest.raises(ValueError, match="unknown random_init kind"):
            noise.random_init("laplace")

    @chex.variants(with_jit=True, without_jit=True)
    def test_anp_is_the_optax_chain_of_its_parts(self):
        steps = [_grads(s) for s in range(3)]
        ours = optax.chain(noise.normalize(), noise.accumulate(), noise.scale_by_eps_over_k())
        assert isinstance(noise.anp(), optax.GradientTransformationExtraArgs)
        assert (jax.tree.structure(ours.init(steps[0]))
                == jax.tree.structure(noise.anp().init(steps[0])))
        got, want = self._run(ours, steps), self._run(noise.anp(), steps)
        r = {p: np.zeros_like(v) for p, v in steps[0].items()}
        for g, a, b in zip(steps, got, want):
            r = {p: 0.5 * r[p] + _np_unit(g[p]) for p in r}
            _assert_tree_close(a, {p: 0.2 * v for p, v in r.items()}, rtol=1e-5)
            _assert_tree_close(a, b, rtol=0, atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_optax_transforms_compose(self):
        g = _grads()
        tx = optax.named_chain(("rule", noise.anp()), ("clip", optax.clip(0.1)),
                               ("flip", optax.scale(-1.0)))
        (out,) = self._run(tx, [g])
        _assert_tree_close(out, {p: -np.clip(0.2 * _np_unit(v), -0.1, 0.1)
                                 for p, v in g.items()}, rtol=1e-5)
        assert tuple(tx.init(g)) == ("rule", "clip", "flip")

    @chex.variants(with_jit=True, without_jit=True)
    def test_multi_transform_per_point(self):
        g = _grads()
        tx = optax.multi_transform(
            {"input": noise.anp(), "hidden": optax.chain(noise.sign(), noise.scale(0.1))},
            lambda tree: {p: "input" if p == "a" else "hidden" for p in tree})
        (out,) = self._run(tx, [g])
        _assert_tree_close(out, {"a": 0.2 * _np_unit(g["a"]), "b": 0.1 * np.sign(g["b"])},
                           rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_accumulate_input_gradient_is_the_official_rule(self):
        """Official code over k = 3 steps: the input's register is built from g1, g1+g2,
        g1+g2+g3 (its .grad is never zeroed); a hidden point's from g1, g2, g3."""
        steps = [{"input": _grads(s)["b"], "conv1": _grads(s + 10)["a"]} for s in range(3)]
        tx = optax.chain(optax.masked(noise.accumulate_gradients(), noise.point_mask("input")),
                         noise.anp())
        outs = self._run(tx, steps)
        reg = {"input": 0.0, "conv1": 0.0}
        grad_buffer = 0.0
        for g, out in zip(steps, outs):
            grad_buffer = grad_buffer + g["input"]
            reg["input"] = 0.5 * reg["input"] + _np_unit(grad_buffer)
            reg["conv1"] = 0.5 * reg["conv1"] + _np_unit(g["conv1"])
            _assert_tree_close(out, {p: 0.6 / 3 * r for p, r in reg.items()}, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale_by_activation_norm(self):
        g = _grads()
        rng = np.random.default_rng(7)
        acts = {"a": rng.normal(size=(3, 4)).astype(np.float32),
                "b": rng.normal(size=(3, 2, 2)).astype(np.float32)}
        (out,) = self._run(noise.scale_by_activation_norm(), [g], activations=acts)
        _assert_tree_close(out, {p: v * _np_norm(acts[p]) for p, v in g.items()}, rtol=1e-5)
        # Relative ANP: per-example norm eps/k * ||z|| after one step; masked points skipped
        # (the full dict of activations is passed inside optax.masked).
        tx = optax.masked(optax.chain(noise.anp(), noise.scale_by_activation_norm()),
                          noise.point_mask("b"))
        (out,) = self._run(tx, [g], activations=acts)
        np.testing.assert_array_equal(out["a"], g["a"])
        flat = np.asarray(out["b"]).reshape(3, -1)
        np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 0.2 * _np_norm(acts["b"]).ravel(),
                                   rtol=1e-5)


def test_missing_extra_arguments_are_named():
    g = {"z": jnp.ones((2, 3))}
    with pytest.raises(TypeError, match="eps"):
        noise.scale_by_eps_over_k().update(g, optax.EmptyState(), k=1)
    with pytest.raises(TypeError, match="accumulate: update needs the extra argument alpha"):
        tx = noise.accumulate()
        tx.update(g, tx.init(g))
    with pytest.raises(TypeError, match="activations="):
        noise.scale_by_activation_norm().update(g, optax.EmptyState())


def test_module_doctests_run():
    result = doctest.testmod(noise, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


B = 4
LAYERS = ("input", "conv1", "fc1")


def _batch():
    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.uniform(size=(B, 8, 8, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, size=B), jnp.int32)}


def _state(noise_tx, reset=True):
    return train.create_train_state(DigitsCNN(width=4), jax.random.PRNGKey(0), (B, 8, 8, 1),
                                    train.make_optimizer("sgd"), noise_tx, LAYERS, reset)


def test_chain_of_parts_trains_exactly_as_anp():
    hp = {"eps": 0.7, "alpha": 0.6, "k": 2, "lr": 0.1}
    parts = optax.chain(noise.normalize(), noise.accumulate(), noise.scale_by_eps_over_k())
    got, _ = jax.jit(train.train_step)(_state(parts), _batch(), hp)
    want, _ = jax.jit(train.train_step)(_state(noise.anp()), _batch(), hp)
    jax.tree.map(np.testing.assert_array_equal, (got.params, got.noise),
                 (want.params, want.noise))
    assert float(jnp.abs(got.noise.injection["conv1"]).max()) > 0


@pytest.mark.parametrize("reset", [True, False])
def test_random_start_is_the_first_forward_pass_noise(reset):
    """With k = 1 the only forward pass of a mini-batch carries the random start,
    normalised and scaled: eps per example and point, whether the registers are reset every
    mini-batch or only start afresh at the first one."""
    eps = 0.8
    step = jax.jit(train.train_step)
    state, metrics = step(_state(noise.anp(init="gaussian"), reset), _batch(),
                          {"eps": eps, "alpha": 0.5, "k": 1, "lr": 0.1})
    np.testing.assert_allclose(float(metrics["noise_norm"]), len(LAYERS) * eps, rtol=1e-5)
    if not reset:  # the second mini-batch continues the registers: no fresh draw
        registers = state.noise.transform[2].register
        _, metrics = step(state, _batch(), {"eps": eps, "alpha": 0.5, "k": 1, "lr": 0.1})
        want = sum(eps * np.linalg.norm(np.asarray(r).reshape(B, -1), axis=1).mean()
                   for r in registers.values())
        np.testing.assert_allclose(float(metrics["noise_norm"]), want, rtol=1e-5)
