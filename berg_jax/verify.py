"""`berg-jax verify OUT`: check an encode output folder against its journal, recomputing nothing.

What is checked, for OUT itself (a finished `encode`, or a merged `encode --distributed`),
or, where OUT has no job.json yet, for each shard under OUT/shards/:

- job.json parses and its fingerprint matches its content;
- every array exists with the .npy header and size job.json implies;
- progress.jsonl is readable to its end and records every row exactly once (ok or failed);
- every journaled batch's rows still match the CRC-32 recorded when they were written (rows
  past the end of a truncated file are reported as cut off);
- manifest.csv agrees with job.json and the journal row by row (path, row, status, error);
- run.json exists, and each file it lists under `file_crc32` (manifest.csv, the NIfTIs, CSVs)
  still has that CRC-32.

Everything is read in a stream: one journal entry's rows at a time (in ~64 MB blocks), the
manifest line by line; memory stays bounded for a million-row folder. Journal lines written
before berg-jax recorded checksums cannot be checked; they are counted as unverified.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from berg_jax.distributed import SHARD_FILE, SHARDS_DIR, shard_folders
from berg_jax.errors import UsageError
from berg_jax.npy_rows import NpyRows, file_crc32, format_rows, inspect_npy
from berg_jax.writer import (
    CHECKSUM_KEY,
    FILE_CHECKSUMS_KEY,
    JOB_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    PROGRESS_FILE,
    RUN_FILE,
    NOTES_KEY,
    iter_journal,
    job_fingerprint,
    manifest_columns_of,
)

__all__ = ["Problem", "Report", "check_job_folder", "verify_folder"]


@dataclasses.dataclass
class Problem:
    """One damaged file, or one damaged set of rows in it.

    file: path relative to the folder verified ("responses.npy", "shards/process-00001-of-00002/
    responses.npy"); rows: the rows concerned (ascending), or None for the whole file.
    """

    file: str
    reason: str
    rows: list[int] | None = None

    def __str__(self) -> str:
        where = f"{self.file}: rows {format_rows(self.rows)}" if self.rows else self.file
        return f"{where}: {self.reason}"


@dataclasses.dataclass
class Report:
    """What `verify_folder` found: `ok` when `problems` is empty."""

    out: Path
    folders: list[str] = dataclasses.field(default_factory=list)  # job folders checked ("." = OUT)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    n_rows: int = 0
    n_ok: int = 0
    n_failed: int = 0
    n_checked_rows: int = 0  # rows whose checksums were compared (per folder, not per array)
    n_unverified_rows: int = 0  # rows journaled without checksums (older berg-jax)
    arrays: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)  # whole files whose CRC-32 matched

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_folder(out: str | Path, show_progress: bool = False) -> Report:
    """Check OUT (see the module docstring) and return what was found; raises only for a folder that isn't one.

    Raises:
      UsageError: OUT does not exist, or holds neither a job.json nor shards.
    """
    out = Path(out)
    if not out.is_dir():
        raise UsageError(f"{out}: no such folder; pass the --out of a `berg-jax encode` run")
    report = Report(out)
    if (out / JOB_FILE).exists():
        check_job_folder(out, report, "", show_progress)
        return report
    folders = shard_folders(out / SHARDS_DIR)
    if not folders:
        raise UsageError(f"{out} holds no berg-jax results (no {JOB_FILE}, no {SHARDS_DIR}/process-*-of-*): "
                         "pass the --out of a `berg-jax encode` run")
    for (_, _), folder in sorted(folders.items()):
        prefix = f"{SHARDS_DIR}/{folder.name}/"
        if not (folder / JOB_FILE).exists():
            try:
                n_rows = json.loads((folder / SHARD_FILE).read_text("utf-8"))["n_rows"]
            except (OSError, ValueError, KeyError, TypeError):
                n_rows = None
            if n_rows != 0:  # an empty shard has nothing but shard.json
                report.problems.append(Problem(prefix + JOB_FILE, "missing: this shard has not started"))
            continue
        check_job_folder(folder, report, prefix, show_progress)
    return report


def check_job_folder(folder: Path, report: Report, prefix: str = "", show_progress: bool = False) -> None:
    """Check one encode folder (`folder` holds job.json), adding to `report`; `prefix` names it in Problems."""
    from tqdm.auto import tqdm

    problems = report.problems
    report.folders.append(prefix.rstrip("/") or ".")

    def problem(file: str, reason: str, rows: list[int] | np.ndarray | None = None) -> None:
        problems.append(Problem(prefix + file, reason, None if rows is None else sorted(int(r) for r in rows)))

    # ---- job.json
    try:
        job = json.loads((folder / JOB_FILE).read_text("utf-8", errors="surrogateescape"))
        inputs, arrays = list(job["inputs"]), {str(k): int(v) for k, v in job["arrays"].items()}
        n = int(job["n_inputs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem(JOB_FILE, f"unreadable ({exc}): nothing else can be checked without it")
        return
    if job.get("fingerprint") != job_fingerprint(job) or len(inputs) != n:
        problem(JOB_FILE, "its fingerprint does not match its content (edited or damaged)")
    report.n_rows += n
    report.arrays += [prefix + a for a in arrays if prefix + a not in report.arrays]

    # ---- the arrays: header and size
    files: dict[str, NpyRows] = {}
    for name, width in arrays.items():
        state = inspect_npy(folder / name, (n, width))
        if state.kind != "ok":
            problem(name, state.detail)
        if state.kind in ("ok", "wrong_size"):  # a wrong-size file's rows inside it can still be checked
            try:
                files[name] = NpyRows(folder / name, (n, width))
            except OSError as exc:
                problem(name, f"unreadable ({exc.strerror or exc})")

    # ---- progress.jsonl, streamed: every batch's rows against its checksums, every row once
    journal = folder / PROGRESS_FILE
    size = journal.stat().st_size if journal.exists() else 0
    status = np.zeros(n, np.uint8)  # 0 unrecorded, 1 ok, 2 failed
    claims = np.zeros(n, np.uint16)
    errors: dict[int, str] = {}
    # The extra manifest columns' values per row, as codes into a few distinct strings
    # (a decoder column holds a handful): a few bytes a row, however many rows.
    extra = manifest_columns_of(job)[len(MANIFEST_COLUMNS):]
    note_codes = {c: np.zeros(n, np.int32) for c in extra}
    note_texts: dict[str, dict[str, int]] = {c: {"": 0} for c in extra}
    damaged: dict[tuple[str, str], list[int]] = defaultdict(list)
    good_end = 0
    try:
        with tqdm(total=size, unit="B", unit_scale=True, dynamic_ncols=True, disable=not show_progress,
                  desc=f"verifying {prefix.rstrip('/') or folder.name} (journal)") as bar:
            for e, end in iter_journal(journal, n):
                bar.update(end - good_end)
                good_end = end
                rows = np.asarray(e["rows"], np.int64)
                np.add.at(claims, rows, 1)
                status[rows] = 1 if e["status"] == "ok" else 2
                if e["status"] == "failed":
                    errors.update((int(r), e["error"]) for r in rows)
                for column, values in (e.get(NOTES_KEY) or {}).items():
                    if column in note_codes:
                        texts = note_texts[column]
                        note_codes[column][rows] = [texts.setdefault(str(v), len(texts)) for v in values]
                recorded = e.get(CHECKSUM_KEY) or {}
                if not recorded:
                    report.n_unverified_rows += len(rows)
                    continue
                report.n_checked_rows += len(rows)
                for name, f in files.items():
                    if name not in recorded:
                        continue
                    try:
                        crc = f.crc32(e["rows"])
                    except OSError as exc:  # EIO on a failing disk: these rows are damage to list
                        damaged[name, f"unreadable ({exc.strerror or exc})"] += e["rows"]
                        continue
                    if crc is None:
                        damaged[name, "cut off: the file ends before them"] += e["rows"]
                    elif crc != recorded[name]:
                        damaged[name, "do not match the checksum recorded when they were written"] += e["rows"]
    finally:
        for f in files.values():
            f.close()
    if not journal.exists():
        problem(PROGRESS_FILE, "missing: no row is known to be done")
    elif good_end != size:
        line = _count_newlines(journal, good_end) + 1
        problem(PROGRESS_FILE, f"unreadable from line {line} (byte {good_end:,} of {size:,}): the rows "
                               "recorded after it are not known to be done")
    for (name, reason), rows in damaged.items():
        problem(name, reason, rows)
    twice = np.flatnonzero(claims > 1)
    if twice.size:
        problem(PROGRESS_FILE, "recorded more than once", twice)
    finished = (folder / RUN_FILE).exists()
    unrecorded = np.flatnonzero(status == 0)
    if unrecorded.size:
        problem(PROGRESS_FILE, "not recorded as done or failed" + (
            "" if finished else ": the run has not finished; run the same `berg-jax encode` command to finish it"),
            unrecorded)
    report.n_ok += int(np.count_nonzero(status == 1))
    report.n_failed += int(np.count_nonzero(status == 2))

    # ---- manifest.csv and run.json (written at finish)
    if not finished:
        problem(RUN_FILE, "missing: the run has not finished; run the same `berg-jax encode` command to finish it")
        return
    notes = {c: (note_codes[c], {code: text for text, code in note_texts[c].items()}) for c in extra}
    _check_manifest(folder / MANIFEST_FILE, inputs, status, errors, notes, manifest_columns_of(job),
                    lambda r, rows=None: problem(MANIFEST_FILE, r, rows))
    try:
        run = json.loads((folder / RUN_FILE).read_text("utf-8", errors="surrogateescape"))
        checksums = dict(run.get(FILE_CHECKSUMS_KEY) or {})
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        problem(RUN_FILE, f"unreadable ({exc})")
        return
    for name, crc in checksums.items():
        try:
            found = file_crc32(folder / name)
        except FileNotFoundError:
            problem(name, "missing (run.json lists it)")
            continue
        except OSError as exc:  # a folder in its place, an I/O error: damage to list, not a crash
            problem(name, f"unreadable ({exc.strerror or exc})")
            continue
        if not isinstance(crc, int) or isinstance(crc, bool):
            problem(RUN_FILE, f"its CRC-32 of {name} is {crc!r}, not a number (edited or damaged)")
        elif found != crc:
            problem(name, f"changed since the run finished (CRC-32 {found:08x}, recorded {crc:08x})")
        else:
            report.files.append(prefix + name)


def _count_newlines(path: Path, n_bytes: int) -> int:
    """Newlines in the first `n_bytes` of `path`, read in 1 MB blocks."""
    count = 0
    with open(path, "rb") as f:
        while n_bytes > 0:
            block = f.read(min(1 << 20, n_bytes))
            if not block:
                break
            count += block.count(b"\n")
            n_bytes -= len(block)
    return count


def _check_manifest(path: Path, inputs: list[str], status: np.ndarray, errors: dict[int, str],
                    notes: dict[str, tuple[np.ndarray, dict[int, str]]], header: tuple[str, ...], problem) -> None:
    """manifest.csv row by row against job.json's inputs and the journal's status, errors and notes."""
    names = {1: "ok", 2: "failed"}
    wrong: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            if tuple(next(reader, ())) != header:
                problem(f"does not start with the header {','.join(header)}")
                return
            j = -1
            for j, row in enumerate(reader):
                if j >= len(inputs):
                    problem(f"has more rows than the {len(inputs)} inputs")
                    break
                expect = (inputs[j], str(j), names.get(int(status[j]), "pending"), errors.get(j, ""),
                          *(texts[int(codes[j])] for codes, texts in notes.values()))
                if tuple(row) != expect:
                    wrong.append(j)
            if j + 1 < len(inputs):
                problem(f"ends after {j + 1} of {len(inputs)} rows", list(range(j + 1, len(inputs))))
    except FileNotFoundError:
        problem("missing")
        return
    except (OSError, csv.Error) as exc:
        problem(f"unreadable ({exc})")
        return
    if wrong:
        problem("disagree with job.json and progress.jsonl (path, row, status or error)", wrong)
