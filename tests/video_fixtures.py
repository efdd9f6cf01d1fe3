"""Small synthetic videos for the reader tests, written with PyAV.

Every helper writes a deterministic file and returns its path as a `str`. The good
videos encode their frame number k in their content (`frame_rgb(k)`: the frame mean
rises by `STEP` per frame), so `frame_level` tells from a decoded frame which source
frame it came from, even through a lossy codec.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

# The frame-wide level rises by STEP per frame (period PERIOD); with the +-16 gradient,
# the +-28 colour pattern and the +-8 offsets every value stays inside 0..255, and
# levels 6 apart survive lossy codecs' rounding of the frame mean.
STEP = 6
BASE = 64
PERIOD = 24


def frame_rgb(k: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Source frame k: uint8 (height, width, 3) RGB.

    A horizontal grey gradient and a saturated colour pattern (the three channels are
    sines 120 degrees apart, so it has chroma and sums to about zero over the frame),
    both moving with k so codecs see motion, plus per-channel offsets fixed by `seed`,
    on top of a frame-wide level BASE + STEP * (k % PERIOD) that identifies the frame.
    """
    level = BASE + STEP * (k % PERIOD)
    x = (np.arange(width)[None, :] + k) % width
    y = np.arange(height)[:, None]
    grad = (x * 32 // max(width - 1, 1) - 16) + np.zeros((height, 1), np.int64)
    phase = 2 * np.pi * (x / width + y / height)
    colour = np.stack([28 * np.sin(phase + c * 2 * np.pi / 3) for c in range(3)], axis=-1)
    offs = np.random.default_rng(seed).integers(-8, 9, size=3)
    img = level + grad[:, :, None] + np.round(colour) + offs[None, None, :]
    return np.clip(img, 0, 255).astype(np.uint8)


def frame_level(frame: np.ndarray, seed: int = 0) -> int:
    """Recover k % PERIOD from a decoded frame (inverse of the level in `frame_rgb`)."""
    offs = np.random.default_rng(seed).integers(-8, 9, size=3)
    return int(round((float(frame.mean()) - float(offs.mean()) - BASE) / STEP))


def write_test_video(
    path: str | os.PathLike,
    n_frames: int = 20,
    height: int = 48,
    width: int = 64,
    fps: int = 10,
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    seed: int = 0,
    options: dict[str, str] | None = None,
) -> str:
    """Write `n_frames` of `frame_rgb` with `codec`/`pix_fmt` into `path` (container from suffix).

    Default `options`: libx264 lossless (crf 0; yuv420p still loses chroma detail), mpeg4
    at fixed quantiser 1 (its best; its default bitrate blurs the frame level).
    """
    path = str(path)
    if options is None:
        options = {
            "libx264": {"crf": "0", "preset": "ultrafast"},
            "mpeg4": {"flags": "qscale", "global_quality": "1"},
        }.get(codec, {})
    with av.open(path, mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # One encoder thread: the test machine has two cores shared with the test runner.
        stream.codec_context.thread_count = 1
        fmt = av.VideoFormat(pix_fmt)
        special = pix_fmt.startswith("gray") or any(c.is_alpha for c in fmt.components)
        for k in range(n_frames):
            rgb = frame_rgb(k, height, width, seed)
            if special:
                # Encoders accept the source in their own format; build it explicitly so
                # the stream really is grey / has alpha.
                frame = _special_frame(rgb, pix_fmt)
            else:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _special_frame(rgb: np.ndarray, pix_fmt: str) -> av.VideoFrame:
    """A grey frame (channel mean) or an alpha one (constant alpha 200) from an RGB one."""
    if pix_fmt.startswith("gray"):
        return av.VideoFrame.from_ndarray(rgb.mean(axis=2).astype(np.uint8), format="gray").reformat(
            format=pix_fmt
        )
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    return av.VideoFrame.from_ndarray(rgba, format="rgba").reformat(format=pix_fmt)


# --- bad inputs ---------------------------------------------------------------------


def write_zero_length(path: str | os.PathLike) -> str:
    """An empty file with a video suffix."""
    open(path, "wb").close()
    return str(path)


def write_random_bytes(path: str | os.PathLike, n_bytes: int = 4096, seed: int = 0) -> str:
    """Bytes that are no container at all."""
    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return str(path)


def write_truncated(path: str | os.PathLike, n_frames: int = 20, keep: float = 0.5) -> str:
    """A valid mp4 cut to its first `keep` fraction of bytes (mp4: the moov atom is at the end)."""
    path = str(path)
    write_test_video(path, n_frames=n_frames)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
    return path


def write_corrupt_tail(
    path: str | os.PathLike, n_frames: int = 20, n_bad: int = 4, seed: int = 0
) -> str:
    """An H.264 mp4 whose last `n_bad` packets hold random bytes (use a .mp4 path).

    The container still reports `n_frames` frames but only `n_frames - n_bad` decode (no
    B-frames, so they are frames 0 .. n_frames - n_bad - 1).
    """
    path = write_test_video(path, n_frames=n_frames)
    with av.open(path) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(seed)
    for pos, size in spans[-n_bad:]:
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def write_unknown_codec(path: str | os.PathLike, n_frames: int = 20) -> str:
    """An AVI whose codec tag no decoder knows (use a .avi path): mpeg4 retagged FMP4 -> QQQQ."""
    path = write_test_video(path, n_frames=n_frames, codec="mpeg4")
    data = open(path, "rb").read()
    assert data.count(b"FMP4") == 2  # the stream header's handler and the bitmap header's compression
    with open(path, "wb") as f:
        f.write(data.replace(b"FMP4", b"QQQQ"))
    return path


def write_gray(
    path: str | os.PathLike, n_frames: int = 20, codec: str = "ffv1", pix_fmt: str = "gray"
) -> str:
    """A grey-scale stream. Encodable pairs: ffv1/gray (.mkv), png/gray or png/ya8 (.mov).

    Not libx264/gray: FFmpeg decodes H.264 4:0:0 as yuv420p, so it is not detectable.
    """
    return write_test_video(path, n_frames=n_frames, codec=codec, pix_fmt=pix_fmt)


def write_alpha(
    path: str | os.PathLike, n_frames: int = 20, codec: str = "png", pix_fmt: str = "rgba"
) -> str:
    """A stream with alpha. Encodable pairs: png/rgba (.mov), qtrle/argb (.mov), ffv1/yuva420p (.mkv)."""
    return write_test_video(path, n_frames=n_frames, codec=codec, pix_fmt=pix_fmt)


def write_audio_only(path: str | os.PathLike, seconds: float = 0.5, rate: int = 8000) -> str:
    """A container with one PCM audio stream and no video (use a .mkv or .wav path)."""
    path = str(path)
    with av.open(path, mode="w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate)
        n = int(seconds * rate)
        t = np.arange(n) / rate
        samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_open_gop(path: str | os.PathLike, n_frames: int = 20) -> str:
    """mpeg4 with B-frames in mp4 (use a .mp4 path).

    The I-frames after the first one are decoded before the B-frames shown ahead of
    them, so decode order and display order of keyframes differ: the case where decord's
    seeks (get_batch on non-consecutive indices) land on the wrong frame.
    """
    return write_test_video(
        path, n_frames=n_frames, codec="mpeg4",
        options={"flags": "qscale", "global_quality": "1", "bf": "2", "g": "6"},
    )


def write_short(path: str | os.PathLike, n_frames: int = 9) -> str:
    """A valid video with fewer frames than S3D's 14."""
    return write_test_video(path, n_frames=n_frames)
