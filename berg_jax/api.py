"""BERG's API, as BERG users type it: `BERG`, `get_encoding_model`, `encode`, `get_model_metadata`.

    from berg_jax import BERG
    berg = BERG("path/to/berg_dir")
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=1, selection={"roi": "lFFA"})
    responses = berg.encode(model, videos)          # (B, n_voxels) float32

Differences from BERG, all deliberate: ROI selection works (BERG indexes with the whole
ROI tuple); integer stimuli of any dtype are 0..255 pixels (BERG divides int64 input by
2**63-1); the head runs on the device, fused with S3D.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from berg_jax import berg_files, head
from berg_jax.encoder import EncodingParams, encode_frames, run_batches
from berg_jax.errors import InvalidParameterError, ModelLoadError
from berg_jax.fetch import default_s3d_weights_path
from berg_jax.preprocess import validate_stimulus
from berg_jax.weights import S3D_URL, load_s3d

DEVICES = ("auto", "cpu", "gpu", "tpu")
DEFAULT_BATCH = {"cpu": 8, "gpu": 32, "tpu": 32}
# Videos per S3D call inside a batch (None: the whole batch); see `encode_frames`.
DEFAULT_BACKBONE_CHUNK = {"cpu": 1}


def resolve_device(device: str) -> jax.Device:
    """'auto' | 'cpu' | 'gpu' | 'tpu' -> the first such jax device, or a clear error."""
    if device not in DEVICES:
        raise InvalidParameterError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return jax.devices()[0]
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        raise InvalidParameterError(
            f"device={device!r} requested but JAX finds no {device.upper()} here (it has: "
            f"{sorted({d.platform for d in jax.devices()})}); install the matching jax build or use device='auto'"
        ) from None


@dataclasses.dataclass
class EncodingModel:
    """A loaded fmri-bmd-s3d model for one subject and selection.

    params live on `device`; `voxels` are the selected indices into the subject's N_s
    voxels (None = whole brain); `n_voxels` is the output width.
    """

    model_id: str
    subject: int
    selection: dict | None
    voxels: np.ndarray | None
    n_voxels: int
    params: EncodingParams
    device: jax.Device
    precision: Any
    conv_impl: str
    batch_size: int
    berg_dir: Path
    backbone_chunk: int | None = None

    def encode_fn(self) -> Callable[[np.ndarray], jax.Array]:
        """frames (batch_size, 14, H, W, 3) -> responses on the device (not yet copied back)."""
        def fn(frames: np.ndarray) -> jax.Array:
            # S3D one video at a time only pays from batch 8 up (measured: at 2-4 the whole batch is faster).
            chunk = self.backbone_chunk if frames.shape[0] >= 8 else None
            return encode_frames(self.params, jax.device_put(frames, self.device), precision=self.precision,
                                 conv_impl=self.conv_impl, backbone_chunk=chunk)
        return fn


class BERG:
    """BERG's entry point for the fmri-bmd-s3d model.

    Args:
      berg_dir: a local copy of BERG's bucket (what `aws s3 sync` or `berg-jax fetch` makes).
      s3d_weights: torchvision's `s3d-d76dad2f.pth` or a converted checkpoint; default
        `$TORCH_HOME/hub/checkpoints/s3d-d76dad2f.pth`, where a BERG user already has it.
    """

    def __init__(self, berg_dir: str | os.PathLike, s3d_weights: str | os.PathLike | None = None) -> None:
        self.berg_dir = Path(berg_dir).expanduser()
        if not self.berg_dir.is_dir():
            raise ModelLoadError(
                f"berg_dir {self.berg_dir} is not a directory; download the model with "
                f"`berg-jax fetch --berg-dir {self.berg_dir} --subjects 1`")
        self.s3d_weights = Path(s3d_weights).expanduser() if s3d_weights is not None else None
        self._device_cache: dict[tuple[str, ...], Any] = {}

    # -- models -------------------------------------------------------------------------

    @staticmethod
    def _check_model_id(model_id: str) -> None:
        if model_id != berg_files.MODEL_ID:
            raise InvalidParameterError(
                f"unknown model_id {model_id!r}; berg-jax provides {berg_files.MODEL_ID!r}")

    def _s3d_path(self) -> Path:
        path = self.s3d_weights or default_s3d_weights_path()
        if not path.exists():
            raise ModelLoadError(
                f"S3D weights not found at {path}. Get torchvision's Kinetics-400 weights with "
                f"`berg-jax fetch --s3d` (or download {S3D_URL} to "
                f"{default_s3d_weights_path()}), or pass s3d_weights=PATH.")
        return path

    def _selected_voxels(self, subject: int, selection: dict | None) -> np.ndarray | None:
        if selection is None:
            return None
        if not isinstance(selection, dict):
            raise InvalidParameterError(
                f"selection must be None, {{'roi': NAME}} or {{'voxels': MASK}}, got {type(selection).__name__}")
        unknown = set(selection) - {"roi", "voxels"}
        if unknown or not selection:
            raise InvalidParameterError(
                f"unknown selection keys {sorted(map(str, unknown))}; valid keys: 'roi', 'voxels' "
                "(e.g. selection={'roi': 'lFFA'})")
        if "roi" in selection:  # BERG: roi wins when both are given
            return berg_files.roi_voxel_indices(self.get_model_metadata(berg_files.MODEL_ID, subject), selection["roi"])
        return berg_files.voxel_mask_indices(selection["voxels"], berg_files.N_VOXELS[subject])

    def get_encoding_model(
        self,
        model_id: str,
        subject: int = 1,
        selection: dict | None = None,
        device: str = "auto",
        *,
        precision: Any = "highest",
        conv_impl: str = "2d",
        batch_size: int | None = None,
    ) -> EncodingModel:
        """Load fmri-bmd-s3d for `subject` (1..10), optionally restricted to `selection`.

        Args:
          selection: None (whole brain), {"roi": name} (one of the subject's 47 ROIs), or
            {"voxels": binary vector of length N_s}; "roi" wins when both are given.
          device: "auto" | "cpu" | "gpu" | "tpu".
          precision: matmul/conv precision; "highest" (default) gives float32 parity on
            GPU/TPU, None is faster there (TF32/bf16 passes).
          batch_size: videos per device call (default 8 on CPU, 32 on GPU/TPU).
        The first call on a berg_dir converts BERG's files to a berg-jax copy (once).
        """
        self._check_model_id(model_id)
        subject = berg_files.check_subject(subject)
        voxels = self._selected_voxels(subject, selection)
        dev = resolve_device(device)
        if not head.is_converted(self.berg_dir, subject):
            print(f"berg-jax: converting BERG's files in {self.berg_dir} for subject {subject} "
                  "(once; later loads read the converted copy)")
            head.convert_projection(self.berg_dir)
            k = head.converted_components(self.berg_dir)
            head.convert_subject(self.berg_dir, subject, k)
        regression = head.load_regression(self.berg_dir, subject, voxels)
        s3d_path = self._s3d_path()
        # S3D and the 1.6 GB projection are shared by every subject and selection: loaded
        # once per device, not once per model.
        s3d_key, projection_key = ("s3d", str(s3d_path), str(dev)), ("projection", str(dev))
        if s3d_key not in self._device_cache:
            self._device_cache[s3d_key] = jax.device_put(load_s3d(s3d_path), dev)
        if projection_key not in self._device_cache:
            self._device_cache[projection_key] = jax.device_put(head.load_projection(self.berg_dir), dev)
        params = EncodingParams(self._device_cache[s3d_key], self._device_cache[projection_key],
                                jax.device_put(regression, dev))
        n_voxels = berg_files.N_VOXELS[subject] if voxels is None else len(voxels)
        return EncodingModel(
            model_id=model_id, subject=subject, selection=selection, voxels=voxels, n_voxels=n_voxels,
            params=params, device=dev, precision=precision, conv_impl=conv_impl,
            batch_size=batch_size or DEFAULT_BATCH.get(dev.platform, 8), berg_dir=self.berg_dir,
            backbone_chunk=DEFAULT_BACKBONE_CHUNK.get(dev.platform),
        )

    def get_model_metadata(self, model_id: str, subject: int = 1) -> dict:
        """BERG's metadata dict for `subject` (masks, affines, ROIs, test accuracy), without loading the model."""
        self._check_model_id(model_id)
        return berg_files.load_metadata(self.berg_dir, berg_files.check_subject(subject))

    # -- encoding -----------------------------------------------------------------------

    def encode(
        self,
        model: EncodingModel,
        stimulus: Any,
        return_metadata: bool = False,
        show_progress: bool = True,
        *,
        pad_short: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict]:
        """In silico fMRI responses to a batch of videos.

        Args:
          stimulus: (B, T, 3, H, W) (BERG's layout) or (B, T, H, W, 3); integer dtypes are
            0..255 pixels, float dtypes 0..1; T >= 14 frames are sampled with BERG's rule.
          pad_short: repeat the last frame of videos shorter than 14 frames.
        Returns:
          float32 (B, model.n_voxels), and BERG's metadata dict when return_metadata.
        """
        clips, info = validate_stimulus(stimulus, pad_short=pad_short)
        out = np.empty((info.n_videos, model.n_voxels), dtype=np.float32)
        # Fewer videos than a batch compile a smaller power-of-two batch, not a padded full one.
        bs = min(model.batch_size, 1 << max(info.n_videos - 1, 0).bit_length())
        batches = ((lo, np.asarray(clips[lo: lo + bs])) for lo in range(0, info.n_videos, bs))
        progress = _progress(info.n_videos, show_progress, desc=f"encoding sub-{model.subject:02d}")
        for lo, responses in run_batches(model.encode_fn(), batches, bs):
            out[lo: lo + len(responses)] = responses
            progress.update(len(responses))
        progress.close()
        if return_metadata:
            return out, self.get_model_metadata(model.model_id, model.subject)
        return out


def _progress(total: int, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=desc, unit="video", dynamic_ncols=True)


def encoder(model: EncodingModel) -> tuple[Callable[..., jax.Array], EncodingParams]:
    """The pure function and its parameters, for JAX code that jits, vmaps, shards or differentiates.

    `fn(params, frames)` maps (B, 14, H, W, 3) frames -- uint8 0..255, or float 0..1 for
    gradients -- to (B, n_voxels) float32. It is already jitted; compose it freely.
    """
    fn = functools.partial(encode_frames, precision=model.precision, conv_impl=model.conv_impl,
                           backbone_chunk=model.backbone_chunk)
    return fn, model.params
