"""Convert torchvision's S3D state_dict into a berg-jax (orbax) checkpoint.

    python -m weights_convert.s3d ~/.cache/torch/hub/checkpoints/s3d-d76dad2f.pth s3d_flax/

The `.pth` is read without torch and without running pickled code. Every key and shape
is checked against the Flax model; a missing, extra or misshapen key fails with its name.
The checkpoint keeps the weights unfolded (conv kernels and BN statistics in Flax
layout); `berg_jax.load_s3d` folds BN into the convolutions when it loads either form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from berg_jax.errors import ModelLoadError
from berg_jax.weights import read_state_dict, save_raw, state_dict_to_raw


def convert(pth: str | Path, out: str | Path) -> Path:
    """Read `pth`, check it, and write the orbax checkpoint directory `out` (which must not exist)."""
    raw = state_dict_to_raw(read_state_dict(pth), source=str(pth))
    return save_raw(raw, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert.s3d", description=__doc__.split("\n")[0])
    parser.add_argument("pth", type=Path, help="torchvision's s3d-d76dad2f.pth (or any S3D state_dict)")
    parser.add_argument("out", type=Path, help="output checkpoint directory (must not exist)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.pth, args.out)
    except (ModelLoadError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
