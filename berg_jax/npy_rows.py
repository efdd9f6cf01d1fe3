"""Rows of a float32 2-D `.npy` on disk, written and read through its file descriptor.

Why not a memory map: a write into a mapped page the disk cannot back (full disk, quota,
sparse file) kills the process with SIGBUS, without a message. `os.pwrite`/`os.pread` report
the same conditions as an `OSError` (ENOSPC, EDQUOT, EFBIG, EIO) that the job turns into a
clear error. The files stay plain `.npy` (`numpy.load`, also with `mmap_mode="r"`).

- `create_nan_npy` reserves the whole file (`posix_fallocate`) before writing anything, so a
  lack of space shows at the start, then fills it with NaN.
- `NpyRows` writes and reads rows by index, and `rows_crc32` is the checksum the journal
  records of the rows it says are done (zlib's CRC-32 of the rows' bytes in the order listed;
  about 4 GB/s on one core here, faster than the disks it guards).
- `inspect_npy` says whether a file is the expected array, damaged, or another array.

Nothing here imports from berg_jax but `atomic` (whose `reserve` does the fallocate).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from berg_jax.atomic import fsync_dir, reserve, temp_path

DTYPE = np.dtype("<f4")
_BLOCK_BYTES = 64 << 20  # reads, writes and NaN fills go in blocks of about this size
# errno values that mean "the disk (or this process's share of it) is full".
OUT_OF_SPACE_ERRNOS = frozenset(
    e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None), getattr(errno, "EFBIG", None))
    if e is not None)


def header_bytes(shape: tuple[int, int]) -> bytes:
    """The .npy header `numpy.lib.format.open_memmap` writes for float32 C-order `shape` (64-byte aligned)."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": npy_format.dtype_to_descr(DTYPE),
                                            "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def file_bytes(shape: tuple[int, int]) -> int:
    """Size in bytes of the float32 .npy of `shape`, header included."""
    return len(header_bytes(shape)) + int(shape[0]) * int(shape[1]) * DTYPE.itemsize


def is_out_of_space(exc: BaseException) -> bool:
    """True for an OSError meaning no space: disk full (ENOSPC), quota (EDQUOT), file size limit (EFBIG)."""
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE_ERRNOS


@dataclasses.dataclass(frozen=True)
class NpyState:
    """What `inspect_npy` found at a path.

    kind: "ok" (the expected array, whole), "missing", "wrong_size" (right header; the file is
    `size` bytes, `expected_size` wanted: truncated or grown), "bad_header" (not a readable
    .npy header: overwritten or cut inside the header), or "other" (a valid .npy of another
    shape, dtype or order: not damage but another file). `detail` says it for people.
    """

    kind: str
    detail: str = ""
    size: int = 0
    expected_size: int = 0


def read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy whose start `f` (a binary file) is at; `f` is left at its data.

    Raises whatever numpy's header readers raise for a damaged header (ValueError and the
    like), and ValueError for a format version other than 1.0 and 2.0.
    """
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def inspect_npy(path: Path, shape: tuple[int, int]) -> NpyState:
    """Check that `path` is float32 C-order `shape` and exactly as long as that needs."""
    expected = file_bytes(shape)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                found_shape, fortran, dtype = read_npy_header(f)
            except (ValueError, OSError, SyntaxError, TypeError) as exc:
                return NpyState("bad_header", f"its .npy header is unreadable ({exc})", size, expected)
            offset = f.tell()
    except FileNotFoundError:
        return NpyState("missing", "it is missing", 0, expected)
    if tuple(found_shape) != tuple(shape) or dtype != DTYPE or fortran:
        return NpyState("other", f"it holds {dtype} {tuple(found_shape)}"
                                 f"{' (Fortran order)' if fortran else ''}, expected float32 {tuple(shape)}",
                        size, expected)
    if offset != len(header_bytes(shape)) or size != expected:
        return NpyState("wrong_size", f"it is {size:,} bytes, expected {expected:,} "
                                      f"({'truncated' if size < expected else 'longer than its header says'})",
                        size, expected)
    return NpyState("ok", "", size, expected)


def create_nan_npy(path: Path, shape: tuple[int, int]) -> None:
    """A NaN-filled float32 .npy at `path`, its space reserved first, created under a temp name.

    Raises OSError (see `is_out_of_space`) with nothing left behind when the space is lacking.
    """
    path = Path(path)
    tmp = temp_path(path)
    head = header_bytes(shape)
    total = file_bytes(shape)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        reserve(fd, total)
        _pwrite_all(fd, head, 0)
        row_bytes = int(shape[1]) * DTYPE.itemsize
        step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
        slab = np.full((min(step, max(int(shape[0]), 1)), int(shape[1])), np.nan, DTYPE)
        for start in range(0, int(shape[0]), step):
            n = min(step, int(shape[0]) - start)
            _pwrite_all(fd, memoryview(slab[:n]).cast("B"), len(head) + start * row_bytes)
        os.ftruncate(fd, total)  # a 0-row array: header only
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - pwrite raises instead
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[n:], offset + n


def row_runs(rows: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(position in `rows`, first row, count) for each run of consecutive ascending rows, in order."""
    rows = [int(r) for r in rows]
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
            j += 1
        yield i, rows[i], j - i
        i = j


