"""NIfTI volumes (MNI152): responses back on the brain grid, written as .nii(.gz) files.

One 4-D `responses.nii.gz` (x, y, z, n_inputs), volume t = row t (failed inputs are
all-NaN volumes), because 4-D series are what fMRI tools (nilearn, FSL, AFNI) load and index;
`write_volume_niftis` optionally writes one 3-D file per input as well. Both stream from
`responses.npy` a few volumes at a time, so memory stays bounded for any number of inputs.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from berg_jax.atomic import atomic_open


def voxel_flat_indices(sub_mask: np.ndarray, selected_indices: Sequence[int] | None = None
                       ) -> np.ndarray:
    """C-order flat positions in `sub_mask`'s grid of the output columns.

    Args:
      sub_mask: bool (62, 77, 61); its N_s True voxels in C order are the model's voxels.
      selected_indices: (n_sel,) int into those N_s voxels (the selection), or None for all.
    Returns:
      int64 (n_sel,): column j of the responses is voxel `unravel_index(out[j], shape)`.
    """
    mask = np.asarray(sub_mask, dtype=bool)
    flat = np.flatnonzero(mask.ravel(order="C"))
    if selected_indices is None:
        return flat
    sel = np.asarray(selected_indices).reshape(-1)
    if sel.size and not np.issubdtype(sel.dtype, np.integer):
        raise ValueError(f"selected_indices must be integers, got {sel.dtype}")
    sel = sel.astype(np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= flat.size):
        raise IndexError(f"selected_indices must lie in 0..{flat.size - 1}")
    if len(np.unique(sel)) != sel.size:
        raise ValueError("selected_indices has duplicates: two columns would share a voxel")
    return flat[sel]


def responses_to_volume(
    responses: np.ndarray,
    sub_mask: np.ndarray,
    selected_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Put responses back on the brain grid.

    Args:
      responses: (n_sel,) or (n, n_sel) float; column j is the j-th selected voxel.
      sub_mask: bool (62, 77, 61).
      selected_indices: (n_sel,) int into the N_s True voxels of sub_mask, or None for all.
    Returns:
      float32 (62, 77, 61) for 1-D input, (62, 77, 61, n) for 2-D; NaN outside the selection.
    """
    mask = np.asarray(sub_mask, dtype=bool)
    flat = voxel_flat_indices(mask, selected_indices)
    r = np.asarray(responses, dtype=np.float32)
    if r.ndim not in (1, 2) or r.shape[-1] != flat.size:
        raise ValueError(f"responses must be (n_sel,) or (n, n_sel) with n_sel={flat.size}, "
                         f"got {r.shape}")
    rows = r.reshape(-1, flat.size)
    vol = np.full((rows.shape[0], mask.size), np.nan, np.float32)
    vol[:, flat] = rows
    vol = vol.reshape((rows.shape[0],) + mask.shape)
    # volumes last, as NIfTI stores them: (x, y, z, n)
    return vol[0] if r.ndim == 1 else np.moveaxis(vol, 0, -1)


def _nifti_header(shape: tuple[int, ...], affine: np.ndarray,
                  header: nib.Nifti1Header | None) -> nib.Nifti1Header:
    """The header nibabel would write for float32 data of `shape` (without building the data)."""
    # broadcast_to: a full-shape array that costs no memory, so nibabel fills shape/affine.
    img = nib.Nifti1Image(np.broadcast_to(np.float32(0), shape), np.asarray(affine, float),
                          header)
    img.set_data_dtype(np.float32)  # a mask's header says uint8/int; the data are float32
    img.update_header()
    hdr = img.header.copy()
    hdr.set_slope_inter(1.0, 0.0)  # what nibabel stores for float32 data that needs no scaling
    return hdr


def _write_nifti_volumes(path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray,
                         header: nib.Nifti1Header | None, volumes: Iterable[np.ndarray],
                         compresslevel: int) -> None:
    """Stream 3-D float32 volumes (x fastest: NIfTI's Fortran order) into a .nii(.gz), atomically.

    gzip's timestamp is fixed at 0 so equal data give byte-equal files.
    """
    hdr = _nifti_header(shape, affine, header)
    head = io.BytesIO()
    hdr.write_to(head)
    head.write(b"\0" * (int(hdr.get_data_offset()) - head.tell()))
    n_expected = int(np.prod(shape[3:], dtype=np.int64))
    with atomic_open(path) as raw:
        gz = (gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel,
                            mtime=0) if str(path).endswith(".gz") else None)
        f = gz if gz is not None else raw
        f.write(head.getvalue())
        n = 0
        for vol in volumes:
            vol = np.asarray(vol, np.float32)
            if vol.shape != tuple(shape[:3]):
                raise ValueError(f"volume shape {vol.shape} != {shape[:3]}")
            f.write(vol.tobytes(order="F"))
            n += 1
        if n != n_expected:
            raise ValueError(f"got {n} volumes, expected {n_expected}")
        if gz is not None:
            gz.close()  # writes the gzip trailer; `raw` stays open for atomic_open to commit


