"""`berg-jax verify OUT`: check an encode output folder against its journal (see `berg_jax.verify`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from berg_jax.cli.common import EXIT_FAILED, EXIT_OK

_SHOWN = 50  # problems listed before "... and N more"


def add_parser(sub: Any) -> None:
    """Register `berg-jax verify OUT`."""
    p = sub.add_parser(
        "verify", help="check OUT's files against its journal, without recomputing",
        description="Check a finished `berg-jax encode` folder (or a merged one, or the shards of "
                    "`encode --distributed` before merging) without recomputing anything: every array's "
                    "header and size, every recorded batch's rows against the checksums written with "
                    "them, manifest.csv against the journal, and the files run.json lists (manifest, "
                    "NIfTIs) against their checksums. Streams: a million-row folder needs no more memory "
                    "than a batch. Exit status 0 when everything matches, 1 with the list of damaged "
                    "files and row ranges otherwise. Running the same encode command again repairs "
                    "what it lists.")
    p.add_argument("out", metavar="OUT", help="the --out of `berg-jax encode` (or of `berg-jax merge`)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from berg_jax.verify import verify_folder

    report = verify_folder(args.out, show_progress=not args.quiet)
    print_report(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def print_report(report: Any) -> None:
    where = ", ".join(report.folders) if report.folders != ["."] else "the job"
    n = len(report.problems)
    state = "OK" if report.ok else f"DAMAGED ({n} problem{'s' if n > 1 else ''})"
    print(f"berg-jax verify: {report.out}: {state}")
    print(f"  checked {where}: {report.n_rows} rows ({report.n_ok} ok, {report.n_failed} failed) in "
          f"{', '.join(report.arrays)}; {report.n_checked_rows} rows against their checksums")
    if report.n_unverified_rows:
        print(f"  {report.n_unverified_rows} rows were recorded by an older berg-jax without checksums: "
              "their files are the right size, their values could not be checked")
    if report.files:
        print(f"  match the checksums in run.json: {', '.join(report.files)}")
    for p in report.problems[:_SHOWN]:
        print(f"  {p}")
    if len(report.problems) > _SHOWN:
        print(f"  ... and {len(report.problems) - _SHOWN} more")
    if not report.ok:
        print("fix: run the same `berg-jax encode` command again (for a shard, that process's command): it "
              "checks every recorded row, computes the damaged ones again and rewrites the other files; "
              "then `berg-jax merge OUT` again for a merged folder")
    sys.stdout.flush()
