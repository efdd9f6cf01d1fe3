"""frames -> voxels in one jitted function.

`encode_frames` is the whole model as one pure function: uint8 frames (already sampled to
14, any H x W) -> preprocessing -> S3D -> per-tap projection -> regression -> float32
responses, vmapped over videos and compiled once per (batch, H, W, dtype).
`EncodingParams` is its parameter pytree. `encode_outputs` is the same model with any
number of heads on one backbone pass (every subject, and/or the K components themselves).
Feeding it (batches, transfers, results back) is `berg_jax.feed`'s job.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from berg_jax.head import Projection, Regression, project_taps, regress
from berg_jax.preprocess import preprocess_frames
from berg_jax.s3d import S3D

# Key of the ROI-mean outputs (the same string as `roi_means.ROI_MEANS`, which imports the
# heads' loaders; fused stays free of file I/O).
ROI_MEANS = "roi_means"


class EncodingParams(NamedTuple):
    """Everything the encoder reads: S3D (folded), projection per tap, the regression.

    `regression` is one subject's `Regression` for `encode_frames`, or {subject: Regression}
    (possibly empty) for `encode_outputs`. `roi_means`: None, or {subject: Regression} of
    the subjects' ROI-mean heads (coef (K, R), `roi_means.fold_roi_means`) for `encode_outputs`.
    """

    s3d: Any
    projection: Projection
    regression: Regression | dict[int, Regression]
    roi_means: dict[int, Regression] | None = None


def encode_clip(params: EncodingParams, frames: jax.Array, precision: Any = None, conv_impl: str = "2d") -> jax.Array:
    """One video: (14, H, W, 3) uint8 (or float 0..1) -> (N_sel,) float32 responses.

    Differentiable in float frames. vmap it, or use `encode_frames` for batches.
    `precision`: "highest" | "tf32" | "bf16" (`berg_jax.precision`; None, lax's default, is
    "tf32"); "bf16" runs on bfloat16 params as `get_encoding_model` stores them (float32
    ones are cast per call). Preprocessing is float32 and responses float32 in every mode.
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
    n_valid: jax.Array | int | None = None,
    channels_first: bool = False,
    frame_indices: tuple[int, ...] | None = None,
) -> jax.Array:
    """(B, 14, H, W, 3) frames -> (B, K) float32 components: everything before the heads.

    `channels_first`: frames are (B, 14, 3, H, W) (BERG's layout) and are moved to channels
    last here, on the device, where the move fuses into preprocessing's first gather (a
    host-side transposed copy costs more than the whole preprocessing).
    `n_valid` (with `backbone_chunk`): only the first n_valid videos are real, the rest are
    padding; S3D runs on the real ones only and the padded rows' taps are zeros.
    `frame_indices`: frames are (B, T, ...) and these 14 are kept, on the device (cheaper
    than a host-side gather when T is close to 14).
    """
    if frame_indices is not None:
        frames = jnp.take(frames, jnp.asarray(frame_indices, jnp.int32), axis=1)
    if channels_first:
        frames = jnp.moveaxis(frames, -3, -1)
    clips = jax.vmap(preprocess_frames)(frames)
    taps = run_backbone(params.s3d, clips, precision, conv_impl, backbone_chunk, n_valid)
    return project_taps(taps, params.projection, precision)


def backbone_apply(s3d_params: Any, clips: jax.Array, precision: Any = None, conv_impl: str = "2d") -> dict[str, jax.Array]:
    """S3D on (N, 14, 224, 224, 3) clips -> {tap: (N, T, H, W, C)}: every S3D call of the encoder goes through here."""
    return S3D(precision, conv_impl).apply({"params": s3d_params}, clips)


