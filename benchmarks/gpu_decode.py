"""NVDEC (berg_jax.gpu_decode) against the CPU readers: parity, frame counts, throughput.

On this machine, make the clips to carry (PyAV; 64 x 360x640x60 H.264 plus a few
variants under DIR/variants that exercise the fallback rules and colour tags):

    python -m benchmarks.gpu_decode --make-videos DIR [--n 64]

On the GPU host:

    python -m benchmarks.gpu_decode DIR --out results.jsonl [--threads 1 4 7] [--seconds 3]
                                    [--parity 16] [--cpu-threads N]

Every step runs in its own try/except and appends one JSON object per line to --out,
flushed at once, so a crash or a timeout keeps what was measured. Steps:

  env         versions (Python, JAX, PyNvVideoCodec, decord, PyAV), devices, cores,
              `resolve_decoder("auto")`.
  probe       `probe_stream` + `stream_fallback_reason` on every file: ms per probe and
              files per reason.
  parity      per file (the first --parity of DIR, then every variant): the CPU reader
              (`video.read_clip`) and `GpuClipReader.read`, max / mean |difference| over
              the 14 frames, and T three ways (probe, decord's len, PyAV's decoded count).
  throughput  `DecodePool` for ~--seconds each: GPU threads alone (each --threads), the
              most-threads point again without decoder reuse and with the probes done
              beforehand (NVDEC's own cost), CPU threads alone, and both together;
              videos/s, who decoded, the CPU cores the process kept busy.
  under_load  the 7-thread GPU pool while a JAX matmul loop keeps the GPU busy (as S3D
              will): videos/s, and matmuls/s alone and during the decoding.
  done        total seconds.

Pin the process to fewer cores with taskset to see what NVDEC needs from the CPU, e.g.
`taskset -c 0-3 python -m benchmarks.gpu_decode DIR --out pinned.jsonl --cpu-threads 4`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

_OUT: Any = None


def emit(step: str, **fields: Any) -> None:
    """One JSON line to --out (and a short echo to stdout), flushed now."""
    line = json.dumps({"step": step, **fields}, default=str)
    if _OUT is not None:
        _OUT.write(line + "\n")
        _OUT.flush()
        os.fsync(_OUT.fileno())
    print(line[:400], flush=True)


def soft(step: str):
    """Run the decorated step; on any exception record it and carry on."""
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt too: keep what was measured
                emit(step, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:],
                     seconds=round(time.perf_counter() - t0, 3))
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return None
        return run
    return wrap


# --------------------------------------------------------------------------- making clips


def _write(path: Path, frames: np.ndarray, codec: str, pix_fmt: str = "yuv420p",
           options: dict[str, str] | None = None, tags: dict[str, int] | None = None) -> str:
    """frames uint8 (T, H, W, 3) RGB -> `path` with PyAV (container from the suffix)."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=30, options=options or {})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for name, value in (tags or {}).items():  # VUI colour description
            setattr(stream.codec_context, name, value)
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format=pix_fmt)
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _corrupt_tail(path: Path, n_bad: int = 4) -> None:
    """Overwrite the payload of the last n_bad packets with random bytes (the container still counts them)."""
    import av

    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos, size in spans[-n_bad:]:
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def make_videos(directory: Path, n: int, frames: int, height: int, width: int) -> None:
    from benchmarks.files import write_videos
    from berg_jax.synthetic import synthetic_video

    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_videos(directory, n, frames, height, width)
    mb = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"{len(paths)} clips {height}x{width}x{frames} H.264 in {directory}: {mb:.1f} MiB, "
          f"{time.perf_counter() - t0:.0f} s")
    var = directory / "variants"
    var.mkdir(exist_ok=True)
    clip = synthetic_video(seed=7, n_frames=frames, height=height, width=width)
    x264 = {"crf": "23", "preset": "medium"}
    bt709 = {"colorspace": 1, "color_primaries": 1, "color_trc": 1, "color_range": 1}
    bt601 = {"colorspace": 6, "color_primaries": 6, "color_trc": 6, "color_range": 1}
    variants = {  # name: (what NVDEC should do, writer)
        "h264_bt709.mp4": ("gpu", lambda p: _write(p, clip, "libx264", options=x264, tags=bt709)),
        "h264_bt601.mp4": ("gpu", lambda p: _write(p, clip, "libx264", options=x264, tags=bt601)),
        "h264.mkv": ("gpu", lambda p: _write(p, clip, "libx264", options=x264)),
        "hevc.mp4": ("gpu", lambda p: _write(p, clip, "libx265", options={"crf": "23", "preset": "fast",
                                                                          "x265-params": "log-level=error"})),
        "vp9.webm": ("gpu", lambda p: _write(p, clip, "libvpx-vp9", options={"crf": "32", "b": "0", "deadline": "realtime",
                                                                            "cpu-used": "8"})),
        "av1.mp4": ("cpu: codec av1", lambda p: _write(p, clip, "libsvtav1", options={"preset": "12"})),
        "h264_fullrange.mp4": ("cpu: full range", lambda p: _write(p, clip, "libx264", "yuvj420p", options=x264)),
        "h264_yuv444.mp4": ("cpu: 4:4:4", lambda p: _write(p, clip, "libx264", "yuv444p", options=x264)),
        "h264_open_gop.mp4": ("cpu: reordered", lambda p: _write(
            p, clip, "libx264", options={**x264, "x264-params": "open-gop=1:keyint=12:bframes=3:scenecut=0"})),
        "h264_interlaced.mp4": ("cpu: interlaced", lambda p: _write(
            p, clip, "libx264", options={**x264, "x264-params": "interlaced=1:tff=1"})),
        "h264_short.mp4": ("cpu: short", lambda p: _write(p, clip[:10], "libx264", options=x264)),
        "vp9_odd.webm": ("cpu: odd size", lambda p: _write(
            p, synthetic_video(seed=8, n_frames=frames, height=height + 1, width=width + 1), "libvpx-vp9",
            options={"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"})),
        "h264_corrupt_tail.mp4": ("unknown: damaged packets the probe cannot see", None),
    }
    for name, (expect, writer) in variants.items():
        path = var / name
        try:
            if writer is None:
                _write(path, clip, "libx264", options={"crf": "23", "preset": "ultrafast"})  # no B-frames
                _corrupt_tail(path)
            else:
                writer(path)
            print(f"  variants/{name}: {os.path.getsize(path) / 2**20:.2f} MiB (expect {expect})")
        except Exception as exc:  # noqa: BLE001 - an encoder missing from this PyAV build
            path.unlink(missing_ok=True)
            print(f"  variants/{name}: not written ({type(exc).__name__}: {exc})")
    total = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**20
    print(f"total {total:.1f} MiB under {directory}")


