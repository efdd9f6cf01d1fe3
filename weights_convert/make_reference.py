"""Write the torchvision reference values the parity tests compare against.

    pip install -e ".[reference]"   # torch + torchvision, this script only
    python -m weights_convert.make_reference [--out tests/fixtures/s3d_reference.npz]

What it does, all seeded (rerunning it on the same machine and library versions gives the
same bytes):
  * S3D with `berg_jax.synthetic.random_state_dict(0)` loaded into torchvision's `s3d`;
  * four synthetic videos (`synthetic_video`) of 256x256, 360x640, 240x320 and 128x171
    pixels, sampled to 14 frames with BERG's linspace rule;
  * torchvision's S3D preprocessing (`S3D_Weights.KINETICS400_V1.transforms()`), stored
    compactly as the uint8 224x224 crop after its resize (as uint8 differences along the
    width, `decode_crop` undoes them) plus the 256-level lookup table
    of the normalised values -- the script asserts that `lut[crop]` IS torchvision's
    float32 output, bit for bit;
  * torchvision's seven taps in float32 and float64 for those four clips, stored as exact
    values at 2048 seeded positions per tap, eight seeded random-sign projections of the
    whole tap (so an error anywhere shows), and the Kinetics logits.

A second, small file (tests/fixtures/resize_reference.npz, `--part resize` writes it alone)
holds torchvision's values for the odd sizes the offline suite checks beyond those four:
  * torch's bilinear resize taps to 256 (`F.interpolate` of the identity, antialias off)
    for source sizes RESIZE_TAP_SIZES, as (256, 2) columns and float32 weights per size;
  * for seeded uint8 noise frames of ODD_SOURCES (`odd_source_frames`): SHA-256 digests of
    torchvision's preprocessed float32 output (channels-last) and of the unrounded float32
    resize crop (`F.interpolate` on the float frames), plus torchvision's uint8 crop of
    the first frame at every ODD_STRIDE-th row and column (what a mismatch is shown against).

torchvision's compiled ops need CUDA in the PyPI wheel; S3D does not use them, so the
import of their registrations is stubbed out.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np

from berg_jax.berg_files import ARRAY_GLOBALS, load_pickled_npy, pca_weights_path, subject_weights_path
from berg_jax.preprocess import sample_frame_indices
from berg_jax.s3d import TAP_NAMES
from berg_jax.synthetic import random_state_dict, synthetic_video
from berg_jax.synthetic_berg import make_berg_dir

WEIGHTS_SEED = 0
# (height, width, n_frames): the sizes BMD-like sources come in, one per resize case.
SOURCES = ((256, 256, 14), (360, 640, 30), (240, 320, 20), (128, 171, 16))
N_POSITIONS = 2048
N_PROJECTIONS = 8
# Synthetic berg_dirs (`make_berg_dir(seed=BERG_SEED, n_components=K)`) whose sklearn
# components of torchvision's float64 taps are stored, for the end-to-end encoder test.
BERG_SEED = 0
BERG_COMPONENTS = (8, 100)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "s3d_reference.npz"
DEFAULT_RESIZE_OUT = DEFAULT_OUT.with_name("resize_reference.npz")
# Source sizes (one axis) whose resize taps to 256 are stored: edge cases, non-dyadic up-
# and downscales, the common video sizes.
RESIZE_TAP_SIZES = (1, 2, 33, 34, 97, 128, 131, 171, 255, 256, 257, 268, 300, 320, 360, 480, 640, 854, 1280)
# (height, width, n_frames) of the noise clips whose preprocessing is stored by digest.
ODD_SOURCES = ((97, 131, 3), (33, 34, 2), (255, 257, 2), (268, 268, 2), (256, 300, 1), (480, 854, 1),
               (720, 1280, 1))
ODD_STRIDE = 11


def state_dict_digest(state_dict: dict[str, np.ndarray]) -> str:
    """SHA-256 over the keys and bytes, so the tests notice if the seeded weights ever change."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state_dict[key]).tobytes())
    return h.hexdigest()


