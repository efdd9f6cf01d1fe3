"""Small synthetic videos for the reader tests, written with PyAV.

Every helper writes a deterministic file and returns its path as a `str`. The good
videos encode their frame number k in their content (`frame_rgb(k)`: the frame mean
rises by `STEP` per frame), so `frame_level` tells from a decoded frame which source
frame it came from, even through a lossy codec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


# --- stream kinds (codec x pixel format x colour tags), for the decord/PyAV routing ------

# What colour tags a file can carry, by the names FFmpeg writes into the stream and
# container headers (AVColorSpace / AVColorRange / AVColorPrimaries / AVColorTransfer
# values; PyAV takes the ints).
COLOUR_TAGS = {
    "bt709": {"colorspace": 1, "color_primaries": 1, "color_trc": 1},
    "bt601": {"colorspace": 6, "color_primaries": 6, "color_trc": 6},  # smpte170m
    "bt2020": {"colorspace": 9, "color_primaries": 9, "color_trc": 14},  # bt2020nc, 10-bit trc
    "fcc": {"colorspace": 4},
    "smpte240m": {"colorspace": 7, "color_primaries": 7, "color_trc": 7},
    "ycgco": {"colorspace": 8},
}
RANGE_TAGS = {"tv": 1, "pc": 2}


def kind_frames(n_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Source frames for the stream-kind fixtures: uint8 (T, H, W, 3) RGB.

    A full-saturation hue wheel across x (pure reds, greens, blues and their mixes, where
    a reader's colour matrix matters most) darkening down y to black, so every channel
    spans 0..255 (where a range mistake clips). An 8x8 checkerboard dims alternate blocks
    to 3/4, giving sharp chroma edges (where chroma upsampling differs). The wheel drifts
    by a seeded step per frame so that codecs see motion and no two frames are alike.
    """
    step = 0.03 + 0.01 * (seed % 5)
    t = np.arange(n_frames)[:, None, None]
    hue = (np.arange(width)[None, None, :] / width + step * t) % 1.0 * 6.0
    value = 1.0 - np.arange(height)[None, :, None] / max(height - 1, 1)
    checker = (np.arange(height)[:, None] // 8 + np.arange(width)[None, :] // 8) % 2
    value = value * (1.0 - 0.25 * checker[None])
    # HSV -> RGB at saturation 1: each channel is a trapezoid of the hue.
    chans = [np.clip(np.abs((hue + off) % 6.0 - 3.0) - 1.0, 0.0, 1.0) for off in (0.0, 4.0, 2.0)]
    rgb = np.stack(chans, axis=-1) * value[..., None]
    return np.round(rgb * 255).astype(np.uint8)


def write_kind(
    path: str | os.PathLike,
    codec: str,
    pix_fmt: str,
    n_frames: int = 20,
    height: int = 64,
    width: int = 96,
    fps: int = 10,
    options: dict[str, str] | None = None,
    matrix: str | None = None,
    colour_range: str | None = None,
    rotation: int = 0,
    rotate_tag: str | None = None,
    seed: int = 0,
) -> str:
    """Write `kind_frames` with a real encoder, optionally tagged with a colour matrix / range.

    Args:
      path: output file; the container follows its suffix (.mp4, .mkv, .webm, .mov, ...).
      codec, pix_fmt: an encoder of this PyAV build and one of its pixel formats.
      options: encoder options (default: none, i.e. the encoder's defaults).
      matrix: None (no tag: "unspecified"), or a key of COLOUR_TAGS. The RGB -> YUV
        conversion uses the same matrix, as a real encode pipeline would.
      colour_range: None (no tag), "tv" (limited) or "pc" (full). With "pc" the samples
        really span 0..255 (converted with full range), not just the tag.
      rotation: display rotation in degrees (counter-clockwise), stored as the container's
        display matrix as phones do; needs PyAV >= 17 (`set_display_rotation`).
      rotate_tag: a "rotate" metadata tag (clockwise degrees), as old FFmpeg wrote into
        Matroska files; no display matrix.
    Raises:
      ValueError: an unknown matrix or range name.
    """
    path = str(path)
    if matrix is not None and matrix not in COLOUR_TAGS:
        raise ValueError(f"write_kind: unknown matrix {matrix!r}; use one of {sorted(COLOUR_TAGS)}")
    if colour_range is not None and colour_range not in RANGE_TAGS:
        raise ValueError(f"write_kind: unknown colour_range {colour_range!r}; use 'tv' or 'pc'")
    tags = dict(COLOUR_TAGS.get(matrix, {}))
    if colour_range is not None:
        tags["color_range"] = RANGE_TAGS[colour_range]
    # The RGB -> YUV conversion itself: swscale names the matrices differently.
    sws_matrix = {"bt709": "ITU709", "bt601": "SMPTE170M", "bt2020": "BT2020", "fcc": "FCC",
                  "smpte240m": "SMPTE240M"}.get(matrix or "", "ITU601")
    if not hasattr(av.video.reformatter.Colorspace, sws_matrix):  # BT2020: PyAV >= 17 only
        sws_matrix = "ITU601"  # the content then is not quite BT.2020; the tag is what is tested
    full = colour_range == "pc" or pix_fmt.startswith("yuvj")
    if codec == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder to stderr otherwise
    with av.open(path, mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps), options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.thread_count = 1  # two shared cores on the test machine
        if rotation:
            stream.set_display_rotation(rotation)
        if rotate_tag is not None:
            stream.metadata["rotate"] = rotate_tag
        for name, value in tags.items():
            if hasattr(stream.codec_context, name):  # PyAV <= 16 has no primaries / transfer
                setattr(stream.codec_context, name, value)
        for k, rgb in enumerate(kind_frames(n_frames, height, width, seed)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format=pix_fmt,
                dst_colorspace=sws_matrix,
                dst_color_range="JPEG" if full else "MPEG",
            )
            for name, value in tags.items():
                if hasattr(frame, name):
                    setattr(frame, name, value)
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@dataclass(frozen=True)
class StreamKind:
    """One kind of stream for the decord/PyAV routing: how to write it and where it should go.

    `routed` is the reason class `video.pyav_reason` should give: None (decord reads it),
    "codec", "bit depth", "rotation", or "colour tags" (PyAV only where the installed
    PyAV ignores colour tags, i.e. PyAV <= 16; decord otherwise).
    """

    name: str
    suffix: str
    codec: str
    pix_fmt: str
    routed: str | None
    options: dict[str, str] = field(default_factory=dict)
    matrix: str | None = None
    colour_range: str | None = None
    rotation: int = 0
    rotate_tag: str | None = None
    fps: int = 10

    def write(self, folder: str | os.PathLike, n_frames: int = 20, height: int = 64, width: int = 96) -> str:
        return write_kind(
            os.path.join(folder, self.name + self.suffix), self.codec, self.pix_fmt, n_frames=n_frames,
            height=height, width=width, fps=self.fps, options=self.options, matrix=self.matrix,
            colour_range=self.colour_range, rotation=self.rotation, rotate_tag=self.rotate_tag,
        )

    def missing(self) -> str | None:
        """Why this PyAV build cannot write this kind, or None."""
        try:
            codec = av.Codec(self.codec, "w")
        except Exception:  # noqa: BLE001 - UnknownCodecError, or FFmpegError on old PyAV
            return f"no {self.codec} encoder in this PyAV build"
        formats = [f.name for f in (codec.video_formats or [])]
        if formats and self.pix_fmt not in formats:
            return f"this PyAV build's {self.codec} cannot encode {self.pix_fmt}"
        if self.rotation and not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
            return "this PyAV cannot write a display rotation (needs PyAV >= 17)"
        return None


_X265 = {"x265-params": "log-level=none"}
_TAGS = "colour tags"
STREAM_KINDS = [
    # 8-bit H.264, the common case, in every chroma layout and with every colour tag
    StreamKind("h264-yuv420p", ".mp4", "libx264", "yuv420p", None),
    StreamKind("h264-yuv420p-bt601", ".mp4", "libx264", "yuv420p", None, matrix="bt601"),
    StreamKind("h264-yuv420p-bt709", ".mp4", "libx264", "yuv420p", _TAGS, matrix="bt709"),
    StreamKind("h264-yuv420p-bt709-tv", ".mp4", "libx264", "yuv420p", _TAGS, matrix="bt709", colour_range="tv"),
    StreamKind("h264-yuv420p-bt2020", ".mkv", "libx264", "yuv420p", _TAGS, matrix="bt2020"),
    StreamKind("h264-yuv420p-fcc", ".mkv", "libx264", "yuv420p", _TAGS, matrix="fcc"),
    StreamKind("h264-yuv420p-smpte240m", ".mkv", "libx264", "yuv420p", _TAGS, matrix="smpte240m"),
    # decord and PyAV <= 16 convert ycgco as BT.601; PyAV >= 17 refuses it (EOPNOTSUPP).
    StreamKind("h264-yuv420p-ycgco", ".mkv", "libx264", "yuv420p", None, matrix="ycgco"),
    # libx264 writes a full-range flag, which FFmpeg decodes as yuvj420p: no tag conflict.
    StreamKind("h264-yuv420p-pc", ".mp4", "libx264", "yuv420p", None, colour_range="pc"),
    StreamKind("h264-yuv420p-bt709-pc", ".mp4", "libx264", "yuv420p", _TAGS, matrix="bt709", colour_range="pc"),
    StreamKind("h264-yuvj420p", ".mp4", "libx264", "yuvj420p", None),
    StreamKind("h264-yuv422p", ".mp4", "libx264", "yuv422p", None),
    StreamKind("h264-yuv444p", ".mp4", "libx264", "yuv444p", None),
    StreamKind("h264-nv12", ".mkv", "libx264", "nv12", None),
    StreamKind("h264-yuv420p10le", ".mp4", "libx264", "yuv420p10le", "bit depth"),
    StreamKind("h264-yuv422p10le", ".mkv", "libx264", "yuv422p10le", "bit depth"),
    StreamKind("h264-yuv444p10le", ".mkv", "libx264", "yuv444p10le", "bit depth"),
    StreamKind("h264-yuv420p10le-bt2020", ".mkv", "libx264", "yuv420p10le", "bit depth", matrix="bt2020"),
    StreamKind("h264-rotate90", ".mp4", "libx264", "yuv420p", "rotation", rotation=90),
    StreamKind("h264-rotate180", ".mp4", "libx264", "yuv420p", "rotation", rotation=180),
    StreamKind("h264-rotate270", ".mov", "libx264", "yuv420p", "rotation", rotation=270),
    StreamKind("h264-rotate-tag90", ".mkv", "libx264", "yuv420p", "rotation", rotate_tag="90"),
    StreamKind("h264-rotate-tag45", ".mkv", "libx264", "yuv420p", None, rotate_tag="45"),  # decord ignores it
    # HEVC
    StreamKind("hevc-yuv420p", ".mp4", "libx265", "yuv420p", None, options=_X265),
    StreamKind("hevc-yuv420p-bt709", ".mkv", "libx265", "yuv420p", _TAGS, options=_X265, matrix="bt709"),
    StreamKind("hevc-yuv444p", ".mkv", "libx265", "yuv444p", None, options=_X265),
    StreamKind("hevc-yuv420p10le", ".mp4", "libx265", "yuv420p10le", "bit depth", options=_X265),
    StreamKind("hevc-yuv420p12le", ".mkv", "libx265", "yuv420p12le", "bit depth", options=_X265),
    # VP8 / VP9 (this build's libvpx encodes 8-bit only)
    StreamKind("vp8-yuv420p", ".webm", "libvpx", "yuv420p", None),
    StreamKind("vp9-yuv420p", ".webm", "libvpx-vp9", "yuv420p", None),
    StreamKind("vp9-yuv420p-bt709", ".webm", "libvpx-vp9", "yuv420p", _TAGS, matrix="bt709"),
    # VP9 keeps full range as a flag on yuv420p (no yuvj format): a range tag conflict.
    StreamKind("vp9-yuv420p-pc", ".webm", "libvpx-vp9", "yuv420p", _TAGS, colour_range="pc"),
    StreamKind("vp9-yuv444p", ".webm", "libvpx-vp9", "yuv444p", None),
    StreamKind("vp9-yuv420p10le", ".webm", "libvpx-vp9", "yuv420p10le", "bit depth"),
    # AV1
    StreamKind("av1-yuv420p", ".mkv", "libsvtav1", "yuv420p", "codec"),
    StreamKind("av1-yuv420p10le", ".mp4", "libsvtav1", "yuv420p10le", "codec"),
    StreamKind("av1-aom-yuv420p", ".webm", "libaom-av1", "yuv420p", "codec"),
    # MPEG-4 part 2, MPEG-2, MJPEG
    StreamKind("mpeg4-yuv420p", ".mp4", "mpeg4", "yuv420p", None),
    StreamKind("mpeg4-yuv420p-bt709", ".mp4", "mpeg4", "yuv420p", _TAGS, matrix="bt709"),
    StreamKind("mpeg4-yuv420p-avi", ".avi", "mpeg4", "yuv420p", None),
    StreamKind("mpeg2-yuv420p", ".mpg", "mpeg2video", "yuv420p", None, fps=25),
    StreamKind("mpeg2-yuv422p", ".mkv", "mpeg2video", "yuv422p", None, fps=25),
    StreamKind("mjpeg-yuvj420p", ".avi", "mjpeg", "yuvj420p", None),
    StreamKind("mjpeg-yuvj422p", ".mov", "mjpeg", "yuvj422p", None),
    StreamKind("mjpeg-yuvj444p", ".mkv", "mjpeg", "yuvj444p", None),
    # intermediate / lossless codecs
    StreamKind("prores-yuv422p10le", ".mov", "prores_ks", "yuv422p10le", "bit depth"),
    StreamKind("prores-yuv444p10le", ".mov", "prores_ks", "yuv444p10le", "bit depth"),  # decodes as 12-bit
    StreamKind("ffv1-yuv420p", ".mkv", "ffv1", "yuv420p", None),
    StreamKind("ffv1-yuv420p16le", ".mkv", "ffv1", "yuv420p16le", "bit depth"),
    StreamKind("huffyuv-yuv422p", ".avi", "huffyuv", "yuv422p", None),
    StreamKind("utvideo-gbrp", ".avi", "utvideo", "gbrp", None),
    StreamKind("gif-rgb8", ".gif", "gif", "rgb8", "codec"),
]
