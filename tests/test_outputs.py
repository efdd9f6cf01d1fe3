"""OUT folder: crash-safe, resumable responses.npy / manifest.csv / run.json, and NIfTI output."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from berg_jax.atomic import atomic_open, atomic_write_text
from berg_jax.volumes import (
    responses_to_volume,
    volume_file_name,
    write_nifti,
    write_responses_nifti,
    write_volume_niftis,
)
from berg_jax.writer import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    OutputDirError,
    ResponseWriter,
)
from berg_jax.writer import read_journal as _read_journal

REPO = Path(__file__).resolve().parents[1]
N_IN, N_VOX = 23, 37
PATHS = [f"videos/clip_{i:03d}.mp4" for i in range(N_IN)]
CONFIG = {"model_id": "fmri-bmd-s3d", "subject": 1, "selection": {"roi": ["lV1v", "rV1v"]}}
FAIL = {4, 11, 17}  # inputs that always fail


def row_value(i: int) -> np.ndarray:
    """Deterministic float32 (N_VOX,) 'response' of input i."""
    return (np.sin(np.arange(N_VOX) * 0.37 + i) * (i + 1)).astype(np.float32)


def process(w: ResponseWriter, batch: int = 3) -> None:
    """What `encode` does: batches of pending inputs; failing inputs are marked, not written."""
    todo = w.pending()
    for s in range(0, len(todo), batch):
        idx = todo[s:s + batch]
        bad = [i for i in idx if i in FAIL]
        good = [i for i in idx if i not in FAIL]
        if good:
            w.write_rows(good, np.stack([row_value(i) for i in good]))
        for i in bad:
            w.mark_failed(i, f"VideoReadError: cannot decode {PATHS[i]},\nsecond line")


def full_run(out: Path) -> None:
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    process(w)
    w.finish({"end_time": "t1", "throughput_videos_per_s": float("nan")})


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.iterdir() if ".berg-tmp-" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    full_run(out)
    return out


def assert_same_results(out: Path, ref: Path) -> None:
    for name in (RESPONSES_FILE, MANIFEST_FILE):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert no_temp_files(out)


def test_fresh_run_files(reference: Path) -> None:
    out = reference
    resp = np.load(out / RESPONSES_FILE)
    assert resp.dtype == np.float32 and resp.shape == (N_IN, N_VOX)
    mm = np.load(out / RESPONSES_FILE, mmap_mode="r")
    assert np.array_equal(mm, resp, equal_nan=True)
    for i in range(N_IN):
        if i in FAIL:
            assert np.isnan(resp[i]).all()
        else:
            assert np.array_equal(resp[i], row_value(i))
    with open(out / MANIFEST_FILE, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "row", "status", "error"]
    assert [r[0] for r in rows[1:]] == PATHS
    assert [int(r[1]) for r in rows[1:]] == list(range(N_IN))
    for i, r in enumerate(rows[1:]):
        assert r[2] == ("failed" if i in FAIL else "ok")
        assert (r[3] != "") == (i in FAIL)
    assert rows[5][3] == f"VideoReadError: cannot decode {PATHS[4]},\nsecond line"
    run = json.loads((out / RUN_FILE).read_text())
    assert run["model_id"] == "fmri-bmd-s3d" and run["subject"] == 1
    assert run["n_ok"] == N_IN - len(FAIL) and run["n_failed"] == len(FAIL)
    assert run["end_time"] == "t1" and run["throughput_videos_per_s"] is None
    assert no_temp_files(out)


def test_simulated_crash_resume_is_byte_identical(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out"
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    w.write_rows([0, 1, 2], np.stack([row_value(i) for i in (0, 1, 2)]))
    w.mark_failed([4], "VideoReadError: cannot decode videos/clip_004.mp4,\nsecond line")
    w.write_rows([7, 5], np.stack([row_value(7), row_value(5)]))  # any order
    w.close()  # "crash": no finish()

    # Rows written to the memmap but never journaled (killed between the two steps), some of
    # which will fail on resume, and a torn journal line (killed mid-append).
    mm = np.load(out / RESPONSES_FILE, mmap_mode="r+")
    mm[[3, 6, 11, 17]] = 123.0
    mm.flush()
    del mm
    with open(out / PROGRESS_FILE, "ab") as f:
        f.write(b'{"rows": [3, 6], "sta')
    assert not (out / MANIFEST_FILE).exists()

    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    assert w.pending() == [3, 6] + list(range(8, N_IN))
    process(w)
    w.finish({"end_time": "t2"})
    assert_same_results(out, reference)
    # the torn tail was cut, so every journal line is whole
    assert (out / PROGRESS_FILE).read_bytes().endswith(b"\n")
    entries, size = _read_journal(out / PROGRESS_FILE, N_IN)
    assert size == (out / PROGRESS_FILE).stat().st_size


def test_resume_after_crash_during_creation(tmp_path: Path, reference: Path) -> None:
    # Killed after job.json, while responses.npy was still a temp file.
    out = tmp_path / "out"
    ResponseWriter.open(out, PATHS, N_VOX, CONFIG).close()
    (out / RESPONSES_FILE).rename(out / f".{RESPONSES_FILE}.berg-tmp-1-deadbeef")
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    assert no_temp_files(out) and w.pending() == list(range(N_IN))
    process(w)
    w.finish({})
    assert_same_results(out, reference)


def test_rerun_of_finished_job_is_noop(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out"
    full_run(out)
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    assert w.pending() == []
    w.finish({"end_time": "t3"})
    assert_same_results(out, reference)


def test_odd_file_names_round_trip(tmp_path: Path) -> None:
    paths = ["café/vidéo 1.mp4", os.fsdecode(b"raw/\xff\xfe.mp4"), 'q"uo,te.mp4']
    w = ResponseWriter.open(tmp_path, paths, 2, CONFIG)
    w.write_rows([0, 2], np.ones((2, 2), np.float32))
    w.mark_failed(1, f"cannot decode {paths[1]}")
    w.close()
    w = ResponseWriter.open(tmp_path, paths, 2, CONFIG)  # same job after the JSON round trip
    assert w.pending() == [] and w.manifest_rows()[1][3] == f"cannot decode {paths[1]}"
    w.finish({})
    raw = (tmp_path / MANIFEST_FILE).read_bytes()
    assert b"raw/\xff\xfe.mp4" in raw and "café/vidéo 1.mp4".encode() in raw
    with open(tmp_path / MANIFEST_FILE, newline="", errors="surrogateescape") as f:
        assert [r[0] for r in csv.reader(f)][1:] == paths


def test_journal_stops_at_first_bad_line(tmp_path: Path) -> None:
    p = tmp_path / PROGRESS_FILE
    good = b'{"rows": [0, 1], "status": "ok"}\n{"rows": [2], "status": "failed", "error": "x"}\n'
    # garbage after power loss, then a valid line that is dropped with it
    p.write_bytes(good + b"\0\0\0\0\0\n" + b'{"rows": [3], "status": "ok"}\n')
    entries, end = _read_journal(p, 5)
    assert [e["rows"] for e in entries] == [[0, 1], [2]] and end == len(good)
    p.write_bytes(b'{"rows": [9], "status": "ok"}\n')  # out of range -> invalid
    assert _read_journal(p, 5) == ([], 0)
    p.write_bytes(b'{"rows": [1], "status": "ok"}')  # no newline: torn
    assert _read_journal(p, 5) == ([], 0)


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from tests.test_outputs import PATHS, N_VOX, CONFIG, FAIL, row_value
    from berg_jax.writer import ResponseWriter
    w = ResponseWriter.open({out!r}, PATHS, N_VOX, CONFIG)
    for i in w.pending():
        if sys.stdin.readline() != "go\\n":  # one input per "go" from the parent
            break
        if i in FAIL:
            w.mark_failed(i, f"VideoReadError: cannot decode {{PATHS[i]}},\\nsecond line")
        else:
            w.write_rows([i], row_value(i)[None])
        print(i, flush=True)
    sys.stdin.readline()  # never finishes on its own: it is always killed
    """
)


