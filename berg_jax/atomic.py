"""Files that appear complete or not at all, and the JSON text berg-jax writes into them.

The ground floor of every module that writes a file (the writer, the S3D converter, the
video writer, the CLI): nothing here imports from berg_jax. Each writer goes to a hidden
temporary file in the same directory (named with `TMP_MARK`, so a resumed run can recognise
and delete exactly the leftovers of a killed one), is fsynced, `os.replace`d onto its path,
and the directory is fsynced.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib.format import open_memmap

# Temporary files are hidden and carry this marker so a resumed run can recognise (and delete)
# exactly the leftovers of a killed run and nothing else.
TMP_MARK = ".berg-tmp-"


def fsync_dir(path: Path) -> None:
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


def temp_path(path: Path) -> Path:
    """A hidden, unique temporary name beside `path` (same directory: the rename is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at `path` complete or not at all.

    Writes go to a hidden temporary file in the same directory (same filesystem, so the rename
    is atomic); on a clean exit it is fsynced, `os.replace`d onto `path` and the directory is
    fsynced. On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
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
    fsync_dir(path.parent)


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


def jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars/arrays, paths and tuples turned into JSON types.

    Non-finite floats become None: bare NaN/Infinity are not JSON and break strict readers.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in JSON")


def csv_field(text: str) -> str:
    """`text` as one CSV field: quoted (quotes doubled) when it holds a comma, a quote, `\n` or `\r`.

    What Python's csv module writes with `lineterminator="\n"`, except that it also quotes a
    lone `\r`, which csv.writer leaves bare and every CSV reader then takes for a line end
    (a file name may hold one).
    """
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_line(fields: Any) -> str:
    """One CSV record: the fields (str() of each) through `csv_field`, joined by commas, and `\n`."""
    return ",".join(csv_field(str(f)) for f in fields) + "\n"


def canonical_json(obj: Any) -> str:
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def pretty_json(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def reserve(fd: int, length: int) -> None:
    """Allocate `length` bytes of the file's blocks now, where the file system can (posix_fallocate).

    Raises OSError (ENOSPC, EDQUOT, EFBIG) when they cannot be had. File systems without
    fallocate (some network ones) are left to fail on the first write instead.
    """
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            return
        raise


@contextmanager
def atomic_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any = np.float32) -> Iterator[np.memmap]:
    """A writable .npy memmap that appears at `path` only when the block exits cleanly.

    For arrays larger than memory: fill it slab by slab; on an exception the temporary file
    is removed and `path` is untouched. The file's space is reserved before the map is handed
    out: a full disk is an OSError (ENOSPC) here, not a SIGBUS at the first write into a page
    the disk cannot back.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        mm = open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(tmp, os.O_RDWR)
        try:
            reserve(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        yield mm
        mm.flush()
        del mm
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
