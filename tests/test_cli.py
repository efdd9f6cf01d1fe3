"""The `berg-jax` command line: encode (bad inputs, selections, NIfTI, resume after Ctrl-C
and kill -9, refusal of another job), info, convert, fetch, demo.

Most commands run in process through `cli.main(argv)` (same code as the console script,
and the jit cache is shared with tests/test_pipeline.py: same K=8 model shapes, batch 2,
64x80 videos). Only the interruption test and the demo start real processes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")  # the videos are written with PyAV

from berg_jax import cli  # noqa: E402
from berg_jax.berg_files import N_VOXELS, load_metadata, roi_voxel_indices  # noqa: E402
from berg_jax.synthetic_berg import make_synthetic_model  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402
from tests.processes import sigint_not_ignored  # noqa: E402

N_VOX = N_VOXELS[1]
REPO = Path(__file__).resolve().parents[1]

# input name -> what its manifest error must say
BAD = {
    "corrupt.mp4": "not a readable video container",
    "gray.mkv": r"grey-scale stream (pix_fmt gray, 1 channel); S3D needs 3-channel RGB",
    "rgba.mov": "colour stream with an alpha channel (pix_fmt rgba, 4 channels)",
    "short.mp4": "has 9 frames, S3D needs at least 14; pass --pad-short",
    "truncated.mp4": "not a readable video container",
    "unknown.avi": "unsupported video codec",
    "zero.mp4": "file is empty (0 bytes)",
    "missing.mp4": "no such file",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_synthetic_model(tmp_path_factory.mktemp("cli"), n_components=8, seed=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of 3 good 64x80 videos and every kind of bad file, plus a missing path."""
    d = tmp_path_factory.mktemp("cli_videos") / "videos"
    d.mkdir()
    for i, n in enumerate((14, 17, 20)):
        vf.write_test_video(d / f"good{i}.mp4", n_frames=n, height=64, width=80, seed=i)
    vf.write_random_bytes(d / "corrupt.mp4")
    vf.write_gray(d / "gray.mkv")
    vf.write_alpha(d / "rgba.mov")
    vf.write_short(d / "short.mp4")  # 9 frames of 48x64
    vf.write_truncated(d / "truncated.mp4")
    vf.write_unknown_codec(d / "unknown.avi")
    vf.write_zero_length(d / "zero.mp4")
    return [str(d), str(d.parent / "missing.mp4")]


def encode_argv(env, inputs, out, *extra):
    return ["encode", *inputs, "--berg-dir", str(env[0]), "--subject", "1",
            "--s3d-weights", str(env[1]), "--out", str(out), "--batch-size", "2", "-q", *extra]


