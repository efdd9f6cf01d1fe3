"""S3D weights: torchvision's state_dict <-> Flax params, checked key by key, and orbax I/O.

Three forms of the same weights:
  state_dict  torchvision's flat dict, 'features.5.branch1.1.0.weight' (out, in, kT, kH, kW).
  raw params  the same numbers in Flax layout, nothing folded: per unit
              {'conv': {'kernel': (kT, kH, kW, in, out)}, 'bn': {'scale', 'bias', 'mean', 'var'}}.
              This is what the converted (orbax) checkpoint stores: lossless, re-checkable.
  params      what `berg_jax.s3d.S3D` consumes: BN folded in float64 into
              {'kernel', 'bias'} per unit, then cast to the compute dtype.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from berg_jax.errors import ModelLoadError
from berg_jax.s3d import S3D

BN_EPS = 1e-3
S3D_FILENAME = "s3d-d76dad2f.pth"
S3D_URL = f"https://download.pytorch.org/models/{S3D_FILENAME}"

Params = dict[str, Any]


def _torch_prefix(path: tuple[str, ...]) -> str:
    """Flax module path -> torchvision module prefix, e.g. ('features_5', 'branch1_1', 'spatial') -> 'features.5.branch1.1.0'."""
    named = {"spatial": "0", "temporal": "1", "branch3": "branch3.1", "classifier": "classifier.1"}
    return ".".join(named.get(part, part.replace("_", ".")) for part in path)


def _folded_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Kernel shape of every unit (and the classifier), from the model itself, keyed by module path."""
    tree = jax.eval_shape(
        S3D(with_logits=True).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 14, 224, 224, 3), jnp.float32)
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path[:-1]): leaf.shape for path, leaf in flat if path[-1].key == "kernel"}


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key torchvision's s3d state_dict holds (464) and its shape, derived from the Flax model."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, (kt, kh, kw, cin, cout) in _folded_shapes().items():
        prefix = _torch_prefix(path)
        if path == ("classifier",):
            shapes[f"{prefix}.weight"] = (cout, cin, kt, kh, kw)
            shapes[f"{prefix}.bias"] = (cout,)
            continue
        shapes[f"{prefix}.0.weight"] = (cout, cin, kt, kh, kw)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.1.{name}"] = (cout,)
        shapes[f"{prefix}.1.num_batches_tracked"] = ()
    return shapes


