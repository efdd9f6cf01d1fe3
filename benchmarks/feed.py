"""Feeding the device, measured: the host path, decoding, and (on a GPU) the whole throughput table.

    python -m benchmarks.feed host   [--sizes 256x256 360x640 720x1280] [--videos 32] [--frames 20] [--batch-size 8]
    python -m benchmarks.feed decode [--workers 1 2] [--videos 32] [--size 360x640] [--frames 60] [--videos-dir D]
    python -m benchmarks.feed gpu    --out DIR [--videos-dir D] [--k 100]

host    (any machine) `BERG.encode`'s host path with the model replaced by a function of the
        same input and output shapes that does no work (its output, (B, 108,219) float32,
        is made on the device and copied back as real responses are): ms per video, in
        BERG's (B, T, 3, H, W) layout and in (B, T, H, W, 3), beside one `np.copyto` of the
        same bytes (the 14 kept frames of a video) measured in the same run. Median of 5.
decode  (any machine) pure decoding (`read_clip` in N worker processes, and in N threads)
        against `encode_files` from the same files at the same worker count, with the
        K=8 synthetic model (decoding, not compute, is what is measured here; on a GPU host
        the `gpu` mode runs it with the K=100 model).
gpu     the whole table of the issue, each part in its own process so that a failure or a
        time-out costs only that row; every result is appended to DIR/results.jsonl as it
        comes, and DIR/table.md is written at the end:
          torch     BERG's PyTorch pipeline on the GPU (S3D on the GPU, head in numpy) and
                    plain PyTorch with the head on the GPU (strict float32 and TF32);
          main      the fused function alone (frames on the GPU) and `BERG.encode` from
                    memory at each precision, batch 32 (and tf32 at 128), the no-op host
                    path, the tail batch, decoding scaling and the pipeline from files;
          autotune  time to the first batch (cold: no compilation cache) and throughput
                    at --xla_gpu_autotune_level 4 (XLA's default), 2, 1 and 0, and the
                    allocator warnings each prints.
Rates are videos/s, median of the repeats with [min-max]; the card is named from
`jax.devices()[0].device_kind`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "fmri-bmd-s3d"
N_VOXELS_SUB1 = 108_219
# What the allocator and autotuner print when a scratch allocation fails (harmless, alarming).
ALLOCATOR_WARNING = re.compile(r"ran out of memory trying to allocate|Failed to allocate|failed to allocate",
                               re.IGNORECASE)


def _median(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def _fmt(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]"


def _append(out: Path | None, record: dict) -> None:
    print(json.dumps(record), flush=True)
    if out is not None:
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _filled(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 data with every page written (not calloc'd zero pages, which copy faster than real data)."""
    rng = np.random.default_rng(seed)
    row = rng.integers(0, 256, shape[-1] * 997, dtype=np.uint8)
    flat = np.resize(row, int(np.prod(shape)))
    return flat.reshape(shape)


# ------------------------------------------------------------------------------ host path


def noop_model(n_voxels: int, batch_size: int, device=None):
    """An EncodingModel whose encoder does no work: frames in, (B, n_voxels) float32 out, on the device."""
    import jax
    import jax.numpy as jnp

    from berg_jax.api import EncodingModel

    dev = device or jax.devices()[0]

    @jax.jit
    def nothing(frames):
        # Depends on the frames (so the transfer is waited for), costs nothing.
        return {"responses": {1: jnp.zeros((frames.shape[0], n_voxels), jnp.float32) + frames[0, 0, 0, 0, 0]}}

    class NoOp(EncodingModel):
        def encode_fn(self, *args, **kwargs):
            def fn(frames, n_valid=None):
                return nothing(frames if isinstance(frames, jax.Array) else jax.device_put(frames, dev))
            return fn

    return NoOp(model_id=MODEL, subject=1, selection=None, voxels=None, n_voxels=n_voxels, params=None,
                device=dev, precision="highest", conv_impl="2d", batch_size=batch_size, berg_dir=Path("."),
                devices=(dev,))


