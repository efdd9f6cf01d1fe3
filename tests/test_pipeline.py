"""berg_jax.pipeline.encode_files: video files -> OUT, in process.

One small synthetic model (K=8, batch size 2) and tiny videos of two frame sizes (64x80,
48x64), so the whole module compiles the encoder for only those two shapes (~3-5 s each
on a 2-core CPU); tests/test_cli.py uses the same model shapes, and the jit cache is
shared within the pytest process.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")  # the videos are written with PyAV

import jax  # noqa: E402

from berg_jax import pipeline, volumes  # noqa: E402
from berg_jax.api import BERG, EncodingModel  # noqa: E402
from berg_jax.berg_files import N_VOXELS, load_metadata  # noqa: E402
from berg_jax.errors import InvalidParameterError, ModelLoadError  # noqa: E402
from berg_jax.writer import OutputDirError  # noqa: E402
from berg_jax.pipeline import _group_by_size, encode_files  # noqa: E402
from berg_jax.synthetic_berg import make_synthetic_model  # noqa: E402
from berg_jax.video import read_clip  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402

MODEL = "fmri-bmd-s3d"
BATCH = 2
N_VOX = N_VOXELS[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A synthetic berg_dir (K=8, subject 1) and a seeded S3D .pth."""
    return make_synthetic_model(tmp_path_factory.mktemp("pipeline"), n_components=8, seed=0)


@pytest.fixture(scope="module")
def berg(env):
    return BERG(env[0], s3d_weights=env[1])


