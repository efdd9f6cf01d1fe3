"""Read and write PyTorch `torch.save(state_dict)` files without torch and without running pickled code.

Reading unpickles `data.pkl` with an allow-list of what a state_dict is made of (tensor rebuild
functions, storage type names, OrderedDict), mapped to inert numpy stand-ins, so a malicious
checkpoint cannot call anything. Reads torch's zip format (torch >= 1.6) and its legacy stream
format (`_use_new_zipfile_serialization=False`); writes the zip format.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from berg_jax.errors import InvalidParameterError, ModelLoadError

try:  # ships with jax; the float32 fallback only matters where it is missing
    import ml_dtypes

    _BF16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

# torch storage type name -> numpy type code; "bf16" has none in numpy and is read as raw uint16.
_STORAGE_CODES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1", "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-zip format, then protocol 1001
_ALIGN = 64  # torch aligns storage records so that `torch.load(mmap=True)` can map them


def _raw_dtype(code: str) -> np.dtype:
    return np.dtype("u2" if code == "bf16" else code)


class _Inert:
    """Base of every object the unpickler hands out.

    Refusing `__setstate__` blocks the BUILD opcode, which could otherwise set attributes on a
    stand-in, swap its `__class__`, or corrupt the shared allow-list for later loads.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ValueError(f"refusing BUILD on {type(self).__name__}")


class _StorageType(_Inert):
    """Stand-in for `torch.FloatStorage` & co.: only carries the element type."""

    __slots__ = ("code",)

    def __init__(self, code: str) -> None:
        self.code = code


