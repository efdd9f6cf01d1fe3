"""Video files -> 14 RGB frames for S3D, and a threaded prefetcher for batches of files.

`read_clip` decodes one file into uint8 (14, H, W, 3) RGB frames at BERG's sampled
indices (`sample_frame_indices`). Two backends sit behind one function signature:

* decord (`_read_decord`): what BERG uses; `get_batch` at the sampled indices.
* PyAV (`_read_pyav`): sequential decode counting the frames that really decode; the
  fallback where decord has no wheel, and the rescue path for files decord fails on
  (more packets than decodable frames, corrupt packets) or reads otherwise than PyAV.

The frames are the ones FFmpeg gives through PyAV (`frame.to_ndarray(format="rgb24")`,
the conversion of torchvision's `read_video`, which BERG's training used). decord 0.6.0
carries its own FFmpeg 4.1; measured on real encoder outputs (`_decord_differs` has the
table, `python -m weights_convert.video_kinds` remeasures it) its frames equal PyAV's
bit for bit for every 8-bit stream (H.264, HEVC, VP8, VP9, MPEG-4, MPEG-2, MJPEG, FFV1,
...; 4:2:0, 4:2:2, 4:4:4; colour matrix and range tags), and differ for

* samples above 8 bits (10/12-bit H.264 or HEVC: up to 25 levels, mean 1.8);
* a display rotation (decord turns the frames, PyAV and read_video do not);
* AV1 and GIF, which decord cannot read;
* colour tags other than BT.601 and range tags that contradict the pixel format, with
  PyAV <= 16 only: it ignores the tags, which decord and PyAV >= 17 apply (bt709: up to
  38 levels, mean 4.6);
* reordered keyframes, where decord's seeks land on the wrong frames (`_scan_packets`).

The decord backend sends those files to PyAV (`pyav_reason(path)` says why for one
file), so both backends return the same frames. The decision costs a probe of about
4 ms per file (the packet scan plus one decoded frame); decoding with PyAV instead of
decord costs nothing measurable for a 360x640, 60-frame H.264 clip (43 vs 45 ms).

Whatever the backend, every bad input raises `VideoReadError` naming the path and the
reason. When PyAV is installed the probe also gives clear reasons (no video stream,
unsupported codec) and rejects grey-scale and alpha streams, which decord would
silently convert to RGB. Not caught: grey content stored in a colour format (e.g.
H.264 4:0:0, which FFmpeg decodes as yuv420p).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from berg_jax.atomic import atomic_open
from berg_jax.errors import InvalidParameterError, UsageError, VideoReadError
from berg_jax.frames import N_FRAMES, sample_frame_indices

__all__ = [
    "VIDEO_EXTENSIONS", "list_videos", "prefetch_clips", "read_clip", "read_input_list", "available_backends",
    "pyav_reason",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")

try:  # decord has no wheel on some platforms (macOS arm64); PyAV then does the work.
    import decord as _decord
except ImportError:  # pragma: no cover - depends on the environment
    _decord = None

try:
    import av as _av
except ImportError:  # pragma: no cover - depends on the environment
    _av = None


def available_backends() -> list[str]:
    """Names of the importable backends, in `backend="auto"` preference order."""
    return [name for name, mod in (("decord", _decord), ("pyav", _av)) if mod is not None]


# --- checks shared by both backends ---------------------------------------------------


def _check_file(path: str) -> None:
    """Reject what no decoder should be asked to open."""
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise VideoReadError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes)")


def _short_error(path: str, n_found: int, n_frames: int) -> VideoReadError:
    return VideoReadError(
        f"{path}: has {n_found} frames, S3D needs at least {n_frames}; "
        "pass --pad-short to repeat the last frame"
    )


def _pad_last(frames: np.ndarray, n_frames: int) -> np.ndarray:
    """(T, H, W, 3) -> (n_frames, H, W, 3) by repeating the last frame, as BERG's training did."""
    pad = np.repeat(frames[-1:], n_frames - len(frames), axis=0)
    return np.concatenate([frames, pad], axis=0)


def _first_error_line(exc: BaseException) -> str:
    # decord's messages carry a timestamp prefix and a C++ stack trace; one line is enough.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _Probe:
    """What the container (and, when scanned, the first decoded frame) says about its first video stream."""

    n_frames: int  # the container's frame count, else its packet count (0: neither known)
    keyframes_reordered: bool  # see `_scan_packets`; False when the packets were not scanned
    codec: str  # the format's name ("h264", "av1"), not the decoder's ("libdav1d")
    pix_fmt: str  # "" when unknown
    colorspace: int  # AVColorSpace tag: 1 bt709, 2 unspecified, 5/6 bt601, 9 bt2020nc, ...
    color_range: int  # AVColorRange tag: 0 unspecified, 1 limited ("tv"), 2 full ("pc")
    rotation: int | None  # display rotation, degrees counter-clockwise; None: not scanned or PyAV can't tell
    size: tuple[int, int]  # (height, width) as stored, before any rotation


