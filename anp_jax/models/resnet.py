"""ResNets: ResNet-18 for CIFAR-10 (3x3 stem) and ResNet-50 for ImageNet (7x7 stem)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from anp_jax.models.layers import PerturbableModel, first_layer_conv


class Block(nn.Module):
    """A residual block: ``filters`` channels, ``strides`` at its first convolution."""

    filters: int
    strides: int
    norm: type[nn.Module]
    dtype: jnp.dtype = jnp.float32


class BasicBlock(Block):
    """Two 3x3 convolutions with a residual connection."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = conv(self.filters, (3, 3), (self.strides, self.strides))(x)
        y = nn.relu(self.norm()(y))
        y = conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)
        if x.shape != y.shape:
            x = conv(self.filters, (1, 1), (self.strides, self.strides))(x)
            x = self.norm()(x)
        return nn.relu(x + y)


class Bottleneck(Block):
    """1x1, 3x3, 1x1 convolutions (expansion 4) with a residual connection."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x)))
        y = conv(self.filters, (3, 3), (self.strides, self.strides))(y)
        y = nn.relu(self.norm()(y))
        y = self.norm(scale_init=nn.initializers.zeros)(conv(4 * self.filters, (1, 1))(y))
        if x.shape != y.shape:
            x = conv(4 * self.filters, (1, 1), (self.strides, self.strides))(x)
            x = self.norm()(x)
        return nn.relu(x + y)


class ResNet(PerturbableModel):
    """ResNet; ``stem="cifar"`` (3x3 conv) or ``stem="imagenet"`` (7x7/2 conv + max-pool).

    Perturbation points: ``input``, ``stem`` (the stem convolution's output, before
    BatchNorm), then the output of every residual block, ``stage1_block1`` onwards.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    stem: str = "cifar"
    width: int = 64

    def perturbation_points(self) -> tuple[str, ...]:
        blocks = tuple(f"stage{i + 1}_block{j + 1}"
                       for i, n in enumerate(self.stage_sizes) for j in range(n))
        return ("input", "stem") + blocks

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, axis_name=self.axis_name, dtype=self.dtype)
        x = self.perturb("input", x.astype(self.dtype))
        x = self.normalize_input(x)
        if self.stem == "cifar":
            x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype,
                        conv_general_dilated=first_layer_conv)(x)
            x = nn.relu(norm()(self.perturb("stem", x)))
        else:
            x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
                        use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(norm()(self.perturb("stem", x)))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        block = Bottleneck if self.bottleneck else BasicBlock
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(self.width * 2**i, strides, norm, self.dtype)(x)
                x = self.perturb(f"stage{i + 1}_block{j + 1}", x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
