"""Each precision mode's deviation from "highest" and its speed, on the device it runs on.

    python -m benchmarks.precision [--videos 32] [--device auto|cpu|gpu|tpu] [--json out.json]
                                   [--modes highest,tf32,bf16] [--batch-size B] [--repeats R]

The K=100 synthetic model (`benchmarks.common.synthetic_model`: real shapes, seeded
weights; ~1.7 GB berg_dir in ~/.cache on first use), subject 1 whole brain (108,219 voxels),
`--videos` clips of 14 x `--size` frames (`berg_jax.synthetic.synthetic_video`: drifting
colour gradients plus block noise, a different seed per clip). Every mode encodes the same
clips with `berg_jax.encoder` in batches of the device's default size (the last batch
padded); its responses are compared with "highest"'s:

* max |diff| / spread: for each voxel, the largest |mode - highest| over the videos divided
  by that voxel's across-video spread (the std over videos of "highest"'s responses);
  reported as the max over voxels and the median over voxels. 1e-2 means the mode moves a
  voxel's response by at most 1% of how much it varies between videos.
* min Pearson r: the lowest, over voxels, correlation across videos between the mode's and
  "highest"'s responses (1 = the mode ranks and scales the videos identically).
* videos/s: steady state (compilation excluded by one warm-up batch per mode), the median of
  `--repeats` passes over all clips (the modes' passes interleaved), responses copied back
  to the host.

On a CPU "tf32" equals "highest" (XLA:CPU has one float32 precision) and "bf16" is slower
(no bfloat16 matrix units); on GPUs and TPUs "tf32" and "bf16" trade accuracy for speed.
The weights are synthetic: real weights give other (usually similar) deviations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

MODES = ("highest", "tf32", "bf16")


def deviation(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """How far `got` (videos, voxels) is from `ref`, relative to ref's across-video spread."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    spread = ref64.std(axis=0)
    ok = spread > 0  # a voxel that does not vary over the videos has no spread to compare with
    ratio = np.abs(got64 - ref64).max(axis=0)[ok] / spread[ok]
    a, b = ref64[:, ok] - ref64[:, ok].mean(axis=0), got64[:, ok] - got64[:, ok].mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    r = np.where(denom > 0, (a * b).sum(axis=0) / np.where(denom > 0, denom, 1), 0.0)
    return {
        "max_diff_over_spread": float(ratio.max()),
        "median_diff_over_spread": float(np.median(ratio)),
        "min_pearson_r": float(r.min()),
        "median_pearson_r": float(np.median(r)),
        "max_abs_diff": float(np.abs(got64 - ref64).max()),
        "median_spread": float(np.median(spread)),
        "identical": bool(np.array_equal(ref, got)),
        "voxels_without_spread": int((~ok).sum()),
    }


