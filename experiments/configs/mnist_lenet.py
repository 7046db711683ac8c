"""MNIST, LeNet, ANP.

The paper trains LeNet on MNIST but does not give its recipe; this one is ours: the
official eps/alpha/k table stretched over 30 epochs (clean first and last third), noise on
the input and every layer, SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 every 10
epochs, batch 128, no augmentation.  Attack budgets are the usual MNIST ones.

    anp-jax train --workdir=runs/mnist_lenet --config=experiments/configs/mnist_lenet.py
"""

import ml_collections

from anp_jax.configs.default import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "mnist"
    config.model = "lenet"
    config.method = "anp"
    config.augment = "none"
    config.input_pipeline = "auto"  # MNIST fits in memory

    config.num_epochs = 30
    config.batch_size = 128
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.lr_schedule = "step"
    config.lr_decay_epochs = 10
    config.lr_decay_factor = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4

    config.anp.layers = "all"
    config.anp.schedule = "official"

    config.eval.batch_size = 1000
    config.eval.attacks = ("fgsm_linf_0.1", "fgsm_linf_0.2", "fgsm_linf_0.3",
                           "pgd40_linf_0.1", "pgd40_linf_0.3")
    config.eval.corruptions = ("gaussian_noise_3", "impulse_noise_3", "motion_blur_3")
    return config
