"""`berg-jax`: the command line. Thin: parse, call the library, report.

    berg-jax encode VIDEO_OR_FOLDER... --berg-dir DIR --subject N|N,N,...|all [--components]
                    [--roi NAME | --voxels MASK.npy] --out OUT [--batch-size B] [--nifti]
                    [--pad-short] [--plot] [--s3d-weights PTH] [--device auto|cpu|gpu|tpu]
                    [--precision highest|tf32|bf16]
                    [--distributed [--coordinator HOST:PORT --num-processes N --process-id I]]
    berg-jax merge OUT                      (after `encode --distributed`)
    berg-jax responses COMPONENTS.npy --berg-dir DIR --subject N|N,N,...|all --out OUT
    berg-jax optimize --berg-dir DIR --subject N --roi NAME --out DIR
    berg-jax fetch  --berg-dir DIR --subjects N [N ...] [--s3d | --no-s3d]
    berg-jax info   --berg-dir DIR [--subject N] [--plot OUT.png]
    berg-jax convert --berg-dir DIR [--subjects N ...] [--force]
    berg-jax demo   [--out DIR] [--videos N] [--cache-dir DIR]

Exit status: 0 all done; 1 some input failed (a video, a download) -- the others were
still processed and the failures are listed; 2 a usage or configuration error (one line
naming the input and the fix, no traceback); 130 interrupted (Ctrl-C): re-running the
same command resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEMO_FORMAT = "berg-jax-demo/1"
DEMO_COMPONENTS = 100  # BERG's K: the demo model has the real shapes
DEMO_SIZES = ((256, 256), (360, 640), (240, 320))  # (H, W) of the sample clips, cycled
DEMO_BROKEN = "broken_truncated.mp4"


class UsageError(Exception):
    """A command-line mistake; its message is printed as one line and the exit status is 2."""


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from berg_jax import __version__, distributed
    from berg_jax.cli_optimize import add_optimize_parser

    parser = argparse.ArgumentParser(
        prog="berg-jax",
        description="BERG's fmri-bmd-s3d in silico fMRI encoding model (video -> voxel responses) in JAX.",
        epilog="Exit status: 0 ok, 1 some input failed, 2 usage/config error, 130 interrupted "
               "(re-run the same command to resume).",
    )
    parser.add_argument("--version", action="version", version=f"berg-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "encode", help="encode video files into OUT (responses.npy, manifest.csv, run.json)",
        description="Encode videos into in silico fMRI responses. OUT gets responses.npy "
                    "(float32, row i = input i, NaN rows for failed inputs), manifest.csv "
                    "(path,row,status,error), run.json, and optionally responses.nii.gz and plots/. "
                    "An interrupted run resumes when the same command is run again.")
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FOLDER",
                   help="video files, or folders searched recursively for video files")
    _add_model_args(p, subject_help="BMD subject 1..10, several (1,2,3), or all: S3D runs once for "
                                    "all of them; one responses_sub-SS.npy each")
    p.add_argument("--components", action="store_true",
                   help="also write OUT/components.npy ((n, K) float32, 400 bytes a video), from which "
                        "`berg-jax responses` computes any subject's responses later; without "
                        "--subject, write only the components")
    _add_selection_args(p)
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
    p.add_argument("--decode-threads", type=int, default=_default_decode_threads(), metavar="N",
                   help="video decoding threads with --decode-workers 0 "
                        f"(default: half the CPU cores, 2..8; here {_default_decode_threads()})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    distributed.add_distributed_args(p)
    p.set_defaults(func=cmd_encode)

    distributed.add_merge_parser(sub)
    add_optimize_parser(sub)

    p = sub.add_parser(
        "responses", help="turn stored components (encode --components) into responses",
        description="Compute voxel responses from OUT/components.npy: the encoder's own regression, "
                    "so the files equal a direct `berg-jax encode --subject ...` of the same videos. "
                    "One subject writes OUT/responses.npy, several OUT/responses_sub-SS.npy each.")
    p.add_argument("components", metavar="COMPONENTS.npy", help="float32 (n, K), as encode --components writes")
    p.add_argument("--berg-dir", required=True, metavar="DIR", help="the BERG files the components were made with")
    p.add_argument("--subject", required=True, metavar="N", help="subject 1..10, several (1,2,3), or all")
    _add_selection_args(p)
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (created)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_responses)

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

    p = sub.add_parser("info", help="the model card: subjects, voxels, ROIs, files, weights",
                       description="Describe the model and what of it is present in --berg-dir.")
    p.add_argument("--berg-dir", required=True, metavar="DIR")
    p.add_argument("--subject", type=int, metavar="N", help="also list this subject's ROIs and accuracy")
    p.add_argument("--plot", metavar="OUT.png",
                   help="draw the subject's test accuracy on MNI152 (needs --subject and berg-jax[plot])")
    p.add_argument("--s3d-weights", metavar="PTH", help="S3D weights to look for (default: torch hub's cache path)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert BERG's files to berg-jax's faster copy ahead of time",
                       description="Fold BERG's PCA into per-tap projections and save each subject's "
                                   "regression (orbax) under DIR; done automatically on first use.")
    p.add_argument("--berg-dir", required=True, metavar="DIR")
    p.add_argument("--subjects", type=int, nargs="+", metavar="N", help="default: every subject present")
    p.add_argument("--force", action="store_true", help="convert again even when the copy is current")
    p.set_defaults(func=cmd_convert)

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
    p.set_defaults(func=cmd_demo)
    return parser


def _default_decode_threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def _add_model_args(p: argparse.ArgumentParser, subject_help: str = "BMD subject 1..10",
                    one_subject: bool = False) -> None:
    """--berg-dir, --subject, --s3d-weights, --device, --precision; `one_subject`: --subject is one required int."""
    p.add_argument("--berg-dir", required=True, metavar="DIR",
                   help="local copy of BERG's files (`berg-jax fetch --berg-dir DIR --subjects N`)")
    if one_subject:
        p.add_argument("--subject", required=True, type=int, metavar="N", help=subject_help)
    else:
        p.add_argument("--subject", metavar="N", help=subject_help)
    p.add_argument("--s3d-weights", metavar="PTH",
                   help="torchvision's s3d-d76dad2f.pth or a converted checkpoint "
                        "(default: $TORCH_HOME/hub/checkpoints/s3d-d76dad2f.pth)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
    p.add_argument("--precision", choices=("highest", "tf32", "bf16"), default="highest",
                   help="highest (default): float32 throughout, BERG's numbers; tf32: float32 with "
                        "TF32 / one-pass bf16 convolutions and matmuls on GPU/TPU (on CPU the same as "
                        "highest); bf16: S3D and the projection in bfloat16 with float32 "
                        "accumulation (slower on CPU; on an H100 no faster than tf32). Responses are "
                        "float32 in every mode")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints usage + one line, exits 2
    from berg_jax.errors import BERGError, DownloadError
    from berg_jax.outputs import OutputDirError

    fit_gpu_memory_pool()
    enable_compilation_cache()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        resumable = args.command in ("encode", "fetch", "demo")
        print(f"\nberg-jax {args.command}: interrupted" + ("; run the same command again to resume "
              "where it stopped" if resumable else " (nothing was left half-written)"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except DownloadError as exc:
        _error(args.command, exc)
        return EXIT_FAILED
    except (UsageError, BERGError, OutputDirError, ImportError, OSError) as exc:
        # Expected problems with the command's inputs or setup: their messages name the
        # input and the fix (the library's errors are written that way).
        _error(args.command, exc)
        return EXIT_USAGE


# JAX reserves this share of each GPU's total memory when its backend starts.
_JAX_DEFAULT_MEM_FRACTION = 0.75


def fit_gpu_memory_pool(query: Sequence[str] = ("nvidia-smi", "--query-gpu=memory.total,memory.free",
                                                "--format=csv,noheader,nounits")) -> float | None:
    """Size JAX's GPU memory pool to what is free, when another process already holds some.

    JAX reserves 75% of a GPU's *total* memory at start. When another process holds part of
    it (a notebook, a second job, a process still exiting), the reservation fails and XLA
    logs "Failed to allocate device memory of 59.38GiB ... CUDA_ERROR_OUT_OF_MEMORY" once per
    retry, each 10% smaller, until one fits: the run is fine, the screen says otherwise
    (measured on an H100: 310 such lines when started right after another GPU process
    exited, none on an idle GPU). Asking for 90% of the free memory up front fits at once.

    Only the command line does this, and only when the user has not chosen
    (XLA_PYTHON_CLIENT_MEM_FRACTION / _PREALLOCATE / _ALLOCATOR unset) and nvidia-smi exists.
    Returns the fraction set, or None.
    """
    if any(k in os.environ for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                     "XLA_PYTHON_CLIENT_ALLOCATOR")) or shutil.which(query[0]) is None:
        return None
    import subprocess

    try:
        text = subprocess.run(list(query), capture_output=True, text=True, timeout=20, check=True).stdout
        rows = [tuple(float(v) for v in line.split(",")) for line in text.strip().splitlines()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None  # no usable answer: leave JAX's default
    free_share = min((free / total for total, free in rows if total > 0), default=1.0)
    fraction = round(0.9 * free_share, 2)
    if fraction >= _JAX_DEFAULT_MEM_FRACTION or fraction <= 0:
        return None
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.2f}"
    return fraction


def enable_compilation_cache() -> None:
    """Keep XLA's compiled programs between runs (2-3 s per frame size on CPU, more on GPU/TPU).

    Only the command line does this: a library import must not change a JAX user's global
    config. An explicit JAX_COMPILATION_CACHE_DIR (or one already set) wins; BERG_JAX_NO_CACHE=1 turns it off.
    """
    import jax

    if os.environ.get("BERG_JAX_NO_CACHE", "").strip().lower() in ("1", "true", "yes") \
            or jax.config.jax_compilation_cache_dir:
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "berg-jax", "jax-cache"))


def _error(command: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"berg-jax {command}: error: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- encode


def cmd_encode(args: argparse.Namespace) -> int:
    summary = run_encode(args)
    print_summary(summary)
    return EXIT_FAILED if summary["n_failed"] else EXIT_OK


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    """--roi NAME | --voxels MASK.npy, read back by `selection_from_args`."""
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--roi", metavar="NAME", help="only this ROI's voxels (e.g. lFFA; `berg-jax info "
                                                   "--subject N` lists them)")
    sel.add_argument("--voxels", metavar="MASK.npy", help="only the voxels of a binary mask of length N_s (.npy)")


def selection_from_args(args: argparse.Namespace) -> dict | None:
    """--roi / --voxels -> BERG's selection dict (None: whole brain)."""
    if args.roi is not None:
        return {"roi": args.roi}
    if args.voxels is not None:
        return {"voxels": _load_voxel_mask(args.voxels)}
    return None