def run_and_kill(out: Path, n_done: int, mid_input: bool) -> None:
    """Start CHILD on `out`, let it record `n_done` inputs, SIGKILL it.

    mid_input=False: killed while it waits between inputs. True: told to do one more input
    and killed at once, without waiting for it -- anywhere in that input's writes, or just
    before or after them.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), out=str(out))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        for _ in range(n_done):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line.strip(), proc.stderr.read()
        if mid_input:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except BrokenPipeError:
                pass
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill9_mid_run_then_resume(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out"
    run_and_kill(out, 6, mid_input=False)
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    assert len(w.pending()) == N_IN - 6  # exactly the inputs it reported
    w.close()
    run_and_kill(out, 5, mid_input=True)  # the child resumes the killed run and is killed again
    assert not (out / MANIFEST_FILE).exists()

    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)  # the dead child's lock is gone
    left = w.pending()
    # 11 inputs recorded for sure; the 12th was in flight: recorded whole or not at all.
    assert len(left) in (N_IN - 11, N_IN - 12)
    process(w)
    w.finish({})
    assert_same_results(out, reference)


def test_mismatched_job_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    w.write_rows([0], row_value(0)[None])
    w.close()
    before = (out / RESPONSES_FILE).read_bytes()
    cases = [
        (PATHS[:-1], N_VOX, CONFIG, "inputs"),
        (PATHS[:3] + ["other.mp4"] + PATHS[4:], N_VOX, CONFIG, "input 3"),
        (PATHS, N_VOX + 1, CONFIG, "n_voxels"),
        (PATHS, N_VOX, {**CONFIG, "subject": 2}, "'subject'"),
        (PATHS, N_VOX, {**CONFIG, "selection": None}, "'selection'"),
    ]
    for paths, n_vox, cfg, what in cases:
        with pytest.raises(OutputDirError, match="--out") as e:
            ResponseWriter.open(out, paths, n_vox, cfg)
        assert what in str(e.value)
    assert (out / RESPONSES_FILE).read_bytes() == before  # nothing touched

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    np.save(foreign / RESPONSES_FILE, np.zeros((2, 2), np.float32))
    with pytest.raises(OutputDirError, match="job.json"):
        ResponseWriter.open(foreign, PATHS, N_VOX, CONFIG)
    assert np.load(foreign / RESPONSES_FILE).shape == (2, 2)


def test_damaged_responses_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ResponseWriter.open(out, PATHS, N_VOX, CONFIG).close()
    np.save(out / RESPONSES_FILE, np.zeros((N_IN, N_VOX), np.float64))
    with pytest.raises(OutputDirError, match="expected float32"):
        ResponseWriter.open(out, PATHS, N_VOX, CONFIG)


def test_out_in_use_is_refused(tmp_path: Path) -> None:
    w = ResponseWriter.open(tmp_path, PATHS, N_VOX, CONFIG)
    with pytest.raises(OutputDirError, match="in use"):
        ResponseWriter.open(tmp_path, PATHS, N_VOX, CONFIG)
    w.close()
    ResponseWriter.open(tmp_path, PATHS, N_VOX, CONFIG).close()


def test_misuse_is_rejected(tmp_path: Path) -> None:
    w = ResponseWriter.open(tmp_path, PATHS, N_VOX, CONFIG)
    w.write_rows([1], row_value(1)[None])
    with pytest.raises(ValueError, match="not pending"):
        w.write_rows([1], row_value(1)[None])
    with pytest.raises(ValueError, match="not pending"):
        w.mark_failed(1, "x")
    with pytest.raises(ValueError, match="must be"):
        w.write_rows([2], np.zeros((1, N_VOX + 1), np.float32))
    with pytest.raises(IndexError):
        w.write_rows([N_IN], row_value(0)[None])
    with pytest.raises(ValueError, match="pending"):
        w.finish({})
    w.close()


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    atomic_write_text(p, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert p.read_text() == "old\n"
    assert [x.name for x in tmp_path.iterdir()] == ["run.json"]


# --------------------------------------------------------------------------- NIfTI

AFFINE = np.array([[-2.5, 0, 0, 78.0], [0, 2.5, 0, -112.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    rng = np.random.default_rng(0)
    m = np.zeros((62, 77, 61), bool)
    m[10:50, 15:60, 8:50] = rng.random((40, 45, 42)) < 0.3
    return m


def test_responses_to_volume_coordinates(mask: np.ndarray) -> None:
    coords = np.argwhere(mask)  # C order: the j-th True voxel is coords[j]
    n_s = len(coords)
    rng = np.random.default_rng(1)
    sel = np.sort(rng.choice(n_s, 500, replace=False))[::-1].copy()  # any order works
    r = rng.standard_normal(500).astype(np.float32)
    vol = responses_to_volume(r, mask, sel)
    assert vol.shape == (62, 77, 61) and vol.dtype == np.float32
    x, y, z = coords[sel].T
    assert np.array_equal(vol[x, y, z], r)
    assert np.isnan(vol).sum() == vol.size - 500
    full = responses_to_volume(np.arange(n_s, dtype=np.float32), mask)
    assert np.array_equal(full[tuple(coords.T)], np.arange(n_s))
    assert np.isnan(full[~mask]).all()
    two = responses_to_volume(np.stack([r, -r]), mask, sel)
    assert two.shape == (62, 77, 61, 2) and np.array_equal(two[x, y, z, 1], -r)
    with pytest.raises(ValueError, match="duplicates"):
        responses_to_volume(r[:2], mask, [3, 3])
    with pytest.raises(ValueError, match="n_sel"):
        responses_to_volume(r, mask, sel[:-1])


def test_responses_nifti_4d(tmp_path: Path, mask: np.ndarray) -> None:
    coords = np.argwhere(mask)
    sel = np.arange(0, len(coords), 7)
    rng = np.random.default_rng(2)
    resp = rng.standard_normal((5, len(sel))).astype(np.float32)
    resp[3] = np.nan  # a failed input
    np.save(tmp_path / "r.npy", resp)
    mm = np.load(tmp_path / "r.npy", mmap_mode="r")
    hdr = nib.Nifti1Image(mask.astype(np.uint8), AFFINE).header  # a mask header: uint8
    p = tmp_path / "responses.nii.gz"
    write_responses_nifti(p, mm, mask, AFFINE, hdr, sel, chunk_rows=2)
    img = nib.load(p)
    assert img.shape == (62, 77, 61, 5) and img.get_data_dtype() == np.float32
    assert np.array_equal(img.affine, AFFINE)
    data = np.asarray(img.dataobj)
    x, y, z = coords[sel].T
    for t in range(5):
        assert np.array_equal(data[x, y, z, t], resp[t], equal_nan=True)
        assert np.isnan(data[..., t]).sum() == mask.size - (len(sel) if t != 3 else 0)
    # streamed file == nibabel's own serialization of the in-memory 4-D array
    ref = nib.Nifti1Image(responses_to_volume(resp, mask, sel), AFFINE, hdr)
    ref.set_data_dtype(np.float32)
    assert gzip.decompress(p.read_bytes()) == ref.to_bytes()
    # reproducible bytes (gzip mtime fixed), atomic (no temp left)
    q = tmp_path / "again.nii.gz"
    write_nifti(q, responses_to_volume(resp, mask, sel), AFFINE, hdr)
    assert q.read_bytes() == p.read_bytes()
    assert no_temp_files(tmp_path)


def test_per_video_niftis(tmp_path: Path, mask: np.ndarray) -> None:
    n_s = int(mask.sum())
    resp = np.arange(3 * n_s, dtype=np.float32).reshape(3, n_s)
    paths = ["a/clip one.mp4", "b/clip.x.mp4", "c/clip one.mp4"]
    files = write_volume_niftis(tmp_path / "volumes", paths, resp, mask, AFFINE, rows=[2, 0])
    assert [f.name for f in files] == ["000002_clip_one.nii.gz", "000000_clip_one.nii.gz"]
    assert volume_file_name("x/y.z.mp4", 1, 3) == "000001_y.z.nii.gz"
    img = nib.load(files[0])
    assert img.shape == (62, 77, 61) and np.array_equal(img.affine, AFFINE)
    data = np.asarray(img.dataobj)
    assert np.array_equal(data[mask], resp[2]) and np.isnan(data[~mask]).all()
    assert no_temp_files(tmp_path / "volumes")
