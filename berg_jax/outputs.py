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

NIfTI: one 4-D `responses.nii.gz` (x, y, z, n_inputs), volume t = row t (failed inputs are
all-NaN volumes), because 4-D series are what fMRI tools (nilearn, FSL, AFNI) load and index;
`write_volume_niftis` optionally writes one 3-D file per input as well. Both stream from
`responses.npy` a few volumes at a time, so memory stays bounded for any number of inputs.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np
from numpy.lib.format import open_memmap

from .errors import BERGError

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
# Temporary files are hidden and carry this marker so a resumed run can recognise (and delete)
# exactly the leftovers of a killed run and nothing else.
_TMP_MARK = ".berg-tmp-"
_FILL_ROWS_BYTES = 64 << 20  # NaN-fill responses.npy in ~64 MB slabs


class OutputDirError(BERGError):
    """OUT cannot be used: it holds another job's results, is in use, or is damaged."""


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    """Persist a rename/creation in `path` (a directory); a no-op where dirs can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at `path` complete or not at all.

    Writes go to a hidden temporary file in the same directory (same filesystem, so the rename
    is atomic); on a clean exit it is fsynced, `os.replace`d onto `path` and the directory is
    fsynced. On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    f = open(tmp, "xb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + os.replace + dir fsync)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, no newline translation) to `path` atomically.

    surrogateescape: a file name that is not valid UTF-8 (Python holds its bytes as lone
    surrogates) is written back as its original bytes instead of failing the whole run.
    """
    atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"))


def _jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars/arrays, paths and tuples turned into JSON types.

    Non-finite floats become None: bare NaN/Infinity are not JSON and break strict readers.
    """
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in JSON")


def _canonical_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _pretty_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- the writer


def _job_record(paths: list[str], arrays: dict[str, int], run_config: dict) -> dict:
    """job.json's content; the fingerprint covers everything that determines the results."""
    body = {
        "format": FORMAT,
        "inputs": paths,
        "n_inputs": len(paths),
        "n_voxels": next(iter(arrays.values())),
        "arrays": dict(arrays),
        "run_config": _jsonable(run_config),
    }
    canon = _canonical_json(body).encode("utf-8", errors="surrogateescape")
    body["fingerprint"] = hashlib.sha256(canon).hexdigest()
    return body


def _job_difference(old: dict, new: dict) -> str:
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


def _read_journal(path: Path, n_inputs: int) -> tuple[list[dict], int]:
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
        lock = _lock_dir(out)
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
        for leftover in out.glob(f".*{_TMP_MARK}*"):  # from runs killed mid atomic write
            leftover.unlink(missing_ok=True)
        job = _job_record(paths, columns, run_config)
        job_path, prog_path = out / JOB_FILE, out / PROGRESS_FILE
        advice = f"choose another --out, or delete {out} to start over"
        if job_path.exists():
            try:
                old = json.loads(job_path.read_text("utf-8", errors="surrogateescape"))
            except ValueError as e:
                raise OutputDirError(f"{job_path} is not valid JSON ({e}); {advice}") from e
            if old.get("fingerprint") != job["fingerprint"]:
                raise OutputDirError(
                    f"{out} holds the results of a different job ({_job_difference(old, job)}); "
                    f"{advice}"
                )
        else:
            ours = [n for n in (*columns, PROGRESS_FILE, MANIFEST_FILE, RUN_FILE)
                    if (out / n).exists()]
            if ours:
                raise OutputDirError(
                    f"{out} already holds {', '.join(ours)} but no {JOB_FILE}, so they are not "
                    f"known to be this job's; {advice}"
                )
            # job.json goes first: every later file in OUT is then known to belong to it.
            atomic_write_text(job_path, _pretty_json(job))

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

        entries, good_end = _read_journal(prog_path, n_inputs)
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
            **_jsonable(run_info or {}),
            "n_inputs": self.n_inputs,
            "n_ok": self.n_inputs - n_failed,
            "n_failed": n_failed,
            # run_config's n_voxels ({file: width} for several arrays) is kept when present.
            "n_voxels": self.run_config.get("n_voxels", self.n_voxels),
            "arrays": self.columns,
        }
        atomic_write_text(self.out_dir / RUN_FILE, _pretty_json(run))
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


def _lock_dir(out: Path) -> BinaryIO | None:
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


