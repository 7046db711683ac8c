"""Small models: a CNN for the 8x8 digits and LeNet-5 for MNIST."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from anp_jax.models.layers import PerturbableModel, first_layer_conv, max_pool


class DigitsCNN(PerturbableModel):
    """A small CNN for 8x8 grey-scale digits.

    Perturbation points: ``input``, ``conv1``, ``conv2``, ``fc1`` (pre-activation outputs).
    """

    width: int = 32

    def perturbation_points(self) -> tuple[str, ...]:
        return ("input", "conv1", "conv2", "fc1")

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.perturb("input", x.astype(self.dtype))
        x = self.normalize_input(x)
        x = self.perturb("conv1", nn.Conv(self.width, (3, 3), dtype=self.dtype,
                                          conv_general_dilated=first_layer_conv)(x))
        x = nn.relu(x)
        x = self.perturb("conv2", nn.Conv(2 * self.width, (3, 3), dtype=self.dtype)(x))
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), (2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = self.perturb("fc1", nn.Dense(4 * self.width, dtype=self.dtype)(x))
        x = nn.relu(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class LeNet(PerturbableModel):
    """LeNet-5 (convolutions 6 and 16 of 5x5, then 120, 84, classes) for MNIST.

    Perturbation points: ``input``, ``conv1``, ``conv2``, ``fc1``, ``fc2``.
    """

    def perturbation_points(self) -> tuple[str, ...]:
        return ("input", "conv1", "conv2", "fc1", "fc2")

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.perturb("input", x.astype(self.dtype))
        x = self.normalize_input(x)
        x = self.perturb("conv1", nn.Conv(6, (5, 5), dtype=self.dtype,
                                          conv_general_dilated=first_layer_conv)(x))
        x = max_pool(nn.relu(x))
        x = self.perturb("conv2", nn.Conv(16, (5, 5), padding="VALID" if x.shape[1] >= 5
                                          else "SAME", dtype=self.dtype)(x))
        x = max_pool(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.perturb("fc1", nn.Dense(120, dtype=self.dtype)(x)))
        x = nn.relu(self.perturb("fc2", nn.Dense(84, dtype=self.dtype)(x)))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