def _colour_problem(pix_fmt: str) -> str | None:
    """Why `pix_fmt` is not a 3-channel colour format, or None when it is.

    Decided from the format's components rather than a name list so that every grey
    (gray, gray10le, ya8, monob, ...) and alpha (rgba, argb, yuva420p, gbrap, ...)
    variant is caught. Palette formats (pal8) count as colour: the palette holds RGB.
    """
    fmt = _av.VideoFormat(pix_fmt)
    comps = fmt.components
    alpha = any(c.is_alpha for c in comps)
    # Count channels, not chroma flags: PyAV's `is_chroma` is only true for subsampled
    # chroma, so yuv444p would look grey by it.
    colour = fmt.has_palette or sum(not c.is_alpha for c in comps) >= 3
    if colour and not alpha:
        return None
    kind = "grey-scale" if not colour else "colour"
    extra = " with an alpha channel" if alpha else ""
    return f"{kind} stream{extra} (pix_fmt {pix_fmt}, {len(comps)} channel{'s' * (len(comps) != 1)})"


def _probe(path: str, scan: bool) -> _Probe:
    """Open the container with PyAV and vet its first video stream.

    With `scan`, or when the container has no frame count, the stream's packets are
    read too (I/O only; decord reads them all on open anyway) by `_scan_packets`, which
    also decodes the first frame: its pixel format and colour tags are the ones the RGB
    conversion sees, and its display rotation is where recent PyAV exposes it.
    """
    try:
        container = _av.open(path)
    except Exception as exc:  # noqa: BLE001 - every FFmpeg failure means the same to the user
        reason = getattr(exc, "strerror", None) or _first_error_line(exc)
        raise VideoReadError(
            f"{path}: not a readable video container "
            f"(corrupt, truncated or unsupported format): {reason}"
        ) from exc
    with container:
        if not container.streams.video:
            kinds = [s.type for s in container.streams] or ["none"]
            raise VideoReadError(f"{path}: no video stream (streams found: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:  # the container names a codec this FFmpeg build cannot decode
            raise VideoReadError(f"{path}: unsupported video codec: FFmpeg has no decoder for it")
        # GIF decodes to bgra whatever the file holds (the alpha is transparency, not a 4th
        # colour channel), so its alpha is dropped as decord does instead of rejected.
        if ctx.pix_fmt and ctx.name != "gif":
            problem = _colour_problem(ctx.pix_fmt)
            if problem is not None:
                raise VideoReadError(f"{path}: {problem}; S3D needs 3-channel RGB colour video")
        codec = _codec_name(ctx)
        n_frames = int(stream.frames or 0)
        if not (scan or n_frames == 0):
            return _Probe(n_frames, False, codec, ctx.pix_fmt or "", ctx.colorspace, ctx.color_range, None,
                          (ctx.height, ctx.width))
        n_packets, reordered, first = _scan_packets(container, stream)
        src = first if first is not None else ctx  # the frame's tags win: they are what gets converted
        pix_fmt = first.format.name if first is not None else (ctx.pix_fmt or "")
        return _Probe(n_frames or n_packets, reordered, codec, pix_fmt, src.colorspace, src.color_range,
                      _rotation(stream, first) if scan else None, (ctx.height, ctx.width))


def _codec_name(ctx: Any) -> str:
    # A decoder may be a library's (libdav1d); the rule in `_decord_differs` is about formats.
    name = getattr(ctx.codec, "canonical_name", None) or ctx.name  # canonical_name: PyAV >= 14
    return {"libdav1d": "av1", "libaom-av1": "av1"}.get(name, name)


def _rotation(stream: Any, frame: Any) -> int | None:
    """The rotation decord 0.6.0 applies, degrees counter-clockwise (0..359); None where PyAV cannot tell.

    decord reads a "rotate" tag first (clockwise; Matroska files remuxed by old FFmpeg
    carry one), else the display matrix (counter-clockwise), which PyAV >= 14.1 gives per
    frame and PyAV <= 13 per stream; 14.0 gives neither. `_read_decord` also catches 90
    and 270 degrees by decord's output shape, whatever PyAV says.
    """
    try:
        tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), "")
        if tag.strip() not in ("", "0"):
            return round(-float(tag)) % 360
        if frame is not None and hasattr(frame, "rotation"):
            return round(frame.rotation) % 360
        side = getattr(stream, "side_data", None)
        if side is not None:
            return round(side.get("DISPLAYMATRIX", 0)) % 360
    except (TypeError, ValueError, AttributeError):
        pass  # a malformed tag or matrix: unknown
    return None


