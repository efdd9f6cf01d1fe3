"""The files `berg-jax encode` writes into its output folder OUT, crash-safe and resumable.

OUT holds (all names fixed):

- `job.json`: what the results are of: `{"format", "fingerprint", "n_inputs", "n_voxels",
  "arrays": {file: columns}, "inputs": [path, ...], "run_config": {...}}`. Written once,
  first. A later run on the same OUT must have the same fingerprint (sha256 of the canonical
  JSON of format, inputs, n_voxels, arrays and run_config) or it is refused with `OutputDirError`.
- the arrays, by default one `responses.npy`: float32 (n_inputs, n_voxels), C order, a plain
  `.npy` (`numpy.load`, also with `mmap_mode`). Row i is input i; column j is the j-th
  selected voxel. Created full-size -- its space reserved first (`posix_fallocate`), so a
  full disk or quota is an error at the start, never a crash later -- NaN-filled, under a
  temporary name and renamed, then filled in place batch by batch with `pwrite` (not through
  a memory map: see `npy_rows`). A job may name several arrays with the same rows (one
  `responses_sub-SS.npy` per subject, `components.npy`); every one follows these rules.
- `progress.jsonl`: the journal, append-only, one JSON object per line:
  `{"rows": [i, ...], "status": "ok", "crc32": {file: c, ...}}` or the same with
  `"status": "failed", "error": "..."`; `crc32` holds each array's CRC-32 of those rows' float32
  bytes in the order listed (`npy_rows.rows_crc32`; a failed row's are NaN). A line is appended
  (and fsynced) only after its rows were synced to every array. Lines without `crc32` (written
  before berg-jax recorded checksums) are trusted as they are.
- `manifest.csv` (at finish): header `path,row,status,error` (then the job's extra columns,
  job.json's `manifest_columns`, e.g. `decoder`; their values come from `write_rows(notes=)`
  and are journaled as `"notes"`), one line per input in input order, `\\n` line ends. A
  failed input's row in every array is all NaN.
- `run.json` (at finish): run_config merged with the caller's run_info plus counts, and
  `file_crc32`: the CRC-32 of manifest.csv and of every file the caller names (the NIfTIs),
  which `verify` checks.
- `.berg-jax.lock`: held with `flock` while a writer is open, so two runs cannot share OUT.

Resume protocol: re-running the same command calls `ResponseWriter.open` again. It verifies
before it trusts: every array must exist with the right header and size (a missing or
damaged one is recreated, a truncated or grown one resized), and every journaled batch's rows
must still match their checksums. Batches that don't are dropped from the journal (rewritten
atomically) and computed again; `repairs` says which rows and why. The rows the journal then
lists (up to the first torn/invalid line, which is cut off) are kept, every other row is
`pending()` and recomputed, overwriting whatever half-written data it holds. Failed rows are
re-NaN'd when marked, so the final `responses.npy` and `manifest.csv` are byte-identical to an
uninterrupted run's, wherever the previous run was killed (Ctrl-C, kill -9, power loss, a
full disk) and whatever happened to the files in between.

Retrying failures: a failure that was not the input's fault (its decode worker was killed
from outside) should not stay recorded forever. `open(..., retry_failed=predicate)` drops
the failed batches whose error text the predicate accepts from the journal (in the same
atomic rewrite) and makes their rows pending again; `retried` says which. The rows' NaN stays
until they are written again, like any pending row's leftovers, so the results end as if the
input had never failed, and every row is still journaled exactly once.

The NIfTI files beside them (`responses.nii.gz`, OUT/volumes/) are written by `volumes`;
`merge` assembles the shards of `encode --distributed` with the public functions below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from berg_jax.atomic import TMP_MARK, atomic_write_text, canonical_json, csv_line, jsonable, pretty_json
from berg_jax.errors import BERGError
from berg_jax.npy_rows import (
    NpyRows,
    create_nan_npy,
    file_bytes,
    file_crc32,
    format_rows,
    inspect_npy,
    is_out_of_space,
    rows_crc32,
)

try:  # flock is POSIX-only; where it is missing, OUT simply isn't guarded against sharing.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# /2 added "arrays" (several arrays per job); a /1 folder is refused with the format named.
FORMAT = "berg-jax-out/2"
JOB_FILE = "job.json"
RESPONSES_FILE = "responses.npy"
COMPONENTS_FILE = "components.npy"
PROGRESS_FILE = "progress.jsonl"
MANIFEST_FILE = "manifest.csv"
RUN_FILE = "run.json"
NIFTI_FILE = "responses.nii.gz"
LOCK_FILE = ".berg-jax.lock"
MANIFEST_COLUMNS = ("path", "row", "status", "error")
MANIFEST_EXTRA_KEY = "manifest_columns"  # job.json: manifest.csv's columns after MANIFEST_COLUMNS
NOTES_KEY = "notes"  # a journal entry's {extra manifest column: [value per row, in the order of "rows"]}
CHECKSUM_KEY = "crc32"  # a journal entry's {array file: CRC-32 of its rows}
FILE_CHECKSUMS_KEY = "file_crc32"  # run.json's {file beside the arrays: CRC-32 of the whole file}
_VERIFY_BAR_BYTES = 256 << 20  # a resume shows a progress bar while it re-reads more than this


class OutputDirError(BERGError):
    """OUT cannot be used: it holds another job's results, is in use, or is damaged."""


