"""Decode on the GPU too: NVDEC (through PyNvVideoCodec) beside the CPU readers.

`GpuClipReader.read(path)` returns the same 14 frames as `video.read_clip(path)`
-- uint8 (14, H, W, 3) RGB at `sample_frame_indices(T)` -- but decoded by the GPU's
NVDEC engines and handed to JAX through DLPack: the clip is a `jax.Array` on the GPU,
and the decoded frames never cross the PCIe bus (only the compressed packets do). `DecodePool` runs such readers (one per thread)
next to CPU-reader threads, all taking paths from one queue (`--decoder both`).

NVDEC is only asked for files it decodes like the CPU path does. Before any decoding,
a PyAV container probe (`probe_stream`: headers plus the packet index, I/O only) feeds
`nvdec_fallback_reason`, which sends to the CPU readers, with a short reason for the
manifest: codecs NVDEC on Hopper lacks or that it indexes differently, frame sizes
outside its limits, grey / alpha / >8-bit / non-4:2:0 / full-range / interlaced
streams, containers without a usable index, and every file whose frame count T is
uncertain. A GPU decode that fails or returns fewer frames also falls back.

Frame count. The CPU readers count T as decord does, one frame per packet, or, where
packets fail to decode, as the frames PyAV really decodes. NVDEC takes the files where
those agree by construction: the container's count equals the packet count (or the
container stores none), no packet is corrupt or flagged to be discarded (mp4 edit
lists), no keyframe is reordered (open GOPs, where decord itself is wrong), and
PyNvVideoCodec's own demuxer counts the same T. Not caught before decoding: a packet
that looks whole but fails to decode. FFmpeg drops that frame (so the CPU's T
shrinks); NVDEC conceals the error and returns a frame, so T differs by the frames
lost. Such files are rare and usually flagged corrupt by the demuxer.

Colour. PyNvVideoCodec converts NV12 to RGB with its own CUDA kernel: limited range
always, the matrix the stream signals, nearest chroma, truncation; FFmpeg (decord,
PyAV) rounds. Measured with PyNvVideoCodec 2.2.4 on H100, untagged H.264 360x640: at
most 2 levels from decord, 0.65 on average. Full-range streams stay on the CPU; so do
matrices other than BT.709 / BT.601 / unspecified (`NVDEC_COLOUR_MATRICES`). Whether
both sides read the BT.709 and BT.601 tags alike is what the tagged clips of
`benchmarks/gpu_decode.py` measure (the SDK's sample kernels treat "unspecified" as
BT.709, FFmpeg as BT.601).

Threads. A PyNvVideoCodec decoder is not thread-safe: one `GpuClipReader` per thread
(`read` refuses a second thread). Every decoder retains the GPU's primary CUDA
context, the one XLA uses, so device pointers are valid in JAX unchanged.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from berg_jax.errors import InvalidParameterError, VideoReadError
from berg_jax.frames import N_FRAMES, sample_frame_indices
from berg_jax.video import batches_in_order, input_batches
from berg_jax.video import keyframes_reordered as packets_reordered

__all__ = [
    "DECODER_CHOICES",
    "DEFAULT_GPU_THREADS",
    "Decoded",
    "DecodePool",
    "GpuClipReader",
    "NvdecFallback",
    "StreamInfo",
    "device_platform",
    "nvdec_fallback_reason",
    "nvdec_import_error",
    "prefetch_clips",
    "probe_stream",
    "resolve_decoder",
    "stream_fallback_reason",
]

DECODER_CHOICES = ("auto", "cpu", "gpu", "both")
INSTALL_HINT = 'pip install "berg-jax[gpu-decode]"'
# H100 has 7 NVDEC engines; 7 threads decoded 230 clips/s there (1: 49, 4: 175, 14: 197).
DEFAULT_GPU_THREADS = 7

# (min width, min height, max width, max height) NVDEC decodes on Turing, GA100 and Hopper
# (Video Codec SDK, NVDEC capability tables). H.264 above 4096 needs Blackwell.
NVDEC_SIZE_LIMITS: dict[str, tuple[int, int, int, int]] = {
    "h264": (48, 16, 4096, 4096),
    "hevc": (144, 144, 8192, 8192),
    "vp9": (128, 128, 8192, 8192),
}
# Codecs NVDEC could decode but that stay on the CPU, and why.
_CPU_CODECS = {
    "av1": "NVDEC on Hopper and GA100 has no AV1 decoder",
    "vp8": "its hidden alt-ref packets make the packet count differ from the frame count",
    "mpeg4": "packed B-frames and reordered keyframes make its frame indexing unreliable",
    "mpeg1video": "interlacing and program-stream indexing make its frame indexing unreliable",
    "mpeg2video": "interlacing and program-stream indexing make its frame indexing unreliable",
    "vc1": "its frame indexing on NVDEC is unverified",
    "wmv3": "its frame indexing on NVDEC is unverified",
}
# PyAV's container names whose index SimpleDecoder seeks by (it needs a seekable index).
NVDEC_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
# FFmpeg AVColorSpace values sent to NVDEC: 1 BT.709, 2 unspecified, 5 BT.470BG and
# 6 SMPTE 170M (both BT.601). Others (BT.2020, FCC, SMPTE 240M, YCgCo) stay on the CPU.
# Measured on an H100 (PyNvVideoCodec 2.2.4 against PyAV 18.1): untagged (2), BT.470BG (5)
# and SMPTE 170M / BT.601 (6) H.264 clips differ by at most 2 levels (mean 0.65); a BT.709
# (1) tagged one by up to 27 (mean 6.2): PyAV applies the tag, PyNvVideoCodec does not.
NVDEC_COLOUR_MATRICES = (2, 5, 6)
# H.264 profiles NVDEC on Hopper decodes (not High 10 / 4:2:2 / 4:4:4, nor their intra forms).
_H264_PROFILES_OK = ("baseline", "constrained baseline", "main", "high", "progressive high", "constrained high")
_FIELD_ORDERS = {2: "top field first", 3: "bottom field first", 4: "top coded first, bottom shown first",
                 5: "bottom coded first, top shown first"}  # FFmpeg AVFieldOrder; 0 unknown, 1 progressive pass


class NvdecFallback(Exception):
    """This file goes to the CPU readers; `reason` is the short string for the manifest."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------- choosing a decoder


