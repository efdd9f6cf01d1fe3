"""`berg-jax responses`: stored components (encode --components) -> any subject's responses."""

from __future__ import annotations

import argparse
import time
from typing import Any

from berg_jax.cli.common import EXIT_OK, add_selection_args, parse_subject_arg, selection_from_args


def add_parser(sub: Any) -> None:
    """Register `responses`."""
    p = sub.add_parser(
        "responses", help="turn stored components (encode --components) into responses",
        description="Compute voxel responses from OUT/components.npy: the encoder's own regression, "
                    "so the files equal a direct `berg-jax encode --subject ...` of the same videos. "
                    "One subject writes OUT/responses.npy, several OUT/responses_sub-SS.npy each.")
    p.add_argument("components", metavar="COMPONENTS.npy", help="float32 (n, K), as encode --components writes")
    p.add_argument("--berg-dir", required=True, metavar="DIR", help="the BERG files the components were made with")
    p.add_argument("--subject", required=True, metavar="N", help="subject 1..10, several (1,2,3), or all")
    add_selection_args(p)
    p.add_argument("--roi-means", action="store_true",
                   help="also write each subject's ROI means, OUT/roi_means_sub-SS.npy and .csv, as "
                        "`encode --roi-means` does")
    p.add_argument("--no-responses", action="store_true", help="write only the ROI means (with --roi-means)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (created)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_responses)


def cmd_responses(args: argparse.Namespace) -> int:
    from berg_jax.errors import UsageError
    from berg_jax.pipeline import responses_from_components_file, roi_means_from_components_file

    subject = parse_subject_arg(args.subject)
    if args.no_responses and not args.roi_means:
        raise UsageError("--no-responses leaves nothing to write: add --roi-means")
    if args.no_responses and (args.roi or args.voxels):
        raise UsageError("--roi/--voxels select voxel responses, which --no-responses leaves out: drop one")
    selection = selection_from_args(args)
    t0 = time.perf_counter()
    written = []
    if not args.no_responses:
        for s, path in responses_from_components_file(args.components, args.berg_dir, subject, args.out,
                                                      selection=selection, device=args.device,
                                                      show_progress=not args.quiet).items():
            written.append((s, path))
    if args.roi_means:
        for s, paths in roi_means_from_components_file(args.components, args.berg_dir, subject, args.out,
                                                       device=args.device, show_progress=not args.quiet).items():
            written += [(s, p) for p in paths]
    for s, path in written:
        print(f"  sub-{s:02d}: {path}")
    print(f"berg-jax responses: {len(written)} file(s) from {args.components} in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK
