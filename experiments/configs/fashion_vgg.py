"""Fashion-MNIST, VGG-8 with BatchNorm, ANP: many hidden perturbation points on real data.

The model (``vgg8``, :mod:`anp_jax.models.vgg`) is a narrow VGG for 28x28 grey-scale
images: convolutions of 8, 8 | 16, 16 | 32, 32, 32 channels (``|``: 2x2 max-pool), each
followed by BatchNorm and ReLU, global average pooling, dropout 0.3, one linear layer.  Its
8 perturbation points are the input and the 7 convolution outputs before BatchNorm, where
the official code puts them for VGG-16, so shallow and deep halves ("shallow 4", "deep 4")
and single hidden points can be compared, which LeNet's 5 points and the 8x8 digits could
not show.

Recipe: as ``fashion_lenet.py`` (batch 128, SGD momentum 0.9, lr 0.05 cosine to 0, weight
decay 5e-4, no augmentation, the same ANP rule), over 6 epochs: BatchNorm lets the deeper
network train at that rate.  A plain epoch costs about 60 CPU-seconds (LeNet's: 17; measured
with a jitted train step at batch 128 on the shared 2-core machine), about half a minute of
wall time on 2 idle cores; ANP with k=2 doubles it.

This config as it stands (seed 0, the real files, the idle 2-core machine, 2026-12-06; the
commands below, with ``--config.method=vanilla`` for the plain run): plain training 0.916
clean, PGD-10 L-inf 0.05 0.0005, gaussian noise / impulse noise / motion blur / contrast at
severity 3: 0.820 / 0.855 / 0.793 / 0.170, 2,808 updates in 125 s (20-21 s per epoch), 4.1
minutes with this evaluation; ANP 0.883 clean, PGD-10 0.600, 0.874 / 0.862 / 0.800 / 0.410,
5,616 updates in 305 s (74-84 s per epoch at k=3), 7.0 minutes.  One seed and PGD-10 only
(an upper bound on robust accuracy): a first run, not a finding; ANP costs 3.3 points of
clean accuracy here, more than on LeNet (1.1).  With the full evaluation (AutoAttack standard,
the 19 corruptions, stability; seed 0) see "Claim 2 on VGG-8-BN" in experiments/RESULTS.md.

    anp-jax train --workdir=runs/fashion_vgg --config=experiments/configs/fashion_vgg.py
"""

import importlib.util
import os

import ml_collections


def _fashion_lenet():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_lenet.py")
    spec = importlib.util.spec_from_file_location("fashion_lenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    config = _fashion_lenet().get_config()
    config.model = "vgg8"
    config.num_epochs = 6
    return config
