"""The 2-D lowerings of S3D's separable convolutions equal the literal 3-D convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax.s3d import TAP_NAMES, conv3d, extract_taps
from berg_jax.synthetic import random_state_dict
from berg_jax.weights import fold_batchnorm, state_dict_to_raw

# (kernel (kT, kH, kW), stride, padding): every convolution shape S3D has.
CASES = [
    ((1, 7, 7), (1, 2, 2), (0, 3, 3)),  # features.0.0
    ((7, 1, 1), (2, 1, 1), (3, 0, 0)),  # features.0.1
    ((1, 1, 1), (1, 1, 1), (0, 0, 0)),  # every 1x1x1 unit
    ((1, 3, 3), (1, 1, 1), (0, 1, 1)),  # separable spatial
    ((3, 1, 1), (1, 1, 1), (1, 0, 0)),  # separable temporal
]


@pytest.mark.parametrize("kernel_size,stride,padding", CASES)
def test_lowering_equals_3d(kernel_size, stride, padding):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 9, 12, 10, 5)))
        w = jnp.asarray(rng.standard_normal((*kernel_size, 5, 6)))
        y2 = conv3d(x, w, stride, padding, conv_impl="2d")
        y3 = conv3d(x, w, stride, padding, conv_impl="3d")
        assert y2.shape == y3.shape
        np.testing.assert_allclose(np.asarray(y2), np.asarray(y3), rtol=0, atol=1e-12)


def test_unknown_conv_impl():
    with pytest.raises(ValueError, match="conv_impl"):
        conv3d(jnp.zeros((1, 2, 3, 3, 1)), jnp.zeros((1, 1, 1, 1, 1)), (1, 1, 1), (0, 0, 0), conv_impl="4d")


def test_whole_model_2d_equals_3d():
    """Both forms of the whole network, float64 on a small clip (S3D's global pool takes any size)."""
    raw = state_dict_to_raw(random_state_dict(3))
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(jnp.asarray, fold_batchnorm(raw, np.float64))
        clip = jnp.asarray(np.random.default_rng(1).standard_normal((1, 14, 64, 64, 3)))
        a = extract_taps(params, clip, conv_impl="2d")
        b = extract_taps(params, clip, conv_impl="3d")
        for name in TAP_NAMES:
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=0, atol=1e-10, err_msg=name)


def test_separable_max_pool_equals_3d_window():
    from jax import lax

    from berg_jax.s3d import max_pool3d

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 6, 3)), jnp.float32)
    full = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 3, 1), (1, 1, 1, 1, 1),
                             ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    np.testing.assert_array_equal(np.asarray(max_pool3d(x, (3, 3, 3), (1, 1, 1), (1, 1, 1))), np.asarray(full))