def write_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    compresslevel: int = 1,
) -> None:
    """Write a 3-D (x,y,z) or 4-D (x,y,z,n) array as float32 NIfTI-1, atomically.

    Args:
      path: `.nii.gz` (gzip, reproducible bytes) or `.nii`.
      data: float (x, y, z) or (x, y, z, n); NaN marks voxels without a value.
      affine: float (4, 4) voxel -> mm (for BERG: `sub_mask_affine`, MNI152).
      header: a template header (e.g. `sub_mask_header`); shape, dtype and scaling are
        replaced, other fields (units, descrip, extensions) kept.
      compresslevel: gzip level (nibabel's default, 1: fast; NaN runs compress well anyway).
    """
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"data must be 3-D or 4-D, got shape {data.shape}")
    vols = [data] if data.ndim == 3 else (data[..., t] for t in range(data.shape[3]))
    _write_nifti_volumes(path, data.shape, affine, header, vols, compresslevel)


def write_responses_nifti(
    path: str | os.PathLike,
    responses: np.ndarray,
    sub_mask: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    selected_indices: Sequence[int] | None = None,
    chunk_rows: int = 16,
    compresslevel: int = 1,
) -> None:
    """Write all rows of `responses` as one 4-D NIfTI (x, y, z, n_inputs), volume t = row t.

    Reads `chunk_rows` rows at a time, so `responses` may be a memmap of `responses.npy` far
    larger than memory (about chunk_rows x 1.2 MB are held).

    Args:
      path: usually OUT/responses.nii.gz.
      responses: (n_inputs, n_sel) float (NaN rows for failed inputs stay all-NaN volumes).
      sub_mask, selected_indices: as in `responses_to_volume`.
      affine, header, compresslevel: as in `write_nifti`.
    """
    mask = np.asarray(sub_mask, dtype=bool)
    flat = voxel_flat_indices(mask, selected_indices)
    n = responses.shape[0]
    if responses.ndim != 2 or responses.shape[1] != flat.size:
        raise ValueError(f"responses must be (n, {flat.size}), got {responses.shape}")

    def volumes() -> Iterator[np.ndarray]:
        for start in range(0, n, chunk_rows):
            block = responses_to_volume(np.asarray(responses[start:start + chunk_rows]),
                                        mask, selected_indices)
            for t in range(block.shape[3]):
                yield block[..., t]

    _write_nifti_volumes(path, mask.shape + (n,), affine, header, volumes(), compresslevel)


def volume_file_name(path: str, row: int, n_rows: int) -> str:
    """`<row>_<stem>.nii.gz`, row zero-padded so names sort in row order and never collide."""
    stem = re.sub(r"[^\w.-]", "_", Path(path).stem) or "input"
    return f"{row:0{max(6, len(str(n_rows - 1)))}d}_{stem}.nii.gz"


def write_volume_niftis(
    out_dir: str | os.PathLike,
    paths: Sequence[str],
    responses: np.ndarray,
    sub_mask: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    selected_indices: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
) -> list[Path]:
    """One 3-D NIfTI per input, named by `volume_file_name`, in `out_dir` (created).

    Args:
      out_dir: e.g. OUT/volumes.
      paths: (n_inputs,) the input paths (their stems name the files).
      responses: (n_inputs, n_sel) float, e.g. the memmap of responses.npy.
      rows: which rows to write (e.g. only the ok ones); None for all.
    Returns:
      the written files, in `rows` order.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for r in range(len(paths)) if rows is None else rows:
        r = int(r)
        vol = responses_to_volume(np.asarray(responses[r]), sub_mask, selected_indices)
        f = d / volume_file_name(paths[r], r, len(paths))
        write_nifti(f, vol, affine, header)
        written.append(f)
    return written
