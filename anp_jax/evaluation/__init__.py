"""Evaluation of trained models: one batched, pmapped runner and one module per kind of
evaluation (attacks, AutoAttack, corruptions, stability, hidden-layer analysis)."""
