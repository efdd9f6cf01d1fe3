"""BERG's bucket files for fmri-bmd-s3d, read exactly as they are, without trusting pickle.

BERG stores every file as `numpy.save` of a Python dict, i.e. a `.npy` holding a pickled
0-d object array. `np.load(allow_pickle=True)` on such a file runs whatever the pickle says,
so these files are read with a restricted unpickler that builds only numpy arrays, a few
plain containers, and (for the metadata) nibabel's image and header classes.

Layout under `berg_dir` (spec section 7)::

    <MODEL_ROOT>/encoding_models_weights/pca_weights.npy      scaler + TruncatedSVD, ~1.7 GB
    <MODEL_ROOT>/encoding_models_weights/weights_sub-SS.npy   LinearRegression per subject
    <MODEL_ROOT>/metadata/metadata_sub-SS.npy                 masks, affines, ROIs, accuracy
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
import pickle
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from berg_jax.errors import InvalidParameterError, ModelLoadError, ValidationError
from berg_jax.npy_rows import read_npy_header

MODEL_ID = "fmri-bmd-s3d"
MODEL_ROOT = "encoding_models/modality-fmri/train_dataset-bmd/model-s3d"
BUCKET = "brain-encoding-response-generator"

SUBJECTS = range(1, 11)
N_VOXELS: dict[int, int] = {
    1: 108219, 2: 108603, 3: 108366, 4: 108283, 5: 108201,
    6: 108449, 7: 108126, 8: 108407, 9: 108250, 10: 107987,
}
N_FEATURES = 4084096
N_COMPONENTS = 100
MASK_SHAPE = (62, 77, 61)

# Name -> flattened length, in the order the taps are concatenated (spec section 5).
TAP_SIZES: dict[str, int] = {
    "features.2": 1404928,
    "features.5.cat": 1404928,
    "features.7": 376320,
    "features.9.cat": 401408,
    "features.11.cat": 413952,
    "features.13": 81536,
    "avgpool": 1024,
}

ROI_NAMES: tuple[str, ...] = (
    "lV1v", "rV1v", "lV1d", "rV1d", "lV2v", "rV2v", "lV2d", "rV2d", "lV3v", "rV3v",
    "lV3d", "rV3d", "lV3ab", "rV3ab", "lhV4", "rhV4", "lFFA", "rFFA", "lOFA", "rOFA",
    "lEBA", "rEBA", "lLOC", "rLOC", "lPPA", "rPPA", "lRSC", "rRSC", "rSTS", "lSTS",
    "lTOS", "rTOS", "lMT", "rMT", "l7AL", "r7AL", "lIPS0", "rIPS0", "rIPS1-2-3",
    "lIPS1-2-3", "lPFt", "rPFt", "lBA2", "rBA2", "lPFop", "rPFop", "BMDgeneral",
)

# --- what the restricted unpickler admits -------------------------------------------------

# numpy arrays, scalars and dtypes. numpy 1.x writes `numpy.core.*`, numpy 2.x
# `numpy._core.*`; both names resolve to the installed numpy's objects.
NUMPY_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (protocols 2-4)
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),  # numpy scalars, e.g. n_samples_seen_ (np.int64)
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # ndarray.__reduce_ex__ under protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),  # the class _reconstruct builds
    ("numpy", "dtype"),  # every array's and scalar's dtype
    ("numpy", "memmap"),  # arrays nibabel read with mmap; rebuilt as plain ndarray
})

# Plain-data builtins that pickles of dicts may reference. `_codecs.encode` is how
# protocol 2 (np.save before numpy 1.17) writes bytes; only its latin-1 form is admitted.
DATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
})

# What pickled Nifti1Image / Nifti1Header objects reference (found by pickling real ones:
# in-memory images, images nib.load-ed from .nii/.nii.gz, and after get_fdata()).
NIBABEL_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("nibabel.nifti1", "Nifti1Image"),
    ("nibabel.nifti1", "Nifti1Header"),
    ("nibabel.nifti1", "Nifti1Extensions"),  # header.extensions, a list subclass
    ("nibabel.nifti1", "Nifti1Extension"),  # items of it, when the source file had any
    ("nibabel.nifti1", "NiftiExtension"),  # their base class name in nibabel >= 5.3
    ("nibabel.fileholders", "FileHolder"),  # image.file_map entries
    ("nibabel.arrayproxy", "ArrayProxy"),  # image.dataobj of an image read from disk
})

ARRAY_GLOBALS: frozenset[tuple[str, str]] = NUMPY_GLOBALS | DATA_GLOBALS
METADATA_GLOBALS: frozenset[tuple[str, str]] = ARRAY_GLOBALS | NIBABEL_GLOBALS


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` restricted to the latin-1 form protocol-2 pickles use for bytes."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} refused")
    return text.encode("latin-1")


@functools.cache
def _numpy_substitutes() -> dict[str, Any]:
    """The installed numpy's reconstruction helpers, found through the pickle protocol
    itself so the same code serves numpy 1.26 and 2.x whatever their module names."""
    return {
        "_reconstruct": np.ndarray.__reduce__(np.empty(0))[0],
        "scalar": np.float64(0).__reduce__()[0],
        "_frombuffer": np.empty(1).__reduce_ex__(5)[0],
    }


def _substitute(module: str, name: str) -> Any | None:
    """The object to hand the unpickler for an admitted global, or None to import it."""
    if module.startswith(("numpy.core.", "numpy._core.")):
        return _numpy_substitutes().get(name)
    if (module, name) == ("numpy", "memmap"):
        # Never hand out np.memmap itself: called through REDUCE, memmap(path, mode="w+")
        # creates or truncates a file. As _reconstruct's class argument, ndarray gives the
        # same in-memory array.
        return np.ndarray
    if (module, name) == ("_codecs", "encode"):
        return _latin1_encode
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class admits only the (module, name) pairs in `allowed`."""

    def __init__(self, file: Any, allowed: Collection[tuple[str, str]], label: str):
        # latin1 lets numpy arrays pickled under Python 2 load; Python 3 pickles ignore it.
        super().__init__(file, encoding="latin1")
        self._allowed = frozenset(allowed)
        self._label = label

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise ModelLoadError(
                f"{self._label}: refused to unpickle global '{module}.{name}': BERG's files "
                "hold only numpy arrays and nibabel images, so this file is not a BERG file "
                "or was tampered with"
            )
        obj = _substitute(module, name)
        if obj is not None:
            return obj
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            hint = " (pip install nibabel)" if module.startswith("nibabel") else ""
            raise ModelLoadError(
                f"{self._label}: cannot resolve '{module}.{name}'{hint}: {exc}"
            ) from exc


