"""frames -> voxels in one jitted function, and the batching around it.

`encode_frames` is the whole model as one pure function: uint8 frames (already sampled to
14, any H x W) -> preprocessing -> S3D -> per-tap projection -> regression -> float32
responses, vmapped over videos and compiled once per (batch, H, W, dtype).
`EncodingParams` is its parameter pytree. `encode_outputs` is the same model with any
number of heads on one backbone pass (every subject, and/or the K components themselves).
`run_batches` feeds either fixed-size batches (the last one padded, never recompiled) and
keeps the host busy while the device works.
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
    """Everything the encoder reads: S3D (folded), projection per tap, the regression.

    `regression` is one subject's `Regression` for `encode_frames`, or {subject: Regression}
    (possibly empty) for `encode_outputs`.
    """

    s3d: Any
    projection: Projection
    regression: Regression | dict[int, Regression]


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
    components = frames_to_components(params, frames, precision, conv_impl, backbone_chunk)
    return regress(components, params.regression, precision)


def frames_to_components(
    params: EncodingParams,
    frames: jax.Array,
    precision: Any = None,
    conv_impl: str = "2d",
    backbone_chunk: int | None = None,
) -> jax.Array:
    """(B, 14, H, W, 3) frames -> (B, K) float32 components: everything before the heads."""
    clips = jax.vmap(preprocess_frames)(frames)
    backbone = S3D(precision, conv_impl)
    if backbone_chunk is None or backbone_chunk >= clips.shape[0]:
        taps = backbone.apply({"params": params.s3d}, clips)
    else:
        # lax.map over chunks: the batch's taps (16 MB a video) are kept for the projection.
        taps = jax.lax.map(lambda c: backbone.apply({"params": params.s3d}, c[None]), clips,
                           batch_size=backbone_chunk)
        taps = {name: t[:, 0] for name, t in taps.items()}
    return project_taps(taps, params.projection, precision)


@functools.partial(jax.jit, static_argnames=("precision", "conv_impl", "backbone_chunk", "with_components"))
def encode_outputs(
    params: EncodingParams,
    frames: jax.Array,
    precision: Any = None,
    conv_impl: str = "2d",
    backbone_chunk: int | None = None,
    with_components: bool = False,
) -> dict[str, Any]:
    """One backbone pass, every head: (B, 14, H, W, 3) -> {"responses": {subject: (B, N_sel_s)}, "components": (B, K)}.

    `params.regression` is {subject: Regression}; S3D and the projection (97% of the work)
    run once however many subjects there are. "components" is included when
    `with_components`; `regress(components, head)` recomputes any subject's responses.
    """
    components = frames_to_components(params, frames, precision, conv_impl, backbone_chunk)
    out: dict[str, Any] = {"responses": {s: regress(components, r, precision) for s, r in params.regression.items()}}
    if with_components:
        out["components"] = components
    return out


def flat_outputs(result: dict[str, Any]) -> dict[int | str, Any]:
    """`encode_outputs`' nested result -> {subject: responses, ..., "components": components}.

    (Nested inside JAX because a pytree's dict keys must sort: ints and strings don't mix.)
    """
    flat: dict[int | str, Any] = dict(result["responses"])
    if "components" in result:
        flat["components"] = result["components"]
    return flat


def _take_rows(result: Any, n: int) -> Any:
    """The first n rows of every array of a result (an array, or a dict of them), on the host."""
    return jax.tree.map(lambda a: np.asarray(a)[:n], result)


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
    """Apply `fn` to (key, frames) batches of at most `batch_size`; yield (key, result) in order.

    `fn`'s result is an array or a dict of arrays (`encode_outputs`), rows = videos.

    Each batch is dispatched before the previous result is pulled to the host, so decoding
    or copying the next batch overlaps the device's work on this one (JAX dispatch is
    asynchronous). Partial batches are padded to `batch_size` and the padding dropped.
    """
    pending: tuple[Any, int, jax.Array] | None = None
    for key, frames in batches:
        n = frames.shape[0]
        out = fn(pad_batch(np.asarray(frames), batch_size))
        if pending is not None:
            yield pending[0], _take_rows(pending[2], pending[1])
        pending = (key, n, out)
    if pending is not None:
        yield pending[0], _take_rows(pending[2], pending[1])
