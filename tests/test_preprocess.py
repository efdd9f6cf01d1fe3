"""Frame sampling, stimulus validation and S3D preprocessing, against torchvision bit for bit.

The live tests (marked `torch`) import torch/torchvision and skip where they are absent;
the committed fixtures cover the same ground offline: tests/fixtures/s3d_reference.npz
(four clips) and resize_reference.npz (torch's resize taps, torchvision's odd sizes).
"""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax.errors import StimulusError
from tests import reference
from berg_jax.preprocess import (
    CROP_SIZE,
    MEAN,
    N_FRAMES,
    STD,
    _preprocess_clip,
    _resize_crop,
    center_crop_offset,
    normalize_lut,
    pad_frame_indices,
    preprocess,
    preprocess_frames,
    resize_taps,
    sample_frame_indices,
    validate_stimulus,
)

_preprocess_frames_jit = jax.jit(preprocess_frames)


def _video(t: int, h: int, w: int, seed: int = 0, batch: tuple[int, ...] = ()) -> np.ndarray:
    """Random uint8 frames (*batch, t, h, w, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (*batch, t, h, w, 3), dtype=np.uint8)


def _torchvision():
    """(torch, S3D's preset transform, torch.nn.functional), or skip."""
    torch = pytest.importorskip("torch")
    # The CPU wheel's torchvision registers CUDA-only meta ops at import; S3D needs none.
    stub = types.ModuleType("torchvision._meta_registrations")
    sys.modules.setdefault("torchvision._meta_registrations", stub)
    pytest.importorskip("torchvision")
    from torchvision.models.video import S3D_Weights

    return torch, S3D_Weights.KINETICS400_V1.transforms(), torch.nn.functional


def _torch_reference(frames: np.ndarray) -> np.ndarray:
    """torchvision's preprocessing of (T, H, W, 3) frames, moved to channels-last (T, 224, 224, 3)."""
    torch, transform, _ = _torchvision()
    video = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))  # (T, 3, H, W)
    with torch.no_grad():
        return transform(video).permute(1, 2, 3, 0).numpy()  # (3, T, h, w) -> (T, h, w, 3)


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in float32 units in the last place (same-sign values)."""
    return int(np.abs(a.astype(np.float32).view(np.int32).astype(np.int64) - b.view(np.int32)).max())


# ---------------------------------------------------------------------------------------
# frame sampling


def test_sample_frame_indices_spec_values():
    assert sample_frame_indices(90).tolist() == [0, 6, 13, 20, 27, 34, 41, 47, 54, 61, 68, 75, 82, 89]
    assert sample_frame_indices(60).tolist() == [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49, 54, 59]
    assert sample_frame_indices(14).tolist() == list(range(14))
    assert sample_frame_indices(90).dtype == np.int64
    with pytest.raises(ValueError, match="at least 14 frames"):
        sample_frame_indices(13)


def test_pad_frame_indices_repeats_last_frame():
    assert pad_frame_indices(5).tolist() == [0, 1, 2, 3, 4] + [4] * 9
    assert pad_frame_indices(1).tolist() == [0] * 14


# ---------------------------------------------------------------------------------------
# taps, crop, lookup table


def test_resize_taps_hand_values():
    # 128 -> 256: scale 0.5, src = d/2 - 0.25, clamped at 0 and at the last pixel.
    i0, i1, w0, w1 = resize_taps(128, 256)
    assert (i0[0], i1[0], w0[0], w1[0]) == (0, 1, 1.0, 0.0)
    assert (i0[1], i1[1], w0[1], w1[1]) == (0, 1, 0.75, 0.25)
    assert (i0[2], i1[2], w0[2], w1[2]) == (0, 1, 0.25, 0.75)
    assert (i0[255], i1[255], w0[255], w1[255]) == (127, 127, 0.75, 0.25)
    assert w0.dtype == w1.dtype == np.float32 and i0.dtype == np.int64
    # 512 -> 256: every output sits halfway between two inputs.
    i0, i1, w0, w1 = resize_taps(512, 256)
    np.testing.assert_array_equal(i0, np.arange(256) * 2)
    np.testing.assert_array_equal(w1, np.full(256, 0.5, np.float32))
    assert center_crop_offset() == 16 and center_crop_offset(256, 224) == (256 - 224) // 2


def _torch_tap_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torch's interpolation weights (n_out, n_in), read off by interpolating the identity."""
    torch, _, functional = _torchvision()
    eye = torch.eye(n_in, dtype=torch.float32).reshape(1, n_in, 1, n_in)  # one channel per source pixel
    out = functional.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False, antialias=False)
    return out[0, :, 0, :].numpy().T


