"""The paper's studies as experiments: one command each, tables, plots and raw JSON.

    python -m experiments.methods   --out DIR   # every method, clean/PGD/corruption accuracy
    python -m experiments.layers    --out DIR   # ANP on single points, shallow and deep halves
    python -m experiments.hparams   --out DIR   # eps, alpha and k swept one at a time
    python -m experiments.schedules --out DIR   # noise schedules side by side
    python -m experiments.cost      --out DIR   # training time per epoch relative to vanilla

Common options (``anp-jax``'s absl flags): ``--seeds 0,1,2,3,4``, ``--epochs N``,
``--config FILE`` (an ml_collections config file such as
``experiments/configs/fashion_lenet.py``; default: the embedded digits config),
``--config.FIELD=VALUE`` (any field), ``--attacks`` and ``--corruptions`` (the trainer's
evaluation ids), ``--autoattack`` / ``--autoattack_budgets`` / ``--autoattack_examples`` (the
reported robust accuracy: AutoAttack standard by default) and ``--sections`` (corruptions at
every severity, stability). ``--help`` lists them all. Every comparison includes the
``replay`` control (the same k updates per mini-batch, no noise). See
``experiments/RESULTS.md`` for the numbers measured with these scripts.
"""