def _load_voxel_mask(path: str) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--voxels {path}: no such file; pass a .npy holding a 0/1 (or bool) "
                         "vector with one entry per voxel of the subject") from None
    except (ValueError, OSError) as exc:
        raise UsageError(f"--voxels {path}: not a readable .npy array ({exc}); save the mask "
                         "with numpy.save(path, mask)") from None


def parse_subject_arg(text: str | None) -> int | list[int] | str | None:
    """--subject: "3" -> 3, "1,2,5" -> [1, 2, 5], "all" -> "all", None -> None."""
    if text is None or text.strip().lower() == "all":
        return None if text is None else "all"
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--subject {text}: give a subject 1..10, several as 1,2,3, or all") from None
    if not values:
        raise UsageError(f"--subject {text!r}: give a subject 1..10, several as 1,2,3, or all")
    return values[0] if len(values) == 1 and "," not in text else values


def run_encode(args: argparse.Namespace) -> dict:
    """`berg-jax encode` without the printing: load the model, `pipeline.encode_files`."""
    from berg_jax import distributed
    from berg_jax.api import BERG
    from berg_jax.pipeline import encode_files
    from berg_jax.video import VIDEO_EXTENSIONS, list_videos

    subject = parse_subject_arg(args.subject)
    if subject is None and not args.components:
        raise UsageError("give --subject N (or several: 1,2,3, or all), and/or --components")
    if subject is None and (args.roi or args.voxels or args.nifti or args.plot):
        raise UsageError("--roi/--voxels/--nifti/--plot are about responses: give --subject N too")
    # Before any JAX work: jax.distributed must start first. None without --distributed.
    shard = distributed.setup(args)
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
    selection = selection_from_args(args)
    out = args.out
    if shard is not None:  # this process's contiguous block of the inputs, into its own OUT
        paths, out = distributed.shard_inputs(paths, out, shard)
    berg = BERG(args.berg_dir, s3d_weights=args.s3d_weights)
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=subject, selection=selection,
                                    device=args.device, batch_size=args.batch_size,
                                    components=args.components, precision=args.precision)
    return encode_files(model, paths, out, pad_short=args.pad_short, nifti=args.nifti,
                        plot=args.plot, show_progress=not args.quiet,
                        decode_threads=args.decode_threads, decode_workers=args.decode_workers)


