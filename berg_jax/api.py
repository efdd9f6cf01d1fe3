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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from berg_jax import berg_files, head
from berg_jax import precision as precisions
from berg_jax import feed
from berg_jax.fused import EncodingParams, encode_frames, encode_outputs, flat_outputs
from berg_jax.errors import BERGError, InvalidParameterError, ModelLoadError
from berg_jax.fetch import default_s3d_weights_path
from berg_jax.preprocess import check_stimulus
from berg_jax.roi_means import ROI_MEANS, RoiHead, load_roi_head
from berg_jax.weights import S3D_URL, load_s3d

DEVICES = ("auto", "cpu", "gpu", "tpu")
DEFAULT_BATCH = {"cpu": 8, "gpu": 32, "tpu": 32}
# Videos per S3D call inside a batch (None: the whole batch); see `encode_frames`.
DEFAULT_BACKBONE_CHUNK = {"cpu": 1}


def resolve_devices(device: str, n_devices: int | None = None) -> list[jax.Device]:
    """'auto' | 'cpu' | 'gpu' | 'tpu' -> this process's devices of that kind (the first `n_devices`)."""
    if device not in DEVICES:
        raise InvalidParameterError(f"device must be one of {DEVICES}, got {device!r}")
    try:
        found = jax.local_devices() if device == "auto" else jax.local_devices(backend=device)
    except RuntimeError:
        raise InvalidParameterError(
            f"device={device!r} requested but JAX finds no {device.upper()} here (it has: "
            f"{sorted({d.platform for d in jax.devices()})}); install the matching jax build or use device='auto'"
        ) from None
    if n_devices is not None:
        if not 1 <= int(n_devices) <= len(found):
            raise InvalidParameterError(
                f"n_devices={n_devices} but this process has {len(found)} {found[0].platform} device(s); "
                f"pass 1..{len(found)} or None for all")
        found = found[: int(n_devices)]
    return found


def resolve_device(device: str) -> jax.Device:
    """'auto' | 'cpu' | 'gpu' | 'tpu' -> the first such jax device, or a clear error."""
    return resolve_devices(device)[0]


def check_batch_size(batch_size: int, n_devices: int) -> None:
    """A batch must split evenly over the devices; refused up front, never per batch."""
    if int(batch_size) < 1 or int(batch_size) % n_devices:
        raise InvalidParameterError(
            f"batch_size={batch_size} must be a positive multiple of the {n_devices} devices "
            f"it is split over (e.g. {n_devices * max(1, int(batch_size) // n_devices)})")


Subjects = int | Sequence[int] | str | None


def parse_subjects(subject: Subjects) -> tuple[int, ...]:
    """1..10, a sequence of them, "all" (every subject), or None (no subject) -> sorted unique tuple."""
    if subject is None:
        return ()
    if isinstance(subject, str):
        if subject.strip().lower() == "all":
            return tuple(berg_files.SUBJECTS)
        raise InvalidParameterError(f"subject must be 1..10, a list of them, or 'all', got {subject!r}")
    if isinstance(subject, (int, np.integer)):
        return (berg_files.check_subject(subject),)
    subjects = tuple(sorted({berg_files.check_subject(s) for s in subject}))
    if not subjects:
        raise InvalidParameterError("subject=[] names no subject; pass 1..10, a list of them, or 'all'")
    return subjects


