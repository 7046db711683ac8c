"""TFDS builders of the project (registered with TFDS on import)."""

from anp_jax.datasets.digits import Digits

__all__ = ["Digits"]