def _scan_packets(container: Any, stream: Any) -> tuple[int, bool, Any]:
    """(number of packets, whether a keyframe's decode position differs from its display
    position, the first decoded frame or None).

    Keyframes move with open GOPs: B-frames decoded after an I-frame are shown before it
    (e.g. mpeg4 part 2 with B-frames in mp4). decord 0.6.0 indexes keyframes by decode
    position but frames by display position, so its seeks then land off target and
    get_batch silently returns the wrong frames.
    """
    stamps: list[int] = []
    keys: list[int] = []
    first = None
    stream.codec_context.thread_count = 1  # the first frame comes out without a thread pool's delay
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's closing flush packet
                continue
            if packet.is_keyframe:
                keys.append(len(stamps))
            ts = packet.pts if packet.pts is not None else packet.dts
            stamps.append(-1 if ts is None else ts)
            if first is None:
                try:
                    frames = packet.decode()
                except _av.error.FFmpegError:
                    frames = []  # a bad packet: the decode reports it; the next one may do
                first = frames[0] if frames else None
    except _av.error.FFmpegError:
        pass  # a damaged tail: the decode reports it
    return len(stamps), keyframes_reordered(stamps, keys), first


def keyframes_reordered(stamps: list[int], keys: list[int]) -> bool:
    """Whether a keyframe's decode position differs from its display position.

    Args:
      stamps: each packet's pts (else dts; -1 when it has neither), in decode order.
      keys: the decode positions of the keyframes.
    Returns:
      False also when it cannot be told (no keyframe, a packet without timestamps).
    """
    if not keys or -1 in stamps:  # no timestamps: the two orders cannot be compared
        return False
    order = np.argsort(np.asarray(stamps), kind="stable")  # display position -> decode position
    return any(order[k] != k for k in keys)


# --- which streams decord reads as FFmpeg does ----------------------------------------

# Codecs decord 0.6.0 cannot read: its bundled FFmpeg 4.1 has no AV1 or VVC decoder, and
# it cannot index GIF.
_DECORD_CANNOT_READ = frozenset({"av1", "vvc", "gif"})

# AVColorSpace tags whose YUV -> RGB matrix differs from swscale's BT.601 default.
_NON_601_MATRICES = {1: "bt709", 4: "fcc", 7: "smpte240m", 9: "bt2020nc", 10: "bt2020c"}