@dataclasses.dataclass
class EncodingModel:
    """A loaded fmri-bmd-s3d model: one subject (BERG's case), or several heads on one backbone.

    `subject` is an int for a one-subject model -- `encode` then returns one array, as BERG
    does, unless `with_components` or ROI means -- and a tuple (or None: components only) otherwise;
    then `encode` returns a dict {subject: responses, ..., "components": components,
    "roi_means": {subject: ROI means}}. `voxels`/`n_voxels` are the selected
    indices into the subject's N_s voxels (None = whole brain) and the output width; for a
    several-subject model, dicts keyed by subject. `roi_names`: {subject: its R ROI names,
    the columns of its ROI means} (empty: no ROI means); `with_responses` False: no voxel
    responses (ROI means and/or components only). params live on `devices` (replicated);
    batches are sharded over them along the video axis.
    """

    model_id: str
    subject: int | tuple[int, ...] | None
    selection: dict | None
    voxels: np.ndarray | None | dict[int, np.ndarray | None]
    n_voxels: int | dict[int, int]
    params: EncodingParams
    device: jax.Device
    precision: str  # "highest" | "tf32" | "bf16" (`berg_jax.precision`); params are stored for it
    conv_impl: str
    batch_size: int
    berg_dir: Path
    backbone_chunk: int | None = None
    devices: tuple[jax.Device, ...] = ()
    with_components: bool = False
    n_components: int = 0
    roi_names: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    with_responses: bool = True

    @property
    def subjects(self) -> tuple[int, ...]:
        if self.subject is None:
            return ()
        return (self.subject,) if isinstance(self.subject, int) else tuple(self.subject)

    @property
    def returns_dict(self) -> bool:
        """False for BERG's case (one subject, its responses only): `encode` returns an array."""
        return (not isinstance(self.subject, int) or self.with_components or bool(self.roi_names)
                or not self.with_responses)

    def voxels_of(self, subject: int) -> np.ndarray | None:
        return self.voxels[subject] if isinstance(self.voxels, dict) else self.voxels

    def n_voxels_of(self, subject: int) -> int:
        return self.n_voxels[subject] if isinstance(self.n_voxels, dict) else self.n_voxels

    @property
    def output_columns(self) -> dict[int | str | tuple[str, int], int]:
        """Every output's width, in output order: {subject: n_voxels, ..., "components": K,
        ("roi_means", subject): R, ...} (the keys of `fused.flat_outputs`)."""
        cols: dict[int | str | tuple[str, int], int] = (
            {s: self.n_voxels_of(s) for s in self.subjects} if self.with_responses else {})
        if self.with_components:
            cols["components"] = self.n_components
        for s, names in self.roi_names.items():
            cols[(ROI_MEANS, s)] = len(names)
        return cols

    @property
    def label(self) -> str:
        """What it computes, for progress bars: "sub-01", "10 subjects+components", "sub-01 ROI means", ..."""
        who = f"sub-{self.subjects[0]:02d}" if len(self.subjects) == 1 else f"{len(self.subjects)} subjects"
        parts = []
        if self.subjects and self.with_responses:
            parts.append(who)
        if self.with_components:
            parts.append("components")
        if self.roi_names:  # "sub-01+ROI means" beside the responses, "sub-01 ROI means" alone
            parts.append("ROI means" if self.with_responses else f"{who} ROI means")
        return "+".join(parts)

    @property
    def mesh(self) -> Mesh | None:
        return Mesh(np.array(self.devices), ("batch",)) if len(self.devices) > 1 else None

    def dict_params(self) -> EncodingParams:
        """params with the regression as {subject: Regression}, the form `encode_outputs` takes."""
        if isinstance(self.subject, int) and self.with_responses:  # a one-subject model keeps BERG's single Regression
            return self.params._replace(regression={self.subject: self.params.regression})
        return self.params

    @property
    def placement(self) -> jax.Device | NamedSharding:
        """Where a batch of frames goes: the device, or split along the video axis over the mesh."""
        mesh = self.mesh
        return self.device if mesh is None else NamedSharding(mesh, PartitionSpec("batch"))

    def put(self, frames: Any) -> jax.Array:
        """(B, 14, ...) frames, host or device -> on the model's device(s); B must split over them."""
        n_dev = max(len(self.devices), 1)
        if frames.shape[0] % n_dev:
            raise InvalidParameterError(
                f"a batch of {frames.shape[0]} videos cannot be split over {n_dev} devices; "
                f"use a batch size that is a multiple of {n_dev}")
        return feed.put(frames, self.placement)

    def backbone_chunk_for(self, size: int) -> int | None:
        """S3D's videos per call inside a batch of `size`: one at a time only pays from
        batch 8 up (measured on CPU: at 2-4 the whole batch is faster), and never when the
        batch is split over devices."""
        return self.backbone_chunk if size >= 8 and self.mesh is None else None

    def call_size(self, n: int, batch_size: int | None = None) -> int:
        """The compiled batch a group of n videos runs as (`feed.call_size`): a tail batch costs its own size."""
        bs = int(batch_size or self.batch_size)
        return feed.call_size(n, bs, max(len(self.devices), 1), skips_padding=self.backbone_chunk_for(bs) is not None)

    def encode_fn(self, channels_first: bool = False,
                  frame_indices: tuple[int, ...] | None = None) -> Callable[..., dict[str, Any]]:
        """`fn(frames, n_valid=None)`: (B, 14, H, W, 3) frames -- (B, T, 3, H, W) with
        `channels_first`, T frames of which `frame_indices` are kept -- host or device ->
        `encode_outputs`' result on the device(s), not yet copied back. Rows from `n_valid`
        (an int32 scalar) on are padding."""
        params = self.dict_params()

        def fn(frames: Any, n_valid: Any = None) -> dict[str, Any]:
            frames = self.put(frames)
            return encode_outputs(params, frames, precision=self.precision, conv_impl=self.conv_impl,
                                  backbone_chunk=self.backbone_chunk_for(frames.shape[0]),
                                  with_components=self.with_components, n_valid=n_valid,
                                  channels_first=channels_first, frame_indices=frame_indices)
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

    def _selections(self, subjects: tuple[int, ...], selection: dict | None) -> dict[int, np.ndarray | None]:
        """{subject: selected voxel indices or None}; errors name the subject when there are several."""
        if len(subjects) > 1 and isinstance(selection, dict) and set(selection) == {"voxels"}:
            raise InvalidParameterError(
                "a voxel mask is one subject's (length N_s): use selection={'roi': NAME} with several "
                "subjects, or load them one at a time")
        if len(subjects) == 1:
            return {subjects[0]: self._selected_voxels(subjects[0], selection)}
        out = {}
        for s in subjects:
            try:
                out[s] = self._selected_voxels(s, selection)
            except BERGError as exc:
                raise type(exc)(f"sub-{s:02d}: {exc}") from None
        return out

    def _on_devices(self, key: tuple[str, ...], load: Callable[[], Any], placement: Any) -> Any:
        if key not in self._device_cache:
            self._device_cache[key] = jax.device_put(load(), placement)
        return self._device_cache[key]

    def get_encoding_model(
        self,
        model_id: str,
        subject: Subjects = 1,
        selection: dict | None = None,
        device: str = "auto",
        *,
        precision: Any = "highest",
        conv_impl: str = "2d",
        batch_size: int | None = None,
        components: bool = False,
        n_devices: int | None = None,
        roi_means: bool = False,
        responses: bool = True,
    ) -> EncodingModel:
        """Load fmri-bmd-s3d for `subject`, optionally restricted to `selection`.

        Args:
          subject: 1..10 (BERG's case: `encode` returns one array); a list of subjects or
            "all" (S3D and the projection run once, every subject's head on their output;
            `encode` returns {subject: array}); or None with components=True (components only).
          selection: None (whole brain), {"roi": name} (one of the subject's 47 ROIs; with
            several subjects, each subject's own voxels of that ROI), or {"voxels": binary
            vector of length N_s} (one subject only); "roi" wins when both are given.
          device: "auto" | "cpu" | "gpu" | "tpu".
          precision: "highest" (default: float32 throughout, BERG parity), "tf32" (float32
            storage, convs and matmuls at lax's DEFAULT precision: TF32 on NVIDIA tensor
            cores, one bf16 pass on TPU; on CPU the same as "highest") or "bf16" (S3D and the
            projection in bfloat16 with float32 accumulation, weights cast once here; slower
            on CPU, and on an H100 measured no faster than "tf32"); responses are float32 in
            every mode. `python
            -m benchmarks.precision` measures the deviation. Also accepted, as before:
            `jax.lax.Precision.HIGHEST` ("highest"), None or `jax.lax.Precision.DEFAULT` ("tf32");
            `model.precision` holds the name.
          batch_size: videos per call over all devices (default 8 on CPU, 32 per GPU/TPU);
            must be a multiple of the device count.
          components: also return the K projected components ("components" in `encode`'s
            dict): every subject's and ROI's responses follow from them
            (`responses_from_components`), at 400 bytes a video.
          n_devices: how many of this process's devices to shard batches over (default all).
          roi_means: also return each subject's ROI means: float32 (B, R), one column per ROI
            of the subject's metadata (`model.roi_names[subject]`, BERG's ROI_NAMES order), the
            mean response over the ROI's voxels, computed from the components through a (K, R)
            head folded at load time (`roi_means.fold_roi_means`), whatever `selection` is.
            `encode` returns {..., "roi_means": {subject: array}}.
          responses: False leaves out the voxel responses (then give roi_means and/or
            components): a screen that needs ROI means only pays for no whole-brain head.
        The first call on a berg_dir converts BERG's files to a berg-jax copy (once).
        """
        self._check_model_id(model_id)
        precision = precisions.normalize(precision)
        subjects = parse_subjects(subject)
        if not subjects and not components:
            raise InvalidParameterError("subject=None loads no head: pass a subject, or components=True")
        if not subjects and selection is not None:
            raise InvalidParameterError("a components-only model (subject=None) has no voxels to select; "
                                        "select later with responses_from_components(..., selection=...)")
        if roi_means and not subjects:
            raise InvalidParameterError("roi_means=True needs a subject (1..10, a list of them, or 'all'): "
                                        "ROI means are a subject's")
        if not responses and not (roi_means or components):
            raise InvalidParameterError("responses=False leaves no output: add roi_means=True and/or components=True")
        if not responses and selection is not None:
            raise InvalidParameterError("a selection picks voxel responses, and responses=False has none: drop "
                                        "the selection (ROI means cover every ROI)")
        voxels = self._selections(subjects, selection)
        devices = resolve_devices(device, n_devices)
        platform = devices[0].platform
        if batch_size is None:
            per_call = DEFAULT_BATCH.get(platform, 8) * (1 if platform == "cpu" else len(devices))
            batch_size = -(-per_call // len(devices)) * len(devices)
        check_batch_size(batch_size, len(devices))
        head.ensure_converted(self.berg_dir, subjects)
        s3d_path = self._s3d_path()
        mesh = Mesh(np.array(devices), ("batch",)) if len(devices) > 1 else None
        placement = devices[0] if mesh is None else NamedSharding(mesh, PartitionSpec())  # replicated
        where = tuple(str(d) for d in devices)
        # S3D and the 1.6 GB projection are shared by every subject and selection: loaded
        # once per set of devices (and storage dtype: "bf16" keeps a bfloat16 copy, cast on
        # the host before it is put on the device), not once per model.
        stored = "bfloat16" if precisions.resolve(precision).compute_dtype is not None else "float32"
        s3d = self._on_devices(("s3d", str(s3d_path), stored, *where),
                               lambda: precisions.cast_s3d(load_s3d(s3d_path), precision), placement)
        projection = self._on_devices(
            ("projection", stored, *where),
            lambda: precisions.cast_projection(head.load_projection(self.berg_dir), precision), placement)
        regressions = {s: jax.device_put(head.load_regression(self.berg_dir, s, voxels[s]), placement)
                       for s in subjects} if responses else {}
        n_voxels = {s: berg_files.N_VOXELS[s] if voxels[s] is None else len(voxels[s]) for s in subjects}
        roi_heads = {s: self._roi_head(s) for s in subjects} if roi_means else {}
        one = isinstance(subject, (int, np.integer))
        return EncodingModel(
            model_id=model_id, subject=subjects[0] if one else (subjects or None), selection=selection,
            voxels=voxels[subjects[0]] if one else voxels, n_voxels=n_voxels[subjects[0]] if one else n_voxels,
            params=EncodingParams(s3d, projection, regressions[subjects[0]] if one and responses else regressions,
                                  {s: jax.device_put(h.regression, placement) for s, h in roi_heads.items()} or None),
            device=devices[0], precision=precision, conv_impl=conv_impl, batch_size=int(batch_size),
            berg_dir=self.berg_dir, backbone_chunk=DEFAULT_BACKBONE_CHUNK.get(platform),
            devices=tuple(devices), with_components=bool(components),
            n_components=int(projection["bias"].shape[0]),
            roi_names={s: h.names for s, h in roi_heads.items()}, with_responses=bool(responses),
        )

    def _roi_head(self, subject: int) -> RoiHead:
        """The subject's ROI-mean head; errors name the subject (the metadata file is needed)."""
        try:
            return load_roi_head(self.berg_dir, subject)
        except BERGError as exc:
            raise type(exc)(f"sub-{subject:02d}: ROI means need the subject's metadata: {exc}") from None

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
    ) -> np.ndarray | dict[int | str, np.ndarray] | tuple[Any, Any]:
        """In silico fMRI responses to a batch of videos.

        Args:
          stimulus: (B, T, 3, H, W) (BERG's layout) or (B, T, H, W, 3); integer dtypes are
            0..255 pixels, float dtypes 0..1; T >= 14 frames are sampled with BERG's rule.
          pad_short: repeat the last frame of videos shorter than 14 frames.
        Returns:
          float32 (B, model.n_voxels) for a one-subject model without components (BERG's
          case); otherwise a dict {subject: float32 (B, n_voxels), ..., "components":
          float32 (B, K), "roi_means": {subject: float32 (B, R_s)}} (columns:
          `model.roi_names[subject]`). With return_metadata, also BERG's metadata dict (for a dict
          result, a dict of them keyed by subject).
        """
        source, info = check_stimulus(stimulus, pad_short=pad_short)
        columns = model.output_columns
        out = {name: np.empty((info.n_videos, width), dtype=np.float32) for name, width in columns.items()}
        n_dev = max(len(model.devices), 1)
        # Fewer videos than a batch compile a smaller power-of-two batch, not a padded full one
        # (rounded up to split evenly over the devices).
        bs = min(model.batch_size, 1 << max(info.n_videos - 1, 0).bit_length())
        bs = -(-bs // n_dev) * n_dev
        # Contiguous slices in the caller's layout, never transposed on the host: the channel
        # move (and, for T up to 2 x 14, the frame sampling) happens on the device.
        frame_indices = feed.device_frame_indices(source, info, model.device.platform)
        batches = ((lo, feed.sample_batch(source, info, lo, lo + bs, frame_indices is not None))
                   for lo in range(0, info.n_videos, bs))
        progress = _progress(info.n_videos, show_progress, desc=f"encoding {model.label}")
        fn = model.encode_fn(channels_first=info.channels_first, frame_indices=frame_indices)
        try:
            for lo, result in feed.run_batches(fn, batches, lambda n: model.call_size(n, bs), model.put):
                n = 0
                for name, rows in flat_outputs(result).items():
                    out[name][lo: lo + len(rows)] = rows
                    n = len(rows)
                progress.update(n)
        except feed.BatchFailed as exc:
            raise exc.cause  # BERG.encode has no per-batch recovery: the model's own error
        finally:
            progress.close()
        if model.roi_names:  # ("roi_means", s) keys -> out["roi_means"][s]
            nested = {key[1]: out.pop(key) for key in list(out) if isinstance(key, tuple)}
            out[ROI_MEANS] = nested
        result = out if model.returns_dict else out[model.subject]
        if return_metadata:
            if model.returns_dict:
                return result, {s: self.get_model_metadata(model.model_id, s) for s in model.subjects}
            return result, self.get_model_metadata(model.model_id, model.subject)
        return result

    def responses_from_components(
        self,
        components: Any,
        subject: Subjects = 1,
        selection: dict | None = None,
        device: str = "auto",
        *,
        precision: Any = "highest",
        roi_means: bool = False,
    ) -> np.ndarray | dict[int, np.ndarray]:
        """Stored components -> responses (or ROI means), equal to encoding the videos again (see the module function)."""
        return responses_from_components(components, self.berg_dir, subject, selection, device,
                                         precision=precision, roi_means=roi_means)


def load_heads(
    berg_dir: str | os.PathLike,
    subject: Subjects,
    selection: dict | None = None,
    device: str = "auto",
) -> dict[int, Any]:
    """{subject: its regression (restricted to `selection`) on `device`}, converting BERG's files if needed."""
    berg = BERG(berg_dir)
    subjects = parse_subjects(subject)
    if not subjects:
        raise InvalidParameterError("a subject is needed (1..10, a list of them, or 'all')")
    head.ensure_converted(berg.berg_dir, subjects)
    voxels = berg._selections(subjects, selection)
    dev = resolve_device(device)
    return {s: jax.device_put(head.load_regression(berg.berg_dir, s, voxels[s]), dev) for s in subjects}


def load_roi_heads(berg_dir: str | os.PathLike, subject: Subjects, device: str = "auto") -> dict[int, RoiHead]:
    """{subject: its ROI-mean head (regression on `device`)}, converting BERG's files if needed."""
    berg = BERG(berg_dir)
    subjects = parse_subjects(subject)
    if not subjects:
        raise InvalidParameterError("a subject is needed (1..10, a list of them, or 'all')")
    head.ensure_converted(berg.berg_dir, subjects)
    dev = resolve_device(device)
    heads = {s: berg._roi_head(s) for s in subjects}
    return {s: dataclasses.replace(h, regression=jax.device_put(h.regression, dev)) for s, h in heads.items()}


def apply_head(components: Any, regression: Any, precision: Any = "highest") -> np.ndarray:
    """(n, K) float32 components -> (n, N_sel) float32 responses: the encoder's own regression."""
    precision = precisions.normalize(precision)
    comps = np.asarray(components, dtype=np.float32)
    k = regression["coef"].shape[0]
    if comps.ndim != 2 or comps.shape[1] != k:
        raise InvalidParameterError(
            f"components must be (n, K = {k}) float32 (as `encode --components` writes), got shape {comps.shape}; "
            "were they written with another berg_dir?")
    if comps.shape[0] == 1:
        # XLA:CPU computes a 1-row product with another kernel (matrix-vector) than the
        # encoder's batched one, which rounds differently; two rows take the batched path.
        return np.asarray(_regress_jit(np.repeat(comps, 2, axis=0), regression, precision))[:1]
    return np.asarray(_regress_jit(comps, regression, precision))


def responses_from_components(
    components: Any,
    berg_dir: str | os.PathLike,
    subject: Subjects = 1,
    selection: dict | None = None,
    device: str = "auto",
    *,
    precision: Any = "highest",
    batch_rows: int = 4096,
    roi_means: bool = False,
) -> np.ndarray | dict[int, np.ndarray]:
    """Turn stored K components (`encode --components`) into voxel responses (or ROI means).

    The encoder's own regression, at the same precision, on the components it computed, so
    the result equals a direct `encode` of the same videos: bit for bit on CPU whenever that
    encode ran batches of two or more (the tests check it), otherwise to float32 rounding
    (a matmul's rounding can depend on its row count and the device's kernel).

    Args:
      components: float32 (n, K), e.g. `np.load("OUT/components.npy", mmap_mode="r")`
        (read `batch_rows` rows at a time). NaN rows (failed videos) give NaN rows.
      berg_dir, subject, selection, device: as in `BERG.get_encoding_model`.
      precision: the regression's: "highest" (default; also what "bf16" encodes use, so
        their components give their responses), "tf32" (a "tf32" encode's), or "bf16" (the
        same as "highest": the regression is float32 in every mode).
      roi_means: return the subjects' ROI means instead (see `roi_means_from_components`;
        no selection then).
    Returns:
      float32 (n, n_voxels) for one subject; {subject: array} for a list or "all".
    """
    if roi_means:
        if selection is not None:
            raise InvalidParameterError("roi_means=True gives every ROI's mean; drop the selection")
        return roi_means_from_components(components, berg_dir, subject, device, precision=precision,
                                         batch_rows=batch_rows)
    heads = load_heads(berg_dir, subject, selection, device)
    return _apply_heads(components, heads, precision, batch_rows, isinstance(subject, (int, np.integer)))


def roi_means_from_components(
    components: Any,
    berg_dir: str | os.PathLike,
    subject: Subjects = 1,
    device: str = "auto",
    *,
    precision: Any = "highest",
    batch_rows: int = 4096,
) -> np.ndarray | dict[int, np.ndarray]:
    """Stored K components (`encode --components`) -> each subject's ROI means.

    The ROI-mean head an encode with `roi_means=True` applies, at the same precision, so
    the result equals that encode's "roi_means" (bit for bit on CPU, as for responses).

    Args:
      components: float32 (n, K), read `batch_rows` rows at a time; NaN rows give NaN rows.
      berg_dir, subject, device, precision: as in `responses_from_components`.
    Returns:
      float32 (n, R) for one subject, {subject: (n, R_s)} for a list or "all"; column j is
      ROI `roi_means.roi_names(metadata)[j]` (`load_roi_heads(...)[s].names`).
    """
    heads = load_roi_heads(berg_dir, subject, device)
    return _apply_heads(components, {s: h.regression for s, h in heads.items()}, precision, batch_rows,
                        isinstance(subject, (int, np.integer)))


def _apply_heads(components: Any, heads: dict[int, Any], precision: Any, batch_rows: int,
                 one: bool) -> np.ndarray | dict[int, np.ndarray]:
    """(n, K) components through each {subject: Regression}, `batch_rows` rows at a time."""
    precision = precisions.normalize(precision)
    n = len(components)
    out = {}
    for s, regression in heads.items():
        res = np.empty((n, regression["coef"].shape[1]), np.float32)
        for lo in range(0, n, batch_rows):
            block = components[lo: lo + batch_rows]
            res[lo: lo + len(block)] = apply_head(block, regression, precision)
        out[s] = res
    return out[next(iter(out))] if one else out


@functools.partial(jax.jit, static_argnames=("precision",))
def _regress_jit(components: jax.Array, regression: dict, precision: Any) -> jax.Array:
    return head.regress(components, regression, precision)


def _progress(total: int, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=desc, unit="video", dynamic_ncols=True)


def encoder(model: EncodingModel) -> tuple[Callable[..., Any], EncodingParams]:
    """The pure function and its parameters, for JAX code that jits, vmaps, shards or differentiates.

    `fn(params, frames)` maps (B, 14, H, W, 3) frames -- uint8 0..255, or float 0..1 for
    gradients -- to (B, n_voxels) float32 for a one-subject model without components, and
    to `encode_outputs`' dict {"responses": {subject: ...}, "components": ...} otherwise.
    It is already jitted; compose it freely.
    """
    if not model.returns_dict:
        fn = functools.partial(encode_frames, precision=model.precision, conv_impl=model.conv_impl,
                               backbone_chunk=model.backbone_chunk)
        return fn, model.params
    fn = functools.partial(encode_outputs, precision=model.precision, conv_impl=model.conv_impl,
                           backbone_chunk=model.backbone_chunk, with_components=model.with_components)
    return fn, model.dict_params()
