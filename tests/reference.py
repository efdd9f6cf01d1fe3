"""Access to the committed torchvision reference values (tests/fixtures/s3d_reference.npz, resize_reference.npz)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from weights_convert.make_reference import (
    ODD_SOURCES,
    ODD_STRIDE,
    RESIZE_TAP_SIZES,
    SOURCES,
    WEIGHTS_SEED,
    decode_crop,
    odd_source_frames,
    project_tap,
    sklearn_head as numpy_reference_head,
    reference_clips,
    sha256_array,
    state_dict_digest,
    tap_matrix_from_fixture,
)

FIXTURE = Path(__file__).parent / "fixtures" / "s3d_reference.npz"
RESIZE_FIXTURE = Path(__file__).parent / "fixtures" / "resize_reference.npz"

__all__ = ["ODD_SOURCES", "ODD_STRIDE", "RESIZE_TAP_SIZES", "SOURCES", "WEIGHTS_SEED", "load_reference",
           "load_resize_reference", "odd_source_frames", "project_tap", "reference_clips", "reference_inputs",
           "sha256_array", "state_dict_digest", "numpy_reference_head", "torch_tap_matrix"]


@functools.lru_cache(maxsize=1)
def load_reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def reference_crop(i: int) -> np.ndarray:
    """torchvision's uint8 224x224 crop of clip i: (14, 224, 224, 3)."""
    return decode_crop(load_reference()[f"crop_diff_{i}"])


def reference_inputs() -> np.ndarray:
    """torchvision's preprocessed clips, channels-last: float32 (4, 14, 224, 224, 3)."""
    lut = load_reference()["lut"]
    return np.stack([lut[np.arange(3), reference_crop(i)] for i in range(len(SOURCES))])


@functools.lru_cache(maxsize=1)
def load_resize_reference() -> dict[str, np.ndarray]:
    """tests/fixtures/resize_reference.npz: torch's resize taps and torchvision's odd-size outputs."""
    with np.load(RESIZE_FIXTURE) as data:
        return {k: data[k] for k in data.files}


def torch_tap_matrix(n_in: int) -> np.ndarray:
    """torch's stored bilinear weights to 256 from n_in pixels: float32 (256, n_in)."""
    ref = load_resize_reference()
    return tap_matrix_from_fixture(ref[f"tap_cols_{n_in}"], ref[f"tap_weights_{n_in}"], n_in)