class OutOfSpaceError(OutputDirError):
    """OUT's file system (or the user's quota, or the file size limit) has no room for what must be written."""


def free_bytes(out: Path) -> int | None:
    """Bytes this user may still write in `out`'s file system (statvfs), or None where unknown."""
    try:
        return shutil.disk_usage(out).free
    except OSError:
        return None


def file_size_limit() -> int | None:
    """This process's largest allowed file (`ulimit -f`, RLIMIT_FSIZE) in bytes, or None when unlimited."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def out_of_space_error(out: Path, what: str, needed: int | None = None, cause: BaseException | None = None,
                       kept: str = "") -> OutOfSpaceError:
    """The error for a write to `out` that found no room: what, how much, how much is free, and the fix."""
    free = free_bytes(out)
    limit = file_size_limit()
    facts = []
    if needed is not None:
        facts.append(f"{needed:,} bytes needed")
    if free is not None:
        facts.append(f"{free:,} bytes free")
    if limit is not None:
        facts.append(f"file size limit (ulimit -f) {limit:,} bytes")
    if cause is not None:
        facts.append(os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(cause))
    return OutOfSpaceError(
        f"no room in {out} for {what} ({'; '.join(facts)}): free some space (or raise the quota / "
        f"limit) or choose another --out, then run the same command again{kept}")


@contextlib.contextmanager
def no_room_is_an_error(out: Path, what: str, needed: int | None = None,
                        kept: str | Callable[[], str] = "") -> Iterator[None]:
    """Inside, an OSError that means no room (`npy_rows.is_out_of_space`) becomes `OutOfSpaceError`.

    The one place every writer into OUT (this writer, the NIfTIs, plots and CSVs, merge,
    components -> responses) turns ENOSPC / EDQUOT / EFBIG into the error that names OUT,
    `what`, the bytes and the fix; other OSErrors pass unchanged. `kept`: what the rerun
    keeps, appended to the message (a callable is asked only when the error happens).
    """
    try:
        yield
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        raise out_of_space_error(out, what, needed, exc, kept() if callable(kept) else kept) from None


# --------------------------------------------------------------------------- the writer


def job_record(paths: list[str], arrays: dict[str, int], run_config: dict,
               manifest_columns: Sequence[str] = ()) -> dict:
    """job.json's content; the fingerprint covers everything that determines the results.

    `manifest_columns`: manifest.csv's columns after path,row,status,error (e.g. "decoder");
    recorded as "manifest_columns" only when there are some, so older jobs keep their fingerprint.
    """
    body = {
        "format": FORMAT,
        "inputs": paths,
        "n_inputs": len(paths),
        "n_voxels": next(iter(arrays.values())),
        "arrays": dict(arrays),
        "run_config": jsonable(run_config),
    }
    if manifest_columns:
        body[MANIFEST_EXTRA_KEY] = [str(c) for c in manifest_columns]
    body["fingerprint"] = job_fingerprint(body)
    return body


def job_fingerprint(job: dict) -> str:
    """sha256 of the canonical JSON of a job record's content (every key but "fingerprint")."""
    body = {k: job.get(k) for k in ("format", "inputs", "n_inputs", "n_voxels", "arrays", "run_config")}
    if job.get(MANIFEST_EXTRA_KEY):
        body[MANIFEST_EXTRA_KEY] = job[MANIFEST_EXTRA_KEY]
    return hashlib.sha256(canonical_json(body).encode("utf-8", errors="surrogateescape")).hexdigest()


