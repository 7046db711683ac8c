"""anp-jax: Adversarial Noise Propagation in JAX/Flax."""

__version__ = "0.1.0"
