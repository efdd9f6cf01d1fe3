"""A synthetic berg_dir whose files have exactly the format of BERG's fmri-bmd-s3d files.

`make_berg_dir` writes, with `numpy.save` of Python dicts as BERG does (spec section 7),
pca_weights.npy with the real feature count F = 4,084,096, and per subject a
weights_sub-SS.npy with the real voxel count N_s and a metadata_sub-SS.npy with nibabel
headers and images. Values are random but seeded, scaled so the head's outputs stay O(1).
Used by the tests and by `berg-jax demo`; nothing in it is a real prediction.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from berg_jax.berg_files import (
    MASK_SHAPE,
    N_FEATURES,
    N_VOXELS,
    ROI_NAMES,
    metadata_path,
    pca_weights_path,
    subject_weights_path,
)

DEFAULT_ROIS: tuple[str, ...] = ("lFFA", "rFFA", "lV1v", "BMDgeneral")

# An MNI152-like 2.5 mm grid for the (62, 77, 61) volume: x flipped (radiological storage),
# origin placed so the volume's centre lands near MNI (0, -17, 5). Synthetic, not BMD's.
AFFINE = np.array([
    [-2.5, 0.0, 0.0, 78.0],
    [0.0, 2.5, 0.0, -112.0],
    [0.0, 0.0, 2.5, -70.0],
    [0.0, 0.0, 0.0, 1.0],
])

ACCURACY_KEYS: tuple[str, ...] = (
    "noiseceiling_task_train_n_1", "noiseceiling_task_train_n_3",
    "noiseceiling_task_test_n_1", "noiseceiling_task_test_n_10",
    "correlation", "r2", "explained_variance",
)

# Tags keep each random stream independent of which other files are generated.
_PCA, _HEAD, _MASK, _ROI, _ACC = range(5)


def _rng(seed: int, tag: int, subject: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, tag, subject])


def _pca_dict(n_components: int, seed: int, components_dtype: np.dtype) -> dict:
    """BERG's pca_weights dict: mean ~N(0,1), scale in [0.5, 2], components ~N(0, 1/F)
    so each row has norm ~1 and projections of standardised features stay O(1)."""
    rng = _rng(seed, _PCA)
    dtype = np.dtype(components_dtype)
    mean = rng.standard_normal(N_FEATURES)
    scale = rng.uniform(0.5, 2.0, N_FEATURES)
    comps = rng.standard_normal((n_components, N_FEATURES), dtype=dtype)
    comps *= dtype.type(1.0 / np.sqrt(N_FEATURES))
    ev = np.sort(rng.uniform(1.0, 100.0, n_components))[::-1].astype(dtype)
    return {
        "scaler_param": {
            "scale_": scale,
            "mean_": mean,
            "var_": scale**2,
            "n_features_in_": N_FEATURES,
            # sklearn leaves a numpy scalar here, which pickles through numpy's `scalar`.
            "n_samples_seen_": np.int64(1000),
        },
        "pca_param": {
            "components_": comps,
            "explained_variance_": ev,
            "explained_variance_ratio_": (ev / (ev.sum() * 4)).astype(dtype),
            "singular_values_": np.sqrt(ev * 999).astype(dtype),
            "n_features_in_": N_FEATURES,
        },
    }


def _weights_dict(subject: int, n_components: int, seed: int) -> dict:
    """BERG's weights_sub-SS dict: LinearRegression's coef_, intercept_, n_features_in_."""
    rng = _rng(seed, _HEAD, subject)
    n_voxels = N_VOXELS[subject]
    coef = rng.standard_normal((n_voxels, n_components), dtype=np.float32)
    coef *= np.float32(1.0 / np.sqrt(n_components))
    intercept = (0.1 * rng.standard_normal(n_voxels)).astype(np.float32)
    return {"coef_": coef, "intercept_": intercept, "n_features_in_": n_components}


def _blob_mask(rng: np.random.Generator, n_true: int, jitter: float) -> np.ndarray:
    """A bool MASK_SHAPE volume with exactly n_true voxels: the n_true smallest values of
    an ellipsoidal distance field plus seeded jitter (a brain-shaped blob)."""
    grid = np.indices(MASK_SHAPE, dtype=np.float64)
    centre = np.array([30.5, 38.0, 30.0])[:, None, None, None]
    radii = np.array([25.0, 31.0, 24.0])[:, None, None, None]
    field = (((grid - centre) / radii) ** 2).sum(axis=0)
    field += jitter * rng.random(MASK_SHAPE)
    order = np.argpartition(field.ravel(), n_true - 1)[:n_true]
    mask = np.zeros(field.size, dtype=bool)
    mask[order] = True
    return mask.reshape(MASK_SHAPE)


def _roi_image(vol: np.ndarray, from_disk: bool, tmp: str) -> nib.Nifti1Image:
    """The ROI's NIfTI image. With from_disk, round-trip through an uncompressed .nii and
    get_fdata(), as an image loaded by nib.load would be (ArrayProxy, FileHolder and a
    memmap'ed cache in its pickle; the file it names is gone afterwards, as in BERG's)."""
    img = nib.Nifti1Image(vol.astype(np.int16), AFFINE)
    if not from_disk:
        return img
    path = os.path.join(tmp, "roi.nii")
    nib.save(img, path)
    loaded = nib.load(path)
    loaded.get_fdata()
    return loaded


def _metadata_dict(subject: int, seed: int, rois: Sequence[str], tmp: str) -> dict:
    """BERG's metadata_sub-SS dict (spec section 7) with synthetic masks, ROIs, accuracy."""
    n_voxels = N_VOXELS[subject]
    sub_mask = _blob_mask(_rng(seed, _MASK, subject), n_voxels, jitter=0.3)
    group_mask = _blob_mask(_rng(seed, _MASK, 0), 112000, jitter=0.3)
    # Position of each True voxel in the N_s vector (C order over the volume).
    rank = np.cumsum(sub_mask.ravel()) - 1
    rng = _rng(seed, _ROI, subject)
    grid = np.indices(MASK_SHAPE).reshape(3, -1).T
    inside = np.flatnonzero(sub_mask.ravel())
    roi_dict = {}
    for i, name in enumerate(rois):
        if name not in ROI_NAMES:
            raise ValueError(f"{name!r} is not one of BERG's ROI names")
        radius = 10.0 if name == "BMDgeneral" else 3.0
        centre = grid[inside[rng.integers(inside.size)]]
        near = ((grid - centre) ** 2).sum(axis=1) <= radius**2
        vol = (near & sub_mask.ravel()).reshape(MASK_SHAPE)
        coords = np.argwhere(vol).astype(np.int64)
        indices = rank[np.flatnonzero(vol.ravel())].astype(np.int64).reshape(-1, 1)
        roi_dict[name] = (coords, indices, _roi_image(vol, from_disk=(i == 0), tmp=tmp))
    acc_rng = _rng(seed, _ACC, subject)
    accuracy = {
        key: acc_rng.uniform(-0.1, 0.8, n_voxels).astype(np.float32) for key in ACCURACY_KEYS
    }
    sub_img = nib.Nifti1Image(sub_mask.astype(np.uint8), AFFINE)
    group_img = nib.Nifti1Image(group_mask.astype(np.uint8), AFFINE)
    return {
        "fmri": {
            "group_mask": group_mask,
            "sub_mask": sub_mask,
            "group_mask_header": group_img.header,
            "sub_mask_header": sub_img.header,
            "group_mask_affine": AFFINE.copy(),
            "sub_mask_affine": AFFINE.copy(),
            "rois": roi_dict,
        },
        "encoding_models": accuracy,
    }