def rows_crc32(values: np.ndarray) -> int:
    """CRC-32 of float32 rows `values` (n, w), row after row: what the journal records."""
    return zlib.crc32(np.ascontiguousarray(values, DTYPE)) & 0xFFFFFFFF


def format_rows(rows: Sequence[int] | np.ndarray, limit: int = 8) -> str:
    """Rows as ranges for people: [0, 1, 2, 7, 9, 10] -> "0-2, 7, 9-10" (the first `limit` ranges)."""
    rows = sorted(set(int(r) for r in rows))
    parts = []
    for _, first, count in row_runs(rows):
        parts.append(str(first) if count == 1 else f"{first}-{first + count - 1}")
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f" and {more} more ranges" if more > 0 else "")


class NpyRows:
    """Row I/O on an existing float32 (n, w) .npy through one file descriptor.

    Opened read-write (`writable=True`: the writer) or read-only (verification). The caller
    has checked the file with `inspect_npy` first.
    """

    def __init__(self, path: Path, shape: tuple[int, int], writable: bool = False) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.offset = len(header_bytes(self.shape))
        self.row_bytes = self.shape[1] * DTYPE.itemsize
        self.fd: int | None = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def write_rows(self, rows: Sequence[int], values: np.ndarray) -> None:
        """Store float32 `values` (len(rows), w) at `rows` (any order; runs go in one write each)."""
        values = np.ascontiguousarray(values, DTYPE)
        for pos, first, count in row_runs(rows):
            _pwrite_all(self.fd, memoryview(values[pos:pos + count]).cast("B"),
                        self.offset + first * self.row_bytes)

    def sync(self) -> None:
        """The rows written so far are on disk when this returns (fdatasync)."""
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self.fd)

    def read_blocks(self, rows: Sequence[int]) -> Iterator[bytes]:
        """The bytes of `rows`, in their order, in blocks of at most ~64 MB (fewer bytes where the file ends)."""
        per_block = max(1, _BLOCK_BYTES // max(self.row_bytes, 1))
        for _, first, count in row_runs(rows):
            for start in range(first, first + count, per_block):
                n = min(per_block, first + count - start)
                want, offset = n * self.row_bytes, self.offset + start * self.row_bytes
                data = os.pread(self.fd, want, offset)
                while len(data) < want:
                    more = os.pread(self.fd, want - len(data), offset + len(data))
                    if not more:
                        break
                    data += more
                yield data
                if len(data) < want:
                    return

    def crc32(self, rows: Sequence[int]) -> int | None:
        """CRC-32 of `rows` as stored (see `rows_crc32`), or None when the file ends before them."""
        crc, want = 0, len(rows) * self.row_bytes
        got = 0
        for block in self.read_blocks(rows):
            crc = zlib.crc32(block, crc)
            got += len(block)
        return crc & 0xFFFFFFFF if got == want else None

    def resize(self) -> None:
        """Make the file exactly as long as its shape needs: cut what is beyond, reserve what is missing.

        The rows that were cut off read as zeros afterwards, which no journal checksum matches.
        """
        total = self.offset + self.shape[0] * self.row_bytes
        os.ftruncate(self.fd, total)
        reserve(self.fd, total)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, streamed (run.json records it for the files beside the arrays)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            crc = zlib.crc32(block, crc)
    return crc & 0xFFFFFFFF