def _decord_differs(probe: _Probe) -> str | None:
    """Why decord's RGB frames of this kind of stream differ from PyAV's, or None where they are equal.

    PyAV's `frame.to_ndarray(format="rgb24")` is FFmpeg's swscale conversion, the one
    torchvision's `read_video` (BERG's training) ran; decord 0.6.0 converts with the
    swscale of its own FFmpeg 4.1 in a `scale` filter graph. Measured on real encoder
    outputs, 64x96, 20 frames of saturated colour (`python -m weights_convert.video_kinds`),
    decord vs PyAV 18.1 (FFmpeg 8), max / mean |difference| over all frames, 0..255:

    ========================================== ================ ==========================
    kind (encoder)                             decord vs PyAV   routed to PyAV
    ========================================== ================ ==========================
    8 bit, 4:2:0 / 4:2:2 / 4:4:4 / nv12 / gbrp  0 / 0            no
    (libx264, libx265, libvpx vp8 + vp9,
    mpeg4, mpeg2video, mjpeg, ffv1, huffyuv,
    utvideo), matrix tag none / bt601 / bt709
    / bt2020 / fcc / smpte240m, range tag
    none / tv / pc, yuvj formats
    10, 12 bit 4:2:0 + 4:2:2 (libx264, libx265) 20-25 / 1.5-1.8  yes: bit depth > 8
    16 bit 4:2:0 (ffv1)                        13 / 0.78        yes: bit depth > 8
    12 bit 4:4:4 (prores_ks 4444)              1 / 0.03         yes: bit depth > 8
    10 bit 4:4:4 (libx264), 4:2:2 (prores_ks)  0 / 0            yes: same rule, kept simple
    display matrix or rotate tag 90/180/270    decord's frames  yes: decord turns them,
                                               = PyAV's turned  PyAV does not
    rotate tag of another angle (45)           0 / 0            no: decord ignores it
    av1 (libsvtav1 8 + 10 bit), gif            decord fails     yes: decord cannot read
    ycgco matrix tag                           PyAV raises      no: PyAV >= 17 refuses it
    ========================================== ================ ==========================

    Colour tags depend on the PyAV version: PyAV <= 16 converts every frame as BT.601
    with the range its pixel format implies (yuvj: full), while decord and PyAV >= 17
    apply the tags. Under PyAV 16.1: bt709 38 / 4.6, bt2020 29 / 3.8, smpte240m 33 / 4.2,
    fcc 3 / 0.18, full-range-tagged vp9 yuv420p 20 / 5.6. Whether the installed PyAV
    applies them is tested once at run time (`_pyav_applies_colour_tags`), and only where
    it does not do those tags send a file to PyAV.
    """
    if probe.codec in _DECORD_CANNOT_READ:
        return f"codec {probe.codec}: decord 0.6.0 cannot read it"
    if probe.rotation in (90, 180, 270):  # decord turns by these only; other angles it ignores
        return (f"display rotation of {probe.rotation} degrees counter-clockwise: decord turns the "
                "frames, PyAV (as torchvision's read_video) returns them as stored")
    if not probe.pix_fmt:
        return None  # nothing known to judge by: decord, whose failures still fall back to PyAV
    fmt = _av.VideoFormat(probe.pix_fmt)
    bits = max(c.bits for c in fmt.components)
    if bits > 8:
        return (f"{bits}-bit samples ({probe.pix_fmt}): decord's FFmpeg 4.1 rounds them to 8-bit RGB "
                "differently")
    if fmt.is_rgb or fmt.has_palette:
        return None  # no YUV matrix or range to apply
    applies_matrix, applies_range = _pyav_applies_colour_tags()
    if not applies_matrix and probe.colorspace in _NON_601_MATRICES:
        return (f"colour matrix tag {_NON_601_MATRICES[probe.colorspace]}: decord applies it, "
                f"PyAV {_av.__version__} converts as BT.601")
    full_format = probe.pix_fmt.startswith("yuvj")
    if not applies_range and probe.color_range in (1, 2) and (probe.color_range == 2) != full_format:
        tag = "full (pc)" if probe.color_range == 2 else "limited (tv)"
        return (f"{tag} range tag on {probe.pix_fmt}: decord applies it, PyAV {_av.__version__} "
                "takes the range from the pixel format")
    return None


@functools.lru_cache(maxsize=None)
def _pyav_applies_colour_tags() -> tuple[bool, bool]:
    """(matrix, range): whether this PyAV's rgb24 conversion follows a frame's colour tags.

    PyAV >= 17 converts with `sws_scale_frame`, which reads the frame's tags as decord's
    FFmpeg 4.1 scale filter does; earlier PyAV called `sws_scale` with swscale's
    defaults. Decided by converting one tiny saturated frame with and without each tag,
    so it follows the installed PyAV's behaviour rather than its version number.
    """
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (255, 0, 0)  # saturated red and cyan: far apart under any two matrices or ranges
    rgb[:, 8:] = (0, 160, 160)
    frame = _av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    frame.colorspace, frame.color_range = 2, 0  # unspecified: swscale's defaults
    plain = frame.to_ndarray(format="rgb24")
    frame.colorspace = 1  # bt709
    matrix = not np.array_equal(frame.to_ndarray(format="rgb24"), plain)
    frame.colorspace, frame.color_range = 2, 2  # full range on a limited-range format
    colour_range = not np.array_equal(frame.to_ndarray(format="rgb24"), plain)
    return matrix, colour_range


def _pyav_reason(probe: _Probe) -> str | None:
    """Why the decord backend hands this (scanned) stream to PyAV, or None."""
    if probe.keyframes_reordered:
        return "keyframes shown out of decode order: decord's seeks would land on the wrong frames"
    return _decord_differs(probe)


def pyav_reason(path: str | os.PathLike) -> str | None:
    """Why `read_clip` reads `path` with PyAV even where decord is installed, or None.

    The decord backend hands over the files whose frames it would get wrong (reordered
    keyframes) or get differently from PyAV / FFmpeg (bit depth above 8, display
    rotation, codecs it lacks, and colour tags where the installed PyAV ignores them;
    see `_decord_differs`). Those files decode at PyAV's speed.

    Raises:
      VideoReadError: what `read_clip` raises for a file it cannot open.
      ImportError: PyAV is not installed (without it decord reads everything).
    """
    if _av is None:
        raise ImportError("pyav_reason needs PyAV: pip install av")
    path = os.fspath(path)
    _check_file(path)
    return _pyav_reason(_probe(path, scan=True))


