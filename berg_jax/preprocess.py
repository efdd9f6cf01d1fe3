"""video frames -> clip: frame sampling and S3D's torchvision preprocessing, torch-exact.

The reference is torchvision's `S3D_Weights.KINETICS400_V1.transforms()` (a
`VideoClassification(crop_size=(224, 224), resize_size=(256, 256))`): bilinear resize to
256x256 (align_corners=False, antialias=False, aspect ratio not kept), round back to uint8,
centre crop 224x224, `/255`, normalise per channel, layout (C, T, 224, 224). berg-jax keeps
channels last: (..., T, 224, 224, C).

Numerics (measured against torch 2.13 CPU; the tests re-measure it live):

* Taps. For an output size of 256 the source coordinate `scale*(dst+0.5)-0.5` is exact in
  float32 (`scale = in/256` is dyadic and `in*(2*dst+1) < 2**24` for `in <= 32768`), so the
  taps do not depend on whether the compiler fuses that expression, and both weights are
  multiples of 2**-9.
* Order. PyTorch's CPU kernel interpolates the last axis (width) first, keeps that float32
  intermediate, then interpolates the rows; each 2-tap step is the single C++ expression
  `t0*w0 + t1*w1`. Its AVX2/AVX512 kernels (what x86 users get) are compiled with FMA
  contraction, which turns it into `fma(t0, w0, round(t1*w1))`; its scalar DEFAULT kernel
  (ATEN_CPU_CAPABILITY=default) rounds both products instead. Height-first, or `a + w*(b-a)`,
  or the other FMA operand order all give thousands of 1-ulp differences on non-dyadic
  upscales (e.g. 97x131), while all variants agree on the downscales tried (the
  products are then exact).
* XLA:CPU contracts `a*w0 + b*w1` the same way, `fma(a, w0, round(b*w1))` (LLVM fuses the
  left-hand product), so writing the expression in that operand order reproduces torch's
  float32 bits exactly, before rounding -- the tests check this against torch's float path.
  For uint8 input the width pass is exact anyway (an integer times a multiple of 2**-9
  fits in 17 bits), so only the row pass can ever round differently, and a different
  contraction would only flip a uint8 level when a value lies within one ulp of k+0.5.
* Dense interpolation matrices with `precision=HIGHEST` are NOT bit-exact (the dot's
  accumulation order is not torch's; 1-3 uint8 flips per 14-frame clip on non-dyadic
  upscales) and are ~20x slower on CPU than the gathers used here (14 frames of 360x640:
  ~75 ms vs ~3.5 ms).
* XLA rewrites `x / broadcast(c)` into `x * broadcast(1/c)` (not correctly rounded), so
  `(x/255 - mean)/std` computed in the graph is up to 1 ulp off torch. The uint8 path
  therefore reads a (256, 3) lookup table built in float32 numpy exactly as torch computes
  it; the float path divides by a full-shape std hidden behind an optimization barrier.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from berg_jax.errors import StimulusError
from berg_jax.frames import N_FRAMES, pad_frame_indices, sample_frame_indices

RESIZE_SIZE = 256
CROP_SIZE = 224
# torchvision's Kinetics-400 video normalisation; torch builds float32 tensors from them.
MEAN = np.array((0.43216, 0.394666, 0.37645), dtype=np.float32)
STD = np.array((0.22803, 0.22145, 0.216989), dtype=np.float32)

# The taps are exact in float32 only below this size (see the module docstring).
_MAX_SOURCE_SIZE = 32768


def resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap bilinear weights of PyTorch's CPU `upsample_bilinear2d` along one axis.

    align_corners=False, antialias=False, no explicit scale factor: per output index d,
    `scale = float32(in)/float32(out)`, `src = max(scale*(d+0.5) - 0.5, 0)`,
    `i0 = min(floor(src), in-1)`, `i1 = i0+1 if i0 < in-1 else i0`, `w1 = src - i0`
    (clamped to [0, 1] as torch does; never active), `w0 = 1 - w1`, all in float32.

    Args:
      in_size: source length (>= 1).
      out_size: destination length (>= 1).
    Returns:
      (i0, i1, w0, w1): int64 (out_size,), int64 (out_size,), float32 (out_size,),
      float32 (out_size,); output d is `w0[d]*x[i0[d]] + w1[d]*x[i1[d]]`.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=f32)
    src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
    w0 = f32(1) - w1
    return i0, i1, w0.astype(f32), w1.astype(f32)


def center_crop_offset(size: int = RESIZE_SIZE, crop: int = CROP_SIZE) -> int:
    """torchvision's centre-crop start, `int(round((size - crop) / 2))` (16 for 256 -> 224)."""
    return int(round((size - crop) / 2.0))


