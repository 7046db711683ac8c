"""Every model with every layer selection; perturbation points and their selection."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anp_jax import noise, train
from anp_jax.models import MODELS, PERTURBATIONS, create_model, select_layers
from anp_jax.models.layers import first_layer_conv, max_pool

SMALL = {"vgg11": {"width": 0.125}, "vgg13": {"width": 0.125}, "vgg16": {"width": 0.125},
         "vgg19": {"width": 0.125}, "resnet18": {"width": 8}, "resnet50": {"width": 8}}
SELECTIONS = ["all", "0,1", "shallow 2", "deep 2", "none"]
SHAPE = (2, 8, 8, 3)
HP = {"eps": np.float32(0.5), "alpha": np.float32(0.5), "k": np.int32(1), "lr": np.float32(0.01)}


def _model(name):
    return create_model(name, **SMALL.get(name, {}))


def _state(model, layers):
    return train.create_train_state(model, jax.random.PRNGKey(0), SHAPE,
                                    train.make_optimizer("sgd"), noise.anp(), layers)


def _batch():
    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.uniform(size=SHAPE), jnp.float32),
            "label": jnp.asarray([1, 2], jnp.int32)}


@pytest.mark.parametrize("name", list(MODELS))
def test_points_are_listed_shallow_to_deep_input_first(name):
    model = _model(name)
    points = model.perturbation_points()
    assert points[0] == "input"
    variables = jax.eval_shape(lambda: model.init(
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
        jnp.zeros(SHAPE), train=False))
    assert set(variables[PERTURBATIONS]) == set(points)
    assert variables[PERTURBATIONS]["input"].shape == SHAPE


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_with_every_selection(name):
    model = _model(name)
    points = model.perturbation_points()
    step = functools.partial(train.train_step, static_k=1)
    for spec in SELECTIONS:  # traced for every selection (shapes and wiring), not compiled
        layers = select_layers(spec, points, name)
        state = jax.eval_shape(functools.partial(_state, model, layers))
        new, metrics = jax.eval_shape(step, state, _batch(), HP)
        assert set(new.noise.injection) == set(layers)
    # And run for real with every point perturbed: each gets a non-zero register.
    new, metrics = jax.jit(step)(_state(model, points), _batch(), HP)
    assert np.isfinite(float(metrics["loss"]))
    for point in points:
        assert float(jnp.abs(new.noise.injection[point]).max()) > 0, point


def test_select_layers_forms():
    points = ("input", "conv1", "conv2", "conv3", "fc1")
    assert select_layers("all", points) == points
    assert select_layers("none", points) == ()
    assert select_layers("0,1", points) == ("input", "conv1")
    assert select_layers("conv2,input", points) == ("input", "conv2")  # model order
    assert select_layers([4, "conv1"], points) == ("conv1", "fc1")
    assert select_layers("shallow 2", points) == ("input", "conv1")
    assert select_layers("deep 2", points) == ("conv3", "fc1")
    for bad, culprit in [("conv9", "conv9"), ("7", "7"), ("deep 9", "deep 9"),
                         ("shallow x", "shallow x")]:
        with pytest.raises(ValueError, match=culprit):
            select_layers(bad, points, "m")


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        create_model("alexnet")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_points_are_its_convolutions(name):
    """Every hidden point of a ResNet is one of its convolutions (named after it), and every
    convolution is a point: the stem, each block's convolutions and projection shortcuts."""
    model = _model(name)
    points = model.perturbation_points()
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE)))
    convs = {k for k, v in variables["params"].items() if "kernel" in v and v["kernel"].ndim == 4}
    assert convs == set(points) - {"input"}
    blocks = sum(model.stage_sizes)
    assert len(points) == 2 + blocks * (3 if model.bottleneck else 2) + len(model.stage_sizes) \
        - (0 if model.bottleneck else 1)  # a projection per stage, but not ResNet-18's first
    for point in convs:  # the noise has the convolution's output channels
        assert variables[PERTURBATIONS][point].shape[-1] == \
            variables["params"][point]["kernel"].shape[-1]


def test_resnet_points_come_before_batchnorm():
    """In training mode (batch statistics) a constant added at a point before BatchNorm is
    removed by it: the logits do not change.  At a point after BatchNorm (a block's output,
    the old placement) or at the input they do."""
    model = _model("resnet18")
    points = model.perturbation_points()
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    zeros = jax.tree.map(jnp.zeros_like, variables[PERTURBATIONS])

    @jax.jit
    def logits(shift):
        out, _ = model.apply({"params": variables["params"],
                              "batch_stats": variables["batch_stats"], PERTURBATIONS: shift},
                             x, train=True, mutable=["batch_stats"])
        return out

    base = logits(zeros)
    for point in points[1:]:
        shifted = dict(zeros, **{point: zeros[point] + 0.5})
        np.testing.assert_allclose(logits(shifted), base, rtol=1e-3, atol=1e-3, err_msg=point)
    # The check has teeth: the same shift at the input changes the logits.
    moved = logits(dict(zeros, input=zeros["input"] + 0.5))
    assert not np.allclose(moved, base, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape,kernel,padding", [
    ((2, 9, 7, 1), (5, 5, 1, 6), "SAME"),     # LeNet's first layer (odd sizes)
    ((2, 6, 6, 3), (3, 3, 3, 8), "VALID"),
    ((2, 6, 5, 2), (3, 3, 2, 4), ((2, 0), (1, 3))),
    ((2, 6, 5, 1), (3, 3, 1, 4), ((2, 0), (1, 3))),  # one channel, uneven padding
])
def test_first_layer_conv_matches_lax_values_and_gradients(shape, kernel, padding):
    """The first layer's convolution: values, input and kernel gradients equal to those of
    ``lax.conv_general_dilated`` (to float32 round-off), in and out of ``jit``, for batches
    the forward pass splits into its loop's chunks (4, 2) and for one it cannot (3)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
    dims = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dims)

    def new(x, w):
        return first_layer_conv(x, w, (1, 1), padding, dimension_numbers=dims)

    for batch in (4, 2, 3):
        xb = jnp.concatenate([x, -x, 2 * x])[:batch]
        y_ref, vjp_ref = jax.vjp(ref, xb, w)
        for wrap in (jax.jit, lambda f: f):
            y_new, vjp_new = wrap(lambda x, w: jax.vjp(new, x, w))(xb, w)
            np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
            g = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
            for got, want in zip(vjp_new(g), vjp_ref(g)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_max_pool_matches_flax_values_and_gradients():
    rng = np.random.default_rng(1)
    for shape in [(2, 8, 8, 3), (2, 7, 5, 2), (1, 1, 1, 4)]:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)

        def ref(x):
            return nn.max_pool(x, (2, 2), (2, 2), padding="SAME")

        np.testing.assert_array_equal(max_pool(x), ref(x))
        np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(max_pool(v) ** 3))(x),
                                      jax.grad(lambda v: jnp.sum(ref(v) ** 3))(x))
