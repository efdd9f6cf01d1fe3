"""clip -> taps: S3D (Xie et al. 2018, "Rethinking spatiotemporal feature learning"), as torchvision builds it.

Channels-last throughout: a clip is (N, T, H, W, C), float32 (or float64 under
`jax_enable_x64`), already preprocessed (see `berg_jax.preprocess`). The model returns a
dict of the seven activations the encoding model reads, keyed by torchvision's node
names, and optionally the Kinetics-400 logits.

Every "unit" is Conv3d(bias=False) -> BatchNorm3d(eps=1e-3) -> ReLU. The parameters this
module holds are the *folded* form, BN already merged into the convolution
(kernel (kT, kH, kW, in, out), bias (out,)); `berg_jax.weights` does the folding in
float64 when it loads torchvision's state_dict.

S3D's convolutions are separable: (1, k, k) over space, then (k, 1, 1) over time, and 1x1x1
inside the inception blocks. XLA:CPU runs true 3-D convolutions slowly, so by default
each is lowered to the cheaper equivalent op (`conv_impl="2d"`): a 2-D convolution over
frames for (1, k, k), a 2-D convolution over (time, pixels) for (k, 1, 1), and a matmul for
1x1x1. `conv_impl="3d"` keeps the literal 3-D form; the tests check that both agree.

`precision` ("highest" | "tf32" | "bf16", see `berg_jax.precision`) sets each convolution's
`lax.Precision` and, for "bf16", the compute dtype: the clip, the weights and the activations
in bfloat16, every convolution accumulating in float32 (`preferred_element_type`), the bias
and ReLU applied in float32 and the result rounded to bfloat16 once.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from berg_jax.precision import resolve as resolve_precision

# "highest" | "tf32" | "bf16" (`berg_jax.precision`); None or a jax.lax.Precision (legacy).
Precision = Any

# The seven activations BERG's feature extractor returns, in the order they are
# flattened and concatenated (spec section 5).
TAP_NAMES: tuple[str, ...] = (
    "features.2",
    "features.5.cat",
    "features.7",
    "features.9.cat",
    "features.11.cat",
    "features.13",
    "avgpool",
)

# Channels-last tap shapes (T, H, W, C) for a 14x224x224 clip.
TAP_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "features.2": (7, 56, 56, 64),
    "features.5.cat": (7, 28, 28, 256),
    "features.7": (4, 14, 14, 480),
    "features.9.cat": (4, 14, 14, 512),
    "features.11.cat": (4, 14, 14, 528),
    "features.13": (2, 7, 7, 832),
    "avgpool": (1, 1, 1, 1024),
}

# Inception blocks: index in torchvision's `features` -> (in, b0, b1 mid, b1, b2 mid, b2, b3).
INCEPTION_BLOCKS: dict[int, tuple[int, int, int, int, int, int, int]] = {
    5: (192, 64, 96, 128, 16, 32, 32),
    6: (256, 128, 128, 192, 32, 96, 64),
    8: (480, 192, 96, 208, 16, 48, 64),
    9: (512, 160, 112, 224, 24, 64, 64),
    10: (512, 128, 128, 256, 24, 64, 64),
    11: (512, 112, 144, 288, 32, 64, 64),
    12: (528, 256, 160, 320, 32, 128, 128),
    14: (832, 256, 160, 320, 32, 128, 128),
    15: (832, 384, 192, 384, 48, 128, 128),
}

N_CLASSES = 400
CONV_IMPLS = ("2d", "3d")


def pointwise(x: jax.Array, kernel: jax.Array, precision: Precision = None) -> jax.Array:
    """A 1x1x1 convolution as a matmul over channels: (N, T, H, W, Cin) @ (Cin, Cout).

    As `conv3d`: x's dtype, or float32 accumulation of bfloat16 operands for "bf16".
    """
    pol = resolve_precision(precision)
    if pol.compute_dtype is not None:
        x, kernel = x.astype(pol.compute_dtype), kernel.astype(pol.compute_dtype)
    return lax.dot_general(x, kernel, (((4,), (0,)), ((), ())), precision=pol.lax_precision,
                           preferred_element_type=pol.accumulate)


def conv3d(
    x: jax.Array,
    kernel: jax.Array,
    stride: Sequence[int],
    padding: Sequence[int],
    precision: Precision = None,
    conv_impl: str = "2d",
) -> jax.Array:
    """A 3-D convolution, channels-last, with symmetric zero padding.

    Args:
      x: (N, T, H, W, Cin).
      kernel: (kT, kH, kW, Cin, Cout).
      stride, padding: per axis (t, h, w); padding is symmetric, never 'SAME' (XLA's SAME
        pads asymmetrically for stride 2, torch does not).
      precision: "highest" | "tf32" | "bf16" (or a legacy value, `berg_jax.precision`).
      conv_impl: "2d" lowers separable kernels to 2-D convolutions / matmuls; "3d" never does.
    Returns:
      (N, T', H', W', Cout): x's dtype, or the accumulation dtype (float32) for "bf16", where
      x and the kernel are cast to bfloat16 first (a no-op when they already are).
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    pol = resolve_precision(precision)
    precision, acc = pol.lax_precision, pol.accumulate
    if pol.compute_dtype is not None:
        x, kernel = x.astype(pol.compute_dtype), kernel.astype(pol.compute_dtype)
    kt, kh, kw, cin, cout = kernel.shape
    st, sh, sw = stride
    pt, ph, pw = padding
    n, t, h, w, _ = x.shape
    if conv_impl == "2d":
        if (kt, kh, kw, st, sh, sw, pt, ph, pw) == (1, 1, 1, 1, 1, 1, 0, 0, 0):
            return pointwise(x, kernel[0, 0, 0], pol.name)
        if kt == 1 and st == 1 and pt == 0:
            # (1, k, k): every frame is an independent 2-D image.
            y = lax.conv_general_dilated(
                x.reshape(n * t, h, w, cin), kernel[0], (sh, sw), ((ph, ph), (pw, pw)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision, preferred_element_type=acc,
            )
            return y.reshape(n, t, *y.shape[1:])
        if kh == kw == 1 and sh == sw == 1 and ph == pw == 0:
            # (k, 1, 1): a 2-D convolution over (time, pixel) with a k x 1 kernel.
            y = lax.conv_general_dilated(
                x.reshape(n, t, h * w, cin), kernel[:, 0], (st, 1), ((pt, pt), (0, 0)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision, preferred_element_type=acc,
            )
            return y.reshape(n, y.shape[1], h, w, cout)
    return lax.conv_general_dilated(
        x, kernel, tuple(stride), tuple((p, p) for p in padding),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision, preferred_element_type=acc,
    )


def bias_relu(y: jax.Array, bias: jax.Array, precision: Precision = None) -> jax.Array:
    """ReLU(y + bias), in y's dtype (the accumulator), then rounded to the compute dtype ("bf16")."""
    out = nn.relu(y + bias)
    dtype = resolve_precision(precision).compute_dtype
    return out if dtype is None else out.astype(dtype)


def max_pool3d(x: jax.Array, window: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> jax.Array:
    """torch's MaxPool3d (floor mode): padding counts as -inf, so it never wins.

    A stride-1 window is taken one axis at a time (3 + 3 + 3 comparisons instead of
    27 for the inception blocks' 3x3x3 pool): max is separable and -inf padding commutes
    with it, so the result is identical.
    """
    def pool(x, window, stride, padding):
        return lax.reduce_window(
            x, -jnp.inf, lax.max, (1, *window, 1), (1, *stride, 1),
            ((0, 0), *((p, p) for p in padding), (0, 0)),
        )

    if tuple(stride) != (1, 1, 1):
        return pool(x, window, stride, padding)
    for axis in range(3):
        if window[axis] > 1:
            w, p = [1, 1, 1], [0, 0, 0]
            w[axis], p[axis] = window[axis], padding[axis]
            x = pool(x, w, (1, 1, 1), p)
    return x


class Unit(nn.Module):
    """Conv3d -> BatchNorm3d -> ReLU, with BN folded into (kernel, bias)."""

    features: int
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (0, 0, 0)
    precision: Precision = None
    conv_impl: str = "2d"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features), x.dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        y = conv3d(x, kernel, self.stride, self.padding, self.precision, self.conv_impl)
        return bias_relu(y, bias, self.precision)


class TemporalSeparableConv(nn.Module):
    """(1, k, k) unit over space, then (k, 1, 1) unit over time (torchvision's names: .0, .1)."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    precision: Precision = None
    conv_impl: str = "2d"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        x = Unit(self.features, (1, k, k), (1, s, s), (0, p, p), self.precision, self.conv_impl, name="spatial")(x)
        return Unit(self.features, (k, 1, 1), (s, 1, 1), (p, 0, 0), self.precision, self.conv_impl, name="temporal")(x)


class SepInceptionBlock3D(nn.Module):
    """Four branches concatenated on channels: 1x1x1; 1x1x1 -> sep3; 1x1x1 -> sep3; maxpool3 -> 1x1x1.

    With conv_impl="2d" the three 1x1x1 units that read the block's input (branch0,
    branch1.0, branch2.0) run as one matmul over their concatenated kernels: one pass over
    the input instead of three, and one wide matmul instead of three narrow ones (the
    16-wide branch2.0 is a poor matmul alone). The parameters stay per unit.
    """

    b0: int
    b1_mid: int
    b1: int
    b2_mid: int
    b2: int
    b3: int
    precision: Precision = None
    conv_impl: str = "2d"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        sep3 = lambda f, name: TemporalSeparableConv(f, 3, 1, 1, self.precision, self.conv_impl, name=name)
        widths = (self.b0, self.b1_mid, self.b2_mid)
        units = [self.param(name, _unit_init((1, 1, 1, x.shape[-1], f), x.dtype))
                 for name, f in zip(("branch0", "branch1_0", "branch2_0"), widths)]
        if self.conv_impl == "2d":
            kernel = jnp.concatenate([u["kernel"][0, 0, 0] for u in units], axis=-1)
            bias = jnp.concatenate([u["bias"] for u in units])
            y = bias_relu(pointwise(x, kernel, self.precision), bias, self.precision)
            x0, m1, m2 = jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=-1)
        else:
            x0, m1, m2 = (bias_relu(conv3d(x, u["kernel"], (1, 1, 1), (0, 0, 0), self.precision, "3d"), u["bias"],
                                    self.precision) for u in units)
        x1 = sep3(self.b1, "branch1_1")(m1)
        x2 = sep3(self.b2, "branch2_1")(m2)
        pooled = max_pool3d(x, (3, 3, 3), (1, 1, 1), (1, 1, 1))
        x3 = Unit(self.b3, (1, 1, 1), precision=self.precision, conv_impl=self.conv_impl, name="branch3")(pooled)
        return jnp.concatenate([x0, x1, x2, x3], axis=-1)


def _unit_init(kernel_shape: tuple[int, ...], dtype: Any):
    """Initialiser of one unit's {kernel, bias}, the same tree a `Unit` submodule has."""
    def init(key: jax.Array) -> dict[str, jax.Array]:
        kernel = nn.initializers.lecun_normal()(key, kernel_shape, dtype)
        return {"kernel": kernel, "bias": jnp.zeros(kernel_shape[-1:], dtype)}
    return init


class Classifier(nn.Module):
    """Dropout (identity in eval) -> 1x1x1 Conv3d with bias -> mean over (T, H, W): (N, 1, 1, 1, C) -> (N, classes)."""

    classes: int
    precision: Precision = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, 1, x.shape[-1], self.classes), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.classes,), x.dtype)
        y = pointwise(x, kernel[0, 0, 0], self.precision) + bias
        return jnp.mean(y, axis=(1, 2, 3))


