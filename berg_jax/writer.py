"""The files `berg-jax encode` writes into its output folder OUT, crash-safe and resumable.

OUT holds (all names fixed):

- `job.json`: what the results are of: `{"format", "fingerprint", "n_inputs", "n_voxels",
  "arrays": {file: columns}, "inputs": [path, ...], "run_config": {...}}`. Written once,
  first. A later run on the same OUT must have the same fingerprint (sha256 of the canonical
  JSON of format, inputs, n_voxels, arrays and run_config) or it is refused with `OutputDirError`.
- the arrays, by default one `responses.npy`: float32 (n_inputs, n_voxels), C order, a plain
  `.npy` (`numpy.load`, also with `mmap_mode`). Row i is input i; column j is the j-th
  selected voxel. Created full-size, NaN-filled, under a temporary name and renamed, then
  filled in place batch by batch. A job may name several arrays with the same rows (one
  `responses_sub-SS.npy` per subject, `components.npy`); every one follows these rules.
- `progress.jsonl`: the journal, append-only, one JSON object per line:
  `{"rows": [i, ...], "status": "ok"}` or `{"rows": [i, ...], "status": "failed", "error": "..."}`.
  A line is appended (and fsynced) only after its rows were flushed to every array.
- `manifest.csv` (at finish): header `path,row,status,error`, one line per input in input
  order, `\\n` line ends. A failed input's row in every array is all NaN.
- `run.json` (at finish): run_config merged with the caller's run_info plus counts.
- `.berg-jax.lock`: held with `flock` while a writer is open, so two runs cannot share OUT.

Resume protocol: re-running the same command calls `ResponseWriter.open` again; the rows the
journal lists (up to the first torn/invalid line, which is cut off) are kept, every other row
is `pending()` and recomputed, overwriting whatever half-written data it holds. Failed rows are
re-NaN'd when marked, so the final `responses.npy` and `manifest.csv` are byte-identical to an
uninterrupted run's, wherever the previous run was killed (Ctrl-C, kill -9, power loss).

The NIfTI files beside them (`responses.nii.gz`, OUT/volumes/) are written by `volumes`;
`merge` assembles the shards of `encode --distributed` with the public functions below.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib.format import open_memmap

from berg_jax.atomic import TMP_MARK, atomic_npy, atomic_write_text, canonical_json, jsonable, pretty_json
from berg_jax.errors import BERGError

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
_FILL_ROWS_BYTES = 64 << 20  # NaN-fill responses.npy in ~64 MB slabs


class OutputDirError(BERGError):
    """OUT cannot be used: it holds another job's results, is in use, or is damaged."""


# --------------------------------------------------------------------------- the writer


