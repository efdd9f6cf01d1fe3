"""ROI means alone against whole-brain responses: what the ROI-mean head costs next to S3D.

    python -m benchmarks.roi_means [--videos 16] [--size 64x64] [--repeats 2] [--csv-rows 100000]

Same process, same videos, same K=100 synthetic model (subject 1, 108,219 voxels, 47 ROIs):
(a) `get_encoding_model(subject=1)`, whole-brain responses, as `berg-jax encode --subject 1`;
(b) `get_encoding_model(subject=1, roi_means=True, responses=False)`, the ROI means alone,
as `berg-jax encode --subject 1 --roi-means --no-responses`. Both through `BERG.encode`
from memory (the encode loop without decoding; compilation excluded by one warm-up call).
Prints videos/s for each (median and fastest run) and their ratio, and the heads alone (the (K, N) and (K, R)
regressions on a batch of components). With --csv-rows, also the time to write
roi_means_sub-SS.csv for that many rows of 47 ROIs, extrapolated to a million.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def model_with_every_roi() -> tuple[object, object]:
    """The cached K=100 synthetic model (`benchmarks.common.synthetic_model`) with sub-01's
    metadata holding all 47 of BERG's ROIs: a berg_dir beside it whose PCA file and converted
    projection are links to the cached ones (no 1.7 GB copy, no second conversion)."""
    from benchmarks.common import DEFAULT_CACHE, synthetic_model
    from berg_jax.berg_files import ROI_NAMES, pca_weights_path
    from berg_jax.head import converted_dir
    from berg_jax.synthetic_berg import make_berg_dir

    berg_dir, pth = synthetic_model()
    every = DEFAULT_CACHE / "berg_k100_every_roi"
    done = every / ".complete"
    if not done.exists():
        pca = pca_weights_path(every)
        pca.parent.mkdir(parents=True, exist_ok=True)
        if not pca.exists():
            pca.symlink_to(pca_weights_path(berg_dir))
        converted_dir(every).mkdir(parents=True, exist_ok=True)
        for name in ("projection", "projection.json"):
            link = converted_dir(every) / name
            if not link.exists():
                link.symlink_to(converted_dir(berg_dir) / name)
        make_berg_dir(every, subjects=(1,), n_components=100, seed=0, rois=ROI_NAMES, pca=False)
        done.touch()
    return every, pth


def time_heads(model_full, model_roi, batch: int, repeats: int = 20) -> tuple[float, float]:
    """Median seconds of one batch through the whole-brain head and through the ROI-mean head."""
    import jax

    from berg_jax.head import regress

    comps = jax.device_put(np.random.default_rng(1).standard_normal((batch, model_full.n_components),
                                                                    dtype=np.float32))
    fn = jax.jit(lambda c, h: regress(c, h, "highest"))
    out = []
    for h in (model_full.params.regression, model_roi.params.roi_means[1]):
        fn(comps, h).block_until_ready()
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            np.asarray(fn(comps, h))  # with the copy back, as the encoder's results come back
            runs.append(time.perf_counter() - t)
        out.append(statistics.median(runs))
    return out[0], out[1]


def time_csv(rows: int, n_rois: int = 47) -> float:
    from berg_jax.roi_means import write_roi_means_csv

    means = np.random.default_rng(2).standard_normal((rows, n_rois)).astype(np.float32)
    paths = [f"/data/screen/clips/clip_{i:07d}.mp4" for i in range(rows)]
    names = [f"ROI{j}" for j in range(n_rois)]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_roi_means_csv(os.path.join(tmp, "roi_means_sub-01.csv"), means, names, paths)
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--size", default="64x64", help="HxW of the random source videos")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: berg-jax's default for the device")
    parser.add_argument("--csv-rows", type=int, default=0, help="also time the CSV for this many rows")
    args = parser.parse_args(argv)

    from benchmarks.common import machine, peak_rss_mb
    from berg_jax.api import BERG

    if args.csv_rows:
        s = time_csv(args.csv_rows)
        print(f"roi_means CSV, {args.csv_rows:,} rows x 47 ROIs: {s:.2f} s "
              f"({s * 1e6 / args.csv_rows:.1f} s per million rows, one core)")

    h, w = (int(x) for x in args.size.split("x"))
    t0 = time.perf_counter()
    berg_dir, pth = model_with_every_roi()
    berg = BERG(berg_dir, s3d_weights=pth)
    full = berg.get_encoding_model("fmri-bmd-s3d", subject=1, batch_size=args.batch_size)
    roi = berg.get_encoding_model("fmri-bmd-s3d", subject=1, roi_means=True, responses=False,
                                  batch_size=args.batch_size)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"set-up (model files, conversion, loading): {time.perf_counter() - t0:.1f} s")
    videos = np.random.default_rng(0).integers(0, 256, size=(args.videos, 14, h, w, 3), dtype=np.uint8)
    bs = full.batch_size
    for model in (full, roi):  # compile each program once, outside the timing
        berg.encode(model, videos[:bs], show_progress=False)

    times: dict[str, list[float]] = {"whole brain": [], "ROI means alone": []}
    pair = (("whole brain", full), ("ROI means alone", roi))
    for i in range(args.repeats):  # interleaved, in alternating order: a change in the machine's load hits both
        for label, model in (pair if i % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            berg.encode(model, videos, show_progress=False)
            times[label].append(time.perf_counter() - t)
    n = args.videos
    print(f"{n} videos of {h}x{w}, batch {bs}, K = {full.n_components}, sub-01: {full.n_voxels:,} voxels "
          f"against {len(roi.roi_names[1])} ROIs; median of {args.repeats}:")
    rate, best = {}, {}
    for label, runs in times.items():
        med = statistics.median(runs)
        rate[label], best[label] = n / med, n / min(runs)
        print(f"  {label:<16} {med:7.2f} s  {rate[label]:6.2f} videos/s (fastest run {best[label]:.2f})  "
              f"runs: {', '.join(f'{x:.2f}' for x in runs)}")
    print(f"  ROI means alone / whole brain: {rate['ROI means alone'] / rate['whole brain']:.3f}x by the medians, "
          f"{best['ROI means alone'] / best['whole brain']:.3f}x by the fastest runs (on a shared machine the "
          "fastest runs are the least disturbed)")
    head_full, head_roi = time_heads(full, roi, bs)
    print(f"  the heads alone, batch {bs} (with the copy back): whole brain {head_full * 1e3:.2f} ms "
          f"({head_full * 1e3 / bs:.2f} ms a video), ROI means {head_roi * 1e3:.3f} ms "
          f"({head_roi * 1e3 / bs:.3f} ms a video); peak RSS {peak_rss_mb():.0f} MB; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
