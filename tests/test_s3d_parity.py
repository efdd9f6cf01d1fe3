"""S3D taps against torchvision's, from the committed fixture (no torch needed).

Tolerances (the backbone issue's): float32 within 1e-4 absolute of torchvision's float32,
float64 within 1e-9 of torchvision's float64 -- the latter proves the structure exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax.s3d import TAP_NAMES, TAP_SHAPES, extract_taps
from berg_jax.synthetic import random_state_dict
from berg_jax.weights import fold_batchnorm, state_dict_to_raw
from tests.reference import WEIGHTS_SEED, load_reference, project_tap, reference_inputs, state_dict_digest

TOLERANCE = {"f32": 1e-4, "f64": 1e-9}


@pytest.fixture(scope="module")
def raw_params():
    state_dict = random_state_dict(WEIGHTS_SEED)
    # If numpy's generator ever changed, every comparison below would be meaningless.
    assert state_dict_digest(state_dict) == str(load_reference()["state_dict_sha256"])
    return state_dict_to_raw(state_dict)


def run_taps(raw, tag):
    dtype = np.float32 if tag == "f32" else np.float64
    with jax.enable_x64(tag == "f64"):
        params = jax.tree_util.tree_map(jnp.asarray, fold_batchnorm(raw, dtype))
        out = extract_taps(params, jnp.asarray(reference_inputs(), dtype),
                           precision=jax.lax.Precision.HIGHEST, with_logits=True)
        return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module", params=["f32", "f64"])
def taps(request, raw_params):
    return request.param, run_taps(raw_params, request.param)


def test_tap_shapes(taps):
    _, out = taps
    for name in TAP_NAMES:
        assert out[name].shape == (4, *TAP_SHAPES[name])


def test_tap_values(taps):
    tag, out = taps
    ref = load_reference()
    errors = {}
    for k, name in enumerate(TAP_NAMES):
        flat = out[name].reshape(4, -1)
        errors[name] = float(np.abs(flat[:, ref[f"positions_{k}"]] - ref[f"values_{tag}_{k}"]).max())
        # A tap is non-trivial, so agreement cannot come from both being ~0.
        assert ref[f"maxabs_{tag}_{k}"].min() > 1.0
    print(tag, "max |jax - torchvision| per tap:", errors)
    assert max(errors.values()) <= TOLERANCE[tag], errors


def test_tap_projections(taps):
    """Random-sign projections of each whole tap: an error anywhere in the tap shows here."""
    tag, out = taps
    ref = load_reference()
    for k, name in enumerate(TAP_NAMES):
        got = project_tap(k, out[name].reshape(4, -1))
        np.testing.assert_allclose(got, ref[f"proj_{tag}_{k}"], rtol=0, atol=TOLERANCE[tag], err_msg=name)
        maxabs = np.abs(out[name].reshape(4, -1)).max(axis=1)
        np.testing.assert_allclose(maxabs, ref[f"maxabs_{tag}_{k}"], rtol=0, atol=TOLERANCE[tag], err_msg=name)


def test_logits(taps):
    tag, out = taps
    np.testing.assert_allclose(out["logits"], load_reference()[f"logits_{tag}"], rtol=0, atol=TOLERANCE[tag])
