"""The public surface the README shows: every name in `berg_jax.__all__` resolves."""

from __future__ import annotations

import berg_jax


def test_every_exported_name_resolves():
    for name in berg_jax.__all__:
        assert getattr(berg_jax, name) is not None, name


def test_readme_imports():
    from berg_jax import BERG, encoder, optimize_stimulus, responses_from_components  # noqa: F401

    assert callable(berg_jax.encoder) and berg_jax.BERG is BERG