# --------------------------------------------------------------------------- steps


@soft("env")
def step_env() -> str:
    import jax

    from berg_jax import gpu_decode as gd

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
    }
    plat = gd.device_platform()
    info["device_platform"] = plat
    info["nvdec_import_error"] = gd.nvdec_import_error()
    if info["nvdec_import_error"] is None:
        import PyNvVideoCodec as nvc

        for name in ("__version__", "__cuda_version__", "__video_codec_sdk_version__"):
            info[f"PyNvVideoCodec{name}"] = getattr(nvc, name, None)
    for mod in ("decord", "av", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"not importable: {exc}"
    try:
        info["resolve_auto"] = gd.resolve_decoder("auto", plat)
    except Exception as exc:  # noqa: BLE001
        info["resolve_auto"] = f"{type(exc).__name__}: {exc}"
    emit("env", **info)
    return plat


@soft("files")
def step_files(inputs: list[str]) -> tuple[list[str], list[str]]:
    from berg_jax.video import list_videos

    paths = list_videos(inputs)
    variants = [p for p in paths if f"{os.sep}variants{os.sep}" in p]
    main = [p for p in paths if p not in variants]
    emit("files", n_main=len(main), n_variants=len(variants),
         main_mib=round(sum(os.path.getsize(p) for p in main) / 2**20, 2))
    return main, variants


PROBED: dict[str, Any] = {}  # path -> StreamInfo of the files NVDEC takes (for the cached-probe point)


@soft("probe")
def step_probe(paths: list[str]) -> dict[str, str | None]:
    from berg_jax import gpu_decode as gd

    reasons: dict[str, str | None] = {}
    t0 = time.perf_counter()
    for p in paths:
        try:
            info = gd.probe_stream(p)
            reasons[p] = gd.stream_fallback_reason(info)
            if reasons[p] is None:
                PROBED[p] = info
        except gd.NvdecFallback as exc:
            reasons[p] = exc.reason
    dt = time.perf_counter() - t0
    emit("probe", n=len(paths), ms_per_file=round(1000 * dt / max(len(paths), 1), 3),
         reasons=dict(Counter(r or "nvdec" for r in reasons.values())))
    return reasons


def _frame_counts(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import decord

        out["T_decord"] = len(decord.VideoReader(path, num_threads=1))
    except Exception as exc:  # noqa: BLE001
        out["T_decord"] = f"{type(exc).__name__}"
    try:
        import av

        n = 0
        with av.open(path) as c:
            stream = c.streams.video[0]
            try:
                for packet in c.demux(stream):
                    try:
                        n += len(packet.decode())
                    except av.error.FFmpegError:
                        pass
            except av.error.FFmpegError:
                pass
        out["T_pyav_decoded"] = n
    except Exception as exc:  # noqa: BLE001
        out["T_pyav_decoded"] = f"{type(exc).__name__}"
    return out


@soft("parity")
def step_parity(paths: list[str]) -> None:
    from berg_jax import gpu_decode as gd
    from berg_jax.video import read_clip

    try:
        reader, no_reader = gd.GpuClipReader(), None
    except Exception as exc:  # noqa: BLE001 - still measure the CPU side and the frame counts
        reader, no_reader = None, f"no GpuClipReader: {type(exc).__name__}: {exc}"[:300]
    worst = 0
    means = []
    n_gpu = 0
    for p in paths:
        row: dict[str, Any] = {"path": os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p))}
        try:
            info = gd.probe_stream(p)
            row.update(codec=info.codec, pix_fmt=info.pix_fmt, size=f"{info.width}x{info.height}",
                       colorspace=info.colorspace, color_range=info.color_range, T_probe=info.n_packets,
                       T_container=info.n_frames)
        except gd.NvdecFallback as exc:
            row["probe"] = exc.reason
        row.update(_frame_counts(p))
        t0 = time.perf_counter()
        try:
            cpu = read_clip(p)
            row["cpu_ms"] = round(1000 * (time.perf_counter() - t0), 2)
        except Exception as exc:  # noqa: BLE001
            cpu = None
            row["cpu"] = f"{type(exc).__name__}: {exc}"[:300]
        t0 = time.perf_counter()
        try:
            if reader is None:
                raise RuntimeError(no_reader)
            gpu = np.asarray(reader.read(p))
            row["gpu_ms"] = round(1000 * (time.perf_counter() - t0), 2)
            row["gpu"] = "ok"
            n_gpu += 1
        except gd.NvdecFallback as exc:
            gpu = None
            row["gpu"] = f"fallback: {exc.reason}"
        except Exception as exc:  # noqa: BLE001
            gpu = None
            row["gpu"] = f"{type(exc).__name__}: {exc}"[:300]
        if cpu is not None and gpu is not None:
            if cpu.shape != gpu.shape:
                row["shape_mismatch"] = [list(cpu.shape), list(gpu.shape)]
            else:
                d = np.abs(cpu.astype(np.int16) - gpu.astype(np.int16))
                per_frame = d.reshape(len(d), -1).mean(axis=1)
                row.update(max=int(d.max()), mean=round(float(d.mean()), 4),
                           frac_gt2=round(float((d > 2).mean()), 6),
                           worst_frame_mean=round(float(per_frame.max()), 3))
                # A wrong frame (not just colour rounding) shows as a large mean on some frame.
                if "variants" not in p:
                    worst = max(worst, int(d.max()))
                    means.append(float(d.mean()))
        emit("parity_file", **row)
    emit("parity", n=len(paths), n_gpu=n_gpu, main_max=worst,
         main_mean=round(float(np.mean(means)), 4) if means else None)