def nvdec_import_error() -> str | None:
    """None when PyNvVideoCodec imports, else why not, in one line."""
    try:
        import PyNvVideoCodec  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - its __init__ raises RuntimeError when the driver's video libraries are missing
        return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message` (PyNvVideoCodec's messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def device_platform(device: Any = None) -> str:
    """"cuda" for an NVIDIA GPU, else the device's platform ("cpu", "tpu", "rocm", "gpu" if unknown).

    JAX calls every GPU "gpu"; the PJRT client says whose. `device` defaults to JAX's
    default device.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda", "rocm"):
        return str(device.platform)
    client = getattr(device, "client", None)
    names = f"{getattr(client, 'platform', '')} {getattr(client, 'platform_version', '')}".lower()
    if "rocm" in names or "hip" in names:
        return "rocm"
    if "cuda" in names or str(getattr(device, "device_kind", "")).upper().startswith("NVIDIA"):
        return "cuda"
    return "gpu"


def resolve_decoder(choice: str, platform: str) -> str:
    """The decoders a run uses: "auto" | "cpu" | "gpu" | "both" -> "cpu" | "gpu" | "both".

    Args:
      choice: what the user asked for. "auto" is "both" where PyNvVideoCodec imports and
        `platform` is "cuda", else "cpu".
      platform: where the model computes, as `device_platform` names it ("cuda" = NVIDIA).
    Raises:
      InvalidParameterError: unknown choice; "gpu" / "both" without an NVIDIA GPU or
        without PyNvVideoCodec (one line naming the fix).
    """
    if choice not in DECODER_CHOICES:
        raise InvalidParameterError(f"unknown decoder {choice!r}; use one of {', '.join(DECODER_CHOICES)}")
    if choice == "cpu":
        return "cpu"
    nvidia = platform == "cuda"
    if choice == "auto":  # checked in this order so a CPU-only host never imports PyNvVideoCodec
        return "both" if nvidia and nvdec_import_error() is None else "cpu"
    if not nvidia:
        raise InvalidParameterError(
            f"--decoder {choice} decodes with NVDEC, which needs an NVIDIA GPU as the compute device "
            f"(here: {platform}); use --decoder cpu")
    problem = nvdec_import_error()
    if problem is not None:
        raise InvalidParameterError(
            f"--decoder {choice} needs PyNvVideoCodec ({problem}): {INSTALL_HINT}, or use --decoder cpu")
    return choice


# --------------------------------------------------------------------------- vetting a file


_FULL_RANGE = "PyNvVideoCodec's RGB conversion assumes limited range"


def _pix_fmt_problem(pix_fmt: str | None) -> str | None:
    """Why NVDEC's path does not take `pix_fmt`, or None for 8-bit 4:2:0 YUV."""
    if pix_fmt in ("yuv420p", "nv12"):
        return None
    if pix_fmt and pix_fmt.startswith("yuvj"):
        return f"full-range (JPEG) levels (pix_fmt {pix_fmt}): {_FULL_RANGE}"
    if not pix_fmt:
        what = "unknown pixel format"
    elif pix_fmt.startswith(("gray", "ya", "mono")):
        what = f"grey-scale stream (pix_fmt {pix_fmt})"
    elif pix_fmt.startswith(("yuva", "rgba", "bgra", "argb", "abgr", "gbrap")):
        what = f"alpha channel (pix_fmt {pix_fmt})"
    elif any(depth in pix_fmt for depth in ("9", "10", "12", "14", "16")) or pix_fmt.startswith(("p01", "p21", "p41")):
        what = f"more than 8 bits per sample (pix_fmt {pix_fmt})"
    elif pix_fmt.startswith(("yuv", "nv")):
        what = f"chroma not 4:2:0 (pix_fmt {pix_fmt})"
    else:
        what = f"not YUV 4:2:0 (pix_fmt {pix_fmt})"
    return f"{what}: NVDEC's RGB path takes 8-bit 4:2:0 only"


def nvdec_fallback_reason(
    codec: str | None,
    pix_fmt: str | None,
    width: int,
    height: int,
    *,
    profile: str | None = None,
    container: str | None = None,
    field_order: int = 0,
    color_range: int = 0,
    colorspace: int = 2,
    n_frames: int | None = None,
    n_packets: int | None = None,
    n_corrupt: int = 0,
    n_discarded: int = 0,
    keyframes_reordered: bool = False,
    min_frames: int = N_FRAMES,
) -> str | None:
    """Why a stream goes to the CPU readers instead of NVDEC, or None when NVDEC may take it.

    Pure: decided from what a container probe reports (see `probe_stream`); keyword
    arguments left at their defaults count as fine. The reason is one short line for
    the manifest.

    Args:
      codec: FFmpeg codec name ("h264", "hevc", "vp9", "av1", ...).
      pix_fmt: FFmpeg pixel format ("yuv420p", ...).
      width, height: frame size in pixels.
      profile: FFmpeg's profile name ("High", "High 10", ...).
      container: PyAV's container format name ("mov,mp4,m4a,3gp,3g2,mj2", ...).
      field_order, color_range, colorspace: FFmpeg's AVFieldOrder, AVColorRange and
        AVColorSpace values (0 unknown / 1 progressive; 0 unspecified / 1 limited /
        2 full; 2 unspecified, 1 BT.709, ...).
      n_frames: the container's frame count (0: it stores none).
      n_packets: the stream's packets (what decord counts as frames).
      n_corrupt, n_discarded: packets flagged corrupt / to be discarded (edit lists).
      keyframes_reordered: a keyframe's decode position differs from its display position.
      min_frames: frames S3D needs (shorter files are the CPU readers' to pad or refuse).
    """
    codec = (codec or "").lower()
    if codec not in NVDEC_SIZE_LIMITS:
        why = _CPU_CODECS.get(codec, "NVDEC has no decoder for it")
        return f"codec {codec or 'unknown'}: CPU only ({why})"
    problem = _pix_fmt_problem(pix_fmt)
    if problem is not None:
        return problem
    if codec == "h264" and profile and profile.lower() not in _H264_PROFILES_OK:
        return f"H.264 profile {profile}: NVDEC on Hopper decodes Baseline, Main and High only"
    if width % 2 or height % 2:
        # PyNvVideoCodec converts to RGB in 2x2 blocks and leaves an odd last row/column unwritten.
        return f"odd frame size {width}x{height}: NVDEC's RGB conversion needs even sizes"
    min_w, min_h, max_w, max_h = NVDEC_SIZE_LIMITS[codec]
    if not (min_w <= width <= max_w and min_h <= height <= max_h):
        return f"frame size {width}x{height} outside NVDEC's {codec} range {min_w}x{min_h}..{max_w}x{max_h}"
    if field_order in _FIELD_ORDERS:
        # NVDEC deinterlaces interlaced streams; FFmpeg returns the woven fields.
        return f"interlaced ({_FIELD_ORDERS[field_order]}): NVDEC would deinterlace it"
    if color_range == 2:
        return f"full-range (JPEG) levels: {_FULL_RANGE}"
    if colorspace not in NVDEC_COLOUR_MATRICES:
        return f"colour matrix {colorspace} (FFmpeg AVColorSpace): NVDEC's RGB would differ from FFmpeg's"
    if container is not None and container not in NVDEC_CONTAINERS:
        return f"container {container}: NVDEC's frame seeking needs an mp4/mov or mkv/webm index"
    if container == "matroska,webm" and codec != "vp9":
        # Measured on an H100: an H.264 mkv came back with frames off by one or more
        # (max 60 levels, one frame 20 on average); VP9 in webm matched to 2 levels.
        return f"{codec} in Matroska: NVDEC's frame indices did not match FFmpeg's (measured)"
    if n_packets is not None:
        if n_packets < min_frames:
            return f"{n_packets} frames, fewer than {min_frames}: left to the CPU readers"
        if n_frames and n_frames != n_packets:
            return f"the container counts {n_frames} frames but holds {n_packets} packets: frame count uncertain"
    if n_corrupt:
        return f"{n_corrupt} corrupt packet{'s' * (n_corrupt != 1)}: frame count uncertain"
    if n_discarded:
        return f"{n_discarded} packet{'s' * (n_discarded != 1)} to be discarded (edit list): frame count uncertain"
    if keyframes_reordered:
        return "keyframes reordered (open GOP): frame indexing uncertain"
    return None


@dataclass(frozen=True)
class StreamInfo:
    """What a PyAV probe says about a file's first video stream (see `nvdec_fallback_reason`)."""

    container: str
    codec: str
    profile: str | None
    pix_fmt: str | None
    width: int
    height: int
    field_order: int
    color_range: int
    colorspace: int
    n_frames: int  # the container's count, 0 when it stores none
    n_packets: int  # what decord counts as frames; T when NVDEC takes the file
    n_corrupt: int
    n_discarded: int
    keyframes_reordered: bool


def probe_stream(path: str | os.PathLike) -> StreamInfo:
    """Open `path` with PyAV and read its first video stream's headers and packets (no decoding).

    Raises:
      NvdecFallback: PyAV missing, the file unreadable, or no video stream; the CPU
        readers then give the precise error.
    """
    path = os.fspath(path)
    try:
        import av
    except ImportError:
        raise NvdecFallback(path, "PyAV is not installed, so the stream cannot be vetted for NVDEC") from None
    try:
        container = av.open(path)
    except Exception as exc:  # noqa: BLE001 - the CPU readers word the error
        raise NvdecFallback(path, f"PyAV could not open it ({type(exc).__name__})") from exc
    with container:
        if not container.streams.video:
            raise NvdecFallback(path, "no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise NvdecFallback(path, "FFmpeg has no decoder for its codec")
        stamps: list[int] = []
        keys: list[int] = []
        corrupt = discarded = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's closing flush packet
                    continue
                if packet.is_keyframe:
                    keys.append(len(stamps))
                corrupt += bool(packet.is_corrupt)
                discarded += bool(packet.is_discard)
                ts = packet.pts if packet.pts is not None else packet.dts
                stamps.append(-1 if ts is None else ts)
        except av.error.FFmpegError:
            corrupt += 1  # a damaged tail: what decodes is the CPU readers' call
        return StreamInfo(
            container=container.format.name,
            # The codec, not FFmpeg's chosen decoder (AV1 decodes as "libdav1d").
            codec=getattr(ctx.codec, "canonical_name", None) or ctx.name,
            profile=ctx.profile,
            pix_fmt=ctx.pix_fmt,
            width=int(ctx.width),
            height=int(ctx.height),
            # getattr: older PyAV releases lack some of these (then: unknown / unspecified).
            field_order=int(getattr(ctx, "field_order", 0) or 0),
            color_range=int(getattr(ctx, "color_range", 0) or 0),
            colorspace=int(_or(getattr(ctx, "colorspace", None), 2)),  # 0 is RGB, not unspecified
            n_frames=int(stream.frames or 0),
            n_packets=len(stamps),
            n_corrupt=corrupt,
            n_discarded=discarded,
            keyframes_reordered=packets_reordered(stamps, keys),
        )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def stream_fallback_reason(info: StreamInfo, min_frames: int = N_FRAMES) -> str | None:
    """`nvdec_fallback_reason` for a probed stream."""
    return nvdec_fallback_reason(
        info.codec, info.pix_fmt, info.width, info.height, profile=info.profile,
        container=info.container, field_order=info.field_order, color_range=info.color_range,
        colorspace=info.colorspace, n_frames=info.n_frames, n_packets=info.n_packets,
        n_corrupt=info.n_corrupt, n_discarded=info.n_discarded,
        keyframes_reordered=info.keyframes_reordered, min_frames=min_frames)


# --------------------------------------------------------------------------- the GPU reader


class _OnDevice:
    """A decoded frame as a DLPack producer that names its GPU.

    PyNvVideoCodec's `__dlpack_device__` has reported GPU 0 whatever the decoder's
    gpu_id; JAX places the array by that answer.
    """

    def __init__(self, frame: Any, gpu_id: int):
        self._frame = frame
        self._gpu_id = gpu_id

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self._gpu_id)  # DLDeviceType kDLCUDA

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        # No stream handshake needed: with its default (null) CUDA stream PyNvVideoCodec
        # synchronises after converting each frame, so the frame is complete already.
        return self._frame.__dlpack__(stream)


class GpuClipReader:
    """One NVDEC decoder (PyNvVideoCodec `SimpleDecoder`, RGB output in GPU memory) for one thread.

    `read(path)` -> jax.Array uint8 (n_frames, H, W, 3) on GPU `gpu_id`, the frames at
    `sample_frame_indices(T)`, as `video.read_clip` returns them (within 2 levels), or
    `NvdecFallback` when the file is the CPU readers' (see the module docstring).

    The decoder is created on the first read and re-pointed at each next file
    (`reconfigure_decoder`, which keeps NVDEC sessions in a small cache) unless
    `reuse_decoder=False`; after a failure it is rebuilt.
    """

    def __init__(self, gpu_id: int = 0, *, reuse_decoder: bool = True):
        import PyNvVideoCodec as nvc  # noqa: N813 - NVIDIA's own spelling

        self._nvc = nvc
        self.gpu_id = int(gpu_id)
        self.reuse_decoder = reuse_decoder
        self._decoder: Any = None
        self._thread: int | None = None

    def read(self, path: str | os.PathLike, n_frames: int = N_FRAMES) -> Any:
        """Probe, vet and decode one file. Returns jax.Array uint8 (n_frames, H, W, 3), RGB.

        Raises:
          NvdecFallback: the file goes to the CPU readers; `.reason` says why.
        """
        path = os.fspath(path)
        info = probe_stream(path)
        reason = stream_fallback_reason(info, n_frames)
        if reason is not None:
            raise NvdecFallback(path, reason)
        return self.decode(path, info.n_packets, (info.height, info.width), n_frames)

    def decode(self, path: str, n_total: int, size: tuple[int, int], n_frames: int = N_FRAMES) -> Any:
        """Decode the frames at `sample_frame_indices(n_total, n_frames)` of a vetted file.

        Args:
          n_total: T as the CPU readers count it (`StreamInfo.n_packets`).
          size: (H, W) the probe reported; the frames must match it.
        Returns:
          jax.Array uint8 (n_frames, H, W, 3) on this reader's GPU.
        Raises:
          NvdecFallback: NVDEC counts another T, returns fewer frames or fails.
        """
        current = threading.get_ident()
        if self._thread is None:
            self._thread = current
        elif self._thread != current:
            raise RuntimeError("a GpuClipReader belongs to one thread (PyNvVideoCodec decoders are not thread-safe)")
        indices = [int(i) for i in sample_frame_indices(n_total, n_frames)]
        try:
            decoder = self._open(path)
            if len(decoder) != n_total:
                raise NvdecFallback(path, f"NVDEC's demuxer counts {len(decoder)} frames, the CPU readers {n_total}")
            # Distinct indices (T >= n_frames), so none is dropped as a duplicate.
            frames = decoder.get_batch_frames_by_index(indices)
            if len(frames) != len(indices):
                raise NvdecFallback(path, f"NVDEC returned {len(frames)} of the {len(indices)} frames asked for")
            return self._to_clip(path, frames, size)
        except NvdecFallback:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever NVDEC says, the CPU readers get the file
            self._decoder = None  # possibly mid-stream: build a fresh one for the next file
            raise NvdecFallback(path, f"NVDEC failed: {_one_line(exc)}") from exc

    def _open(self, path: str) -> Any:
        if self._decoder is not None and self.reuse_decoder:
            self._decoder.reconfigure_decoder(path)
            return self._decoder
        self._decoder = None  # drop the old session before opening the next
        self._decoder = self._nvc.SimpleDecoder(
            path, gpu_id=self.gpu_id, use_device_memory=True,
            output_color_type=self._nvc.OutputColorType.RGB)
        return self._decoder

    def _to_clip(self, path: str, frames: list[Any], size: tuple[int, int]) -> Any:
        """(H, W, 3) frames in the decoder's memory -> one new (n, H, W, 3) jax.Array."""
        import jax
        import jax.numpy as jnp

        views = [jax.dlpack.from_dlpack(_OnDevice(f, self.gpu_id)) for f in frames]
        if views[0].shape != (*size, 3) or views[0].dtype != jnp.uint8:
            raise NvdecFallback(path, f"NVDEC returned frames of {views[0].shape} {views[0].dtype}, "
                                      f"expected {(*size, 3)} uint8")
        # The views alias the decoder's frame pool, which its next call overwrites: stack them
        # into a buffer of JAX's own (a device-side copy) and wait for it before returning.
        clip = jnp.stack(views)
        clip.block_until_ready()
        return clip


# --------------------------------------------------------------------------- threads on one queue


@dataclass(frozen=True)
class Decoded:
    """One decoded file from `DecodePool`.

    clip: uint8 (n_frames, H, W, 3) RGB: a jax.Array on the GPU when `decoder` is "gpu",
      a numpy array when "cpu".
    decoder: "gpu" or "cpu", which decoded it.
    fallback: why NVDEC did not take it (a file a GPU thread handed on), else None.
    """

    clip: Any
    decoder: str
    fallback: str | None = None


class DecodePool:
    """Threads that take paths from one queue: `gpu_threads` with one NVDEC reader each
    and `cpu_threads` running the CPU reader (`video.read_clip` by default).

    `submit(path)` -> Future resolving to `Decoded`, or to a `str` naming the path and the
    reason when the file cannot be decoded at all (the CPU reader's message, as
    `video.prefetch_clips` reports failures). A GPU thread hands each file NVDEC does not
    take to the CPU threads, ahead of the queue; without CPU threads it reads it itself.
    Futures resolve in any order; pending ones can be cancelled (`shutdown`).

    Args:
      gpu_threads, cpu_threads: thread counts (gpu_threads >= 1 for NVDEC; 0 is allowed).
      gpu_id: the GPU whose NVDEC engines decode.
      cpu_read: `cpu_read(path, **read_kwargs) -> uint8 (n_frames, H, W, 3)`, raising
        (VideoReadError: its message is the failure) or returning the failure message as
        a str; e.g. a call into a pool of decode worker processes, one per CPU thread.
      make_reader: `make_reader(gpu_id) -> object with read(path, n_frames)`, called once
        in each GPU thread (tests pass a fake).
      read_kwargs: for cpu_read (n_frames, pad_short, backend); n_frames also for NVDEC.
    """

    def __init__(
        self,
        gpu_threads: int,
        cpu_threads: int = 0,
        *,
        gpu_id: int = 0,
        cpu_read: Callable[..., np.ndarray] | None = None,
        make_reader: Callable[[int], Any] = GpuClipReader,
        **read_kwargs: Any,
    ):
        if gpu_threads < 0 or cpu_threads < 0 or gpu_threads + cpu_threads < 1:
            raise InvalidParameterError(f"need at least one decoding thread, got {gpu_threads} GPU + {cpu_threads} CPU")
        if cpu_read is None:
            from berg_jax.video import read_clip as cpu_read
        self._cpu_read = cpu_read
        self._read_kwargs = read_kwargs
        self._n_frames = int(read_kwargs.get("n_frames", N_FRAMES))
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Future, str]] = deque()
        self._handed_on: deque[tuple[Future, str, str]] = deque()  # NVDEC refused: CPU threads first
        self._closed = False
        self._gpu_busy = 0  # jobs GPU threads hold, which they may still hand on
        self._n_cpu = cpu_threads
        self._threads = [
            threading.Thread(target=self._gpu_worker, args=(make_reader, gpu_id), name=f"berg-nvdec-{i}", daemon=True)
            for i in range(gpu_threads)
        ] + [
            threading.Thread(target=self._cpu_worker, name=f"berg-video-cpu-{i}", daemon=True)
            for i in range(cpu_threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, path: str | os.PathLike) -> Future:
        """Queue one file; returns its Future (result: `Decoded` or a failure message)."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("DecodePool is shut down")
            self._jobs.append((fut, os.fspath(path)))
            self._cond.notify()
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop taking work; the threads finish what is queued and exit.

        With `cancel_futures`, files not started yet are cancelled; files already handed
        from a GPU thread to the CPU threads are still decoded (their futures are running).
        """
        with self._cond:
            self._closed = True
            if cancel_futures:
                for fut, _ in self._jobs:
                    fut.cancel()
                self._jobs.clear()
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True, cancel_futures=True)

    # -- workers

    def _take(self, cpu: bool) -> tuple[Future, str, str | None, bool] | None:
        """The next job (future, path, fallback reason, already running), or None to exit.

        CPU threads serve handed-on files first, and stay until no GPU thread can hand
        on another one.
        """
        with self._cond:
            while True:
                if cpu and self._handed_on:
                    return (*self._handed_on.popleft(), True)
                if self._jobs:
                    fut, path = self._jobs.popleft()
                    if not cpu:
                        self._gpu_busy += 1
                    return fut, path, None, False
                if self._closed and (not cpu or self._gpu_busy == 0):
                    return None
                self._cond.wait()

    def _cpu_decode(self, path: str, fallback: str | None) -> Decoded | str:
        try:
            clip = self._cpu_read(path, **self._read_kwargs)
            # A reader may report failures as a message instead of raising (decode_workers' pool does).
            return clip if isinstance(clip, str) else Decoded(clip, "cpu", fallback)
        except VideoReadError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            return f"{path}: {type(exc).__name__}: {exc}"

    def _cpu_worker(self) -> None:
        while (job := self._take(cpu=True)) is not None:
            fut, path, fallback, running = job
            if running or fut.set_running_or_notify_cancel():
                fut.set_result(self._cpu_decode(path, fallback))

    def _gpu_worker(self, make_reader: Callable[[int], Any], gpu_id: int) -> None:
        try:
            reader, broken = make_reader(gpu_id), None
        except Exception as exc:  # noqa: BLE001 - no NVDEC in this thread: it decodes on the CPU
            reader, broken = None, f"NVDEC unavailable: {_one_line(exc)}"
        while (job := self._take(cpu=False)) is not None:
            fut, path, _, _ = job
            try:
                if fut.set_running_or_notify_cancel():
                    self._gpu_decode(reader, broken, fut, path)
            finally:
                with self._cond:
                    self._gpu_busy -= 1
                    self._cond.notify_all()

    def _gpu_decode(self, reader: Any, broken: str | None, fut: Future, path: str) -> None:
        if reader is None:
            fut.set_result(self._cpu_decode(path, broken))
            return
        try:
            fut.set_result(Decoded(reader.read(path, self._n_frames), "gpu"))
        except NvdecFallback as exc:
            if self._n_cpu:
                with self._cond:  # hand it to a CPU thread, ahead of the queue
                    self._handed_on.append((fut, path, exc.reason))
                    self._cond.notify_all()
            else:
                fut.set_result(self._cpu_decode(path, exc.reason))
        except Exception as exc:  # noqa: BLE001 - a reader bug must not lose the file
            fut.set_result(self._cpu_decode(path, f"NVDEC reader raised {_one_line(exc)}"))


# --------------------------------------------------------------------------- batches for the main job


def prefetch_clips(
    paths: list[str],
    batch_size: int,
    *,
    gpu_threads: int = DEFAULT_GPU_THREADS,
    cpu_threads: int = 0,
    queue_size: int = 2,
    skip: set[int] | frozenset[int] | None = None,
    routes: dict[int, tuple[str, str | None]] | None = None,
    gpu_id: int = 0,
    make_reader: Callable[[int], Any] | None = None,
    **read_kwargs: Any,
) -> Any:
    """`video.prefetch_clips`' contract with a `DecodePool`: NVDEC threads beside CPU threads.

    Yields (indices, clips, errors) batches in input order, `queue_size` batches decoded
    ahead; a clip is a jax.Array on the GPU where NVDEC decoded it, a numpy array where a
    CPU thread did (`pipeline` stacks either). `routes`, when given, is filled with
    {index: (decoder "gpu"/"cpu", why NVDEC did not take it or None)} for every file
    decoded. Closing the generator cancels what has not started and joins the threads.

    Args:
      gpu_threads, cpu_threads: `--decoder gpu` is (n, 0); `both` is (n, m): one queue.
      make_reader: `make_reader(gpu_id)` -> a reader per NVDEC thread (default `GpuClipReader`).
      read_kwargs: n_frames, pad_short (the CPU reader's; NVDEC takes n_frames).
    """
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
    pool = DecodePool(gpu_threads, cpu_threads, gpu_id=gpu_id, make_reader=make_reader or GpuClipReader,
                      **read_kwargs)
    return _prefetch(paths, input_batches(len(paths), batch_size, skip), pool, queue_size, routes)


def _prefetch(paths: list[str], batches: Any, pool: DecodePool, queue_size: int,
              routes: dict[int, tuple[str, str | None]] | None) -> Any:
    # A separate generator so that argument errors raise at the call, not at first next().
    try:
        # The pool's futures resolve to Decoded (or a failure message, which batches_in_order
        # sorts into errors); unwrap each clip here, noting who decoded it.
        for indices, decoded, errors in batches_in_order(paths, batches, pool.submit, queue_size):
            if routes is not None:
                routes.update((i, (d.decoder, d.fallback)) for i, d in zip(indices, decoded))
            yield indices, [d.clip for d in decoded], errors
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
