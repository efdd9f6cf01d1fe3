"""`berg-jax fetch`: download BERG's files and torchvision's S3D weights (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_OK, file_size
from berg_jax.errors import UsageError


def add_parser(sub: Any) -> None:
    """Register `fetch`."""
    p = sub.add_parser(
        "fetch", help="download BERG's files and torchvision's S3D weights",
        description="Download BERG's fmri-bmd-s3d files for the given subjects (plus the shared PCA) "
                    "from BERG's public bucket, and by default torchvision's S3D weights into torch "
                    "hub's cache. Interrupted downloads resume.")
    p.add_argument("--berg-dir", metavar="DIR", help="where BERG's files go (laid out as `aws s3 sync` does)")
    p.add_argument("--subjects", type=int, nargs="+", metavar="N", help="subjects 1..10")
    p.add_argument("--s3d", action=argparse.BooleanOptionalAction, default=True,
                   help="also fetch the S3D weights (default: yes)")
    p.add_argument("--s3d-weights", metavar="PTH", help="where to put the S3D weights "
                                                        "(default: $TORCH_HOME/hub/checkpoints/s3d-d76dad2f.pth)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    from berg_jax import fetch

    if args.subjects and not args.berg_dir:
        raise UsageError("--subjects needs --berg-dir DIR (the folder BERG's files go into)")
    if not args.subjects and not args.s3d:
        raise UsageError("nothing to fetch: pass --berg-dir DIR --subjects N [N ...], and/or --s3d")
    if args.berg_dir and not args.subjects:
        raise UsageError(f"--berg-dir {args.berg_dir} given without --subjects; pass e.g. --subjects 1")
    fetched: list[Path] = []
    if args.subjects:
        fetch.check_subjects(args.subjects)  # InvalidParameterError (exit 2) before any transfer
        print(f"fetching BERG's fmri-bmd-s3d files for subject(s) {', '.join(map(str, args.subjects))} "
              f"into {args.berg_dir} (the shared pca_weights.npy is ~1.7 GB)")
        fetched += fetch.fetch_berg_files(args.berg_dir, args.subjects, show_progress=not args.quiet)
    if args.s3d:
        print("fetching torchvision's S3D Kinetics-400 weights")
        fetched.append(fetch.fetch_s3d_weights(args.s3d_weights, show_progress=not args.quiet))
    for path in fetched:
        print(f"  {path}  ({file_size(path)})")
    if args.subjects:
        s = args.subjects[0]
        weights = f" --s3d-weights {args.s3d_weights}" if args.s3d_weights else ""
        print(f"next: berg-jax encode VIDEOS... --berg-dir {args.berg_dir} --subject {s} --out OUT{weights}")
    return EXIT_OK
