"""`berg-jax demo`: the main job end to end, offline, on a synthetic model (`berg_jax.demo`).

It runs `berg-jax encode --nifti` on the sample clips through the encode verb's own parser,
which `build_parser` hands to `add_parser`: the same defaults and checks as typing it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_FAILED, EXIT_OK
from berg_jax.errors import UsageError


def add_parser(sub: Any, encode_parser: argparse.ArgumentParser) -> None:
    """Register `demo`; `encode_parser` is `encode`'s (its defaults `run` and `report` do the job)."""
    p = sub.add_parser(
        "demo", help="run the main job offline on a synthetic model (NOT real predictions)",
        description="Build a clearly labelled synthetic model (seeded random weights with the real "
                    "shapes) in a cache folder, write a few sample clips (and one broken file), and "
                    "run `berg-jax encode --nifti` on them. The responses are NOT real predictions.")
    p.add_argument("--out", metavar="DIR", help="output folder (default: CACHE/out, replaced on each run)")
    p.add_argument("--videos", type=int, default=6, metavar="N",
                   help="sample clips to write, the last one deliberately broken (default 6, at least 2)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the synthetic model and clips live (default ~/.cache/berg-jax/demo; reused)")
    p.add_argument("--batch-size", type=int, metavar="B", help="videos per device call")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo, encode_parser=encode_parser)


def cmd_demo(args: argparse.Namespace) -> int:
    from berg_jax.demo import DEMO_BROKEN, DEMO_SIZES, build_model, default_demo_dir, demo_banner, write_videos

    if args.videos < 2:
        raise UsageError(f"--videos must be at least 2 (one of them is the broken file), got {args.videos}")
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_demo_dir()
    out = Path(args.out).expanduser() if args.out else cache / "out"
    print("berg-jax demo: the main job end to end, offline, on a SYNTHETIC model "
          "(seeded random weights -- NOT real predictions)")
    t0 = time.perf_counter()
    berg_dir, pth = build_model(cache)
    setup_s = time.perf_counter() - t0
    t_clips = time.perf_counter()
    videos = write_videos(cache / "videos", args.videos)
    clips_s = time.perf_counter() - t_clips
    print(f"sample clips: {len(videos) - 1} mp4s of {', '.join(f'{w}x{h}' for h, w in DEMO_SIZES)} "
          f"and 1 deliberately broken file, in {cache / 'videos'}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)  # the default OUT is the demo's own: start fresh
    argv = [*map(str, videos), "--berg-dir", str(berg_dir), "--subject", "1",
            "--s3d-weights", str(pth), "--out", str(out), "--nifti", "--device", args.device]
    if args.batch_size is not None:
        argv += ["--batch-size", str(args.batch_size)]
    if args.quiet:
        argv.append("--quiet")
    print("running: berg-jax " + " ".join(["encode", "<the clips above>"] + argv[len(videos):]))
    t1 = time.perf_counter()
    encode = args.encode_parser.parse_args(argv)
    summary = encode.run(encode)
    encode_s = time.perf_counter() - t1
    print()
    encode.report(summary)
    print(f"demo time: {setup_s:.1f} s model set-up, {clips_s:.1f} s writing the clips, "
          f"{encode_s:.1f} s loading the model and encoding, {time.perf_counter() - t0:.1f} s in all")
    print(demo_banner(berg_dir))
    unexpected = [p for p, _ in summary["failed"] if Path(p).name != DEMO_BROKEN]
    return EXIT_FAILED if unexpected else EXIT_OK