def load_pickled_npy(
    path: str | os.PathLike, allowed: Collection[tuple[str, str]] = ARRAY_GLOBALS
) -> Any:
    """Read a `.npy` holding a pickled 0-d object array (what `np.save(path, some_dict)`
    writes) without `np.load(allow_pickle=True)`.

    The header is parsed with `numpy.lib.format`; the rest of the stream is unpickled by an
    Unpickler that admits only the globals in `allowed` (see ARRAY_GLOBALS and
    METADATA_GLOBALS). Large arrays keep the unpickled bytes as their buffer, so peak memory
    is about one copy of the file.

    Args:
      path: the `.npy` file.
      allowed: (module, name) pairs the pickle may reference.
    Returns:
      the object stored in the 0-d array (for BERG's files, a dict).
    Raises:
      ModelLoadError: the file is missing, unreadable, truncated, not an object `.npy`,
        or references a global outside `allowed`. The message starts with the file name.
    """
    path = Path(path)
    label = path.name
    try:
        fh = open(path, "rb")
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{label}: file not found at {path}") from exc
    except OSError as exc:
        raise ModelLoadError(f"{label}: cannot open {path}: {exc}") from exc
    with fh:
        try:
            shape, fortran_order, dtype = read_npy_header(fh)
        except (ValueError, OSError, EOFError) as exc:
            raise ModelLoadError(
                f"{label}: not a readable .npy file (truncated or corrupt header): {exc}"
            ) from exc
        if dtype != np.dtype(object) or shape != ():
            raise ModelLoadError(
                f"{label}: expected a pickled dict (a 0-d object array, as np.save writes "
                f"for a dict), found a {dtype} array of shape {shape}"
            )
        try:
            loaded = _RestrictedUnpickler(fh, allowed, label).load()
        except ModelLoadError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ModelLoadError(
                f"{label}: truncated or corrupt pickle data ({type(exc).__name__}: {exc})"
            ) from exc
    if not isinstance(loaded, np.ndarray) or loaded.dtype != object or loaded.shape != ():
        raise ModelLoadError(f"{label}: the pickle does not hold a 0-d object array")
    return loaded[()]


