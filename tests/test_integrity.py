"""Outputs you can trust: a full disk, damaged files, resume that verifies, `berg-jax verify`.

Each case damages a finished (or half-finished) OUT the way a user's disk or hand would,
then asserts what follows: the exact problems `verify` lists, and a resume that ends
byte-identical to a clean run. Writer-level (no model): fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from berg_jax import cli
from berg_jax.decode_workers import died_externally, worker_died_message
from berg_jax.npy_rows import file_bytes, header_bytes
from berg_jax.verify import verify_folder
from berg_jax.writer import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    OutOfSpaceError,
    OutputDirError,
    ResponseWriter,
)
from tests.test_distributed import COLUMNS as SHARD_COLUMNS
from tests.test_distributed import CONFIG as SHARD_CONFIG
from tests.test_distributed import PATHS as SHARD_PATHS
from tests.test_distributed import _fill, _values, make_reference, make_shards
from tests.test_outputs import CONFIG, N_IN, N_VOX, PATHS, full_run, no_temp_files, process

REPO = Path(__file__).resolve().parents[1]
ROW_BYTES = N_VOX * 4
HEADER = len(header_bytes((N_IN, N_VOX)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    full_run(out)
    return out


def assert_same_as(out: Path, ref: Path, names=(RESPONSES_FILE, MANIFEST_FILE)) -> None:
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert no_temp_files(out)


def finished_copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    full_run(out)
    assert_same_as(out, reference)
    return out


def resume(out: Path) -> tuple[list[int], list[str]]:
    """Run the same job again: (rows it found pending, its repair notes); it finishes."""
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    pending, repairs = w.pending(), list(w.repairs)
    process(w)
    w.finish({"end_time": "t9"})
    return pending, repairs


def problems(out: Path) -> list[str]:
    return [str(p) for p in verify_folder(out).problems]


def flip(path: Path, offset: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- verify and resume


def test_a_clean_folder_verifies(reference: Path) -> None:
    report = verify_folder(reference)
    assert report.ok, report.problems
    assert (report.n_rows, report.n_ok, report.n_failed) == (N_IN, N_IN - 3, 3)
    assert report.n_checked_rows == N_IN and report.n_unverified_rows == 0
    assert report.files == [MANIFEST_FILE]
    # every journal line carries its rows' checksum
    lines = (reference / PROGRESS_FILE).read_text().splitlines()
    assert all(json.loads(line)["crc32"].keys() == {RESPONSES_FILE} for line in lines)


def test_flipped_bytes_are_found_and_recomputed(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    # 4 bytes inside row 5, which process() journaled with row 3 (batch [3, 5]: 4 failed)
    flip(out / RESPONSES_FILE, HEADER + 5 * ROW_BYTES + 40)
    assert problems(out) == [f"{RESPONSES_FILE}: rows 3, 5: do not match the checksum recorded when they were written"]
    pending, repairs = resume(out)
    assert pending == [3, 5]
    assert repairs == [f"{RESPONSES_FILE}: rows 3, 5 do not match the checksums recorded when they were written "
                       "(changed or damaged since): computing them again"]
    assert_same_as(out, reference)
    assert verify_folder(out).ok


def test_a_flipped_byte_in_a_failed_row_is_found_too(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    flip(out / RESPONSES_FILE, HEADER + 11 * ROW_BYTES, 1)  # row 11 failed: NaN, and checksummed
    assert problems(out) == [f"{RESPONSES_FILE}: rows 11: do not match the checksum recorded when they were written"]
    assert resume(out)[0] == [11]
    assert_same_as(out, reference)


def test_a_truncated_file_is_resized_and_its_lost_rows_recomputed(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    size = HEADER + 10 * ROW_BYTES + 7  # inside row 10
    with open(out / RESPONSES_FILE, "r+b") as f:
        f.truncate(size)
    expected = file_bytes((N_IN, N_VOX))
    assert problems(out) == [
        f"{RESPONSES_FILE}: it is {size:,} bytes, expected {expected:,} (truncated)",
        f"{RESPONSES_FILE}: rows 9-22: cut off: the file ends before them",
    ]
    pending, repairs = resume(out)
    # the batch the cut passes through ([9, 10]) and every later one, failed rows too (NaN
    # rows are checksummed like the others; they are tried again and fail again)
    assert pending == list(range(9, N_IN))
    assert repairs[0] == (f"{RESPONSES_FILE}: it is {size:,} bytes, expected {expected:,} (truncated): resized; "
                          "its recorded rows are checked and computed again where lost")
    assert repairs[1].startswith(f"{RESPONSES_FILE}: rows 9-22 do not match")
    assert_same_as(out, reference)
    assert verify_folder(out).ok


def test_a_file_grown_by_garbage_is_cut_back(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    with open(out / RESPONSES_FILE, "ab") as f:
        f.write(b"garbage")
    assert problems(out) == [f"{RESPONSES_FILE}: it is {file_bytes((N_IN, N_VOX)) + 7:,} bytes, expected "
                             f"{file_bytes((N_IN, N_VOX)):,} (longer than its header says)"]
    assert resume(out)[0] == []  # every row still matches: nothing to compute
    assert_same_as(out, reference)


def test_a_deleted_file_is_rebuilt(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    (out / RESPONSES_FILE).unlink()
    assert problems(out) == [f"{RESPONSES_FILE}: it is missing"]
    pending, repairs = resume(out)
    ok_rows = [i for i in range(N_IN) if i not in (4, 11, 17)]
    assert pending == ok_rows  # failed rows are NaN in the new file: their checksums still hold
    assert repairs[0].startswith(f"{RESPONSES_FILE}: it is missing: recreated")
    assert_same_as(out, reference)


def test_an_overwritten_header_is_rebuilt(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    flip(out / RESPONSES_FILE, 0, 6)  # the magic string
    assert problems(out)[0].startswith(f"{RESPONSES_FILE}: its .npy header is unreadable")
    pending, _ = resume(out)
    assert len(pending) == N_IN - 3
    assert_same_as(out, reference)


def test_damage_in_one_array_of_several_recomputes_those_batches(tmp_path: Path) -> None:
    failed = {1: "not a readable video container"}
    ref = make_reference(tmp_path, SHARD_PATHS, failed)
    out = tmp_path / "out"
    w = ResponseWriter.open(out, SHARD_PATHS, SHARD_COLUMNS, SHARD_CONFIG)
    values = _values(len(SHARD_PATHS), SHARD_COLUMNS)
    _fill(w, w.pending(), values, failed)
    w.finish({"batch_size": 2})
    flip(out / "components.npy", len(header_bytes((12, 3))) + 7 * 3 * 4)  # row 7
    # _fill wrote the ok rows in pairs: [0, 2], [3, 4], [5, 6], [7, 8], ...
    assert problems(out) == ["components.npy: rows 7-8: do not match the checksum recorded when they were written"]
    w = ResponseWriter.open(out, SHARD_PATHS, SHARD_COLUMNS, SHARD_CONFIG)
    assert w.pending() == [7, 8]
    _fill(w, w.pending(), values, failed)
    w.finish({"batch_size": 2})
    for name in (*SHARD_COLUMNS, MANIFEST_FILE):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_a_journal_without_checksums_is_trusted_and_counted(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    lines = [json.loads(line) for line in (out / PROGRESS_FILE).read_text().splitlines()]
    (out / PROGRESS_FILE).write_text("".join(json.dumps({k: v for k, v in e.items() if k != "crc32"}) + "\n"
                                             for e in lines))
    report = verify_folder(out)
    assert report.ok and report.n_unverified_rows == N_IN and report.n_checked_rows == 0
    assert resume(out)[0] == []  # an older berg-jax's folder resumes as before
    assert_same_as(out, reference)


def test_verify_lists_an_unfinished_run_a_damaged_journal_and_manifest(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out"
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    w.write_rows([0, 1], np.ones((2, N_VOX), np.float32))
    w.close()
    assert problems(out) == [
        f"{PROGRESS_FILE}: rows 2-22: not recorded as done or failed: the run has not finished; run the same "
        "`berg-jax encode` command to finish it",
        f"{RUN_FILE}: missing: the run has not finished; run the same `berg-jax encode` command to finish it",
    ]
    out = finished_copy(reference, tmp_path / "b")
    text = (out / MANIFEST_FILE).read_text()
    (out / MANIFEST_FILE).write_text(text.replace("clip_007.mp4,7,ok", "clip_007.mp4,7,failed"))
    found = problems(out)
    assert f"{MANIFEST_FILE}: rows 7: disagree with job.json and progress.jsonl (path, row, status or error)" in found
    assert any(p.startswith(f"{MANIFEST_FILE}: changed since the run finished (CRC-32") for p in found)
    with open(out / PROGRESS_FILE, "ab") as f:
        f.write(b"\x00garbage\n")
    assert any(p.startswith(f"{PROGRESS_FILE}: unreadable from line 12 (byte") for p in problems(out))
    assert resume(out)[0] == []  # the run rewrites manifest.csv and cuts the garbage
    assert_same_as(out, reference)
    assert verify_folder(out).ok


def test_run_json_checksums_cover_the_files_beside_the_arrays(tmp_path: Path) -> None:
    w = ResponseWriter.open(tmp_path, PATHS[:2], 3, CONFIG)
    w.write_rows([0, 1], np.zeros((2, 3), np.float32))
    (tmp_path / "responses.nii.gz").write_bytes(b"pretend NIfTI")
    w.finish({}, checked_files=["responses.nii.gz"])
    assert json.loads((tmp_path / RUN_FILE).read_text())["file_crc32"].keys() == {MANIFEST_FILE, "responses.nii.gz"}
    assert verify_folder(tmp_path).files == [MANIFEST_FILE, "responses.nii.gz"]
    (tmp_path / "responses.nii.gz").write_bytes(b"pretend NIfTI!")
    assert [p.file for p in verify_folder(tmp_path).problems] == ["responses.nii.gz"]
    (tmp_path / "responses.nii.gz").unlink()
    assert problems(tmp_path) == ["responses.nii.gz: missing (run.json lists it)"]


def test_verify_command_exit_status_and_report(tmp_path: Path, reference: Path, capsys) -> None:
    assert cli.main(["verify", str(reference), "-q"]) == 0
    out_text = capsys.readouterr().out
    assert out_text.startswith(f"berg-jax verify: {reference}: OK\n")
    assert f"{N_IN} rows ({N_IN - 3} ok, 3 failed) in {RESPONSES_FILE}" in out_text
    out = finished_copy(reference, tmp_path)
    flip(out / RESPONSES_FILE, HEADER + 20 * ROW_BYTES)
    assert cli.main(["verify", str(out), "-q"]) == 1
    out_text = capsys.readouterr().out
    assert f"berg-jax verify: {out}: DAMAGED (1 problem)" in out_text
    assert f"  {RESPONSES_FILE}: rows 18-20: do not match the checksum recorded when they were written" in out_text
    assert "fix: run the same `berg-jax encode` command again" in out_text
    assert cli.main(["verify", str(tmp_path / "nowhere")]) == cli.EXIT_USAGE
    assert "no such folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- shards and merge


def test_a_damaged_shard_is_refused_by_merge_then_repaired(tmp_path: Path, capsys) -> None:
    from berg_jax import distributed
    from berg_jax.distributed import Shard

    failed = {1: "not a readable video container", 6: "has 9 frames, S3D needs at least 14"}
    ref = make_reference(tmp_path, SHARD_PATHS, failed)
    out = tmp_path / "out"
    make_shards(out, SHARD_PATHS, 2, failed)
    block, shard1 = distributed.shard_inputs(SHARD_PATHS, out, Shard(1, 2))
    # verify reads the shards when OUT has not been merged yet
    assert verify_folder(out).ok and verify_folder(out).folders == [
        "shards/process-00000-of-00002", "shards/process-00001-of-00002"]
    # shard 1 holds global rows 6..11; its row 0 failed, its ok rows went in pairs [1, 2], [3, 4], [5]
    flip(shard1 / "responses_sub-02.npy", len(header_bytes((6, 4))) + 3 * 16)  # shard row 3
    assert problems(out) == ["shards/process-00001-of-00002/responses_sub-02.npy: rows 3-4: do not match the "
                             "checksum recorded when they were written"]
    capsys.readouterr()
    assert cli.main(["merge", str(out)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "shard 1 of 2" in err and "responses_sub-02.npy: rows 3-4: do not match the checksum" in err
    assert "run the same `berg-jax encode --distributed` command for process 1 again" in err
    assert not (out / "responses_sub-02.npy").exists()  # nothing merged from damaged data

    # the process's command again: its resume finds the damage and recomputes it
    w = ResponseWriter.open(shard1, block, SHARD_COLUMNS, SHARD_CONFIG)
    assert w.pending() == [3, 4] and "rows 3-4" in w.repairs[0]
    _fill(w, w.pending(), _values(len(SHARD_PATHS), SHARD_COLUMNS), failed, offset=6)
    w.finish({"batch_size": 2})
    assert cli.main(["merge", str(out)]) == 1  # two inputs failed, as before
    for name in (*SHARD_COLUMNS, MANIFEST_FILE, "job.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # the merged folder's journal carries the shards' checksums: verify and resume check them
    report = verify_folder(out)
    assert report.ok and report.n_checked_rows == len(SHARD_PATHS) and report.files == [MANIFEST_FILE]
    flip(out / "components.npy", len(header_bytes((12, 3))) + 9 * 12)  # global row 9 = shard 1 row 3
    assert problems(out) == ["components.npy: rows 9-10: do not match the checksum recorded when they were written"]


# --------------------------------------------------------------------------- failures retried on resume


KILLED = worker_died_message("signal 9", PATHS[7])  # the OOM killer, kill -9: not the file's fault
TERMINATED = worker_died_message("signal 15", PATHS[8])  # kill: not the file's fault either
CRASHED = worker_died_message("signal 11", PATHS[13])  # the decoder crashed on the file


def run_with_failures(out: Path, failures: dict[tuple[int, ...], str]) -> None:
    """A finished run in which the rows of each key failed with its error, every other row as `full_run`."""
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    for rows, error in failures.items():
        w.mark_failed(list(rows), error)
    process(w)
    w.finish({"end_time": "t1"})
    assert verify_folder(out).ok


def journaled_rows(out: Path) -> list[int]:
    return sorted(r for line in (out / PROGRESS_FILE).read_text().splitlines() for r in json.loads(line)["rows"])


def test_failures_not_the_files_fault_are_retried_to_a_clean_runs_files(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out"
    run_with_failures(out, {(7,): KILLED, (8, 9): TERMINATED})  # one journal entry of two rows

    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG, retry_failed=died_externally)
    assert w.pending() == [7, 8, 9]
    assert w.retried == {7: KILLED, 8: TERMINATED, 9: TERMINATED}
    assert w.manifest_rows()[8] == (PATHS[8], 8, "pending", "")
    w.close()  # killed before the rows were computed again: they are still pending
    assert journaled_rows(out) == sorted(set(range(N_IN)) - {7, 8, 9})

    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG, retry_failed=died_externally)
    assert w.pending() == [7, 8, 9] and w.retried == {}  # nothing left to retry: they are pending
    process(w)
    w.finish({"end_time": "t2"})
    assert_same_as(out, reference)
    assert journaled_rows(out) == list(range(N_IN))  # every row once
    assert verify_folder(out).ok, problems(out)


def test_failures_of_the_file_itself_stay_failed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_with_failures(out, {(13,): CRASHED, (7,): KILLED})
    journal = (out / PROGRESS_FILE).read_bytes()
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG, retry_failed=lambda error: False)
    assert w.pending() == [] and w.retried == {}
    w.close()
    assert (out / PROGRESS_FILE).read_bytes() == journal  # not even rewritten

    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG, retry_failed=died_externally)
    assert w.pending() == [7] and list(w.retried) == [7]
    process(w)
    w.finish({})
    rows = w.manifest_rows()
    assert rows[13] == (PATHS[13], 13, "failed", CRASHED)  # a decoder crash would crash again
    assert rows[4][2] == "failed" and rows[7][2] == "ok"  # the reader's own reasons stay too
    assert verify_folder(out).ok, problems(out)


# --------------------------------------------------------------------------- no room


BIG = (8, 120_000)  # 3.84 MB of responses.npy
BIG_PATHS = [f"v{i}.mp4" for i in range(BIG[0])]


def big_rows(rows) -> np.ndarray:
    return np.stack([np.full(BIG[1], i, np.float32) for i in rows])


def big_run(out: Path) -> None:
    w = ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG)
    for i in w.pending():
        w.write_rows([i], big_rows([i]))
    w.finish({})


CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    from tests.test_integrity import BIG, BIG_PATHS, CONFIG, big_rows
    from berg_jax.writer import OutputDirError, ResponseWriter
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
    try:
        w = ResponseWriter.open({out!r}, BIG_PATHS, BIG[1], CONFIG)
        for i in w.pending():
            w.write_rows([i], big_rows([i]))
    except OutputDirError as exc:
        print(type(exc).__name__, exc)
        sys.exit(2)
    print("finished")
""")


