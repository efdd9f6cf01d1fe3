"""`berg-jax merge OUT`: assemble the shards of `encode --distributed` into one encode folder.

`merge_shards` checks the shards under OUT/shards/ (all present, finished, not in use, same
settings, rows 0..n-1 exactly once; see `distributed` for how the inputs were split and what
each shard.json records) and writes into OUT itself what a single-process `berg-jax encode`
of all inputs writes: job.json, every array (streamed block by block into a hidden temporary
file, then renamed: memory stays bounded for any number of rows), progress.jsonl,
manifest.csv with global rows, run.json ("merged_from", per-shard run infos), and, when every
shard has them, the 4-D NIfTIs (volumes concatenated) and the plots (renamed to global rows).
job.json, the arrays, manifest.csv and the NIfTIs are byte-identical to the single-process
run's; OUT is then a finished encode folder like any other (a single-process `encode` of the
same inputs into it finds nothing left to do). It uses the writer's public functions only.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gzip
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from berg_jax.atomic import TMP_MARK, atomic_npy, atomic_open, atomic_write_text, csv_line, pretty_json
from berg_jax.distributed import (
    SHARD_FILE,
    SHARD_FORMAT,
    SHARDS_DIR,
    Shard,
    inputs_digest,
    shard_dir_name,
    shard_folders,
    shard_rows,
)
from berg_jax.errors import UsageError
from berg_jax.npy_rows import file_crc32
from berg_jax.verify import Report, check_job_folder
from berg_jax.roi_means import write_csvs_for_job
from berg_jax.writer import (
    FILE_CHECKSUMS_KEY,
    JOB_FILE,
    MANIFEST_EXTRA_KEY,
    MANIFEST_FILE,
    NIFTI_FILE,
    PROGRESS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    OutputDirError,
    job_difference,
    job_files_present,
    job_record,
    lock_dir,
    manifest_columns_of,
    no_room_is_an_error,
    read_journal,
)

_COPY_BYTES = 64 << 20  # arrays are copied in blocks of about this many bytes
_ENCODE = "`berg-jax encode --distributed`"


@dataclasses.dataclass
class _ShardInfo:
    index: int
    folder: Path
    first_row: int
    n_rows: int
    job: dict | None = None  # None for an empty shard
    run: dict | None = None


def _fix(i: int, count: int, again: bool = True) -> str:
    return (f"run the same {_ENCODE} command for process {i}{' again' if again else ''} "
            f"(--process-id {i} of --num-processes {count}, or on its host)")


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8", errors="surrogateescape"))


def _read_shard(root: Path, i: int, count: int, folders: dict) -> _ShardInfo:
    what = f"shard {i} of {count}"
    folder = folders.get((i, count))
    if folder is None:
        raise OutputDirError(f"{what} is missing (no {root / shard_dir_name(i, count)}): "
                                     f"{_fix(i, count, again=False)}")
    try:
        rec = _load_json(folder / SHARD_FILE)
    except FileNotFoundError:
        raise OutputDirError(f"{what} has no {SHARD_FILE} in {folder}: it was not made by "
                                     f"{_ENCODE}; {_fix(i, count, again=False)}") from None
    except ValueError as exc:
        raise OutputDirError(f"{what}: {folder / SHARD_FILE} is not valid JSON ({exc}); "
                                     f"delete {folder} and {_fix(i, count, again=False)}") from None
    if rec.get("format") != SHARD_FORMAT or (rec.get("index"), rec.get("count")) != (i, count):
        raise OutputDirError(f"{what}: {folder / SHARD_FILE} does not describe shard {i} "
                                     f"of {count}; delete {folder} and {_fix(i, count, again=False)}")
    info = _ShardInfo(i, folder, int(rec["first_row"]), int(rec["n_rows"]))
    if info.n_rows == 0:
        return info
    missing = [n for n in (JOB_FILE, MANIFEST_FILE, RUN_FILE)
               if not (folder / n).is_file()]
    if missing:
        raise OutputDirError(f"{what} is not finished ({folder} has no "
                                     f"{' or '.join(missing)}): {_fix(i, count)}; it resumes "
                                     "where it stopped")
    try:
        info.job = _load_json(folder / JOB_FILE)
        info.run = _load_json(folder / RUN_FILE)
    except ValueError as exc:
        raise OutputDirError(f"{what}: unreadable job.json/run.json in {folder} ({exc}); "
                                     f"delete {folder} and {_fix(i, count, again=False)}") from None
    if info.job.get("n_inputs") != info.n_rows or len(info.job.get("inputs") or ()) != info.n_rows:
        raise OutputDirError(f"{what}: {folder / JOB_FILE} has "
                                     f"{info.job.get('n_inputs')} inputs, {SHARD_FILE} says "
                                     f"{info.n_rows}; delete {folder} and {_fix(i, count, again=False)}")
    return info


def _config_difference(a: dict, b: dict) -> str:
    diffs = []
    for key in ("format", "arrays", "n_voxels", MANIFEST_EXTRA_KEY):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} {a.get(key)!r} != {b.get(key)!r}")
    ca, cb = a.get("run_config") or {}, b.get("run_config") or {}
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key, "<unset>") != cb.get(key, "<unset>"):
            diffs.append(f"run_config[{key!r}] {repr(ca.get(key, '<unset>'))[:80]} != "
                         f"{repr(cb.get(key, '<unset>'))[:80]}")
    return "; ".join(diffs)


def _manifest_rows(info: _ShardInfo) -> Iterator[list[str]]:
    """The data rows of a shard's manifest.csv, header checked (its job's columns)."""
    path = info.folder / MANIFEST_FILE
    header = manifest_columns_of(info.job)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        if tuple(next(reader, ())) != header:
            raise OutputDirError(f"{path} does not start with the header {','.join(header)}")
        yield from reader


def _check_rows(info: _ShardInfo, count: int, failed: list[tuple[str, str]]) -> int:
    """Check a shard's manifest against its job and journal; returns its failed count."""
    what = f"shard {info.index} of {count}"
    status = np.zeros(info.n_rows, np.uint8)  # 0 unrecorded, 1 ok, 2 failed
    entries, _ = read_journal(info.folder / PROGRESS_FILE, info.n_rows)
    for e in entries:
        status[np.asarray(e["rows"], np.int64)] = 1 if e["status"] == "ok" else 2
    inputs = info.job["inputs"]
    n_failed, j = 0, -1
    for j, row in enumerate(_manifest_rows(info)):
        bad = (len(row) != len(manifest_columns_of(info.job)) or j >= info.n_rows or row[1] != str(j) or row[0] != inputs[j]
               or row[2] not in ("ok", "failed"))
        if bad or status[j] != (1 if row[2] == "ok" else 2):
            raise OutputDirError(
                f"{what} is not finished or is damaged (manifest.csv line {j + 2} "
                f"{','.join(row)[:120]!r} does not match its job.json/progress.jsonl): "
                f"{_fix(info.index, count)}; if that does not help, delete {info.folder} and "
                f"{_fix(info.index, count, again=False)}")
        if row[2] == "failed":
            n_failed += 1
            failed.append((row[0], row[3]))
    if j + 1 != info.n_rows:
        raise OutputDirError(f"{what}: manifest.csv has {j + 1} rows, expected "
                                     f"{info.n_rows}; {_fix(info.index, count)}")
    return n_failed