def make_berg_dir(
    root: str | os.PathLike,
    subjects: Sequence[int] = (1,),
    n_components: int = 8,
    seed: int = 0,
    components_dtype: type | np.dtype = np.float32,
    rois: Sequence[str] = DEFAULT_ROIS,
    pca: bool = True,
) -> Path:
    """Write a synthetic berg_dir for fmri-bmd-s3d under `root` and return `root`.

    Files (each `np.save` of a dict, i.e. a pickled 0-d object array, like BERG's):
    pca_weights.npy ((K, F) components of `components_dtype`, F = 4,084,096: about
    16 MB per float32 component, so K=8 takes ~1 s and K=100 writes BERG's ~1.7 GB), and
    for each subject weights_sub-SS.npy (coef_ (N_s, K) float32) and metadata_sub-SS.npy
    (sub_mask with exactly N_s voxels, headers, affines, `rois`, accuracy arrays).
    Deterministic in `seed`; a subject's files do not depend on the other subjects, so
    `pca=False` adds subjects to an existing berg_dir without rewriting its PCA.
    """
    root = Path(root)
    pca_path = pca_weights_path(root)
    pca_path.parent.mkdir(parents=True, exist_ok=True)
    if pca:
        np.save(pca_path, _pca_dict(n_components, seed, components_dtype), allow_pickle=True)
    with tempfile.TemporaryDirectory() as tmp:
        for subject in subjects:
            np.save(subject_weights_path(root, subject),
                    _weights_dict(subject, n_components, seed), allow_pickle=True)
            meta_path = metadata_path(root, subject)
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(meta_path, _metadata_dict(subject, seed, rois, tmp), allow_pickle=True)
    return root


def make_synthetic_model(
    root: str | os.PathLike, subjects: Sequence[int] = (1,), n_components: int = 8, seed: int = 0
) -> tuple[Path, Path]:
    """A whole synthetic model under `root`: (berg_dir, S3D .pth of `random_state_dict(seed)`)."""
    from berg_jax.synthetic import random_state_dict
    from berg_jax.torch_pickle import write_torch_state_dict

    root = Path(root)
    berg_dir = make_berg_dir(root / "berg", subjects=subjects, n_components=n_components, seed=seed)
    pth = root / "s3d-synthetic.pth"
    write_torch_state_dict(random_state_dict(seed), pth)
    return berg_dir, pth