def run_limited(out: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), out=str(out), limit=limit)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_a_file_size_limit_is_an_error_at_the_start_then_mid_run_never_a_signal(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    big_run(ref)
    out = tmp_path / "out"
    # 1. The limit is below responses.npy's size: refused at the start, nothing half-written.
    proc = run_limited(out, 1 << 20)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # a bus error would be -7 (SIGBUS)
    assert proc.stdout.startswith(f"OutOfSpaceError no room in {out} for responses.npy (one file of "
                                  f"{file_bytes(BIG):,} bytes) ({file_bytes(BIG):,} bytes needed;"), proc.stdout
    assert "file size limit (ulimit -f) 1,048,576 bytes" in proc.stdout
    assert "then run the same command again" in proc.stdout
    assert not (out / RESPONSES_FILE).exists() and no_temp_files(out)
    # 2. Created without a limit, resumed under one that ends inside row 5: rows 0-4 are kept.
    ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG).close()
    proc = run_limited(out, len(header_bytes(BIG)) + 5 * BIG[1] * 4 + 100)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "for responses.npy (" in proc.stdout and "File too large" in proc.stdout
    assert proc.stdout.rstrip().endswith("it resumes, keeping the 5 rows already recorded"), proc.stdout
    # 3. Without the limit, the same job resumes and ends as a clean run.
    w = ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG)
    assert w.pending() == [5, 6, 7] and w.repairs == []
    w.close()
    big_run(out)
    assert_same_as(out, ref)