def _check_intact(info: _ShardInfo, count: int) -> None:
    """Refuse a shard whose arrays, journal or files no longer match their checksums (`verify`)."""
    report = Report(info.folder)
    check_job_folder(info.folder, report)
    if report.problems:
        listed = "; ".join(str(p) for p in report.problems[:5])
        more = f" and {len(report.problems) - 5} more" if len(report.problems) > 5 else ""
        raise OutputDirError(
            f"shard {info.index} of {count} ({info.folder}) is damaged: {listed}{more}: {_fix(info.index, count)} "
            "(it checks every recorded row and computes the damaged ones again), then merge again")


def _lock(folder: Path, what: str) -> Any:
    try:
        return lock_dir(folder)
    except OutputDirError:
        raise OutputDirError(
            f"{what} ({folder}) is in use by a running berg-jax process: wait for it to finish, "
            "then merge again") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def merge_shards(out: str | os.PathLike) -> dict:
    """Assemble OUT/shards/* into OUT (see the module docstring); returns a summary dict.

    Raises:
      UsageError: OUT holds no shards.
      OutputDirError: a shard is missing, unfinished, in use, damaged or made with
        other settings or another input list than the others; or OUT itself holds the
        results of another job. The message names the shard and the fix.
    """
    out = Path(out)
    root = out / SHARDS_DIR
    folders = shard_folders(root)
    if not folders:
        raise UsageError(f"{out} holds no shards (no {root}/process-*-of-*): run {_ENCODE} "
                           f"--out {out} in every process first")
    counts = sorted({c for _, c in folders})
    if len(counts) > 1:
        raise OutputDirError(
            f"{root} holds the shards of runs with {' and '.join(map(str, counts))} processes: "
            "delete the folders of the run you do not want, then merge again")
    count = counts[0]
    stray = sorted(i for i, _ in folders if i >= count)
    if stray:
        raise OutputDirError(f"{root} holds {shard_dir_name(stray[0], count)}, but "
                                     f"processes are numbered 0..{count - 1}: delete it")
    locks = []
    try:
        shards = []
        for i in range(count):
            info = _read_shard(root, i, count, folders)
            if info.n_rows:
                locks.append(_lock(info.folder, f"shard {i} of {count}"))
            shards.append(info)
        with no_room_is_an_error(out, "the merged files", kept=" (the shards are untouched; the merge starts over)"):
            return _merge_locked(out, root, count, shards, locks)
    finally:
        for lock in locks:
            if lock is not None:
                lock.close()