def host_path(sizes: list[str], n_videos: int, frames: int, batch_size: int, repeats: int = 5) -> list[dict]:
    """ms per video of `BERG.encode` around a no-op model, both layouts, and of one memcpy of the kept bytes."""
    from benchmarks.reference_pipeline import parse_size
    from berg_jax.api import BERG
    from berg_jax.preprocess import sample_frame_indices

    model = noop_model(N_VOXELS_SUB1, batch_size)
    rows = []
    for size in sizes:
        h, w = parse_size(size)
        first = _filled((n_videos, frames, 3, h, w))
        last = np.ascontiguousarray(first.transpose(0, 1, 3, 4, 2))
        kept = np.ascontiguousarray(first[:, sample_frame_indices(frames)])
        dst = np.empty_like(kept)
        row: dict = {"size": size, "frames": frames, "videos": n_videos, "batch": batch_size,
                     "bytes_per_video_kept": int(kept[0].nbytes)}
        for name, arr in (("channels_first", first), ("channels_last", last)):
            BERG.encode(None, model, arr[:batch_size], show_progress=False)  # compile, warm
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                BERG.encode(None, model, arr, show_progress=False)
                times.append(time.perf_counter() - t0)
            row[f"{name}_ms_per_video"] = 1e3 * statistics.median(times) / n_videos
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(dst, kept)
            times.append(time.perf_counter() - t0)
        row["memcpy_ms_per_video"] = 1e3 * statistics.median(times) / n_videos
        row["ratio_channels_first"] = row["channels_first_ms_per_video"] / row["memcpy_ms_per_video"]
        row["ratio_channels_last"] = row["channels_last_ms_per_video"] / row["memcpy_ms_per_video"]
        rows.append(row)
        del first, last, kept, dst
    return rows


def print_host(rows: list[dict]) -> None:
    print("\n| size | BERG layout ms/video | channels-last ms/video | memcpy ms/video | ratios |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['channels_first_ms_per_video']:.3f} | {r['channels_last_ms_per_video']:.3f} | "
              f"{r['memcpy_ms_per_video']:.3f} | {r['ratio_channels_first']:.2f} / {r['ratio_channels_last']:.2f} |")


# ------------------------------------------------------------------------------ decoding


def make_videos(directory: Path, n: int, size: str, frames: int) -> list[str]:
    from benchmarks.files import write_videos
    from benchmarks.reference_pipeline import parse_size

    directory.mkdir(parents=True, exist_ok=True)
    return write_videos(directory, n, frames, *parse_size(size))


def video_paths(videos_dir: str | None, n: int, size: str, frames: int, scratch: Path) -> list[str]:
    """n paths: the mp4s of `videos_dir` (repeated as needed), else n freshly written ones."""
    if videos_dir:
        found = sorted(str(p) for p in Path(videos_dir).glob("*.mp4"))
        if not found:
            raise SystemExit(f"no .mp4 in {videos_dir}")
    else:
        found = make_videos(scratch / "videos", min(n, 64), size, frames)
    return [found[i % len(found)] for i in range(n)]


def decode_rate(paths: list[str], workers: int, processes: bool) -> float:
    """videos/s of pure decoding (read_clip) through the prefetcher, nothing else."""
    from berg_jax import decode_workers, video

    t0 = time.perf_counter()
    n = 0
    if processes:
        batches = decode_workers.prefetch_clips(paths, 16, num_workers=workers, queue_size=2)
    else:
        batches = video.prefetch_clips(paths, 16, num_threads=workers, queue_size=2)
    for indices, clips, errors in batches:
        n += len(indices) + len(errors)
    return n / (time.perf_counter() - t0)


def pipeline_rate(model, paths: list[str], workers: int, scratch: Path) -> dict:
    from berg_jax.pipeline import encode_files

    out = Path(tempfile.mkdtemp(dir=scratch))
    t0 = time.perf_counter()
    summary = encode_files(model, paths, out, show_progress=False, decode_workers=workers)
    seconds = time.perf_counter() - t0
    return {"videos_per_s": len(paths) / seconds, "first_result_seconds": summary.get("first_result_seconds"),
            "n_ok": summary.get("n_ok")}