def job_record(paths: list[str], arrays: dict[str, int], run_config: dict) -> dict:
    """job.json's content; the fingerprint covers everything that determines the results."""
    body = {
        "format": FORMAT,
        "inputs": paths,
        "n_inputs": len(paths),
        "n_voxels": next(iter(arrays.values())),
        "arrays": dict(arrays),
        "run_config": jsonable(run_config),
    }
    canon = canonical_json(body).encode("utf-8", errors="surrogateescape")
    body["fingerprint"] = hashlib.sha256(canon).hexdigest()
    return body


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
    """The valid journal entries and the byte length they span.

    Reading stops at the first line that is torn (no trailing newline: killed mid-write), not
    JSON (garbage after power loss) or not a well-formed entry; that line and everything after
    it count as not written, which only costs recomputing those rows.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    entries, good_end, pos = [], 0, 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            entry = json.loads(data[pos:nl].decode("utf-8"))
            rows = entry["rows"]
            ok = (
                entry["status"] in ("ok", "failed")
                and isinstance(rows, list)
                and all(type(r) is int and 0 <= r < n_inputs for r in rows)
                and (entry["status"] == "ok" or isinstance(entry.get("error"), str))
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        entries.append(entry)
        pos = good_end = nl + 1
    return entries, good_end


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
        arrays: dict[str, np.memmap],
        status: np.ndarray,
        errors: dict[int, str],
        journal: BinaryIO,
        lock: BinaryIO | None,
    ) -> None:
        """Internal; use `ResponseWriter.open`."""
        self.out_dir = out_dir
        self.job = job
        self.paths: list[str] = job["inputs"]
        self.n_voxels: int = job["n_voxels"]
        self.columns: dict[str, int] = job["arrays"]
        self.run_config: dict = job["run_config"]
        self.arrays = arrays  # file name -> np.memmap float32 (n_inputs, columns), read-write
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
    ) -> ResponseWriter:
        """Create the results in `out_dir`, or resume the same job's results already there.

        Args:
          out_dir: OUT; created if missing. Unrelated files in it are left alone.
          paths: the inputs, in output-row order (strings are compared as given on resume).
          columns: columns of `responses.npy` (the selection's voxel count), or
            {file name: columns} for a job writing several arrays (names end in `.npy`).
          run_config: JSON-able settings that determine the values (numpy values allowed).
        Raises:
          OutputDirError: OUT holds a different job's results (or results without a
            `job.json`), another process is writing to it, or `responses.npy` is not the
            expected float32 (n_inputs, n_voxels) array.
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
            return cls._open_locked(out, paths, arrays, run_config, lock)
        except BaseException:
            if lock is not None:
                lock.close()
            raise

    @classmethod
    def _open_locked(
        cls, out: Path, paths: list[str], columns: dict[str, int], run_config: dict, lock: BinaryIO | None
    ) -> ResponseWriter:
        for leftover in out.glob(f".*{TMP_MARK}*"):  # from runs killed mid atomic write
            leftover.unlink(missing_ok=True)
        job = job_record(paths, columns, run_config)
        job_path, prog_path = out / JOB_FILE, out / PROGRESS_FILE
        advice = f"choose another --out, or delete {out} to start over"
        if job_path.exists():
            try:
                old = json.loads(job_path.read_text("utf-8", errors="surrogateescape"))
            except ValueError as e:
                raise OutputDirError(f"{job_path} is not valid JSON ({e}); {advice}") from e
            if old.get("fingerprint") != job["fingerprint"]:
                raise OutputDirError(
                    f"{out} holds the results of a different job ({job_difference(old, job)}); "
                    f"{advice}"
                )
        else:
            ours = job_files_present(out, columns)
            if ours:
                raise OutputDirError(
                    f"{out} already holds {', '.join(ours)} but no {JOB_FILE}, so they are not "
                    f"known to be this job's; {advice}"
                )
            # job.json goes first: every later file in OUT is then known to belong to it.
            atomic_write_text(job_path, pretty_json(job))

        n_inputs = len(paths)
        if not all((out / name).exists() for name in columns):
            # Without an array the journal's "done" rows have no data any more: start over.
            prog_path.unlink(missing_ok=True)
        arrays = {}
        for name, width in columns.items():
            path = out / name
            if not path.exists():
                arrays[name] = _create_nan_npy(path, (n_inputs, width))
                continue
            try:
                arr = open_memmap(path, mode="r+")
            except (ValueError, OSError) as e:
                raise OutputDirError(f"{path} is not a readable .npy ({e}); {advice}") from e
            if arr.shape != (n_inputs, width) or arr.dtype != np.float32 or not arr.flags.c_contiguous:
                found = (arr.shape, arr.dtype)
                del arr
                raise OutputDirError(f"{path} is {found}, expected float32 {(n_inputs, width)}; {advice}")
            arrays[name] = arr

        entries, good_end = read_journal(prog_path, n_inputs)
        status = np.zeros(n_inputs, np.uint8)
        errors: dict[int, str] = {}
        for e in entries:
            rows = np.asarray(e["rows"], np.int64)
            status[rows] = 1 if e["status"] == "ok" else 2
            for r in e["rows"]:
                if e["status"] == "failed":
                    errors[r] = e["error"]
                else:
                    errors.pop(r, None)
        journal = open(prog_path, "ab")
        if journal.tell() != good_end:
            # Cut the torn tail so the next entry starts on a line of its own.
            journal.truncate(good_end)
            journal.seek(good_end)
            os.fsync(journal.fileno())
        return cls(out, job, arrays, status, errors, journal, lock)

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
        self._journal.write((json.dumps(entry) + "\n").encode("ascii"))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def write_rows(self, indices: Sequence[int], responses: np.ndarray | dict[str, np.ndarray]) -> None:
        """Store the responses of inputs `indices` and record them as done.

        Args:
          indices: (n,) int, pending input indices (any order).
          responses: (n, n_voxels) array, stored as float32; for a job of several arrays a
            dict {file name: (n, columns) array} naming every one of them.
        """
        idx = self._check_pending(indices)
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
        for name, v in values.items():
            self.arrays[name][idx] = v.astype(np.float32, copy=False)
        # Rows must be on disk before the journal says they are (msync, then append+fsync).
        for arr in self.arrays.values():
            arr.flush()
        self._journal_append({"rows": idx.tolist(), "status": "ok"})
        self._status[idx] = 1

    def mark_failed(self, indices: int | Sequence[int], error: str) -> None:
        """Record inputs `indices` as failed with `error`; their responses rows become NaN.

        The NaN is written (not assumed) because a killed earlier attempt may have left data
        in those rows.
        """
        idx = self._check_pending([indices] if isinstance(indices, (int, np.integer)) else indices)
        if idx.size == 0:
            return
        for arr in self.arrays.values():
            arr[idx] = np.nan
            arr.flush()
        error = str(error)
        self._journal_append({"rows": idx.tolist(), "status": "failed", "error": error})
        self._status[idx] = 2
        for r in idx.tolist():
            self._errors[r] = error

    # ---------------------------------------------------------------- finish

    def manifest_rows(self) -> list[tuple[str, int, str, str]]:
        """(path, row, status, error) per input, in input order; status "ok"/"failed"/"pending"."""
        names = {0: "pending", 1: "ok", 2: "failed"}
        return [
            (p, i, names[int(s)], self._errors.get(i, ""))
            for i, (p, s) in enumerate(zip(self.paths, self._status))
        ]

    def finish(self, run_info: dict | None = None) -> dict:
        """Write `manifest.csv` and `run.json` (atomically), then close the writer.

        Every input must have been written or marked failed. Re-running a finished job finds
        nothing pending and only rewrites these two files.

        Args:
          run_info: JSON-able facts about this run (versions, start/end time, throughput,
            batch size, device, ...); merged over run_config in run.json.
        Returns:
          the dict written to run.json.
        """
        left = self.pending()
        if left:
            raise ValueError(f"{len(left)} inputs still pending (first: {left[:5]}); "
                             "write or mark_failed them before finish()")
        for arr in self.arrays.values():
            arr.flush()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(self.manifest_rows())
        atomic_write_text(self.out_dir / MANIFEST_FILE, buf.getvalue())
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
        }
        atomic_write_text(self.out_dir / RUN_FILE, pretty_json(run))
        self.close()
        return run

    def close(self) -> None:
        """Release the files and the lock without finishing; the run can be resumed later."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.arrays is not None:
            for arr in self.arrays.values():
                arr.flush()
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


def _create_nan_npy(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A NaN-filled float32 .npy at `path`, created under a temp name so it appears whole."""
    with atomic_npy(path, shape) as mm:
        step = max(1, _FILL_ROWS_BYTES // (4 * shape[1]))
        for start in range(0, shape[0], step):  # slabs keep dirty pages bounded
            mm[start:start + step] = np.nan
            mm.flush()
    return open_memmap(path, mode="r+")
