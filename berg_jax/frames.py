"""video -> frames: which frames of a video S3D sees (BERG's rule), in numpy alone.

Its own module so that the video readers -- and the decode worker processes that run them --
need neither JAX nor the model to know which frames to keep.
"""

from __future__ import annotations

import numpy as np

__all__ = ["N_FRAMES", "pad_frame_indices", "sample_frame_indices"]

N_FRAMES = 14


def sample_frame_indices(n_frames: int, n_samples: int = N_FRAMES) -> np.ndarray:
    """Indices of the frames BERG feeds to S3D: `numpy.linspace(0, n_frames-1, 14, dtype=int)`.

    The linspace is float64 and the cast truncates, exactly as BERG does
    (T=90 -> [0, 6, 13, 20, 27, 34, 41, 47, 54, 61, 68, 75, 82, 89]).

    Args:
      n_frames: number of frames T in the video; must be >= n_samples.
    Returns:
      int64 array (n_samples,), non-decreasing, first 0 and last n_frames-1.
    """
    n_frames = int(n_frames)
    if n_frames < n_samples:
        raise ValueError(
            f"a video needs at least {n_samples} frames, got {n_frames}; "
            "pad it by repeating the last frame (pad_short=True) as BERG's training code did"
        )
    return np.linspace(0, n_frames - 1, n_samples, dtype=int).astype(np.int64)


def pad_frame_indices(n_frames: int, n_samples: int = N_FRAMES) -> np.ndarray:
    """Indices that pad a short video to n_samples frames by repeating its last frame.

    This is what BERG's training code did for videos shorter than 14 frames.

    Args:
      n_frames: number of frames T, 1 <= T < n_samples.
    Returns:
      int64 array (n_samples,): [0, 1, ..., T-1, T-1, ..., T-1].
    """
    return np.minimum(np.arange(n_samples, dtype=np.int64), int(n_frames) - 1)
