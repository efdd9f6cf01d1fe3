"""`berg-jax optimize`: optimise a video for an ROI's modelled response, from the command line.

    berg-jax optimize --berg-dir DIR --subject N --roi lFFA [--minus-roi B | --target RESP.npy]
                      --out OUT [--steps 50] [--lr 0.05] [--size 112x112] [--seed 0]
                      [--s3d-weights PTH] [--device auto|cpu|gpu|tpu]
                      [--precision highest|tf32|bf16] [-q]

OUT gets clip.mp4 (uint8, 24 fps, lossy: a preview), clip.npy (float32 (14, H, W, 3) in
0..1: the exact optimised clip), and trajectory.csv (step,objective; step 0 is the
initial noise). Each file is written atomically. `add_parser` registers the
sub-command on `berg_jax.cli`'s parser.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_OK, add_model_args
from berg_jax.errors import UsageError

CLIP_MP4, CLIP_NPY, TRAJECTORY_CSV = "clip.mp4", "clip.npy", "trajectory.csv"
FPS = 24


def add_parser(subparsers: Any) -> None:
    """Register `optimize` on an argparse sub-parsers object (`set_defaults(func=cmd_optimize)`)."""
    p = subparsers.add_parser(
        "optimize", help="optimise a video that drives an ROI (or matches a response pattern)",
        description="Gradient ascent on a video's pixels (projected Adam, pixels kept in 0..1) to "
                    "maximise the mean modelled response of --roi, or mean(--roi) - mean(--minus-roi), "
                    "or to match a --target response pattern over --roi's voxels. OUT gets clip.mp4, "
                    "clip.npy (float32 (14, H, W, 3), 0..1) and trajectory.csv (step,objective).")
    add_model_args(p, one_subject=True)
    p.add_argument("--roi", required=True, metavar="NAME",
                   help="the ROI to drive (e.g. lFFA; `berg-jax info --subject N` lists them)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--minus-roi", metavar="NAME", help="maximise mean(--roi) - mean(this ROI) instead")
    goal.add_argument("--target", metavar="RESP.npy",
                      help="match this response pattern instead (minimise the mean squared error): one "
                           "value per --roi voxel, in the order `berg-jax encode --roi` writes them, or "
                           "one per voxel of the subject (whole brain)")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="Adam steps (default 50)")
    p.add_argument("--lr", type=float, default=0.05, metavar="LR",
                   help="Adam learning rate, in 0..1 pixel units (default 0.05)")
    p.add_argument("--size", default="112x112", metavar="HxW",
                   help="frame size of the clip, even numbers (default 112x112)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial uniform noise (default 0)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (created; files in it replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_optimize)


def parse_size(text: str) -> tuple[int, int]:
    """'112x112' -> (112, 112): height x width, each even and >= 2 (mp4's yuv420p needs even sizes)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. --size 112x112")
    h, w = int(m.group(1)), int(m.group(2))
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise UsageError(f"--size {text}: height and width must be even and >= 2 (the mp4 is yuv420p), "
                         f"e.g. --size {max(2, h + h % 2)}x{max(2, w + w % 2)}")
    return h, w


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Everything that can be wrong with the command line, before the model is loaded."""
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be a positive number (e.g. 0.05), got {args.lr}")
    if args.minus_roi is not None and args.minus_roi == args.roi:
        raise UsageError(f"--minus-roi {args.minus_roi} is the same ROI as --roi; name another ROI")
    if args.target is not None and not Path(args.target).is_file():
        raise UsageError(f"--target {args.target}: no such file; save the pattern with numpy.save(path, responses)")
    return parse_size(args.size)


def _load_target(path: str, n_roi: int, roi_voxels: Any, n_subject_voxels: int) -> Any:
    """--target as float32 (n_roi,) over the ROI's voxels (a whole-brain pattern is cut down to them)."""
    import numpy as np

    try:
        target = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--target {path}: not a readable .npy array ({exc}); save the pattern with "
                         "numpy.save(path, responses)") from None
    if target.ndim == 2 and target.shape[0] == 1:  # one row of a responses.npy
        target = target[0]
    if target.ndim != 1 or target.dtype.kind not in "iuf":
        raise UsageError(f"--target {path}: expected a 1-D numeric response vector, got shape {target.shape} "
                         f"dtype {target.dtype}; for one row of responses.npy save responses[i]")
    if target.shape[0] == n_subject_voxels and n_subject_voxels != n_roi:
        target = target[roi_voxels]
    if target.shape[0] != n_roi:
        raise UsageError(f"--target {path} has {target.shape[0]} values; expected {n_roi} (one per voxel of "
                         f"the ROI) or {n_subject_voxels} (one per voxel of the subject)")
    if not np.isfinite(target).all():
        raise UsageError(f"--target {path} contains NaN or infinite values (a failed row of responses.npy?)")
    return target.astype(np.float32)