def test_no_free_space_at_the_start_names_out_and_the_bytes(tmp_path: Path, monkeypatch, capsys) -> None:
    import berg_jax.writer as writer_module

    monkeypatch.setattr(writer_module, "free_bytes", lambda out: 3_000_000)
    out = tmp_path / "out"
    with pytest.raises(OutOfSpaceError) as e:
        ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG)
    assert str(e.value).startswith(f"no room in {out} for responses.npy ({file_bytes(BIG):,} bytes needed; "
                                   "3,000,000 bytes free")
    assert isinstance(e.value, OutputDirError)  # the CLI's configuration-error status, 2
    assert sorted(p.name for p in out.iterdir()) == [".berg-jax.lock"]  # not even job.json


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 3 MB tmpfs (root only; elsewhere the RLIMIT_FSIZE test above covers the same code)."""
    where = tmp_path / "small"
    if not _mount_tmpfs(where, "3m"):
        pytest.skip("mounting a tmpfs needs root and CAP_SYS_ADMIN here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_file_system_then_space_freed(small_fs: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    big_run(ref)
    out = small_fs / "out"
    with pytest.raises(OutOfSpaceError) as e:
        ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG)
    msg = str(e.value)
    assert msg.startswith(f"no room in {out} for responses.npy ({file_bytes(BIG):,} bytes needed; ") and " bytes free" in msg
    assert sorted(p.name for p in out.iterdir()) == [".berg-jax.lock"]
    # space freed (the tmpfs grows): the same job runs and ends as a clean run
    subprocess.run(["mount", "-o", "remount,size=12m", str(small_fs)], check=True)
    big_run(out)
    assert_same_as(out, ref)
    assert verify_folder(out).ok


def test_the_disk_filling_up_mid_run_stops_cleanly_and_resumes(small_fs: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    big_run(ref)
    subprocess.run(["mount", "-o", "remount,size=5m", str(small_fs)], check=True)
    out = small_fs / "out"
    w = ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG)  # 3.84 MB reserved: fits
    w.write_rows([0], big_rows([0]))
    # another writer takes every block that is left
    with open(small_fs / "filler", "wb") as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
    # the arrays' writes still land in their reserved space; the journal needs a new block
    with pytest.raises(OutOfSpaceError) as e:
        w.mark_failed(1, "a long reason " * 400)
    assert str(e.value).startswith(f"no room in {out} for progress.jsonl (")
    assert str(e.value).endswith("then run the same command again: it resumes, keeping the 1 rows already recorded")
    w.close()
    (small_fs / "filler").unlink()
    w = ResponseWriter.open(out, BIG_PATHS, BIG[1], CONFIG)
    assert w.pending() == list(range(1, 8)) and w.repairs == []  # row 0 kept; a torn line, if any, cut
    w.close()
    big_run(out)
    assert_same_as(out, ref)


# --------------------------------------------------------------------------- extra manifest columns


def _noted_run(out: Path, paths, stop_after: int | None = None) -> None:
    w = ResponseWriter.open(out, paths, 3, CONFIG, manifest_columns=("decoder",))
    for k, i in enumerate(w.pending()):
        if stop_after is not None and k == stop_after:
            w.close()  # "killed"
            return
        if i == 2:
            w.mark_failed(i, f"{paths[i]}: not a readable video container")
        else:
            w.write_rows([i], np.full((1, 3), i, np.float32), {"decoder": ["gpu" if i % 2 else "cpu (10-bit)"]})
    w.finish({})


def test_extra_manifest_columns_survive_resume_merge_and_verify(tmp_path: Path, capsys) -> None:
    from berg_jax import distributed
    from berg_jax.distributed import Shard

    paths = [f"clips/{i}.mp4" for i in range(6)]
    ref = tmp_path / "ref"
    _noted_run(ref, paths)
    assert (ref / MANIFEST_FILE).read_text().splitlines() == [
        "path,row,status,error,decoder", "clips/0.mp4,0,ok,,cpu (10-bit)", "clips/1.mp4,1,ok,,gpu",
        "clips/2.mp4,2,failed,clips/2.mp4: not a readable video container,", "clips/3.mp4,3,ok,,gpu",
        "clips/4.mp4,4,ok,,cpu (10-bit)", "clips/5.mp4,5,ok,,gpu"]
    assert json.loads((ref / "job.json").read_text())["manifest_columns"] == ["decoder"]
    assert verify_folder(ref).ok
    # killed after 3 rows, resumed: the notes of the first rows come back from the journal
    out = tmp_path / "out"
    _noted_run(out, paths, stop_after=3)
    _noted_run(out, paths)
    assert_same_as(out, ref)
    # a tampered decoder value is found
    text = (out / MANIFEST_FILE).read_text()
    (out / MANIFEST_FILE).write_text(text.replace("clips/3.mp4,3,ok,,gpu", "clips/3.mp4,3,ok,,cpu"))
    assert f"{MANIFEST_FILE}: rows 3: disagree with job.json and progress.jsonl (path, row, status or error)" \
        in problems(out)
    # shards with the column merge into the single run's manifest
    merged = tmp_path / "merged"
    for i in range(2):
        block, folder = distributed.shard_inputs(paths, merged, Shard(i, 2))
        w = ResponseWriter.open(folder, block, 3, CONFIG, manifest_columns=("decoder",))
        for r in w.pending():
            g = r + 3 * i
            if g == 2:
                w.mark_failed(r, f"{paths[g]}: not a readable video container")
            else:
                w.write_rows([r], np.full((1, 3), g, np.float32), {"decoder": ["gpu" if g % 2 else "cpu (10-bit)"]})
        w.finish({})
    capsys.readouterr()
    assert cli.main(["merge", str(merged)]) == 1
    assert_same_as(merged, ref, names=(RESPONSES_FILE, MANIFEST_FILE, "job.json"))
    assert verify_folder(merged).ok
    # misuse
    w = ResponseWriter.open(tmp_path / "misuse", paths, 3, CONFIG, manifest_columns=("decoder",))
    with pytest.raises(ValueError, match="extra manifest columns are"):
        w.write_rows([0], np.zeros((1, 3), np.float32), {"other": ["x"]})
    with pytest.raises(ValueError, match="1 values for 2 rows"):
        w.write_rows([0, 1], np.zeros((2, 3), np.float32), {"decoder": ["x"]})
    w.close()
    with pytest.raises(ValueError, match="new and distinct"):
        ResponseWriter.open(tmp_path / "misuse2", paths, 3, CONFIG, manifest_columns=("error",))


def test_a_carriage_return_in_a_path_keeps_the_manifest_whole(tmp_path: Path) -> None:
    import csv

    paths = ["clips/a\rb.mp4", "clips/c,d.mp4", 'clips/"q".mp4', "clips/e\nf.mp4"]
    w = ResponseWriter.open(tmp_path, paths, 2, CONFIG)
    w.write_rows([0, 1, 2], np.zeros((3, 2), np.float32))
    w.mark_failed(3, f"{paths[3]}: cannot decode\r it")
    w.finish({})
    with open(tmp_path / MANIFEST_FILE, newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == paths and rows[4][3] == f"{paths[3]}: cannot decode\r it"
    assert verify_folder(tmp_path).ok


def test_an_edited_job_json_is_written_again_on_resume(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    job = json.loads((out / "job.json").read_text())
    original = (out / "job.json").read_bytes()
    job["inputs"][0] = "videos/someone_elses.mp4"  # content changed, fingerprint kept
    (out / "job.json").write_text(json.dumps(job))
    assert problems(out)[0] == "job.json: its fingerprint does not match its content (edited or damaged)"
    pending, repairs = resume(out)
    assert pending == [] and repairs == ["job.json: its content did not match its fingerprint (edited or "
                                         "damaged): written again"]
    assert (out / "job.json").read_bytes() == original and verify_folder(out).ok
    job = json.loads(original)
    job["fingerprint"] = "0" * 64  # the fingerprint damaged, the content this job's
    (out / "job.json").write_text(json.dumps(job))
    assert resume(out)[1][0].startswith("job.json: its content did not match")
    assert (out / "job.json").read_bytes() == original


def test_a_legacy_journal_is_cut_before_its_array_is_rebuilt(tmp_path: Path, reference: Path) -> None:
    out = finished_copy(reference, tmp_path)
    lines = [json.loads(line) for line in (out / PROGRESS_FILE).read_text().splitlines()]
    (out / PROGRESS_FILE).write_text("".join(json.dumps({k: v for k, v in e.items() if k != "crc32"}) + "\n"
                                             for e in lines))
    (out / RESPONSES_FILE).unlink()
    w = ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    assert w.pending() == list(range(N_IN))
    w.close()  # killed right after the rebuild: the journal on disk no longer trusts those rows
    assert (out / PROGRESS_FILE).read_bytes() == b""
    assert resume(out)[0] == list(range(N_IN))
    assert_same_as(out, reference)


def test_no_room_found_by_fallocate_leaves_only_the_lock(tmp_path: Path, monkeypatch) -> None:
    import errno

    import berg_jax.writer as writer_module

    def full(path, shape):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")  # a quota statvfs did not show

    monkeypatch.setattr(writer_module, "create_nan_npy", full)
    out = tmp_path / "out"
    with pytest.raises(OutOfSpaceError, match="Disk quota exceeded"):
        ResponseWriter.open(out, PATHS, N_VOX, CONFIG)
    assert sorted(p.name for p in out.iterdir()) == [".berg-jax.lock"]