@functools.cache
def normalize_lut() -> np.ndarray:
    """The normalised value of every uint8 level, as torch computes it.

    torchvision: `x.to(float32) / 255`, then `(x - mean) / std` with float32 mean and std;
    numpy float32 division is correctly rounded like torch's, so this is bit-exact.

    Returns:
      float32 (256, 3), read-only: `lut[level, channel]`.
    """
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    lut = (levels[:, None] - MEAN[None, :]) / STD[None, :]
    lut.setflags(write=False)
    return lut


@dataclasses.dataclass(frozen=True)
class _AxisPlan:
    """How one spatial axis goes from `in_size` source pixels to the 224 cropped outputs.

    identity: the axis is already 256 long, so the resize is the identity (torch's weights
      are then exactly 1 and 0) and the crop is a slice.
    rows: sorted unique source indices any cropped output reads (what is gathered first).
    j0, j1: int32 (224,) positions of each output's two taps within `rows`.
    w0, w1: float32 (224,) the tap weights.
    """

    identity: bool
    rows: np.ndarray
    j0: np.ndarray
    j1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray


@functools.cache
def _axis_plan(in_size: int) -> _AxisPlan:
    """Taps of the 224 outputs that survive the crop, for a source axis of `in_size`."""
    top = center_crop_offset()
    keep = slice(top, top + CROP_SIZE)
    if in_size == RESIZE_SIZE:
        rows = np.arange(top, top + CROP_SIZE, dtype=np.int32)
        ident = np.arange(CROP_SIZE, dtype=np.int32)
        ones, zeros = np.ones(CROP_SIZE, np.float32), np.zeros(CROP_SIZE, np.float32)
        return _AxisPlan(True, rows, ident, ident, ones, zeros)
    i0, i1, w0, w1 = resize_taps(in_size, RESIZE_SIZE)
    i0, i1, w0, w1 = i0[keep], i1[keep], w0[keep], w1[keep]
    # Gathering only the source lines the crop needs keeps large sources cheap (720p: 448
    # of 720 rows); the second gather then indexes within that subset.
    rows = np.unique(np.concatenate([i0, i1]))
    j0 = np.searchsorted(rows, i0).astype(np.int32)
    j1 = np.searchsorted(rows, i1).astype(np.int32)
    return _AxisPlan(False, rows.astype(np.int32), j0, j1, w0, w1)


def _take(x: jax.Array, indices: np.ndarray, axis: int, sorted_unique: bool = False) -> jax.Array:
    """`x` indexed with static in-range `indices` along `axis`.

    The indices are known in bounds, so the gather skips jnp.take's out-of-bounds
    masking (about 2x faster on CPU).
    """
    index = [slice(None)] * x.ndim
    index[axis] = indices
    return x.at[tuple(index)].get(
        mode="promise_in_bounds", indices_are_sorted=sorted_unique, unique_indices=sorted_unique
    )


def _interp_axis(x: jax.Array, axis: int, plan: _AxisPlan) -> jax.Array:
    """Two-tap interpolation of float32 `x` along `axis` to the 224 cropped outputs.

    `x` holds only `plan.rows` along `axis` (already gathered). Written `a*w0 + b*w1` in
    this operand order on purpose: XLA:CPU then emits `fma(a, w0, round(b*w1))`, the same
    rounding as torch's AVX kernels (module docstring).
    """
    if plan.identity:
        return x
    shape = [1] * x.ndim
    shape[axis] = CROP_SIZE
    a = _take(x, plan.j0, axis)
    b = _take(x, plan.j1, axis)
    return a * plan.w0.reshape(shape) + b * plan.w1.reshape(shape)


