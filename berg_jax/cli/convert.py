"""`berg-jax convert`: fold BERG's PCA into per-tap projections ahead of time (orbax copy)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_OK
from berg_jax.errors import UsageError


def add_parser(sub: Any) -> None:
    """Register `convert`."""
    p = sub.add_parser("convert", help="convert BERG's files to berg-jax's faster copy ahead of time",
                       description="Fold BERG's PCA into per-tap projections and save each subject's "
                                   "regression (orbax) under DIR; done automatically on first use.")
    p.add_argument("--berg-dir", required=True, metavar="DIR")
    p.add_argument("--subjects", type=int, nargs="+", metavar="N", help="default: every subject present")
    p.add_argument("--force", action="store_true", help="convert again even when the copy is current")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from berg_jax import berg_files, head

    berg_dir = Path(args.berg_dir).expanduser()
    subjects = None
    if args.subjects:
        subjects = [berg_files.check_subject(s) for s in args.subjects]
    pca = berg_files.pca_weights_path(berg_dir)
    if not pca.is_file():
        raise UsageError(f"{pca} not found; download BERG's files first with "
                         f"`berg-jax fetch --berg-dir {berg_dir} --subjects 1`")
    todo = subjects if subjects is not None else head.available_subjects(berg_dir)
    before = {"projection": head.is_converted(berg_dir)}
    before.update({f"sub-{s:02d}": head.is_converted(berg_dir, s) for s in todo})
    t0 = time.perf_counter()
    target = head.convert_berg_dir(berg_dir, subjects, force=args.force)
    seconds = time.perf_counter() - t0
    done = [k for k, current in before.items() if args.force or not current]
    kept = [k for k in before if k not in done]
    if done:
        print(f"converted {', '.join(done)} in {seconds:.1f} s")
    if kept:
        print(f"already current: {', '.join(kept)} (--force converts again)")
    if not todo:
        print(f"no subject weights found in {berg_dir}; get them with "
              f"`berg-jax fetch --berg-dir {berg_dir} --subjects 1`")
    print(f"converted copy: {target}")
    return EXIT_OK
