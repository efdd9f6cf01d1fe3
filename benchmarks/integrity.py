"""What the checksums cost: writing OUT, a resume's check, and `berg-jax verify`, at screening scale.

    python -m benchmarks.integrity [--rows 1000000] [--columns 100] [--batch 32]

Builds an OUT of `rows` rows (default: a million clips' 100 components, 400 MB) through
`writer.ResponseWriter` (pwrite + fdatasync + journal line with CRC-32 per batch), then
times, each in a fresh process with its peak RSS:
  - `verify_folder` (re-reads every row and checks every batch's checksum),
  - a resume of the finished job (`ResponseWriter.open`: the same check, before it trusts),
  - one plain sequential read of the array (`numpy.load` + a sum): the disk's own pace,
and prints the ratios to that read. No model: only the files' cost. The page cache is warm
(the file was just written), so this is the CPU cost of checking, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {"model_id": "fmri-bmd-s3d", "subject": None, "benchmark": "integrity"}


def build(out: Path, rows: int, columns: int, batch: int) -> float:
    import numpy as np

    from berg_jax.writer import ResponseWriter

    paths = [f"clips/{i:07d}.mp4" for i in range(rows)]
    block = np.random.default_rng(0).standard_normal((batch, columns)).astype(np.float32)
    t0 = time.perf_counter()
    w = ResponseWriter.open(out, paths, {"components.npy": columns}, CONFIG)
    for lo in range(0, rows, batch):
        idx = list(range(lo, min(lo + batch, rows)))
        w.write_rows(idx, block[: len(idx)] + lo)
    w.finish({})
    return time.perf_counter() - t0


def child(what: str, out: Path, rows: int, columns: int) -> dict:
    import numpy as np

    from benchmarks.common import peak_rss_mb

    t0 = time.perf_counter()
    if what == "verify":
        from berg_jax.verify import verify_folder

        report = verify_folder(out)
        assert report.ok, report.problems[:3]
    elif what == "resume":
        from berg_jax.writer import ResponseWriter

        paths = [f"clips/{i:07d}.mp4" for i in range(rows)]
        w = ResponseWriter.open(out, paths, {"components.npy": columns}, CONFIG)
        assert w.pending() == [] and not w.repairs
        w.close()
    else:
        float(np.load(out / "components.npy", mmap_mode="r").sum(dtype=np.float64))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dir", help="where to build OUT (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.rows, args.columns)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = Path(tmp) / "out"
        write_s = build(out, args.rows, args.columns, args.batch)
        size_mb = (out / "components.npy").stat().st_size / 1e6
        print(f"OUT: {args.rows:,} rows x {args.columns} float32 = {size_mb:,.0f} MB, batches of {args.batch}; "
              f"journal {(out / 'progress.jsonl').stat().st_size / 1e6:.1f} MB")
        print(f"  write (pwrite + fdatasync + journal per batch): {write_s:.1f} s = "
              f"{args.rows / write_s:,.0f} rows/s")
        results = {}
        for what in ("read", "verify", "resume"):
            cmd = [sys.executable, "-m", "benchmarks.integrity", "--rows", str(args.rows), "--columns",
                   str(args.columns), "--child", what, str(out)]
            results[what] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        base = results["read"]["seconds"]
        for what, label in (("read", "plain read (numpy.load + sum)"), ("verify", "berg-jax verify"),
                            ("resume", "resume check (ResponseWriter.open)")):
            r = results[what]
            print(f"  {label:<36} {r['seconds']:6.2f} s  {size_mb / r['seconds']:7.0f} MB/s  "
                  f"x{r['seconds'] / base:5.1f} the plain read  peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
