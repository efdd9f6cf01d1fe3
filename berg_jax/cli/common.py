"""What several verbs share: exit statuses, the model and selection arguments, small helpers.

Argument builders only add arguments to a parser; the library is imported inside the
functions that need it, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from berg_jax.errors import UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_model_args(p: argparse.ArgumentParser, subject_help: str = "BMD subject 1..10",
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


def add_selection_args(p: argparse.ArgumentParser) -> None:
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


def file_size(path: Path) -> str:
    """`path`'s size for people (B, KB, MB, GB; powers of 1000), or "missing"."""
    try:
        n = path.stat().st_size
    except OSError:
        return "missing"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
