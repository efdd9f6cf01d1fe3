"""The PyTorch reference: fmri-bmd-s3d exactly as BERG runs it, with per-stage timings.

    python -m benchmarks.reference_pipeline [--videos 10] [--frames 20] [--size 256x256]

BERG's `generate_response` (spec section 9, `berg/models/fmri/bmd_s3d.py`), step by step:
  1. sample 14 frames per video with `np.linspace(0, T-1, 14, dtype=int)` (`stimulus[:, idx]`);
  2. preprocess the WHOLE input at once, in memory: torchvision's
     `S3D_Weights.KINETICS400_V1.transforms()` on the uint8 (B, 14, 3, H, W) tensor
     (resize 256x256 without antialias, crop 224, /255, normalise; -> (B, 3, 14, 224, 224));
  3. batches of 10 videos through `create_feature_extractor(s3d, 7 taps)` under
     `torch.no_grad()`; each tap flattened channel-first, `torch.hstack` -> (10, 4,084,096)
     float32 -> numpy;
  4. per batch, the sklearn head on the CPU, written out here in numpy with sklearn's exact
     semantics: StandardScaler.transform (a float32 copy, `-= mean.astype(f32)`,
     `/= scale.astype(f32)`), TruncatedSVD.transform (`z @ components_.T`, float32 as BERG
     stores them), `.astype(float32)`, LinearRegression.predict (`p @ coef_.T +
     intercept_`), `.astype(float32)`, `np.append` to the previous batches.
sklearn's input validation (a finiteness pass over each array) is left out; the maths and
dtypes are the same. The backbone's weights are the seeded synthetic .pth (same shapes as
torchvision's Kinetics-400 file), the head is read from a (synthetic) berg_dir through
`berg_jax.berg_files` (plain file reading).

Stages timed separately (seconds, summed over batches): preprocess (sampling + transforms),
backbone (extractor + flatten/hstack + to numpy), projection (scaler + PCA), regression.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

BERG_BATCH = 10  # BERG's generate_response: batch_size = 10
N_SAMPLES = 14


def import_torch():
    """torch, torchvision pieces; torchvision's compiled-op registrations need CUDA in the PyPI wheel, so they are stubbed."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.models.video import S3D_Weights, s3d

    return torch, torchvision, s3d, S3D_Weights, create_feature_extractor