def _resize_crop(frames: jax.Array) -> jax.Array:
    """Resize (..., H, W, C) to 256x256 torch's way and keep the 224x224 centre crop.

    Args:
      frames: (..., H, W, C), any real dtype; the arithmetic is float32.
    Returns:
      float32 (..., 224, 224, C), not rounded.
    """
    h, w = frames.shape[-3], frames.shape[-2]
    if max(h, w) > _MAX_SOURCE_SIZE:
        raise ValueError(f"frames of {h}x{w} exceed {_MAX_SOURCE_SIZE} pixels per side")
    rows, cols = _axis_plan(h), _axis_plan(w)
    # Cut both axes down to the lines the crop needs while still in the input dtype
    # (uint8 moves 4x less memory than float32).
    x = frames
    if rows.identity:
        x = jax.lax.slice_in_dim(x, int(rows.rows[0]), int(rows.rows[0]) + CROP_SIZE, axis=-3)
    else:
        x = _take(x, rows.rows, x.ndim - 3, sorted_unique=True)
    if cols.identity:
        x = jax.lax.slice_in_dim(x, int(cols.rows[0]), int(cols.rows[0]) + CROP_SIZE, axis=-2)
    else:
        x = _take(x, cols.rows, x.ndim - 2, sorted_unique=True)
    # float32 arithmetic (uint8, float16, bfloat16, float32 input), float64 for float64 input.
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    # Width first, then rows: torch's order, and the order its float32 rounding follows.
    x = _interp_axis(x, x.ndim - 2, cols)
    return _interp_axis(x, x.ndim - 3, rows)


def preprocess_frames(frames: jax.Array) -> jax.Array:
    """torchvision's S3D preprocessing of RGB frames, channels last; pure and jit-able.

    Integer input (uint8, or any integer dtype holding 0..255): bit-exact with torchvision
    `S3D_Weights.KINETICS400_V1.transforms()` -- bilinear resize to 256x256 (skipped at
    256x256), round half to even, crop rows/cols 16..239, `(x/255 - mean)/std` via a
    256-level lookup table. Values outside 0..255 are clipped here (jit cannot raise);
    `validate_stimulus` rejects them before.

    Float input: pixel values on the 0..1 scale (torchvision's convention for float images,
    so a float video gives what BERG gives for it): the same resize without rounding or
    clipping, then `(x - mean)/std` -- an affine, differentiable function of the pixels. Matches torchvision's float path to <= 1 ulp
    (bit-exact on XLA:CPU). `u8.astype(float32) / 255` at 256x256 gives exactly the uint8
    result; with a resize it differs from it by the skipped uint8 rounding.

    Args:
      frames: (..., T, H, W, 3) (any leading dims; T is not constrained here), uint8 /
        integer or float (float16/bfloat16 are computed in float32, float64 in float64). H, W static.
    Returns:
      float32 (..., T, 224, 224, 3); float64 for float64 input.
    """
    frames = jnp.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"expected (..., H, W, 3) frames, got shape {frames.shape}")
    if jnp.issubdtype(frames.dtype, jnp.integer):
        x = _resize_crop(frames)
        # Rounding and the lookup are what torch does after its resize (round, cast to uint8,
        # /255, normalise); at 256x256 the values are already integers.
        levels = jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)
        channel = jnp.arange(3, dtype=jnp.int32)
        return jnp.asarray(normalize_lut()).at[levels, channel].get(mode="promise_in_bounds")
    # float64 input (under jax_enable_x64) stays float64, so the whole model can run in
    # float64 (gradient checks against finite differences); other floats compute in float32.
    x = _resize_crop(frames if frames.dtype == jnp.float64 else frames.astype(jnp.float32))
    # A full-shape divisor behind a barrier keeps XLA from turning the division into a
    # (not correctly rounded) multiplication by 1/std.
    std = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(STD), x.shape))
    return (x - jnp.asarray(MEAN)) / std


@dataclasses.dataclass(frozen=True)
class StimulusInfo:
    """What `validate_stimulus` found and did.

    n_videos: B. n_frames: T of the input. height, width: source frame size.
    channels_first: whether the input was (B, T, 3, H, W) (BERG's layout).
    dtype: the input dtype's name. is_float: float convention (0..1) vs integer (0..255).
    frame_indices: int64 (14,) the input frames kept, sampled or padded.
    padded: True when T < 14 was padded with the last frame.
    value_range: (min, max) of the kept frames; None for uint8, whose range needs no check.
    """

    n_videos: int
    n_frames: int
    height: int
    width: int
    channels_first: bool
    dtype: str
    is_float: bool
    frame_indices: np.ndarray
    padded: bool
    value_range: tuple[float, float] | None


