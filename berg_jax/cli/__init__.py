"""`berg-jax`: the command line. Thin: parse, call the library, report.

    berg-jax encode (VIDEO_OR_FOLDER... | --inputs-from LIST|-) --berg-dir DIR
                    --subject N|N,N,...|all [--components] [--roi-means] [--no-responses]
                    [--roi NAME | --voxels MASK.npy] --out OUT [--batch-size B] [--nifti]
                    [--pad-short] [--plot] [--s3d-weights PTH] [--device auto|cpu|gpu|tpu]
                    [--precision highest|tf32|bf16] [--decoder auto|cpu|gpu|both]
                    [--distributed [--coordinator HOST:PORT --num-processes N --process-id I]]
    berg-jax merge OUT                      (after `encode --distributed`)
    berg-jax verify OUT                     (check OUT's files against its journal)
    berg-jax responses COMPONENTS.npy --berg-dir DIR --subject N|N,N,...|all --out OUT
                    [--roi-means] [--no-responses]
    berg-jax rank OUT --roi NAME [--minus-roi NAME] [--subject N | --mean-over-subjects]
                  [--top K] [--bottom] [--berg-dir DIR] [--write PATH] [--sheet PNG] [--bars DIR]
    berg-jax optimize --berg-dir DIR --subject N --roi NAME --out DIR
    berg-jax fetch  --berg-dir DIR --subjects N [N ...] [--s3d | --no-s3d]
    berg-jax info   --berg-dir DIR [--subject N] [--plot OUT.png]
    berg-jax convert --berg-dir DIR [--subjects N ...] [--force]
    berg-jax demo   [--out DIR] [--videos N] [--cache-dir DIR]

Exit status: 0 all done; 1 some input failed (a video, a download) -- the others were
still processed and the failures are listed; 2 a usage or configuration error (one line
naming the input and the fix, no traceback); 130 interrupted (Ctrl-C): re-running the
same command resumes.

One module per verb (`encode`, `merge`, `verify`, `responses`, `rank`, `optimize`, `fetch`, `info`, `convert`,
`demo`), each with `add_parser(sub)` and its `cmd_*`; what several share is in `common`.
The verbs do not import each other; `build_parser` wires them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

from berg_jax.cli import convert, demo, encode, fetch, info, merge, optimize, rank, responses, verify
from berg_jax.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from berg_jax.errors import BERGError, DownloadError, UsageError

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser",
           "enable_compilation_cache", "fit_gpu_memory_pool", "main"]


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from berg_jax import __version__

    parser = argparse.ArgumentParser(
        prog="berg-jax",
        description="BERG's fmri-bmd-s3d in silico fMRI encoding model (video -> voxel responses) in JAX.",
        epilog="Exit status: 0 ok, 1 some input failed, 2 usage/config error, 130 interrupted "
               "(re-run the same command to resume).",
    )
    parser.add_argument("--version", action="version", version=f"berg-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    encode_parser = encode.add_parser(sub)
    merge.add_parser(sub)
    verify.add_parser(sub)
    optimize.add_parser(sub)
    responses.add_parser(sub)
    rank.add_parser(sub)
    fetch.add_parser(sub)
    info.add_parser(sub)
    convert.add_parser(sub)
    demo.add_parser(sub, encode_parser)
    return parser


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints usage + one line, exits 2
    from berg_jax.writer import OutputDirError

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