def state_dict_to_raw(state_dict: Mapping[str, Any], source: str = "state_dict") -> Params:
    """Check every key and shape of a torchvision s3d state_dict and rearrange it into raw Flax params.

    Raises ModelLoadError listing every missing, unexpected and misshapen key at once.
    `num_batches_tracked` (BN's step counter, unused in eval) may be absent.
    """
    expected = expected_state_dict_shapes()
    given = {k: np.asarray(v) for k, v in state_dict.items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given) - optional)
    extra = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(given[k].shape)}, expected {expected[k]}"
        for k in set(given) & set(expected)
        if tuple(given[k].shape) != expected[k]
    )
    if missing or extra or wrong:
        parts = [f"{source} is not torchvision's S3D state_dict:"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{title}: {shown}")
        raise ModelLoadError("\n  ".join(parts))

    raw: Params = {}
    for path in _folded_shapes():
        prefix = _torch_prefix(path)
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        if path == ("classifier",):
            node["kernel"] = given[f"{prefix}.weight"].transpose(2, 3, 4, 1, 0)
            node["bias"] = given[f"{prefix}.bias"]
            continue
        node["conv"] = {"kernel": given[f"{prefix}.0.weight"].transpose(2, 3, 4, 1, 0)}
        node["bn"] = {
            "scale": given[f"{prefix}.1.weight"],
            "bias": given[f"{prefix}.1.bias"],
            "mean": given[f"{prefix}.1.running_mean"],
            "var": given[f"{prefix}.1.running_var"],
        }
    return raw


def raw_to_state_dict(raw: Params) -> dict[str, np.ndarray]:
    """Inverse of `state_dict_to_raw` (num_batches_tracked omitted)."""
    out: dict[str, np.ndarray] = {}
    for path in _folded_shapes():
        node = raw
        for part in path:
            node = node[part]
        prefix = _torch_prefix(path)
        if path == ("classifier",):
            out[f"{prefix}.weight"] = np.asarray(node["kernel"]).transpose(4, 3, 0, 1, 2)
            out[f"{prefix}.bias"] = np.asarray(node["bias"])
            continue
        out[f"{prefix}.0.weight"] = np.asarray(node["conv"]["kernel"]).transpose(4, 3, 0, 1, 2)
        for flax_name, torch_name in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
            out[f"{prefix}.1.{torch_name}"] = np.asarray(node["bn"][flax_name])
    return out


def fold_batchnorm(raw: Params, dtype: Any = jnp.float32) -> Params:
    """Merge each BatchNorm into its convolution, in float64, then cast to `dtype`.

    BN(conv(x, W)) = conv(x, W * s) + (beta - mean * s) with s = gamma / sqrt(var + 1e-3).
    """
    def fold(node: Mapping[str, Any]) -> Params:
        if "bn" not in node:
            if "kernel" in node:  # the classifier: a plain conv with bias
                return {k: np.asarray(v, np.float64).astype(dtype) for k, v in node.items()}
            return {k: fold(v) for k, v in node.items()}
        bn = {k: np.asarray(v, np.float64) for k, v in node["bn"].items()}
        s = bn["scale"] / np.sqrt(bn["var"] + BN_EPS)
        kernel = np.asarray(node["conv"]["kernel"], np.float64) * s
        return {"kernel": kernel.astype(dtype), "bias": (bn["bias"] - bn["mean"] * s).astype(dtype)}

    return fold(raw)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.pth` state_dict without running pickled code (and without torch).

    Falls back to `torch.load(weights_only=True)` only if the restricted reader cannot
    parse the file and torch is installed.
    """
    from berg_jax.torch_pickle import read_torch_state_dict

    try:
        return read_torch_state_dict(path)
    except ModelLoadError as err:
        try:
            import torch
        except ImportError:
            raise err from None
        if "refusing" in str(err):  # a file that tries to run code is never handed to torch
            raise
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as torch_err:  # noqa: BLE001 - report both readers' reasons
            raise ModelLoadError(f"{path}: cannot read it as a PyTorch checkpoint ({err}; torch: {torch_err})") from None
        return {k: v.detach().cpu().numpy() for k, v in loaded.items()}


def save_raw(raw: Params, directory: str | os.PathLike) -> Path:
    """Save raw params as an orbax checkpoint directory (orbax writes to a temp dir and renames)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; remove it or choose another output path")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, jax.tree_util.tree_map(np.asarray, raw))
    return directory


def restore_raw(directory: str | os.PathLike) -> Params:
    """Restore raw params saved by `save_raw` as numpy arrays, and re-check every key and shape."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            raw = ckptr.restore(directory)
    except Exception as err:  # noqa: BLE001 - orbax raises many types; name the file instead
        raise ModelLoadError(f"{directory}: not a readable berg-jax S3D checkpoint ({err})") from None
    raw = jax.tree_util.tree_map(np.asarray, raw)
    # Round-trip through the state_dict checks so a hand-edited checkpoint fails loudly too.
    return state_dict_to_raw(raw_to_state_dict(raw), source=str(directory))


def load_s3d(path: str | os.PathLike, dtype: Any = jnp.float32) -> Params:
    """S3D params ready for `extract_taps`, from torchvision's `s3d-d76dad2f.pth` or a converted checkpoint.

    Args:
      path: a `.pth` file (torchvision's state_dict; read without torch, no pickled code run)
        or a directory written by `python -m weights_convert.s3d`.
      dtype: compute dtype of the returned params (float32; float64 needs jax_enable_x64).
    Returns:
      Folded params (BN merged into each convolution), a nested dict of jax arrays.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"S3D weights not found at {path}. Download torchvision's Kinetics-400 weights with "
            f"`berg-jax fetch --s3d` or from {S3D_URL}."
        )
    raw = restore_raw(path) if path.is_dir() else state_dict_to_raw(read_state_dict(path), source=str(path))
    return jax.tree_util.tree_map(jnp.asarray, fold_batchnorm(raw, dtype))
