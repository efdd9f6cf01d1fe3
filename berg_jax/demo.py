"""The demo's synthetic model and sample clips: `berg-jax demo` runs the main job on them offline.

Clearly labelled SYNTHETIC: seeded random weights with the real shapes (S3D's 8.3M
parameters, F = 4,084,096 features, K = 100 components, sub-01's 108,219 voxels), so the
responses are NOT real predictions. `build_model` writes BERG-format files, a torchvision-
format S3D state_dict and the converted copy into a cache folder once; `write_videos`
writes a few mp4 clips of different sizes and one deliberately broken file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from berg_jax.errors import UsageError

DEMO_FORMAT = "berg-jax-demo/1"
DEMO_COMPONENTS = 100  # BERG's K: the demo model has the real shapes
DEMO_SIZES = ((256, 256), (360, 640), (240, 320))  # (H, W) of the sample clips, cycled
DEMO_BROKEN = "broken_truncated.mp4"
BANNER_WIDTH = 78


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "berg-jax" / "demo"



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


def build_model(cache: Path) -> tuple[Path, Path]:
    """The demo's synthetic berg_dir and S3D .pth under `cache`, built (and converted) once."""
    from berg_jax import head
    from berg_jax.atomic import atomic_write_text
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


def write_videos(folder: Path, n: int) -> list[Path]:
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
