"""Shared set-up for the benchmarks: a cached synthetic K=100 model and process statistics."""

from __future__ import annotations

import os
import platform
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("BERG_JAX_BENCH_DIR", Path.home() / ".cache" / "berg-jax" / "bench"))


def synthetic_model(cache: Path = DEFAULT_CACHE, n_components: int = 100,
                    subjects: tuple[int, ...] = (1,)) -> tuple[Path, Path]:
    """(berg_dir, s3d .pth) with the real shapes and seeded weights, built once and reused.

    Subjects beyond sub-01 are added to the same berg_dir on first request (the 1.7 GB PCA
    is written once)."""
    from berg_jax.synthetic import random_state_dict
    from berg_jax.synthetic_berg import make_berg_dir
    from berg_jax.torch_pickle import write_torch_state_dict

    berg_dir = cache / f"berg_k{n_components}"
    pth = cache / "s3d-d76dad2f.pth"
    done = berg_dir / ".complete"
    if not done.exists():
        make_berg_dir(berg_dir, subjects=(1,), n_components=n_components, seed=0)
        done.touch()
    from berg_jax.berg_files import subject_weights_path

    missing = [s for s in subjects if not subject_weights_path(berg_dir, s).exists()]
    if missing:
        make_berg_dir(berg_dir, subjects=missing, n_components=n_components, seed=0, pca=False)
    if not pth.exists():
        write_torch_state_dict(random_state_dict(0), pth)
    return berg_dir, pth


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def machine() -> str:
    import jax

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} on {jax.devices()[0].platform}")