def decode_table(model, paths: list[str], worker_counts: list[int], scratch: Path, per_worker: int,
                 out: Path | None, pipeline: bool = True) -> list[dict]:
    rows = []
    for w in worker_counts:
        sub = paths[: min(len(paths), max(32, per_worker * w))]
        row = {"step": "decode", "workers": w, "videos": len(sub)}
        try:
            row["processes"] = decode_rate(sub, w, processes=True)
            row["threads"] = decode_rate(sub, w, processes=False)
            if pipeline and model is not None:
                row["pipeline"] = pipeline_rate(model, sub, w, scratch)["videos_per_s"]
                row["pipeline_over_decode"] = row["pipeline"] / row["processes"]
        except Exception as exc:  # noqa: BLE001 - a benchmark row, not a test
            row["error"] = f"{type(exc).__name__}: {exc}"
        _append(out, row)
        rows.append(row)
    one = next((r.get("processes") for r in rows if r["workers"] == 1 and "processes" in r), None)
    if one:
        for r in rows:
            if "processes" in r:
                r["efficiency"] = r["processes"] / (one * r["workers"])
    return rows


def print_decode(rows: list[dict]) -> None:
    print("\n| workers | processes | threads | efficiency vs linear | pipeline from files | pipeline / decode |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
        pipe = f"{r['pipeline']:.1f}" if "pipeline" in r else "-"
        ratio = f"{r['pipeline_over_decode']:.2f}" if "pipeline_over_decode" in r else "-"
        print(f"| {r['workers']} | {r.get('processes', 0):.1f} | {r.get('threads', 0):.1f} | {eff} | {pipe} | {ratio} |"
              + (f" {r['error']}" if "error" in r else ""))


def small_model(scratch: Path, k: int):
    """(berg_dir, pth) of the K=100 benchmark model, or a small K one made in scratch."""
    if k == 100:
        from benchmarks.common import synthetic_model

        return synthetic_model()
    from berg_jax.synthetic_berg import make_synthetic_model

    return make_synthetic_model(scratch / "model", subjects=(1,), n_components=k, seed=0)


# ------------------------------------------------------------------------------ GPU steps


def _rate(fn, n_videos: int, repeats: int) -> dict:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n_videos / (time.perf_counter() - t0))
    return _median(rates)


def step_torch(args: argparse.Namespace) -> None:
    """BERG's pipeline on the GPU, and plain PyTorch with the head on the GPU."""
    from benchmarks.reference_pipeline import ReferencePipeline, TorchOnDevice, random_videos

    out = Path(args.out)
    berg_dir, pth = small_model(Path(args.scratch), args.k)
    ref = ReferencePipeline(berg_dir, pth, subject=1, device=args.torch_device)
    torch = ref.torch
    torch.backends.cudnn.allow_tf32 = False  # BERG's numbers: strict float32 (torch's conv default is TF32)
    videos = random_videos(args.berg_videos, 20, 256, 256)
    ref.encode(videos[:10])  # cuDNN warm-up
    _append(out, {"step": "torch", "row": "BERG's PyTorch pipeline (S3D on GPU, head numpy)",
                  "rate": _rate(lambda: ref.encode(videos), len(videos), 2), "videos": len(videos)})
    clips = ref.preprocess(random_videos(args.videos, 20, 256, 256, seed=1))
    for tf32 in (False, True):
        plain = TorchOnDevice(ref, args.torch_device, tf32=tf32)
        dev_clips = clips.to(args.torch_device)

        def run():
            for lo in range(0, len(dev_clips), args.batch):
                plain.encode(dev_clips[lo: lo + args.batch])
            if args.torch_device == "cuda":
                torch.cuda.synchronize()

        run()
        _append(out, {"step": "torch", "row": f"plain PyTorch, head on GPU, batch {args.batch}, "
                                             f"{'TF32' if tf32 else 'float32'}",
                      "rate": _rate(run, len(dev_clips), 3), "videos": len(dev_clips)})