def run_cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest(out):
    with open(Path(out) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def whole(env, inputs, tmp_path_factory):
    """One whole-brain `encode --nifti` of the inputs: (exit code, stdout, OUT)."""
    out = tmp_path_factory.mktemp("cli_out") / "whole"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(encode_argv(env, inputs, out, "--nifti"))
    return code, buf.getvalue(), out


# --------------------------------------------------------------------------- encode


def test_bad_inputs_are_recorded_and_the_others_encoded(whole):
    code, stdout, out = whole
    assert code == 1
    rows = manifest(out)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert [int(r["row"]) for r in rows] == list(range(len(rows))) and len(rows) == 11
    for name, reason in BAD.items():
        assert by_name[name]["status"] == "failed", name
        assert reason in by_name[name]["error"] and by_name[name]["error"].startswith(by_name[name]["path"])
    for i in range(3):
        assert (by_name[f"good{i}.mp4"]["status"], by_name[f"good{i}.mp4"]["error"]) == ("ok", "")
    responses = np.load(out / "responses.npy")
    ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
    assert np.isfinite(responses[ok]).all()
    assert np.isnan(np.delete(responses, ok, axis=0)).all()
    # the report says where everything is, the throughput and what failed
    assert "3 of 11 videos encoded, 8 failed" in stdout
    for name in ("responses.npy", "manifest.csv", "run.json", "responses.nii.gz"):
        assert str(out / name) in stdout
    assert "videos/s" in stdout and "failed (8, recorded in manifest.csv)" in stdout


def test_pad_short_encodes_the_short_video(env, inputs, whole, tmp_path, capsys):
    out = tmp_path / "padded"
    code, stdout, _ = run_cli(capsys, encode_argv(env, inputs, out, "--pad-short"))
    assert code == 1  # the other bad inputs still fail
    rows = manifest(out)
    short = next(i for i, r in enumerate(rows) if r["path"].endswith("short.mp4"))
    assert rows[short]["status"] == "ok" and "4 of 11 videos encoded" in stdout
    padded, base = np.load(out / "responses.npy"), np.load(whole[2] / "responses.npy")
    assert np.isfinite(padded[short]).all()
    np.testing.assert_array_equal(np.delete(padded, short, 0), np.delete(base, short, 0))


def test_nifti_holds_the_responses_at_the_mask_coordinates(env, whole):
    nib = pytest.importorskip("nibabel")
    out = whole[2]
    meta = load_metadata(env[0], 1)
    mask = meta["fmri"]["sub_mask"]
    img = nib.load(out / "responses.nii.gz")
    vol = np.asarray(img.dataobj, dtype=np.float32)
    responses = np.load(out / "responses.npy")
    assert vol.shape == mask.shape + (len(responses),)
    np.testing.assert_array_equal(img.affine, meta["fmri"]["sub_mask_affine"])
    coords = tuple(np.argwhere(mask).T)  # the sub_mask's True voxels in C order
    for t in range(len(responses)):
        np.testing.assert_array_equal(vol[..., t][coords], responses[t])
        assert np.isnan(vol[..., t][~mask]).all()


@pytest.mark.slow
def test_roi_and_voxels_outputs_are_the_whole_brain_columns(env, inputs, whole, tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    base = np.load(whole[2] / "responses.npy")
    meta = load_metadata(env[0], 1)
    roi = roi_voxel_indices(meta, "lFFA")

    code, stdout, _ = run_cli(capsys, encode_argv(env, inputs, tmp_path / "roi", "--roi", "lFFA", "--nifti"))
    assert code == 1 and f"ROI lFFA, {len(roi)} voxels per video" in stdout
    got = np.load(tmp_path / "roi" / "responses.npy")
    # Equal up to float32 rounding: at batch 2, XLA:CPU compiles the (2, K) @ (K, n_sel)
    # regression differently for 123 columns than for 108,219 (measured: <= 2.4e-7 apart).
    assert_columns(got, base[:, roi])
    vol = np.asarray(nib.load(tmp_path / "roi" / "responses.nii.gz").dataobj, dtype=np.float32)
    coords = np.argwhere(meta["fmri"]["sub_mask"])[roi]
    inside = np.zeros(meta["fmri"]["sub_mask"].shape, bool)
    inside[tuple(coords.T)] = True
    for t in range(len(got)):
        np.testing.assert_array_equal(vol[..., t][tuple(coords.T)], got[t])
        assert np.isnan(vol[..., t][~inside]).all()

    mask = np.zeros(N_VOX, bool)
    mask[np.random.default_rng(0).choice(N_VOX, 300, replace=False)] = True
    np.save(tmp_path / "mask.npy", mask)
    code, stdout, _ = run_cli(capsys, encode_argv(env, inputs, tmp_path / "vox", "--voxels", tmp_path / "mask.npy"))
    assert code == 1 and "voxel mask (300 voxels)" in stdout
    assert_columns(np.load(tmp_path / "vox" / "responses.npy"), base[:, np.flatnonzero(mask)])


def assert_columns(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))  # the same failed rows
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_plot_draws_one_png_per_encoded_video(env, inputs, whole, capsys):
    pytest.importorskip("nilearn")
    out = whole[2]
    code, stdout, _ = run_cli(capsys, encode_argv(env, inputs, out, "--nifti", "--plot"))
    assert code == 1 and "11 videos were already done (resumed)" in stdout
    assert f"plots      {out / 'plots'}" in stdout
    ok = [r for r in manifest(out) if r["status"] == "ok"]
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert len(pngs) == len(ok) == 3 and all(n.endswith(".png") for n in pngs)


def test_plot_without_the_extra_is_a_config_error(env, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # as if nilearn were not installed
    code, _, err = run_cli(capsys, encode_argv(env, inputs, tmp_path / "out", "--plot"))
    assert code == 2 and "pip install 'berg-jax[plot]'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_different_job_into_the_same_out_is_refused(env, inputs, whole, capsys):
    out = whole[2]
    before = (out / "responses.npy").read_bytes()
    code, _, err = run_cli(capsys, encode_argv(env, inputs, out, "--roi", "lFFA"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("berg-jax encode: error: ")
    assert f"{out} holds the results of a different job" in err and "choose another --out" in err
    assert "selection" in err and "Traceback" not in err
    assert (out / "responses.npy").read_bytes() == before


def test_verify_then_encode_again_repairs_a_damaged_folder(env, inputs, whole, tmp_path, capsys):
    src = whole[2]
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    code, stdout, _ = run_cli(capsys, ["verify", out, "-q"])
    assert code == 0 and "match the checksums in run.json: manifest.csv, responses.nii.gz" in stdout, stdout
    row = next(int(r["row"]) for r in manifest(out) if r["path"].endswith("good1.mp4"))
    with open(out / "responses.npy", "r+b") as f:  # 4 bytes of good1's row
        f.seek(128 + row * N_VOX * 4 + 4000)
        f.write(b"\x7f\x7f\x7f\x7f")
    nii = (out / "responses.nii.gz").read_bytes()
    (out / "responses.nii.gz").write_bytes(nii[: len(nii) // 2])
    code, stdout, _ = run_cli(capsys, ["verify", out, "-q"])
    assert code == 1
    # rows: 0 corrupt.mp4, 1 good0, 2 good1, ...; good0 and good1 went in one batch of 2
    assert row == 2 and "  responses.npy: rows 1-2: do not match the checksum recorded when they were written" \
        in stdout, stdout
    assert "  responses.nii.gz: changed since the run finished" in stdout
    # the same encode command checks, recomputes that batch and rewrites the NIfTI
    code, stdout, err = run_cli(capsys, encode_argv(env, inputs, out, "--nifti"))
    assert code == 1  # the bad inputs fail again, as in the first run
    assert f"berg-jax: {out}: responses.npy: rows " in err and "computing them again" in err
    for name in ("responses.npy", "manifest.csv", "responses.nii.gz"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert run_cli(capsys, ["verify", out, "-q"])[0] == 0


@pytest.mark.parametrize("choice", ["gpu", "both"])
def test_decoder_gpu_on_a_machine_without_nvidia_stops_at_once(env, inputs, tmp_path, capsys, choice):
    out = tmp_path / "nvdec"
    code, stdout, err = run_cli(capsys, encode_argv(env, inputs, out, "--decoder", choice))
    assert code == 2 and err.count("\n") == 1 and stdout == ""
    assert err == (f"berg-jax encode: error: --decoder {choice} decodes with NVDEC, which needs an NVIDIA GPU as "
                   "the compute device (here: cpu); use --decoder cpu\n")
    assert not out.exists()


def test_a_full_disk_is_a_one_line_config_error(env, inputs, tmp_path, capsys, monkeypatch):
    import berg_jax.writer

    monkeypatch.setattr(berg_jax.writer, "free_bytes", lambda out: 1000)
    out = tmp_path / "full"
    code, _, err = run_cli(capsys, encode_argv(env, inputs, out))
    assert code == 2 and err.count("\n") == 1
    need = 128 + 11 * N_VOX * 4
    assert err.startswith(f"berg-jax encode: error: no room in {out} for responses.npy ({need:,} bytes needed; "
                          "1,000 bytes free"), err
    assert not (out / "responses.npy").exists() and not list(out.glob(".*berg-tmp-*"))


def test_usage_and_config_errors_are_one_line_exit_2(env, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "short_mask.npy", np.ones(10, bool))
    base = ["encode", inputs[0], "--subject", "1", "--out", tmp_path / "out", "-q"]
    cases = {
        "--berg-dir nowhere": (["--berg-dir", tmp_path / "nowhere"],
                               "is not a directory; download the model with `berg-jax fetch"),
        "subject 11": (["--berg-dir", env[0], "--subject", "11"], "subject must be one of"),
        "unknown ROI": (["--berg-dir", env[0], "--roi", "lXYZ", "--s3d-weights", env[1]],
                        "unknown ROI 'lXYZ'; valid ROIs: "),
        "no mask file": (["--berg-dir", env[0], "--voxels", tmp_path / "nope.npy"], "nope.npy: no such file"),
        "mask length": (["--berg-dir", env[0], "--voxels", tmp_path / "short_mask.npy", "--s3d-weights", env[1]],
                        f"voxel mask has shape (10,), expected ({N_VOX},)"),
        "no S3D weights": (["--berg-dir", env[0]], "S3D weights not found at"),
        "batch size": (["--berg-dir", env[0], "--batch-size", "0"], "--batch-size must be at least 1"),
        "no videos": (["--berg-dir", env[0], "--s3d-weights", env[1]], "no video files found in"),
    }
    for label, (extra, message) in cases.items():
        argv = base + extra
        if label == "no videos":
            argv[1] = tmp_path / "empty"
        code, _, err = run_cli(capsys, argv)
        assert code == 2, label
        assert err.count("\n") == 1 and err.startswith("berg-jax encode: error: "), (label, err)
        assert message in err and "Traceback" not in err, (label, err)
    assert not (tmp_path / "out").exists()
    # argparse's own usage errors exit 2 as well
    with pytest.raises(SystemExit) as info:
        cli.main(["encode", inputs[0], "--subject", "1", "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and "--berg-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["encode", inputs[0], "--berg-dir", "x", "--subject", "1", "--out", "o",
                  "--roi", "lFFA", "--voxels", "m.npy"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("timed out")


def _journal_lines(out: Path) -> int:
    try:
        return (out / "progress.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_ctrl_c_then_kill_9_then_resume_is_byte_identical(env, tmp_path, capsys):
    d = tmp_path / "videos"
    d.mkdir()
    for i in range(12):
        vf.write_test_video(d / f"v{i:02d}.mp4", n_frames=14 + i % 5, height=64, width=80, seed=i)
    vf.write_random_bytes(d / "v05b.mp4")
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = encode_argv(env, [d], out)
    cmd = [sys.executable, "-m", "berg_jax.cli", *map(str, argv)]
    child_env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    # 1. Ctrl-C after the first batch is on disk: exit 130, a hint to resume, no manifest.
    with sigint_not_ignored():
        proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not _wait_for(lambda: b'"ok"' in (out / "progress.jsonl").read_bytes()
                     if (out / "progress.jsonl").exists() else False, proc):
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"stderr: {stderr!r}; stdout: {stdout!r}"
    assert "interrupted; run the same command again to resume" in stderr and "Traceback" not in stderr
    assert not (out / "manifest.csv").exists()
    after_ctrl_c = _journal_lines(out)

    # 2. The same command resumes; kill -9 it as soon as it has recorded one more entry.
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not _wait_for(lambda: _journal_lines(out) > after_ctrl_c, proc):
        pytest.skip("the resumed run finished before it could be killed")
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.csv").exists() and _journal_lines(out) < 13

    # 3. The same command again completes; the files equal an uninterrupted run's byte for byte.
    code, stdout, _ = run_cli(capsys, argv)
    assert code == 1 and "videos were already done (resumed)" in stdout
    code, _, _ = run_cli(capsys, encode_argv(env, [d], ref))
    assert code == 1
    for name in ("responses.npy", "manifest.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert [r["status"] for r in manifest(out)].count("failed") == 1


def test_console_script_entry_point():
    exe = shutil.which("berg-jax")
    cmd = [exe] if exe else [sys.executable, "-m", "berg_jax.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("encode", "fetch", "info", "convert", "demo"):
        assert command in proc.stdout


# --------------------------------------------------------------------------- info, convert


def test_info_is_the_model_card(env, whole, capsys):
    code, out, _ = run_cli(capsys, ["info", "--berg-dir", env[0], "--subject", "1", "--s3d-weights", env[1]])
    assert code == 0
    assert out.startswith("fmri-bmd-s3d: BERG's in silico fMRI encoding model")
    assert "sub-01  108,219 voxels  present" in out and ", converted" in out
    assert "sub-02  108,603 voxels  not downloaded" in out
    assert "converted copy: " in out and "(current, K = 8 components)" in out
    assert f"S3D weights: {env[1]} (present" in out
    roi_sizes = {n: len(roi_voxel_indices(load_metadata(env[0], 1), n)) for n in ("lFFA", "BMDgeneral")}
    for name, size in roi_sizes.items():
        assert f"{name} {size}" in out
    assert "(62, 77, 61) grid, voxel size 2.5 x 2.5 x 2.5 mm" in out and "median r2" in out


def test_info_without_files_says_how_to_get_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    code, out, _ = run_cli(capsys, ["info", "--berg-dir", tmp_path / "none"])
    assert code == 0 and "(does not exist)" in out and "pca_weights.npy: missing" in out
    assert f"berg-jax fetch --berg-dir {tmp_path / 'none'} --subjects 1" in out
    assert "missing: get them with `berg-jax fetch --s3d`" in out
    code, _, err = run_cli(capsys, ["info", "--berg-dir", tmp_path / "none", "--subject", "3"])
    assert code == 2 and "metadata_sub-03.npy" in err and "berg-jax fetch" in err
    code, _, err = run_cli(capsys, ["info", "--berg-dir", tmp_path / "none", "--plot", tmp_path / "a.png"])
    assert code == 2 and "--plot needs --subject" in err


def test_info_plot_draws_the_accuracy_map(env, tmp_path, capsys):
    pytest.importorskip("nilearn")
    png = tmp_path / "acc.png"
    code, out, _ = run_cli(capsys, ["info", "--berg-dir", env[0], "--subject", "1", "--plot", png])
    assert code == 0 and f"accuracy map: {png}" in out
    assert png.read_bytes().startswith(b"\x89PNG")


def test_convert(env, whole, tmp_path, capsys):
    code, out, _ = run_cli(capsys, ["convert", "--berg-dir", env[0]])
    assert code == 0 and "already current: projection, sub-01 (--force converts again)" in out
    code, out, _ = run_cli(capsys, ["convert", "--berg-dir", env[0], "--subjects", "1", "--force"])
    assert code == 0 and "converted projection, sub-01 in " in out and "converted copy: " in out
    code, _, err = run_cli(capsys, ["convert", "--berg-dir", tmp_path])
    assert code == 2 and "pca_weights.npy not found" in err and "berg-jax fetch" in err
    code, _, err = run_cli(capsys, ["convert", "--berg-dir", env[0], "--subjects", "2"])
    assert code == 2 and "weights_sub-02.npy" in err


# --------------------------------------------------------------------------- fetch


def test_fetch_calls_the_library(tmp_path, capsys, monkeypatch):
    """The CLI's wiring only; tests/test_fetch.py covers the downloads against moto."""
    from berg_jax import fetch
    from berg_jax.errors import DownloadError

    calls = []

    def fake_berg(berg_dir, subjects, show_progress=True):
        calls.append(("berg", str(berg_dir), list(subjects)))
        paths = [Path(berg_dir) / k for k in fetch.berg_keys(subjects)]
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x" * 2000)
        return paths

    def fake_s3d(dest=None, show_progress=True):
        calls.append(("s3d", dest))
        path = Path(dest or tmp_path / "hub" / "s3d-d76dad2f.pth")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"y" * 10)
        return path

    monkeypatch.setattr(fetch, "fetch_berg_files", fake_berg)
    monkeypatch.setattr(fetch, "fetch_s3d_weights", fake_s3d)
    code, out, _ = run_cli(capsys, ["fetch", "--berg-dir", tmp_path / "b", "--subjects", "1", "3", "-q"])
    assert code == 0 and calls == [("berg", str(tmp_path / "b"), [1, 3]), ("s3d", None)]
    assert "pca_weights.npy  (2.0 KB)" in out and "s3d-d76dad2f.pth  (10 B)" in out
    assert f"next: berg-jax encode VIDEOS... --berg-dir {tmp_path / 'b'} --subject 1" in out
    calls.clear()
    code, _, _ = run_cli(capsys, ["fetch", "--berg-dir", tmp_path / "b", "--subjects", "2", "--no-s3d", "-q"])
    assert code == 0 and calls == [("berg", str(tmp_path / "b"), [2])]
    calls.clear()
    code, _, _ = run_cli(capsys, ["fetch", "--s3d", "--s3d-weights", tmp_path / "w.pth", "-q"])
    assert code == 0 and calls == [("s3d", str(tmp_path / "w.pth"))]

    for argv, message in [
        (["fetch", "--subjects", "1"], "--subjects needs --berg-dir"),
        (["fetch", "--no-s3d"], "nothing to fetch"),
        (["fetch", "--berg-dir", tmp_path, "--subjects", "11"], "subject must be an integer in 1..10"),
    ]:
        code, _, err = run_cli(capsys, argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)

    def failing(*a, **k):
        raise DownloadError("s3://bucket/key: connection reset, giving up after 5 attempts")

    monkeypatch.setattr(fetch, "fetch_s3d_weights", failing)
    code, _, err = run_cli(capsys, ["fetch", "-q"])
    assert code == 1 and "giving up after 5 attempts" in err


# --------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The Quickstart's `berg-jax demo`, in a fresh cache folder (builds the K=100 model)."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "berg_jax.cli", "demo", "--cache-dir", str(cache), "--videos", "4", "-q"]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=child_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "these responses are NOT real predictions" in out
    assert "berg-jax fetch --berg-dir ~/berg --subjects 1" in out and "berg-jax encode VIDEOS..." in out
    assert "3 of 4 videos encoded, 1 failed" in out and "videos/s" in out
    assert "broken_truncated.mp4: not a readable video container" in out
    responses = np.load(cache / "out" / "responses.npy")
    assert responses.shape == (4, N_VOX) and np.isfinite(responses[:3]).all() and np.isnan(responses[3]).all()
    assert (cache / "out" / "responses.nii.gz").is_file()
    rows = manifest(cache / "out")
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]


@pytest.mark.parametrize("answer, expected", [("81559, 81000\n", None), ("81559, 30000\n", 0.33),
                                              ("81559, 60000\n81559, 20000\n", 0.22), ("garbage\n", None)])
def test_gpu_memory_pool_fits_what_another_process_left_free(tmp_path, monkeypatch, answer, expected):
    """A busy GPU: JAX's pool is sized to 90% of the free memory, so no failed reservations are logged."""
    from berg_jax import cli

    for key in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(key, raising=False)
    smi = tmp_path / "fake-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{answer}'\n")
    smi.chmod(0o755)
    assert cli.fit_gpu_memory_pool((str(smi),)) == expected
    assert os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") == (None if expected is None else f"{expected:.2f}")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the user's choice wins
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert cli.fit_gpu_memory_pool((str(smi),)) is None and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
