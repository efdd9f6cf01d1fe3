"""`berg-jax merge OUT`: assemble the shards of `encode --distributed` (see `berg_jax.merge`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_FAILED, EXIT_OK


def add_parser(sub: Any) -> None:
    """Register `berg-jax merge OUT`."""
    p = sub.add_parser(
        "merge", help="assemble the shards of `encode --distributed` in OUT",
        description="Check the shards in OUT/shards/ (all there, finished, same settings, every "
                    "input once) and write into OUT what a single-process `berg-jax encode` of all "
                    "the inputs writes: the arrays, manifest.csv (global rows), run.json, and the "
                    "NIfTIs and plots when every shard has them. Memory stays bounded; the shards "
                    "are kept (delete OUT/shards afterwards if you like). Exit status 1 when some "
                    "inputs failed, as for encode.")
    p.add_argument("out", metavar="OUT", help="the --out of the `encode --distributed` processes")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from berg_jax.merge import merge_shards

    summary = merge_shards(args.out)
    print_merge_summary(summary)
    return EXIT_FAILED if summary["n_failed"] else EXIT_OK


def print_merge_summary(summary: dict) -> None:
    from berg_jax.distributed import SHARDS_DIR

    n, n_ok, n_failed = summary["n_inputs"], summary["n_ok"], summary["n_failed"]
    empty = summary["n_empty_shards"]
    print(f"berg-jax merge: {summary['n_shards']} shards"
          f"{f' ({empty} empty)' if empty else ''} -> {summary['out_dir']}: "
          f"{n_ok} of {n} videos encoded, {n_failed} failed")
    out = summary["outputs"]
    for name, width in summary["arrays"].items():
        label = "responses" if name == "responses.npy" else name[: -len(".npy")]
        print(f"  {label:<10} {out[label]}  (float32 ({n}, {width}), row i = input i, NaN rows = failed)")
    print(f"  {'manifest':<10} {out['manifest']}  (path,row,status,error per input, global rows)")
    print(f"  {'run info':<10} {out['run']}  (settings, counts, each shard's run info)")
    for label, path in out.items():
        if label == "nifti" or label.endswith("_nifti"):
            print(f"  {'NIfTI':<10} {path}  (4-D MNI152, volume i = row i)")
    if "plots" in out:
        print(f"  {'plots':<10} {out['plots']}  (one glass-brain PNG per encoded video)")
    print(f"  {'shards':<10} {Path(summary['out_dir']) / SHARDS_DIR}  (kept: each is a finished "
          "encode folder; delete them when no longer needed)")
    for note in summary["notes"]:
        print(f"note: {note}")
    failed = summary["failed"]
    if failed:
        print(f"failed ({len(failed)}, recorded in manifest.csv):")
        for path, reason in failed[:20]:
            print(f"  {reason if reason.startswith(path) else f'{path}: {reason}'}")
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more (manifest.csv)")
    sys.stdout.flush()
