"""berg-jax: BERG's fmri-bmd-s3d in silico fMRI encoding model in JAX/Flax.

The data's path is the module map: video (`video`) -> frames -> clip (`preprocess`) ->
taps (`s3d`, weights from `weights`) -> components -> voxels -> files (`outputs`).
"""

from berg_jax.errors import (
    BERGError,
    DownloadError,
    InvalidParameterError,
    ModelLoadError,
    StimulusError,
    ValidationError,
    VideoReadError,
)
from berg_jax.preprocess import preprocess, sample_frame_indices
from berg_jax.s3d import S3D, TAP_NAMES, TAP_SHAPES, extract_taps
from berg_jax.weights import load_s3d

__version__ = "0.1.0"

__all__ = [
    "BERGError",
    "DownloadError",
    "InvalidParameterError",
    "ModelLoadError",
    "S3D",
    "StimulusError",
    "TAP_NAMES",
    "TAP_SHAPES",
    "ValidationError",
    "VideoReadError",
    "extract_taps",
    "load_s3d",
    "preprocess",
    "sample_frame_indices",
]