@pytest.fixture(scope="module")
def model(berg):
    return berg.get_encoding_model(MODEL, subject=1, batch_size=BATCH)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four 64x80 videos, two 48x64 ones (interleaved), one corrupt file, one missing path."""
    d = tmp_path_factory.mktemp("pipeline_videos")
    paths = [
        vf.write_test_video(d / "a0.mp4", n_frames=14, height=64, width=80, seed=1),
        vf.write_test_video(d / "b0.mp4", n_frames=16, height=48, width=64, seed=2),
        vf.write_test_video(d / "a1.mp4", n_frames=20, height=64, width=80, seed=3),
        vf.write_random_bytes(d / "corrupt.mp4"),
        vf.write_test_video(d / "a2.mkv", n_frames=17, height=64, width=80, seed=4),
        vf.write_test_video(d / "b1.mp4", n_frames=15, height=48, width=64, seed=5),
        str(d / "missing.mp4"),
        vf.write_test_video(d / "a3.mp4", n_frames=18, height=64, width=80, seed=6),
    ]
    return paths


BAD = {3: "not a readable video container", 6: "no such file"}


@pytest.fixture(scope="module")
def run(model, videos, tmp_path_factory):
    """One whole-brain run with NIfTI: (summary, OUT)."""
    out = tmp_path_factory.mktemp("pipeline_out") / "out"
    summary = encode_files(model, videos, out, nifti=True, show_progress=False)
    return summary, out


def test_responses_equal_berg_encode_row_for_row(run, berg, model, videos):
    summary, out = run
    responses = np.load(out / "responses.npy")
    assert responses.shape == (len(videos), N_VOX) and responses.dtype == np.float32
    # BERG.encode on the same decoded frames, per frame size; >= 2 videos per call, so it
    # runs the same compiled batch of 2 as the pipeline.
    for size in ((64, 80), (48, 64)):
        rows = [i for i, p in enumerate(videos) if i not in BAD and read_clip(p).shape[1:3] == size]
        expected = berg.encode(model, np.stack([read_clip(videos[i]) for i in rows]), show_progress=False)
        for j, i in enumerate(rows):
            np.testing.assert_array_equal(responses[i], expected[j], err_msg=videos[i])
    for i in BAD:
        assert np.isnan(responses[i]).all()
    assert np.isfinite(np.delete(responses, list(BAD), axis=0)).all()


def test_manifest_and_failures(run, videos):
    summary, out = run
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "row", "status", "error"]
    assert [r[0] for r in rows[1:]] == videos and [r[1] for r in rows[1:]] == [str(i) for i in range(len(videos))]
    for i, (path, _, status, error) in enumerate(rows[1:]):
        if i in BAD:
            assert status == "failed" and error.startswith(path) and BAD[i] in error
        else:
            assert (status, error) == ("ok", "")
    assert summary["failed"] == [(videos[i], rows[1 + i][3]) for i in sorted(BAD)]


def test_run_json(run, model):
    summary, out = run
    info = json.loads((out / "run.json").read_text())
    assert info["model_id"] == MODEL and info["subject"] == 1 and info["selection"] is None
    assert info["n_voxels"] == N_VOX and info["pad_short"] is False
    assert info["n_inputs"] == 8 and info["n_ok"] == 6 and info["n_failed"] == 2
    assert info["n_this_run"] == 8 and info["n_resumed"] == 0
    assert info["jax_version"] == jax.__version__ and info["berg_jax_version"]
    assert info["device"] == str(model.device) and info["batch_size"] == BATCH
    for key in ("start_time", "end_time"):
        assert datetime.datetime.fromisoformat(info[key]).tzinfo is not None
    assert info["videos_per_s"] > 0 and info["seconds"] > 0
    assert summary["n_ok"] == 6 and summary["outputs"]["nifti"] == out / "responses.nii.gz"


def test_nifti_volumes_hold_the_responses(run, env):
    nib = pytest.importorskip("nibabel")
    _, out = run
    meta = load_metadata(env[0], 1)
    mask = meta["fmri"]["sub_mask"]
    img = nib.load(out / "responses.nii.gz")
    assert img.shape == mask.shape + (8,)
    np.testing.assert_array_equal(img.affine, meta["fmri"]["sub_mask_affine"])
    vol = np.asarray(img.dataobj, dtype=np.float32)
    responses = np.load(out / "responses.npy")
    coords = np.argwhere(mask)  # C order: column j of the responses is coords[j]
    for t in range(8):
        v = vol[..., t]
        np.testing.assert_array_equal(v[tuple(coords.T)], responses[t])
        assert np.isnan(v[~mask]).all()


def test_rerun_finds_everything_done(run, model, videos):
    _, out = run
    before = {n: (out / n).read_bytes() for n in ("responses.npy", "manifest.csv", "responses.nii.gz")}
    summary = encode_files(model, videos, out, nifti=True, show_progress=False)
    assert summary["n_this_run"] == 0 and summary["n_resumed"] == 8
    assert {n: (out / n).read_bytes() for n in before} == before


def test_resume_recomputes_only_unrecorded_rows(run, model, videos, tmp_path):
    """A run whose journal lost its tail (as after kill -9) ends byte-identical to a full one."""
    _, full = run
    out = tmp_path / "out"
    out.mkdir()
    for name in ("job.json", "responses.npy", "progress.jsonl"):
        (out / name).write_bytes((full / name).read_bytes())
    journal = (full / "progress.jsonl").read_bytes().splitlines(keepends=True)
    # keep the first entry, tear the second in half; scribble over the rows of the rest
    (out / "progress.jsonl").write_bytes(journal[0] + journal[1][: len(journal[1]) // 2])
    kept = json.loads(journal[0])["rows"]
    resp = np.load(out / "responses.npy", mmap_mode="r+")
    resp[[i for i in range(8) if i not in kept]] = 7.0
    resp.flush()
    del resp
    summary = encode_files(model, videos, out, nifti=True, show_progress=False)
    assert summary["n_resumed"] == len(kept) and summary["n_this_run"] == 8 - len(kept)
    for name in ("responses.npy", "manifest.csv", "responses.nii.gz"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name


def test_a_different_job_is_refused(run, model, videos):
    _, out = run
    with pytest.raises(OutputDirError, match=r"different job .*pad_short.*choose another --out"):
        encode_files(model, videos, out, pad_short=True, show_progress=False)
    with pytest.raises(OutputDirError, match=r"different job .*input 0"):
        encode_files(model, videos[::-1], out, show_progress=False)


def test_job_config_selection(berg, model):
    roi = berg.get_encoding_model(MODEL, subject=1, selection={"roi": "lFFA"}, batch_size=BATCH)
    assert pipeline.job_config(roi)["selection"] == {"roi": "lFFA"}
    mask = np.zeros(N_VOX, np.int64)
    mask[[3, 5, 8]] = 1
    a = berg.get_encoding_model(MODEL, subject=1, selection={"voxels": mask}, batch_size=BATCH)
    b = berg.get_encoding_model(MODEL, subject=1, selection={"voxels": mask.astype(bool)}, batch_size=BATCH)
    cfg = pipeline.job_config(a)
    assert cfg == pipeline.job_config(b)  # the same mask as ints or bools is the same job
    assert cfg["selection"]["voxels_count"] == 3 and len(cfg["selection"]["voxels_sha256"]) == 64
    full = pipeline.job_config(model)
    assert full["selection"] is None and full["weights_fingerprint"] != cfg["weights_fingerprint"]
    assert pipeline.job_config(model, pad_short=True)["pad_short"] is True


def test_failures_on_the_device_are_recorded_and_the_run_goes_on(model, videos, tmp_path, monkeypatch):
    """An encoder error for one group (at dispatch, or when its result is pulled back) fails
    that group's videos only."""
    real = EncodingModel.encode_fn
    clip7 = read_clip(videos[7])

    class Poisoned:
        def __array__(self, *a, **k):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: simulated out of memory")

    def encode_fn(self, *args, **kwargs):
        fn = real(self, *args, **kwargs)

        def wrapped(frames, n_valid=None):
            if frames.shape[2:4] == (48, 64):
                raise RuntimeError("simulated compile failure for 48x64")
            if any(np.array_equal(f, clip7) for f in np.asarray(frames)):
                return Poisoned()
            return fn(frames, n_valid)
        return wrapped

    monkeypatch.setattr(EncodingModel, "encode_fn", encode_fn)
    summary = encode_files(model, videos, tmp_path / "out", show_progress=False)
    failed = dict(summary["failed"])
    # 1 and 5 (48x64) fail at dispatch; 7 shares its group with 4 (the other 64x80 left over)
    assert set(failed) == {videos[i] for i in (1, 3, 4, 5, 6, 7)}
    assert "encoding failed on cpu: RuntimeError: simulated compile failure" in failed[videos[1]]
    assert "JaxRuntimeError: RESOURCE_EXHAUSTED" in failed[videos[7]]
    assert failed[videos[3]].endswith("Invalid data found when processing input")
    assert summary["n_ok"] == 2
    responses = np.load(tmp_path / "out" / "responses.npy")
    assert np.isfinite(responses[[0, 2]]).all() and np.isnan(responses[[1, 4, 5, 7]]).all()


