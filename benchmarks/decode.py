"""Decoding throughput, threads against worker processes, and how each scales with the workers.

    python -m benchmarks.decode [--workers 1 2 4 8 16] [--videos 32] [--size 360x640]
                                [--frames 60] [--distinct 8] [--batch-size 8] [--repeats 1]

Writes `--distinct` H.264 mp4s (`benchmarks.files.write_videos`: libx264 crf 23, preset
medium, yuv420p) into a temp dir and copies them round-robin to `--videos` paths
(encoding is the slow part; decoding a copy costs what decoding a new file costs). Then,
pure decoding, no model:

  1 thread, plain  `video.read_clip` over the files in a loop (the reference rate);
  threads N        `video.prefetch_clips(num_threads=N)`, batches of `--batch-size`;
  processes N      `decode_workers.prefetch_clips(num_workers=N)`, the same batches,
                   timed from the call, so the workers' start is included.

Reported per N: videos/s (median [min-max] over `--repeats`), the scaling efficiency
rate(N) / (N * rate(1)) of each column against its own N = 1 (1.0 = linear), "start s":
the time for N fresh workers to start and answer one trivial read (a missing path), and
"processes - start": n / (time - start s), the rate a run long enough to hide the start
approaches.
"cores" is the process's CPU affinity; "others" the cores other processes kept busy
meanwhile (well above 0: contaminated timings). N above the core count oversubscribes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.encode import busy_cpu_s
from benchmarks.reference_pipeline import parse_size


def _rates(fn, n: int, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _drain(batches) -> None:
    for _, _, errors in batches:
        if errors:
            raise SystemExit(f"decoding failed: {next(iter(errors.values()))}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--size", default="360x640", help="HxW, even numbers")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--distinct", type=int, default=8, help="distinct files written (the rest are copies)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from benchmarks.common import machine
    from benchmarks.files import write_videos
    from berg_jax import decode_workers
    from berg_jax.video import available_backends, prefetch_clips, read_clip

    h, w = parse_size(args.size)
    n, bs = args.videos, args.batch_size
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        sources = write_videos(tmp, min(args.distinct, n), args.frames, h, w)
        paths = []
        for i in range(n):
            path = tmp / f"copy_{i:04d}.mp4"
            shutil.copyfile(sources[i % len(sources)], path)
            paths.append(str(path))
        mb = sum(os.path.getsize(p) for p in paths) / 2**20
        print(f"machine: {machine()}; {cores} usable cores; load average {os.getloadavg()[0]:.2f}")
        print(f"{n} mp4 files of {args.size}, {args.frames} frames ({len(sources)} distinct, {mb:.1f} MB, "
              f"written in {time.perf_counter() - t0:.0f} s); backend {available_backends()[0]}; batch {bs}, "
              f"{args.repeats} repeat(s)")

        b0, c0, t0 = busy_cpu_s(), time.process_time(), time.perf_counter()
        read_clip(paths[0])  # page the libraries in
        plain = _rates(lambda: [read_clip(p) for p in paths], n, args.repeats)
        rows = []
        for k in args.workers:
            threads = _rates(lambda: _drain(prefetch_clips(paths, bs, num_threads=k)), n, args.repeats)
            procs = _rates(lambda: _drain(decode_workers.prefetch_clips(paths, bs, num_workers=k)), n, args.repeats)
            missing = [str(tmp / "missing.mp4")] * k
            t1 = time.perf_counter()
            for _ in decode_workers.prefetch_clips(missing, k, num_workers=k):
                pass
            rows.append((k, threads, procs, time.perf_counter() - t1))
            print(f"  N={k} done", flush=True)
        others = max(0.0, (busy_cpu_s() - b0 - (time.process_time() - c0)) / (time.perf_counter() - t0))

    med = statistics.median
    fmt = lambda r: f"{med(r):.1f} [{min(r):.1f}-{max(r):.1f}]"  # noqa: E731
    # Processes without their start: n / (time - start), the rate a long run approaches.
    table = [(k, med(threads), med(procs), n / max(n / med(procs) - start, 1e-9), start, threads, procs)
             for k, threads, procs, start in rows]
    k0 = table[0][0]
    base = [table[0][i] / k0 for i in (1, 2, 3)]
    print(f"\n1 thread, plain read_clip loop: {fmt(plain)} videos/s; others {others:.2f}")
    print(f"\n{'N':>3} {'threads':>22} {'eff':>5} {'processes':>22} {'eff':>5} {'processes - start':>17} {'eff':>5} "
          f"{'start s':>8}")
    print(f"{'':>3} {'videos/s':>22} {'':>5} {'videos/s':>22} {'':>5} {'videos/s':>17}")
    for k, rt, rp, rs, start, threads, procs in table:
        print(f"{k:>3} {fmt(threads):>22} {rt / (k * base[0]):>5.2f} {fmt(procs):>22} {rp / (k * base[1]):>5.2f} "
              f"{rs:>17.1f} {rs / (k * base[2]):>5.2f} {start:>8.2f}")
    print("eff: rate(N) / (N * rate(1)) within the column" + ("" if k0 == 1 else f", rate(1) = rate({k0}) / {k0}"))


if __name__ == "__main__":
    main()
