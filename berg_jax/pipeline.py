"""Video files -> OUT: the main job behind `berg-jax encode` (and `berg-jax demo`).

    from berg_jax import BERG
    from berg_jax.pipeline import encode_files
    from berg_jax.video import list_videos

    model = BERG("~/berg").get_encoding_model("fmri-bmd-s3d", subject=1)
    summary = encode_files(model, list_videos(["videos/"]), "out/", nifti=True)

The data path: `decode_workers.prefetch_clips` decodes the next batches of files in worker
processes (`video.prefetch_clips` in threads with decode_workers=0) while the device
computes the current one; decoded clips are grouped by frame
size (H, W) -- each distinct size compiles once, the usual dataset has one -- and fed
through `feed.run_batches`, which stages the next batch onto the device while the
current one computes, pads a partial batch to the size it runs as (`model.call_size`: a
tail costs its own size) and pulls each result back asynchronously. Rows go to
`writer.ResponseWriter`, which makes OUT crash-safe and
resumable; a file that cannot be decoded is recorded (with its reason) and never stops
the run.

NIfTI (`nifti=True`): one 4-D `responses.nii.gz` (x, y, z, video) on the subject's
(62, 77, 61) grid in MNI152 space -- `sub_mask_affine` as the affine, `sub_mask_header`
as the template header -- volume t = row t of responses.npy. Voxels outside the
selection and every voxel of a failed video are NaN: NaN (not 0) because 0 is a valid
response in z-scored units, and nilearn/FSL/AFNI treat NaN as "no value".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from berg_jax import feed
from berg_jax.api import EncodingModel, check_batch_size
from berg_jax.atomic import atomic_npy
from berg_jax.berg_files import N_VOXELS
from berg_jax.decode_workers import EXTERNAL_SIGNALS, default_decode_workers, died_externally
from berg_jax.decode_workers import prefetch_clips as prefetch_clips_in_processes
from berg_jax.fused import ROI_MEANS, flat_outputs
from berg_jax.roi_means import CONFIG_KEY as ROI_MEANS_CONFIG
from berg_jax.roi_means import roi_means_file, write_csvs_for_job, write_roi_means_csv
from berg_jax.errors import InvalidParameterError
from berg_jax.npy_rows import file_bytes, format_rows
from berg_jax.video import prefetch_clips, read_clip
from berg_jax.volumes import volume_file_name, write_responses_nifti
from berg_jax.writer import (
    COMPONENTS_FILE,
    JOB_FILE,
    MANIFEST_FILE,
    NIFTI_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    ResponseWriter,
    no_room_is_an_error,
)

__all__ = ["PLOTS_DIR", "encode_files", "job_config", "output_files", "plot_file_name", "responses_from_components_file",
           "roi_means_from_components_file"]

PLOTS_DIR = "plots"
DECODER_COLUMN = "decoder"  # manifest.csv's column, with --decoder gpu/both: who decoded each file


# --------------------------------------------------------------------------- job identity


def _selection_config(model: EncodingModel) -> Any:
    """What the selection contributes to the job: None, "roi:NAME", or the mask's digest."""
    sel = model.selection
    if not sel or not model.subjects:
        return None
    if "roi" in sel:  # BERG: roi wins when both are given
        return {"roi": str(sel["roi"])}
    # The mask as a canonical bool vector, so 0/1 ints and bools of the same mask agree.
    subject = model.subjects[0]  # a voxel mask is one subject's
    mask = np.zeros(N_VOXELS[subject], bool)
    mask[np.asarray(model.voxels_of(subject))] = True
    return {"voxels_sha256": hashlib.sha256(mask.tobytes()).hexdigest(),
            "voxels_count": int(len(model.voxels_of(subject)))}


def responses_file(subject: int, one_subject: bool) -> str:
    """`responses.npy` for a one-subject job (BERG's case), `responses_sub-SS.npy` among several."""
    return RESPONSES_FILE if one_subject else f"responses_sub-{subject:02d}.npy"


def output_files(model: EncodingModel) -> dict[int | str | tuple[str, int], str]:
    """Each of the model's outputs (`model.output_columns`' keys) -> its file in OUT.

    BERG's case (one subject) writes `responses.npy`; several subjects write
    `responses_sub-SS.npy` each; components go to `components.npy`; ROI means to
    `roi_means_sub-SS.npy` (named by subject even for one).
    """
    files: dict[int | str | tuple[str, int], str] = (
        {s: responses_file(s, isinstance(model.subject, int)) for s in model.subjects}
        if model.with_responses else {})
    if model.with_components:
        files["components"] = COMPONENTS_FILE
    for s in model.roi_names:
        files[(ROI_MEANS, s)] = roi_means_file(s)
    return files


def _weights_fingerprint(model: EncodingModel) -> str:
    """First 16 hex digits of the sha256 of the parameters that decide the values: S3D, the projection's bias, the
    selected regression. The projection bias, -(mean/scale) @ components.T, depends on every
    entry of BERG's PCA file, so the (F, K) matrix itself need not be hashed (~0.1 s here)."""
    h = hashlib.sha256()
    s3d_leaves = jax.tree_util.tree_leaves_with_path(model.params.s3d)
    for path, leaf in sorted(s3d_leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    # (ROI-mean heads are folded from the whole-brain regression and BERG's ROI indices; their
    # leaves count too, so an ROI-means-only job still has a fingerprint of its values.)
    for leaf in (model.params.projection["bias"], *jax.tree_util.tree_leaves(model.params.regression),
                 *jax.tree_util.tree_leaves(model.params.roi_means)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def job_config(model: EncodingModel, pad_short: bool = False, decoder: str = "cpu") -> dict:
    """The run_config of a job: exactly the settings that change the values written.

    A resume with a different run_config is refused (`writer.OutputDirError`); batch
    size, device, decode threads and timings may change between attempts and go to
    run.json's run_info instead. `pad_short` is part of the job because it turns a failed
    row into values; the weights fingerprint catches the same command pointed at other
    weights (e.g. the demo's synthetic ones); `decoder` ("cpu" | "gpu" | "both", resolved)
    because NVDEC's pixels differ from the CPU readers' by up to 2 levels.
    """
    files = output_files(model)
    config = {
        "model_id": model.model_id,
        "subject": model.subject if isinstance(model.subject, int) else list(model.subjects),
        "selection": _selection_config(model),
        "n_voxels": ({files[s]: model.n_voxels_of(s) for s in model.subjects if s in files}
                     if model.returns_dict else int(model.n_voxels)),
        "pad_short": bool(pad_short),
        "weights_fingerprint": _weights_fingerprint(model),
    }
    if model.with_components:
        config["n_components"] = int(model.n_components)
    if model.precision != "highest":
        # tf32/bf16 rows differ from highest ones (on accelerators): never mixed in one OUT.
        # Absent for "highest", so folders written before precision was a choice still resume.
        config["precision"] = model.precision
    if model.roi_names:
        # The columns of each ROI-means array: `rank` and the CSVs read them here. Absent
        # without ROI means, so older folders still resume.
        config[ROI_MEANS_CONFIG] = {files[(ROI_MEANS, s)]: list(names) for s, names in model.roi_names.items()}
    if decoder != "cpu":
        # Absent for "cpu", so folders written before the choice existed still resume.
        config["decoder"] = decoder
    return config


def plot_file_name(path: str, row: int, n_rows: int) -> str:
    """`<row>_<stem>.png`, the same naming as `volume_file_name`."""
    return volume_file_name(path, row, n_rows)[: -len(".nii.gz")] + ".png"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- batching


def _group_by_size(
    batches: Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]],
    batch_size: int,
    on_failures: Any,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices, clips, errors) batches -> (indices, stacked frames) groups of one frame size.

    Failures are handed to `on_failures` as they arrive. Clips wait per size until
    `batch_size` of that size are there; to bound memory (many sizes, few files each) the
    oldest partial group is sent on early whenever more than 2 * batch_size clips wait.
    With one size this is exactly the decode batches; with several, no call computes more
    padding than it must.
    """
    waiting: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    n_waiting = 0

    def take(shape: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
        nonlocal n_waiting
        group = waiting.pop(shape)
        n_waiting -= len(group)
        return [i for i, _ in group], stack_clips([c for _, c in group])

    for indices, clips, errors in batches:
        if errors:
            on_failures(errors)
        for i, clip in zip(indices, clips, strict=True):
            group = waiting.setdefault(clip.shape, [])
            group.append((i, clip))
            n_waiting += 1
            if len(group) == batch_size:
                yield take(clip.shape)
        while n_waiting > 2 * batch_size:
            yield take(next(iter(waiting)))  # dicts keep insertion order: the oldest group
    while waiting:
        yield take(next(iter(waiting)))


def stack_clips(clips: list[Any]) -> Any:
    """(14, H, W, 3) clips -> (n, 14, H, W, 3): numpy on the host, or a jax.Array on the
    device where any clip is one already (NVDEC's): the host clips then go over, not the GPU's back."""
    on_device = [c for c in clips if isinstance(c, jax.Array)]
    if on_device:
        import jax.numpy as jnp

        device = next(iter(on_device[0].devices()))  # the NVDEC clips' GPU, not JAX's default one
        return jnp.stack([c if isinstance(c, jax.Array) else jax.device_put(c, device) for c in clips])
    return np.stack(clips)


# --------------------------------------------------------------------------- the job


def encode_files(
    model: EncodingModel,
    paths: list[str],
    out_dir: str | os.PathLike,
    *,
    batch_size: int | None = None,
    pad_short: bool = False,
    nifti: bool = False,
    plot: bool = False,
    show_progress: bool = True,
    decode_threads: int = 2,
    decode_workers: int | None = None,
    decoder: str = "auto",
    gpu_decode_threads: int | None = None,
) -> dict:
    """Encode video files into OUT: responses.npy, manifest.csv, run.json (+ NIfTI, plots).

    A several-subject model writes `responses_sub-SS.npy` per subject (and NIfTIs
    `responses_sub-SS.nii.gz`), a model with components `components.npy` (n, K) float32,
    a model with ROI means `roi_means_sub-SS.npy` (n, R) float32 and, at the end,
    `roi_means_sub-SS.csv` (`roi_means.write_roi_means_csv`); see `output_files`.

    Resumable: run it again with the same model, selection, paths and pad_short after an
    interruption (Ctrl-C, kill -9, power loss) and it computes only the rows not yet
    recorded; responses.npy and manifest.csv end byte-identical to an uninterrupted run's
    (given the same batch size and device: every call is padded to the full batch, and a
    row does not depend on which videos share its batch, but XLA may round differently for
    another compiled batch shape). A different job in the same OUT is refused with
    `writer.OutputDirError`. Every run also tries again the files whose decode worker was
    killed from outside (SIGKILL, SIGTERM: `decode_workers.died_externally`); files that
    crashed their worker themselves (SIGSEGV, SIGABRT, ...) stay failed.

    Args:
      model: from `BERG.get_encoding_model`.
      paths: video files, in output-row order (see `video.list_videos` for folders).
      out_dir: OUT, created if missing (see `writer` for the file formats).
      batch_size: videos per device call; default `model.batch_size`.
      pad_short: repeat the last frame of videos shorter than 14 frames instead of failing them.
      nifti: also write OUT/responses.nii.gz (4-D, MNI152; see the module docstring).
      plot: also draw one glass-brain PNG per encoded video into OUT/plots/ (needs the
        `plot` extra; checked before any work starts).
      show_progress: tqdm bar on stderr (videos done, videos/s, ETA; resumed rows count as done).
      decode_threads: video decoding threads, where decode_workers is 0.
      decode_workers: video decoding worker processes (`decode_workers.prefetch_clips`);
        default `decode_workers.default_decode_workers()` (the usable cores less 2, at
        least 1); 0 decodes in decode_threads threads of this process instead.
      decoder: "auto" (default: "both" on an NVIDIA GPU with the `gpu-decode` extra, else
        "cpu"), "cpu", "gpu" (NVDEC threads; files NVDEC does not take go to the CPU reader,
        with the reason in run.json) or "both" (NVDEC threads and decode_threads CPU
        threads on one queue); see `gpu_decode`. "gpu"/"both" are part of the job.
      gpu_decode_threads: NVDEC threads (default `gpu_decode.DEFAULT_GPU_THREADS`).
    Returns:
      run.json's content plus "out_dir", "outputs" ({name: path}) and "failed" ([(path, reason)]).
    Raises:
      OutputDirError: OUT holds another job, or is in use.
      InvalidParameterError: no paths, batch_size / decode_threads < 1, decode_workers < 0,
        or decoder "gpu"/"both" without an NVIDIA GPU or PyNvVideoCodec (before anything
        is written).
      ModelLoadError: nifti/plot and the subject's metadata file is missing.
      plots.PlotDependencyError: plot without nilearn/matplotlib.
    Failures of single videos are never raised: they are recorded in manifest.csv.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise InvalidParameterError("no input videos given")
    if batch_size is not None and batch_size != model.batch_size:
        if int(batch_size) < 1:
            raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
        model = dataclasses.replace(model, batch_size=int(batch_size))
    # Checked here, not per batch: a batch the devices can't split would fail every video.
    check_batch_size(model.batch_size, max(len(model.devices), 1))
    if decode_threads < 1:
        raise InvalidParameterError(f"decode_threads must be >= 1, got {decode_threads}")
    if decode_workers is None:
        decode_workers = default_decode_workers()
    if decode_workers < 0:
        raise InvalidParameterError(f"decode_workers must be >= 0 (0: threads), got {decode_workers}")
    from berg_jax.gpu_decode import DEFAULT_GPU_THREADS, device_platform, resolve_decoder

    decoder = resolve_decoder(decoder, device_platform(model.device))
    gpu_decode_threads = DEFAULT_GPU_THREADS if gpu_decode_threads is None else int(gpu_decode_threads)
    if decoder != "cpu" and gpu_decode_threads < 1:
        raise InvalidParameterError(f"gpu_decode_threads must be >= 1, got {gpu_decode_threads}")
    bs = model.batch_size
    out = Path(out_dir)

    # Everything that can fail for the whole job fails here, before any video is read.
    metadata = {}
    if (nifti or plot) and not (model.subjects and model.with_responses):
        raise InvalidParameterError("NIfTI files and plots are of voxel responses: load a subject with "
                                    "its responses, not only components or ROI means")
    if plot and not isinstance(model.subject, int):
        raise InvalidParameterError("plots are drawn for one subject; encode with a single subject to plot")
    if nifti or plot:
        from berg_jax.berg_files import load_metadata

        metadata = {s: load_metadata(model.berg_dir, s) for s in model.subjects}
    if plot:
        from berg_jax import plots

        plots.require_plotting()
    names = output_files(model)
    config = job_config(model, pad_short, decoder)
    # Files whose decode worker was killed from outside (the OOM killer, a kill) failed through
    # no fault of their own: every run of the job tries them again (decode_workers.died_externally).
    writer = ResponseWriter.open(out, paths, {f: model.output_columns[k] for k, f in names.items()}, config,
                                 show_progress=show_progress, retry_failed=died_externally,
                                 manifest_columns=(DECODER_COLUMN,) if decoder != "cpu" else ())
    retried = retry_note(writer.retried)
    for note in writer.repairs + ([retried["why"]] if retried else []):
        # a resume that found damage or retries failures says what it computes again, and why
        print(f"berg-jax: {out}: {note}", file=sys.stderr, flush=True)
    try:
        stats = _encode_pending(writer, model, paths, bs, pad_short, show_progress, decode_threads,
                                decode_workers, decoder, gpu_decode_threads)
        files = {("responses" if f == RESPONSES_FILE else f[: -len(".npy")]): out / f
                 for f in names.values()}
        files.update({"manifest": out / MANIFEST_FILE, "run": out / RUN_FILE})
        # Before run.json (written last): a folder with run.json has its CSVs.
        with stop_on_full_disk(writer, "the ROI means' CSVs"):
            csvs = write_csvs_for_job(out, paths, config)
        files.update(csvs)
        status = writer.manifest_rows()
        checked_files = [p.name for p in csvs.values()]  # run.json records their CRC-32 for `verify`
        if nifti:
            for s in model.subjects:
                fmri = metadata[s]["fmri"]
                nii = names[s][: -len(".npy")] + ".nii.gz"
                with stop_on_full_disk(writer, nii):
                    write_responses_nifti(
                        out / nii, writer.arrays[names[s]], fmri["sub_mask"],
                        fmri["sub_mask_affine"], header=fmri.get("sub_mask_header"),
                        selected_indices=model.voxels_of(s))
                checked_files.append(nii)
                files["nifti" if nii == NIFTI_FILE else nii[: -len(".nii.gz")] + "_nifti"] = out / nii
        if plot:
            with stop_on_full_disk(writer, f"the plots in {PLOTS_DIR}/"):
                files["plots"] = _draw_plots(writer, model, metadata[model.subject], out / PLOTS_DIR, status)
        run_info = {
            "berg_jax_version": _version(),
            "jax_version": jax.__version__,
            "device": str(model.device),
            "n_devices": max(len(model.devices), 1),
            "device_kind": getattr(model.device, "device_kind", model.device.platform),
            "platform": model.device.platform,
            "batch_size": bs,
            "decode_threads": decode_threads,
            "decode_workers": decode_workers,
            "decoder": decoder,
            "precision": str(model.precision),
            "outputs": {k: str(v) for k, v in files.items()},
            **stats,
            "end_time": _now(),
        }
        if writer.repairs:
            run_info["repaired"] = writer.repairs
        if retried:
            run_info["retried"] = retried
        run = writer.finish(run_info, checked_files=checked_files)
    finally:
        writer.close()
    failed = [(p, err) for p, _, s, err, *_ in status if s == "failed"]
    return {**run, "out_dir": str(out), "outputs": files, "failed": failed}


def retry_note(retried: dict[int, str]) -> dict | None:
    """run.json's record of the failed rows this run tries again, or None when there are none.

    Args:
      retried: {row: its recorded failure} (`ResponseWriter.retried`).
    Returns:
      {"n_rows": int, "rows": "3, 7-9" (ranges), "why": one sentence for people}.
    """
    if not retried:
        return None
    rows = sorted(retried)
    signals = " or ".join(str(s) for s in sorted(EXTERNAL_SIGNALS))
    return {
        "n_rows": len(rows),
        "rows": format_rows(rows),
        "why": (f"retrying {len(rows)} row{'s' if len(rows) != 1 else ''} ({format_rows(rows)}) recorded as "
                f"failed because the decode worker reading the file was killed from outside (signal {signals}: "
                "the out-of-memory killer, a kill), not by the file"),
    }


def stop_on_full_disk(writer: ResponseWriter, what: str) -> Any:
    """`no_room_is_an_error` for a file written after every row is recorded: a rerun writes only it again."""
    return no_room_is_an_error(writer.out_dir, what, kept=f": it resumes; all {writer.n_inputs} rows are "
                                                          f"recorded, only {what} is written again")


def _version() -> str:
    import berg_jax

    return berg_jax.__version__


def _encode_pending(
    writer: ResponseWriter,
    model: EncodingModel,
    paths: list[str],
    bs: int,
    pad_short: bool,
    show_progress: bool,
    decode_threads: int,
    decode_workers: int = 0,
    decoder: str = "cpu",
    gpu_decode_threads: int = 1,
) -> dict:
    """Compute every pending row; returns this attempt's counts and timings for run.json."""
    from tqdm.auto import tqdm

    pending = writer.pending()
    todo = set(pending)
    skip = frozenset(i for i in range(len(paths)) if i not in todo)
    n_resumed = len(paths) - len(pending)
    start_time = _now()
    t0 = time.perf_counter()
    first_result_s: float | None = None
    counts = {"ok": 0, "failed": 0}
    bar = tqdm(total=len(paths), initial=n_resumed, unit="video", disable=not show_progress,
               desc=f"encoding {model.label}", dynamic_ncols=True, smoothing=0.1)

    def record_failures(errors: dict[int, str]) -> None:
        for i in sorted(errors):  # one journal line per file: each has its own reason
            writer.mark_failed(i, errors[i])
        counts["failed"] += len(errors)
        bar.update(len(errors))

    names = output_files(model)

    routes: dict[int, tuple[str, str | None]] = {}  # NVDEC runs: index -> (decoder, fallback reason)
    if decoder != "cpu":
        from berg_jax import gpu_decode

        decoded = gpu_decode.prefetch_clips(
            paths, bs, gpu_threads=gpu_decode_threads, cpu_threads=decode_threads if decoder == "both" else 0,
            queue_size=2, skip=skip, routes=routes, pad_short=pad_short,
            # CUDA's number for the GPU in this process (Device.id counts across all hosts)
            gpu_id=getattr(model.device, "local_hardware_id", None) or 0)
    elif decode_workers:
        decoded = prefetch_clips_in_processes(paths, bs, read=read_clip, num_workers=decode_workers,
                                              queue_size=2, skip=skip, pad_short=pad_short)
    else:
        decoded = prefetch_clips(paths, bs, read=read_clip, num_threads=decode_threads,
                                 queue_size=2, skip=skip, pad_short=pad_short)
    groups = _group_by_size(decoded, bs, record_failures)
    # Groups taken from `groups` whose rows are not written yet (at most three: one being
    # staged, one on the device, one coming back). When the encoder fails on one, that
    # group's videos are recorded as failed and the others are fed again, so one video that
    # breaks the device (e.g. out of memory at a huge frame size) never stops the run.
    in_flight: list[tuple[list[int], np.ndarray]] = []
    retry: list[tuple[list[int], np.ndarray]] = []

    def feed_groups() -> Iterator[tuple[tuple[list[int], np.ndarray], np.ndarray]]:
        while retry:
            in_flight.append(retry.pop(0))
            yield in_flight[-1], in_flight[-1][1]
        for group in groups:
            in_flight.append(group)
            yield group, group[1]

    encode = model.encode_fn()
    try:
        while True:
            try:
                for (indices, _), result in feed.run_batches(encode, feed_groups(), model.call_size, model.put):
                    notes = ({DECODER_COLUMN: [decoder_note(routes.get(i)) for i in indices]}
                             if decoder != "cpu" else None)
                    writer.write_rows(indices, {names[k]: v for k, v in flat_outputs(result).items()}, notes)
                    in_flight.pop(0)
                    counts["ok"] += len(indices)
                    bar.update(len(indices))
                    if first_result_s is None:
                        first_result_s = time.perf_counter() - t0
                break
            except feed.BatchFailed as exc:
                culprit = in_flight.pop(next(k for k, g in enumerate(in_flight) if g is exc.key))
                cause = exc.cause
                reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                record_failures({i: f"{paths[i]}: encoding failed on {model.device.platform}: "
                                    f"{type(cause).__name__}: {reason}" for i in culprit[0]})
                retry[:0] = in_flight
                in_flight.clear()
    finally:
        groups.close()
        decoded.close()  # cancels queued decodes, joins the decoding threads / reaps the workers
        bar.close()
    seconds = time.perf_counter() - t0
    n_run = counts["ok"] + counts["failed"]
    return {
        "start_time": start_time,
        "n_resumed": n_resumed,
        "n_this_run": n_run,
        "n_ok_this_run": counts["ok"],
        "n_failed_this_run": counts["failed"],
        "seconds": round(seconds, 3),
        "first_result_seconds": None if first_result_s is None else round(first_result_s, 3),
        "videos_per_s": round(n_run / seconds, 4) if seconds > 0 and n_run else 0.0,
        **({"decoded_by": decoded_by(routes)} if decoder != "cpu" else {}),
    }


def decoder_note(route: tuple[str, str | None] | None) -> str:
    """manifest.csv's decoder column for one file: "gpu", "cpu", or "cpu (why NVDEC did not take it)"."""
    if route is None:
        return ""
    who, why = route
    return f"{who} ({why})" if why else who


def decoded_by(routes: dict[int, tuple[str, str | None]]) -> dict:
    """run.json's account of an NVDEC run: files per decoder and why NVDEC left files to the CPU."""
    counts = {"gpu": 0, "cpu": 0}
    reasons: dict[str, int] = {}
    for who, why in routes.values():
        counts[who] = counts.get(who, 0) + 1
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    return {**counts, "cpu_because": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _draw_plots(writer: ResponseWriter, model: EncodingModel, metadata: dict,
                plot_dir: Path, status: list[tuple[str, int, str, str]]) -> Path:
    """One glass-brain PNG per ok row (kept when already there: a resumed job is the same job)."""
    from berg_jax import plots

    fmri = metadata["fmri"]
    n = len(status)
    for path, row, state, *_ in status:
        if state != "ok":
            continue
        png = plot_dir / plot_file_name(path, row, n)
        if png.exists():
            continue
        plots.plot_response(
            np.asarray(writer.responses[row]), fmri["sub_mask"], fmri["sub_mask_affine"], png,
            selected_indices=model.voxels_of(model.subject),
            title=f"{Path(path).name} (sub-{model.subject:02d}, row {row})")
    return plot_dir


# --------------------------------------------------------------------------- components -> responses


def responses_from_components_file(
    components_path: str | os.PathLike,
    berg_dir: str | os.PathLike,
    subject: Any,
    out_dir: str | os.PathLike,
    *,
    selection: dict | None = None,
    device: str = "auto",
    show_progress: bool = True,
    batch_rows: int = 4096,
) -> dict[int, Path]:
    """OUT/components.npy -> responses files, as `encode` would have written them directly.

    Streams `batch_rows` rows at a time (a million-clip components.npy is 400 MB; its
    whole-brain responses 430 GB per subject), each file written under a temporary name and
    renamed when complete. One subject (int) writes `responses.npy`; a list or "all" writes
    `responses_sub-SS.npy` each, the names `encode` uses.

    Returns:
      {subject: path written}.
    """
    from tqdm.auto import tqdm

    from berg_jax.api import load_heads

    components = _read_components(components_path, berg_dir)
    out = _components_out_dir(out_dir)
    heads = load_heads(berg_dir, subject, selection, device)
    out.mkdir(parents=True, exist_ok=True)
    one = isinstance(subject, (int, np.integer))
    written = {}
    n = components.shape[0]
    bar = tqdm(total=n * len(heads), unit="video", disable=not show_progress, desc="components -> responses",
               dynamic_ncols=True)
    for s, regression in heads.items():
        target = out / responses_file(s, one)
        shape = (n, regression["coef"].shape[1])
        with no_room_is_an_error(out, target.name, file_bytes(shape), kept=lambda: _complete(written.values())):
            _head_to_npy(components, regression, target, batch_rows, bar)
        written[s] = target
    bar.close()
    return written


def _head_to_npy(components: np.ndarray, regression: Any, target: Path, batch_rows: int, bar: Any) -> None:
    """(n, K) components through one head, `batch_rows` at a time, into the float32 (n, columns) .npy `target`
    (written under a temporary name, renamed when whole); `bar` counts the rows."""
    from berg_jax.api import apply_head

    n = components.shape[0]
    with atomic_npy(target, (n, regression["coef"].shape[1])) as mm:
        for lo in range(0, n, batch_rows):
            block = components[lo: lo + batch_rows]
            mm[lo: lo + len(block)] = apply_head(block, regression)
            bar.update(len(block))


def _complete(paths: Any) -> str:
    """What a rerun after a full disk finds already done: " (the files already written are complete: ...)"."""
    return f" (the files already written are complete: {', '.join(p.name for p in paths) or 'none'})"


def roi_means_from_components_file(
    components_path: str | os.PathLike,
    berg_dir: str | os.PathLike,
    subject: Any,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    show_progress: bool = True,
    batch_rows: int = 4096,
) -> dict[int, tuple[Path, Path]]:
    """OUT/components.npy -> `roi_means_sub-SS.npy` and `.csv` per subject, as `encode --roi-means` writes them.

    Streams `batch_rows` rows at a time through each subject's ROI-mean head (the one the
    encoder applies), each file written under a temporary name and renamed when complete.
    The CSV's path column comes from the job.json beside the components file (the encode
    folder it came from) when that job has as many inputs as there are rows; else it is empty.

    Returns:
      {subject: (npy path, csv path)}.
    """
    from tqdm.auto import tqdm

    from berg_jax.api import load_roi_heads

    components = _read_components(components_path, berg_dir)
    out = _components_out_dir(out_dir)
    heads = load_roi_heads(berg_dir, subject, device)
    out.mkdir(parents=True, exist_ok=True)
    n = components.shape[0]
    paths = _inputs_beside(Path(components_path), n)
    written = {}
    bar = tqdm(total=n * len(heads), unit="video", disable=not show_progress, desc="components -> ROI means",
               dynamic_ncols=True)
    try:
        for s, roi_head in heads.items():
            target = out / roi_means_file(s)
            with no_room_is_an_error(out, f"sub-{s:02d}'s ROI means",
                                     kept=lambda: _complete(p for pair in written.values() for p in pair)):
                _head_to_npy(components, roi_head.regression, target, batch_rows, bar)
                means = np.load(target, mmap_mode="r")
                written[s] = (target, write_roi_means_csv(target.with_suffix(".csv"), means, roi_head.names, paths))
                del means
    finally:
        bar.close()
    return written


def _inputs_beside(components_path: Path, n: int) -> list[str] | None:
    """The input paths of the encode job whose components these are, if its job.json is beside them."""
    try:
        job = json.loads((components_path.parent / JOB_FILE).read_text("utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return None
    inputs = job.get("inputs") if isinstance(job, dict) else None
    return list(inputs) if isinstance(inputs, list) and len(inputs) == n else None


def _read_components(components_path: str | os.PathLike, berg_dir: str | os.PathLike) -> np.ndarray:
    """components.npy memory-mapped, checked: float32 (n, K) with berg_dir's K."""
    path = Path(components_path)
    try:
        components = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InvalidParameterError(f"{path}: no such file; pass the components.npy that "
                                    "`berg-jax encode --components` wrote") from None
    except (ValueError, OSError) as exc:
        raise InvalidParameterError(f"{path}: not a readable .npy ({exc})") from None
    if components.ndim != 2 or components.dtype != np.float32:
        raise InvalidParameterError(f"{path}: expected float32 (n, K) components, got {components.dtype} "
                                    f"{components.shape}")
    from berg_jax import head

    k = head.converted_components(berg_dir) if head.is_converted(berg_dir) else None
    if k is not None and components.shape[1] != k:
        raise InvalidParameterError(f"{path}: {components.shape[1]} components per video, but the model in "
                                    f"{berg_dir} has K = {k}; were they written with another berg_dir?")
    return components


def _components_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if (out / JOB_FILE).exists():
        # An encode folder's arrays belong to its job.json; writing beside them would
        # replace its responses.npy with another subject's.
        raise InvalidParameterError(f"{out} is a `berg-jax encode` output folder; write the responses "
                                    "to a folder of their own (e.g. --out OUT/responses_from_components)")
    return out
