"""Measure where decord's frames differ from PyAV's, per kind of stream, and what PyAV costs.

    python -m weights_convert.video_kinds [--keep DIR] [--no-timing]

Writes every kind of `tests.video_fixtures.STREAM_KINDS` this PyAV build can encode
(64x96, 20 frames of saturated hue wheels, real encoders: libx264, libx265, libvpx,
libsvtav1, mpeg4, mpeg2video, mjpeg, prores_ks, ffv1, huffyuv, utvideo, gif), then decodes
each with decord 0.6.0 (`VideoReader(num_threads=1).get_batch`, BERG's reader) and with
PyAV (`frame.to_ndarray(format="rgb24")`, FFmpeg's swscale conversion) and prints one
markdown row per kind:

* decord - PyAV over all frames: max and mean |difference| in 0..255 levels, or why
  they cannot be compared (decord fails, other frame shape);
* whether decord's frames at BERG's 14 sampled indices are the right frames (each
  matched to its nearest PyAV frame), and whether both count the same frames;
* `video.pyav_reason`: why `read_clip` sends the kind to PyAV (empty: decord reads it);
* whether `read_clip` (backend "auto") returns exactly `read_clip(backend="pyav")`.

torchvision's `read_video` (what BERG's training ran) converted with PyAV's
`frame.to_rgb().to_ndarray()`; the script checks that this equals `to_ndarray(format=
"rgb24")` for every kind, so the PyAV column is torchvision's frames under this PyAV.
torchvision >= 0.24 no longer ships `read_video` (TorchCodec replaced it), so it is not
called. Run it under another PyAV (`PYTHONPATH=/path/to/av16 python -m ...`) to see
how the colour tags change with the PyAV version.

Timing: `read_clip` on a 360x640, 60-frame libx264 yuv420p clip with each backend (one
decoder thread each; fastest wall time and median CPU time of 11 runs), and the probe
alone (`pyav_reason`), which the decord backend runs on every file to decide the routing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.video_fixtures holds the kinds the tests use too

import av  # noqa: E402
import decord  # noqa: E402

from berg_jax import video  # noqa: E402
from berg_jax.errors import VideoReadError  # noqa: E402
from berg_jax.preprocess import sample_frame_indices  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402


def pyav_frames(path: str) -> tuple[np.ndarray | None, str]:
    """All frames as PyAV converts them (None and the reason where it cannot), plus a note."""
    frames, note = [], ""
    with av.open(path) as container:
        for frame in container.decode(video=0):
            try:
                rgb = frame.to_ndarray(format="rgb24")
            except av.error.FFmpegError as exc:
                return None, f"PyAV cannot convert: {exc}"
            if not np.array_equal(frame.to_rgb().to_ndarray(), rgb):
                note = "to_rgb() differs from to_ndarray(rgb24)!"
            frames.append(rgb)
    return np.stack(frames), note


def decord_message(exc: Exception) -> str:
    # decord's first line: "[time] file.cc:line: [path] <what>" or "... Check failed: ... ERROR <what>".
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (line.split("ERROR", 1)[1] if "ERROR" in line else line.rsplit("] ", 1)[-1]).strip()[:60]


def decord_all(path: str) -> np.ndarray:
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    try:
        return vr.get_batch(list(range(len(vr)))).asnumpy()
    finally:
        del vr


def decord_sampled(path: str) -> tuple[int, np.ndarray]:
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    try:
        n = len(vr)
        return n, vr.get_batch([int(i) for i in sample_frame_indices(n)]).asnumpy()
    finally:
        del vr


def right_frames(sampled: np.ndarray, reference: np.ndarray) -> bool:
    """Whether each sampled frame is nearest to the reference frame at its linspace index."""
    want = [int(i) for i in sample_frame_indices(len(reference))]
    ref = reference.astype(np.int16)
    got = [int(np.argmin(np.abs(ref - f.astype(np.int16)).mean(axis=(1, 2, 3)))) for f in sampled]
    return got == want


def measure(kind: vf.StreamKind, folder: str) -> list[str]:
    path = kind.write(folder)
    ref, note = pyav_frames(path)
    reason = video.pyav_reason(path) or ""
    try:
        dec = decord_all(path)
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        diff, frames = f"decord fails: {decord_message(exc)}", "-"
    else:
        # Counter-clockwise degrees: the display matrix's convention; a rotate tag is clockwise.
        ccw = (kind.rotation - int(float(kind.rotate_tag or 0))) % 360
        turned = np.rot90(ref, ccw // 90, axes=(1, 2)) if ref is not None and ccw else None
        if ref is None:
            diff, frames = note, "-"
            note = ""
        elif turned is not None and dec.shape == turned.shape and np.array_equal(dec, turned):
            diff, frames = f"= PyAV turned {ccw} degrees counter-clockwise", "-"
        elif dec.shape != ref.shape:
            diff = f"shape {dec.shape[1:3]} vs {ref.shape[1:3]}"
            frames = "-"
        else:
            d = np.abs(dec.astype(np.int16) - ref.astype(np.int16))
            diff = f"{d.max()} / {d.mean():.3f}"
            n, sampled = decord_sampled(path)
            right = n == len(ref) and right_frames(sampled, ref)
            frames = "yes" if right else f"NO (decord {n}, PyAV {len(ref)} frames)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            auto = video.read_clip(path)
            same = "yes" if np.array_equal(auto, video.read_clip(path, backend="pyav")) else "NO"
        except VideoReadError as exc:
            same = f"PyAV raises ({str(exc).split(': ', 1)[1][:30]}...)"
    tag_list = [kind.matrix, kind.colour_range, f"display matrix {kind.rotation}" if kind.rotation else "",
            f"rotate tag {kind.rotate_tag}" if kind.rotate_tag else ""]
    tags = ", ".join(t for t in tag_list if t)
    return [kind.name, f"{kind.codec} {kind.pix_fmt} {tags}".strip(), diff, frames, reason, same, note]


def timing(folder: str, repeats: int = 11) -> dict[str, tuple[float, float]]:
    """{what: (fastest wall time, median CPU time of all threads)} in seconds.

    The fastest wall time and the CPU time are the figures a shared machine disturbs least.
    """
    path = vf.write_kind(Path(folder) / "timing.mp4", "libx264", "yuv420p", n_frames=60, height=360,
                         width=640, fps=30, options={"preset": "medium", "crf": "23"})
    calls = {
        "decord": lambda: video.read_clip(path, backend="decord"),
        "pyav": lambda: video.read_clip(path, backend="pyav"),
        "decord alone": lambda: decord_sampled(path),
        "probe": lambda: video.pyav_reason(path),
    }
    walls: dict[str, list[float]] = {name: [] for name in calls}
    cpus: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm the page cache and the libraries
    for _ in range(repeats):  # interleaved, so that a busy spell hits every reader alike
        for name, fn in calls.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpus[name].append(time.process_time() - c)
            walls[name].append(time.perf_counter() - w)
    return {name: (min(walls[name]), statistics.median(cpus[name])) for name in calls}


def report(folder: str, with_timing: bool) -> None:
    libavcodec = ".".join(map(str, av.library_versions["libavcodec"]))
    print(f"decord {decord.__version__}, PyAV {av.__version__} (libavcodec {libavcodec})\n")
    print("| kind | stream | decord - PyAV max / mean | sampled frames right | routed to PyAV because | "
          "read_clip == PyAV | note |")
    print("|---|---|---|---|---|---|---|")
    for kind in vf.STREAM_KINDS:
        missing = kind.missing()
        if missing:
            row = [kind.name, f"{kind.codec} {kind.pix_fmt}", f"not produced: {missing}", "", "", "", ""]
        else:
            row = measure(kind, folder)
        print("| " + " | ".join(row) + " |", flush=True)
    if with_timing:
        t = {name: (wall * 1e3, cpu * 1e3) for name, (wall, cpu) in timing(folder).items()}
        print("\nread_clip of a 360x640, 60-frame libx264 yuv420p clip (crf 23, B-frames), one decoder "
              "thread, 11 runs (ms, fastest wall / median CPU):")
        labels = [("decord", "decord backend (probe + decord)"), ("probe", "  of which the probe"),
                  ("decord alone", "  decord VideoReader + get_batch alone"), ("pyav", "PyAV backend")]
        for name, label in labels:
            print(f"  {label:40s} {t[name][0]:6.1f} / {t[name][1]:6.1f}")
        print(f"  PyAV / decord backend: {t['pyav'][0] / t['decord'][0]:.2f}x wall, "
              f"{t['pyav'][1] / t['decord'][1]:.2f}x CPU")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="write the files here and keep them (default: temp dir)")
    parser.add_argument("--no-timing", action="store_true", help="skip the read_clip timing")
    args = parser.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        report(args.keep, not args.no_timing)
    else:
        with tempfile.TemporaryDirectory(prefix="video_kinds_") as folder:
            report(folder, not args.no_timing)


if __name__ == "__main__":
    main()