def _tap_matrix(n_in: int, n_out: int) -> np.ndarray:
    i0, i1, w0, w1 = resize_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


@pytest.mark.torch
@pytest.mark.parametrize("n_in", [1, 2, 97, 128, 131, 171, 255, 256, 257, 268, 320, 360, 480, 640, 854, 1280])
def test_resize_taps_match_torch(n_in):
    np.testing.assert_array_equal(_tap_matrix(n_in, 256), _torch_tap_matrix(n_in, 256))


@pytest.mark.torch
def test_lookup_table_matches_torchvision():
    torch, _, _ = _torchvision()
    import torchvision.transforms.functional as F

    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1).expand(3, 256, 1)
    ref = F.normalize(F.convert_image_dtype(levels, torch.float32), mean=MEAN.tolist(), std=STD.tolist())
    np.testing.assert_array_equal(normalize_lut(), ref[:, :, 0].numpy().T)


def test_lookup_table_matches_committed_fixture():
    ref = pytest.importorskip("tests.reference")
    np.testing.assert_array_equal(normalize_lut(), ref.load_reference()["lut"].T)


# ---------------------------------------------------------------------------------------
# bit-exactness against torchvision


@pytest.mark.torch
@pytest.mark.parametrize(
    "height, width, n_frames",
    [
        (256, 256, 14),  # no resize
        (360, 640, 14),  # the full 14-frame clip of a common size
        (240, 320, 2),
        (128, 171, 2),  # upscale
        (268, 268, 2),  # BMD's own size
        (97, 131, 3),  # non-dyadic upscale: where the float order matters
        (255, 257, 2),
        (256, 300, 1),  # one axis identity
        (480, 854, 1),
        (720, 1280, 1),
    ],
)
def test_uint8_bit_exact_vs_torchvision(height, width, n_frames):
    frames = _video(n_frames, height, width, seed=height * 7 + width)
    ours = np.asarray(_preprocess_frames_jit(frames))
    assert ours.shape == (n_frames, CROP_SIZE, CROP_SIZE, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _torch_reference(frames))


@pytest.mark.torch
def test_preprocess_samples_30_frames_like_berg():
    """BERG's layout (B, T, 3, H, W), T=30 sampled to 14, then torchvision on the kept frames."""
    video = _video(30, 240, 320, seed=3)
    ours = preprocess(np.ascontiguousarray(video.transpose(0, 3, 1, 2))[None])
    np.testing.assert_array_equal(ours[0], _torch_reference(video[sample_frame_indices(30)]))


@pytest.mark.torch
@pytest.mark.parametrize("height, width", [(97, 131), (360, 640), (256, 256)])
def test_float_input_matches_torchvision_float_path(height, width):
    """Float 0..1 input is torchvision's float convention: resize without rounding, (x - mean)/std."""
    frames = np.random.default_rng(1).random((2, height, width, 3), dtype=np.float32)
    ours = np.asarray(_preprocess_frames_jit(frames))
    ref = _torch_reference(frames)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    # Measured 0 on XLA:CPU; one ulp is allowed for backends that contract differently.
    assert _ulp_distance(ours, ref) <= 1