@contextmanager
def atomic_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any = np.float32) -> Iterator[np.memmap]:
    """A writable .npy memmap that appears at `path` only when the block exits cleanly.

    For arrays larger than memory: fill it slab by slab; on an exception the temporary file
    is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        mm = open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield mm
        mm.flush()
        del mm
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _create_nan_npy(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A NaN-filled float32 .npy at `path`, created under a temp name so it appears whole."""
    with atomic_npy(path, shape) as mm:
        step = max(1, _FILL_ROWS_BYTES // (4 * shape[1]))
        for start in range(0, shape[0], step):  # slabs keep dirty pages bounded
            mm[start:start + step] = np.nan
            mm.flush()
    return open_memmap(path, mode="r+")


# --------------------------------------------------------------------------- NIfTI


def voxel_flat_indices(sub_mask: np.ndarray, selected_indices: Sequence[int] | None = None
                       ) -> np.ndarray:
    """C-order flat positions in `sub_mask`'s grid of the output columns.

    Args:
      sub_mask: bool (62, 77, 61); its N_s True voxels in C order are the model's voxels.
      selected_indices: (n_sel,) int into those N_s voxels (the selection), or None for all.
    Returns:
      int64 (n_sel,): column j of the responses is voxel `unravel_index(out[j], shape)`.
    """
    mask = np.asarray(sub_mask, dtype=bool)
    flat = np.flatnonzero(mask.ravel(order="C"))
    if selected_indices is None:
        return flat
    sel = np.asarray(selected_indices).reshape(-1)
    if sel.size and not np.issubdtype(sel.dtype, np.integer):
        raise ValueError(f"selected_indices must be integers, got {sel.dtype}")
    sel = sel.astype(np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= flat.size):
        raise IndexError(f"selected_indices must lie in 0..{flat.size - 1}")
    if len(np.unique(sel)) != sel.size:
        raise ValueError("selected_indices has duplicates: two columns would share a voxel")
    return flat[sel]


def responses_to_volume(
    responses: np.ndarray,
    sub_mask: np.ndarray,
    selected_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Put responses back on the brain grid.

    Args:
      responses: (n_sel,) or (n, n_sel) float; column j is the j-th selected voxel.
      sub_mask: bool (62, 77, 61).
      selected_indices: (n_sel,) int into the N_s True voxels of sub_mask, or None for all.
    Returns:
      float32 (62, 77, 61) for 1-D input, (62, 77, 61, n) for 2-D; NaN outside the selection.
    """
    mask = np.asarray(sub_mask, dtype=bool)
    flat = voxel_flat_indices(mask, selected_indices)
    r = np.asarray(responses, dtype=np.float32)
    if r.ndim not in (1, 2) or r.shape[-1] != flat.size:
        raise ValueError(f"responses must be (n_sel,) or (n, n_sel) with n_sel={flat.size}, "
                         f"got {r.shape}")
    rows = r.reshape(-1, flat.size)
    vol = np.full((rows.shape[0], mask.size), np.nan, np.float32)
    vol[:, flat] = rows
    vol = vol.reshape((rows.shape[0],) + mask.shape)
    # volumes last, as NIfTI stores them: (x, y, z, n)
    return vol[0] if r.ndim == 1 else np.moveaxis(vol, 0, -1)


def _nifti_header(shape: tuple[int, ...], affine: np.ndarray,
                  header: nib.Nifti1Header | None) -> nib.Nifti1Header:
    """The header nibabel would write for float32 data of `shape` (without building the data)."""
    # broadcast_to: a full-shape array that costs no memory, so nibabel fills shape/affine.
    img = nib.Nifti1Image(np.broadcast_to(np.float32(0), shape), np.asarray(affine, float),
                          header)
    img.set_data_dtype(np.float32)  # a mask's header says uint8/int; the data are float32
    img.update_header()
    hdr = img.header.copy()
    hdr.set_slope_inter(1.0, 0.0)  # what nibabel stores for float32 data that needs no scaling
    return hdr


def _write_nifti_volumes(path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray,
                         header: nib.Nifti1Header | None, volumes: Iterable[np.ndarray],
                         compresslevel: int) -> None:
    """Stream 3-D float32 volumes (x fastest: NIfTI's Fortran order) into a .nii(.gz), atomically.

    gzip's timestamp is fixed at 0 so equal data give byte-equal files.
    """
    hdr = _nifti_header(shape, affine, header)
    head = io.BytesIO()
    hdr.write_to(head)
    head.write(b"\0" * (int(hdr.get_data_offset()) - head.tell()))
    n_expected = int(np.prod(shape[3:], dtype=np.int64))
    with atomic_open(path) as raw:
        gz = (gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel,
                            mtime=0) if str(path).endswith(".gz") else None)
        f = gz if gz is not None else raw
        f.write(head.getvalue())
        n = 0
        for vol in volumes:
            vol = np.asarray(vol, np.float32)
            if vol.shape != tuple(shape[:3]):
                raise ValueError(f"volume shape {vol.shape} != {shape[:3]}")
            f.write(vol.tobytes(order="F"))
            n += 1
        if n != n_expected:
            raise ValueError(f"got {n} volumes, expected {n_expected}")
        if gz is not None:
            gz.close()  # writes the gzip trailer; `raw` stays open for atomic_open to commit


def write_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    compresslevel: int = 1,
) -> None:
    """Write a 3-D (x,y,z) or 4-D (x,y,z,n) array as float32 NIfTI-1, atomically.

    Args:
      path: `.nii.gz` (gzip, reproducible bytes) or `.nii`.
      data: float (x, y, z) or (x, y, z, n); NaN marks voxels without a value.
      affine: float (4, 4) voxel -> mm (for BERG: `sub_mask_affine`, MNI152).
      header: a template header (e.g. `sub_mask_header`); shape, dtype and scaling are
        replaced, other fields (units, descrip, extensions) kept.
      compresslevel: gzip level (nibabel's default, 1: fast; NaN runs compress well anyway).
    """
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"data must be 3-D or 4-D, got shape {data.shape}")
    vols = [data] if data.ndim == 3 else (data[..., t] for t in range(data.shape[3]))
    _write_nifti_volumes(path, data.shape, affine, header, vols, compresslevel)


def write_responses_nifti(
    path: str | os.PathLike,
    responses: np.ndarray,
    sub_mask: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    selected_indices: Sequence[int] | None = None,
    chunk_rows: int = 16,
    compresslevel: int = 1,
) -> None:
    """Write all rows of `responses` as one 4-D NIfTI (x, y, z, n_inputs), volume t = row t.

    Reads `chunk_rows` rows at a time, so `responses` may be a memmap of `responses.npy` far
    larger than memory (about chunk_rows x 1.2 MB are held).

    Args:
      path: usually OUT/responses.nii.gz.
      responses: (n_inputs, n_sel) float (NaN rows for failed inputs stay all-NaN volumes).
      sub_mask, selected_indices: as in `responses_to_volume`.
      affine, header, compresslevel: as in `write_nifti`.
    """
    mask = np.asarray(sub_mask, dtype=bool)
    flat = voxel_flat_indices(mask, selected_indices)
    n = responses.shape[0]
    if responses.ndim != 2 or responses.shape[1] != flat.size:
        raise ValueError(f"responses must be (n, {flat.size}), got {responses.shape}")

    def volumes() -> Iterator[np.ndarray]:
        for start in range(0, n, chunk_rows):
            block = responses_to_volume(np.asarray(responses[start:start + chunk_rows]),
                                        mask, selected_indices)
            for t in range(block.shape[3]):
                yield block[..., t]

    _write_nifti_volumes(path, mask.shape + (n,), affine, header, volumes(), compresslevel)


def volume_file_name(path: str, row: int, n_rows: int) -> str:
    """`<row>_<stem>.nii.gz`, row zero-padded so names sort in row order and never collide."""
    stem = re.sub(r"[^\w.-]", "_", Path(path).stem) or "input"
    return f"{row:0{max(6, len(str(n_rows - 1)))}d}_{stem}.nii.gz"


def write_volume_niftis(
    out_dir: str | os.PathLike,
    paths: Sequence[str],
    responses: np.ndarray,
    sub_mask: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    selected_indices: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
) -> list[Path]:
    """One 3-D NIfTI per input, named by `volume_file_name`, in `out_dir` (created).

    Args:
      out_dir: e.g. OUT/volumes.
      paths: (n_inputs,) the input paths (their stems name the files).
      responses: (n_inputs, n_sel) float, e.g. the memmap of responses.npy.
      rows: which rows to write (e.g. only the ok ones); None for all.
    Returns:
      the written files, in `rows` order.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for r in range(len(paths)) if rows is None else rows:
        r = int(r)
        vol = responses_to_volume(np.asarray(responses[r]), sub_mask, selected_indices)
        f = d / volume_file_name(paths[r], r, len(paths))
        write_nifti(f, vol, affine, header)
        written.append(f)
    return written