def manifest_columns_of(job: dict) -> tuple[str, ...]:
    """A job's manifest.csv header: path,row,status,error and its extra columns, if any."""
    return (*MANIFEST_COLUMNS, *(job.get(MANIFEST_EXTRA_KEY) or ()))


def job_difference(old: dict, new: dict) -> str:
    """A short human description of how two job records differ."""
    diffs = []
    if old.get("format") != new["format"]:
        diffs.append(f"format {old.get('format')!r} != {new['format']!r}")
    if old.get("n_voxels") != new["n_voxels"]:
        diffs.append(f"n_voxels {old.get('n_voxels')} != {new['n_voxels']}")
    if old.get("arrays") != new["arrays"]:
        diffs.append(f"arrays {old.get('arrays')} != {new['arrays']}")
    old_cfg, new_cfg = old.get("run_config") or {}, new["run_config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key, "<unset>") != new_cfg.get(key, "<unset>"):
            a, b = (repr(c.get(key, "<unset>"))[:80] for c in (old_cfg, new_cfg))
            diffs.append(f"run_config[{key!r}] {a} != {b}")
    old_in, new_in = old.get("inputs") or [], new["inputs"]
    if len(old_in) != len(new_in):
        diffs.append(f"{len(old_in)} inputs != {len(new_in)}")
    else:
        first = next((i for i, (a, b) in enumerate(zip(old_in, new_in)) if a != b), None)
        if first is not None:
            diffs.append(f"input {first} {old_in[first]!r} != {new_in[first]!r}")
    return "; ".join(diffs) or "fingerprint differs"


def job_files_present(out: Path, arrays: Iterable[str]) -> list[str]:
    """Which of a job's files (its arrays, progress.jsonl, manifest.csv, run.json) exist in `out`."""
    return [n for n in (*arrays, PROGRESS_FILE, MANIFEST_FILE, RUN_FILE) if (out / n).exists()]


def read_journal(path: Path, n_inputs: int) -> tuple[list[dict], int]:
    """The valid journal entries and the byte length they span (see `iter_journal`)."""
    entries, good_end = [], 0
    for entry, good_end in iter_journal(path, n_inputs):
        entries.append(entry)
    return entries, good_end


def iter_journal(path: Path, n_inputs: int) -> Iterator[tuple[dict, int]]:
    """(entry, byte offset just past its line) for each valid journal line, read line by line.

    Reading stops at the first line that is torn (no trailing newline: killed mid-write), not
    JSON (garbage after power loss) or not a well-formed entry; that line and everything after
    it count as not written, which only costs recomputing those rows. Nothing is yielded for a
    missing journal.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        end = 0
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                entry = json.loads(line.decode("utf-8"))
                rows = entry["rows"]
                ok = (
                    entry["status"] in ("ok", "failed")
                    and isinstance(rows, list)
                    and all(type(r) is int and 0 <= r < n_inputs for r in rows)
                    and (entry["status"] == "ok" or isinstance(entry.get("error"), str))
                    and isinstance(entry.get(CHECKSUM_KEY, {}), dict)
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                return
            end += len(line)
            yield entry, end


class ResponseWriter:
    """Creates or resumes the results in OUT; see the module docstring for the file formats.

    Use from one thread:

        w = ResponseWriter.open(out, paths, n_voxels, run_config)
        for batch in chunks(w.pending()):
            try:
                w.write_rows(batch, predict(batch))     # float32 (len(batch), n_voxels)
            except VideoReadError as e:
                w.mark_failed(batch, str(e))
        w.finish(run_info)

    With several arrays, open with `columns={"responses_sub-01.npy": n1, "components.npy": 100}`
    and pass `write_rows` a dict of the same names.

    `run_config` must hold exactly the settings that determine the values (model id, subject,
    selection, ...): it is part of the job fingerprint. Settings a resume may change (batch
    size, device, workers) and timings belong in `run_info` at `finish`.
    """

    def __init__(
        self,
        out_dir: Path,
        job: dict,
        files: dict[str, NpyRows],
        status: np.ndarray,
        errors: dict[int, str],
        journal: BinaryIO,
        lock: BinaryIO | None,
        repairs: list[str] | None = None,
        retried: dict[int, str] | None = None,
        notes: dict[str, dict[int, str]] | None = None,
    ) -> None:
        """Internal; use `ResponseWriter.open`."""
        self.out_dir = out_dir
        self.job = job
        self.paths: list[str] = job["inputs"]
        self.n_voxels: int = job["n_voxels"]
        self.columns: dict[str, int] = job["arrays"]
        self.run_config: dict = job["run_config"]
        self._files = files  # file name -> its rows, written with pwrite
        # file name -> read-only np.memmap float32 (n_inputs, columns): what readers use
        # (NIfTI, plots); it sees every row written through `_files` (one page cache).
        self.arrays: dict[str, np.memmap] | None = {
            name: np.load(f.path, mmap_mode="r", allow_pickle=False) for name, f in files.items()}
        # What the resume found damaged and is computing again, one sentence each.
        self.repairs: list[str] = list(repairs or ())
        # {row: the failure recorded for it}: failures `open(retry_failed=...)` made pending again.
        self.retried: dict[int, str] = dict(retried or {})
        # manifest.csv's extra columns, and {column: {row: value}} of the rows recorded so far
        self.manifest_extra: tuple[str, ...] = tuple(job.get(MANIFEST_EXTRA_KEY) or ())
        self._notes: dict[str, dict[int, str]] = {c: dict((notes or {}).get(c, {})) for c in self.manifest_extra}
        # per input: 0 pending, 1 ok, 2 failed
        self._status = status
        self._errors = errors
        self._journal = journal
        self._lock = lock

    # ---------------------------------------------------------------- open / resume

    @classmethod
    def open(
        cls,
        out_dir: str | os.PathLike,
        paths: Sequence[str | os.PathLike],
        columns: int | dict[str, int],
        run_config: dict,
        show_progress: bool = False,
        retry_failed: Callable[[str], bool] | None = None,
        manifest_columns: Sequence[str] = (),
    ) -> ResponseWriter:
        """Create the results in `out_dir`, or resume the same job's results already there.

        Args:
          out_dir: OUT; created if missing. Unrelated files in it are left alone.
          paths: the inputs, in output-row order (strings are compared as given on resume).
          columns: columns of `responses.npy` (the selection's voxel count), or
            {file name: columns} for a job writing several arrays (names end in `.npy`).
          run_config: JSON-able settings that determine the values (numpy values allowed).
          show_progress: a progress bar while a resume re-reads the recorded rows (when
            they are more than 256 MB) to check their checksums.
          retry_failed: error text -> bool. Every recorded failed batch whose error it
            accepts is removed from the journal and its rows are pending again (`retried`
            lists them with their old errors). None: failures stay recorded.
          manifest_columns: extra manifest.csv columns (after path,row,status,error), filled
            per row by `write_rows(..., notes=)`; part of the job.
        Raises:
          OutOfSpaceError: the arrays do not fit in OUT's free space (or quota, or file size
            limit); nothing is left behind but job.json.
          OutputDirError: OUT holds a different job's results (or results without a
            `job.json`), another process is writing to it, or an array is a valid .npy of
            another shape or dtype (not this job's).
        Damaged files of this job are not errors: they are repaired (see `repairs`).
        """
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("no inputs to encode")
        arrays = {RESPONSES_FILE: columns} if not isinstance(columns, dict) else dict(columns)
        for name, width in arrays.items():
            if not name.endswith(".npy") or Path(name).name != name or name.startswith("."):
                raise ValueError(f"array names must be plain file names ending in .npy, got {name!r}")
            if int(width) <= 0:
                raise ValueError(f"{name}: columns must be positive, got {width}")
        if not arrays:
            raise ValueError("no arrays to write")
        arrays = {name: int(width) for name, width in arrays.items()}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_dir(out)
        try:
            return cls._open_locked(out, paths, arrays, run_config, lock, show_progress, retry_failed,
                                    tuple(manifest_columns))
        except BaseException:
            if lock is not None:
                lock.close()
            raise

    @classmethod
    def _open_locked(
        cls, out: Path, paths: list[str], columns: dict[str, int], run_config: dict, lock: BinaryIO | None,
        show_progress: bool = False, retry_failed: Callable[[str], bool] | None = None,
        manifest_columns: tuple[str, ...] = (),
    ) -> ResponseWriter:
        for leftover in out.glob(f".*{TMP_MARK}*"):  # from runs killed mid atomic write
            leftover.unlink(missing_ok=True)
        if set(manifest_columns) & set(MANIFEST_COLUMNS) or len(set(manifest_columns)) != len(manifest_columns):
            raise ValueError(f"extra manifest columns must be new and distinct, got {list(manifest_columns)}")
        job = job_record(paths, columns, run_config, manifest_columns)
        job_path, prog_path = out / JOB_FILE, out / PROGRESS_FILE
        advice = f"choose another --out, or delete {out} to start over"
        n_inputs = len(paths)
        repairs: list[str] = []
        if job_path.exists():
            try:
                old = json.loads(job_path.read_text("utf-8", errors="surrogateescape"))
                content = job_fingerprint(old)
            except (ValueError, TypeError, AttributeError) as e:
                raise OutputDirError(f"{job_path} is not valid JSON ({e}); {advice}") from e
            if job["fingerprint"] not in (old.get("fingerprint"), content):
                raise OutputDirError(
                    f"{out} holds the results of a different job ({job_difference(old, job)}); "
                    f"{advice}"
                )
            if old.get("fingerprint") != content:
                # Either its content or its fingerprint changed since it was written, and the
                # other still names this job: damage, not another job. Written again whole.
                atomic_write_text(job_path, pretty_json(job))
                repairs.append(f"{JOB_FILE}: its content did not match its fingerprint (edited or damaged): "
                               "written again")
        else:
            ours = job_files_present(out, columns)
            if ours:
                raise OutputDirError(
                    f"{out} already holds {', '.join(ours)} but no {JOB_FILE}, so they are not "
                    f"known to be this job's; {advice}"
                )

        # ---- each array: whole, repairable, or another file
        states = {name: inspect_npy(out / name, (n_inputs, width)) for name, width in columns.items()}
        for name, state in states.items():
            if state.kind == "other":
                raise OutputDirError(f"{out / name}: {state.detail}; {advice}")
        to_create = [name for name, st in states.items() if st.kind in ("missing", "bad_header")]
        check_room(out, {name: file_bytes((n_inputs, columns[name])) for name in to_create}
                   | {name: st.expected_size - st.size for name, st in states.items()
                      if st.kind == "wrong_size" and st.expected_size > st.size})
        new_job = not job_path.exists()
        if new_job:
            # job.json goes first: every later file in OUT is then known to belong to it.
            atomic_write_text(job_path, pretty_json(job))

        entries, good_end = read_journal(prog_path, n_inputs)
        # Failures to try again leave the journal before the checksums are read: their rows
        # are computed again whatever they hold, so checking them would only cost time.
        retried: dict[int, str] = {}
        if retry_failed is not None:
            to_keep = []
            for e in entries:
                if e["status"] == "failed" and retry_failed(e["error"]):
                    retried.update((r, e["error"]) for r in e["rows"])
                else:
                    to_keep.append(e)
            entries = to_keep
        repaired = {name for name, state in states.items() if state.kind != "ok"}
        # Batches journaled without a checksum (older berg-jax) for an array about to be
        # recreated or resized cannot be checked afterwards: drop them from the journal on
        # disk *before* the array changes, so a crash in between cannot leave them trusted.
        unverifiable = [e for e in entries if repaired - set(e.get(CHECKSUM_KEY) or {})]
        if retried or unverifiable:
            entries = [e for e in entries if not repaired - set(e.get(CHECKSUM_KEY) or {})]
            atomic_write_text(prog_path, "".join(json.dumps(e) + "\n" for e in entries))
            good_end = prog_path.stat().st_size
        for name in repaired:
            state = states[name]
            if entries or unverifiable or state.kind != "missing":
                repairs.append(f"{name}: {state.detail}: "
                               + ("recreated" if state.kind != "wrong_size" else "resized")
                               + "; its recorded rows are checked and computed again where lost")
            if state.kind in ("missing", "bad_header"):
                try:
                    with no_room_is_an_error(out, name, file_bytes((n_inputs, columns[name]))):
                        create_nan_npy(out / name, (n_inputs, columns[name]))
                except OutOfSpaceError:
                    if new_job:  # leave OUT as it was: nothing but the lock file
                        for made in (n for n in repaired if n != name):
                            (out / made).unlink(missing_ok=True)
                        job_path.unlink(missing_ok=True)
                        prog_path.unlink(missing_ok=True)
                    raise
        files: dict[str, NpyRows] = {}
        try:
            for name, width in columns.items():
                files[name] = NpyRows(out / name, (n_inputs, width), writable=True)
                if states[name].kind == "wrong_size":
                    size = states[name].expected_size
                    with no_room_is_an_error(out, f"{name} (resized to {size:,} bytes)", size):
                        files[name].resize()

            # ---- every journaled batch must still hold what was written
            kept, dropped = check_entries(files, entries, show_progress=show_progress)
            by_arrays: dict[tuple[str, ...], list[int]] = {}  # one sentence per set of damaged arrays
            for entry, bad in dropped:
                by_arrays.setdefault(tuple(bad), []).extend(entry["rows"])
            for bad, rows in by_arrays.items():
                repairs.append(f"{', '.join(bad)}: rows {format_rows(rows)} do not match the checksums "
                               "recorded when they were written (changed or damaged since): computing "
                               "them again")
            journal = open(prog_path, "ab", buffering=0)
            try:
                if dropped:
                    # Rewrite the journal without the dropped batches, atomically, so a crash now
                    # leaves either the old journal (checked again next time) or the new one.
                    journal.close()
                    atomic_write_text(prog_path, "".join(json.dumps(e) + "\n" for e in kept))
                    journal = open(prog_path, "ab", buffering=0)
                elif journal.tell() != good_end:
                    # Cut the torn tail so the next entry starts on a line of its own.
                    journal.truncate(good_end)
                    journal.seek(good_end)
                    os.fsync(journal.fileno())
            except BaseException:
                journal.close()
                raise
        except BaseException:
            for f in files.values():
                f.close()
            raise
        status = np.zeros(n_inputs, np.uint8)
        errors: dict[int, str] = {}
        notes: dict[str, dict[int, str]] = {c: {} for c in manifest_columns}
        for e in kept:
            rows = np.asarray(e["rows"], np.int64)
            status[rows] = 1 if e["status"] == "ok" else 2
            for r in e["rows"]:
                if e["status"] == "failed":
                    errors[r] = e["error"]
                else:
                    errors.pop(r, None)
            for column, values in (e.get(NOTES_KEY) or {}).items():
                if column in notes:
                    notes[column].update(zip(e["rows"], values))
        return cls(out, job, files, status, errors, journal, lock, repairs, retried, notes)

    # ---------------------------------------------------------------- progress

    @property
    def n_inputs(self) -> int:
        return len(self.paths)

    @property
    def responses(self) -> np.memmap | None:
        """The array of a one-array job (`responses.npy`); use `arrays[name]` for the others."""
        return self.arrays.get(RESPONSES_FILE) if self.arrays is not None else None

    def pending(self) -> list[int]:
        """Input indices (ascending) that are neither written nor marked failed."""
        return np.flatnonzero(self._status == 0).tolist()

    def _check_pending(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_inputs):
            raise IndexError(f"input index out of range 0..{self.n_inputs - 1}: {idx.tolist()}")
        if len(np.unique(idx)) != idx.size:
            raise ValueError(f"duplicate input indices: {idx.tolist()}")
        done = idx[self._status[idx] != 0]
        if done.size:
            # Writing a row twice would make the result depend on the order of attempts.
            raise ValueError(f"inputs already recorded, not pending: {done.tolist()}")
        return idx

    def _journal_append(self, entry: dict) -> None:
        # ensure_ascii: any error text (even undecodable file names) becomes plain ASCII JSON
        if self._journal is None:
            raise OutputDirError(f"the writer of {self.out_dir} stopped after an earlier error (or was closed); "
                                 "run the same command again to resume")
        line = memoryview((json.dumps(entry) + "\n").encode("ascii"))
        with self._no_room(PROGRESS_FILE):
            try:
                while line:  # unbuffered: a failed write leaves nothing queued to retry at close
                    line = line[self._journal.write(line):]
                os.fsync(self._journal.fileno())
            except OSError:
                # What reached the file is a torn line at worst, which the next open cuts off.
                self._journal.close()
                self._journal = None
                raise

    def _no_room(self, what: str) -> Any:
        """`no_room_is_an_error` for a write of `what` by this writer: the rerun keeps the recorded rows."""
        return no_room_is_an_error(
            self.out_dir, what,
            kept=lambda: f": it resumes, keeping the {int(np.count_nonzero(self._status))} rows already recorded")

    def write_rows(self, indices: Sequence[int], responses: np.ndarray | dict[str, np.ndarray],
                   notes: dict[str, Sequence[str]] | None = None) -> None:
        """Store the responses of inputs `indices` and record them as done.

        Args:
          indices: (n,) int, pending input indices (any order).
          responses: (n, n_voxels) array, stored as float32; for a job of several arrays a
            dict {file name: (n, columns) array} naming every one of them.
          notes: {extra manifest column: (n,) str}, the rows' values in the job's extra
            manifest columns (`manifest_columns` at open); a column left out stays empty.
        """
        idx = self._check_pending(indices)
        notes = {c: [str(v) for v in vals] for c, vals in (notes or {}).items()}
        unknown = set(notes) - set(self.manifest_extra)
        if unknown:
            raise ValueError(f"notes for {sorted(unknown)}, but this job's extra manifest columns are "
                             f"{list(self.manifest_extra)}")
        for column, vals in notes.items():
            if len(vals) != idx.size:
                raise ValueError(f"notes[{column!r}]: {len(vals)} values for {idx.size} rows")
        if not isinstance(responses, dict):
            if len(self.columns) != 1:
                raise ValueError(f"this job writes {list(self.columns)}: pass a dict of them")
            responses = {next(iter(self.columns)): responses}
        if set(responses) != set(self.columns):
            raise ValueError(f"write_rows got arrays {sorted(responses)}, the job has {sorted(self.columns)}")
        values = {name: np.asarray(v) for name, v in responses.items()}
        for name, v in values.items():
            if v.shape != (idx.size, self.columns[name]):
                raise ValueError(f"{name}: rows must be {(idx.size, self.columns[name])}, got {v.shape}")
        if idx.size == 0:
            return
        values = {name: np.ascontiguousarray(v, np.float32) for name, v in values.items()}
        entry = {"rows": idx.tolist(), "status": "ok", **({NOTES_KEY: notes} if notes else {})}
        self._store(idx, values, entry)
        self._status[idx] = 1
        for column, vals in notes.items():
            self._notes[column].update(zip(idx.tolist(), vals))

    def _store(self, idx: np.ndarray, values: dict[str, np.ndarray], entry: dict) -> None:
        """Write every array's rows, sync them, then journal `entry` with their checksums."""
        for name, v in values.items():
            with self._no_room(name):
                self._files[name].write_rows(idx, v)
        # Rows must be on disk before the journal says they are (fdatasync, then append+fsync).
        for f in self._files.values():
            f.sync()
        self._journal_append({**entry, CHECKSUM_KEY: {name: rows_crc32(v) for name, v in values.items()}})

    def mark_failed(self, indices: int | Sequence[int], error: str) -> None:
        """Record inputs `indices` as failed with `error`; their responses rows become NaN.

        The NaN is written (not assumed) because a killed earlier attempt may have left data
        in those rows.
        """
        idx = self._check_pending([indices] if isinstance(indices, (int, np.integer)) else indices)
        if idx.size == 0:
            return
        error = str(error)
        nan = {name: np.full((idx.size, width), np.nan, np.float32) for name, width in self.columns.items()}
        self._store(idx, nan, {"rows": idx.tolist(), "status": "failed", "error": error})
        self._status[idx] = 2
        for r in idx.tolist():
            self._errors[r] = error

    # ---------------------------------------------------------------- finish

    def manifest_rows(self) -> list[tuple[str, int, str, str]]:
        """(path, row, status, error, *extra columns) per input, in input order; status "ok"/"failed"/"pending"."""
        names = {0: "pending", 1: "ok", 2: "failed"}
        return [
            (p, i, names[int(s)], self._errors.get(i, ""), *(self._notes[c].get(i, "") for c in self.manifest_extra))
            for i, (p, s) in enumerate(zip(self.paths, self._status))
        ]

    def finish(self, run_info: dict | None = None, checked_files: Sequence[str | os.PathLike] = ()) -> dict:
        """Write `manifest.csv` and `run.json` (atomically), then close the writer.

        Every input must have been written or marked failed. Re-running a finished job finds
        nothing pending and only rewrites these two files.

        Args:
          run_info: JSON-able facts about this run (versions, start/end time, throughput,
            batch size, device, ...); merged over run_config in run.json.
          checked_files: files in OUT written beside the arrays (the NIfTIs, CSVs) whose
            CRC-32 run.json records (`file_crc32`, with manifest.csv's), for `verify`.
        Returns:
          the dict written to run.json.
        """
        left = self.pending()
        if left:
            raise ValueError(f"{len(left)} inputs still pending (first: {left[:5]}); "
                             "write or mark_failed them before finish()")
        text = csv_line(manifest_columns_of(self.job)) + "".join(csv_line(r) for r in self.manifest_rows())
        with self._no_room(MANIFEST_FILE):
            atomic_write_text(self.out_dir / MANIFEST_FILE, text)
        checksums = {}
        for name in (MANIFEST_FILE, *checked_files):
            rel = Path(name).relative_to(self.out_dir) if Path(name).is_absolute() else Path(name)
            checksums[rel.as_posix()] = file_crc32(self.out_dir / rel)
        n_failed = int(np.count_nonzero(self._status == 2))
        run = {
            **self.run_config,
            **jsonable(run_info or {}),
            "n_inputs": self.n_inputs,
            "n_ok": self.n_inputs - n_failed,
            "n_failed": n_failed,
            # run_config's n_voxels ({file: width} for several arrays) is kept when present.
            "n_voxels": self.run_config.get("n_voxels", self.n_voxels),
            "arrays": self.columns,
            FILE_CHECKSUMS_KEY: checksums,
        }
        with self._no_room(RUN_FILE):
            atomic_write_text(self.out_dir / RUN_FILE, pretty_json(run))
        self.close()
        return run

    def close(self) -> None:
        """Release the files and the lock without finishing; the run can be resumed later."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.arrays is not None:
            for f in self._files.values():
                f.close()
            self.arrays = None  # drop the mappings (each closes once unreferenced)
        if self._lock is not None:
            self._lock.close()  # closing the fd drops the flock
            self._lock = None

    def __enter__(self) -> ResponseWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_dir(out: Path) -> BinaryIO | None:
    """Take OUT's exclusive lock; the OS drops it when the process dies, even on kill -9."""
    if fcntl is None:
        return None
    f = open(out / LOCK_FILE, "ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise OutputDirError(f"{out} is in use by another berg-jax run ({e})") from e
    return f


def check_room(out: Path, needs: dict[str, int]) -> None:
    """Refuse, before anything is written, when the files `needs` ({name: bytes}) do not fit in `out`.

    Compares with the free space (statvfs) and the file size limit. A quota that statvfs
    does not show is caught a moment later by `posix_fallocate`, with the same error.
    """
    needs = {name: int(n) for name, n in needs.items() if n > 0}
    if not needs:
        return
    total = sum(needs.values())
    what = ", ".join(needs) if len(needs) <= 4 else f"{len(needs)} arrays"
    free = free_bytes(out)
    if free is not None and total > free:
        raise out_of_space_error(out, what, total)
    limit = file_size_limit()
    if limit is not None and max(needs.values()) > limit:
        biggest = max(needs, key=needs.get)
        raise out_of_space_error(out, f"{biggest} (one file of {needs[biggest]:,} bytes)", needs[biggest])


def entry_damage(files: dict[str, NpyRows], entry: dict) -> list[str]:
    """The arrays whose rows in journal `entry` no longer match the checksums it recorded.

    An array the entry has no checksum for (older berg-jax) is trusted: `ResponseWriter.open`
    drops such entries itself before it rebuilds an array they cover.
    """
    recorded = entry.get(CHECKSUM_KEY) or {}
    return [name for name, f in files.items() if name in recorded and f.crc32(entry["rows"]) != recorded[name]]


def check_entries(files: dict[str, NpyRows], entries: list[dict],
                  show_progress: bool = False) -> tuple[list[dict], list[tuple[dict, list[str]]]]:
    """Split journal entries into those whose rows still match their checksums and the others.

    Reads every recorded row of every array once, in entry order, streaming (~64 MB at a
    time). Returns (kept entries, [(dropped entry, the arrays that did not match)]).
    """
    from tqdm.auto import tqdm

    row_bytes = sum(f.row_bytes for f in files.values())
    total = sum(len(e["rows"]) for e in entries) * row_bytes
    kept, dropped = [], []
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking recorded rows", dynamic_ncols=True,
              disable=not show_progress or total < _VERIFY_BAR_BYTES) as bar:
        for e in entries:
            bad = entry_damage(files, e)
            if bad:
                dropped.append((e, bad))
            else:
                kept.append(e)
            bar.update(len(e["rows"]) * row_bytes)
    return kept, dropped