class _Rebuild(_Inert):
    """Stand-in for one of torch's `_rebuild_*` functions."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _Storage(_Inert):
    """One storage record: element type, element count, and its bytes once read."""

    __slots__ = ("code", "numel", "data")

    def __init__(self, code: str, numel: int) -> None:
        self.code, self.numel, self.data = code, numel, b""


class _Tensor(_Inert):
    """`_rebuild_tensor_v2(storage, offset, size, stride, ...)`; made numpy once storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> None:
        ints = (offset, *size, *stride) if type(size) is tuple and type(stride) is tuple else (None,)
        if not isinstance(storage, _Storage) or not all(type(v) is int and v >= 0 for v in ints) \
                or len(size) != len(stride):
            raise ValueError(f"invalid tensor: offset={offset!r} size={size!r} stride={stride!r}")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def to_numpy(self, byteorder: str) -> np.ndarray:
        """Contiguous, native-order copy; refuses geometry that reaches outside the storage."""
        st, n_out, raw = self.storage, int(np.prod(self.size, dtype=object)), _raw_dtype(self.storage.code)
        if n_out == 0:
            out = np.zeros(self.size, raw)
        else:
            extent = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if extent > st.numel or len(st.data) < st.numel * raw.itemsize:
                raise ValueError(f"tensor {self.size} at offset {self.offset} overruns its storage")
            if n_out > max(st.numel, 1 << 24):  # stride-0 views may not balloon into huge copies
                raise ValueError(f"tensor {self.size} is far larger than its storage of {st.numel}")
            base = np.frombuffer(st.data, raw.newbyteorder(byteorder), count=st.numel)
            strides = [s * raw.itemsize for s in self.stride]
            view = np.lib.stride_tricks.as_strided(base[self.offset:], self.size, strides, writeable=False)
            out = np.array(view, dtype=raw, order="C", copy=True)
        if st.code != "bf16":
            return out
        return out.view(_BF16) if _BF16 is not None else (out.astype(np.uint32) << 16).view(np.float32)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(_Tensor),
    # (data, requires_grad, hooks[, state]): here a parameter is just its data
    ("torch._utils", "_rebuild_parameter"): _Rebuild(lambda data, *_: data),
    ("torch._utils", "_rebuild_parameter_with_state"): _Rebuild(lambda data, *_: data),
    ("torch.storage", "UntypedStorage"): _StorageType("u1"),  # untyped storages count bytes
    ("torch", "UntypedStorage"): _StorageType("u1"),
    **{("torch", name): _StorageType(code) for name, code in _STORAGE_CODES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals and torch's storage persistent ids."""

    def __init__(self, file: io.BytesIO, path: Path, load_storage: Any = None) -> None:
        super().__init__(file)
        self.path, self.load_storage, self.storages = path, load_storage, {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise ModelLoadError(f"refusing to unpickle GLOBAL {module}.{name} from {self.path}: "
                                 "a state_dict file may hold only tensors and (Ordered)dicts")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds view metadata, None since torch 0.4.
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage" and pid[5:] in ((), (None,))):
            raise ValueError(f"unsupported persistent id {pid!r:.100}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0 or type(key) is not str:
            raise ValueError(f"invalid storage reference {pid!r:.100}")
        if key not in self.storages:
            self.storages[key] = _Storage(stype.code, numel)
            if self.load_storage is not None:
                self.storages[key].data = self.load_storage(key)
        elif (self.storages[key].code, self.storages[key].numel) != (stype.code, numel):
            raise ValueError(f"storage {key!r} is referenced with two types or sizes")
        return self.storages[key]


def _read_zip(blob: bytes, path: Path) -> tuple[Any, str]:
    zf = zipfile.ZipFile(io.BytesIO(blob))
    names = set(zf.namelist())
    pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise ValueError(f"expected one '<archive>/data.pkl' record, found {len(pkl)}")
    archive = pkl[0].split("/")[0]
    byteorder = zf.read(f"{archive}/byteorder").decode() if f"{archive}/byteorder" in names else "little"
    if byteorder not in ("little", "big"):
        raise ValueError(f"unknown byteorder record {byteorder!r}")

    def load_storage(key: str) -> bytes:
        if f"{archive}/data/{key}" not in names:
            raise ValueError(f"storage record {archive}/data/{key} is missing")
        return zf.read(f"{archive}/data/{key}")

    return _SafeUnpickler(io.BytesIO(zf.read(pkl[0])), path, load_storage).load(), byteorder


def _read_legacy(blob: bytes, path: Path) -> tuple[Any, str]:
    # Four pickles (magic, protocol, sys_info, the object), the list of storage keys, then each
    # storage in that order as an int64 element count and its bytes.
    f = io.BytesIO(blob)
    if _SafeUnpickler(f, path).load() != _LEGACY_MAGIC or _SafeUnpickler(f, path).load() != 1001:
        raise ValueError("expected torch's legacy magic number and protocol 1001")
    sys_info = _SafeUnpickler(f, path).load()
    byteorder = "big" if isinstance(sys_info, dict) and sys_info.get("little_endian") is False else "little"
    unpickler = _SafeUnpickler(f, path)
    obj = unpickler.load()
    keys = _SafeUnpickler(f, path).load()
    if type(keys) is not list or sorted(map(str, keys)) != sorted(unpickler.storages):
        raise ValueError("the storage key list does not match the storages the pickle uses")
    for key in keys:
        st, head = unpickler.storages[key], f.read(8)
        if len(head) < 8 or int.from_bytes(head, byteorder, signed=True) != st.numel:
            raise ValueError(f"storage {key!r} header is truncated or has the wrong size")
        st.data = f.read(st.numel * _raw_dtype(st.code).itemsize)
    return obj, byteorder


def _flatten(obj: dict, byteorder: str, prefix: str, out: dict[str, np.ndarray]) -> None:
    for key, value in dict.items(obj):  # not obj.items(): BUILD may have set an `items` attribute
        if not isinstance(key, str):
            raise ValueError(f"state_dict key {key!r} is not a string")
        if isinstance(value, dict):  # nested dicts become dotted names, as module.state_dict() spells them
            _flatten(value, byteorder, f"{prefix}{key}.", out)
        elif isinstance(value, _Tensor):
            out[prefix + key] = value.to_numpy(byteorder)
        else:
            raise ValueError(f"state_dict entry {prefix + key!r} is a {type(value).__name__}, not a tensor")


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `torch.save(state_dict)` file into numpy, without torch and without executing code.

    Args:
      path: a `.pth`/`.pt` file in torch's zip format or its legacy (pre-1.6) stream format.
    Returns:
      {name: array} in file order: contiguous, writable, native-endian copies. Nested dicts are
      flattened to dotted names; bfloat16 is `ml_dtypes.bfloat16` (float32 without ml_dtypes).
    Raises:
      ModelLoadError: unreadable, truncated, not a torch state_dict, or its pickle asks for a
        global beyond tensors and dicts (named in the message; nothing is executed).
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read torch checkpoint {path}: {exc}") from exc
    is_zip, is_legacy = blob[:4] == b"PK\x03\x04", blob[:1] == b"\x80"
    expected = ("a zip-format torch checkpoint" if is_zip else "a legacy-format torch checkpoint" if is_legacy
                else "a PyTorch checkpoint (a zip archive, or torch's legacy pickle stream)")
    try:
        if not (is_zip or is_legacy):
            raise ValueError("empty file" if not blob else f"unrecognised header {blob[:8]!r}")
        obj, byteorder = (_read_zip if is_zip else _read_legacy)(blob, path)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a state_dict (a dict of tensors), got {type(obj).__name__}")
        out: dict[str, np.ndarray] = {}
        _flatten(obj, byteorder, "", out)
        return out
    except ModelLoadError:
        raise
    except Exception as exc:  # every failure to parse untrusted bytes is a load error naming the file
        raise ModelLoadError(f"{path}: expected {expected} holding a state_dict; it is truncated, corrupt or "
                             f"something else ({type(exc).__name__}: {exc})") from exc


def _pickle_state_dict(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, spelled as torch.save spells it.

    `entries` are (name, storage type, shape); entry n's storage is record `data/<n>`. Written
    opcode by opcode: the stdlib pickler would import torch to check the `torch._utils` globals.
    """

    def s(text: str) -> bytes:
        return b"X" + struct.pack("<I", len(text.encode())) + text.encode()

    def i(value: int) -> bytes:  # an int's opcode, without the PROTO header and STOP
        return pickle.dumps(int(value), protocol=2)[2:-1]

    def tup(values: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(map(i, values)) + b"t"

    odict = b"ccollections\nOrderedDict\n)R"
    out = [b"\x80\x02", odict, b"("]
    for index, (key, storage, shape) in enumerate(entries):
        stride = tuple(int(np.prod(shape[d + 1:], dtype=object)) for d in range(len(shape)))
        numel = int(np.prod(shape, dtype=object))
        out += [s(key), b"ctorch._utils\n_rebuild_tensor_v2\n((", s("storage"), f"ctorch\n{storage}\n".encode(),
                s(str(index)), s("cpu"), i(numel), b"tQ", i(0), tup(shape), tup(stride), b"\x89", odict, b"tR"]
    return b"".join(out) + b"u."


def write_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write {name: array} as a torch zip checkpoint that `torch.load(path, weights_only=True)` reads.

    Each array gets its own C-contiguous little-endian storage. The file appears atomically: it is
    written to a temporary file in the same directory, then renamed over `path`.
    """
    path = Path(path)
    entries, records = [], []
    for key, value in state_dict.items():
        arr = np.asarray(value)
        native = arr.dtype.newbyteorder("=")
        names = [n for n, c in _STORAGE_CODES.items() if c != "bf16" and np.dtype(c) == native]
        names += ["BFloat16Storage"] if _BF16 is not None and native == _BF16 else []
        if not isinstance(key, str) or not names:
            raise InvalidParameterError(f"cannot write {key!r}: need a str key and a torch dtype, got {arr.dtype}")
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # ascontiguousarray makes 0-d 1-d
        entries.append((key, names[0], arr.shape))
        records.append(arr.tobytes())
    files = [("data.pkl", _pickle_state_dict(entries)), ("byteorder", b"little"),
             *((f"data/{n}", r) for n, r in enumerate(records)), ("version", b"3\n")]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
                for name, data in files:
                    info = zipfile.ZipInfo(f"{path.stem or 'archive'}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                    # Pad the local header's extra field so the record's bytes start 64-byte aligned.
                    pad = -(fh.tell() + 30 + len(info.filename.encode()) + 4) % _ALIGN
                    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
                    zf.writestr(info, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise survive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