@pytest.mark.torch
def test_resize_float32_bits_match_torch_interpolate():
    """The unrounded resize reproduces torch's float32 bits: width first, fma(a, w0, b*w1).

    This is what keeps the uint8 rounding identical; if XLA ever stopped contracting
    `a*w0 + b*w1` this way, this test says so before a rare uint8 flip would.
    """
    torch, _, functional = _torchvision()
    frames = _video(2, 97, 131, seed=5)
    full = functional.interpolate(
        torch.from_numpy(frames.transpose(0, 3, 1, 2).astype(np.float32)),
        size=(256, 256), mode="bilinear", align_corners=False, antialias=False,
    )
    top = center_crop_offset()
    ref = full[:, :, top:top + CROP_SIZE, top:top + CROP_SIZE].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(jax.jit(_resize_crop)(frames)), ref)


def test_committed_fixture_crops():
    """Offline parity: the four reference clips against torchvision's stored crops and table."""
    ref = pytest.importorskip("tests.reference")
    lut = ref.load_reference()["lut"]
    for i, clip in enumerate(ref.reference_clips()):
        expected = lut[np.arange(3), ref.reference_crop(i)]
        np.testing.assert_array_equal(np.asarray(_preprocess_frames_jit(clip)), expected)


@pytest.mark.parametrize("n_in", reference.RESIZE_TAP_SIZES)
def test_resize_taps_match_committed_torch_taps(n_in):
    """Offline: berg-jax's taps against torch's own, stored by weights_convert/make_reference.py."""
    np.testing.assert_array_equal(_tap_matrix(n_in, 256), reference.torch_tap_matrix(n_in))


@pytest.mark.parametrize("i", range(len(reference.ODD_SOURCES)),
                         ids=[f"{h}x{w}" for h, w, _ in reference.ODD_SOURCES])
def test_odd_sizes_match_committed_torchvision(i):
    """Offline: uint8 noise of odd sizes against torchvision's stored output, bit for bit.

    The fixture holds SHA-256 digests of torchvision's whole float32 output and of its
    unrounded float32 resize crop, and its uint8 crop of the first frame on a strided grid
    (checked first, so a mismatch shows where).
    """
    ref = reference.load_resize_reference()
    frames = reference.odd_source_frames(i)
    assert reference.sha256_array(frames) == str(ref[f"odd_frames_sha256_{i}"]), "the seeded noise changed"
    ours = np.asarray(_preprocess_frames_jit(frames))
    s = reference.ODD_STRIDE
    lut = normalize_lut()  # (256, 3), checked against torchvision above
    expected = lut[ref[f"odd_crop_strided_{i}"], np.arange(3)]
    np.testing.assert_array_equal(ours[0, ::s, ::s], expected)
    assert reference.sha256_array(ours) == str(ref[f"odd_output_sha256_{i}"])
    unrounded = np.asarray(jax.jit(_resize_crop)(frames))
    assert reference.sha256_array(unrounded) == str(ref[f"odd_unrounded_sha256_{i}"])


# ---------------------------------------------------------------------------------------
# against a plain numpy port of the tap formula (its taps are berg-jax's own `resize_taps`:
# this checks the formula's float order, the tests above check the taps against torch's)


