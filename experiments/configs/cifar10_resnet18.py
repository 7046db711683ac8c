"""CIFAR-10, ResNet-18 (CIFAR stem), ANP with the official schedule and training recipe.

The same recipe as ``cifar10_vgg16.py`` (the authors' VGG-16 code, in
``anp_jax/configs/cifar10.py``): 120 epochs, SGD lr 0.05, momentum 0.9, weight decay 5e-4,
lr x0.1 every 30 epochs, batch 128, pad-crop-flip, noise at every perturbation point of the
model.

    anp-jax train --workdir=runs/cifar10_resnet18 --config=experiments/configs/cifar10_resnet18.py
"""

import ml_collections

from anp_jax.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    return cifar10.get_config("resnet18")
