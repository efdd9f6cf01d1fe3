"""taps -> components -> voxels: BERG's scaler, PCA and regression as per-tap matmuls.

sklearn's head (spec section 8) is `((f - mean)/scale) @ components.T @ coef.T + intercept`
on the 4,084,096-wide concatenation f of the seven taps, flattened channel-first. Folded
once, in float64, into

    p = sum_l tap_l @ W_l + b,   W = (components / scale).T,   b = -(mean / scale) @ components.T

with W split per tap and its rows permuted to the channels-last order of the Flax taps, so
no F-wide vector is ever built and no transpose runs per video. The regression stays a
separate (K, N_s) matmul: folding it into W would make an F x N_s matrix.

The folded projection and each subject's regression are saved with orbax under
`<berg_dir>/<MODEL_ROOT>/berg_jax/`, so the 1.7 GB pickle is read once per berg_dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from berg_jax import berg_files
from berg_jax.atomic import atomic_write_text
from berg_jax.errors import ModelLoadError
from berg_jax.precision import resolve as resolve_precision
from berg_jax.s3d import TAP_NAMES, TAP_SHAPES

CONVERTED_DIR = "berg_jax"
FORMAT = "berg-jax-head/1"

Projection = dict[str, Any]  # {"weights": [(n_l, K)] * 7 in TAP_NAMES order, "bias": (K,)}
Regression = dict[str, Any]  # {"coef": (K, N_sel), "intercept": (N_sel,)}


def channels_last_rows(tap: str) -> np.ndarray:
    """For each channels-last flat position of `tap`, its channel-first flat position (int64)."""
    t, h, w, c = TAP_SHAPES[tap]
    return np.arange(c * t * h * w).reshape(c, t, h, w).transpose(1, 2, 3, 0).ravel()


def fold_projection(pca: dict[str, np.ndarray], dtype: Any = np.float32) -> Projection:
    """Scaler + PCA as per-tap weights on channels-last taps, computed in float64.

    Args:
      pca: `berg_files.load_pca` output: mean (F,), scale (F,), components (K, F).
    Returns:
      {"weights": [W_l (n_l, K)] in TAP_NAMES order, "bias": (K,)}, numpy arrays of `dtype`.
    """
    mean, scale, components = pca["mean"], pca["scale"], pca["components"]
    k = components.shape[0]
    weights, bias, offset = [], np.zeros(k), 0
    for tap in TAP_NAMES:
        n = int(np.prod(TAP_SHAPES[tap]))
        cols = slice(offset, offset + n)
        inv_scale = 1.0 / scale[cols].astype(np.float64)
        # Taken tap by tap so no (K, F) float64 copy exists (3.3 GB at K = 100).
        w = components[:, cols].astype(np.float64) * inv_scale
        bias -= w @ mean[cols].astype(np.float64)
        weights.append(np.ascontiguousarray(w.T[channels_last_rows(tap)], dtype=dtype))
        offset += n
    if offset != components.shape[1]:
        raise ModelLoadError(f"the taps cover {offset} features but the PCA has {components.shape[1]}")
    return {"weights": weights, "bias": bias.astype(dtype)}


def regression(coef: np.ndarray, intercept: np.ndarray, voxels: np.ndarray | None = None,
               dtype: Any = np.float32) -> Regression:
    """A subject's LinearRegression, restricted to `voxels` (indices into N_s; None = all).

    Returns {"coef": (K, N_sel), "intercept": (N_sel,)} of `dtype`: transposed once here so
    the encoder's matmul reads it contiguously.
    """
    if voxels is not None:
        coef, intercept = coef[voxels], intercept[voxels]
    return {"coef": np.ascontiguousarray(coef.T, dtype=dtype), "intercept": np.asarray(intercept, dtype=dtype)}


def project_taps(taps: dict[str, jax.Array], projection: Projection, precision: Any = None) -> jax.Array:
    """(B, ...) taps -> (B, K) components, one matmul per tap accumulated (float32 accumulation).

    `precision` ("highest" | "tf32" | "bf16", `berg_jax.precision`; None is "tf32"): for "bf16"
    taps and weights are bfloat16 (weights cast once at load time, `precision.cast_projection`;
    float32 ones are cast here, per call) and each matmul accumulates in float32, as does
    the sum over taps; the components are float32 in every mode.
    """
    pol = resolve_precision(precision)
    batch = next(iter(taps.values())).shape[0]
    # One video is a matrix-vector product, which XLA:CPU runs at ~6.5 GB/s over the 1.6 GB
    # of weights (177 ms); as two identical rows it takes the matrix-matrix kernel (122 ms)
    # and rounds exactly as a batch does.
    rows = 2 if batch == 1 else batch
    acc = projection["bias"]
    for tap, w in zip(TAP_NAMES, projection["weights"]):
        x = taps[tap].reshape(batch, -1)
        if rows != batch:
            x = jnp.concatenate([x, x])
        if pol.compute_dtype is not None:
            x, w = x.astype(pol.compute_dtype), w.astype(pol.compute_dtype)
        acc = acc + jnp.dot(x, w, precision=pol.lax_precision, preferred_element_type=pol.accumulate)
    return acc[:batch]


def regress(components: jax.Array, head: Regression, precision: Any = None) -> jax.Array:
    """(B, K) components -> (B, N_sel) voxel responses, in float32 (float64 under x64) in every
    mode: `precision`'s `regression_precision` (HIGHEST for "highest" and "bf16")."""
    pol = resolve_precision(precision)
    return jnp.dot(components, head["coef"], precision=pol.regression_precision) + head["intercept"]


# ---- the converted copy on disk ------------------------------------------------------


def converted_dir(berg_dir: str | os.PathLike) -> Path:
    return berg_files.model_dir(berg_dir) / CONVERTED_DIR


