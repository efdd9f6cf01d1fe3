"""berg_files: reading BERG's bucket files safely, and the checks on what they hold."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.lib import format as npy_format

from berg_jax import berg_files as bf
from berg_jax.errors import InvalidParameterError, ModelLoadError, ValidationError
from berg_jax.synthetic_berg import make_berg_dir
from tests.reference import numpy_reference_head

K = 8


@pytest.fixture(scope="module")
def berg_dir(tmp_path_factory) -> Path:
    """One synthetic berg_dir (subject 1, K=8) shared by the module: ~2 s to write."""
    return make_berg_dir(tmp_path_factory.mktemp("berg"), subjects=(1,), n_components=K)


def _save_like_numpy1(path: Path, obj, protocol: int = 3) -> None:
    """What numpy 1.x's np.save wrote: protocol 3 (2 before numpy 1.17), `numpy.core` names."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    buf = io.BytesIO()
    pickle.dump(arr, buf, protocol=protocol)
    # Protocols 2-3 name globals as text lines, so the module can be renamed in place.
    data = buf.getvalue().replace(b"numpy._core.", b"numpy.core.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(
            fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(data)


def _pca(n_components: int = 1, **overrides) -> dict:
    """A minimal, valid pca_weights dict (real F) with keys replaced by `overrides`."""
    rng = np.random.default_rng(1)
    scaler = {"mean_": rng.standard_normal(bf.N_FEATURES),
              "scale_": np.ones(bf.N_FEATURES), "var_": np.ones(bf.N_FEATURES),
              "n_features_in_": bf.N_FEATURES, "n_samples_seen_": np.int64(1000)}
    pca = {"components_": np.full((n_components, bf.N_FEATURES), 1e-3, np.float32),
           "n_features_in_": bf.N_FEATURES}
    for key, value in overrides.items():
        (scaler if key in scaler else pca)[key] = value
    return {"scaler_param": scaler, "pca_param": pca}


# --- loading the synthetic dir -------------------------------------------------------------


def test_load_pca(berg_dir):
    pca = bf.load_pca(berg_dir)
    assert set(pca) == {"mean", "scale", "components"}
    assert pca["mean"].shape == pca["scale"].shape == (bf.N_FEATURES,)
    assert pca["mean"].dtype == pca["scale"].dtype == np.float64
    assert pca["components"].shape == (K, bf.N_FEATURES)
    assert pca["components"].dtype == np.float32
    assert (pca["scale"] > 0).all()
    # Exactly what np.load would have returned (the files are trusted here).
    ref = np.load(bf.pca_weights_path(berg_dir), allow_pickle=True).item()
    np.testing.assert_array_equal(pca["components"], ref["pca_param"]["components_"])
    np.testing.assert_array_equal(pca["mean"], ref["scaler_param"]["mean_"])


def test_load_subject_head(berg_dir):
    coef, intercept = bf.load_subject_head(berg_dir, 1, K)
    assert coef.shape == (bf.N_VOXELS[1], K) and coef.dtype == np.float32
    assert intercept.shape == (bf.N_VOXELS[1],) and intercept.dtype == np.float32
    with pytest.raises(ModelLoadError, match=r"weights_sub-01\.npy: coef_ has shape "
                       r"\(108219, 8\), expected \(108219, 100\) for subject 1"):
        bf.load_subject_head(berg_dir, 1, 100)


def test_load_metadata(berg_dir):
    meta = bf.load_metadata(berg_dir, 1)
    fmri = meta["fmri"]
    assert fmri["sub_mask"].shape == bf.MASK_SHAPE and fmri["sub_mask"].dtype == bool
    assert int(fmri["sub_mask"].sum()) == bf.N_VOXELS[1]
    assert isinstance(fmri["sub_mask_header"], nib.Nifti1Header)
    assert fmri["sub_mask_affine"].shape == (4, 4)
    assert set(fmri["rois"]) == {"lFFA", "rFFA", "lV1v", "BMDgeneral"}
    for coords, indices, image in fmri["rois"].values():
        assert coords.shape[1] == 3 and indices.shape == (len(coords), 1)
        assert isinstance(image, nib.Nifti1Image)
        assert image.get_fdata().sum() == len(coords)
    for key, values in meta["encoding_models"].items():
        assert values.shape == (bf.N_VOXELS[1],) and values.dtype == np.float32, key


def test_metadata_needs_the_nibabel_allow_list(berg_dir):
    # Weights files are read without nibabel classes admitted: a nibabel global there is
    # refused, and so is it in metadata read with the array-only list.
    with pytest.raises(ModelLoadError, match=r"metadata_sub-01\.npy: refused .*nibabel"):
        bf.load_pickled_npy(bf.metadata_path(berg_dir, 1), bf.ARRAY_GLOBALS)


def test_numpy1_and_protocol2_pickles_load(tmp_path):
    obj = {"coef_": np.arange(6, dtype=np.float32).reshape(3, 2),
           "n": np.int64(1000), "x": np.float64(2.5), "name": "a"}
    for protocol in (2, 3):
        path = tmp_path / f"p{protocol}.npy"
        _save_like_numpy1(path, obj, protocol)
        assert b"numpy.core.multiarray" in path.read_bytes()
        got = bf.load_pickled_npy(path)
        np.testing.assert_array_equal(got["coef_"], obj["coef_"])
        assert got["n"] == 1000 and got["x"] == 2.5 and got["name"] == "a"


def test_large_arrays_are_not_copied(berg_dir):
    # The unpickled bytes become the array's buffer: one copy of the file in memory.
    pca = bf.load_pca(berg_dir)
    assert isinstance(pca["components"].base, bytes)


# --- hostile and broken files --------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Truncate:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        # np.memmap(path, mode="w+") would create/truncate the file if it were callable.
        return (np.memmap, (str(self.target), np.uint8, "w+", 0, (16,)))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights_sub-01.npy"
    np.save(path, {"coef_": np.zeros(3), "x": _Evil(marker)}, allow_pickle=True)
    with pytest.raises(ModelLoadError, match=r"weights_sub-01\.npy: refused .*system"):
        bf.load_pickled_npy(path)
    assert not marker.exists()


def test_memmap_cannot_write_files(tmp_path):
    target = tmp_path / "victim"
    path = tmp_path / "evil.npy"
    np.save(path, {"x": _Truncate(target)}, allow_pickle=True)
    assert b"memmap" in path.read_bytes()
    with pytest.raises(ModelLoadError, match=r"evil\.npy"):
        bf.load_pickled_npy(path)
    assert not target.exists()


def test_plain_array_npy_is_refused(tmp_path):
    path = tmp_path / "pca_weights.npy"
    np.save(path, np.zeros((3, 4), np.float32))
    with pytest.raises(ModelLoadError, match=r"pca_weights\.npy: expected a pickled dict"):
        bf.load_pickled_npy(path)


@pytest.mark.parametrize("keep", [0.5, 8 / 200])
def test_truncated_file(berg_dir, tmp_path, keep):
    src = bf.subject_weights_path(berg_dir, 1)
    dst = bf.subject_weights_path(tmp_path, 1)
    dst.parent.mkdir(parents=True)
    data = src.read_bytes()
    dst.write_bytes(data[: max(8, int(len(data) * keep)) if keep > 0.1 else 8])
    with pytest.raises(ModelLoadError, match=r"weights_sub-01\.npy: .*(truncated|header)"):
        bf.load_subject_head(tmp_path, 1, K)


def test_missing_files_say_how_to_download(berg_dir, tmp_path):
    with pytest.raises(ModelLoadError) as err:
        bf.load_pca(tmp_path)
    msg = str(err.value)
    assert msg.startswith("pca_weights.npy: file not found")
    assert "berg-jax fetch --berg-dir" in msg
    assert f"aws s3 sync --no-sign-request s3://brain-encoding-response-generator/{bf.MODEL_ROOT}" in msg
    with pytest.raises(ModelLoadError, match=r"weights_sub-02\.npy: .*--subjects 2"):
        bf.load_subject_head(berg_dir, 2, K)
    with pytest.raises(ModelLoadError, match=r"metadata_sub-02\.npy: file not found"):
        bf.load_metadata(berg_dir, 2)


def test_wrong_coef_shape(tmp_path):
    path = bf.subject_weights_path(tmp_path, 3)
    path.parent.mkdir(parents=True)
    n = bf.N_VOXELS[3]
    np.save(path, {"coef_": np.zeros((5, 100), np.float32),
                   "intercept_": np.zeros(n, np.float32), "n_features_in_": 100})
    with pytest.raises(ModelLoadError) as err:
        bf.load_subject_head(tmp_path, 3, 100)
    assert str(err.value) == ("weights_sub-03.npy: coef_ has shape (5, 100), "
                              "expected (108366, 100) for subject 3")


def test_head_missing_key_and_bad_dtype(tmp_path):
    path = bf.subject_weights_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    np.save(path, {"coef_": np.zeros((bf.N_VOXELS[1], K), np.float32)})
    with pytest.raises(ModelLoadError, match=r"weights_sub-01\.npy: missing key 'intercept_'"):
        bf.load_subject_head(tmp_path, 1, K)
    np.save(path, {"coef_": np.zeros((bf.N_VOXELS[1], K), np.int32),
                   "intercept_": np.zeros(bf.N_VOXELS[1], np.float32)})
    with pytest.raises(ModelLoadError, match=r"coef_ is a int32 array"):
        bf.load_subject_head(tmp_path, 1, K)


def test_wrong_mean_length(tmp_path):
    path = bf.pca_weights_path(tmp_path)
    path.parent.mkdir(parents=True)
    np.save(path, _pca(mean_=np.zeros(10)))
    with pytest.raises(ModelLoadError, match=r"pca_weights\.npy: mean_ has shape \(10,\), "
                       r"expected \(4084096,\)"):
        bf.load_pca(tmp_path)


@pytest.mark.parametrize("override, message", [
    ({"scale_": np.zeros(bf.N_FEATURES)}, r"scale_ has 4084096 zero entries"),
    ({"components_": np.full((1, bf.N_FEATURES), np.nan, np.float32)}, r"components_ contains NaN"),
    ({"components_": np.zeros((1, 7), np.float32)}, r"components_ has shape \(1, 7\)"),
])
def test_bad_pca_values(tmp_path, override, message):
    path = bf.pca_weights_path(tmp_path)
    path.parent.mkdir(parents=True)
    np.save(path, _pca(**override))
    with pytest.raises(ModelLoadError, match=r"pca_weights\.npy: " + message):
        bf.load_pca(tmp_path)


def test_float64_components_accepted(tmp_path):
    make_berg_dir(tmp_path, subjects=(), n_components=2, components_dtype=np.float64)
    pca = bf.load_pca(tmp_path)
    assert pca["components"].dtype == np.float64
    assert pca["components"].shape == (2, bf.N_FEATURES)


def test_bad_sub_mask(berg_dir, tmp_path):
    meta = bf.load_metadata(berg_dir, 1)
    meta["fmri"]["sub_mask"] = meta["fmri"]["sub_mask"].copy()
    meta["fmri"]["sub_mask"].flat[np.flatnonzero(meta["fmri"]["sub_mask"])[0]] = False
    path = bf.metadata_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    np.save(path, meta)
    with pytest.raises(ModelLoadError, match=r"metadata_sub-01\.npy: sub_mask has 108218 "
                       r"voxels, expected 108219"):
        bf.load_metadata(tmp_path, 1)


@pytest.mark.parametrize("subject", [0, 11, -1, True, "1", 1.0, None])
def test_invalid_subject(berg_dir, subject):
    with pytest.raises(InvalidParameterError):
        bf.load_subject_head(berg_dir, subject, K)
    with pytest.raises(InvalidParameterError):
        bf.metadata_path(berg_dir, subject)


def test_paths():
    root = Path("/d") / bf.MODEL_ROOT
    assert bf.pca_weights_path("/d") == root / "encoding_models_weights" / "pca_weights.npy"
    assert bf.subject_weights_path("/d", np.int64(7)) == (
        root / "encoding_models_weights" / "weights_sub-07.npy")
    assert bf.metadata_path("/d", 10) == root / "metadata" / "metadata_sub-10.npy"


def test_constants():
    assert sum(bf.TAP_SIZES.values()) == bf.N_FEATURES
    assert list(bf.TAP_SIZES)[0] == "features.2" and list(bf.TAP_SIZES)[-1] == "avgpool"
    assert len(bf.ROI_NAMES) == len(set(bf.ROI_NAMES)) == 47
    assert list(bf.SUBJECTS) == list(range(1, 11)) == sorted(bf.N_VOXELS)


# --- selections ----------------------------------------------------------------------------


def test_roi_voxel_indices(berg_dir):
    meta = bf.load_metadata(berg_dir, 1)
    mask = meta["fmri"]["sub_mask"]
    for name, (coords, _, _) in meta["fmri"]["rois"].items():
        idx = bf.roi_voxel_indices(meta, name)
        assert idx.dtype == np.int64 and idx.shape == (len(coords),)
        # The j-th True voxel of sub_mask in C order is column j of the output.
        flat_true = np.flatnonzero(mask.ravel())
        np.testing.assert_array_equal(
            flat_true[idx], np.ravel_multi_index(tuple(coords.T), mask.shape))


@pytest.mark.parametrize("roi", ["lPPA", "nope", None, 3])
def test_unknown_roi(berg_dir, roi):
    meta = bf.load_metadata(berg_dir, 1)
    with pytest.raises(ValidationError, match=r"valid ROIs: lV1v, lFFA, rFFA, BMDgeneral"):
        bf.roi_voxel_indices(meta, roi)


@pytest.mark.parametrize("mask", [
    np.array([0, 1, 1, 0, 1], bool), [0, 1, 1, 0, 1], np.array([0.0, 1, 1, 0, 1]),
    np.array([0, 1, 1, 0, 1], np.uint8),
])
def test_voxel_mask_indices(mask):
    idx = bf.voxel_mask_indices(mask, 5)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, [1, 2, 4])


