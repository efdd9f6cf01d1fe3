"""Access to the committed torchvision reference values (tests/fixtures/s3d_reference.npz)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from weights_convert.make_reference import (
    SOURCES,
    WEIGHTS_SEED,
    decode_crop,
    project_tap,
    sklearn_head as numpy_reference_head,
    reference_clips,
    state_dict_digest,
)

FIXTURE = Path(__file__).parent / "fixtures" / "s3d_reference.npz"

__all__ = ["SOURCES", "WEIGHTS_SEED", "load_reference", "project_tap", "reference_clips", "reference_inputs",
           "state_dict_digest", "numpy_reference_head"]


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
