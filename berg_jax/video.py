"""Video files -> 14 RGB frames for S3D, and a threaded prefetcher for batches of files.

`read_clip` decodes one file into uint8 (14, H, W, 3) RGB frames at BERG's sampled
indices (`sample_frame_indices`). Two backends sit behind one function signature:

* decord (`_read_decord`): what BERG uses; `get_batch` at the sampled indices.
* PyAV (`_read_pyav`): sequential decode counting the frames that really decode; the
  fallback where decord has no wheel, and the rescue path for files decord fails on
  (more packets than decodable frames, corrupt packets, GIF) or silently misreads
  (reordered keyframes, see `_scan_packets`).

The two agree bit for bit wherever both work (same FFmpeg colour conversion).
Whatever the backend, every bad input raises `VideoReadError` naming the path and the
reason. When PyAV is installed a cheap container probe runs first; it gives clear
reasons (no video stream, unsupported codec) and rejects grey-scale and alpha streams,
which decord would silently convert to RGB. Not caught: grey content stored in a colour
format (e.g. H.264 4:0:0, which FFmpeg decodes as yuv420p).
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from berg_jax.errors import InvalidParameterError, VideoReadError
from berg_jax.preprocess import N_FRAMES, sample_frame_indices

__all__ = ["VIDEO_EXTENSIONS", "list_videos", "prefetch_clips", "read_clip", "available_backends"]

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
    """What the container says about its first video stream."""

    n_frames: int  # the container's frame count, else its packet count (0: neither known)
    keyframes_reordered: bool  # see `_scan_packets`; False when the packets were not scanned


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
    """Open the container with PyAV and vet its first video stream (no decoding).

    With `scan`, or when the container has no frame count, the stream's packets are
    read too (I/O only; decord reads them all on open anyway) by `_scan_packets`.
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
        n_frames = int(stream.frames or 0)
        if not (scan or n_frames == 0):
            return _Probe(n_frames, False)
        n_packets, reordered = _scan_packets(container, stream)
        return _Probe(n_frames or n_packets, reordered)


def _scan_packets(container: Any, stream: Any) -> tuple[int, bool]:
    """(number of packets, whether a keyframe's decode position differs from its display position).

    Keyframes move with open GOPs: B-frames decoded after an I-frame are shown before it
    (e.g. mpeg4 part 2 with B-frames in mp4). decord 0.6.0 indexes keyframes by decode
    position but frames by display position, so its seeks then land off target and
    get_batch silently returns the wrong frames.
    """
    stamps: list[int] = []
    keys: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's closing flush packet
                continue
            if packet.is_keyframe:
                keys.append(len(stamps))
            ts = packet.pts if packet.pts is not None else packet.dts
            stamps.append(-1 if ts is None else ts)
    except _av.error.FFmpegError:
        pass  # a damaged tail: the decode reports it
    if not keys or -1 in stamps:  # no timestamps: the two orders cannot be compared
        return len(stamps), False
    order = np.argsort(np.asarray(stamps), kind="stable")  # display position -> decode position
    return len(stamps), any(order[k] != k for k in keys)


# --- backends: (path, n_frames, pad_short) -> uint8 (n_frames, H, W, 3) ----------------


def _read_pyav(path: str, n_frames: int, pad_short: bool) -> np.ndarray:
    """Sequential decode with PyAV; the frame count T is what actually decodes.

    One decode pass when the guessed T (container count, or the packet count where the
    container has none) is right; a second pass when the decoded count differs.
    Packets that fail to decode are skipped (a warning says how many), and a read error
    mid-file ends the stream there, so a damaged tail costs frames, not the file.
    """
    guess = _probe(path, scan=False).n_frames
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
                out[n] = frame.to_ndarray(format="rgb24")
            n += 1

    with _av.open(path) as container:
        stream = container.streams.video[0]
        # One decoder thread, as decord is run: parallelism comes from prefetch_clips' workers.
        stream.codec_context.thread_count = 1
        try:
            for packet in container.demux(stream):
                try:
                    take(packet.decode())
                except _av.error.FFmpegError:
                    bad_packets += 1
        except _av.error.FFmpegError as exc:
            problems.append(f"reading stopped early ({_first_error_line(exc)})")
            try:  # the demuxer's flush packet never came: drain the decoder by hand
                take(stream.codec_context.decode(None))
            except _av.error.FFmpegError:
                pass
    if bad_packets:
        problems.insert(0, f"{bad_packets} packet{'s' * (bad_packets != 1)} failed to decode")
    return out, n, problems


def _read_decord(path: str, n_frames: int, pad_short: bool) -> np.ndarray:
    """Random-access decode with decord, as BERG does; PyAV takes over where decord fails.

    decord's `len(vr)` counts packets, which can exceed the frames that decode (corrupt or
    undecodable packets near the end); `get_batch` then raises for the late indices and
    the sequential PyAV decode, which counts real frames, decides T instead. Files whose
    keyframes are reordered (`_scan_packets`), where decord returns wrong frames without
    an error, go to PyAV directly. Without PyAV installed neither check can run.
    """
    if _av is not None and _probe(path, scan=True).keyframes_reordered:
        return _read_pyav(path, n_frames, pad_short)
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
    skip = skip or frozenset()
    todo = [i for i in range(len(paths)) if i not in skip]
    batches = iter([todo[s : s + batch_size] for s in range(0, len(todo), batch_size)])
    return _prefetch(paths, batches, read, num_threads, queue_size, read_kwargs)


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
    pending: deque[tuple[list[int], list[Future]]] = deque()

    def submit_next() -> None:
        batch = next(batches, None)
        if batch is not None:
            pending.append((batch, [pool.submit(_read_one, read, paths[i], read_kwargs) for i in batch]))

    try:
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
    finally:
        # Runs on exhaustion, close(), a thrown exception and garbage collection alike:
        # drop what has not started, wait for the (at most num_threads) running decodes.
        pool.shutdown(wait=True, cancel_futures=True)
        pending.clear()


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

    from berg_jax.outputs import atomic_open

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