def cmd_optimize(args: argparse.Namespace) -> int:
    """Run `berg-jax optimize`; returns the exit status (0). Usage mistakes raise `UsageError`."""
    import numpy as np

    from berg_jax import berg_files
    from berg_jax.api import BERG
    from berg_jax.atomic import atomic_write_bytes, atomic_write_text
    from berg_jax.optimize import match_pattern, optimize_stimulus, roi_difference, roi_mean
    from berg_jax.video import write_mp4

    size = _check_args(args)
    berg = BERG(args.berg_dir, s3d_weights=args.s3d_weights)
    metadata = berg.get_model_metadata(berg_files.MODEL_ID, args.subject)
    roi_voxels = berg_files.roi_voxel_indices(metadata, args.roi)  # ValidationError lists the ROIs
    if args.minus_roi is None:
        selection: dict = {"roi": args.roi}
    else:
        # Both ROIs' voxels and no others: the head computes only what the objective reads.
        mask = np.zeros(berg_files.N_VOXELS[args.subject], dtype=bool)
        mask[roi_voxels] = True
        mask[berg_files.roi_voxel_indices(metadata, args.minus_roi)] = True
        selection = {"voxels": mask}
    model = berg.get_encoding_model(berg_files.MODEL_ID, subject=args.subject, selection=selection,
                                    device=args.device, precision=args.precision)
    if args.target is not None:
        target = _load_target(args.target, len(roi_voxels), roi_voxels, berg_files.N_VOXELS[args.subject])
        objective = match_pattern(target)
    elif args.minus_roi is not None:
        objective = roi_difference(model, args.roi, args.minus_roi)
    else:
        objective = roi_mean(model, args.roi)

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    result = optimize_stimulus(model, objective, init=args.seed, steps=args.steps, learning_rate=args.lr,
                               size=size, show_progress=not args.quiet)

    buf = io.BytesIO()
    np.save(buf, result.clip, allow_pickle=False)
    atomic_write_bytes(out / CLIP_NPY, buf.getvalue())
    write_mp4(out / CLIP_MP4, result.clip_uint8(), fps=FPS)
    # repr() of a float round-trips exactly; the csv is for reading back, not for show.
    rows = "".join(f"{k},{float(v)!r}\n" for k, v in enumerate(result.trajectory))
    atomic_write_text(out / TRAJECTORY_CSV, "step,objective\n" + rows)

    first, last = result.trajectory[0], result.trajectory[-1]
    print(f"berg-jax optimize: sub-{args.subject:02d} {objective.name}: {first:.6g} -> {last:.6g} "
          f"({last - first:+.6g}) in {args.steps} steps, {result.seconds:.1f} s")
    print(f"wrote {out / CLIP_MP4}, {CLIP_NPY} (float32 {tuple(result.clip.shape)}, 0..1), {TRAJECTORY_CSV}")
    return EXIT_OK
