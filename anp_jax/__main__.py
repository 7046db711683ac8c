"""``python -m anp_jax`` is the ``anp-jax`` command."""

import sys

from anp_jax.cli import main

sys.exit(main())