def _merge_locked(out: Path, root: Path, count: int, shards: list[_ShardInfo], locks: list) -> dict:
    from berg_jax import __version__

    # ---- the shards agree with each other and cover 0..n-1 exactly once
    full = [s for s in shards if s.n_rows]
    recs = [_load_json(s.folder / SHARD_FILE) for s in shards]
    n_total = recs[0]["n_inputs"]
    for s, rec in zip(shards, recs):
        expect = shard_rows(n_total, Shard(s.index, count))
        if rec["n_inputs"] != n_total or rec["inputs_sha256"] != recs[0]["inputs_sha256"] \
                or (s.first_row, s.n_rows) != (expect.start, len(expect)):
            raise OutputDirError(
                f"shard {s.index} of {count} was made from another input list than shard 0 "
                f"({rec['n_inputs']} inputs, rows {s.first_row}..+{s.n_rows}; shard 0: "
                f"{n_total} inputs): every process must list the same inputs; delete "
                f"{s.folder} and {_fix(s.index, count, again=False)} with the same inputs as "
                "the others")
    if not full:
        raise OutputDirError(f"every shard in {root} is empty: there is nothing to merge")
    ref = full[0]
    for s in full[1:]:
        diff = _config_difference(ref.job, s.job)
        if diff:
            raise OutputDirError(
                f"shard {s.index} of {count} was encoded with other settings than shard "
                f"{ref.index} ({diff}): every process must run the same command; delete "
                f"{s.folder} and {_fix(s.index, count, again=False)} with the others' options")
    paths: list[str] = []
    for s in full:
        paths += s.job["inputs"]
    if len(paths) != n_total or inputs_digest(paths) != recs[0]["inputs_sha256"]:
        raise OutputDirError(f"the shards' inputs do not add up to the list they were "
                                     f"split from ({len(paths)} of {n_total}); delete {root} and "
                                     "encode again")
    failed: list[tuple[str, str]] = []
    n_failed = sum(_check_rows(s, count, failed) for s in full)
    for s in full:  # every row is checked against its checksum before it is copied
        _check_intact(s, count)
    # job.json stores "arrays" with sorted keys; its "n_voxels" is the first array's width in
    # the writer's order, so put an array of that width first (the fingerprint sorts keys).
    arrays: dict[str, int] = dict(sorted(((k, int(v)) for k, v in ref.job["arrays"].items()),
                                         key=lambda kv: kv[1] != ref.job["n_voxels"]))
    run_config = ref.job["run_config"]
    job = job_record(paths, arrays, run_config, ref.job.get(MANIFEST_EXTRA_KEY) or ())

    # ---- OUT itself: ours to (re)write, or another job's?
    out_lock = _lock(out, "the output folder")
    locks.append(out_lock)
    job_path = out / JOB_FILE
    if job_path.exists():
        try:
            old = _load_json(job_path)
        except ValueError:
            old = {}
        if old.get("fingerprint") != job["fingerprint"]:
            raise OutputDirError(
                f"{out} already holds the results of another job ({job_path}; "
                f"{job_difference(old, job)}): merging would overwrite them; move them "
                "away, then merge again")
    else:
        ours = job_files_present(out, arrays)
        if ours:
            raise OutputDirError(
                f"{out} already holds {', '.join(ours)} but no {JOB_FILE}, so they are not "
                "known to be this job's: move them away, then merge again")
    for leftover in out.glob(f".*{TMP_MARK}*"):  # from a merge killed mid-write
        leftover.unlink(missing_ok=True)
    # An interrupted merge must never look finished: the completion files go first, come last.
    for name in (RUN_FILE, MANIFEST_FILE, PROGRESS_FILE):
        (out / name).unlink(missing_ok=True)
    text = pretty_json(job)
    if not job_path.exists() or job_path.read_text("utf-8", errors="surrogateescape") != text:
        atomic_write_text(job_path, text)

    # ---- arrays, block by block
    files: dict[str, Path] = {}
    for name, width in arrays.items():
        _merge_array(out / name, full, count, width, n_total)
        files["responses" if name == RESPONSES_FILE else name[: -len(".npy")]] = out / name
    files["manifest"] = out / MANIFEST_FILE
    files["run"] = out / RUN_FILE
    # ROI means' CSVs: the function a single-process encode uses, on the merged arrays.
    files.update(write_csvs_for_job(out, paths, run_config))

    # ---- NIfTIs and plots, when the shards have them
    notes: list[str] = []
    for name in arrays:
        if not name.startswith("responses"):
            continue
        nii = name[: -len(".npy")] + ".nii.gz"
        have = [s for s in full if (s.folder / nii).is_file()]
        if have and len(have) == len(full):
            _merge_nifti(out / nii, full, count, n_total)
            files["nifti" if nii == NIFTI_FILE else nii[: -len(".nii.gz")] + "_nifti"] = out / nii
        elif have:
            notes.append(f"only {len(have)} of {len(full)} shards have {nii}: not merged; the "
                         f"per-shard files are in {root}/*/{nii} (encode every shard with --nifti "
                         "to get a merged one)")
    plot_shards = [s for s in full if (s.folder / "plots").is_dir()]
    if plot_shards:
        n_plots = _merge_plots(out, plot_shards, n_total)
        files["plots"] = out / "plots"
        if len(plot_shards) != len(full):
            notes.append(f"only {len(plot_shards)} of {len(full)} shards drew plots "
                         f"(--plot): {n_plots} plots in {out / 'plots'}")

    # ---- progress.jsonl, manifest.csv, run.json
    _write_journal(out / PROGRESS_FILE, full)
    _write_manifest(out / MANIFEST_FILE, full)
    checked = [MANIFEST_FILE] + [files[k].name for k in files
                                 if k == "nifti" or k.endswith("_nifti") or k.endswith("_csv")]
    run = {
        **run_config,
        "berg_jax_version": __version__,
        "merged_from": count,
        "merge_time": _now(),
        "outputs": {k: str(v) for k, v in files.items()},
        "shards": [
            {"index": s.index, "first_row": s.first_row, "n_rows": s.n_rows,
             "dir": f"{SHARDS_DIR}/{s.folder.name}",
             "run": {k: v for k, v in (s.run or {}).items() if k not in run_config}}
            for s in shards
        ],
        "n_inputs": n_total,
        "n_ok": n_total - n_failed,
        "n_failed": n_failed,
        "n_voxels": job["n_voxels"],
        "arrays": arrays,
        FILE_CHECKSUMS_KEY: {name: file_crc32(out / name) for name in checked},
    }
    atomic_write_text(out / RUN_FILE, pretty_json(run))
    return {**run, "out_dir": str(out), "outputs": files, "failed": failed, "notes": notes,
            "n_shards": count, "n_empty_shards": count - len(full)}