def test_plots_one_png_per_ok_video(run, model, videos):
    pytest.importorskip("nilearn")
    _, out = run
    encode_files(model, videos, out, nifti=True, plot=True, show_progress=False)
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == sorted(pipeline.plot_file_name(videos[i], i, 8) for i in range(8) if i not in BAD)
    assert all((out / "plots" / n).read_bytes().startswith(b"\x89PNG") for n in pngs)


def test_plot_without_the_extra_fails_before_any_work(model, videos, tmp_path, monkeypatch):
    from berg_jax import plots

    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn -> ImportError
    with pytest.raises(plots.PlotDependencyError, match=r"pip install 'berg-jax\[plot\]'"):
        encode_files(model, videos, tmp_path / "out", plot=True, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_metadata_fails_before_any_work(model, videos, tmp_path):
    elsewhere = dataclasses.replace(model, berg_dir=tmp_path / "no_berg")
    with pytest.raises(ModelLoadError, match="metadata_sub-01.npy"):
        encode_files(elsewhere, videos, tmp_path / "out", nifti=True, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_argument_errors(model, videos, tmp_path):
    with pytest.raises(InvalidParameterError, match="no input videos"):
        encode_files(model, [], tmp_path / "out")
    with pytest.raises(InvalidParameterError, match="batch_size"):
        encode_files(model, videos, tmp_path / "out", batch_size=0)
    with pytest.raises(InvalidParameterError, match="decode_threads"):
        encode_files(model, videos, tmp_path / "out", decode_threads=0)


# --- grouping by frame size (no compilation) -----------------------------------------


def _clip(h: int, w: int, tag: int) -> np.ndarray:
    return np.full((14, h, w, 3), tag, np.uint8)


def test_group_by_size_one_size_keeps_the_decode_batches():
    batches = [([0, 1], [_clip(4, 6, 0), _clip(4, 6, 1)], {}), ([3], [_clip(4, 6, 3)], {2: "bad"})]
    failures = []
    groups = list(_group_by_size(iter(batches), 2, failures.append))
    assert [g[0] for g in groups] == [[0, 1], [3]]
    assert groups[0][1].shape == (2, 14, 4, 6, 3) and groups[1][1][0, 0, 0, 0, 0] == 3
    assert failures == [{2: "bad"}]


def test_group_by_size_fills_groups_across_batches_and_bounds_memory():
    a, b, c = (4, 6), (8, 6), (2, 2)
    sizes = [a, b, a, c, b, b, a, c]
    batches = [([i, i + 1], [_clip(*sizes[i], i), _clip(*sizes[i + 1], i + 1)], {}) for i in range(0, 8, 2)]
    groups = list(_group_by_size(iter(batches), 2, lambda e: None))
    for indices, frames in groups:
        assert len({sizes[i] for i in indices}) == 1 and len(indices) <= 2
        assert [int(f[0, 0, 0, 0]) for f in frames] == indices
    assert sorted(i for g in groups for i in g[0]) == list(range(8))
    # full groups go as soon as they fill: [0, 2] (a) after batch 2, [1, 4] (b) after batch 3
    assert groups[0][0] == [0, 2] and groups[1][0] == [1, 4]
    # with batch size 1 nothing ever waits
    assert [g[0] for g in _group_by_size(iter(batches), 1, lambda e: None)] == [[i] for i in range(8)]


def test_group_by_size_caps_waiting_clips():
    """Many sizes, one clip each: partial groups go early once more than 2 * batch clips wait."""
    consumed = []

    def batches():
        for i in range(10):
            consumed.append(i)
            yield [i], [_clip(2 + i, 2, i)], {}

    it = _group_by_size(batches(), 3, lambda e: None)
    assert next(it)[0] == [0] and len(consumed) == 7  # 7 waiting > 6: the oldest goes
    assert [g[0] for g in it] == [[i] for i in range(1, 10)]


def test_plot_file_name():
    assert pipeline.plot_file_name("/x/my clip.mp4", 3, 10) == "000003_my_clip.png"
    assert volumes.volume_file_name("/x/my clip.mp4", 3, 10) == "000003_my_clip.nii.gz"


# --------------------------------------------------------------------------- --decoder


class FakeNvdec:
    """Stands in for `gpu_decode.GpuClipReader` on CPU: decodes the 'a*' files into jax
    arrays (as NVDEC hands over its frames) and refuses the others, as NVDEC refuses a file."""

    def __init__(self, gpu_id: int) -> None:
        self.gpu_id = gpu_id

    def read(self, path, n_frames=14):
        import jax.numpy as jnp

        from berg_jax.gpu_decode import NvdecFallback

        if not Path(path).name.startswith("a"):
            raise NvdecFallback(path, "fake NVDEC takes only a*")
        return jnp.asarray(read_clip(path, n_frames=n_frames))


@pytest.mark.parametrize("choice", ["both", "gpu"])
def test_nvdec_beside_the_cpu_gives_the_cpu_runs_rows(run, model, videos, tmp_path, monkeypatch, choice):
    from berg_jax import gpu_decode

    monkeypatch.setattr(gpu_decode, "resolve_decoder", lambda c, platform: c)  # as on an NVIDIA GPU
    monkeypatch.setattr(gpu_decode, "GpuClipReader", FakeNvdec)
    out = tmp_path / choice
    summary = encode_files(model, videos, out, show_progress=False, decoder=choice, gpu_decode_threads=2)
    _, ref = run
    # the same pixels, stacked on the device for the NVDEC clips: the same rows, bit for bit
    assert (out / "responses.npy").read_bytes() == (ref / "responses.npy").read_bytes()
    # the manifest is the CPU run's plus a decoder column: who decoded each file, and why not NVDEC
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(ref / "manifest.csv", newline="") as f:
        assert [r[:4] for r in rows] == list(csv.reader(f))
    assert rows[0][4] == "decoder"
    decoders = {Path(r[0]).name: r[4] for r in rows[1:]}
    assert decoders["corrupt.mp4"] == decoders["missing.mp4"] == ""  # failed: no decoder's
    if choice == "gpu":
        assert {n: d for n, d in decoders.items() if n.startswith("a")} == dict.fromkeys(
            ["a0.mp4", "a1.mp4", "a2.mkv", "a3.mp4"], "gpu")
        assert decoders["b0.mp4"] == decoders["b1.mp4"] == "cpu (fake NVDEC takes only a*)"
    else:
        assert set(decoders.values()) <= {"", "gpu", "cpu", "cpu (fake NVDEC takes only a*)"}
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["decoder"] == choice and summary["decoder"] == choice
    by = run_json["decoded_by"]
    if choice == "gpu":  # a0..a3 by "NVDEC"; b0, b1 handed to the CPU reader with the reason
        assert by == {"gpu": 4, "cpu": 2, "cpu_because": {"fake NVDEC takes only a*": 2}}
    else:  # CPU threads take files from the same queue too: who got which is a race
        assert by["gpu"] + by["cpu"] == 6 and by["gpu"] <= 4
        assert set(by["cpu_because"]) <= {"fake NVDEC takes only a*"}
    assert json.loads((out / "job.json").read_text())["run_config"]["decoder"] == choice
    # a resume keeps the column (from the journal), and the folder verifies
    from berg_jax.verify import verify_folder

    before = (out / "manifest.csv").read_bytes()
    encode_files(model, videos, out, show_progress=False, decoder=choice, gpu_decode_threads=2)
    assert (out / "manifest.csv").read_bytes() == before and verify_folder(out).ok
    # another decoder is another job (NVDEC's pixels differ by up to 2 levels): refused
    with pytest.raises(OutputDirError, match="decoder"):
        encode_files(model, videos, out, show_progress=False, decoder="cpu")


def test_decoder_gpu_without_nvidia_stops_before_writing(model, videos, tmp_path):
    for choice in ("gpu", "both"):
        with pytest.raises(InvalidParameterError, match=f"--decoder {choice} decodes with NVDEC, which needs an "
                                                        "NVIDIA GPU"):
            encode_files(model, videos, tmp_path / "out", show_progress=False, decoder=choice)
    assert not (tmp_path / "out").exists()
    # auto is the CPU here, and the job is the same as before the choice existed
    assert "decoder" not in pipeline.job_config(model)


def test_stack_clips_keeps_device_clips_on_the_device():
    import jax.numpy as jnp

    host = [np.full((14, 4, 6, 3), i, np.uint8) for i in range(3)]
    stacked = pipeline.stack_clips(host)
    assert isinstance(stacked, np.ndarray) and stacked.shape == (3, 14, 4, 6, 3)
    mixed = pipeline.stack_clips([host[0], jnp.asarray(host[1]), host[2]])
    assert isinstance(mixed, jax.Array) and np.array_equal(np.asarray(mixed), stacked)