class S3D(nn.Module):
    """torchvision's `s3d` (Kinetics-400) as a Flax module.

    Attributes:
      precision: "highest" (float32 parity on GPU/TPU), "tf32" (float32, fewer passes on
        GPU/TPU; None means this, as lax's default) or "bf16" (bfloat16 weights and
        activations, float32 accumulation; the taps come out bfloat16); see
        `berg_jax.precision`.
      conv_impl: "2d" (fast lowering of separable convolutions) or "3d" (literal).
      with_logits: also compute the Kinetics-400 logits (N, 400) under key "logits".

    Call: clips (N, 14, 224, 224, 3) float -> {tap name: (N, T, H, W, C)} (shapes in
    `TAP_SHAPES`), plus "logits" when asked.
    """

    precision: Precision = None
    conv_impl: str = "2d"
    with_logits: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        p, impl = self.precision, self.conv_impl
        dtype = resolve_precision(p).compute_dtype
        if dtype is not None:  # "bf16": the float32 preprocessed clip is rounded once, here
            x = x.astype(dtype)
        inception = lambda i: SepInceptionBlock3D(*INCEPTION_BLOCKS[i][1:], p, impl, name=f"features_{i}")
        taps: dict[str, jax.Array] = {}
        x = TemporalSeparableConv(64, 7, 2, 3, p, impl, name="features_0")(x)
        x = max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))  # features.1
        x = taps["features.2"] = Unit(64, (1, 1, 1), precision=p, conv_impl=impl, name="features_2")(x)
        x = TemporalSeparableConv(192, 3, 1, 1, p, impl, name="features_3")(x)
        x = max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))  # features.4
        x = taps["features.5.cat"] = inception(5)(x)
        x = inception(6)(x)
        x = taps["features.7"] = max_pool3d(x, (3, 3, 3), (2, 2, 2), (1, 1, 1))
        x = inception(8)(x)
        x = taps["features.9.cat"] = inception(9)(x)
        x = inception(10)(x)
        x = taps["features.11.cat"] = inception(11)(x)
        x = inception(12)(x)
        x = taps["features.13"] = max_pool3d(x, (2, 2, 2), (2, 2, 2), (0, 0, 0))
        x = inception(14)(x)
        x = inception(15)(x)
        # AvgPool3d((2, 7, 7), stride 1) on a (2, 7, 7) map: one mean per channel.
        x = taps["avgpool"] = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        if self.with_logits:
            taps["logits"] = Classifier(N_CLASSES, p, name="classifier")(x)
        return taps


@functools.partial(jax.jit, static_argnames=("precision", "conv_impl", "with_logits"))
def extract_taps(
    params: Any,
    clips: jax.Array,
    precision: Precision = None,
    conv_impl: str = "2d",
    with_logits: bool = False,
) -> dict[str, jax.Array]:
    """The seven S3D activations BERG's encoding model reads.

    Args:
      params: folded S3D params (`berg_jax.load_s3d`).
      clips: preprocessed clips (B, 14, 224, 224, 3) float32 (`berg_jax.preprocess`).
      precision: "highest" for float32 parity on GPU/TPU, "tf32" or "bf16" (`berg_jax.precision`);
        None (lax's default) is "tf32".
      conv_impl: "2d" (fast, default) or "3d" (literal 3-D convolutions).
      with_logits: also return the Kinetics-400 logits (B, 400) as "logits".
    Returns:
      {tap name: (B, T, H, W, C)} in `TAP_NAMES`, channels-last, the clips' dtype (bfloat16
      for "bf16"; the logits are float32 there).
    """
    return S3D(precision, conv_impl, with_logits).apply({"params": params}, clips)
