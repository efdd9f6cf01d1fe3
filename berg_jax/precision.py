"""Numerical precision as a choice: "highest" (BERG parity, the default), "tf32" or "bf16".

    model = berg.get_encoding_model("fmri-bmd-s3d", subject=1, precision="bf16")

| name | S3D and projection | convs / dots | regression | on CPU |
|---|---|---|---|---|
| "highest" | float32 | `lax.Precision.HIGHEST` | float32, HIGHEST | the reference |
| "tf32" | float32 | `lax.Precision.DEFAULT`: TF32 on NVIDIA tensor cores, one bf16 pass on TPU | float32, DEFAULT | equals "highest" |
| "bf16" | bfloat16 weights and activations, float32 accumulation (`preferred_element_type`) | DEFAULT | float32, HIGHEST | slower than float32 |

Preprocessing is float32 in every mode (in "bf16" its output is cast to bfloat16 as S3D
reads it), and responses and components are always float32. In "bf16" the S3D weights and
the projection's per-tap weights (1.6 GB at K = 100, half that in bfloat16) are cast once
when the model is loaded (`cast_s3d`, `cast_projection`; S3D's biases stay float32); the layers also cast what they are given, so
float32 parameters work too, only slower (cast per call). `python -m benchmarks.precision`
measures each mode's deviation from "highest" and its speed.

`resolve` is the one place a name becomes what the layers need. For backwards
compatibility it also takes what berg-jax took before: `None` and `jax.lax.Precision.DEFAULT`
mean "tf32", `jax.lax.Precision.HIGHEST` means "highest".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from berg_jax.errors import InvalidParameterError

PRECISIONS: tuple[str, ...] = ("highest", "tf32", "bf16")
DEFAULT_PRECISION = "highest"


class Policy(NamedTuple):
    """What the layers of one precision mode need.

    lax_precision: the `precision=` of S3D's convolutions and the projection's dots.
    compute_dtype: S3D's weights and activations and the projection's weights (None: keep
      the input's dtype -- float32, or float64 under `jax_enable_x64`).
    accumulate: `preferred_element_type` of those convs and dots (None: the input's dtype).
    regression_precision: the `precision=` of the (K -> voxels) regression, always float32.
    """

    name: str
    lax_precision: lax.Precision
    compute_dtype: Any
    accumulate: Any
    regression_precision: lax.Precision


_POLICIES = {
    "highest": Policy("highest", lax.Precision.HIGHEST, None, None, lax.Precision.HIGHEST),
    "tf32": Policy("tf32", lax.Precision.DEFAULT, None, None, lax.Precision.DEFAULT),
    # The regression is ~0.1% of the work: kept at HIGHEST, so components stored from a bf16
    # run give the same responses through `responses_from_components` (default "highest").
    "bf16": Policy("bf16", lax.Precision.DEFAULT, jnp.bfloat16, jnp.float32, lax.Precision.HIGHEST),
}
_LEGACY = {lax.Precision.HIGHEST: "highest", lax.Precision.DEFAULT: "tf32"}


def normalize(precision: Any) -> str:
    """Any accepted precision -> its name in `PRECISIONS`; InvalidParameterError otherwise.

    Accepted: "highest" | "tf32" | "bf16" (any case), and for backwards compatibility
    `jax.lax.Precision.HIGHEST` ("highest"), `jax.lax.Precision.DEFAULT` and None ("tf32").
    """
    if precision is None:
        return "tf32"
    if isinstance(precision, lax.Precision):
        if precision in _LEGACY:
            return _LEGACY[precision]
    elif isinstance(precision, str) and precision.strip().lower() in _POLICIES:
        return precision.strip().lower()
    raise InvalidParameterError(
        f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {precision!r}: "
        "'highest' is float32 throughout (BERG parity, the default), 'tf32' lets GPUs/TPUs run "
        "float32 convolutions and matmuls in fewer passes (TF32 / one bf16 pass; on CPU it equals "
        "'highest'), 'bf16' runs S3D and the projection in bfloat16 with float32 accumulation "
        "(half the weights' memory; on an H100 no faster than 'tf32')")


def resolve(precision: Any) -> Policy:
    """A precision (name, or a legacy value: see `normalize`) -> the `Policy` the layers apply."""
    return _POLICIES[normalize(precision)]


def _cast(a: Any, dtype: Any) -> Any:
    """A floating array in `dtype`: numpy on the host (`ml_dtypes`, round to nearest even, as
    XLA's convert rounds), a jax array where it is."""
    if isinstance(a, jax.Array):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    a = np.asarray(a)
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a


def cast_s3d(params: Any, precision: Any) -> Any:
    """S3D's (folded) params as `precision` stores them: every "kernel" in the compute dtype.

    Identity for "highest" and "tf32". For "bf16" the biases stay float32: they are added to
    the float32 accumulator (and are a few KB). Do it once at load time, before
    `jax.device_put`, not per call; the layers cast a float32 kernel the same way, so the
    result is the same bits either way, only slower.
    """
    dtype = resolve(precision).compute_dtype
    if dtype is None:
        return params

    def cast(path: Any, a: Any) -> Any:
        last = path[-1] if path else None
        return _cast(a, dtype) if getattr(last, "key", None) == "kernel" else a

    return jax.tree_util.tree_map_with_path(cast, params)


def cast_projection(projection: dict[str, Any], precision: Any) -> dict[str, Any]:
    """The projection as `precision` stores it: per-tap weights in the compute dtype (half the
    1.6 GB for "bf16"), the bias float32 (it starts the float32 accumulator)."""
    dtype = resolve(precision).compute_dtype
    if dtype is None:
        return projection
    return {**projection, "weights": [_cast(w, dtype) for w in projection["weights"]]}