class _CachedProbeReader:
    """GpuClipReader.decode with the probe results of step_probe: what NVDEC costs without the vetting."""

    def __init__(self, gpu_id: int):
        from berg_jax import gpu_decode as gd

        self._reader = gd.GpuClipReader(gpu_id)

    def read(self, path: str, n_frames: int) -> Any:
        info = PROBED[path]
        return self._reader.decode(path, info.n_packets, (info.height, info.width), n_frames)


def _pool_run(pool: Any, paths: list[str], seconds: float, window: int) -> dict[str, Any]:
    """Keep `window` files in flight for ~`seconds`; videos/s over everything submitted."""
    futures: deque = deque()
    who: Counter = Counter()
    reasons: Counter = Counter()
    i = 0

    def tally(res: Any) -> None:
        if isinstance(res, str):
            who["failed"] += 1
        else:
            who[res.decoder] += 1
            if res.fallback:
                reasons[res.fallback] += 1

    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        while len(futures) < window:
            futures.append(pool.submit(paths[i % len(paths)]))
            i += 1
        tally(futures.popleft().result())
    while futures:
        tally(futures.popleft().result())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"videos_per_s": round(i / wall, 2), "n": i, "seconds": round(wall, 3),
            "cores_busy": round(cpu / wall, 2), "decoded_by": dict(who), "fallbacks": dict(reasons)}


def _throughput(label: str, paths: list[str], seconds: float, gpu_threads: int, cpu_threads: int,
                **pool_kwargs: Any) -> None:
    @soft("throughput")
    def run() -> None:
        from berg_jax import gpu_decode as gd

        with gd.DecodePool(gpu_threads, cpu_threads, **pool_kwargs) as pool:
            # Warm-up (excluded): every thread opens its decoder, JAX compiles the stack.
            warm = [pool.submit(paths[k % len(paths)]) for k in range(2 * (gpu_threads + cpu_threads))]
            for f in warm:
                f.result()
            res = _pool_run(pool, paths, seconds, window=4 * (gpu_threads + cpu_threads))
        emit("throughput", label=label, gpu_threads=gpu_threads, cpu_threads=cpu_threads, **res)

    run()


