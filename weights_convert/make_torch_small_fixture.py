"""Write a tiny real `torch.save` checkpoint and its expected values, for the torch-free reader's tests.

    pip install -e ".[reference]"   # torch, this script only
    python -m weights_convert.make_torch_small_fixture [--out-dir tests/fixtures]

Writes `torch_small.pth` (torch's zip format, a few KB) and `torch_small_expected.npz`. The
checkpoint is a real module state_dict (so it carries `_metadata` and a 0-d int64
`num_batches_tracked`) plus entries the S3D file does not have but a reader must get right:
non-contiguous views (transpose, step slice, offset row) sharing one storage, and float64,
float16, bfloat16, int32, uint8 and bool tensors. Everything is seeded: rerunning it gives the
same checkpoint bytes with the same torch version. bfloat16 is stored in the npz as float32,
which holds it exactly, because npz has no bfloat16.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import numpy as np

SEED = 0
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def build_state_dict():
    """The seeded state_dict that goes into `torch_small.pth` (torch tensors, views included)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    model = torch.nn.Sequential(OrderedDict(
        conv=torch.nn.Conv3d(3, 4, kernel_size=(1, 2, 2), bias=False),
        bn=torch.nn.BatchNorm3d(4),
    ))
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(model.conv.weight.shape, generator=gen))
        model.bn.running_mean.copy_(torch.randn(4, generator=gen))
        model.bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
        model.bn.num_batches_tracked.fill_(7)
    sd = model.state_dict()  # an OrderedDict with `_metadata`, as torchvision's files are
    base = torch.randn(6, 8, generator=gen)
    sd["proj.weight"] = base
    sd["proj.weight_t"] = base.t()  # the views share `base`'s storage and are saved with it
    sd["proj.every_other"] = base[:, ::2]
    sd["proj.row"] = base[2]  # non-zero storage offset
    sd["extra.f64"] = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    sd["extra.f16"] = torch.randn(5, generator=gen).half()
    sd["extra.bf16"] = torch.randn(5, generator=gen).bfloat16()
    sd["extra.i32"] = torch.randint(-1000, 1000, (2, 3), generator=gen, dtype=torch.int32)
    sd["extra.u8"] = torch.randint(0, 256, (4,), generator=gen, dtype=torch.uint8)
    sd["extra.mask"] = torch.rand(3, 3, generator=gen) > 0.5
    return sd


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict()
    torch.save(sd, args.out_dir / "torch_small.pth")
    expected = {
        key: (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy() for key, t in sd.items()
    }
    np.savez(args.out_dir / "torch_small_expected.npz", **expected)
    size = (args.out_dir / "torch_small.pth").stat().st_size
    print(f"wrote {len(sd)} tensors, {size} bytes, to {args.out_dir}/torch_small.pth")


if __name__ == "__main__":
    main()