def _source_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _save_tree(tree: Any, directory: Path) -> None:
    import orbax.checkpoint as ocp

    # orbax refuses to overwrite; a stale copy (source changed) is replaced whole.
    if directory.exists():
        shutil.rmtree(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory.absolute(), tree)


def _restore_tree(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree_util.tree_map(np.asarray, ckptr.restore(directory.absolute()))


def _stamp_file(directory: Path) -> Path:
    return directory.parent / f"{directory.name}.json"


def _is_current(directory: Path, source: Path) -> bool:
    stamp = _stamp_file(directory)
    if not (directory.is_dir() and stamp.is_file()):
        return False
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return record.get("format") == FORMAT and record.get("source") == _source_stamp(source)


def _write_stamp(directory: Path, source: Path, **extra: Any) -> None:
    # Written after the checkpoint: a stamp only ever vouches for a finished copy.
    record = {"format": FORMAT, "source": _source_stamp(source), "source_path": str(source), **extra}
    atomic_write_text(_stamp_file(directory), json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def _conversion_lock(berg_dir: str | os.PathLike) -> Iterator[None]:
    """One converter at a time per berg_dir (several processes of a distributed run may start
    together on a shared folder); the OS drops the lock if the holder dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no guard
        yield
        return
    directory = converted_dir(berg_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".convert.lock", "ab") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some NFS, Lustre, FUSE mounts): no guard
            pass
        yield


def convert_projection(berg_dir: str | os.PathLike, force: bool = False) -> Path:
    """Fold `pca_weights.npy` into the per-tap projection and save it (skipped when current)."""
    source = berg_files.pca_weights_path(berg_dir)
    target = converted_dir(berg_dir) / "projection"
    if force or not _is_current(target, source):
        with _conversion_lock(berg_dir):
            if force or not _is_current(target, source):  # another process may have just done it
                projection = fold_projection(berg_files.load_pca(berg_dir))
                _save_tree(projection, target)
                _write_stamp(target, source, n_components=int(projection["bias"].shape[0]))
    return target


def converted_components(berg_dir: str | os.PathLike) -> int:
    """K of the converted projection, from its stamp (no 1.6 GB restore just to read a shape)."""
    stamp = _stamp_file(converted_dir(berg_dir) / "projection")
    try:
        return int(json.loads(stamp.read_text())["n_components"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{stamp}: no converted projection ({err}); run `berg-jax convert`") from None


def convert_subject(berg_dir: str | os.PathLike, subject: int, n_components: int, force: bool = False) -> Path:
    """Save a subject's regression (all voxels, coef transposed to (K, N_s)) with orbax."""
    subject = berg_files.check_subject(subject)
    source = berg_files.subject_weights_path(berg_dir, subject)
    target = converted_dir(berg_dir) / f"sub-{subject:02d}"
    if force or not _is_current(target, source):
        with _conversion_lock(berg_dir):
            if force or not _is_current(target, source):
                coef, intercept = berg_files.load_subject_head(berg_dir, subject, n_components)
                _save_tree(regression(coef, intercept), target)
                _write_stamp(target, source, subject=subject)
    return target


def available_subjects(berg_dir: str | os.PathLike) -> list[int]:
    """Subjects whose weights file is present in berg_dir."""
    return [s for s in berg_files.SUBJECTS if berg_files.subject_weights_path(berg_dir, s).is_file()]


def ensure_converted(berg_dir: str | os.PathLike, subjects: Sequence[int] = ()) -> bool:
    """Convert the projection and `subjects`' heads where no current copy exists; True if any was converted."""
    if is_converted(berg_dir) and all(is_converted(berg_dir, s) for s in subjects):
        return False
    print(f"berg-jax: converting BERG's files in {berg_dir} (once; later loads read the converted copy)")
    convert_berg_dir(berg_dir, list(subjects))
    return True


def convert_berg_dir(berg_dir: str | os.PathLike, subjects: list[int] | None = None, force: bool = False) -> Path:
    """Convert the projection and the heads of `subjects` (default: every subject present)."""
    convert_projection(berg_dir, force=force)
    k = converted_components(berg_dir)
    for subject in available_subjects(berg_dir) if subjects is None else subjects:
        convert_subject(berg_dir, subject, k, force=force)
    return converted_dir(berg_dir)


def is_converted(berg_dir: str | os.PathLike, subject: int | None = None) -> bool:
    """Whether a current converted copy of the projection (and of `subject`'s head) exists."""
    ok = _is_current(converted_dir(berg_dir) / "projection", berg_files.pca_weights_path(berg_dir))
    if ok and subject is not None:
        ok = _is_current(converted_dir(berg_dir) / f"sub-{subject:02d}", berg_files.subject_weights_path(berg_dir, subject))
    return ok


def load_projection(berg_dir: str | os.PathLike) -> Projection:
    """The converted projection, float32 numpy; `convert_projection` first if needed."""
    directory = converted_dir(berg_dir) / "projection"
    projection = _restore_tree(directory)
    k = projection["bias"].shape[0]
    for tap, w in zip(TAP_NAMES, projection["weights"]):
        if w.shape != (int(np.prod(TAP_SHAPES[tap])), k):
            raise ModelLoadError(f"{directory}: weights for {tap} have shape {w.shape}; run `berg-jax convert --force`")
    return projection


def load_regression(berg_dir: str | os.PathLike, subject: int, voxels: np.ndarray | None = None) -> Regression:
    """A subject's converted regression, sliced to `voxels` (indices into N_s; None = all)."""
    full = _restore_tree(converted_dir(berg_dir) / f"sub-{subject:02d}")
    if voxels is None:
        return full
    return {"coef": np.ascontiguousarray(full["coef"][:, voxels]), "intercept": full["intercept"][voxels]}