# --- backends: (path, n_frames, pad_short) -> uint8 (n_frames, H, W, 3) ----------------


def _read_pyav(path: str, n_frames: int, pad_short: bool, probe: _Probe | None = None) -> np.ndarray:
    """Sequential decode with PyAV; the frame count T is what actually decodes.

    One decode pass when the guessed T (container count, or the packet count where the
    container has none) is right; a second pass when the decoded count differs.
    Packets that fail to decode are skipped (a warning says how many), and a read error
    mid-file ends the stream there, so a damaged tail costs frames, not the file.
    `probe`: the file's `_probe`, where the caller has it already (saves an open).
    """
    guess = (probe or _probe(path, scan=False)).n_frames
    frames, n_decoded, problems = _decode_wanted(path, _wanted(guess, n_frames))
    if n_decoded != guess and n_decoded > 0:
        frames, n_decoded, problems = _decode_wanted(path, _wanted(n_decoded, n_frames))
    if n_decoded == 0:
        raise VideoReadError(f"{path}: no frame could be decoded (corrupt file or unsupported codec)")
    wanted = _wanted(n_decoded, n_frames)
    if any(i not in frames for i in wanted):  # the second pass decoded a different count
        raise VideoReadError(f"{path}: decoding is not reproducible (frame count changed on re-read)")
    if problems:
        warnings.warn(
            f"{path}: {'; '.join(problems)}; using the {n_decoded} frames that decoded",
            RuntimeWarning,
            stacklevel=3,
        )
    if n_decoded < n_frames and not pad_short:
        raise _short_error(path, n_decoded, n_frames)
    clip = np.stack([frames[i] for i in wanted], axis=0)
    return _pad_last(clip, n_frames) if len(clip) < n_frames else clip


def _wanted(n_total: int, n_frames: int) -> list[int]:
    """Indices to keep out of n_total frames: the linspace sample, or all of them when too few."""
    if n_total < n_frames:
        return list(range(n_total))
    return [int(i) for i in sample_frame_indices(n_total, n_frames)]


def _decode_wanted(path: str, wanted: list[int]) -> tuple[dict[int, np.ndarray], int, list[str]]:
    """Decode every frame of the first video stream, converting only `wanted` ones to RGB.

    Returns:
      ({index: uint8 (H, W, 3)}, number of frames decoded, list of problems met).
    """
    keep = set(wanted)
    out: dict[int, np.ndarray] = {}
    n = 0
    bad_packets = 0
    problems: list[str] = []

    def take(frames: Iterable[Any]) -> None:
        nonlocal n
        for frame in frames:
            if n in keep:
                try:
                    out[n] = frame.to_ndarray(format="rgb24")
                except _av.error.FFmpegError as exc:
                    # Not a bad packet: every frame of the stream would fail alike (e.g. a
                    # ycgco matrix tag, which swscale in FFmpeg >= 8 refuses).
                    raise VideoReadError(
                        f"{path}: PyAV cannot convert its {frame.format.name} frames (colour matrix "
                        f"tag {frame.colorspace}, range tag {frame.color_range}) to RGB: "
                        f"{_first_error_line(exc)}"
                    ) from exc
            n += 1

    with _av.open(path) as container:
        stream = container.streams.video[0]
        # One decoder thread, as decord is run: parallelism comes from prefetch_clips' workers.
        stream.codec_context.thread_count = 1
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except _av.error.FFmpegError:
                    bad_packets += 1
                    continue
                take(frames)
        except _av.error.FFmpegError as exc:
            problems.append(f"reading stopped early ({_first_error_line(exc)})")
            try:  # the demuxer's flush packet never came: drain the decoder by hand
                frames = stream.codec_context.decode(None)
            except _av.error.FFmpegError:
                frames = []
            take(frames)
    if bad_packets:
        problems.insert(0, f"{bad_packets} packet{'s' * (bad_packets != 1)} failed to decode")
    return out, n, problems


