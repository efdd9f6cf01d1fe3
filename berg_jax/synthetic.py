"""Seeded stand-ins with the real formats and shapes: S3D weights and videos.

Used by the tests, the demo and the benchmarks, where the real weights cannot be had.
Nothing here is a real prediction. Everything is built from numpy's PCG64 streams and
integer arithmetic, so the same seed gives the same bytes on every platform.
"""

from __future__ import annotations

import numpy as np

from berg_jax.weights import expected_state_dict_shapes


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded S3D state_dict with torchvision's keys, shapes and dtypes, for tests and the demo.

    He-scaled kernels and non-trivial BN statistics (gamma, beta, running mean and variance
    all away from their identity values) so that a wrong fold or axis shows up; activations
    stay O(1) through all 16 blocks. numpy's PCG64 makes it identical on every platform.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in expected_state_dict_shapes().items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(1000, np.int64)
            continue
        if key.endswith(".weight") and len(shape) == 5:
            fan_in = int(np.prod(shape[1:]))
            gain = 1.0 if key.startswith("classifier") else 2.0
            value = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("running_mean"):
            value = rng.normal(0.0, 0.2, shape)
        elif key.endswith("1.weight"):  # BN gamma
            value = rng.uniform(0.6, 1.4, shape)
        else:  # BN beta, classifier bias
            value = rng.normal(0.0, 0.1, shape)
        out[key] = value.astype(np.float32)
    return out


def synthetic_video(seed: int, n_frames: int, height: int, width: int) -> np.ndarray:
    """A moving, colourful test video, uint8 (T, H, W, 3) RGB.

    Triangle-wave gradients drifting over time (so resizing sees every fractional
    weight) plus seeded noise in 8x8 blocks (so edges exist) -- integer arithmetic only.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames)[:, None, None, None]
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    slopes = rng.integers(1, 4, size=(3, 3))  # per channel: (x, y, t) speeds
    phase = (x * slopes[c, 0] + y * slopes[c, 1] + t * slopes[c, 2] * 3 + c * 85 + seed * 37) % 510
    wave = np.where(phase < 255, phase, 510 - phase)
    blocks = rng.integers(-12, 13, size=(n_frames, -(-height // 8), -(-width // 8), 3))
    noise = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)[:, :height, :width]
    return np.clip(wave + noise, 0, 255).astype(np.uint8)
