"""Differentiable in silico experiments: optimise a video to drive (or match) modelled responses.

    from berg_jax import BERG
    from berg_jax.optimize import optimize_stimulus, roi_mean

    model = BERG(berg_dir).get_encoding_model("fmri-bmd-s3d", subject=1, selection={"roi": "lFFA"})
    result = optimize_stimulus(model, roi_mean(model, "lFFA"), steps=50, size=(112, 112))
    result.clip            # float32 (14, 112, 112, 3) in [0, 1]
    result.trajectory      # float64 (51,): the objective before the first step and after each

The encoder is differentiable in float frames (0..1): preprocessing is an affine map
of the pixels, S3D is ReLU/max-pool (piecewise linear), the head is linear. The
optimiser is projected Adam: an optax Adam step on the pixels, then a clip back to [0, 1].
An objective maps one video's responses (n_voxels,) float32 to a scalar to MAXIMISE;
`roi_mean`, `roi_difference` and `match_pattern` build the usual ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from berg_jax import berg_files
from berg_jax.errors import InvalidParameterError
from berg_jax.preprocess import N_FRAMES, validate_stimulus

DEFAULT_SIZE = (112, 112)


# --------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """A named objective: `fn(responses (n_voxels,) float32) -> scalar`, to maximise.

    Any callable works as an objective; this one also carries a name for progress bars
    and summaries.
    """

    name: str
    fn: Callable[[jax.Array], jax.Array]

    def __call__(self, responses: jax.Array) -> jax.Array:
        return self.fn(responses)


def _check_single_subject(model: Any, what: str) -> int:
    """The model's subject, or an error: objectives index one subject's voxels."""
    subject = getattr(model, "subject", None)
    if isinstance(subject, bool) or not isinstance(subject, (int, np.integer)):
        raise InvalidParameterError(
            f"{what} needs a one-subject model, got subject={subject!r}; load one with "
            "berg.get_encoding_model('fmri-bmd-s3d', subject=N, ...) for a single N")
    return int(subject)


def roi_columns(model: Any, roi: str) -> np.ndarray:
    """Positions of ROI `roi`'s voxels among `model`'s output columns.

    Returns:
      int64 (n_roi,), in the ROI's stored voxel order, each in 0..model.n_voxels-1.
    Raises:
      InvalidParameterError: a several-subject model, or some of the ROI's voxels are not in
        the model's selection.
      ValidationError: `roi` is not one of the subject's ROIs (the message lists them).
    """
    subject = _check_single_subject(model, f"ROI {roi!r}")
    metadata = berg_files.load_metadata(model.berg_dir, subject)
    wanted = berg_files.roi_voxel_indices(metadata, roi)
    voxels = model.voxels_of(subject)
    if voxels is None:  # whole brain: output column j is voxel j
        return wanted
    voxels = np.asarray(voxels, dtype=np.int64)
    # The selection may be in any order (an ROI selection keeps the ROI's stored order).
    order = np.argsort(voxels, kind="stable")
    pos = np.minimum(np.searchsorted(voxels[order], wanted), len(voxels) - 1)
    found = voxels[order][pos] == wanted
    if not found.all():
        raise InvalidParameterError(
            f"ROI {roi!r}: {int((~found).sum())} of its {len(wanted)} voxels are not in this model's "
            f"selection ({model.selection!r}); load the model with selection=None (whole brain) or "
            f"a 'voxels' mask that covers the ROI")
    return order[pos]


def roi_mean(model: Any, roi: str) -> Objective:
    """Mean response of ROI `roi`'s voxels (which must be in the model's selection)."""
    cols = roi_columns(model, roi)
    return Objective(f"mean({roi})", lambda r: jnp.mean(r[cols]))


def roi_difference(model: Any, roi_a: str, roi_b: str) -> Objective:
    """mean(ROI a) - mean(ROI b): drive one region while suppressing another."""
    if roi_a == roi_b:
        raise InvalidParameterError(f"roi_difference: roi_a and roi_b are both {roi_a!r}; name two ROIs")
    a, b = roi_columns(model, roi_a), roi_columns(model, roi_b)
    return Objective(f"mean({roi_a}) - mean({roi_b})", lambda r: jnp.mean(r[a]) - jnp.mean(r[b]))


def match_pattern(target: Any, indices: Sequence[int] | np.ndarray | None = None) -> Objective:
    """Negative mean squared error to a target response pattern (0 is a perfect match).

    Args:
      target: float (n,), the responses to reproduce: n = the model's n_voxels, or
        n = len(indices).
      indices: optional output columns (0..n_voxels-1) the target is given for; the other
        columns are free.
    """
    t = np.asarray(target, dtype=np.float32)
    if t.ndim != 1 or t.size == 0 or not np.isfinite(t).all():
        raise InvalidParameterError(
            f"match_pattern: target must be a finite 1-D response vector, got shape {t.shape}"
            f"{'' if t.ndim != 1 or t.size == 0 else ' with NaN/inf'}; pass one row of responses, e.g. responses[0]")
    idx = None
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx.size and idx.min() < 0):
            raise InvalidParameterError(
                f"match_pattern: indices must be a 1-D array of non-negative output columns, got "
                f"shape {idx.shape} dtype {idx.dtype}")
        if idx.shape != t.shape:
            raise InvalidParameterError(
                f"match_pattern: target has {t.size} values but indices names {idx.size} columns; "
                "give one target value per index")
        idx = idx.astype(np.int64)

    def fn(r: jax.Array) -> jax.Array:
        # Shapes are static under jit, so a mismatch is caught here, at trace time (jax
        # would clamp an out-of-range index silently).
        n_cols = r.shape[-1]
        if idx is not None and idx.size and idx.max() >= n_cols:
            raise InvalidParameterError(
                f"match_pattern: index {int(idx.max())} is outside the model's {n_cols} output columns")
        picked = r if idx is None else r[idx]
        if picked.shape != t.shape:
            raise InvalidParameterError(
                f"match_pattern: target has {t.size} values but the model gives {n_cols} responses; "
                "pass a target of length model.n_voxels, or indices= naming the columns it covers")
        return -jnp.mean((picked - t) ** 2)

    return Objective("-mse(target)", fn)


# --------------------------------------------------------------------------- optimiser


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    """What `optimize_stimulus` returns.

    clip: float32 (14, H, W, 3) in [0, 1], the clip after the last step.
    trajectory: float64 (steps + 1,), the objective at the initial clip and after each step
      (Adam does not promise a monotone rise; the last value is `clip`'s).
    seconds: wall time of the optimisation, compilation included.
    """

    clip: np.ndarray
    trajectory: np.ndarray
    seconds: float = 0.0

    def clip_uint8(self) -> np.ndarray:
        """The clip as uint8 (14, H, W, 3) pixels, rounded (its objective differs slightly)."""
        return np.round(self.clip * 255).astype(np.uint8)


def initial_clip(init: Any = None, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """The starting clip: float32 (14, H, W, 3) in [0, 1].

    Args:
      init: None or an int seed -> uniform noise of `size` (None: a fresh random seed);
        or frames (T, H, W, 3) / (T, 3, H, W), uint8 0..255 or float 0..1; T > 14 is
        sampled to 14 frames with BERG's rule.
      size: (H, W) of the noise; ignored for an array init.
    """
    if init is None or (isinstance(init, (int, np.integer)) and not isinstance(init, bool)):
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"size must be (height, width), got {size!r}") from None
        if h < 1 or w < 1:
            raise InvalidParameterError(f"size must be positive (height, width), got {size!r}")
        return np.random.default_rng(init).random((N_FRAMES, h, w, 3), dtype=np.float32)
    arr = np.asarray(init)
    if arr.ndim != 4:
        raise InvalidParameterError(
            f"init must be one video's frames (14, H, W, 3), an int seed or None, got an array of shape "
            f"{arr.shape}; for one video of a batch pass videos[i]")
    clips, info = validate_stimulus(arr[None])  # StimulusError names what is wrong
    clip = np.asarray(clips[0])
    if not info.is_float:
        return clip.astype(np.float32) / np.float32(255)
    return clip.astype(np.float32)


def _param_sharding(params: Any) -> Any:
    """Where the model's parameters live; the clip goes there too (one device or replicated)."""
    leaves = jax.tree.leaves(params)
    return getattr(leaves[0], "sharding", None) if leaves else None


def optimize_stimulus(
    model: Any,
    objective: Callable[[jax.Array], jax.Array],
    init: Any = None,
    steps: int = 100,
    learning_rate: float = 0.05,
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
    show_progress: bool = True,
) -> OptimizeResult:
    """Find a video that maximises `objective(responses)`: projected Adam on the pixels.

    Each step computes the objective and its gradient with respect to the float clip in
    one jitted value_and_grad (S3D at the model's precision and conv_impl), takes an optax
    Adam step uphill, and clips the pixels back to [0, 1].

    Args:
      model: a one-subject `EncodingModel` (`BERG.get_encoding_model(..., subject=N)`).
      objective: responses float32 (model.n_voxels,) -> scalar to maximise, traceable by
        JAX (jnp ops); e.g. `roi_mean(model, "lFFA")`.
      init: starting clip (see `initial_clip`): None / int seed -> uniform noise of `size`,
        or frames (14, H, W, 3) uint8 0..255 or float 0..1.
      steps: Adam steps (>= 0).
      learning_rate: Adam's step size, in pixel units (0..1 scale).
      size: (H, W) of a noise init. The clip keeps its size; S3D sees it resized to 256x256
        and centre-cropped to 224x224, as every input.
      show_progress: a tqdm bar with the current objective.
    Returns:
      `OptimizeResult` (clip float32 (14, H, W, 3) in [0, 1]; trajectory float64 (steps+1,)).
    Raises:
      InvalidParameterError: a several-subject model, steps < 0, learning_rate <= 0, or an
        objective that does not return a scalar.
      StimulusError: an init array that is not valid frames.
    """
    from berg_jax.api import encoder

    subject = _check_single_subject(model, "optimize_stimulus")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise InvalidParameterError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(learning_rate, (int, float, np.floating)) and np.isfinite(learning_rate)
            and learning_rate > 0):
        raise InvalidParameterError(f"learning_rate must be a positive number (e.g. 0.05), got {learning_rate!r}")
    if not callable(objective):
        raise InvalidParameterError(
            f"objective must be a callable responses -> scalar (e.g. roi_mean(model, 'lFFA')), got "
            f"{type(objective).__name__}")
    fn, params = encoder(model)
    optimizer = optax.adam(learning_rate)

    def value(params: Any, clip: jax.Array) -> jax.Array:
        out = fn(params, clip[None])
        if isinstance(out, dict):  # a model that also returns components: keep the subject's responses
            out = out["responses"][subject]
        v = jnp.asarray(objective(out[0]))
        if v.shape != () or not jnp.issubdtype(v.dtype, jnp.floating):
            raise InvalidParameterError(
                f"objective must return a float scalar, got shape {v.shape} dtype {v.dtype}; reduce the "
                "responses, e.g. jnp.mean(responses[cols])")
        return v

    @jax.jit
    def step(params: Any, clip: jax.Array, state: Any) -> tuple[jax.Array, jax.Array, Any]:
        v, grad = jax.value_and_grad(value, argnums=1)(params, clip)
        # optax minimises: feed it the gradient of -objective.
        updates, state = optimizer.update(-grad, state, clip)
        return v, jnp.clip(optax.apply_updates(clip, updates), 0.0, 1.0), state

    start = time.perf_counter()
    clip = jax.device_put(jnp.asarray(initial_clip(init, size), jnp.float32), _param_sharding(params))
    state = optimizer.init(clip)
    trajectory = np.empty(int(steps) + 1, dtype=np.float64)
    name = getattr(objective, "name", getattr(objective, "__name__", "objective"))
    from tqdm.auto import tqdm

    with tqdm(total=int(steps), disable=not show_progress, desc=f"optimizing {name}", unit="step",
              dynamic_ncols=True) as bar:
        for k in range(int(steps)):
            v, clip, state = step(params, clip, state)
            trajectory[k] = float(v)  # also waits for the step: the bar shows real progress
            bar.set_postfix(objective=f"{trajectory[k]:.5g}", refresh=False)
            bar.update(1)
        # The last clip's value: one more step, its update discarded (no second compilation).
        trajectory[-1] = float(step(params, clip, state)[0])
        bar.set_postfix(objective=f"{trajectory[-1]:.5g}")
    return OptimizeResult(clip=np.asarray(clip, dtype=np.float32), trajectory=trajectory,
                          seconds=time.perf_counter() - start)