def encode_all(fn, params, videos: np.ndarray, bs: int) -> np.ndarray:
    """All videos through `fn` in batches of `bs` (the last padded by repeating its last clip)."""
    rows = []
    for lo in range(0, len(videos), bs):
        batch = videos[lo: lo + bs]
        n = len(batch)
        if n < bs:
            batch = np.concatenate([batch, np.repeat(batch[-1:], bs - n, axis=0)])
        rows.append(np.asarray(fn(params, batch))[:n])
    return np.concatenate(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=32, help="clips to encode (default 32)")
    parser.add_argument("--size", default="256x256", metavar="HxW", help="frame size of the clips (default 256x256)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu", "tpu"))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, default highest,tf32,bf16")
    parser.add_argument("--batch-size", type=int, help="default: berg-jax's default for the device")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over all clips per mode (median)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if "highest" not in modes:
        modes.insert(0, "highest")  # the reference
    modes = sorted(set(modes), key=MODES.index)

    from benchmarks.common import machine, synthetic_model
    from berg_jax.api import BERG, encoder
    from berg_jax.synthetic import synthetic_video

    h, w = (int(x) for x in args.size.lower().split("x"))
    t0 = time.perf_counter()
    berg_dir, pth = synthetic_model()
    berg = BERG(berg_dir, s3d_weights=pth)
    videos = np.stack([synthetic_video(seed=i, n_frames=14, height=h, width=w) for i in range(args.videos)])
    print(f"machine: {machine()}")
    print(f"set-up (model files, conversion): {time.perf_counter() - t0:.1f} s")

    results: dict[str, dict] = {}
    responses: dict[str, np.ndarray] = {}
    fns: dict[str, tuple] = {}
    for mode in modes:  # load and compile every mode first, outside the timing
        t = time.perf_counter()
        model = berg.get_encoding_model("fmri-bmd-s3d", subject=1, device=args.device, precision=mode,
                                        batch_size=args.batch_size)
        fn, params = encoder(model)
        bs, k = model.batch_size, model.n_components
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        np.asarray(fn(params, videos[:bs] if len(videos) >= bs else encode_pad(videos, bs)))
        first_s = time.perf_counter() - t
        fns[mode] = (fn, params)
        results[mode] = {"load_s": load_s, "first_batch_s": first_s, "seconds_each": []}
        print(f"  {mode}: loaded in {load_s:.1f} s, first batch (compilation) {first_s:.1f} s", flush=True)
    # Timed passes interleaved (highest, tf32, bf16, highest, ...), so drift in the machine's
    # load hits every mode alike; each mode's median.
    for _ in range(max(1, args.repeats)):
        for mode in modes:
            fn, params = fns[mode]
            t = time.perf_counter()
            out = encode_all(fn, params, videos, bs)
            results[mode]["seconds_each"].append(time.perf_counter() - t)
            assert out.dtype == np.float32, out.dtype
            responses[mode] = out
    for mode in modes:
        seconds = statistics.median(results[mode]["seconds_each"])
        results[mode].update(videos_per_s=args.videos / seconds, seconds=seconds, dtype=str(responses[mode].dtype))
    for mode in modes:
        results[mode].update(deviation(responses["highest"], responses[mode]))

    import jax

    device = jax.local_devices(backend=None if args.device == "auto" else args.device)[0]
    summary = {
        "machine": machine(), "device": str(device), "device_kind": getattr(device, "device_kind", device.platform),
        "platform": device.platform, "jax_version": jax.__version__, "videos": args.videos, "size": [h, w],
        "batch_size": bs, "n_components": k, "subject": 1, "n_voxels": int(responses["highest"].shape[1]),
        "repeats": args.repeats, "modes": results,
    }
    print(f"\n{args.videos} videos of 14x{h}x{w}, K = {k} synthetic model, subject 1 whole brain "
          f"({summary['n_voxels']:,} voxels), batch {bs}, on {summary['device_kind']} ({device.platform}):")
    header = (f"{'mode':<8} {'videos/s':>9} {'max |diff|/spread':>18} {'median':>9} "
              f"{'1 - min Pearson r':>18} {'max |diff|':>11}")
    print(header)
    print("-" * len(header))
    for mode in modes:
        r = results[mode]
        if mode == "highest":
            dev = f"{'(reference)':>18}"
        elif r["identical"]:
            dev = f"{'0 (identical)':>18} {0:>9} {0:>18} {0:>11}"
        else:
            dev = (f"{r['max_diff_over_spread']:>18.2e} {r['median_diff_over_spread']:>9.2e} "
                   f"{1 - r['min_pearson_r']:>18.2e} {r['max_abs_diff']:>11.2e}")
        print(f"{mode:<8} {r['videos_per_s']:>9.2f} {dev}")
    print("max |diff|/spread: per voxel, the largest |mode - highest| over the videos divided by the "
          "voxel's std over the videos; max and median over voxels. 1 - min Pearson r: the lowest "
          "per-voxel correlation across videos with highest, as 1 - r.")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return summary


def encode_pad(videos: np.ndarray, bs: int) -> np.ndarray:
    """Fewer clips than a batch: padded to `bs` by repeating the last."""
    return np.concatenate([videos, np.repeat(videos[-1:], bs - len(videos), axis=0)])


if __name__ == "__main__":
    main()
