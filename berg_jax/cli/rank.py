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
    p.add_argument("--sheet", metavar="PNG",
                   help="also draw a contact sheet of the top videos: the first, middle and last of the 14 "
                        "frames the model saw, read back from the video files, and each one's value (with "
                        "--bottom, the bottom ones go to PNG's name + _bottom); needs berg-jax[plot]")
    p.add_argument("--bars", metavar="DIR",
                   help="also draw each ranked video's ROI means as a bar plot, one PNG each "
                        "(<end>-<rank>_<row>.png); needs OUT's ROI means (encode --roi-means) and "
                        "berg-jax[plot]")
    p.set_defaults(func=cmd_rank)


def cmd_rank(args: argparse.Namespace) -> int:
    from berg_jax.errors import UsageError
    from berg_jax.rank import rank_videos, ranking_file_name, write_ranking_csv

    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    if args.sheet or args.bars:
        from berg_jax.screening_plots import require_matplotlib

        require_matplotlib()  # before the ranking, which may read a million rows
    if args.bars and not any(Path(args.out).glob("roi_means_sub-*.npy")):
        raise UsageError(f"--bars draws OUT's ROI means, and {args.out} holds none: encode with --roi-means "
                         "(or run `berg-jax responses --roi-means`) first, or leave --bars out")
    ranking = rank_videos(args.out, args.roi, minus_roi=args.minus_roi, subject=args.subject,
                          mean_over_subjects=args.mean_over_subjects, top=args.top,
                          bottom=args.top if args.bottom else 0, berg_dir=args.berg_dir)
    target = write_ranking_csv(ranking, args.write or Path(args.out) / ranking_file_name(ranking))
    print_ranking(ranking)
    print(f"written: {target}")
    if args.sheet:
        for png in draw_sheets(ranking, Path(args.sheet)):
            print(f"contact sheet: {png}")
    if args.bars:
        bars = draw_bars(ranking, Path(args.out), Path(args.bars))
        print(f"ROI-means bar plots: {len(bars)} in {args.bars}")
    return EXIT_OK


def draw_sheets(ranking: Any, png: Path) -> list[Path]:
    """The contact sheet of the top videos at `png` (and of the bottom ones beside it)."""
    from berg_jax.screening_plots import RankedClip, contact_sheet

    written = []
    for end, videos in (("top", ranking.top), ("bottom", ranking.bottom)):
        if not videos:
            continue
        target = png if end == "top" else png.with_name(f"{png.stem}_bottom{png.suffix or '.png'}")
        written.append(contact_sheet(
            [RankedClip(v.rank, v.path, v.value) for v in videos], target,
            title=f"{end} {len(videos)} of {ranking.n_rows} videos by {ranking.measure} ({ranking.who})",
            value_label=ranking.measure))
    return written


def draw_bars(ranking: Any, out: Path, folder: Path) -> list[Path]:
    """One bar plot of every ranked video's ROI means (averaged over subjects where the ranking was)."""
    from berg_jax.rank import ranked_roi_means
    from berg_jax.screening_plots import roi_means_bars

    folder.mkdir(parents=True, exist_ok=True)
    names, means = ranked_roi_means(ranking, out)
    written = []
    for v in (*ranking.top, *ranking.bottom):
        written.append(roi_means_bars(
            means[v.row], names, folder / f"{v.end}-{v.rank:03d}_{v.row}.png",
            title=f"{Path(v.path).name or f'row {v.row}'} ({ranking.who}): {v.end} {v.rank}, "
                  f"{ranking.measure} = {v.value:.4g}"))
    return written


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
