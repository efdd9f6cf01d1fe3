"""berg-jax: BERG's fmri-bmd-s3d in silico fMRI encoding model in JAX/Flax.

The data's path is the module map: video (`video`) -> frames -> clip (`preprocess`) ->
taps (`s3d`, weights from `weights`) -> components and voxels (`head`, BERG's files from
`berg_files`) -> one fused jitted function (`fused`) -> files (`pipeline`, `writer`,
`volumes`, all written through `atomic`). On top: BERG's API (`api`), the command line
(`cli/`), stimulus optimisation (`optimize`), many hosts (`distributed`, `merge`).
"""

from berg_jax.api import BERG, EncodingModel, encoder, responses_from_components, roi_means_from_components
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

# optax is only imported when the stimulus optimiser is first used.
_OPTIMIZE_NAMES = ("Objective", "OptimizeResult", "match_pattern", "optimize_stimulus", "roi_difference", "roi_mean")


def __getattr__(name: str):
    if name in _OPTIMIZE_NAMES:
        from berg_jax import optimize

        return getattr(optimize, name)
    raise AttributeError(f"module 'berg_jax' has no attribute {name!r}")


__all__ = [
    "BERG",
    "BERGError",
    "DownloadError",
    "EncodingModel",
    "InvalidParameterError",
    "ModelLoadError",
    "S3D",
    "StimulusError",
    "TAP_NAMES",
    "TAP_SHAPES",
    "ValidationError",
    "VideoReadError",
    "encoder",
    "extract_taps",
    "load_s3d",
    "preprocess",
    "responses_from_components",
    "roi_means_from_components",
    "sample_frame_indices",
    *_OPTIMIZE_NAMES,
]
