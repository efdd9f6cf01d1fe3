"""All ten subjects in one pass against ten single-subject runs (BERG's way: S3D once per subject).

    python -m benchmarks.subjects [--videos 16] [--size 256x256] [--repeats 2]

Same process, same videos, same K=100 synthetic model (10 subjects, real voxel counts):
(a) ten `get_encoding_model(subject=s)` models, each encoding the videos, as a BERG user
loops over subjects; (b) one `get_encoding_model(subject="all")` model, whose backbone
and projection run once and whose ten heads run on their output. Compilation is excluded
(one warm-up call per model); S3D and the projection are loaded once and shared by all
models (BERG caches them per device). Prints seconds, videos/s and the speed-up, and
checks both give the same responses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--size", default="256x256", help="HxW of the random source videos")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: berg-jax's default for the device")
    args = parser.parse_args(argv)

    from benchmarks.common import machine, peak_rss_mb, synthetic_model
    from berg_jax.api import BERG
    from berg_jax.berg_files import SUBJECTS

    h, w = (int(x) for x in args.size.split("x"))
    t0 = time.perf_counter()
    berg_dir, pth = synthetic_model(subjects=tuple(SUBJECTS))
    berg = BERG(berg_dir, s3d_weights=pth)
    singles = {s: berg.get_encoding_model("fmri-bmd-s3d", subject=s, batch_size=args.batch_size) for s in SUBJECTS}
    together = berg.get_encoding_model("fmri-bmd-s3d", subject="all", batch_size=args.batch_size)
    print(f"machine: {machine()}")
    print(f"set-up (model files, conversion, loading): {time.perf_counter() - t0:.1f} s")
    videos = np.random.default_rng(0).integers(0, 256, size=(args.videos, 14, h, w, 3), dtype=np.uint8)
    bs = together.batch_size
    for model in (*singles.values(), together):  # compile each program once, outside the timing
        berg.encode(model, videos[:bs], show_progress=False)

    loop_s, once_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        separate = {s: berg.encode(m, videos, show_progress=False) for s, m in singles.items()}
        loop_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        joint = berg.encode(together, videos, show_progress=False)
        once_s.append(time.perf_counter() - t)
    worst = max(float(np.abs(joint[s] - separate[s]).max() / np.abs(separate[s]).max()) for s in SUBJECTS)
    loop, once = statistics.median(loop_s), statistics.median(once_s)
    n = args.videos
    print(f"{n} videos of {h}x{w}, batch {bs}, K = {together.n_components}, {len(SUBJECTS)} subjects "
          f"({sum(together.n_voxels.values()):,} voxels in all), median of {args.repeats}:")
    print(f"  ten single-subject runs: {loop:7.2f} s  ({n / loop:.2f} videos/s for all subjects)"
          f"  runs: {', '.join(f'{x:.2f}' for x in loop_s)}")
    print(f"  one all-subjects pass:   {once:7.2f} s  ({n / once:.2f} videos/s for all subjects)"
          f"  runs: {', '.join(f'{x:.2f}' for x in once_s)}")
    print(f"  speed-up: {loop / once:.2f}x;  max relative difference of the responses: {worst:.1e};  "
          f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