def run_backbone(
    s3d_params: Any,
    clips: jax.Array,
    precision: Any = None,
    conv_impl: str = "2d",
    backbone_chunk: int | None = None,
    n_valid: jax.Array | int | None = None,
) -> dict[str, jax.Array]:
    """S3D on a batch of clips, whole or `backbone_chunk` clips at a time.

    Chunked, the chunks run in a loop whose trip count is `ceil(n_valid / chunk)` at run
    time, so a padded tail batch costs its real clips, not the compiled batch size (rows
    past n_valid get zero taps). The batch's taps (16 MB a video) are kept for the projection.
    """
    b = clips.shape[0]
    if backbone_chunk is None or backbone_chunk >= b:
        return backbone_apply(s3d_params, clips, precision, conv_impl)
    c = int(backbone_chunk)
    if b % c:  # uneven chunks: a static map over every clip (no saving on padding)
        taps = jax.lax.map(lambda x: backbone_apply(s3d_params, x[None], precision, conv_impl), clips, batch_size=c)
        return {name: t[:, 0] for name, t in taps.items()}
    shapes = jax.eval_shape(lambda x: backbone_apply(s3d_params, x, precision, conv_impl), clips[:c])
    empty = {name: jnp.zeros((b, *s.shape[1:]), s.dtype) for name, s in shapes.items()}
    n = b if n_valid is None else jnp.clip(jnp.asarray(n_valid, jnp.int32), 0, b)

    def one_chunk(i: jax.Array, taps: dict[str, jax.Array]) -> dict[str, jax.Array]:
        chunk = jax.lax.dynamic_slice_in_dim(clips, i * c, c)
        out = backbone_apply(s3d_params, chunk, precision, conv_impl)
        return {name: jax.lax.dynamic_update_slice_in_dim(taps[name], out[name], i * c, 0) for name in taps}

    return jax.lax.fori_loop(0, (n + c - 1) // c, one_chunk, empty)


@functools.partial(jax.jit, static_argnames=("precision", "conv_impl", "backbone_chunk", "with_components",
                                             "channels_first", "frame_indices"))
def encode_outputs(
    params: EncodingParams,
    frames: jax.Array,
    precision: Any = None,
    conv_impl: str = "2d",
    backbone_chunk: int | None = None,
    with_components: bool = False,
    n_valid: jax.Array | int | None = None,
    channels_first: bool = False,
    frame_indices: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """One backbone pass, every head: (B, 14, H, W, 3) -> {"responses": {subject: (B, N_sel_s)},
    "components": (B, K), "roi_means": {subject: (B, R_s)}}, all float32.

    `params.regression` is {subject: Regression}; S3D and the projection (97% of the work)
    run once however many subjects there are. "components" is included when
    `with_components`; `regress(components, head)` recomputes any subject's responses.
    "roi_means" is included when `params.roi_means` holds ROI-mean heads: the same
    components through a (K, R) matmul per subject.
    `channels_first`: frames are (B, T, 3, H, W); `frame_indices`: keep these 14 of T
    frames (on the device). `n_valid` (a traced int, so every tail
    size shares one program): rows from n_valid on are padding, skipped by a chunked
    backbone (see `run_backbone`); their outputs are meaningless.
    """
    components = frames_to_components(params, frames, precision, conv_impl, backbone_chunk, n_valid, channels_first,
                                      frame_indices)
    out: dict[str, Any] = {"responses": {s: regress(components, r, precision) for s, r in params.regression.items()}}
    if with_components:
        out["components"] = components
    if params.roi_means:
        out[ROI_MEANS] = {s: regress(components, r, precision) for s, r in params.roi_means.items()}
    return out


def flat_outputs(result: dict[str, Any]) -> dict[int | str | tuple[str, int], Any]:
    """`encode_outputs`' nested result -> {subject: responses, ..., "components": components,
    ("roi_means", subject): ROI means, ...}.

    (Nested inside JAX because a pytree's dict keys must sort: ints and strings don't mix.)
    """
    flat: dict[int | str | tuple[str, int], Any] = dict(result["responses"])
    if "components" in result:
        flat["components"] = result["components"]
    for s, means in result.get(ROI_MEANS, {}).items():
        flat[(ROI_MEANS, s)] = means
    return flat
