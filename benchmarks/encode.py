"""Throughput of berg-jax's `BERG.encode` against BERG's PyTorch pipeline, same inputs, same weights.

    python -m benchmarks.encode [--videos 40] [--repeats 3] [--frames 20] [--batch-size B]
                                [--sizes 256x256 268x268 360x640] [--skip-torch] [--no-stages]
                                [--wait-idle S] [--json results.json]

For each source size, two fresh processes (so peak RSS is per pipeline and per size) run
the K=100 synthetic model (`benchmarks.common.synthetic_model`: BERG's real shapes, seeded
weights), subject 1, whole brain (108,219 voxels), on the same seeded random uint8 videos
(B, T, 3, H, W) -- BERG's layout:

  torch     `benchmarks.reference_pipeline`: BERG's generate_response (torchvision S3D,
            batches of 10, sklearn-equivalent head in numpy).
  berg-jax  `BERG.encode` (default batch size on CPU unless --batch-size).

Each: one warm-up call on one batch (for JAX: compile; reported separately), then
`--repeats` timed calls on all videos; videos/s is the median with [min-max]. Per-stage
times: the reference times its stages inline; for berg-jax a diagnostic pass after the
timed runs jits each stage on its own (host prep: `validate_stimulus`'s frame sampling and
the per-batch slicing; host->device: `device_put` of the (channels-moved) batch;
preprocess; backbone (extract_taps, `model.backbone_chunk` videos per call as in the fused program); projection (project_taps); regression; device->host)
and blocks after each, so nothing overlaps or fuses across stages: their sum is a
diagnostic, not the fused program's time.
The two pipelines' outputs are compared (max |diff|), as a check that both did the work.
On a shared machine, "others" is how many cores other processes kept busy during each
run (from /proc/stat minus the child's own CPU time): anything well above 0 means the
timings are contaminated; --wait-idle waits for a quiet machine before each run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.reference_pipeline import BERG_BATCH, parse_size, random_videos

DEFAULT_SIZES = ("256x256", "268x268", "360x640")
LIBRARIES = ("jax", "jaxlib", "flax", "torch", "torchvision", "numpy")
THREAD_ENV = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")


# -- children --------------------------------------------------------------------------


def _spread(times: list[float], cpu: list[float], n: int) -> dict:
    rates = sorted(n / t for t in times)
    return {"times_s": times, "videos_per_s": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "cpu_s_per_video": statistics.median(cpu) / n}


def run_torch(args: argparse.Namespace) -> dict:
    from benchmarks.common import peak_rss_mb, synthetic_model
    from benchmarks.reference_pipeline import ReferencePipeline

    berg_dir, pth = synthetic_model()
    t0 = time.perf_counter()
    ref = ReferencePipeline(berg_dir, pth, subject=1)
    load_s = time.perf_counter() - t0
    loaded_mb = peak_rss_mb()
    videos = random_videos(args.videos, args.frames, *parse_size(args.child_size))
    t0 = time.perf_counter()
    ref.encode(videos[:BERG_BATCH])
    warm_s = time.perf_counter() - t0
    times, cpu, stages = [], [], []
    for _ in range(args.repeats):
        timing: dict[str, float] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        out = ref.encode(videos, timing)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        stages.append(timing)
    if args.child_out:
        np.save(args.child_out, out)
    torch = ref.torch
    return {"load_s": load_s, "warmup_s": warm_s, "batch_size": BERG_BATCH, **_spread(times, cpu, args.videos),
            "stages_ms_per_video": {k: 1e3 * statistics.median(s[k] for s in stages) / args.videos for k in stages[0]},
            "peak_rss_mb": peak_rss_mb(), "after_load_mb": loaded_mb,
            "threads": {"torch.get_num_threads": torch.get_num_threads(),
                        "torch.get_num_interop_threads": torch.get_num_interop_threads(),
                        "mkldnn": bool(torch.backends.mkldnn.is_available())}}


def jax_stage_pass(model, videos: np.ndarray, batch_size: int) -> dict:
    """Each stage jitted on its own, blocked after each: (compile s per stage, ms/video per stage)."""
    import jax
    import jax.numpy as jnp

    from berg_jax.fused import pad_batch
    from berg_jax.head import project_taps, regress
    from berg_jax.preprocess import preprocess_frames, validate_stimulus
    from berg_jax.s3d import extract_taps

    params, prec, impl, dev = model.params, model.precision, model.conv_impl, model.device
    chunk = getattr(model, "backbone_chunk", None) or batch_size
    pre = jax.jit(jax.vmap(preprocess_frames))
    proj = jax.jit(project_taps, static_argnames="precision")
    reg = jax.jit(regress, static_argnames="precision")
    clock = time.perf_counter

    def one_batch(clips, lo, t):
        t0 = clock()
        frames = pad_batch(np.asarray(clips[lo: lo + batch_size]), batch_size)
        t1 = clock()
        x = jax.device_put(frames, dev).block_until_ready()
        t2 = clock()
        c = pre(x).block_until_ready()
        t3 = clock()
        # S3D as the fused program runs it: `backbone_chunk` videos per call (None: all).
        parts = [extract_taps(params.s3d, c[i: i + chunk], prec, impl) for i in range(0, batch_size, chunk)]
        taps = parts[0] if len(parts) == 1 else {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}
        taps = jax.block_until_ready(taps)
        t4 = clock()
        p = proj(taps, params.projection, precision=prec).block_until_ready()
        t5 = clock()
        y = reg(p, params.regression, precision=prec).block_until_ready()
        t6 = clock()
        np.asarray(y)
        t7 = clock()
        for key, dt in zip(("host prep", "host->device", "preprocess", "backbone", "projection", "regression",
                            "device->host"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
            t[key] = t.get(key, 0.0) + dt

    t0 = clock()
    clips, _ = validate_stimulus(videos)
    validate_s = clock() - t0
    compile_t: dict[str, float] = {}
    one_batch(clips, 0, compile_t)  # first call per stage: compile + one run
    t: dict[str, float] = {"host prep": validate_s}
    for lo in range(0, len(videos), batch_size):
        one_batch(clips, lo, t)
    n = len(videos)
    return {"first_call_s": compile_t, "ms_per_video": {k: 1e3 * v / n for k, v in t.items()}}


def run_jax(args: argparse.Namespace) -> dict:
    import jax

    from benchmarks.common import peak_rss_mb, synthetic_model
    from berg_jax.api import BERG

    berg_dir, pth = synthetic_model()
    t0 = time.perf_counter()
    berg = BERG(berg_dir, s3d_weights=pth)
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=1, batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    loaded_mb = peak_rss_mb()
    videos = random_videos(args.videos, args.frames, *parse_size(args.child_size))
    # BERG.encode's own rule: fewer videos than a batch compile a smaller power-of-two batch.
    bs = min(model.batch_size, 1 << max(args.videos - 1, 0).bit_length())
    t0 = time.perf_counter()
    berg.encode(model, videos[:bs], show_progress=False)
    warm_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = berg.encode(model, videos, show_progress=False)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = peak_rss_mb()
    if args.child_out:
        np.save(args.child_out, out)
    res = {"load_s": load_s, "warmup_s": warm_s, "batch_size": bs, **_spread(times, cpu, args.videos),
           "peak_rss_mb": peak, "after_load_mb": loaded_mb, "device": str(model.device), "precision": str(model.precision),
           "conv_impl": model.conv_impl, "backbone_chunk": getattr(model, "backbone_chunk", None),
           "threads": {"jax cpu devices": jax.device_count(), "cpu affinity": len(os.sched_getaffinity(0)),
                       **{k: os.environ.get(k) for k in THREAD_ENV if os.environ.get(k)}}}
    # One batch at steady state, so that the warm-up minus it estimates compilation.
    res["compile_s_est"] = warm_s - statistics.median(times) * bs / args.videos
    if not args.no_stages:
        res["stages"] = jax_stage_pass(model, videos, bs)
    return res


# -- parent ----------------------------------------------------------------------------


def busy_cpu_s() -> float:
    """CPU seconds all processes on this machine have been busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float, threshold: float = 0.2, window: float = 3.0) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores over `window` s; returns their use."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = busy_cpu_s()
        time.sleep(window)
        used = (busy_cpu_s() - b0) / window
        if used < threshold or time.monotonic() >= deadline:
            return used