def _check_stimulus(videos: Any, pad_short: bool, sample: bool = True) -> tuple[Any, StimulusInfo]:
    """`validate_stimulus` without the final move of the channel axis (see there).

    With sample=False, uint8 input (which needs no value pass and no conversion) comes back
    as given, all T frames, uncopied; other dtypes are sampled and converted as always.
    """
    if isinstance(videos, jax.Array):
        xp: Any = jnp
        arr = videos
    else:
        xp = np
        try:
            arr = np.asarray(videos)
        except Exception as exc:  # ragged nested lists and the like
            raise StimulusError(f"the stimulus could not be read as an array: {exc}") from exc
    shape = tuple(arr.shape)
    if arr.ndim != 5:
        raise StimulusError(
            f"the stimulus must be a 5-D array (B, T, 3, H, W) or (B, T, H, W, 3), got {arr.ndim}-D "
            f"shape {shape}; add a batch axis for a single video (videos[None])"
        )
    if shape[2] == 3:
        channels_first = True
    elif shape[4] == 3:
        channels_first = False
    else:
        raise StimulusError(
            f"the stimulus needs 3 RGB channels on axis 2 (B, T, 3, H, W) or on the last axis "
            f"(B, T, H, W, 3), got shape {shape}; convert grayscale or RGBA frames to RGB"
        )
    b, t = shape[0], shape[1]
    h, w = (shape[3], shape[4]) if channels_first else (shape[2], shape[3])
    if min(b, t, h, w) == 0:
        raise StimulusError(f"the stimulus is empty: shape {shape}")
    if max(h, w) > _MAX_SOURCE_SIZE:
        raise StimulusError(f"frames of {h}x{w} are too large (at most {_MAX_SOURCE_SIZE} pixels per side)")

    dtype = np.dtype(arr.dtype)
    is_int = bool(np.issubdtype(dtype, np.integer))
    # bfloat16 (ml_dtypes) is not a numpy floating subtype.
    is_float = bool(np.issubdtype(dtype, np.floating)) or dtype == np.dtype(jnp.bfloat16)
    if not (is_int or is_float):
        raise StimulusError(
            f"the stimulus dtype {dtype} is not a pixel type; pass uint8 (0..255) or float (0..1)"
        )

    if t < N_FRAMES:
        if not pad_short:
            raise StimulusError(
                f"videos need at least {N_FRAMES} frames, got {t}; pass pad_short=True to repeat "
                "the last frame (what BERG's training code did)"
            )
        indices, padded = pad_frame_indices(t), True
    else:
        indices, padded = sample_frame_indices(t), False

    # Sample before checking values: most frames of a long video are dropped.
    clips = arr if t == N_FRAMES or (dtype == np.uint8 and not sample) else arr[:, indices]
    value_range: tuple[float, float] | None = None
    if is_float:
        if not bool(xp.all(xp.isfinite(clips))):
            raise StimulusError("the stimulus contains NaN or infinite values; floats must be finite 0..1")
        lo, hi = float(xp.min(clips)), float(xp.max(clips))
        if lo < 0.0 or hi > 1.0:
            if lo >= 0.0 and hi <= 255.0:
                hint = (
                    "these look like 0..255 pixel values: pass them as uint8 "
                    "(videos.astype(np.uint8)) or divide by 255"
                )
            else:
                hint = "rescale the values to 0..1"
            raise StimulusError(
                f"float stimulus values must lie in 0..1 (torchvision's float convention), "
                f"found min {lo:g}, max {hi:g}; {hint}"
            )
        value_range = (lo, hi)
        clips = clips.astype(np.float32)
    elif dtype != np.uint8:
        lo_i, hi_i = int(xp.min(clips)), int(xp.max(clips))
        if lo_i < 0 or hi_i > 255:
            raise StimulusError(
                f"integer stimulus values must be pixel values 0..255, found min {lo_i}, max {hi_i}; "
                "rescale them to 0..255 (and pass uint8), or pass floats in 0..1"
            )
        value_range = (lo_i, hi_i)
        clips = clips.astype(np.uint8)
    info = StimulusInfo(
        n_videos=b,
        n_frames=t,
        height=h,
        width=w,
        channels_first=channels_first,
        dtype=str(dtype),
        is_float=is_float,
        frame_indices=indices,
        padded=padded,
        value_range=value_range,
    )
    return clips, info


