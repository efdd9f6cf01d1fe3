"""Weight conversion: key/shape checks, BN folding, the converter CLI, and safe .pth reading."""

from __future__ import annotations

import io
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax import ModelLoadError, load_s3d
from berg_jax.s3d import S3D
from berg_jax.synthetic import random_state_dict
from berg_jax.torch_pickle import write_torch_state_dict
from berg_jax.weights import (
    expected_state_dict_shapes,
    fold_batchnorm,
    raw_to_state_dict,
    state_dict_to_raw,
)
from weights_convert import s3d as convert_cli


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(0)


@pytest.fixture(scope="module")
def pth(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("weights") / "s3d-d76dad2f.pth"
    write_torch_state_dict(state_dict, path)
    return path


def test_expected_keys_match_torchvision_count():
    shapes = expected_state_dict_shapes()
    assert len(shapes) == 464  # spec section 6
    assert shapes["features.0.0.0.weight"] == (64, 3, 1, 7, 7)
    assert shapes["features.0.1.0.weight"] == (64, 64, 7, 1, 1)
    assert shapes["features.15.branch3.1.0.weight"] == (128, 832, 1, 1, 1)
    assert shapes["classifier.1.weight"] == (400, 1024, 1, 1, 1)
    n_params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("num_batches_tracked"))
    assert n_params - 2 * sum(s[0] for k, s in shapes.items() if k.endswith("running_mean")) == 8_320_048


def test_raw_roundtrip(state_dict):
    back = raw_to_state_dict(state_dict_to_raw(state_dict))
    for key, value in back.items():
        np.testing.assert_array_equal(value, state_dict[key])


def test_folded_params_match_model_tree(state_dict):
    """Every conversion is checked against the Flax model's own parameter tree."""
    params = fold_batchnorm(state_dict_to_raw(state_dict))
    model_tree = jax.eval_shape(S3D(with_logits=True).init, jax.random.key(0), jnp.zeros((1, 14, 32, 32, 3)))["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(model_tree)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(model_tree)):
        assert a.shape == b.shape and a.dtype == np.float32


def test_fold_batchnorm_formula(state_dict):
    raw = state_dict_to_raw(state_dict)
    unit = fold_batchnorm(raw, np.float64)["features_2"]
    s = state_dict["features.2.1.weight"].astype(np.float64) / np.sqrt(
        state_dict["features.2.1.running_var"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(unit["kernel"][0, 0, 0], state_dict["features.2.0.weight"][:, :, 0, 0, 0].T * s, rtol=1e-15)
    np.testing.assert_allclose(
        unit["bias"], state_dict["features.2.1.bias"] - state_dict["features.2.1.running_mean"] * s, rtol=1e-12)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda sd: sd.pop("features.5.branch1.1.0.0.weight"), "missing keys: features.5.branch1.1.0.0.weight"),
        (lambda sd: sd.__setitem__("features.99.weight", np.zeros(3)), "unexpected keys: features.99.weight"),
        (lambda sd: sd.__setitem__("features.2.1.running_var", np.ones(65, np.float32)),
         r"wrong shapes: features.2.1.running_var: \(65,\), expected \(64,\)"),
    ],
)
def test_state_dict_errors_name_the_key(state_dict, mutate, expected):
    sd = dict(state_dict)
    mutate(sd)
    with pytest.raises(ModelLoadError, match=expected):
        state_dict_to_raw(sd, source="my.pth")


def test_num_batches_tracked_may_be_absent(state_dict):
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    state_dict_to_raw(sd)


def test_load_s3d_from_pth_and_converted_checkpoint(tmp_path, pth, state_dict, capsys):
    out = tmp_path / "s3d_flax"
    assert convert_cli.main([str(pth), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    from_pth = load_s3d(pth)
    from_ckpt = load_s3d(out)
    expected = fold_batchnorm(state_dict_to_raw(state_dict))
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (from_pth, from_ckpt, expected))):
        np.testing.assert_array_equal(np.asarray(a), c)
        np.testing.assert_array_equal(np.asarray(b), c)
    # Converting over an existing checkpoint is refused, not merged.
    assert convert_cli.main([str(pth), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_converter_rejects_wrong_state_dict(tmp_path, state_dict, capsys):
    sd = {k: v for k, v in state_dict.items() if not k.startswith("features.15.")}
    path = tmp_path / "bad.pth"
    write_torch_state_dict(sd, path)
    assert convert_cli.main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "features.15.branch0.0.weight" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_load_s3d_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(ModelLoadError, match="download.pytorch.org/models/s3d-d76dad2f.pth"):
        load_s3d(tmp_path / "nope.pth")


def test_load_s3d_refuses_code_in_pickle(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"features.2.0.weight": Exploit()}, protocol=2))
        zf.writestr("archive/version", "3\n")
    path.write_bytes(buf.getvalue())
    with pytest.raises(ModelLoadError, match="refusing"):
        load_s3d(path)


def test_load_s3d_float64(pth):
    with jax.enable_x64(True):
        params = load_s3d(pth, dtype=jnp.float64)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(params))