def run_child(kind: str, size: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.encode", "--child", kind, "--child-size", size,
           "--child-out", str(out), "--videos", str(args.videos), "--repeats", str(args.repeats),
           "--frames", str(args.frames)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.no_stages:
        cmd.append("--no-stages")
    before = wait_idle(args.wait_idle) if args.wait_idle else None
    load0 = os.getloadavg()[0]
    ru0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"{kind} child failed for {size} (exit {res.returncode})")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["wall_s"] = wall
    r["loadavg_1min"] = (load0, os.getloadavg()[0])
    child_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # Cores other processes kept busy while this child ran: the benchmark's contamination.
    r["others_cores"] = max(0.0, (busy1 - busy0 - child_cpu) / wall)
    r["others_cores_before"] = before
    return r


def versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "-"
    return out


def _fmt_rate(r: dict) -> str:
    return f"{r['videos_per_s']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"


def print_report(results: dict, args: argparse.Namespace) -> None:
    print(f"\n{'size':>8} {'pipeline':>9} {'batch':>5} {'videos/s median [min-max]':>26} {'ms/video':>9} {'CPU s/video':>11} "
          f"{'warm-up s':>9} {'compile s':>9} {'load s':>7} {'peak RSS MB load/all':>22} {'others':>6}")
    for size, per in results.items():
        for kind in ("torch", "jax"):
            r = per.get(kind)
            if r is None:
                continue
            name = "torch" if kind == "torch" else "berg-jax"
            comp = f"{r['compile_s_est']:.1f}" if "compile_s_est" in r else "-"
            print(f"{size:>8} {name:>9} {r['batch_size']:>5} {_fmt_rate(r):>26} {1e3 / r['videos_per_s']:>9.0f} {r['cpu_s_per_video']:>11.2f} "
                  f"{r['warmup_s']:>9.1f} {comp:>9} {r['load_s']:>7.1f} {r['after_load_mb']:>12.0f} / {r['peak_rss_mb']:<7.0f} "
                  f"{r['others_cores']:>6.2f}")
        pad = -args.videos % per["jax"]["batch_size"] if "jax" in per else 0
        if pad:
            print(f"{'':>8} {'note':>9} berg-jax computed {pad} padding videos per call "
                  f"({args.videos} is not a multiple of its batch {per['jax']['batch_size']})")
        if "torch" in per and "jax" in per:
            ratio = per["jax"]["videos_per_s"] / per["torch"]["videos_per_s"]
            diff = per.get("max_abs_diff")
            extra = f"; outputs max|diff| {diff:.2e} (output std {per['out_std']:.2f})" if diff is not None else ""
            print(f"{'':>8} {'ratio':>9} berg-jax/torch = {ratio:.2f}x{extra}")

    print("(others: cores other processes kept busy during that run, of os.cpu_count(); CPU s/video: the"
          " pipeline's own CPU time, less sensitive to contention than wall time)")
    if any("torch" in per for per in results.values()):
        print("\ntorch reference, ms/video per stage (median over repeats):")
        stages = ("preprocess", "backbone", "projection", "regression")
        print(f"{'stage':>14} " + " ".join(f"{s:>9}" for s in results))
        for st in stages:
            print(f"{st:>14} " + " ".join(f"{per['torch']['stages_ms_per_video'][st]:>9.1f}" if "torch" in per else f"{'-':>9}"
                                        for per in results.values()))
    if not args.no_stages:
        print("\nberg-jax, ms/video per stage (each stage jitted alone, blocked after each; one pass):")
        keys = ("host prep", "host->device", "preprocess", "backbone", "projection", "regression", "device->host")
        print(f"{'stage':>14} " + " ".join(f"{s:>9}" for s in results) + "   first call s (compile+run, per size)")
        for k in keys:
            cells = " ".join(f"{per['jax']['stages']['ms_per_video'][k]:>9.1f}" for per in results.values())
            first = " ".join(f"{per['jax']['stages']['first_call_s'][k]:.2f}" for per in results.values())
            print(f"{k:>14} {cells}   {first}")
        print(f"{'sum of stages':>14} " + " ".join(f"{sum(per['jax']['stages']['ms_per_video'].values()):>9.1f}"
                                                     for per in results.values()))
        print(f"{'fused encode':>14} " + " ".join(f"{1e3 / per['jax']['videos_per_s']:>9.1f}" for per in results.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=40,
                        help="videos per timed call; 40 is a multiple of BERG's batch (10) and of 8, so "
                             "neither pipeline computes padding")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=20, help="frames per source video (sampled to 14)")
    parser.add_argument("--batch-size", type=int, default=None, help="berg-jax batch size (default: the model's)")
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="HxW source sizes")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--no-stages", action="store_true", help="skip berg-jax's per-stage diagnostic pass")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each run, wait up to S s for other processes to go quiet")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--child", choices=("torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        res = run_torch(args) if args.child == "torch" else run_jax(args)
        print(json.dumps(res))
        return

    from benchmarks.common import machine, synthetic_model

    synthetic_model()  # build the cache outside the measured processes
    vers = versions()
    print(f"machine: {machine()}; {platform.platform()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"threads env: " + (", ".join(f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ) or "none set")
          + f"; load average at start {os.getloadavg()[0]:.2f}")
    print(f"workload: {args.videos} videos x {args.frames} frames (uint8, (B, T, 3, H, W)), {args.repeats} repeats "
          f"after a one-batch warm-up; K=100 synthetic model, subject 1 whole brain (108,219 voxels)")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            parse_size(size)
            per: dict = {}
            kinds = ("jax",) if args.skip_torch else ("torch", "jax")
            for kind in kinds:
                print(f"  running {kind} {size} ...", file=sys.stderr, flush=True)
                per[kind] = run_child(kind, size, args, Path(tmp) / f"{kind}.npy")
            if not args.skip_torch:
                a, b = np.load(Path(tmp) / "torch.npy"), np.load(Path(tmp) / "jax.npy")
                per["max_abs_diff"] = float(np.abs(a - b).max())
                per["out_std"] = float(a.std())
            results[size] = per
    print_report(results, args)
    threads = {k: per[k]["threads"] for per in results.values() for k in ("torch", "jax") if k in per}
    print("\nthreads: " + "; ".join(f"{'berg-jax' if k == 'jax' else k}: {v}" for k, v in threads.items()))
    if args.json:
        args.json.write_text(json.dumps({"versions": vers, "machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
