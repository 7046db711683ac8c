"""Flax models with named perturbation points, and the registry that builds them by name."""

from __future__ import annotations

from collections.abc import Callable

from anp_jax.models.layers import ACTIVATIONS, PERTURBATIONS, PerturbableModel, select_layers
from anp_jax.models.resnet import ResNet
from anp_jax.models.small import DigitsCNN, LeNet
from anp_jax.models.vgg import VGG

MODELS: dict[str, Callable[..., PerturbableModel]] = {
    "digits_cnn": DigitsCNN,
    "lenet": LeNet,
    "vgg8": lambda **kw: VGG(depth=8, **kw),
    "vgg11": lambda **kw: VGG(depth=11, **kw),
    "vgg13": lambda **kw: VGG(depth=13, **kw),
    "vgg16": lambda **kw: VGG(depth=16, **kw),
    "vgg19": lambda **kw: VGG(depth=19, **kw),
    "resnet18": lambda **kw: ResNet(stage_sizes=(2, 2, 2, 2), stem="cifar", **kw),
    "resnet50": lambda **kw: ResNet(stage_sizes=(3, 4, 6, 3), bottleneck=True,
                                    stem="imagenet", **kw),
}


def create_model(name: str, **kwargs) -> PerturbableModel:
    """Builds model ``name`` (see ``MODELS``); kwargs go to the module (``num_classes``,
    ``axis_name`` for cross-replica BatchNorm, ``dtype``, ``mean``/``std``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["ACTIVATIONS", "MODELS", "PERTURBATIONS", "PerturbableModel", "create_model",
           "select_layers", "DigitsCNN", "LeNet", "VGG", "ResNet"]
