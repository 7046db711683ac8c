"""Fashion-MNIST, LeNet-5, ANP: the quick real-data recipe (a run in minutes on a CPU).

Data: the 60,000 / 10,000 original images (``config.dataset="fashion_mnist"``: Debian's
``dataset-fashion-mnist`` or the IDX files in ``<data_dir>/downloads/manual/``), pixels in
[0, 1], no augmentation (the images are centred and aligned; flips would change classes'
statistics little and cost nothing, but the paper's MNIST recipe has none).

Recipe (ours: the paper gives none for MNIST-like sets): batch 128, SGD with momentum 0.9,
lr 0.05 with a cosine decay to 0 over 4 epochs, weight decay 5e-4.  Four epochs keep a run,
training plus its evaluation on all 10,000 test images, within 5 minutes on 2 CPU cores
(ANP with k=2 makes two updates per mini-batch); LeNet reaches most of its accuracy by then.

ANP: noise on the input and every layer (``"all"``), the L2 rule with alpha 0.5 and k=2,
eps SETTING.  See ``experiments/RESULTS.md`` for why.

    anp-jax train --workdir=runs/fashion_lenet --config=experiments/configs/fashion_lenet.py
"""

import ml_collections

from anp_jax.configs.default import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "fashion_mnist"
    config.model = "lenet"
    config.method = "anp"
    config.augment = "none"
    config.input_pipeline = "auto"  # 55 MB of uint8: in memory

    config.num_epochs = 4
    config.batch_size = 128
    config.optimizer = "sgd"
    config.learning_rate = 0.05
    config.lr_schedule = "cosine"
    config.momentum = 0.9
    config.weight_decay = 5e-4

    config.anp.layers = "all"
    config.anp.schedule = "constant"
    config.anp.epsilon = 1.0
    config.anp.alpha = 0.5
    config.anp.k = 2

    config.eval.batch_size = 1000
    config.eval.attacks = ("fgsm_linf_0.05", "pgd10_linf_0.05", "pgd10_linf_0.1")
    config.eval.corruptions = ("gaussian_noise_3", "impulse_noise_3", "motion_blur_3",
                               "fog_3", "contrast_3", "pixelate_3")
    return config
