"""`berg-jax encode`: video files -> OUT (responses.npy, manifest.csv, run.json, ...).

With --distributed, each process encodes its own block of the inputs into OUT/shards/
(`distributed`), and `berg-jax merge OUT` assembles them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from berg_jax.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_model_args,
    add_selection_args,
    parse_subject_arg,
    selection_from_args,
)
from berg_jax.errors import UsageError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `encode` (`set_defaults(func=cmd_encode, run=run_encode, report=print_summary)`).

    Returns its parser: `demo` runs the same job through it.
    """
    p = sub.add_parser(
        "encode", help="encode video files into OUT (responses.npy, manifest.csv, run.json)",
        description="Encode videos into in silico fMRI responses. OUT gets responses.npy "
                    "(float32, row i = input i, NaN rows for failed inputs), manifest.csv "
                    "(path,row,status,error), run.json, and optionally responses.nii.gz and plots/. "
                    "An interrupted run resumes when the same command is run again.")
    p.add_argument("inputs", nargs="*", metavar="VIDEO_OR_FOLDER",
                   help="video files, or folders searched recursively for video files "
                        "(or none, with --inputs-from)")
    p.add_argument("--inputs-from", metavar="LIST",
                   help="read the video paths from LIST, one a line, in its order (- : standard "
                        "input); blank lines and lines starting with # are skipped, nothing is "
                        "looked up until it is read. Instead of VIDEO_OR_FOLDER arguments")
    add_model_args(p, subject_help="BMD subject 1..10, several (1,2,3), or all: S3D runs once for "
                                   "all of them; one responses_sub-SS.npy each")
    p.add_argument("--components", action="store_true",
                   help="also write OUT/components.npy ((n, K) float32, 400 bytes a video), from which "
                        "`berg-jax responses` computes any subject's responses later; without "
                        "--subject, write only the components")
    p.add_argument("--roi-means", action="store_true",
                   help="also write each subject's ROI means: OUT/roi_means_sub-SS.npy ((n, R) float32, one "
                        "column per ROI of the subject, the mean over its voxels) and roi_means_sub-SS.csv "
                        "(path,row,<ROI names>); `berg-jax rank` ranks the videos by them")
    p.add_argument("--no-responses", action="store_true",
                   help="leave out the voxel responses (write only --roi-means and/or --components): "
                        "a screen of many videos then writes R numbers per video and subject, not ~108k")
    add_selection_args(p)
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (created; resumed if it holds this job)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="videos per call, split over all local devices (default 8 on CPU, 32 per GPU/TPU)")
    p.add_argument("--nifti", action="store_true",
                   help="also write OUT/responses.nii.gz (4-D, MNI152, volume i = row i; "
                        "responses_sub-SS.nii.gz each for several subjects)")
    p.add_argument("--pad-short", action="store_true",
                   help="repeat the last frame of videos shorter than 14 frames instead of failing them")
    p.add_argument("--plot", action="store_true",
                   help="also draw one glass-brain PNG per video into OUT/plots/ (needs berg-jax[plot])")
    from berg_jax.decode_workers import default_decode_workers

    p.add_argument("--decode-workers", type=int, default=default_decode_workers(), metavar="N",
                   help="video decoding worker processes, working ahead of the device; 0: decode in "
                        "--decode-threads threads of this process instead (default: the usable CPU "
                        f"cores less 2, at least 1; here {default_decode_workers()})")
    p.add_argument("--decode-threads", type=int, default=default_decode_threads(), metavar="N",
                   help="video decoding threads with --decode-workers 0 "
                        f"(default: half the CPU cores, 2..8; here {default_decode_threads()})")
    p.add_argument("--decoder", choices=("auto", "cpu", "gpu", "both"), default="auto",
                   help="who decodes: cpu (decord/PyAV), gpu (NVDEC, for files it decodes like the CPU; "
                        "the others go to the CPU), both (NVDEC threads beside --decode-threads CPU "
                        "threads, one queue). auto (default): both on an NVIDIA GPU with berg-jax[gpu-decode] "
                        "installed, cpu elsewhere. gpu/both are part of the job (NVDEC's pixels differ by "
                        "up to 2 levels)")
    p.add_argument("--gpu-decode-threads", type=int, metavar="N",
                   help="NVDEC threads with --decoder gpu/both (default 7, one per H100 NVDEC engine)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_distributed_args(p)
    p.set_defaults(func=cmd_encode, run=run_encode, report=print_summary)
    return p


def default_decode_threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--distributed, --coordinator HOST:PORT, --num-processes N, --process-id I on `encode`."""
    g = p.add_argument_group(
        "many hosts", "Run the same command in every process; each encodes its own contiguous "
                      "block of the inputs into OUT/shards/, then `berg-jax merge OUT` assembles "
                      "them. Without the flags below, JAX takes them from the environment "
                      "(Slurm, Open MPI, Cloud TPU pods, Kubernetes, JAX_COORDINATOR_ADDRESS).")
    g.add_argument("--distributed", action="store_true",
                   help="be one of several processes (hosts) sharing the inputs")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which every process can reach (with --distributed)")
    g.add_argument("--num-processes", type=int, metavar="N", help="how many processes in all")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process, 0..N-1 (without --coordinator: compute shard I of N on its "
                        "own, without the JAX distributed runtime)")


def cmd_encode(args: argparse.Namespace) -> int:
    summary = run_encode(args)
    print_summary(summary)
    return EXIT_FAILED if summary["n_failed"] else EXIT_OK


def run_encode(args: argparse.Namespace) -> dict:
    """`berg-jax encode` without the printing: load the model, `pipeline.encode_files`."""
    from berg_jax import distributed
    from berg_jax.api import BERG
    from berg_jax.pipeline import encode_files
    from berg_jax.video import VIDEO_EXTENSIONS, list_videos, read_input_list

    subject = parse_subject_arg(args.subject)
    if subject is None and not args.components:
        raise UsageError("give --subject N (or several: 1,2,3, or all), and/or --components")
    if subject is None and (args.roi or args.voxels or args.nifti or args.plot or args.roi_means):
        raise UsageError("--roi/--voxels/--nifti/--plot/--roi-means are about a subject's responses: "
                         "give --subject N too")
    if args.no_responses and not (args.roi_means or args.components):
        raise UsageError("--no-responses leaves nothing to write: add --roi-means and/or --components")
    if args.no_responses and (args.roi or args.voxels or args.nifti or args.plot):
        raise UsageError("--roi/--voxels/--nifti/--plot are about voxel responses, which --no-responses "
                         "leaves out: drop one or the other")
    if args.inputs_from is not None and args.inputs:
        # One source for the row order: a list and extra arguments would leave it to guesswork.
        raise UsageError(f"give either VIDEO_OR_FOLDER arguments or --inputs-from {args.inputs_from}, "
                         "not both: add the other paths to the list")
    if args.inputs_from is None and not args.inputs:
        raise UsageError("give video files or folders to encode, or --inputs-from LIST "
                         "(one video path a line)")
    # Before any JAX work: jax.distributed must start first. None without --distributed.
    shard = distributed.setup(args)
    if args.inputs_from is not None:
        paths = read_input_list(args.inputs_from)  # as listed: no folder walk, no stat
    else:
        paths = list_videos(args.inputs)
    if not paths:
        raise UsageError(
            f"no video files found in {' '.join(args.inputs)}; pass video files or folders "
            f"holding files ending in {', '.join(VIDEO_EXTENSIONS)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.decode_threads < 1:
        raise UsageError(f"--decode-threads must be at least 1, got {args.decode_threads}")
    if args.decode_workers < 0:
        raise UsageError(f"--decode-workers must be at least 0 (0: decode in threads), got {args.decode_workers}")
    if args.gpu_decode_threads is not None and args.gpu_decode_threads < 1:
        raise UsageError(f"--gpu-decode-threads must be at least 1, got {args.gpu_decode_threads}")
    # Before the model loads (or BERG's files are converted): a --decoder this machine
    # cannot honour stops the command at once, with nothing written.
    from berg_jax.api import resolve_device
    from berg_jax.gpu_decode import device_platform, resolve_decoder

    decoder = resolve_decoder(args.decoder, device_platform(resolve_device(args.device)))
    selection = selection_from_args(args)
    out = args.out
    if shard is not None:  # this process's contiguous block of the inputs, into its own OUT
        paths, out = distributed.shard_inputs(paths, out, shard)
    berg = BERG(args.berg_dir, s3d_weights=args.s3d_weights)
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=subject, selection=selection,
                                    device=args.device, batch_size=args.batch_size,
                                    components=args.components, precision=args.precision,
                                    roi_means=args.roi_means, responses=not args.no_responses)
    return encode_files(model, paths, out, pad_short=args.pad_short, nifti=args.nifti,
                        plot=args.plot, show_progress=not args.quiet,
                        decode_threads=args.decode_threads, decode_workers=args.decode_workers,
                        decoder=decoder, gpu_decode_threads=args.gpu_decode_threads)


def print_summary(summary: dict) -> None:
    out = summary["outputs"]
    n, n_ok, n_failed = summary["n_inputs"], summary["n_ok"], summary["n_failed"]
    sel = summary.get("selection")
    what = ("whole brain" if sel is None else f"ROI {sel['roi']}" if "roi" in sel
            else f"voxel mask ({sel['voxels_count']} voxels)")
    subject = summary["subject"]
    widths = summary["arrays"]
    if not any(name.startswith("responses") for name in widths):
        what = "ROI means only" if any(name.startswith("roi_means") for name in widths) else what
    if isinstance(subject, int) and "responses.npy" in widths:
        who = f"subject {subject}, {what}, {widths['responses.npy']} voxels per video"
    elif isinstance(subject, int):
        who = f"subject {subject}"
    elif subject:
        who = f"subjects {','.join(map(str, subject))}, {what}"
    else:
        who = f"components only, K = {widths['components.npy']}"
    print(f"berg-jax: {n_ok} of {n} videos encoded, {n_failed} failed ({who})")
    rows = []
    for name, width in widths.items():
        label = "responses" if name == "responses.npy" else name[: -len(".npy")]
        note = "K components (`berg-jax responses` turns them into any subject's responses)" \
            if name == "components.npy" else "ROI means" if name.startswith("roi_means") else "voxels"
        rows.append((label, out[label], f"float32 ({n}, {width}) {note}, row i = input i, NaN rows = failed"))
        if f"{label}_csv" in out:
            rows.append(("", out[f"{label}_csv"], "path,row,<ROI names>; failed rows' values empty"))
    rows += [
        ("manifest", out["manifest"], "path,row,status,error per input"),
        ("run info", out["run"], "settings, versions, device, timings"),
    ]
    for label, path in out.items():
        if label == "nifti" or label.endswith("_nifti"):
            rows.append(("NIfTI", path, f"4-D (62, 77, 61, {n}) MNI152, volume i = row i, NaN = no value"))
    if "plots" in out:
        rows.append(("plots", out["plots"], "one glass-brain PNG per encoded video"))
    for label, path, note in rows:
        print(f"  {label:<10} {path}  ({note})")
    n_run = summary["n_this_run"]
    line = (f"throughput: {n_run} videos read and encoded in {summary['seconds']:.1f} s = "
            f"{summary['videos_per_s']:.2f} videos/s on {summary['device']}"
            f"{' and %d more devices' % (summary['n_devices'] - 1) if summary.get('n_devices', 1) > 1 else ''}"
            f" (batch {summary['batch_size']}")
    if summary.get("first_result_seconds") is not None:
        line += f"; first batch after {summary['first_result_seconds']:.1f} s, including compilation"
    line += ")"
    if summary["n_resumed"]:
        line += f"; {summary['n_resumed']} videos were already done (resumed)"
    print(line)
    if summary["failed"]:
        print(f"failed ({n_failed}, recorded in manifest.csv):")
        for path, reason in summary["failed"]:
            # Readers' reasons start with the path already.
            print(f"  {reason if reason.startswith(path) else f'{path}: {reason}'}")
