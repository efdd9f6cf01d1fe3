"""The encoding model end to end: BERG's files -> converted head -> fused encoder -> BERG's API.

Reference: the spec's sklearn head in float64 applied to torchvision's float64 taps of
the fixture videos (tests/fixtures/s3d_reference.npz, `components_k8`). Tolerance: the
issue's 1e-4 relative, measured as max over voxels |ours - ref| / max over voxels |ref|.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax import head
from berg_jax.api import BERG, encoder
from berg_jax.berg_files import N_VOXELS, load_metadata, load_subject_head, roi_voxel_indices
from berg_jax.fused import encode_frames
from berg_jax.errors import InvalidParameterError, ModelLoadError, StimulusError, ValidationError
from berg_jax.synthetic import synthetic_video
from berg_jax.synthetic_berg import make_synthetic_model
from tests.reference import SOURCES, WEIGHTS_SEED, load_reference
from weights_convert.make_reference import BERG_SEED, regress_f64

MODEL = "fmri-bmd-s3d"
RTOL = 1e-4


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # One seed for both, as the reference fixture used: S3D weights and the berg_dir.
    assert WEIGHTS_SEED == BERG_SEED
    return make_synthetic_model(tmp_path_factory.mktemp("encoder"), n_components=8, seed=BERG_SEED)


@pytest.fixture(scope="module")
def berg(env):
    return BERG(env[0], s3d_weights=env[1])


@pytest.fixture(scope="module")
def model(berg):
    return berg.get_encoding_model(MODEL, subject=1)


def source_video(i: int) -> np.ndarray:
    """Fixture video i at full length (T > 14 exercises BERG's sampling), (1, T, 3, H, W) as BERG takes it."""
    h, w, t = SOURCES[i]
    return synthetic_video(seed=10 + i, n_frames=t, height=h, width=w).transpose(0, 3, 1, 2)[None]


@pytest.mark.parametrize("i", [0, 1])
def test_encode_matches_sklearn_reference(env, berg, model, i):
    coef, intercept = load_subject_head(env[0], 1, 8)
    ref = regress_f64(load_reference()["components_k8"][i: i + 1], coef, intercept)
    got = berg.encode(model, source_video(i), show_progress=False)
    assert got.dtype == np.float32 and got.shape == (1, N_VOXELS[1])
    err = relative_error(got, ref)
    print(f"source {SOURCES[i]}: max relative error {err:.2e}")
    assert err <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("i", [2, 3])
def test_encode_matches_sklearn_reference_other_sizes(env, berg, model, i):
    test_encode_matches_sklearn_reference(env, berg, model, i)


def test_conversion_is_saved_and_reused(env, model):
    berg_dir = env[0]
    assert head.is_converted(berg_dir, 1)
    stamp = head.converted_dir(berg_dir) / "projection.json"
    before = stamp.stat().st_mtime_ns
    BERG(berg_dir, s3d_weights=env[1]).get_encoding_model(MODEL, subject=1)
    assert stamp.stat().st_mtime_ns == before
    assert json.loads(stamp.read_text())["n_components"] == 8
    assert head.converted_components(berg_dir) == 8


def test_converted_components_without_a_copy_says_convert(tmp_path):
    with pytest.raises(ModelLoadError, match="berg-jax convert"):
        head.converted_components(tmp_path)


def test_projection_is_channels_last_fold_of_pca(env):
    """W_l rows are the channel-first PCA columns / scale, permuted to channels-last."""
    from berg_jax.berg_files import load_pca
    from berg_jax.s3d import TAP_NAMES, TAP_SHAPES

    pca = load_pca(env[0])
    projection = head.load_projection(env[0])
    t, h, w, c = TAP_SHAPES["features.13"]
    offset = 4_001_536  # spec section 5
    k = TAP_NAMES.index("features.13")
    ct, ht, wt, cc = 1, 5, 2, 700  # one position, channels-last
    cf_index = offset + ((cc * t + ct) * h + ht) * w + wt
    cl_index = ((ct * h + ht) * w + wt) * c + cc
    expected = pca["components"][:, cf_index] / pca["scale"][cf_index]
    np.testing.assert_allclose(projection["weights"][k][cl_index], expected, rtol=1e-6)
    bias = -(pca["components"].astype(np.float64) @ (pca["mean"] / pca["scale"]))
    np.testing.assert_allclose(projection["bias"], bias, rtol=1e-5, atol=1e-6)


def test_batches_and_padding(berg, model):
    """5 videos in batches of 2 (last one padded) equal each video encoded alone; one compile."""
    videos = np.concatenate([source_video(0)] * 5)
    videos[1:] = np.roll(videos[1:], shift=7, axis=-1)  # make the videos differ
    videos[3] = 255 - videos[3]
    default_batch, model.batch_size = model.batch_size, 2
    try:
        before = encode_frames._cache_size()
        together = berg.encode(model, videos, show_progress=False)
        assert encode_frames._cache_size() - before <= 1
        alone = np.concatenate([berg.encode(model, videos[i: i + 1], show_progress=False) for i in range(5)])
    finally:
        model.batch_size = default_batch
    # Batch size changes XLA's float32 accumulation order: equal within the parity tolerance.
    assert relative_error(together, alone) <= RTOL
    assert not np.allclose(together[0], together[3])


def test_roi_selection_equals_whole_brain_columns(env, berg, model):
    video = source_video(0)
    whole = berg.encode(model, video, show_progress=False)
    roi_model = berg.get_encoding_model(MODEL, subject=1, selection={"roi": "lFFA"})
    idx = roi_voxel_indices(load_metadata(env[0], 1), "lFFA")
    assert roi_model.n_voxels == len(idx) > 0
    np.testing.assert_array_equal(berg.encode(roi_model, video, show_progress=False), whole[:, idx])


def test_voxel_mask_selection_equals_whole_brain_columns(berg, model):
    video = source_video(0)
    whole = berg.encode(model, video, show_progress=False)
    mask = np.zeros(N_VOXELS[1], dtype=np.int64)
    mask[[0, 17, 5000, N_VOXELS[1] - 1]] = 1
    sub = berg.get_encoding_model(MODEL, subject=1, selection={"voxels": mask})
    np.testing.assert_array_equal(berg.encode(sub, video, show_progress=False), whole[:, mask.astype(bool)])


def test_return_metadata_and_get_model_metadata(env, berg, model):
    out, meta = berg.encode(model, source_video(0), return_metadata=True, show_progress=False)
    assert out.shape == (1, N_VOXELS[1])
    assert meta["fmri"]["sub_mask"].sum() == N_VOXELS[1]
    # Metadata needs neither the S3D weights nor the converted model.
    assert BERG(env[0], s3d_weights="/nonexistent.pth").get_model_metadata(MODEL, subject=1)["fmri"]["rois"]


def test_integer_dtypes_are_pixels(berg, model):
    video = source_video(0)
    np.testing.assert_array_equal(berg.encode(model, video.astype(np.int64), show_progress=False),
                                  berg.encode(model, video, show_progress=False))


def test_channels_last_stimulus(berg, model):
    video = source_video(0)
    np.testing.assert_array_equal(berg.encode(model, video.transpose(0, 1, 3, 4, 2), show_progress=False),
                                  berg.encode(model, video, show_progress=False))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(model_id="fmri-bmd-vit"), InvalidParameterError, "unknown model_id"),
        (dict(subject=0), InvalidParameterError, "subject"),
        (dict(subject=11), InvalidParameterError, "subject"),
        (dict(selection={"region": "lFFA"}), InvalidParameterError, "valid keys"),
        (dict(selection={"roi": "lFFAX"}), ValidationError, "lFFA"),
        (dict(selection={"voxels": np.ones(10)}), ValidationError, "108219"),
        (dict(selection={"voxels": np.full(N_VOXELS[1], 2)}), ValidationError, "binary"),
        (dict(selection={"voxels": np.zeros(N_VOXELS[1])}), ValidationError, "empty|no voxel"),
        (dict(device="quantum"), InvalidParameterError, "device"),
        (dict(device="tpu"), InvalidParameterError, "no TPU"),
    ],
)
def test_get_encoding_model_errors(berg, kwargs, error, match):
    args = dict(model_id=MODEL, subject=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        berg.get_encoding_model(**args)


@pytest.mark.parametrize(
    "stimulus,match",
    [
        (np.zeros((14, 3, 32, 32), np.uint8), "5-D"),
        (np.zeros((1, 14, 4, 32, 32), np.uint8), "3"),
        (np.zeros((1, 9, 3, 32, 32), np.uint8), "14"),
        (np.full((1, 14, 3, 32, 32), 300, np.int64), "0..255"),
    ],
)
def test_stimulus_errors(berg, model, stimulus, match):
    with pytest.raises(StimulusError, match=match):
        berg.encode(model, stimulus, show_progress=False)


def test_missing_s3d_weights_says_where_to_get_them(env):
    with pytest.raises(ModelLoadError, match="berg-jax fetch --s3d"):
        BERG(env[0], s3d_weights=env[0] / "missing.pth").get_encoding_model(MODEL, subject=1)


def test_missing_berg_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="berg-jax fetch"):
        BERG(tmp_path / "nope")


def test_missing_subject_files_name_them(env):
    with pytest.raises(ModelLoadError, match="weights_sub-02.npy"):
        BERG(env[0], s3d_weights=env[1]).get_encoding_model(MODEL, subject=2)


def test_encoder_is_a_pure_jax_function(berg, model):
    fn, params = encoder(model)
    frames = jnp.asarray(source_video(0)[:, np.linspace(0, 13, 14).astype(int)].transpose(0, 1, 3, 4, 2))
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(params, frames)),
                                  berg.encode(model, source_video(0), show_progress=False))


@pytest.mark.parametrize("chunk", [1, 2])
def test_backbone_chunks_equal_whole_batch(model, chunk):
    """S3D one (or two) videos at a time inside the jitted batch == the whole batch at once."""
    frames = np.concatenate([source_video(0), 255 - source_video(0), source_video(0) // 2])
    frames = frames[:, :14].transpose(0, 1, 3, 4, 2)
    whole = np.asarray(encode_frames(model.params, frames, precision=model.precision, backbone_chunk=None))
    chunked = np.asarray(encode_frames(model.params, frames, precision=model.precision, backbone_chunk=chunk))
    assert relative_error(chunked, whole) <= RTOL
