"""The torch-free checkpoint reader/writer: round trips, real torch bytes, and hostile files."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from berg_jax import torch_pickle
from berg_jax.errors import InvalidParameterError, ModelLoadError
from berg_jax.torch_pickle import read_torch_state_dict, write_torch_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ml_dtypes = pytest.importorskip("ml_dtypes")


def _sample_state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "features.0.conv.weight": rng.standard_normal((4, 3, 1, 2, 2)).astype(np.float32),
        "features.0.bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "f64": rng.standard_normal((3, 2)),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "i32": rng.integers(-9, 9, (2, 3)).astype(np.int32),
        "i8": rng.integers(-9, 9, 4).astype(np.int8),
        "u8": rng.integers(0, 255, 4).astype(np.uint8),
        "mask": rng.random((2, 2)) > 0.5,
        "empty": np.zeros((0, 3), np.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous input
        "big_endian": np.arange(4, dtype=">i8"),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert got[key].dtype == value.dtype.newbyteorder("="), key
        assert got[key].flags.c_contiguous and got[key].flags.writeable, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _zip_checkpoint(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch-style zip whose data.pkl is exactly `pkl` (for hand-built and hostile pickles)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


# --- writer round trips (no torch needed) -------------------------------------------------------


def test_round_trip_through_writer(tmp_path):
    sd = _sample_state_dict()
    write_torch_state_dict(sd, tmp_path / "rt.pth")
    _assert_same(read_torch_state_dict(tmp_path / "rt.pth"), sd)


def test_writer_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "w.pth"
    write_torch_state_dict({"a": np.ones(2, np.float32)}, path)
    write_torch_state_dict({"b": np.zeros(3, np.float64)}, path)  # overwrite in place
    assert list(read_torch_state_dict(path)) == ["b"]
    with pytest.raises(InvalidParameterError, match="object"):
        write_torch_state_dict({"c": np.array([None, 1], dtype=object)}, path)
    with pytest.raises(InvalidParameterError):
        write_torch_state_dict({3: np.ones(2)}, path)
    assert list(read_torch_state_dict(path)) == ["b"]  # a failed write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_writer_aligns_records_to_64_bytes(tmp_path):
    write_torch_state_dict({"a": np.ones(3, np.float32), "b": np.ones(5, np.int64)}, tmp_path / "al.pth")
    blob = (tmp_path / "al.pth").read_bytes()
    with zipfile.ZipFile(tmp_path / "al.pth") as zf:
        for info in zf.infolist():
            name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)  # local header
            start = info.header_offset + 30 + name_len + extra_len
            assert info.compress_type == zipfile.ZIP_STORED and start % 64 == 0, info.filename
            assert blob[start:start + info.file_size] == zf.read(info)


def test_bfloat16_falls_back_to_float32_without_ml_dtypes(tmp_path, monkeypatch):
    values = np.array([1.5, -2.0, 3.140625], dtype=ml_dtypes.bfloat16)
    write_torch_state_dict({"w": values}, tmp_path / "bf.pth")
    monkeypatch.setattr(torch_pickle, "_BF16", None)
    got = read_torch_state_dict(tmp_path / "bf.pth")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.astype(np.float32))


def test_big_endian_checkpoint(tmp_path):
    write_torch_state_dict({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, tmp_path / "le.pth")
    with zipfile.ZipFile(tmp_path / "le.pth") as src, zipfile.ZipFile(tmp_path / "be.pth", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "le/byteorder":
                data = b"big"
            elif name == "le/data/0":
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            dst.writestr(name, data)
    got = read_torch_state_dict(tmp_path / "be.pth")["a"]
    np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3))


# --- real torch bytes ---------------------------------------------------------------------------


def test_committed_fixture_made_by_torch_save():
    got = read_torch_state_dict(FIXTURES / "torch_small.pth")
    expected = np.load(FIXTURES / "torch_small_expected.npz")
    assert list(got) == list(expected.keys())
    assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"].dtype == np.int64
    assert got["extra.bf16"].dtype == ml_dtypes.bfloat16
    for key in expected.keys():
        value = got[key].astype(np.float32) if key == "extra.bf16" else got[key]
        _assert_same({key: value}, {key: expected[key]})
    np.testing.assert_array_equal(got["proj.weight_t"], got["proj.weight"].T)
    np.testing.assert_array_equal(got["proj.every_other"], got["proj.weight"][:, ::2])


def test_reader_and_writer_never_import_torch(tmp_path):
    code = (  # torch blocked outright: any import of it in the module would raise
        "import sys; sys.modules['torch'] = None\n"
        "from berg_jax.torch_pickle import read_torch_state_dict, write_torch_state_dict\n"
        f"sd = read_torch_state_dict({str(FIXTURES / 'torch_small.pth')!r})\n"
        f"write_torch_state_dict(sd, {str(tmp_path / 'copy.pth')!r})\n"
        f"assert list(read_torch_state_dict({str(tmp_path / 'copy.pth')!r})) == list(sd)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _torch_state_dict(torch):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5, 6, generator=gen)
    sd = OrderedDict()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        sd[f"rand.{dtype}"] = torch.randn(3, 4, generator=gen).to(dtype)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        sd[f"int.{dtype}"] = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (7,), generator=gen, dtype=dtype)
    sd["bool"] = torch.rand(2, 3, generator=gen) > 0.5
    sd["base"] = base
    sd["view.transpose"] = base.t()
    sd["view.step"] = base[:, ::2]
    sd["view.offset"] = base[1:3, 2:]
    sd["view.expanded"] = torch.randn(3, 1, generator=gen).expand(3, 4)  # stride 0
    sd["scalar.count"] = torch.tensor(12345678901, dtype=torch.int64)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=gen))
    sd["nested"] = OrderedDict(inner=OrderedDict(w=torch.arange(3.0)), b=torch.zeros(1))
    return sd


def _expected(torch, sd, prefix=""):
    out = {}
    for key, t in sd.items():
        if isinstance(t, dict):
            out.update(_expected(torch, t, f"{prefix}{key}."))
        else:
            t = t.detach()
            out[prefix + key] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
    return out


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_real_torch_save(tmp_path, torch, zip_format):
    sd = _torch_state_dict(torch)
    path = tmp_path / "real.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = read_torch_state_dict(path)
    assert got["rand.torch.bfloat16"].dtype == ml_dtypes.bfloat16
    got["rand.torch.bfloat16"] = got["rand.torch.bfloat16"].astype(np.float32)
    _assert_same(got, _expected(torch, sd))
    assert got["scalar.count"].shape == () and int(got["scalar.count"]) == 12345678901


@pytest.mark.torch
def test_reads_module_state_dict_with_metadata(tmp_path, torch):
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 1), torch.nn.BatchNorm3d(4))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    _assert_same(read_torch_state_dict(tmp_path / "m.pth"), _expected(torch, model.state_dict()))


@pytest.mark.torch
def test_torch_loads_writer_output(tmp_path, torch):
    sd = _sample_state_dict()
    write_torch_state_dict(sd, tmp_path / "w.pth")
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "w.pth", weights_only=True, mmap=mmap)
        assert list(loaded) == list(sd)
        for key, value in sd.items():
            t = loaded[key]
            got = t.float().numpy().astype(value.dtype) if t.dtype == torch.bfloat16 else t.numpy()
            assert got.shape == value.shape, key
            np.testing.assert_array_equal(got, value, err_msg=key)


# --- hostile and broken files -------------------------------------------------------------------


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("posix", "system")])
def test_refuses_code_globals_without_running_them(tmp_path, module, name):
    marker = tmp_path / "pwned"
    call = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    arg = b"X" + struct.pack("<I", len(call)) + call.encode()
    pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + arg + b"\x85R."  # GLOBAL, arg, TUPLE1, REDUCE
    path = _zip_checkpoint(tmp_path / "evil.pth", pkl)
    with pytest.raises(ModelLoadError, match=f"refusing to unpickle GLOBAL {module}.{name} from .*evil.pth"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_refuses_stack_global_from_stdlib_pickler(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = _zip_checkpoint(tmp_path / "evil4.pth", pickle.dumps({"w": Evil()}, protocol=4))
    with pytest.raises(ModelLoadError, match=r"refusing to unpickle GLOBAL (os|posix|nt)\.system"):
        read_torch_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_refuses_hostile_legacy_stream(tmp_path):
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    with pytest.raises(ModelLoadError, match="GLOBAL os.system"):
        read_torch_state_dict(path)


def _tensor_pickle(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0, numel: int = 4,
                   build: bytes = b"") -> bytes:
    def tup(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n" + build
    storage += b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ" + struct.pack("<i", numel) + b"tQ"
    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(" + storage
            + b"J" + struct.pack("<i", offset) + tup(size) + tup(stride) + b"\x89}tRs.")


def test_hand_built_pickle_is_read(tmp_path):
    record = np.arange(4, dtype="<f4").tobytes()
    path = _zip_checkpoint(tmp_path / "ok.pth", _tensor_pickle((2, 2), (1, 2)), {"0": record})
    np.testing.assert_array_equal(read_torch_state_dict(path)["w"], [[0, 2], [1, 3]])


@pytest.mark.parametrize("size,stride,offset,numel,record", [
    ((2, 3), (3, 1), 0, 4, 16),  # more elements than the storage has
    ((4,), (1,), 1, 4, 16),  # offset pushes the end past the storage
    ((2,), (-1,), 1, 4, 16),  # negative stride would read before the buffer
    ((4,), (1,), 0, 4, 8),  # record shorter than numel says
    ((1 << 30,), (0,), 0, 4, 16),  # stride-0 view ballooning into gigabytes
])
def test_refuses_out_of_bounds_geometry(tmp_path, size, stride, offset, numel, record):
    path = _zip_checkpoint(tmp_path / "oob.pth", _tensor_pickle(size, stride, offset, numel), {"0": bytes(record)})
    with pytest.raises(ModelLoadError, match="oob.pth"):
        read_torch_state_dict(path)


def test_refuses_build_on_allow_listed_objects(tmp_path):
    # BUILD with slot state on the storage type would try to swap its class or set attributes.
    build = b"N}X\x04\x00\x00\x00codeX\x02\x00\x00\x00O8s\x86b"
    path = _zip_checkpoint(tmp_path / "build.pth", _tensor_pickle((4,), (1,), build=build), {"0": bytes(16)})
    with pytest.raises(ModelLoadError, match="BUILD"):
        read_torch_state_dict(path)
    fine = _zip_checkpoint(tmp_path / "fine.pth", _tensor_pickle((4,), (1,)), {"0": bytes(16)})
    np.testing.assert_array_equal(read_torch_state_dict(fine)["w"], np.zeros(4, np.float32))  # allow-list intact


@pytest.mark.parametrize("payload,match", [
    (b"\x80\x02]q\x00.", "got list"),  # a list, not a state_dict
    (b"\x80\x02}X\x01\x00\x00\x00aK\x03s.", "'a' is a int, not a tensor"),
    (b"\x80\x02}K\x01}s.", "key 1 is not a string"),
])
def test_refuses_non_state_dict_pickles(tmp_path, payload, match):
    with pytest.raises(ModelLoadError, match=match):
        read_torch_state_dict(_zip_checkpoint(tmp_path / "odd.pth", payload))


def test_missing_storage_record(tmp_path):
    with pytest.raises(ModelLoadError, match="archive/data/0 is missing"):
        read_torch_state_dict(_zip_checkpoint(tmp_path / "nostore.pth", _tensor_pickle((4,), (1,))))


def _legacy_stream() -> bytes:
    """torch's legacy layout by hand: three header pickles, the object, the key list, the storages."""
    header = (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    blob = b"".join(pickle.dumps(v, protocol=2) for v in header)
    blob += _tensor_pickle((4,), (1,)).replace(b"tQ", b"NtQ", 1)  # legacy ids end in view metadata None
    return blob + pickle.dumps(["0"], protocol=2) + struct.pack("<q", 4) + np.arange(4, dtype="<f4").tobytes()


def test_hand_built_legacy_stream_is_read(tmp_path):
    (tmp_path / "legacy.pth").write_bytes(_legacy_stream())
    np.testing.assert_array_equal(read_torch_state_dict(tmp_path / "legacy.pth")["w"], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("source", ["zip", "legacy"])
def test_truncated_files(tmp_path, cut, source):
    blob = (FIXTURES / "torch_small.pth").read_bytes() if source == "zip" else _legacy_stream()
    path = tmp_path / "cut.pth"
    path.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(ModelLoadError, match="cut.pth"):
        read_torch_state_dict(path)


_RNG_BYTES = np.random.default_rng(0).bytes(4096)


def test_corrupted_record_fails_its_crc(tmp_path):
    blob = bytearray((FIXTURES / "torch_small.pth").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as zf:
        info = zf.getinfo("torch_small/data/0")
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)  # the local header's
    blob[info.header_offset + 30 + name_len + extra_len] ^= 0xFF  # first data byte of the record
    (tmp_path / "flipped.pth").write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="flipped.pth.*CRC"):
        read_torch_state_dict(tmp_path / "flipped.pth")


@pytest.mark.parametrize("blob", [b"", _RNG_BYTES, b"PK\x03\x04" + _RNG_BYTES[:500], b"\x80" + _RNG_BYTES[:300]],
                         ids=["empty", "random", "random-zip-magic", "random-pickle-magic"])
def test_non_torch_files(tmp_path, blob):
    path = tmp_path / "junk.pth"
    path.write_bytes(blob)
    with pytest.raises(ModelLoadError, match="junk.pth"):
        read_torch_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.pth"):
        read_torch_state_dict(tmp_path / "nope.pth")
