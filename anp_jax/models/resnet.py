"""ResNets: ResNet-18 for CIFAR-10 (3x3 stem) and ResNet-50 for ImageNet (7x7 stem).

The perturbation points are where VGG has them: the input, then the output of every
convolution before its BatchNorm (the stem, each convolution of each residual block, and
each projection shortcut), so that ``anp.layers="all"`` means the same thing for every
model.  The blocks are written inline in :class:`ResNet` (not as submodules) so that the
points are top-level entries of the ``perturbations`` collection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from anp_jax.models.layers import PerturbableModel, first_layer_conv


class ResNet(PerturbableModel):
    """ResNet; ``stem="cifar"`` (3x3 conv) or ``stem="imagenet"`` (7x7/2 conv + max-pool).

    Basic blocks (two 3x3 convolutions) or, with ``bottleneck``, 1x1-3x3-1x1 blocks of
    expansion 4; a block whose shape changes has a 1x1 projection shortcut.  Every BatchNorm
    starts with scale 1, as PyTorch's (the official code's) initialisation: a residual
    branch whose last scale started at 0 would give its last convolution a zero gradient,
    so no noise, on the first steps.

    Perturbation points, shallow to deep: ``input``, ``stem``, then for block ``j`` of stage
    ``i`` (from 1) ``stage{i}_block{j}_conv1``, ``..._conv2`` (``..._conv3`` for
    bottlenecks) and ``..._shortcut`` where the block has a projection: every convolution's
    output before its BatchNorm.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    stem: str = "cifar"
    width: int = 64

    def _blocks(self) -> list[tuple[str, int, int, bool]]:
        """``(name, filters, strides, projection)`` of every block, in order."""
        blocks, channels = [], self.width
        expansion = 4 if self.bottleneck else 1
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                filters = self.width * 2**i
                projection = strides != 1 or channels != expansion * filters
                blocks.append((f"stage{i + 1}_block{j + 1}", filters, strides, projection))
                channels = expansion * filters
        return blocks

    def perturbation_points(self) -> tuple[str, ...]:
        convs = 3 if self.bottleneck else 2
        points = ["input", "stem"]
        for name, _, _, projection in self._blocks():
            points += [f"{name}_conv{c}" for c in range(1, convs + 1)]
            points += [f"{name}_shortcut"] if projection else []
        return tuple(points)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, axis_name=self.axis_name, dtype=self.dtype)

        def conv(name: str, y: jnp.ndarray, filters: int, kernel: int, strides: int = 1,
                 **kw) -> jnp.ndarray:
            """A convolution whose output, before BatchNorm, is perturbation point ``name``."""
            y = nn.Conv(filters, (kernel, kernel), (strides, strides), use_bias=False,
                        dtype=self.dtype, name=name, **kw)(y)
            return self.perturb(name, y)

        x = self.perturb("input", x.astype(self.dtype))
        x = self.normalize_input(x)
        if self.stem == "cifar":
            x = nn.relu(norm()(conv("stem", x, self.width, 3,
                                    conv_general_dilated=first_layer_conv)))
        else:
            x = conv("stem", x, self.width, 7, 2, padding=[(3, 3), (3, 3)])
            x = nn.max_pool(nn.relu(norm()(x)), (3, 3), (2, 2), padding="SAME")
        block = _bottleneck if self.bottleneck else _basic_block
        for name, filters, strides, projection in self._blocks():
            y = block(conv, norm, name, x, filters, strides)
            if projection:
                expansion = 4 if self.bottleneck else 1
                x = norm()(conv(f"{name}_shortcut", x, expansion * filters, 1, strides))
            x = nn.relu(x + y)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


ConvFn = Callable[..., jnp.ndarray]


def _basic_block(conv: ConvFn, norm: Callable[..., nn.Module], name: str, x: jnp.ndarray,
                 filters: int, strides: int) -> jnp.ndarray:
    """The residual branch of a basic block: two 3x3 convolutions."""
    y = nn.relu(norm()(conv(f"{name}_conv1", x, filters, 3, strides)))
    return norm()(conv(f"{name}_conv2", y, filters, 3))


def _bottleneck(conv: ConvFn, norm: Callable[..., nn.Module], name: str, x: jnp.ndarray,
                filters: int, strides: int) -> jnp.ndarray:
    """The residual branch of a bottleneck block: 1x1, 3x3 (with the stride), 1x1 x4."""
    y = nn.relu(norm()(conv(f"{name}_conv1", x, filters, 1)))
    y = nn.relu(norm()(conv(f"{name}_conv2", y, filters, 3, strides)))
    return norm()(conv(f"{name}_conv3", y, 4 * filters, 1))