def step_main(args: argparse.Namespace) -> None:
    import jax

    from benchmarks.reference_pipeline import random_videos
    from berg_jax.api import BERG
    from berg_jax.preprocess import sample_frame_indices

    out, scratch = Path(args.out), Path(args.scratch)
    berg_dir, pth = small_model(scratch, args.k)
    berg = BERG(berg_dir, s3d_weights=pth)
    _append(out, {"step": "main", "device": str(jax.devices()[0]), "card": jax.devices()[0].device_kind,
                  "jax": jax.__version__})
    videos = random_videos(args.videos, 20, 256, 256)  # BERG's layout (B, T, 3, H, W)
    idx = tuple(int(i) for i in sample_frame_indices(20))
    models: dict = {}
    responses: dict[str, np.ndarray] = {}
    b, big = args.batch, args.big_batch
    for precision, bs in (("highest", b), ("tf32", b), ("bf16", b), ("tf32", big)):
        try:
            model = berg.get_encoding_model(MODEL, subject=1, precision=precision, batch_size=bs)
            models[precision, bs] = model
            fn = model.encode_fn(channels_first=True, frame_indices=idx)
            x = model.put(np.ascontiguousarray(videos[:bs]) if bs <= len(videos) else
                          np.concatenate([videos] * (-(-bs // len(videos))))[:bs])
            n = np.int32(bs)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, n))
            compile_s = time.perf_counter() - t0
            reps = max(2, args.alone_videos // bs)

            def alone():
                outs = [fn(x, n) for _ in range(reps)]
                jax.block_until_ready(outs)

            alone()
            row = {"step": "main", "row": "fused alone", "precision": precision, "batch": bs,
                   "first_call_s": compile_s, "rate": _rate(alone, reps * bs, 3)}
            if bs <= len(videos):
                berg.encode(model, videos[:bs], show_progress=False)
                row["memory_rate"] = _rate(lambda: berg.encode(model, videos, show_progress=False), len(videos), 3)
                row["memory_over_alone"] = row["memory_rate"]["median"] / row["rate"]["median"]
                if bs == b:  # the deviation from highest, on the same videos
                    responses[precision] = berg.encode(model, videos, show_progress=False)
                    if precision != "highest" and "highest" in responses:
                        from benchmarks.precision import deviation

                        row["deviation_from_highest"] = deviation(responses["highest"], responses[precision])
            _append(out, row)
        except Exception as exc:  # noqa: BLE001
            _append(out, {"step": "main", "row": "fused alone", "precision": precision, "batch": bs,
                          "error": f"{type(exc).__name__}: {exc}"[:500]})

    # The tail: a batch and a quarter (40 videos at batch 32) against one batch.
    model = models.get(("highest", b))
    if model is not None:
        try:
            n_tail = b + b // 4
            tail = np.concatenate([videos] * (-(-n_tail // len(videos))))[:n_tail]
            one = np.ascontiguousarray(tail[:b])
            berg.encode(model, tail, show_progress=False)  # compiles the tail's size
            t_tail = _rate(lambda: berg.encode(model, tail, show_progress=False), n_tail, 3)
            t_one = _rate(lambda: berg.encode(model, one, show_progress=False), b, 3)
            _append(out, {"step": "main", "row": "tail", "videos": n_tail, "batch": b,
                          "seconds_tail": n_tail / t_tail["median"], "seconds_batch": b / t_one["median"],
                          "ratio": (n_tail / t_tail["median"]) / (b / t_one["median"])})
        except Exception as exc:  # noqa: BLE001
            _append(out, {"step": "main", "row": "tail", "error": f"{type(exc).__name__}: {exc}"[:500]})

    try:
        for row in host_path(args.host_sizes, args.host_videos, 20, 32):
            _append(out, {"step": "main", "row": "host path", **row})
    except Exception as exc:  # noqa: BLE001
        _append(out, {"step": "main", "row": "host path", "error": f"{type(exc).__name__}: {exc}"[:500]})

    del videos
    if model is not None and args.videos_dir:
        paths = video_paths(args.videos_dir, args.file_videos, "360x640", 60, scratch)
        try:  # first call compiles the 360x640 program: the cold time to the first batch from files
            warm = pipeline_rate(model, paths[:32], args.workers[-1], scratch)
            _append(out, {"step": "main", "row": "files warm-up", **warm})
        except Exception as exc:  # noqa: BLE001
            _append(out, {"step": "main", "row": "files warm-up", "error": f"{type(exc).__name__}: {exc}"[:500]})
        decode_table(model, paths, args.workers, scratch, args.per_worker, out)


def step_memory(args: argparse.Namespace) -> None:
    """`BERG.encode` from memory against the fused function alone, at each transfer-thread count."""
    t_start = time.perf_counter()
    import jax

    from benchmarks.reference_pipeline import random_videos
    from berg_jax import feed
    from berg_jax.api import BERG
    from berg_jax.preprocess import sample_frame_indices

    out = Path(args.out)
    berg_dir, pth = small_model(Path(args.scratch), args.k)
    berg = BERG(berg_dir, s3d_weights=pth)
    videos = random_videos(args.videos, 20, 256, 256)
    idx = tuple(int(i) for i in sample_frame_indices(20))
    for precision in args.precisions:
        model = berg.get_encoding_model(MODEL, subject=1, precision=precision, batch_size=args.batch)
        fn = model.encode_fn(channels_first=True, frame_indices=idx)
        x, n = model.put(np.ascontiguousarray(videos[: args.batch])), np.int32(args.batch)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, n))
        first = time.perf_counter() - t0
        reps = max(2, args.alone_videos // args.batch)

        def alone():
            jax.block_until_ready([fn(x, n) for _ in range(reps)])

        alone()
        row = {"step": "memory", "precision": precision, "batch": args.batch, "first_call_s": first,
               "alone": _rate(alone, reps * args.batch, 3), "card": jax.devices()[0].device_kind,
               "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "TF_CPP"))}}
        first_out = None
        for threads in args.transfer_threads:
            feed.TRANSFER_THREADS, feed._transfer_pool = threads, None
            got = berg.encode(model, videos, show_progress=False)
            first_out = got if first_out is None else first_out
            row[f"identical_threads_{threads}"] = bool(np.array_equal(got, first_out))
            rate = _rate(lambda: berg.encode(model, videos, show_progress=False), len(videos), 3)
            row[f"memory_threads_{threads}"] = rate
            row[f"memory_over_alone_threads_{threads}"] = rate["median"] / row["alone"]["median"]
        _append(out, row)
    _append(out, {"step": "memory", "process_s": time.perf_counter() - t_start})


def step_autotune(args: argparse.Namespace) -> None:
    """One autotune level, in a fresh process (XLA_FLAGS set by the parent): cold first batch and throughput."""
    t_start = time.perf_counter()
    import jax

    from benchmarks.reference_pipeline import random_videos
    from berg_jax.api import BERG

    out = Path(args.out)
    berg_dir, pth = small_model(Path(args.scratch), args.k)
    berg = BERG(berg_dir, s3d_weights=pth)
    videos = random_videos(args.videos, 20, 256, 256)
    model = berg.get_encoding_model(MODEL, subject=1, precision=args.precision, batch_size=args.batch)
    t0 = time.perf_counter()
    berg.encode(model, videos[:args.batch], show_progress=False)
    first = time.perf_counter() - t0
    rate = _rate(lambda: berg.encode(model, videos, show_progress=False), len(videos), 3)
    _append(out, {"step": "autotune", "level": args.level, "precision": args.precision,
                  "first_batch_s": first, "process_s": time.perf_counter() - t_start, "rate": rate,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "card": jax.devices()[0].device_kind})


def _child(args: argparse.Namespace, step: str, extra: list[str], env: dict, timeout: float, name: str = "") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.feed", "step", step, "--out", args.out, "--scratch", args.scratch,
           "--k", str(args.k), "--videos", str(args.videos), *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = "timeout", (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    warnings = [line for line in stderr.splitlines() if ALLOCATOR_WARNING.search(line)]
    Path(args.scratch, f"stderr-{name or step}.txt").write_text(stderr[-200_000:])
    record = {"step": step, "name": name or step, "rc": rc, "seconds": time.perf_counter() - t0,
              "allocator_warnings": len(warnings), "warning_examples": warnings[:3],
              "stderr_tail": stderr.strip().splitlines()[-15:] if rc != 0 else []}
    _append(Path(args.out), record)
    return record


def run_gpu(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    small_model(Path(args.scratch), args.k)  # built once, before any step's clock
    _append(out, {"step": "setup", "model_s": time.perf_counter() - t0})
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base.pop("JAX_COMPILATION_CACHE_DIR", None)  # every step starts cold
    common = ["--batch", str(args.batch), "--alone-videos", str(args.alone_videos), "--big-batch", str(args.big_batch), "--torch-device", args.torch_device,
              "--host-sizes", *args.host_sizes, "--host-videos", str(args.host_videos),
              "--file-videos", str(args.file_videos), "--workers", *map(str, args.workers),
              "--per-worker", str(args.per_worker), "--berg-videos", str(args.berg_videos)]
    if args.videos_dir:
        common += ["--videos-dir", args.videos_dir]
    steps = args.steps
    if "torch" in steps:
        _child(args, "torch", common, base, args.timeout_torch)
    if "main" in steps:
        _child(args, "main", common, base, args.timeout_main)
    for level in args.levels:
        if "autotune" in steps:
            flags = (base.get("XLA_FLAGS", "") + f" --xla_gpu_autotune_level={level}").strip()
            _child(args, "autotune", ["--level", str(level), "--precision", "highest", "--batch", str(args.batch)],
                   {**base, "XLA_FLAGS": flags}, args.timeout_autotune, name=f"autotune-{level}")
    write_table(out)


def write_table(out: Path) -> None:
    """results.jsonl -> table.md (the README's table), printed too."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    lines = []
    card = next((r.get("card") for r in records if r.get("card")), "?")
    lines.append(f"card: {card}\n")
    lines.append("| path | videos/s |\n|---|---|")
    for r in records:
        if r.get("row") == "fused alone" and "rate" in r:
            lines.append(f"| fused function alone, frames on the device, {r['precision']}, batch {r['batch']} "
                         f"(first call {r['first_call_s']:.1f} s) | {_fmt(r['rate'])} |")
            if "memory_rate" in r:
                lines.append(f"| `BERG.encode` from memory, {r['precision']}, batch {r['batch']} | "
                             f"{_fmt(r['memory_rate'])} ({100 * r['memory_over_alone']:.0f}% of alone) |")
            if "deviation_from_highest" in r:
                lines.append(f"| {r['precision']} vs highest: {json.dumps(r['deviation_from_highest'])} | |")
        elif r.get("step") == "torch" and "rate" in r:
            lines.append(f"| {r['row']} | {_fmt(r['rate'])} |")
        elif r.get("row") == "tail" and "ratio" in r:
            lines.append(f"| {r['videos']} videos / {r['batch']} videos at batch {r['batch']}, time ratio "
                         f"(ideal {r['videos'] / r['batch']:.2f}) | {r['ratio']:.2f} |")
        elif r.get("step") == "decode" and "processes" in r:
            extra = f", pipeline {r['pipeline']:.1f} ({100 * r['pipeline_over_decode']:.0f}%)" if "pipeline" in r else ""
            lines.append(f"| decoding, {r['workers']} processes / threads{extra} | "
                         f"{r['processes']:.1f} / {r['threads']:.1f} |")
        elif r.get("step") == "autotune" and "rate" in r:
            lines.append(f"| autotune level {r['level']}: first batch {r['first_batch_s']:.1f} s, {r['precision']} | "
                         f"{_fmt(r['rate'])} |")
        elif r.get("row") == "host path" and "size" in r:
            lines.append(f"| no-op model host path {r['size']}: ms/video BERG layout {r['channels_first_ms_per_video']:.3f}, "
                         f"channels-last {r['channels_last_ms_per_video']:.3f}, memcpy {r['memcpy_ms_per_video']:.3f} | - |")
        elif r.get("step") in ("torch", "main", "autotune") and "rc" in r:
            lines.append(f"| ({r['name']} process: "
                         f"rc {r['rc']}, {r['seconds']:.0f} s, allocator warnings {r['allocator_warnings']}) | |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("host")
    p.add_argument("--sizes", nargs="+", default=["256x256", "360x640", "720x1280"])
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p = sub.add_parser("decode")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--size", default="360x640")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--videos-dir")
    p.add_argument("--per-worker", type=int, default=16)
    p.add_argument("--no-pipeline", action="store_true")
    for name in ("gpu", "step"):
        p = sub.add_parser(name)
        if name == "step":
            p.add_argument("name", choices=["torch", "main", "autotune", "memory"])
            p.add_argument("--precisions", nargs="+", default=["highest", "tf32"])
            p.add_argument("--transfer-threads", type=int, nargs="+", default=[1, 4, 8])
        p.add_argument("--out", required=True)
        p.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "berg-feed"))
        p.add_argument("--k", type=int, default=100)
        p.add_argument("--videos", type=int, default=160, help="in-memory videos (256x256x20)")
        p.add_argument("--berg-videos", type=int, default=40, help="videos through BERG's own (slow) pipeline")
        p.add_argument("--videos-dir", help="mp4s (360x640x60) for the decoding and file rows")
        p.add_argument("--file-videos", type=int, default=480)
        p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 14, 16])
        p.add_argument("--per-worker", type=int, default=24)
        p.add_argument("--host-sizes", nargs="+", default=["256x256", "360x640", "720x1280"])
        p.add_argument("--host-videos", type=int, default=32)
        p.add_argument("--level", type=int, default=4)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--alone-videos", type=int, default=256, help="videos per timing of the fused function alone")
        p.add_argument("--big-batch", type=int, default=128)
        p.add_argument("--torch-device", default="cuda")
        p.add_argument("--precision", default="highest")
        p.add_argument("--steps", nargs="+", default=["torch", "main", "autotune"])
        p.add_argument("--levels", type=int, nargs="+", default=[4, 1, 0])
        p.add_argument("--timeout-torch", type=float, default=90)
        p.add_argument("--timeout-main", type=float, default=300)
        p.add_argument("--timeout-autotune", type=float, default=75)
    args = parser.parse_args(argv)

    if args.mode == "host":
        rows = host_path(args.sizes, args.videos, args.frames, args.batch_size)
        for r in rows:
            print(json.dumps(r))
        print_host(rows)
    elif args.mode == "decode":
        from berg_jax.api import BERG

        scratch = Path(tempfile.mkdtemp(prefix="berg-feed-"))
        n = max(args.videos, args.per_worker * max(args.workers))
        paths = video_paths(args.videos_dir, n, args.size, args.frames, scratch)
        model = None
        if not args.no_pipeline:
            berg_dir, pth = small_model(scratch, 8)
            model = BERG(berg_dir, s3d_weights=pth).get_encoding_model(MODEL, subject=1)
            pipeline_rate(model, paths[:8], 1, scratch)  # compile
        rows = decode_table(model, paths, args.workers, scratch, args.per_worker, None, pipeline=model is not None)
        print_decode(rows)
    elif args.mode == "gpu":
        run_gpu(args)
    else:
        {"torch": step_torch, "main": step_main, "autotune": step_autotune, "memory": step_memory}[args.name](args)


if __name__ == "__main__":
    main()