# --- paths ---------------------------------------------------------------------------------


def check_subject(subject: Any) -> int:
    """`subject` as an int in 1..10, else InvalidParameterError (BERG's error for it)."""
    if isinstance(subject, (bool, np.bool_)):
        raise InvalidParameterError(f"subject must be an integer in 1..10, got {subject!r}")
    try:
        value = operator.index(subject)
    except TypeError:
        raise InvalidParameterError(
            f"subject must be an integer in 1..10, got {subject!r}"
        ) from None
    if value not in SUBJECTS:
        raise InvalidParameterError(
            f"subject must be one of {list(SUBJECTS)} for {MODEL_ID}, got {value}"
        )
    return value


def model_dir(berg_dir: str | os.PathLike) -> Path:
    """`berg_dir/<MODEL_ROOT>`: where BERG's files for fmri-bmd-s3d live."""
    return Path(berg_dir) / MODEL_ROOT


def pca_weights_path(berg_dir: str | os.PathLike) -> Path:
    """Path of `pca_weights.npy` (scaler + TruncatedSVD, shared by all subjects)."""
    return model_dir(berg_dir) / "encoding_models_weights" / "pca_weights.npy"


def subject_weights_path(berg_dir: str | os.PathLike, subject: int) -> Path:
    """Path of `weights_sub-SS.npy` (the subject's LinearRegression)."""
    return (model_dir(berg_dir) / "encoding_models_weights"
            / f"weights_sub-{check_subject(subject):02d}.npy")


def metadata_path(berg_dir: str | os.PathLike, subject: int) -> Path:
    """Path of `metadata_sub-SS.npy` (masks, affines, ROIs, accuracy)."""
    return model_dir(berg_dir) / "metadata" / f"metadata_sub-{check_subject(subject):02d}.npy"


def _require_file(path: Path, berg_dir: str | os.PathLike, subject: int | None) -> None:
    """Raise ModelLoadError saying how to download `path` when it does not exist."""
    if path.is_file():
        return
    subjects = str(subject) if subject is not None else "N"
    raise ModelLoadError(
        f"{path.name}: file not found at {path}. Download BERG's {MODEL_ID} files with "
        f"`berg-jax fetch --berg-dir {berg_dir} --subjects {subjects}` or "
        f"`aws s3 sync --no-sign-request s3://{BUCKET}/{MODEL_ROOT} {berg_dir}/{MODEL_ROOT}`"
    )


# --- checks on the loaded dicts ------------------------------------------------------------


def _get(d: Any, keys: tuple[str, ...], label: str) -> Any:
    """d[keys[0]][keys[1]]..., with a ModelLoadError naming the missing key."""
    cur = d
    for i, key in enumerate(keys):
        if not isinstance(cur, Mapping) or key not in cur:
            where = "".join(f"[{k!r}]" for k in keys[:i]) or "the top level"
            present = sorted(map(str, cur)) if isinstance(cur, Mapping) else type(cur).__name__
            raise ModelLoadError(
                f"{label}: missing key {key!r} in {where} (found {present})"
            )
        cur = cur[key]
    return cur


def _float_array(x: Any, label: str, what: str) -> np.ndarray:
    """`x` if it is a float32/float64 ndarray, else ModelLoadError."""
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.dtype.itemsize not in (4, 8):
        desc = f"{x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__
        raise ModelLoadError(f"{label}: {what} is a {desc}, expected a float32/float64 array")
    return x


def _check_shape(x: np.ndarray, expected: tuple[int, ...], label: str, what: str,
                 context: str = "") -> None:
    if x.shape != expected:
        raise ModelLoadError(
            f"{label}: {what} has shape {x.shape}, expected {expected}{context}"
        )


def _check_finite(x: np.ndarray, label: str, what: str) -> None:
    # Row sums in float64 are non-finite iff some entry is (finite float32 entries cannot
    # overflow a float64 sum), and need no array-sized temporary for a 1.6 GB matrix.
    sums = np.sum(x.reshape(x.shape[0], -1) if x.ndim > 1 else x[None], axis=-1,
                  dtype=np.float64)
    if not np.all(np.isfinite(sums)):
        raise ModelLoadError(f"{label}: {what} contains NaN or infinite values")


