"""`python -m berg_jax.cli`: the same as the `berg-jax` console script."""

import sys

from berg_jax.cli import main

sys.exit(main())
