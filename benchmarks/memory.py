"""Peak memory of `BERG.encode` against the number of videos: it must not grow beyond the output.

    python -m benchmarks.memory [--videos 10 50] [--batch-size 4]

Each N runs in a fresh process (peak RSS is per process): load the K=100 synthetic model,
encode N random 256x256 videos, report peak RSS, the input and output array sizes, and
peak minus (input + output) -- the part that must stay flat as N grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_one(n: int, batch_size: int) -> dict:
    import numpy as np

    from benchmarks.common import peak_rss_mb, synthetic_model
    from berg_jax.api import BERG

    berg_dir, pth = synthetic_model()
    berg = BERG(berg_dir, s3d_weights=pth)
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=1, batch_size=batch_size)
    videos = np.random.default_rng(0).integers(0, 256, size=(n, 14, 3, 256, 256), dtype=np.uint8)
    loaded = peak_rss_mb()
    out = berg.encode(model, videos, show_progress=False)
    return {"videos": n, "peak_rss_mb": peak_rss_mb(), "after_load_mb": loaded,
            "input_mb": videos.nbytes / 2**20, "output_mb": out.nbytes / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_one(args.child, args.batch_size)))
        return
    from benchmarks.common import machine, synthetic_model

    synthetic_model()  # build the cache outside the measured processes
    print(f"machine: {machine()}; batch size {args.batch_size}; K=100, subject 1 whole brain")
    print(f"{'videos':>6} {'peak RSS MB':>12} {'after load':>11} {'input MB':>9} {'output MB':>10} {'peak-in-out':>12}")
    for n in args.videos:
        res = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", str(n),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rest = r["peak_rss_mb"] - r["input_mb"] - r["output_mb"]
        print(f"{n:>6} {r['peak_rss_mb']:>12.0f} {r['after_load_mb']:>11.0f} {r['input_mb']:>9.0f} "
              f"{r['output_mb']:>10.1f} {rest:>12.0f}")


if __name__ == "__main__":
    main()