def print_summary(summary: dict) -> None:
    out = summary["outputs"]
    n, n_ok, n_failed = summary["n_inputs"], summary["n_ok"], summary["n_failed"]
    sel = summary.get("selection")
    what = ("whole brain" if sel is None else f"ROI {sel['roi']}" if "roi" in sel
            else f"voxel mask ({sel['voxels_count']} voxels)")
    subject = summary["subject"]
    widths = summary["arrays"]
    if isinstance(subject, int):
        who = f"subject {subject}, {what}, {widths['responses.npy']} voxels per video"
    elif subject:
        who = f"subjects {','.join(map(str, subject))}, {what}"
    else:
        who = f"components only, K = {widths['components.npy']}"
    print(f"berg-jax: {n_ok} of {n} videos encoded, {n_failed} failed ({who})")
    rows = []
    for name, width in widths.items():
        label = "responses" if name == "responses.npy" else name[: -len(".npy")]
        note = "K components (`berg-jax responses` turns them into any subject's responses)" \
            if name == "components.npy" else "voxels"
        rows.append((label, out[label], f"float32 ({n}, {width}) {note}, row i = input i, NaN rows = failed"))
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


def cmd_responses(args: argparse.Namespace) -> int:
    from berg_jax.pipeline import responses_from_components_file

    subject = parse_subject_arg(args.subject)
    selection = selection_from_args(args)
    t0 = time.perf_counter()
    written = responses_from_components_file(args.components, args.berg_dir, subject, args.out,
                                             selection=selection, device=args.device,
                                             show_progress=not args.quiet)
    for s, path in written.items():
        print(f"  sub-{s:02d}: {path}")
    print(f"berg-jax responses: {len(written)} file(s) from {args.components} in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


# --------------------------------------------------------------------------- fetch


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
        fetch._check_subjects(args.subjects)  # InvalidParameterError (exit 2) before any transfer
        print(f"fetching BERG's fmri-bmd-s3d files for subject(s) {', '.join(map(str, args.subjects))} "
              f"into {args.berg_dir} (the shared pca_weights.npy is ~1.7 GB)")
        fetched += fetch.fetch_berg_files(args.berg_dir, args.subjects, show_progress=not args.quiet)
    if args.s3d:
        print("fetching torchvision's S3D Kinetics-400 weights")
        fetched.append(fetch.fetch_s3d_weights(args.s3d_weights, show_progress=not args.quiet))
    for path in fetched:
        print(f"  {path}  ({_size(path)})")
    if args.subjects:
        s = args.subjects[0]
        weights = f" --s3d-weights {args.s3d_weights}" if args.s3d_weights else ""
        print(f"next: berg-jax encode VIDEOS... --berg-dir {args.berg_dir} --subject {s} --out OUT{weights}")
    return EXIT_OK


def _size(path: Path) -> str:
    try:
        n = path.stat().st_size
    except OSError:
        return "missing"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


# --------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    from berg_jax import berg_files, head
    from berg_jax.fetch import default_s3d_weights_path
    from berg_jax.errors import ModelLoadError

    berg_dir = Path(args.berg_dir).expanduser()
    if args.plot and args.subject is None:
        raise UsageError("--plot needs --subject N (whose test accuracy to draw)")
    if args.subject is not None:
        berg_files.check_subject(args.subject)
    model_dir = berg_files.model_dir(berg_dir)
    pca = berg_files.pca_weights_path(berg_dir)
    print(f"{berg_files.MODEL_ID}: BERG's in silico fMRI encoding model of the BOLD Moments Dataset")
    print("  video -> 14 frames -> S3D (Kinetics-400) -> 7 taps, F = 4,084,096 features")
    print(f"  -> StandardScaler + PCA (K = {berg_files.N_COMPONENTS} in BERG's files) -> linear regression per voxel")
    print("  -> float32 response per voxel (z-scored units) on the subject's (62, 77, 61) MNI152 grid")
    print(f"berg dir: {berg_dir}{'' if berg_dir.is_dir() else '  (does not exist)'}")
    print(f"  model files: {model_dir}")
    print(f"  pca_weights.npy: {'present, ' + _size(pca) if pca.is_file() else 'missing'}")
    converted = head.is_converted(berg_dir) if pca.is_file() else False
    state = "not yet: made on first use, or `berg-jax convert`"
    if converted:
        state = "current"
        try:
            state += f", K = {head.converted_components(berg_dir)} components"
        except ModelLoadError:
            pass
    print(f"  converted copy: {head.converted_dir(berg_dir)} ({state})")
    print("subjects (voxels; files in this berg dir):")
    present = []
    for s in berg_files.SUBJECTS:
        w, m = berg_files.subject_weights_path(berg_dir, s), berg_files.metadata_path(berg_dir, s)
        if w.is_file() and m.is_file():
            present.append(s)
            conv = "converted" if converted and head.is_converted(berg_dir, s) else "not converted"
            state = f"present ({_size(w)} weights), {conv}"
        elif w.is_file() or m.is_file():
            state = f"incomplete: {(m if w.is_file() else w).name} missing"
        else:
            state = "not downloaded"
        print(f"  sub-{s:02d}  {berg_files.N_VOXELS[s]:>7,} voxels  {state}")
    if not present:
        print(f"  get one with: berg-jax fetch --berg-dir {berg_dir} --subjects 1")
    s3d = Path(args.s3d_weights).expanduser() if args.s3d_weights else default_s3d_weights_path()
    print(f"S3D weights: {s3d} "
          f"({'present, ' + _size(s3d) if s3d.exists() else 'missing: get them with `berg-jax fetch --s3d`'})")
    if args.subject is not None:
        _subject_card(berg_dir, args.subject, args.plot)
    return EXIT_OK


def _subject_card(berg_dir: Path, subject: int, plot: str | None) -> None:
    import numpy as np

    from berg_jax import berg_files

    meta = berg_files.load_metadata(berg_dir, subject)  # ModelLoadError says how to fetch it
    fmri = meta["fmri"]
    affine = np.asarray(fmri["sub_mask_affine"], dtype=float)
    vox_mm = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    print(f"sub-{subject:02d}: {int(np.count_nonzero(fmri['sub_mask'])):,} voxels in a "
          f"{tuple(fmri['sub_mask'].shape)} grid, voxel size {' x '.join(f'{v:g}' for v in vox_mm)} mm (MNI152)")
    rois = fmri["rois"]
    names = [n for n in berg_files.ROI_NAMES if n in rois] + sorted(n for n in rois if n not in berg_files.ROI_NAMES)
    print(f"  ROIs ({len(names)}; --roi NAME), voxels each:")
    cells = []
    for name in names:
        try:
            cells.append(f"{name} {len(berg_files.roi_voxel_indices(meta, name))}")
        except Exception as exc:  # noqa: BLE001 - a malformed ROI is reported, not fatal
            cells.append(f"{name} (unreadable: {type(exc).__name__})")
    for i in range(0, len(cells), 6):
        print("    " + "  ".join(f"{c:<16}" for c in cells[i:i + 6]).rstrip())
    acc = meta.get("encoding_models") or {}
    if "r2" in acc and "explained_variance" in acc:
        r2 = np.asarray(acc["r2"], float)
        ev = np.asarray(acc["explained_variance"], float)
        print(f"  test accuracy (BMD's 102 test videos): median r2 {np.nanmedian(r2):.3f} "
              f"(max {np.nanmax(r2):.3f}); median explained variance {np.nanmedian(ev):.1f}% "
              f"of the noise ceiling")
    if plot:
        from berg_jax import plots

        path = plots.plot_accuracy(meta, plot, subject=subject)
        print(f"  accuracy map: {path}")


# --------------------------------------------------------------------------- convert


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


# --------------------------------------------------------------------------- demo


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "berg-jax" / "demo"


BANNER_WIDTH = 78


def _banner(lines: list[str]) -> str:
    bar = "=" * BANNER_WIDTH
    return "\n".join([bar, *(f"  {line}" for line in lines), bar])


def demo_banner(berg_dir: Path) -> str:
    return _banner([
        "DEMO -- SYNTHETIC MODEL: these responses are NOT real predictions.",
        "Every weight is a seeded random number with the real shapes (S3D's 8.3M",
        f"parameters, F = 4,084,096 features, K = {DEMO_COMPONENTS} components, 108,219 voxels).",
        f"Synthetic model files: {berg_dir}",
        "For real predictions, download BERG's weights (~1.8 GB) and S3D's, then encode:",
        "  berg-jax fetch --berg-dir ~/berg --subjects 1",
        "  berg-jax encode VIDEOS... --berg-dir ~/berg --subject 1 --out OUT --nifti",
    ])


def _demo_model(cache: Path) -> tuple[Path, Path]:
    """The demo's synthetic berg_dir and S3D .pth under `cache`, built (and converted) once."""
    from berg_jax import head
    from berg_jax.outputs import atomic_write_text
    from berg_jax.synthetic import random_state_dict
    from berg_jax.synthetic_berg import make_berg_dir
    from berg_jax.torch_pickle import write_torch_state_dict

    berg_dir, pth, marker = cache / "berg", cache / "s3d-synthetic-seed0.pth", cache / "model.json"
    record = {"format": DEMO_FORMAT, "n_components": DEMO_COMPONENTS, "seed": 0, "subjects": [1],
              "note": "SYNTHETIC: seeded random weights with the real shapes; not real predictions"}
    try:
        ready = json.loads(marker.read_text()) == record and pth.is_file() and head.is_converted(berg_dir, 1)
    except (OSError, ValueError):
        ready = False
    if ready:
        print(f"using the synthetic demo model in {cache}")
        return berg_dir, pth
    print(f"building the synthetic demo model in {cache} (once; about 3.3 GB on disk):")
    marker.unlink(missing_ok=True)
    shutil.rmtree(berg_dir, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_berg_dir(berg_dir, subjects=(1,), n_components=DEMO_COMPONENTS, seed=0)
    print(f"  BERG-format files (K = {DEMO_COMPONENTS}, F = 4,084,096, sub-01 108,219 voxels): "
          f"{time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    write_torch_state_dict(random_state_dict(0), pth)
    print(f"  S3D state_dict (torchvision's keys and shapes): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    head.convert_berg_dir(berg_dir, [1])
    print(f"  converted copy (what `berg-jax convert` makes): {time.perf_counter() - t0:.1f} s")
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
    return berg_dir, pth


def _demo_videos(folder: Path, n: int) -> list[Path]:
    """n sample clips: n - 1 good mp4s of different sizes, then a deliberately broken one."""
    try:
        import av
    except ImportError:
        raise UsageError("the demo writes its sample clips with PyAV: pip install av") from None
    from fractions import Fraction

    from berg_jax.synthetic import synthetic_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n - 1):
        h, w = DEMO_SIZES[i % len(DEMO_SIZES)]
        n_frames = 30 + 6 * i
        path = folder / f"clip_{i + 1}_{w}x{h}_{n_frames}f.mp4"
        if not path.is_file():
            _write_mp4(av, Fraction, path, synthetic_video(seed=i + 1, n_frames=n_frames, height=h, width=w))
        paths.append(path)
    broken = folder / DEMO_BROKEN
    if not broken.is_file():
        # A real clip cut in half: an mp4's index (moov atom) is at its end, so nothing decodes.
        tmp = folder / f".{DEMO_BROKEN}.tmp"
        _write_mp4(av, Fraction, tmp, synthetic_video(seed=99, n_frames=30, height=240, width=320),
                   atomic=False)
        data = tmp.read_bytes()
        broken.write_bytes(data[: len(data) // 2])
        tmp.unlink()
    paths.append(broken)
    return paths


def _write_mp4(av: Any, fraction: Any, path: Path, frames: Any, atomic: bool = True) -> None:
    target = path.with_name(f".{path.name}.part") if atomic else path
    with av.open(str(target), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                      rate=fraction(24))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if atomic:
        os.replace(target, path)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.videos < 2:
        raise UsageError(f"--videos must be at least 2 (one of them is the broken file), got {args.videos}")
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_demo_dir()
    out = Path(args.out).expanduser() if args.out else cache / "out"
    print("berg-jax demo: the main job end to end, offline, on a SYNTHETIC model "
          "(seeded random weights -- NOT real predictions)")
    t0 = time.perf_counter()
    berg_dir, pth = _demo_model(cache)
    setup_s = time.perf_counter() - t0
    t_clips = time.perf_counter()
    videos = _demo_videos(cache / "videos", args.videos)
    clips_s = time.perf_counter() - t_clips
    print(f"sample clips: {len(videos) - 1} mp4s of {', '.join(f'{w}x{h}' for h, w in DEMO_SIZES)} "
          f"and 1 deliberately broken file, in {cache / 'videos'}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)  # the default OUT is the demo's own: start fresh
    argv = ["encode", *map(str, videos), "--berg-dir", str(berg_dir), "--subject", "1",
            "--s3d-weights", str(pth), "--out", str(out), "--nifti", "--device", args.device]
    if args.batch_size is not None:
        argv += ["--batch-size", str(args.batch_size)]
    if args.quiet:
        argv.append("--quiet")
    print("running: berg-jax " + " ".join(argv[:1] + ["<the clips above>"] + argv[1 + len(videos):]))
    t1 = time.perf_counter()
    summary = run_encode(build_parser().parse_args(argv))
    encode_s = time.perf_counter() - t1
    print()
    print_summary(summary)
    print(f"demo time: {setup_s:.1f} s model set-up, {clips_s:.1f} s writing the clips, "
          f"{encode_s:.1f} s loading the model and encoding, {time.perf_counter() - t0:.1f} s in all")
    print(demo_banner(berg_dir))
    unexpected = [p for p, _ in summary["failed"] if Path(p).name != DEMO_BROKEN]
    return EXIT_FAILED if unexpected else EXIT_OK


if __name__ == "__main__":  # python -m berg_jax.cli
    sys.exit(main())
