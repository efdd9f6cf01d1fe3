"""End-to-end throughput from video files (`pipeline.encode_files`) against the same model fed from memory.

    python -m benchmarks.files [--videos 16] [--frames 90] [--sizes 360x640 256x256]
                               [--batch-size B] [--decode-threads 2] [--repeats 2]

For each source size: writes `--videos` H.264 mp4 files (PyAV, libx264, crf 23, preset
medium, yuv420p, 30 fps, `--frames` frames of `berg_jax.synthetic.synthetic_video`,
spatially rolled per file so no two files are the same) into a temp dir, then, in this
one process with the K=100 synthetic model (subject 1, whole brain) loaded once:

  decode only   `video.prefetch_clips` with `--decode-threads` threads, no compute;
  memory        the clips decoded beforehand, stacked (N, 14, H, W, 3) uint8, through
                `BERG.encode` (compute only);
  files         `pipeline.encode_files(model, paths, fresh out_dir)`: decoding in
                background threads overlapped with compute, rows written to OUT.

All after a warm-up that compiles the (batch, 14, H, W, 3) program. Reported: videos/s
(median [min-max] over repeats), files/memory (1.0 = decoding entirely hidden behind
compute), and the share of the decode time hidden:
(t_memory + t_decode - t_files) / t_decode (1 = all of it, 0 = none: plain serial sum).
"1-thr decode" is `read_clip` alone on one thread (videos/s); "others" the cores other
processes kept busy during the size's runs (well above 0: contaminated timings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.encode import busy_cpu_s
from benchmarks.reference_pipeline import parse_size


def write_videos(directory: Path, n: int, frames: int, height: int, width: int) -> list[str]:
    """n distinct mp4 files of one size; returns their paths."""
    import av

    from berg_jax.synthetic import synthetic_video

    base = synthetic_video(seed=1, n_frames=frames, height=height, width=width)
    paths = []
    for i in range(n):
        video = np.roll(base, shift=(17 * i, 29 * i), axis=(1, 2))
        path = directory / f"video_{height}x{width}_{i:03d}.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "23", "preset": "medium"}
            for frame in video:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(str(path))
    return paths


def _rate(times: list[float], n: int) -> dict:
    rates = sorted(n / t for t in times)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "t": statistics.median(times)}


def bench_size(berg, model, paths: list[str], args: argparse.Namespace, tmp: Path) -> dict:
    from berg_jax.pipeline import encode_files
    from berg_jax.video import available_backends, prefetch_clips, read_clip

    n, bs = len(paths), model.batch_size
    # Pre-decoded frames for the in-memory run (also times a single-threaded decode).
    t0 = time.perf_counter()
    clips = np.stack([read_clip(p) for p in paths])
    decode_1t = time.perf_counter() - t0
    t0 = time.perf_counter()
    berg.encode(model, clips[:bs], show_progress=False)  # compile (batch, 14, H, W, 3)
    warm = time.perf_counter() - t0

    decode, memory, files = [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for _ in prefetch_clips(paths, bs, num_threads=args.decode_threads):
            pass
        decode.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        out_mem = berg.encode(model, clips, show_progress=False)
        memory.append(time.perf_counter() - t0)

        out_dir = tmp / f"out_{Path(paths[0]).stem}_{r}"
        t0 = time.perf_counter()
        summary = encode_files(model, paths, out_dir, show_progress=False, decode_threads=args.decode_threads)
        files.append(time.perf_counter() - t0)
        if summary["failed"]:
            raise SystemExit(f"encode_files failed on {summary['failed'][:3]}")
    out_files = np.load(summary["outputs"]["responses"])
    return {"decode_1thread": n / decode_1t, "warmup_s": warm, "decode": _rate(decode, n),
            "memory": _rate(memory, n), "files": _rate(files, n),
            "max_abs_diff": float(np.abs(out_files - out_mem).max()),
            "run_json_videos_per_s": summary.get("videos_per_s"), "backend": available_backends()[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--sizes", nargs="+", default=["360x640", "256x256"], help="HxW, even numbers")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from benchmarks.common import machine, synthetic_model
    from berg_jax.api import BERG

    berg_dir, pth = synthetic_model()
    berg = BERG(berg_dir, s3d_weights=pth)
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=1, batch_size=args.batch_size)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.videos} mp4 files per size (libx264 crf 23 medium, {args.frames} frames), batch size "
          f"{model.batch_size}, {args.decode_threads} decode threads, {args.repeats} repeats; K=100 synthetic "
          f"model, subject 1 whole brain")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for size in args.sizes:
            h, w = parse_size(size)
            t0 = time.perf_counter()
            paths = write_videos(tmp, args.videos, args.frames, h, w)
            mb = sum(os.path.getsize(p) for p in paths) / 2**20
            print(f"  {size}: wrote {len(paths)} files ({mb:.1f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
            b0, c0, t0 = busy_cpu_s(), time.process_time(), time.perf_counter()
            res = bench_size(berg, model, paths, args, tmp)
            # cores other processes kept busy meanwhile: > ~0.1 means contaminated timings
            others = max(0.0, (busy_cpu_s() - b0 - (time.process_time() - c0)) / (time.perf_counter() - t0))
            rows.append((size, res, others))

    fmt = lambda r: f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"
    print(f"\n{'size':>8} {'decode only':>22} {'memory (BERG.encode)':>22} {'files (encode_files)':>22} "
          f"{'files/memory':>12} {'decode hidden':>13} {'1-thr decode':>12} {'others':>6}")
    print(f"{'':>8} {'videos/s':>22} {'videos/s':>22} {'videos/s':>22}")
    for size, r, load in rows:
        hidden = (r["memory"]["t"] + r["decode"]["t"] - r["files"]["t"]) / r["decode"]["t"]
        print(f"{size:>8} {fmt(r['decode']):>22} {fmt(r['memory']):>22} {fmt(r['files']):>22} "
              f"{r['files']['median'] / r['memory']['median']:>12.2f} {hidden:>12.0%} {r['decode_1thread']:>12.1f} {load:>6.2f}")
    print("\n" + "; ".join(f"{size}: backend {r['backend']}, warm-up {r['warmup_s']:.1f} s, files vs memory "
                           f"max|diff| {r['max_abs_diff']:.1e}" for size, r, _ in rows))


if __name__ == "__main__":
    main()
