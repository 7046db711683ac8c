"""ImageNet (ILSVRC 2012), ResNet-50, ANP, on a TPU pod (or any multi-host machine).

ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
in ``<data_dir>/downloads/manual/`` and run once with ``--config.download=True`` (or
``tfds build imagenet2012``); point ``data_dir`` at storage every host can read (a GCS
bucket on Cloud TPU).  The data stream through tf.data: each host reads its own part of the
files, decodes, random-resized-crops and flips on its CPUs (Flax's ImageNet example);
evaluation is on the 50,000 validation images (central crop), padded, never dropped.

Training recipe of Flax's ImageNet example scaled to a global batch of 1024 (lr 0.1 per 256
examples, cosine decay, SGD momentum 0.9, weight decay 1e-4), 90 epochs, float32.  The
ANP settings are ours (the paper gives none for ImageNet): the official eps/alpha/k table
stretched over 90 epochs, noise on the four shallowest points (the shallow layers matter
most; a noise register per point costs memory the size of that activation).
Standardisation with the ImageNet mean/std happens inside the model (``mean``/``std``), so
attack budgets stay in [0, 1] pixel units.

    anp-jax train --distributed --workdir=gs://BUCKET/runs/r50 \
        --config=experiments/configs/imagenet_resnet50.py --config.data_dir=gs://BUCKET/tfds
"""

import ml_collections

from anp_jax.configs.default import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "imagenet2012"
    config.model = "resnet50"
    config.method = "anp"
    config.augment = "none"  # random-resized crop + flip happen in the host pipeline
    config.input_pipeline = "auto"  # "stream": tf.data, per-host shards
    config.image_size = 224  # 0: the data set's; smaller for quick experiments
    config.shuffle_buffer_size = 16_384
    config.prefetch_batches = 4
    config.mean = (0.485, 0.456, 0.406)  # inside the model, pixels in [0, 1]
    config.std = (0.229, 0.224, 0.225)

    config.num_epochs = 90
    config.batch_size = 1024  # global: 32 per core on a v3-32 / v4-32 pod slice
    config.optimizer = "sgd"
    config.learning_rate = 0.4  # 0.1 * 1024 / 256
    config.lr_schedule = "cosine"
    config.momentum = 0.9
    config.weight_decay = 1e-4

    config.anp.layers = "shallow 4"
    config.anp.schedule = "official"
    config.anp.norm = "l2"
    config.anp.init = "none"

    config.eval.batch_size = 1000
    config.eval.attacks = ("fgsm_linf_0.00784", "pgd10_linf_0.00784", "fgsm_linf_0.0157")
    config.eval.corruptions = ("gaussian_noise_3", "defocus_blur_3", "contrast_3")
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 100
    return config