def tap_positions(tap_index: int, size: int) -> np.ndarray:
    """Seeded positions (into a channels-last flattened tap) whose exact values are stored."""
    rng = np.random.default_rng(100 + tap_index)
    return np.sort(rng.choice(size, size=min(N_POSITIONS, size), replace=False)).astype(np.int64)


def tap_signs(tap_index: int, size: int) -> np.ndarray:
    """Seeded +-1 vectors (N_PROJECTIONS, size); a tap's projection is signs @ flat / sqrt(size)."""
    rng = np.random.default_rng(200 + tap_index)
    return (rng.integers(0, 2, size=(N_PROJECTIONS, size), dtype=np.int8) * 2 - 1).astype(np.int8)


def project_tap(tap_index: int, flat: np.ndarray) -> np.ndarray:
    """(B, size) channels-last flattened taps -> (B, N_PROJECTIONS) float64."""
    signs = tap_signs(tap_index, flat.shape[1]).astype(np.float64)
    return flat.astype(np.float64) @ signs.T / np.sqrt(flat.shape[1])


def sklearn_components(feats: np.ndarray, berg_dir: str | Path) -> np.ndarray:
    """StandardScaler + TruncatedSVD (spec section 8) in float64, straight from the files.

    feats: (B, F) concatenated taps, flattened channel-first. Returns (B, K) float64.
    Read with the restricted unpickler but not through `berg_jax.head`, so the reference
    shares no code with what it checks beyond the unpickling.
    """
    pca = load_pickled_npy(pca_weights_path(berg_dir), ARRAY_GLOBALS)
    mean = pca["scaler_param"]["mean_"].astype(np.float64)
    scale = pca["scaler_param"]["scale_"].astype(np.float64)
    comps = pca["pca_param"]["components_"]
    feats = np.atleast_2d(np.asarray(feats, dtype=np.float64))
    proj = np.zeros((feats.shape[0], comps.shape[0]))
    step = 1 << 18  # chunked over F: no (K, F) float64 copy of the components
    for lo in range(0, feats.shape[1], step):
        sl = slice(lo, lo + step)
        proj += ((feats[:, sl] - mean[sl]) / scale[sl]) @ comps[:, sl].astype(np.float64).T
    return proj


def sklearn_head(feats: np.ndarray, berg_dir: str | Path, subject: int) -> np.ndarray:
    """The whole sklearn head in float64: (B, F) or (F,) taps -> (B, N_s) or (N_s,) responses."""
    single = np.ndim(feats) == 1
    head = load_pickled_npy(subject_weights_path(berg_dir, subject), ARRAY_GLOBALS)
    out = regress_f64(sklearn_components(feats, berg_dir), head["coef_"], head["intercept_"])
    return out[0] if single else out


