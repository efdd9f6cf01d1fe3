"""One `extract_taps` call against torchvision's S3D feature extractor, same weights, same clips.

    python -m benchmarks.backbone [--batches 1 4] [--repeats 5]

Prints the median wall time of a call (after a warm-up; JAX's compile time separately)
at each batch size, per clip, and the ratio. Needs the `reference` extra (torch).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def median_time(fn, repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), min(times), max(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.common import machine
    from berg_jax import extract_taps
    from berg_jax.synthetic import random_state_dict
    from berg_jax.weights import fold_batchnorm, state_dict_to_raw
    from weights_convert.make_reference import torch_model

    state_dict = random_state_dict(0)
    params = jax.tree_util.tree_map(jnp.asarray, fold_batchnorm(state_dict_to_raw(state_dict)))
    _, extractor = torch_model(state_dict)
    print(f"machine: {machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'torchvision s':>14} {'berg-jax s':>11} {'jax compile s':>14} "
          f"{'torch ms/clip':>14} {'jax ms/clip':>12} {'ratio':>6}")
    for b in args.batches:
        clips = np.random.default_rng(b).standard_normal((b, 14, 224, 224, 3)).astype(np.float32)
        x_jax = jnp.asarray(clips)
        x_torch = torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3)))
        start = time.perf_counter()
        jax.block_until_ready(extract_taps(params, x_jax))
        compile_s = time.perf_counter() - start
        with torch.no_grad():
            extractor(x_torch)
            t_torch = median_time(lambda: extractor(x_torch), args.repeats)
        t_jax = median_time(lambda: jax.block_until_ready(extract_taps(params, x_jax)), args.repeats)
        print(f"{b:>5} {t_torch[0]:>14.3f} {t_jax[0]:>11.3f} {compile_s:>14.1f} "
              f"{1e3 * t_torch[0] / b:>14.0f} {1e3 * t_jax[0] / b:>12.0f} {t_torch[0] / t_jax[0]:>6.2f}")


if __name__ == "__main__":
    main()
