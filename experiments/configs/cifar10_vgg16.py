"""CIFAR-10, VGG-16 with BatchNorm, ANP with the official schedule (the authors' code).

120 epochs; SGD lr 0.05, momentum 0.9, weight decay 5e-4, lr x0.1 every 30 epochs; batch
128; noise on the input and all 13 conv outputs, eps/alpha/k from the official table (clean
for epochs 0-39 and 100-119); pad 4 + random crop 32 + horizontal flip; pixels in [0, 1].
The recipe is ``anp_jax/configs/cifar10.py``.

    anp-jax train --workdir=runs/cifar10_vgg16 --config=experiments/configs/cifar10_vgg16.py
"""

import ml_collections

from anp_jax.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    return cifar10.get_config("vgg16")