@pytest.mark.parametrize("mask, message", [
    (np.ones(4), r"shape \(4,\), expected \(5,\)"),
    (np.ones((1, 5)), r"shape \(1, 5\)"),
    (np.array([0, 2, 1, 0, 1]), r"binary"),
    (np.array([0, 0.5, 1, 0, 1]), r"binary"),
    (np.array([0, np.nan, 1, 0, 1]), r"binary"),
    (np.zeros(5), r"selects no voxels"),
    (np.array(list("01101")), r"binary"),
    (None, r"shape"),
])
def test_voxel_mask_invalid(mask, message):
    with pytest.raises(ValidationError, match=message):
        bf.voxel_mask_indices(mask, 5)


# --- the reference head --------------------------------------------------------------------


def test_numpy_reference_head_matches_folded_form(berg_dir):
    rng = np.random.default_rng(3)
    pca = bf.load_pca(berg_dir)
    coef, intercept = bf.load_subject_head(berg_dir, 1, K)
    feats = pca["mean"] + pca["scale"] * rng.standard_normal((2, bf.N_FEATURES))
    out = numpy_reference_head(feats, berg_dir, 1)
    assert out.shape == (2, bf.N_VOXELS[1]) and out.dtype == np.float64
    # Spec section 8's fold: p = f @ (C/scale).T - (mean/scale) @ C.T, one tap at a time.
    p = np.zeros((2, K))
    offset = 0
    for size in bf.TAP_SIZES.values():
        sl = slice(offset, offset + size)
        w = pca["components"][:, sl].astype(np.float64) / pca["scale"][sl]
        p += feats[:, sl] @ w.T - pca["mean"][sl] @ w.T
        offset += size
    expected = p @ coef.T.astype(np.float64) + intercept
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)
    # Outputs are O(1) by construction of the synthetic weights.
    assert 0.1 < out.std() < 10
    np.testing.assert_allclose(numpy_reference_head(feats[0], berg_dir, 1), out[0])


# --- BERG's real size ----------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_pca_loads_within_one_copy(tmp_path):
    """K=100 float32: BERG's 1.7 GB pca_weights.npy. Loading must not hold two copies."""
    make_berg_dir(tmp_path, subjects=(), n_components=100)
    size = bf.pca_weights_path(tmp_path).stat().st_size
    assert size > 1.6e9
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to read the peak RSS")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forked pytest.
    code = (
        "import sys; from berg_jax.berg_files import load_pca; "
        "p = load_pca(sys.argv[1]); assert p['components'].shape == (100, 4084096); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print(int(hwm.split()[1]) * 1024)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1])
    peak = int(res.stdout.split()[-1])
    assert peak < 1.2 * size, (peak, size)
