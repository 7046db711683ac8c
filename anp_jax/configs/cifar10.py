"""The official CIFAR-10 recipe of the authors' code, for any model.

120 epochs; SGD lr 0.05, momentum 0.9, weight decay 5e-4, lr x0.1 every 30 epochs with
the drops at epochs 29, 59, 89 and 119 (0-indexed: PyTorch's StepLR stepped at the start
of each epoch); batch 128; noise on the input and every perturbation point of the model,
eps/alpha/k from the official table (clean for epochs 0-39 and 100-119); pad 4 + random
crop 32 + horizontal flip, on the device; pixels in [0, 1].
``experiments/configs/cifar10_vgg16.py`` and ``cifar10_resnet18.py`` are this recipe with
their model.
"""

import ml_collections

from anp_jax.configs.default import get_config as default_config

# FGSM, StepLL, PGD and MI-FGSM at the paper's budgets, 8/255 and 16/255 (pixels in [0, 1]).
ATTACKS = tuple(f"{a}_linf_{eps}" for eps in ("0.0314", "0.0627")
                for a in ("fgsm", "stepll", "pgd20", "mifgsm10"))
CORRUPTIONS = ("gaussian_noise_3", "shot_noise_3", "impulse_noise_3", "defocus_blur_3",
               "motion_blur_3", "fog_3", "contrast_3", "jpeg_compression_3")


def get_config(model: str = "vgg16") -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "cifar10"
    config.model = model
    config.method = "anp"
    config.augment = "pad_crop_flip"  # "none" or "pad_crop_flip", on device
    config.input_pipeline = "auto"  # CIFAR-10 fits in memory

    config.num_epochs = 120
    config.batch_size = 128
    config.optimizer = "sgd"
    config.learning_rate = 0.05
    config.lr_schedule = "step"
    config.lr_decay_epochs = 30
    config.lr_decay_factor = 0.1
    config.lr_decay_offset = 1  # StepLR stepped at each epoch's start: 29, 59, 89, 119
    config.momentum = 0.9
    config.weight_decay = 5e-4

    config.anp.layers = "all"  # VGG-16: input + the 13 conv outputs (pre-BatchNorm)
    config.anp.schedule = "official"
    config.anp.norm = "l2"
    config.anp.init = "none"

    config.eval.batch_size = 500
    config.eval.attacks = ATTACKS
    config.eval.corruptions = CORRUPTIONS
    config.log_every_steps = 100
    return config