def _numpy_preprocess(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) uint8 -> (unrounded float32 resize crop, normalised float32), in numpy.

    The width pass is exact in float32 for uint8 input (weights are multiples of 2**-9).
    The row pass is torch's `fma(t0, w0, round(t1*w1))`: in float64 the product and the
    sum are exact (multiples of 2**-18 below 2**9), so one rounding to float32 is the fma.
    """
    h, w = frames.shape[1:3]
    top = center_crop_offset()
    keep = slice(top, top + CROP_SIZE)
    x = frames.astype(np.float32)
    c0, c1, cw0, cw1 = (a[keep] for a in resize_taps(w, 256))
    t = x[:, :, c0] * cw0[:, None] + x[:, :, c1] * cw1[:, None]  # (T, H, 224, 3)
    r0, r1, rw0, rw1 = (a[keep] for a in resize_taps(h, 256))
    b = (t[:, r1] * rw1[:, None, None]).astype(np.float32)
    y = (t[:, r0].astype(np.float64) * rw0[:, None, None].astype(np.float64) + b).astype(np.float32)
    levels = np.clip(np.round(y), 0, 255).astype(np.int64)
    return y, normalize_lut()[levels, np.arange(3)]


@pytest.mark.parametrize("height, width", [(97, 131), (360, 640), (33, 34)])
def test_resize_matches_numpy_port(height, width):
    frames = _video(2, height, width, seed=11)
    y, expected = _numpy_preprocess(frames)
    np.testing.assert_array_equal(np.asarray(jax.jit(_resize_crop)(frames)), y)
    np.testing.assert_array_equal(np.asarray(_preprocess_frames_jit(frames)), expected)


# ---------------------------------------------------------------------------------------
# dtypes, layouts, batching, conventions


def test_int64_and_other_integer_dtypes_equal_uint8():
    video = _video(14, 60, 80, seed=2, batch=(1,))
    base = preprocess(video)
    np.testing.assert_array_equal(preprocess(video.astype(np.int64)), base)
    np.testing.assert_array_equal(preprocess(video.astype(np.int16)), base)
    randint = np.random.randint(0, 256, size=(1, 14, 3, 20, 24))  # what BERG's examples pass
    assert randint.dtype.kind == "i"
    np.testing.assert_array_equal(preprocess(randint), preprocess(randint.astype(np.uint8)))


def test_channels_first_equals_channels_last_and_jax_input():
    video = _video(16, 40, 50, seed=4, batch=(2,))
    last = preprocess(video)
    assert last.shape == (2, N_FRAMES, CROP_SIZE, CROP_SIZE, 3) and last.dtype == np.float32
    first = preprocess(np.ascontiguousarray(video.transpose(0, 1, 4, 2, 3)))
    np.testing.assert_array_equal(first, last)
    np.testing.assert_array_equal(preprocess(jnp.asarray(video)), last)
    np.testing.assert_array_equal(preprocess(video.tolist()), last)


def test_preprocess_frames_leading_batch_dims():
    frames = _video(3, 30, 40, seed=6, batch=(2,))
    out = np.asarray(_preprocess_frames_jit(frames))
    assert out.shape == (2, 3, CROP_SIZE, CROP_SIZE, 3)
    np.testing.assert_array_equal(out[1], np.asarray(_preprocess_frames_jit(frames[1])))


def test_float_convention_zero_to_one():
    video = _video(14, 256, 256, seed=8, batch=(1,))
    as_float = video.astype(np.float32) / np.float32(255)
    # No resize: x/255 in float32 is exactly torch's uint8 path.
    np.testing.assert_array_equal(preprocess(as_float), preprocess(video))
    # With a resize the float path skips torch's uint8 rounding (half a level at most).
    small = _video(14, 40, 60, seed=9, batch=(1,))
    diff = np.abs(preprocess(small.astype(np.float32) / 255) - preprocess(small))
    assert diff.max() <= 0.5 / 255 / STD.min() + 1e-5


def test_float_input_is_differentiable():
    frames = jnp.asarray(np.random.default_rng(3).random((2, 40, 60, 3), dtype=np.float32))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(preprocess_frames(x) ** 2)))(frames)
    assert grad.shape == frames.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).sum()) > 0


def test_pad_short_repeats_last_frame():
    video = _video(5, 24, 32, seed=10, batch=(1,))
    out = preprocess(video, pad_short=True)
    np.testing.assert_array_equal(out, preprocess(video[:, pad_frame_indices(5)]))
    clips, info = validate_stimulus(video, pad_short=True)
    assert clips.shape == (1, 14, 24, 32, 3) and info.padded and info.n_frames == 5
    np.testing.assert_array_equal(clips[0, 4:], np.broadcast_to(video[0, 4], (10, 24, 32, 3)))


def test_validate_stimulus_info_and_layout():
    video = _video(90, 20, 30, seed=12, batch=(2,))
    chw = np.ascontiguousarray(video.transpose(0, 1, 4, 2, 3))
    clips, info = validate_stimulus(chw)
    assert clips.shape == (2, 14, 20, 30, 3) and clips.dtype == np.uint8
    np.testing.assert_array_equal(clips, video[:, sample_frame_indices(90)])
    assert info.channels_first and not info.padded and not info.is_float
    assert (info.n_videos, info.n_frames, info.height, info.width) == (2, 90, 20, 30)
    assert info.frame_indices.tolist() == sample_frame_indices(90).tolist()
    # Both axis 2 and the last axis are 3: BERG's channels-first reading wins.
    _, info = validate_stimulus(np.zeros((1, 14, 3, 5, 3), np.uint8))
    assert info.channels_first and (info.height, info.width) == (5, 3)
    clips, info = validate_stimulus(np.zeros((1, 14, 5, 7, 3), np.float64))
    assert not info.channels_first and info.is_float and clips.dtype == np.float32


@pytest.mark.parametrize(
    "stimulus, pad_short, match",
    [
        (np.zeros((14, 3, 8, 8), np.uint8), False,
         r"5-D array .* got 4-D shape \(14, 3, 8, 8\).*videos\[None\]"),
        (np.zeros((1, 14, 4, 8, 8), np.uint8), False, r"3 RGB channels .* got shape \(1, 14, 4, 8, 8\)"),
        (np.zeros((1, 13, 3, 8, 8), np.uint8), False, r"at least 14 frames, got 13; pass pad_short=True"),
        (np.zeros((0, 14, 3, 8, 8), np.uint8), False, r"empty"),
        (np.zeros((1, 0, 3, 8, 8), np.uint8), True, r"empty"),
        (np.full((1, 14, 3, 8, 8), 300, np.int64), False, r"0\.\.255, found min 300, max 300; rescale"),
        (np.full((1, 14, 3, 8, 8), -1, np.int32), False, r"0\.\.255, found min -1, max -1"),
        (np.full((1, 14, 3, 8, 8), 200.0, np.float32), False,
         r"0\.\.1 .* found min 200, max 200; .*0\.\.255 pixel values.*uint8"),
        (np.full((1, 14, 3, 8, 8), -0.5, np.float32), False,
         r"found min -0\.5, max -0\.5; rescale the values to 0\.\.1"),
        (np.full((1, 14, 3, 8, 8), np.nan, np.float32), False, r"NaN or infinite"),
        (np.zeros((1, 14, 3, 8, 8), bool), False, r"dtype bool is not a pixel type"),
        (np.zeros((1, 14, 3, 8, 8), np.complex64), False, r"not a pixel type"),
        ([[1, 2], [3]], False, r"could not be read as an array"),
    ],
)
def test_validation_errors(stimulus, pad_short, match):
    with pytest.raises(StimulusError, match=match):
        validate_stimulus(stimulus, pad_short=pad_short)
    with pytest.raises(StimulusError, match=match):
        preprocess(stimulus, pad_short=pad_short)


def test_out_of_range_found_in_any_kept_frame():
    video = np.zeros((1, 14, 8, 8, 3), np.int64)
    video[0, 13, 2, 3, 1] = 256
    with pytest.raises(StimulusError, match="min 0, max 256"):
        validate_stimulus(video)
    with pytest.raises(StimulusError, match="0..255"):
        validate_stimulus(jnp.asarray(video, dtype=jnp.int32))


def test_jit_compiles_once_per_shape():
    video = _video(14, 22, 26, seed=13, batch=(1,))
    preprocess(video)
    size = _preprocess_clip._cache_size()
    preprocess(video[:, ::-1].copy())
    preprocess(np.concatenate([video, video]))  # another batch size reuses the clip program
    assert _preprocess_clip._cache_size() == size
    preprocess(_video(14, 22, 27, seed=13, batch=(1,)))  # a new frame size compiles once more
    assert _preprocess_clip._cache_size() == size + 1
