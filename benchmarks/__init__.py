"""Benchmarks of anp-jax (not part of the installed package).

``python -m benchmarks.step_time``: time per parameter update of plain training, ANP,
the replay control and adversarial training, memory and noise-register sizes.
``benchmarks.torch_anp``: the same ANP algorithm in PyTorch, as a speed reference.
"""
