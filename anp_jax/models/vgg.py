"""VGG with BatchNorm for CIFAR-10, as in the official ANP code."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from anp_jax.models.layers import PerturbableModel, first_layer_conv

# Channels of each convolution; "M" is a 2x2 max-pool.
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    # A narrow VGG for 28x28 grey-scale images (Fashion-MNIST): 7 convolutions + the
    # classifier, 28 -> 14 -> 7 -> 4; 8 perturbation points; an epoch of 60,000 images at
    # batch 128 costs about 60 CPU-seconds (LeNet: 17).
    8: (8, 8, "M", 16, 16, "M", 32, 32, 32, "M"),
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


class VGG(PerturbableModel):
    """VGG-{8,11,13,16,19} with BatchNorm; dropout before the linear classifier.

    VGG-8 is this project's narrow variant for 28x28 images (``VGG_CONFIGS[8]``).

    Perturbation points: ``input`` then ``conv1`` ... ``convN``, the convolution outputs
    before BatchNorm (the official code's z1..z13 for VGG-16).  Pooling uses SAME padding so
    any input size works; at 32x32 it is the usual VGG.
    """

    depth: int = 16
    dropout: float = 0.3
    width: float = 1.0  # multiplies every convolution's channels

    def perturbation_points(self) -> tuple[str, ...]:
        convs = sum(1 for c in VGG_CONFIGS[self.depth] if c != "M")
        return ("input",) + tuple(f"conv{i}" for i in range(1, convs + 1))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.perturb("input", x.astype(self.dtype))
        x = self.normalize_input(x)
        index = 0
        for channels in VGG_CONFIGS[self.depth]:
            if channels == "M":
                x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
                continue
            index += 1
            x = nn.Conv(max(1, int(channels * self.width)), (3, 3), dtype=self.dtype,
                        conv_general_dilated=first_layer_conv if index == 1 else None)(x)
            x = self.perturb(f"conv{index}", x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             axis_name=self.axis_name, dtype=self.dtype)(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
