"""`berg-jax rank OUT --roi NAME`: the videos of an encode output ranked by ROI mean (see `berg_jax.rank`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_OK


def add_parser(sub: Any) -> None:
    """Register `berg-jax rank`."""
    p = sub.add_parser(
        "rank", help="the top (and bottom) videos of an encode output by an ROI's mean response",
        description="Rank the videos of OUT by an ROI's mean response (or the difference of two ROIs'), "
                    "for one subject or averaged over subjects; print the top K (and with --bottom the "
                    "bottom K) with their values and write them to a CSV (end,rank,row,path,value). "
                    "Reads OUT's roi_means_sub-SS.npy (encode --roi-means), else whole-brain responses "
                    "or components.npy (both with --berg-dir), streaming: any number of rows. Failed "
                    "(NaN) rows are skipped and counted; ties go to the smaller row.")
    p.add_argument("out", metavar="OUT", help="the --out of `berg-jax encode` (or of `berg-jax responses --roi-means`)")
    p.add_argument("--roi", required=True, metavar="NAME", help="the ROI whose mean response ranks the videos (e.g. lFFA)")
    p.add_argument("--minus-roi", metavar="NAME", help="rank by --roi's mean minus this ROI's (e.g. rFFA)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--subject", type=int, metavar="N", help="this subject (default: the only one in OUT)")
    who.add_argument("--mean-over-subjects", action="store_true",
                     help="average the measure over every subject OUT holds")
    p.add_argument("--top", type=int, default=10, metavar="K", help="how many videos from the top (default 10)")
    p.add_argument("--bottom", action="store_true", help="also the bottom K")
    p.add_argument("--berg-dir", metavar="DIR",
                   help="BERG's files: needed to rank from whole-brain responses or components")
    p.add_argument("--write", metavar="PATH",
                   help="the CSV to write (default: OUT/rank_<roi>[_minus_<roi>]_<sub-SS|mean-over-subjects>"
                        "_top-K[_bottom-K].csv)")
    p.set_defaults(func=cmd_rank)


def cmd_rank(args: argparse.Namespace) -> int:
    from berg_jax.errors import UsageError
    from berg_jax.rank import rank_videos, ranking_file_name, write_ranking_csv

    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    ranking = rank_videos(args.out, args.roi, minus_roi=args.minus_roi, subject=args.subject,
                          mean_over_subjects=args.mean_over_subjects, top=args.top,
                          bottom=args.top if args.bottom else 0, berg_dir=args.berg_dir)
    target = write_ranking_csv(ranking, args.write or Path(args.out) / ranking_file_name(ranking))
    print_ranking(ranking)
    print(f"written: {target}")
    return EXIT_OK


def print_ranking(ranking: Any) -> None:
    """The ranking as a table on stdout."""
    sources = ", ".join(sorted(set(ranking.sources.values())))
    skipped = f", {ranking.n_skipped} without a value (failed or not computed) skipped" if ranking.n_skipped else ""
    print(f"berg-jax rank: {ranking.measure}, {ranking.who}, from {sources}: {ranking.n_rows} videos{skipped}")
    for end, videos in (("top", ranking.top), ("bottom", ranking.bottom)):
        if not videos:
            continue
        print(f"{end} {len(videos)}:")
        print(f"  {'rank':>4}  {'row':>8}  {'value':>12}  path")
        for v in videos:
            print(f"  {v.rank:>4}  {v.row:>8}  {v.value:>12.6g}  {v.path}")