def _read_decord(path: str, n_frames: int, pad_short: bool) -> np.ndarray:
    """Random-access decode with decord, as BERG does; PyAV takes over where decord fails.

    decord's `len(vr)` counts packets, which can exceed the frames that decode (corrupt or
    undecodable packets near the end); `get_batch` then raises for the late indices and
    the sequential PyAV decode, which counts real frames, decides T instead. Files where
    decord returns other frames than PyAV without an error go to PyAV directly: reordered
    keyframes (`_scan_packets`) and the kinds of stream in `_decord_differs`. Without
    PyAV installed none of these checks can run.
    """
    probe = None
    if _av is not None:
        probe = _probe(path, scan=True)
        if _pyav_reason(probe) is not None:
            return _read_pyav(path, n_frames, pad_short, probe)
    try:
        vr = _decord.VideoReader(path, ctx=_decord.cpu(0), num_threads=1)
        n_total = len(vr)
    except Exception as exc:  # noqa: BLE001 - decord raises RuntimeError or DECORDError
        # Formats decord cannot index (GIF) or files damaged past its open: PyAV either
        # reads them or raises the precise reason.
        if _av is not None:
            return _read_pyav(path, n_frames, pad_short)
        detail = _first_error_line(exc)
        if "cannot find video stream" in detail:  # decord's words for both cases below
            raise VideoReadError(
                f"{path}: no decodable video stream (no video stream, or an unsupported codec)"
            ) from exc
        raise VideoReadError(
            f"{path}: decord could not open it (corrupt, truncated or unsupported format): {detail}"
        ) from exc
    if n_total < n_frames and not pad_short:
        raise _short_error(path, n_total, n_frames)
    try:
        clip = vr.get_batch(_wanted(n_total, n_frames)).asnumpy()
    except Exception as exc:  # noqa: BLE001
        if _av is None:
            raise VideoReadError(
                f"{path}: decord reports {n_total} frames but failed decoding them: "
                f"{_first_error_line(exc)}"
            ) from exc
        warnings.warn(
            f"{path}: decord failed ({_first_error_line(exc)}); decoding sequentially with PyAV instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return _read_pyav(path, n_frames, pad_short)
    finally:
        del vr  # close the file now, not at the next GC, since workers open many files
    if probe is not None and clip.shape[1:3] != probe.size:
        # decord turned the frames by a rotation the probe missed (PyAV 14.0 reports none).
        return _read_pyav(path, n_frames, pad_short, probe)
    return _pad_last(clip, n_frames) if len(clip) < n_frames else clip



_BACKENDS: dict[str, Callable[[str, int, bool], np.ndarray]] = {
    "decord": _read_decord,
    "pyav": _read_pyav,
}


def read_clip(
    path: str | os.PathLike,
    n_frames: int = N_FRAMES,
    pad_short: bool = False,
    backend: str = "auto",
) -> np.ndarray:
    """Decode one video into the frames S3D sees.

    Counts the frames T of the first video stream and returns those at
    `sample_frame_indices(T, n_frames)` (BERG's linspace rule).

    Args:
      path: video file.
      n_frames: frames to return (S3D: 14).
      pad_short: when T < n_frames, return all T frames followed by copies of the last
        one (BERG's training code did this) instead of raising.
      backend: "decord", "pyav", or "auto" (decord if importable, else PyAV).
    Returns:
      uint8 array (n_frames, H, W, 3), RGB, C-contiguous.
    Raises:
      VideoReadError: missing path, directory, empty / corrupt / truncated file, no video
        stream, unsupported codec, grey-scale or alpha stream (needs PyAV to detect),
        fewer than n_frames frames without pad_short. The message names the path.
      InvalidParameterError: unknown or uninstalled backend.
    """
    path = os.fspath(path)
    if backend == "auto":
        names = available_backends()
        if not names:
            raise InvalidParameterError("no video backend installed: pip install decord (or av)")
        backend = names[0]
    if backend not in _BACKENDS:
        raise InvalidParameterError(f"unknown video backend {backend!r}; use 'auto', 'decord' or 'pyav'")
    if backend not in available_backends():
        package = {"decord": "decord", "pyav": "av"}[backend]
        raise InvalidParameterError(f"video backend {backend!r} is not installed: pip install {package}")
    _check_file(path)
    return np.ascontiguousarray(_BACKENDS[backend](path, n_frames, pad_short))


# --- file lists and prefetching -----------------------------------------------------


def list_videos(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders into the video files below them; keep everything else as given.

    Folders are walked recursively and their files with a video extension
    (`VIDEO_EXTENSIONS`, case-insensitive) are listed in sorted path order. Other
    arguments, including missing paths and non-video files, are kept unchanged so that
    they are reported as failures when read. Input order and duplicates are preserved.
    """
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.isdir(p):
            out.append(p)
            continue
        found = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            found += [os.path.join(root, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
        out += sorted(found)
    return out


def read_input_list(source: str | os.PathLike) -> list[str]:
    """The video paths of a list file, one a line, in the list's order (`encode --inputs-from`).

    Built for screening lists of millions of paths on shared storage: the file is read
    line by line (never whole into memory twice), and no path is looked at -- no stat, no
    folder walk -- so a path that is missing or is a folder fails later, per file, in
    manifest.csv like any bad input.

    Each line is one path, byte for byte, but for its line ending ("\\n", "\\r\\n"):
    spaces are part of the path. Skipped: empty lines, lines of whitespace only, and lines
    whose first character is "#" (comments; a file whose name starts with "#" is listed
    as ./#name). Relative paths stay relative and are opened from the current directory,
    as a shell would open them, and recorded as written (job.json, manifest.csv). Bytes
    that are not valid UTF-8 (or the file system's encoding) are kept, as Python keeps
    such file names (`os.fsdecode`, surrogateescape), so the file opens all the same.

    Args:
      source: the list file, or "-" for standard input.
    Returns:
      list[str], the paths in the list's order, duplicates kept.
    Raises:
      UsageError: the list file is missing, unreadable, a folder, or lists no path.
    """
    name = "standard input" if os.fspath(source) == "-" else os.fspath(source)
    paths: list[str] = []
    n_lines = 0
    try:
        if os.fspath(source) == "-":
            stream = sys.stdin.buffer
            close = False
        else:
            stream = open(source, "rb")
            close = True
        try:
            for raw in stream:
                n_lines += 1
                line = raw.rstrip(b"\n").removesuffix(b"\r")
                if not line.strip() or line.startswith(b"#"):
                    continue
                paths.append(os.fsdecode(line))
        finally:
            if close:
                stream.close()
    except FileNotFoundError:
        raise UsageError(f"input list {name}: no such file; write one video path a line "
                         "(or give - to read the list from standard input)") from None
    except IsADirectoryError:
        raise UsageError(f"input list {name}: is a folder; give the folder itself as an input, "
                         "or a text file with one video path a line") from None
    except OSError as exc:
        raise UsageError(f"input list {name}: cannot be read ({exc.strerror or exc})") from None
    if not paths:
        what = "is empty" if n_lines == 0 else f"has {n_lines} lines but no path (all blank or # comments)"
        raise UsageError(f"input list {name} {what}; write one video path a line")
    return paths


def _read_one(read: Callable[..., np.ndarray], path: str, kwargs: dict[str, Any]) -> np.ndarray | str:
    """A worker's job: the clip, or the failure as a message (never an exception)."""
    try:
        return read(path, **kwargs)
    except VideoReadError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        return f"{path}: {type(exc).__name__}: {exc}"


def prefetch_clips(
    paths: list[str],
    batch_size: int,
    read: Callable[..., np.ndarray] = read_clip,
    num_threads: int = 2,
    queue_size: int = 2,
    skip: set[int] | frozenset[int] | None = None,
    **read_kwargs: Any,
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
    """Decode `paths` in background threads, yielding batches in input order.

    Decoding runs in a thread pool (threads, not processes: JAX is not fork-safe; the
    decoders release the GIL), up to `queue_size` batches ahead of the one being
    consumed, so decoding the next batches overlaps the consumer's compute while memory
    stays bounded to about (queue_size + 1) * batch_size clips.

    Args:
      paths: video paths (e.g. from `list_videos`).
      batch_size: files attempted per batch (the last batch may be smaller).
      read: `read(path, **read_kwargs) -> uint8 (14, H, W, 3)`; wrap `read_clip` to
        resize / preprocess in the worker threads too.
      num_threads: decoding threads.
      queue_size: batches decoded ahead of the consumer (>= 0).
      skip: indices into `paths` not to decode (resume); they appear in no batch, and
        batches are formed from the remaining paths.
      **read_kwargs: passed to `read` (n_frames, pad_short, backend).
    Yields:
      (indices, clips, errors):
        indices: list[int], positions in `paths` of the clips, ascending;
        clips: list of uint8 (14, H, W, 3) arrays aligned with `indices`; a list,
          not a stacked array, because files in one batch may differ in H, W;
        errors: {index: message} for files of this batch that failed (the message
          names the path and the reason). A batch may hold no clip at all.
    Closing the generator early (break, exception, KeyboardInterrupt, `close()`)
    cancels the queued decodes and joins the worker threads before returning.
    """
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
    if num_threads < 1:
        raise InvalidParameterError(f"num_threads must be >= 1, got {num_threads}")
    if queue_size < 0:
        raise InvalidParameterError(f"queue_size must be >= 0, got {queue_size}")
    return _prefetch(paths, input_batches(len(paths), batch_size, skip), read, num_threads, queue_size,
                     read_kwargs)


def _prefetch(
    paths: list[str],
    batches: Iterator[list[int]],
    read: Callable[..., np.ndarray],
    num_threads: int,
    queue_size: int,
    read_kwargs: dict[str, Any],
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
    # A separate generator so that argument errors raise at the call, not at first next().
    pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="berg-video")
    try:
        yield from batches_in_order(paths, batches, lambda path: pool.submit(_read_one, read, path, read_kwargs),
                                    queue_size)
    finally:
        # Runs on exhaustion, close(), a thrown exception and garbage collection alike:
        # drop what has not started, wait for the (at most num_threads) running decodes.
        pool.shutdown(wait=True, cancel_futures=True)


def input_batches(n_inputs: int, batch_size: int,
                  skip: set[int] | frozenset[int] | None = None) -> Iterator[list[int]]:
    """Indices 0..n_inputs-1 but `skip`, in order, `batch_size` at a time: what every prefetcher decodes."""
    skip = skip or frozenset()
    todo = [i for i in range(n_inputs) if i not in skip]
    return iter([todo[s: s + batch_size] for s in range(0, len(todo), batch_size)])


def batches_in_order(
    paths: list[str],
    batches: Iterator[list[int]],
    submit: Callable[[str], Future],
    queue_size: int,
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
    """The batching every prefetcher shares: decode `queue_size` batches ahead, yield in input order.

    Args:
      paths: all the inputs.
      batches: lists of indices into `paths`, in order.
      submit: path -> Future of the clip, or of the failure message (a str).
      queue_size: batches submitted ahead of the one being yielded.
    Yields:
      (indices, clips, errors) as `prefetch_clips` documents. The caller owns the
      executor and shuts it down when this generator closes.
    """
    pending: deque[tuple[list[int], list[Future]]] = deque()

    def submit_next() -> None:
        batch = next(batches, None)
        if batch is not None:
            pending.append((batch, [submit(paths[i]) for i in batch]))

    for _ in range(queue_size + 1):  # the batch to yield first, plus queue_size ahead
        submit_next()
    while pending:
        batch, futures = pending.popleft()
        submit_next()  # keep queue_size batches decoding while this one is consumed
        indices: list[int] = []
        clips: list[np.ndarray] = []
        errors: dict[int, str] = {}
        for i, fut in zip(batch, futures):
            result = fut.result()
            if isinstance(result, str):
                errors[i] = result
            else:
                indices.append(i)
                clips.append(result)
        yield indices, clips, errors


# --- writing ------------------------------------------------------------------------


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 24) -> None:
    """Write RGB frames to an H.264 (libx264, else MPEG-4 part 2) yuv420p mp4, atomically.

    The file appears at `path` complete or not at all (temporary file in the same folder,
    fsync, `os.replace`), so a reader never sees a half-written video.

    Args:
      path: the .mp4 to write (replaced if it exists; its folder must exist).
      frames: uint8 (T, H, W, 3) RGB, T >= 1; H and W even (yuv420p halves the chroma
        planes, so odd sizes would be cropped or rejected by the encoder).
      fps: frame rate (frames are at pts 0, 1, ... in units of 1/fps).
    Raises:
      InvalidParameterError: frames not uint8 (T, H, W, 3), empty, odd H or W, or fps < 1.
      ImportError: PyAV is not installed.
    """
    from fractions import Fraction

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InvalidParameterError(f"write_mp4: frames must be (T, H, W, 3) RGB with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise InvalidParameterError(
            f"write_mp4: frames must be uint8 0..255, got {frames.dtype}; convert float 0..1 frames with "
            "np.round(frames * 255).astype(np.uint8)")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise InvalidParameterError(
            f"write_mp4: frames of {h}x{w} cannot be stored as yuv420p, which needs an even height and "
            "width; crop or pad them by one pixel (e.g. frames[:, :h - h % 2, :w - w % 2])")
    if int(fps) != fps or fps < 1:
        raise InvalidParameterError(f"write_mp4: fps must be a positive integer, got {fps!r}")
    if _av is None:
        raise ImportError("write_mp4 needs PyAV: pip install av")
    codec = "libx264" if "libx264" in _av.codecs_available else "mpeg4"
    with atomic_open(path) as f:
        with _av.open(f, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(int(fps)))
            stream.height, stream.width = h, w
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "18"}  # fine-grained stimuli (pixel noise) suffer at the default 23
            for k, rgb in enumerate(np.ascontiguousarray(frames)):
                frame = _av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = k
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)
