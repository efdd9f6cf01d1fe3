"""frames -> voxels in one jitted function, and the batching around it.

`encode_frames` is the whole model as one pure function: uint8 frames (already sampled to
14, any H x W) -> preprocessing -> S3D -> per-tap projection -> regression -> float32
responses, vmapped over videos and compiled once per (batch, H, W, dtype).
`EncodingParams` is its parameter pytree. `run_batches` feeds it fixed-size batches
(the last one padded, never recompiled) and keeps the host busy while the device works.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from berg_jax.head import Projection, Regression, project_taps, regress
from berg_jax.preprocess import preprocess_frames
from berg_jax.s3d import S3D


class EncodingParams(NamedTuple):
    """Everything the encoder reads: S3D (folded), projection per tap, the subject's regression."""

    s3d: Any
    projection: Projection
    regression: Regression


def encode_clip(params: EncodingParams, frames: jax.Array, precision: Any = None, conv_impl: str = "2d") -> jax.Array:
    """One video: (14, H, W, 3) uint8 (or float 0..1) -> (N_sel,) float32 responses.

    Differentiable in float frames. vmap it, or use `encode_frames` for batches.
    """
    clip = preprocess_frames(frames)[None]
    taps = S3D(precision, conv_impl).apply({"params": params.s3d}, clip)
    components = project_taps(taps, params.projection, precision)
    return regress(components, params.regression, precision)[0]


@functools.partial(jax.jit, static_argnames=("precision", "conv_impl", "backbone_chunk"))
def encode_frames(
    params: EncodingParams,
    frames: jax.Array,
    precision: Any = None,
    conv_impl: str = "2d",
    backbone_chunk: int | None = None,
) -> jax.Array:
    """A batch: (B, 14, H, W, 3) uint8 (or float 0..1) -> (B, N_sel) float32 responses.

    The same function as `encode_clip` vmapped over videos, arranged for the hardware:
    preprocessing and the head run on the whole batch -- the projection's 1.6 GB of
    weights are read once per batch, not once per video -- while S3D runs `backbone_chunk`
    videos at a time (None: the whole batch). On XLA:CPU one video at a time is ~15%
    faster (its activations stay in cache); accelerators want the whole batch.
    """
    clips = jax.vmap(preprocess_frames)(frames)
    backbone = S3D(precision, conv_impl)
    if backbone_chunk is None or backbone_chunk >= clips.shape[0]:
        taps = backbone.apply({"params": params.s3d}, clips)
    else:
        # lax.map over chunks: the batch's taps (16 MB a video) are kept for the projection.
        taps = jax.lax.map(lambda c: backbone.apply({"params": params.s3d}, c[None]), clips,
                           batch_size=backbone_chunk)
        taps = {name: t[:, 0] for name, t in taps.items()}
    components = project_taps(taps, params.projection, precision)
    return regress(components, params.regression, precision)


def pad_batch(frames: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad (n, ...) to (batch_size, ...) by repeating the last clip, so the compiled shape is reused."""
    n = frames.shape[0]
    if n == batch_size:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], batch_size - n, axis=0)])


def run_batches(
    fn: Callable[[np.ndarray], jax.Array],
    batches: Iterable[tuple[Any, np.ndarray]],
    batch_size: int,
) -> Iterator[tuple[Any, np.ndarray]]:
    """Apply `fn` to (key, frames) batches of at most `batch_size`; yield (key, responses) in order.

    Each batch is dispatched before the previous result is pulled to the host, so decoding
    or copying the next batch overlaps the device's work on this one (JAX dispatch is
    asynchronous). Partial batches are padded to `batch_size` and the padding dropped.
    """
    pending: tuple[Any, int, jax.Array] | None = None
    for key, frames in batches:
        n = frames.shape[0]
        out = fn(pad_batch(np.asarray(frames), batch_size))
        if pending is not None:
            yield pending[0], np.asarray(pending[2])[: pending[1]]
        pending = (key, n, out)
    if pending is not None:
        yield pending[0], np.asarray(pending[2])[: pending[1]]
