"""video frames -> clip: frame sampling and S3D's torchvision preprocessing, torch-exact."""

from __future__ import annotations

import numpy as np

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