def regress_f64(components: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """LinearRegression.predict in float64: (B, K) -> (B, N_s)."""
    return components @ coef.astype(np.float64).T + intercept.astype(np.float64)


def reference_clips() -> list[np.ndarray]:
    """The four source videos, sampled to 14 frames: uint8 (14, H, W, 3) each."""
    clips = []
    for i, (h, w, t) in enumerate(SOURCES):
        video = synthetic_video(seed=10 + i, n_frames=t, height=h, width=w)
        clips.append(video[sample_frame_indices(t)])
    return clips


def odd_source_frames(i: int) -> np.ndarray:
    """Seeded uint8 noise (T, H, W, 3) of ODD_SOURCES[i]: noise makes every rounding count."""
    h, w, t = ODD_SOURCES[i]
    return np.random.default_rng(1000 + i).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def sha256_array(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def torch_resize_taps(n_in: int, n_out: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """torch's bilinear weights (n_out, n_in), read off by interpolating the identity, stored
    compactly: (n_out, 2) int16 columns (-1 where a row has one tap) and (n_out, 2) float32 weights."""
    torch, *_ = import_torchvision()
    eye = torch.eye(n_in, dtype=torch.float32).reshape(1, n_in, 1, n_in)  # one channel per source pixel
    out = torch.nn.functional.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False,
                                          antialias=False)
    m = out[0, :, 0, :].numpy().T  # (n_out, n_in)
    cols = np.full((n_out, 2), -1, np.int16)
    weights = np.zeros((n_out, 2), np.float32)
    for r in range(n_out):
        nz = np.flatnonzero(m[r])
        if not 1 <= len(nz) <= 2 or (len(nz) == 2 and nz[1] != nz[0] + 1):
            raise AssertionError(f"torch's row {r} for {n_in} -> {n_out} is not one or two adjacent taps: {nz}")
        cols[r, :len(nz)] = nz
        weights[r, :len(nz)] = m[r, nz]
    return cols, weights


def tap_matrix_from_fixture(cols: np.ndarray, weights: np.ndarray, n_in: int) -> np.ndarray:
    """The dense (n_out, n_in) float32 matrix of `torch_resize_taps`' compact form."""
    m = np.zeros((len(cols), n_in), np.float32)
    for k in range(cols.shape[1]):
        rows = np.flatnonzero(cols[:, k] >= 0)
        m[rows, cols[rows, k]] = weights[rows, k]
    return m


def resize_reference_arrays() -> dict[str, np.ndarray]:
    """The arrays of tests/fixtures/resize_reference.npz (see the module docstring)."""
    torch, torchvision, *_ = import_torchvision()
    arrays: dict[str, np.ndarray] = {}
    for n in RESIZE_TAP_SIZES:
        arrays[f"tap_cols_{n}"], arrays[f"tap_weights_{n}"] = torch_resize_taps(n)
    top = (256 - 224) // 2
    for i, (h, w, t) in enumerate(ODD_SOURCES):
        frames = odd_source_frames(i)
        out, crop, _ = torch_preprocess(frames)
        arrays[f"odd_frames_sha256_{i}"] = np.array(sha256_array(frames))
        arrays[f"odd_output_sha256_{i}"] = np.array(sha256_array(out.numpy().transpose(1, 2, 3, 0)))
        arrays[f"odd_crop_strided_{i}"] = crop[0, ::ODD_STRIDE, ::ODD_STRIDE]
        full = torch.nn.functional.interpolate(
            torch.from_numpy(frames.transpose(0, 3, 1, 2).astype(np.float32)), size=(256, 256),
            mode="bilinear", align_corners=False, antialias=False)
        unrounded = full[:, :, top:top + 224, top:top + 224].permute(0, 2, 3, 1).numpy()
        arrays[f"odd_unrounded_sha256_{i}"] = np.array(sha256_array(unrounded))
    arrays["meta"] = np.array(json.dumps({
        "resize_tap_sizes": RESIZE_TAP_SIZES, "odd_sources": ODD_SOURCES, "odd_stride": ODD_STRIDE,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
    }))
    return arrays


def decode_crop(crop_diff: np.ndarray) -> np.ndarray:
    """Undo the width-wise uint8 differences of a stored crop: (14, 224, 224, 3) uint8."""
    return np.cumsum(crop_diff, axis=2, dtype=np.uint8)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=9)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def import_torchvision():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.models.video import S3D_Weights, s3d

    return torch, torchvision, s3d, S3D_Weights, create_feature_extractor


def torch_model(state_dict: dict[str, np.ndarray]):
    torch, _, s3d, _, create_feature_extractor = import_torchvision()
    model = s3d(weights=None)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    model.eval()
    return model, create_feature_extractor(model, return_nodes=list(TAP_NAMES))


def torch_preprocess(clip: np.ndarray):
    """uint8 (14, H, W, 3) -> (torchvision's float32 (3, 14, 224, 224), its uint8 crop (14, 224, 224, 3), lut (3, 256))."""
    torch, torchvision, _, S3D_Weights, _ = import_torchvision()
    import torchvision.transforms.functional as F

    video = torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2)))  # (T, 3, H, W)
    out = S3D_Weights.KINETICS400_V1.transforms()(video)
    crop = F.center_crop(F.resize(video, [256, 256], antialias=False), [224, 224])
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 256).expand(3, 1, 256)
    lut = F.normalize(F.convert_image_dtype(levels, torch.float32), mean=[0.43216, 0.394666, 0.37645],
                      std=[0.22803, 0.22145, 0.216989])[:, 0, :]
    crop_np = crop.numpy().transpose(0, 2, 3, 1)
    from_lut = lut.numpy()[np.arange(3), crop_np].transpose(3, 0, 1, 2)  # (3, T, 224, 224)
    if not np.array_equal(from_lut, out.numpy()):
        raise AssertionError("torchvision's output is not lut[crop]; the compact fixture would be wrong")
    return out, crop_np, lut.numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resize-out", type=Path, default=DEFAULT_RESIZE_OUT)
    parser.add_argument("--part", choices=("all", "s3d", "resize"), default="all",
                        help="which fixture to write: s3d (--out), resize (--resize-out), or both")
    args = parser.parse_args(argv)
    torch, torchvision, *_ = import_torchvision()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    if args.part in ("all", "resize"):
        args.resize_out.parent.mkdir(parents=True, exist_ok=True)
        write_npz(args.resize_out, resize_reference_arrays())
        print(f"wrote {args.resize_out} ({args.resize_out.stat().st_size / 1e3:.1f} kB)")
    if args.part == "resize":
        return

    state_dict = random_state_dict(WEIGHTS_SEED)
    arrays: dict[str, np.ndarray] = {"state_dict_sha256": np.array(state_dict_digest(state_dict))}
    inputs = []
    for i, clip in enumerate(reference_clips()):
        out, crop, lut = torch_preprocess(clip)
        # Stored as wrapping differences along the width: smooth video compresses 5x better.
        arrays[f"crop_diff_{i}"] = np.diff(crop, axis=2, prepend=np.uint8(0))
        arrays["lut"] = lut
        inputs.append(out)
    batch = torch.stack(inputs)  # (4, 3, 14, 224, 224)

    model, extractor = torch_model(state_dict)
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        model.to(dtype)
        with torch.no_grad():
            taps = extractor(batch.to(dtype))
            arrays[f"logits_{tag}"] = model(batch.to(dtype)).numpy()
        for k, name in enumerate(TAP_NAMES):
            tap = taps[name].numpy().transpose(0, 2, 3, 4, 1)  # channels-last (B, T, H, W, C)
            flat = tap.reshape(tap.shape[0], -1)
            pos = tap_positions(k, flat.shape[1])
            arrays[f"positions_{k}"] = pos
            arrays[f"values_{tag}_{k}"] = flat[:, pos]
            arrays[f"proj_{tag}_{k}"] = project_tap(k, flat)
            arrays[f"maxabs_{tag}_{k}"] = np.abs(flat).max(axis=1)
        if tag == "f64":
            # BERG flattens each tap channel-first and concatenates them in TAP_NAMES order.
            feats = np.concatenate([taps[name].numpy().reshape(len(batch), -1) for name in TAP_NAMES], axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        for k in BERG_COMPONENTS:
            berg_dir = make_berg_dir(Path(tmp) / f"k{k}", subjects=(), n_components=k, seed=BERG_SEED)
            arrays[f"components_k{k}"] = sklearn_components(feats, berg_dir)
    arrays["meta"] = np.array(json.dumps({
        "weights_seed": WEIGHTS_SEED,
        "sources": SOURCES,
        "taps": TAP_NAMES,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