# --- loaders -------------------------------------------------------------------------------


def load_pca(berg_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The StandardScaler + TruncatedSVD parameters from `pca_weights.npy`, checked.

    Args:
      berg_dir: the directory BERG's bucket was synced into.
    Returns:
      {'mean': (F,), 'scale': (F,), 'components': (K, F)} with F = N_FEATURES and K the
      number of components (100 in BERG's file); dtypes as stored (float32 or float64).
    Raises:
      ModelLoadError: missing/corrupt file, missing keys, wrong shapes or dtypes, a
        non-finite mean/scale/component, or a zero scale.
    """
    path = pca_weights_path(berg_dir)
    _require_file(path, berg_dir, None)
    label = path.name
    d = load_pickled_npy(path, ARRAY_GLOBALS)
    mean = _float_array(_get(d, ("scaler_param", "mean_"), label), label, "mean_")
    scale = _float_array(_get(d, ("scaler_param", "scale_"), label), label, "scale_")
    comps = _float_array(_get(d, ("pca_param", "components_"), label), label, "components_")
    del d  # drops var_ and the rest of the dict as soon as possible
    _check_shape(mean, (N_FEATURES,), label, "mean_", f" (F = {N_FEATURES} S3D features)")
    _check_shape(scale, (N_FEATURES,), label, "scale_", f" (F = {N_FEATURES} S3D features)")
    if comps.ndim != 2 or comps.shape[1] != N_FEATURES or comps.shape[0] < 1:
        raise ModelLoadError(
            f"{label}: components_ has shape {comps.shape}, expected (K, {N_FEATURES}) "
            f"with K >= 1 ({N_COMPONENTS} in BERG's file)"
        )
    _check_finite(mean, label, "mean_")
    _check_finite(scale, label, "scale_")
    n_zero = int(np.count_nonzero(scale == 0))
    if n_zero:
        # sklearn replaces zero scales by 1 before saving; a zero here would divide by zero.
        raise ModelLoadError(f"{label}: scale_ has {n_zero} zero entries")
    _check_finite(comps, label, "components_")
    return {"mean": mean, "scale": scale, "components": comps}


def load_subject_head(
    berg_dir: str | os.PathLike, subject: int, n_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """The subject's LinearRegression from `weights_sub-SS.npy`, checked.

    Args:
      berg_dir: the directory BERG's bucket was synced into.
      subject: 1..10.
      n_components: K, the number of PCA components the regression reads (rows of the
        PCA's components_).
    Returns:
      (coef (N_s, K), intercept (N_s,)), N_s = N_VOXELS[subject], dtypes as stored
      (float32 or float64).
    Raises:
      InvalidParameterError: subject outside 1..10.
      ModelLoadError: missing/corrupt file, missing keys, wrong shapes/dtypes, non-finite.
    """
    subject = check_subject(subject)
    path = subject_weights_path(berg_dir, subject)
    _require_file(path, berg_dir, subject)
    label = path.name
    d = load_pickled_npy(path, ARRAY_GLOBALS)
    coef = _float_array(_get(d, ("coef_",), label), label, "coef_")
    intercept = _float_array(_get(d, ("intercept_",), label), label, "intercept_")
    n_voxels = N_VOXELS[subject]
    context = f" for subject {subject}"
    _check_shape(coef, (n_voxels, int(n_components)), label, "coef_", context)
    _check_shape(intercept, (n_voxels,), label, "intercept_", context)
    _check_finite(coef, label, "coef_")
    _check_finite(intercept, label, "intercept_")
    return coef, intercept


def load_metadata(berg_dir: str | os.PathLike, subject: int) -> dict:
    """BERG's metadata dict from `metadata_sub-SS.npy`, as stored, after light checks.

    Layout (spec section 7): {'fmri': {'sub_mask': bool (62, 77, 61) with N_s True voxels,
    'group_mask', '*_header' (nibabel Nifti1Header), '*_affine' (4, 4), 'rois': {name:
    (coords (n, 3), indices (n, 1), Nifti1Image)}}, 'encoding_models': {name: (N_s,)}}.
    Unpickling it needs nibabel.

    Raises:
      InvalidParameterError: subject outside 1..10.
      ModelLoadError: missing/corrupt file, no 'fmri' dict, a sub_mask that is not a binary
        (62, 77, 61) array with N_VOXELS[subject] voxels, or 'rois' not a dict.
    """
    subject = check_subject(subject)
    path = metadata_path(berg_dir, subject)
    _require_file(path, berg_dir, subject)
    label = path.name
    d = load_pickled_npy(path, METADATA_GLOBALS)
    mask = _get(d, ("fmri", "sub_mask"), label)
    if not isinstance(mask, np.ndarray) or mask.shape != MASK_SHAPE:
        shape = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ModelLoadError(f"{label}: sub_mask has shape {shape}, expected {MASK_SHAPE}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ModelLoadError(f"{label}: sub_mask is not binary (dtype {mask.dtype})")
    n_true = int(np.count_nonzero(mask))
    if n_true != N_VOXELS[subject]:
        raise ModelLoadError(
            f"{label}: sub_mask has {n_true} voxels, expected {N_VOXELS[subject]} "
            f"for subject {subject}"
        )
    rois = _get(d, ("fmri", "rois"), label)
    if not isinstance(rois, Mapping):
        raise ModelLoadError(f"{label}: fmri['rois'] is a {type(rois).__name__}, expected a dict")
    return d


# --- selections ----------------------------------------------------------------------------


def roi_voxel_indices(metadata: Mapping, roi: str) -> np.ndarray:
    """Indices into the subject's N_s voxel vector of ROI `roi`: element [1] of
    metadata['fmri']['rois'][roi], raveled, in the stored order.

    (BERG indexes with the whole tuple, so its ROI selection fails; this is what it meant.)

    Returns:
      int64 (n,), each in 0..N_s-1.
    Raises:
      ValidationError: `roi` is not one of this subject's ROIs (the message lists them), or
        the ROI has no voxels.
      ModelLoadError: the ROI entry is malformed or points outside the voxel vector.
    """
    rois = _get(metadata, ("fmri", "rois"), "metadata")
    if not isinstance(roi, str) or roi not in rois:
        present = [n for n in ROI_NAMES if n in rois] + sorted(
            str(n) for n in rois if n not in ROI_NAMES)
        raise ValidationError(f"unknown ROI {roi!r}; valid ROIs: {', '.join(present)}")
    entry = rois[roi]
    if not isinstance(entry, (tuple, list)) or len(entry) < 2:
        raise ModelLoadError(
            f"metadata: ROI {roi!r} is a {type(entry).__name__}, expected a tuple "
            "(coords, indices, image)"
        )
    idx = np.asarray(entry[1])
    if idx.dtype.kind not in "iu":
        raise ModelLoadError(f"metadata: ROI {roi!r} indices have dtype {idx.dtype}, expected int")
    idx = idx.ravel().astype(np.int64)
    if idx.size == 0:
        raise ValidationError(f"ROI {roi!r} has no voxels for this subject")
    mask = _get(metadata, ("fmri", "sub_mask"), "metadata")
    n_voxels = int(np.count_nonzero(mask))
    if idx.min() < 0 or idx.max() >= n_voxels:
        raise ModelLoadError(
            f"metadata: ROI {roi!r} has voxel indices outside 0..{n_voxels - 1}"
        )
    return idx


def voxel_mask_indices(mask: Any, n_voxels: int) -> np.ndarray:
    """Indices of the selected voxels of a binary voxel mask (BERG's {'voxels': mask}).

    Args:
      mask: array-like (n_voxels,) of bool or numbers, every value 0 or 1, at least one 1.
      n_voxels: the subject's N_s.
    Returns:
      int64 (n,), ascending.
    Raises:
      ValidationError: wrong shape, non-binary values, or no voxel selected.
    """
    try:
        arr = np.asarray(mask)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is not a mask
        raise ValidationError(f"voxel mask is not an array: {exc}") from exc
    if arr.shape != (n_voxels,):
        raise ValidationError(
            f"voxel mask has shape {arr.shape}, expected ({n_voxels},): one 0/1 entry per voxel"
        )
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise ValidationError(f"voxel mask must be binary (0/1 or bool), got dtype {arr.dtype}")
        bad = ~((arr == 0) | (arr == 1))
        if bad.any():
            raise ValidationError(
                f"voxel mask must be binary (0/1); found {int(bad.sum())} other values, "
                f"e.g. {arr[bad][:5].tolist()}"
            )
    idx = np.flatnonzero(arr).astype(np.int64)
    if idx.size == 0:
        raise ValidationError("voxel mask selects no voxels")
    return idx