@soft("throughput_all")
def step_throughput(paths: list[str], args: argparse.Namespace) -> None:
    from berg_jax import gpu_decode as gd

    gpu_ok = gd.device_platform() == "cuda" and gd.nvdec_import_error() is None
    if gpu_ok:
        for t in args.threads:
            _throughput(f"gpu x{t}", paths, args.seconds, t, 0)
        t = max(args.threads)
        _throughput(f"gpu x{t}, new decoder per file", paths, args.seconds, t, 0,
                    make_reader=lambda gpu_id: gd.GpuClipReader(gpu_id, reuse_decoder=False))
        if all(p in PROBED for p in paths):
            # NVDEC alone: the PyAV probe (headers + packet scan) done once beforehand.
            _throughput(f"gpu x{t}, probes cached", paths, args.seconds, t, 0, make_reader=_CachedProbeReader)
    _throughput(f"cpu x{args.cpu_threads}", paths, args.seconds, 0, args.cpu_threads)
    if gpu_ok:
        t = gd.DEFAULT_GPU_THREADS
        _throughput(f"both: gpu x{t} + cpu x{args.cpu_threads}", paths, args.seconds, t, args.cpu_threads)
        step_under_load(paths, args.seconds, t)


@soft("under_load")
def step_under_load(paths: list[str], seconds: float, gpu_threads: int, size: int = 8192) -> None:
    """NVDEC while JAX keeps the GPU busy (as S3D will), and the matmuls' rate with and without it.

    Catches implicit serialisation between PyNvVideoCodec's null-stream work and XLA's streams.
    """
    import threading

    import jax
    import jax.numpy as jnp

    from berg_jax import gpu_decode as gd

    x = jnp.ones((size, size), jnp.bfloat16)
    matmul = jax.jit(lambda a: (a @ a) * jnp.bfloat16(1e-4))
    matmul(x).block_until_ready()

    def rate(stop_after: float | None, stop: threading.Event, out: list) -> None:
        n, t0 = 0, time.perf_counter()
        while not stop.is_set() and (stop_after is None or time.perf_counter() - t0 < stop_after):
            matmul(x).block_until_ready()
            n += 1
        out.append(n / (time.perf_counter() - t0))

    alone: list = []
    rate(min(seconds, 2.0), threading.Event(), alone)
    stop, during = threading.Event(), []
    worker = threading.Thread(target=rate, args=(None, stop, during))
    with gd.DecodePool(gpu_threads, 0) as pool:
        for f in [pool.submit(paths[k % len(paths)]) for k in range(2 * gpu_threads)]:
            f.result()
        worker.start()
        try:
            res = _pool_run(pool, paths, seconds, window=4 * gpu_threads)
        finally:
            stop.set()
            worker.join()
    emit("under_load", gpu_threads=gpu_threads, matmul_per_s_alone=round(alone[0], 2),
         matmul_per_s_during_decode=round(during[0], 2), **res)


def main(argv: list[str] | None = None) -> int:
    global _OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", help="video files or folders (folders: recursively)")
    parser.add_argument("--out", help="JSON lines file (appended)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 7], help="GPU decoding threads to time")
    parser.add_argument("--cpu-threads", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput point")
    parser.add_argument("--parity", type=int, default=16, help="files of the main set to compare (variants: all)")
    parser.add_argument("--make-videos", metavar="DIR", help="write clips into DIR and exit")
    parser.add_argument("--n", type=int, default=64, help="clips for --make-videos")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", default="360x640", help="HxW for --make-videos")
    args = parser.parse_args(argv)

    if args.make_videos:
        h, w = (int(v) for v in args.size.lower().split("x"))
        make_videos(Path(args.make_videos), args.n, args.frames, h, w)
        return 0
    if not args.inputs or not args.out:
        parser.error("give video files/folders and --out (or --make-videos DIR)")
    _OUT = open(args.out, "a")
    t0 = time.perf_counter()
    try:
        emit("start", argv=sys.argv, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        step_env()
        found = step_files(args.inputs)
        if found is None or not found[0]:
            emit("done", error="no video files", seconds=round(time.perf_counter() - t0, 1))
            return 1
        main_paths, variants = found
        step_probe(main_paths + variants)
        step_parity(main_paths[: args.parity] + variants)
        # Throughput on the main set only; the list repeats to fill the time.
        step_throughput(main_paths, args)
        emit("done", seconds=round(time.perf_counter() - t0, 1))
    finally:
        _OUT.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