class ReferencePipeline:
    """BERG's fmri-bmd-s3d on torch + numpy, whole brain (or `voxels`) of one subject.

    Args:
      berg_dir: a (synthetic) copy of BERG's files.
      s3d_weights: the S3D state_dict .pth (torchvision's, or the seeded synthetic one).
      subject: 1..10.
      voxels: indices into the subject's voxels (None = all, as BERG's `range(N_s)`).
      device: where S3D runs ("cpu", "cuda"), as BERG's `.to(device)`; the head stays in numpy.
    """

    def __init__(self, berg_dir: str | Path, s3d_weights: str | Path, subject: int = 1,
                 voxels: np.ndarray | None = None, device: str = "cpu") -> None:
        from berg_jax import berg_files
        from berg_jax.s3d import TAP_NAMES

        torch, _, s3d, S3D_Weights, create_feature_extractor = import_torch()
        self.torch = torch
        model = s3d(weights=None)
        model.load_state_dict(torch.load(s3d_weights, map_location="cpu", weights_only=True))
        # BERG: create_feature_extractor(model, return_nodes={...}), .to(device), .eval()
        self.device = device
        self.extractor = create_feature_extractor(model, return_nodes={name: name for name in TAP_NAMES})
        self.extractor.to(device).eval()
        self.transform = S3D_Weights.KINETICS400_V1.transforms()

        pca = berg_files.load_pca(berg_dir)
        self.mean, self.scale = pca["mean"], pca["scale"]
        self.components = pca["components"]  # (K, F), as stored (float32 in BERG's file)
        coef, intercept = berg_files.load_subject_head(berg_dir, subject, self.components.shape[0])
        sel = np.arange(len(intercept)) if voxels is None else np.asarray(voxels)
        # BERG: reg.coef_ = weights_reg['coef_'][self.selected_voxels] (a fancy-indexed copy)
        self.coef, self.intercept = coef[sel], intercept[sel]

    # -- stages -------------------------------------------------------------------------

    def preprocess(self, stimulus: np.ndarray):
        """uint8 (B, T, 3, H, W) -> float32 torch (B, 3, 14, 224, 224): BERG's sampling + transforms, all at once."""
        n_frames = stimulus.shape[1]
        if n_frames < N_SAMPLES:
            raise ValueError("The video does not have at least 14 frames.")
        indices = np.linspace(0, n_frames - 1, N_SAMPLES, dtype=int)
        videos = stimulus[:, indices]
        return self.transform(self.torch.from_numpy(videos).contiguous())

    def backbone(self, batch) -> np.ndarray:
        """(b, 3, 14, 224, 224) -> (b, F) float32 numpy: the 7 taps flattened channel-first and hstacked."""
        taps = self.extractor(batch.to(self.device))
        features = self.torch.hstack([self.torch.flatten(t, start_dim=1) for t in taps.values()])
        return features.detach().cpu().numpy()

    def project(self, features: np.ndarray) -> np.ndarray:
        """StandardScaler.transform then TruncatedSVD.transform, sklearn's dtypes: (b, F) -> (b, K) float32."""
        z = np.array(features, dtype=features.dtype, copy=True)  # sklearn copies (copy=True)
        z -= self.mean.astype(z.dtype)
        z /= self.scale.astype(z.dtype)
        return (z @ self.components.T).astype(np.float32)

    def regress(self, components: np.ndarray) -> np.ndarray:
        """LinearRegression.predict: (b, K) -> (b, N_sel) float32."""
        return (components @ self.coef.T + self.intercept).astype(np.float32)

    # -- the whole thing ----------------------------------------------------------------

    def encode(self, stimulus: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """BERG's generate_response; adds each stage's seconds to `timings` when given."""
        t = timings if timings is not None else {}
        for key in ("preprocess", "backbone", "projection", "regression"):
            t.setdefault(key, 0.0)
        clock = time.perf_counter
        t0 = clock()
        videos = self.preprocess(stimulus)
        t["preprocess"] += clock() - t0
        out = None
        with self.torch.no_grad():
            for lo in range(0, len(videos), BERG_BATCH):
                t0 = clock()
                features = self.backbone(videos[lo: lo + BERG_BATCH])
                t1 = clock()
                components = self.project(features)
                t2 = clock()
                batch_out = self.regress(components)
                out = batch_out if out is None else np.append(out, batch_out, axis=0)
                t3 = clock()
                t["backbone"] += t1 - t0
                t["projection"] += t2 - t1
                t["regression"] += t3 - t2
        return out


class TorchOnDevice:
    """Plain PyTorch with the head on the device too: S3D, flatten, scaler, PCA and regression
    as float32 tensors on `device` (what a PyTorch user would write for speed; not BERG's code).

    `encode(clips)` takes clips already preprocessed ((B, 3, 14, 224, 224) float32 on the
    device) and returns (B, N_s) float32 on the device. `tf32` allows TF32 in cuDNN
    convolutions and cuBLAS matmuls (off: strict float32, as berg-jax's "highest").
    """

    def __init__(self, reference: ReferencePipeline, device: str = "cuda", tf32: bool = False) -> None:
        torch = self.torch = reference.torch
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        self.extractor = reference.extractor.to(device).eval()
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
        self.mean, self.scale = as_t(reference.mean), as_t(reference.scale)
        self.components_t = as_t(reference.components).T.contiguous()
        self.coef_t, self.intercept = as_t(reference.coef).T.contiguous(), as_t(reference.intercept)

    def encode(self, clips):
        with self.torch.no_grad():
            taps = self.extractor(clips)
            features = self.torch.hstack([self.torch.flatten(t, start_dim=1) for t in taps.values()])
            components = ((features - self.mean) / self.scale) @ self.components_t
            return components @ self.coef_t + self.intercept


def parse_size(text: str) -> tuple[int, int]:
    """'360x640' -> (360, 640) (height x width)."""
    h, w = text.lower().split("x")
    return int(h), int(w)


def random_videos(n: int, frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Seeded uint8 videos in BERG's layout (B, T, 3, H, W); the same bytes for every pipeline."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, frames, 3, height, width), dtype=np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", default="256x256")
    args = parser.parse_args(argv)
    from benchmarks.common import peak_rss_mb, synthetic_model

    berg_dir, pth = synthetic_model()
    t0 = time.perf_counter()
    ref = ReferencePipeline(berg_dir, pth)
    load_s = time.perf_counter() - t0
    videos = random_videos(args.videos, args.frames, *parse_size(args.size))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = ref.encode(videos, timings)
    total = time.perf_counter() - t0
    print(json.dumps({"videos": args.videos, "size": args.size, "load_s": load_s, "total_s": total,
                      "videos_per_s": args.videos / total, "stages_s": timings,
                      "torch_threads": ref.torch.get_num_threads(), "out_shape": list(out.shape),
                      "peak_rss_mb": peak_rss_mb()}, indent=1))


if __name__ == "__main__":
    main()
