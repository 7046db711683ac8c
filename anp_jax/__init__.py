"""anp-jax: Adversarial Noise Propagation in JAX/Flax.

``anp_jax.load_run(workdir)`` reads a trained run back (its config, an ``images -> logits``
function of the model without noise, and its test split): see
:func:`anp_jax.evaluation.run.load_run`.
"""

__version__ = "0.1.0"
__all__ = ["load_run"]


def __getattr__(name: str):
    # Imported on first use: ``import anp_jax`` (and the CLI) stays light.
    if name == "load_run":
        from anp_jax.evaluation.run import load_run

        return load_run
    raise AttributeError(f"module 'anp_jax' has no attribute {name!r}")