def validate_stimulus(videos: Any, pad_short: bool = False) -> tuple[Any, StimulusInfo]:
    """Check a video batch and bring it to (B, 14, H, W, 3): the one place stimulus checks live.

    Layout: (B, T, 3, H, W) (BERG's) or (B, T, H, W, 3). Axis 2 of size 3 with a last axis
    that is not 3 -> channels first; last axis 3 -> channels last; both 3 -> channels first,
    as BERG (a 3-pixel-wide video is not a use case).
    Values: integer dtypes (uint8, int64 from np.random.randint, ...) are pixel values
    0..255; float dtypes are 0..1 (torchvision's float convention) and must be finite.
    Frames: T >= 14 are sampled with `sample_frame_indices(T)` (T = 14 keeps all); T < 14 is
    an error unless `pad_short`, which repeats the last frame (BERG's training code).

    Args:
      videos: numpy array, jax.Array or array-like, 5-D, real numeric dtype.
      pad_short: pad videos shorter than 14 frames instead of raising.
    Returns:
      (clips, info): clips uint8 (integer input) or float32 (float input), shape
      (B, 14, H, W, 3) -- numpy (possibly a transposed view) for numpy/array-like input, a
      jax.Array for jax input; info a `StimulusInfo`.
    Raises:
      StimulusError: not 5-D, empty, no channel axis of 3, T < 14 without pad_short, a
        non-numeric dtype, integer values outside 0..255, non-finite or out-of-range floats.
    """
    clips, info = _check_stimulus(videos, pad_short)
    if info.channels_first:
        clips = (jnp if isinstance(clips, jax.Array) else np).moveaxis(clips, 2, -1)
    return clips, info


def check_stimulus(videos: Any, pad_short: bool = False) -> tuple[Any, StimulusInfo]:
    """`validate_stimulus`'s checks without its copies, for feeding a device batch by batch.

    Returns:
      (source, info): `source` is uint8 input as given -- (B, T, 3, H, W) or
      (B, T, H, W, 3), all T frames, not copied -- or, for other dtypes, the sampled and
      converted (B, 14, ...) clips in the input's layout. Take batches with `feed.sample_batch`.
    Raises:
      StimulusError: as `validate_stimulus`.
    """
    return _check_stimulus(videos, pad_short, sample=False)


@functools.partial(jax.jit, static_argnames="channels_first")
def _preprocess_clip(clip: jax.Array, channels_first: bool) -> jax.Array:
    """One clip (14, 3, H, W) or (14, H, W, 3) -> float32 (14, 224, 224, 3).

    Taking the input layout as is lets XLA fuse the transposition into the gathers; a
    transposed host copy costs more than the whole preprocessing (720p: ~50 ms vs ~4 ms).
    """
    if channels_first:
        clip = jnp.moveaxis(clip, -3, -1)
    return preprocess_frames(clip)


def preprocess(videos: Any, pad_short: bool = False) -> np.ndarray:
    """Validate, sample and preprocess a video batch exactly as BERG's S3D model sees it.

    Args:
      videos: (B, T, 3, H, W) (BERG's layout) or (B, T, H, W, 3); numpy, jax or array-like.
        Integer dtypes are pixel values 0..255 (bit-exact with torchvision); float dtypes
        are 0..1 (torchvision's convention). See `validate_stimulus` for every rule.
      pad_short: repeat the last frame of videos shorter than 14 frames instead of raising.
    Returns:
      float32 numpy array (B, 14, 224, 224, 3), channels last (torchvision's is
      (B, 3, 14, 224, 224)). Clips go through one at a time, so every batch size reuses
      the program compiled for (H, W, dtype, layout); inside a larger jitted model use
      `preprocess_frames`.
    Raises:
      StimulusError: see `validate_stimulus`.
    """
    clips, info = _check_stimulus(videos, pad_short)
    out = np.empty((info.n_videos, N_FRAMES, CROP_SIZE, CROP_SIZE, 3), dtype=np.float32)
    for i in range(info.n_videos):
        out[i] = np.asarray(_preprocess_clip(clips[i], channels_first=info.channels_first))
    return out