def _merge_array(path: Path, shards: list[_ShardInfo], count: int, width: int, n_total: int) -> None:
    """Concatenate the shards' `path.name` arrays into `path` (temp file + fsync + rename)."""
    with atomic_npy(path, (n_total, width)) as dst:
        step = max(1, _COPY_BYTES // (4 * width))
        for s in shards:
            src_path = s.folder / path.name
            try:
                src = np.load(src_path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise OutputDirError(
                    f"shard {s.index} of {count}: {src_path} is not readable ({exc}); "
                    f"{_fix(s.index, count)}") from None
            if src.shape != (s.n_rows, width) or src.dtype != np.float32:
                raise OutputDirError(
                    f"shard {s.index} of {count}: {src_path} is {src.dtype} {src.shape}, expected "
                    f"float32 {(s.n_rows, width)}; delete {s.folder} and "
                    f"{_fix(s.index, count, again=False)}")
            for start in range(0, s.n_rows, step):
                stop = min(start + step, s.n_rows)
                dst[s.first_row + start:s.first_row + stop] = src[start:stop]
                dst.flush()  # bounded dirty pages
            del src


def _merge_nifti(path: Path, shards: list[_ShardInfo], count: int, n_total: int) -> None:
    """Concatenate the shards' 4-D NIfTIs along time, streaming.

    A 4-D float32 NIfTI stores volume after volume (x fastest), so the merged data are the
    shards' data regions one after the other; the header is shard 0's with the new volume
    count, which is exactly what a single-process run writes (checked for every shard).
    """
    def raw_header(src: Path) -> Any:  # as stored: nib.load's copy resets offset and scaling
        with gzip.open(src, "rb") as f:
            return nib.Nifti1Header.from_fileobj(f)

    first = raw_header(shards[0].folder / path.name)
    shape = tuple(int(d) for d in first.get_data_shape())
    merged = first.copy()
    merged.set_data_shape(shape[:3] + (n_total,))
    offset = int(merged.get_data_offset())
    volume_bytes = int(np.prod(shape[:3])) * np.dtype(np.float32).itemsize
    sources = []
    for s in shards:
        src = s.folder / path.name
        hdr = raw_header(src)
        same = hdr.copy()
        same.set_data_shape(shape[:3] + (n_total,))
        if hdr.get_data_dtype() != np.float32 or tuple(hdr.get_data_shape()) != shape[:3] + (s.n_rows,) \
                or same.binaryblock != merged.binaryblock:
            raise OutputDirError(
                f"shard {s.index} of {count}: {src} is not a float32 {shape[:3] + (s.n_rows,)} NIfTI "
                f"with the other shards' header; delete it and {_fix(s.index, count)}")
        sources.append((src, int(hdr.get_data_offset()), s.n_rows * volume_bytes))
    head = io.BytesIO()
    merged.write_to(head)
    head.write(b"\0" * (offset - head.tell()))
    with atomic_open(path) as raw:
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)
        gz.write(head.getvalue())
        for src, src_offset, n_bytes in sources:
            with gzip.open(src, "rb") as f:
                f.seek(src_offset)
                left = n_bytes
                while left:
                    chunk = f.read(min(left, 8 << 20))
                    if not chunk:
                        raise OutputDirError(f"{src} is truncated: delete it and encode "
                                                     "that shard again")
                    gz.write(chunk)
                    left -= len(chunk)
        gz.close()  # the gzip trailer; `raw` stays open for atomic_open to commit


def _merge_plots(out: Path, shards: list[_ShardInfo], n_total: int) -> int:
    """Copy the shards' plots into OUT/plots, renamed from shard rows to global rows."""
    from berg_jax.pipeline import PLOTS_DIR, plot_file_name

    dst_dir = out / PLOTS_DIR
    dst_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in shards:
        for row in _manifest_rows(s):
            if row[2] != "ok":
                continue
            j = int(row[1])
            src = s.folder / PLOTS_DIR / plot_file_name(row[0], j, s.n_rows)
            if not src.is_file():
                continue
            with open(src, "rb") as f, atomic_open(
                    dst_dir / plot_file_name(row[0], s.first_row + j, n_total)) as g:
                shutil.copyfileobj(f, g)
            n += 1
    return n


def _write_journal(path: Path, shards: list[_ShardInfo]) -> None:
    """A progress.jsonl recording every row, so OUT is a finished encode folder like any other.

    The shards' own entries, rows moved to global rows: their checksums (over the rows in the
    order listed) still hold for the merged arrays, so `verify` and a resume check them there.
    """
    with atomic_open(path) as f:
        for s in shards:
            entries, _ = read_journal(s.folder / PROGRESS_FILE, s.n_rows)
            for e in entries:
                moved = {**e, "rows": [s.first_row + r for r in e["rows"]]}
                f.write((json.dumps(moved) + "\n").encode("ascii"))


def _write_manifest(path: Path, shards: list[_ShardInfo]) -> None:
    """manifest.csv with global rows, written as `ResponseWriter.finish` writes it."""
    with atomic_open(path) as f:
        buf = io.StringIO()
        buf.write(csv_line(manifest_columns_of(shards[0].job)))
        for s in shards:
            for k, row in enumerate(_manifest_rows(s)):
                buf.write(csv_line((row[0], s.first_row + int(row[1]), *row[2:])))
                if k % 4096 == 4095:
                    f.write(buf.getvalue().encode("utf-8", errors="surrogateescape"))
                    buf.seek(0)
                    buf.truncate()
        f.write(buf.getvalue().encode("utf-8", errors="surrogateescape"))
