"""berg_jax.fetch against local servers only: moto's S3 server and a Range-capable HTTP server.

Nothing here reaches the internet: every client is given a 127.0.0.1 endpoint, proxies are
unset, and AWS credentials/config are replaced by dummies for the whole module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from berg_jax import fetch
from berg_jax.errors import DownloadError, InvalidParameterError

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")
from botocore.exceptions import ResponseStreamingError  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

MiB = 1024 * 1024
ROOT = fetch.MODEL_ROOT
PCA = f"{ROOT}/encoding_models_weights/pca_weights.npy"
PART = 5 * MiB  # S3's minimum part size, which moto enforces


def _w(s: int) -> str:
    return f"{ROOT}/encoding_models_weights/weights_sub-{s:02d}.npy"


def _m(s: int) -> str:
    return f"{ROOT}/metadata/metadata_sub-{s:02d}.npy"


# ----------------------------------------------------------------------------- environment


@pytest.fixture(scope="module", autouse=True)
def _offline_env(tmp_path_factory: pytest.TempPathFactory):
    """Dummy AWS credentials, no AWS config files, no proxies: requests stay on 127.0.0.1."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                    fetch.ENDPOINT_ENV):
            mp.delenv(var, raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-west-2")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.setattr(fetch, "_BACKOFF_S", 0.0)
        yield


# ---------------------------------------------------------------------------------- S3 side


@pytest.fixture(scope="module")
def s3(_offline_env) -> Any:
    """A moto S3 server holding fake BERG files for subjects 1 and 2 (the PCA uploaded multipart)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        rng = np.random.default_rng(0)
        blobs = {
            PCA: rng.bytes(PART + 3 * MiB // 2),
            _w(1): rng.bytes(300_000),
            _m(1): rng.bytes(120_000),
            _w(2): rng.bytes(250_000),
            _m(2): rng.bytes(90_000),
            f"{ROOT}/encoding_models_accuracy/encoding_accuracy_sub-01.png": rng.bytes(5_000),
        }
        admin = boto3.session.Session().client("s3", region_name="us-west-2", endpoint_url=endpoint)
        admin.create_bucket(Bucket=fetch.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        for key, data in blobs.items():
            if key == PCA:
                up = admin.create_multipart_upload(Bucket=fetch.BUCKET, Key=key, ACL="public-read")
                parts = []
                for i, off in enumerate(range(0, len(data), PART), start=1):
                    r = admin.upload_part(Bucket=fetch.BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=i,
                                          Body=data[off:off + PART])
                    parts.append({"PartNumber": i, "ETag": r["ETag"]})
                admin.complete_multipart_upload(Bucket=fetch.BUCKET, Key=key, UploadId=up["UploadId"],
                                                MultipartUpload={"Parts": parts})
            else:
                admin.put_object(Bucket=fetch.BUCKET, Key=key, Body=data, ACL="public-read")
        yield type("S3", (), {"endpoint": endpoint, "blobs": blobs, "admin": admin})
    finally:
        server.stop()


class _Recorder:
    """Watches the S3 client fetch makes, through botocore's event hooks.

    Records each GetObject's parameters and the body bytes actually read; can make a body
    break after N bytes (once per entry in `break_after`) or corrupt every byte it returns.
    """

    def __init__(self) -> None:
        self.gets: list[dict[str, Any]] = []
        self.heads = 0
        self.bytes_read = 0
        self.break_after: list[int] = []
        self.corrupt = False

    def make_client(self, region: str, endpoint_url: str | None) -> Any:
        client = _ORIG_MAKE_CLIENT(region, endpoint_url)
        client.meta.events.register("provide-client-params.s3.GetObject", self._on_get)
        client.meta.events.register("provide-client-params.s3.HeadObject", self._on_head)
        client.meta.events.register("after-call.s3.GetObject", self._wrap_body)
        return client

    def _on_get(self, params: dict[str, Any], **_: Any) -> None:
        self.gets.append(dict(params))

    def _on_head(self, params: dict[str, Any], **_: Any) -> None:
        self.heads += 1

    def _wrap_body(self, parsed: dict[str, Any], **_: Any) -> None:
        if "Body" in parsed:
            limit = self.break_after.pop(0) if self.break_after else None
            parsed["Body"] = _Body(parsed["Body"], self, limit)

    def ranges(self) -> list[str | None]:
        return [g.get("Range") for g in self.gets]


class _Body:
    def __init__(self, inner: Any, rec: _Recorder, limit: int | None) -> None:
        self.inner, self.rec, self.limit, self.n = inner, rec, limit, 0

    def read(self, amt: int | None = None) -> bytes:
        if self.limit is not None:
            if self.n >= self.limit:
                raise ResponseStreamingError(error="simulated connection reset")
            amt = min(amt or self.limit, self.limit - self.n)
        data = self.inner.read(amt)
        self.n += len(data)
        self.rec.bytes_read += len(data)
        return bytes(b ^ 0xFF for b in data) if self.rec.corrupt else data

    def close(self) -> None:
        self.inner.close()


_ORIG_MAKE_CLIENT = fetch._make_client


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    r = _Recorder()
    monkeypatch.setattr(fetch, "_make_client", r.make_client)
    return r


def _fetch(s3: Any, root: Path, subjects: Any) -> list[Path]:
    return fetch.fetch_berg_files(root, subjects, endpoint_url=s3.endpoint, show_progress=False)


def test_fetch_layout_and_only_requested_subjects(s3: Any, tmp_path: Path, rec: _Recorder,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="berg_jax.fetch")
    paths = _fetch(s3, tmp_path, [2])
    assert paths == [tmp_path / k for k in (PCA, _w(2), _m(2))]
    for key in (PCA, _w(2), _m(2)):
        assert (tmp_path / key).read_bytes() == s3.blobs[key]
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([PCA, _w(2), _m(2)])  # no sub-01, no plots, no .part left
    # The PCA's ETag is multipart; its 5 MiB part size is inferred and the ETag checked.
    assert s3.admin.head_object(Bucket=fetch.BUCKET, Key=PCA)["ETag"].strip('"').endswith("-2")
    assert "multipart ETag verified with 5242880 B parts" in caplog.text
    assert rec.bytes_read == sum(len(s3.blobs[k]) for k in (PCA, _w(2), _m(2)))


def test_anonymous_requests(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With no credentials anywhere, a signing client would fail; the unsigned one does not.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv(fetch.ENDPOINT_ENV, s3.endpoint)  # endpoint from the environment
    paths = fetch.fetch_berg_files(tmp_path, 1, show_progress=False)
    assert [p.read_bytes() for p in paths] == [s3.blobs[k] for k in (PCA, _w(1), _m(1))]


def test_skip_when_complete(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    _fetch(s3, tmp_path, [1, 2])
    n_gets = len(rec.gets)
    assert n_gets == 5
    _fetch(s3, tmp_path, (2, 1, 2))
    assert len(rec.gets) == n_gets  # HEAD only
    assert rec.heads == 10


def test_complete_size_wrong_content_is_downloaded_again(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    dest = tmp_path / _w(1)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * len(s3.blobs[_w(1)]))
    _fetch(s3, tmp_path, 1)
    assert dest.read_bytes() == s3.blobs[_w(1)]


def test_resume_from_part(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    data = s3.blobs[_w(1)]
    half = len(data) // 2
    part = tmp_path / (_w(1) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:half])
    _fetch(s3, tmp_path, 1)
    assert (tmp_path / _w(1)).read_bytes() == data
    assert not part.exists()
    w1_gets = [g for g in rec.gets if g["Key"] == _w(1)]
    assert [g["Range"] for g in w1_gets] == [f"bytes={half}-"]
    assert rec.bytes_read == len(data) - half + len(s3.blobs[PCA]) + len(s3.blobs[_m(1)])


def test_broken_transfer_is_retried_and_resumes(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    # The first body (the PCA) breaks after 1 MiB + 7 bytes, mid-chunk; the retry resumes there.
    rec.break_after = [MiB + 7]
    _fetch(s3, tmp_path, 1)
    assert (tmp_path / PCA).read_bytes() == s3.blobs[PCA]
    assert rec.ranges()[:2] == ["bytes=0-", f"bytes={MiB + 7}-"]
    assert rec.bytes_read == sum(len(s3.blobs[k]) for k in (PCA, _w(1), _m(1)))


def test_transfer_that_keeps_failing_raises(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    rec.break_after = [0] * 100
    with pytest.raises(DownloadError, match=re.escape(PCA)):
        _fetch(s3, tmp_path, 1)
    assert len(rec.gets) == fetch._MAX_ATTEMPTS
    assert not (tmp_path / PCA).exists()


def test_corrupt_part_is_detected_and_downloaded_again(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    # Chosen behaviour: a resumed file that fails its ETag check is discarded and downloaded
    # once more from byte 0; only if that clean copy fails too is DownloadError raised.
    data = s3.blobs[_m(1)]
    half = len(data) // 2
    part = tmp_path / (_m(1) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(b ^ 0x55 for b in data[:half]))
    _fetch(s3, tmp_path, 1)
    assert (tmp_path / _m(1)).read_bytes() == data
    assert [g["Range"] for g in rec.gets if g["Key"] == _m(1)] == [f"bytes={half}-", "bytes=0-"]


def test_content_that_never_verifies_raises(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    rec.corrupt = True
    part = tmp_path / (_w(2) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(s3.blobs[_w(2)][:1000])
    with pytest.raises(DownloadError, match=re.escape(_w(2))):
        fetch._fetch_object(rec.make_client("us-west-2", s3.endpoint), fetch.BUCKET, _w(2),
                            tmp_path / _w(2), show_progress=False)
    assert not (tmp_path / _w(2)).exists() and not part.exists()
    assert [g["Range"] for g in rec.gets] == ["bytes=1000-", "bytes=0-"]


def test_oversized_part_starts_over(s3: Any, tmp_path: Path, rec: _Recorder) -> None:
    part = tmp_path / (_m(2) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (len(s3.blobs[_m(2)]) + 10))
    _fetch(s3, tmp_path, 2)
    assert (tmp_path / _m(2)).read_bytes() == s3.blobs[_m(2)]


def test_missing_object_names_the_key(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=re.escape(_w(3))):
        _fetch(s3, tmp_path, 3)


def test_progress_bar(s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fetch.fetch_berg_files(tmp_path, 2, endpoint_url=s3.endpoint, show_progress=True)
    err = capsys.readouterr().err
    assert "weights_sub-02.npy" in err and "B/s" in err


@pytest.mark.parametrize("bad", [0, 11, -1, True, 1.0, "1", [1, 12], [], None])
def test_invalid_subjects(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError):
        fetch.fetch_berg_files(tmp_path, bad, endpoint_url="http://127.0.0.1:9", show_progress=False)
    assert not any(tmp_path.iterdir())


def test_berg_keys() -> None:
    assert fetch.berg_keys([np.int64(10), 3, 10]) == [PCA, _w(10), _m(10), _w(3), _m(3)]


# ---------------------------------------------------------------------- ETag verification


def _multipart_etag(data: bytes, part: int) -> str:
    digests = [hashlib.md5(data[i:i + part]).digest() for i in range(0, len(data), part)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def test_verify_single_part(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    assert fetch._verify_s3(p, 3000, hashlib.md5(b"abc" * 1000).hexdigest())
    assert not fetch._verify_s3(p, 3000, hashlib.md5(b"abd" * 1000).hexdigest())
    assert not fetch._verify_s3(p, 3001, hashlib.md5(b"abc" * 1000).hexdigest())


def test_verify_multipart_infers_part_size(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(7 * MiB)
    p = tmp_path / "f"
    p.write_bytes(data)
    # 3 MiB parts: neither a default nor round(7/3 MiB); found as size/N rounded up.
    assert fetch._verify_s3(p, len(data), _multipart_etag(data, 3 * MiB))
    assert fetch._verify_s3(p, len(data), _multipart_etag(data, 5 * MiB))
    assert fetch._verify_s3(p, len(data), _multipart_etag(data, 8 * MiB))  # a single "-1" part


def test_verify_multipart_falls_back_to_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="berg_jax.fetch")
    data = np.random.default_rng(2).bytes(7 * MiB)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert fetch._verify_s3(p, len(data), _multipart_etag(data, 5 * MiB // 2))  # 3 parts of 2.5 MiB
    assert "verified by size only" in caplog.text
    assert not fetch._verify_s3(p, len(data) + 1, _multipart_etag(data, 5 * MiB // 2))


# ------------------------------------------------------------------------------ HTTP side


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng:
            start, status = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        drop = srv.drop_after.pop(self.path, None)
        if drop is not None:  # send part of the body, then hang up
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http(_offline_env) -> Any:
    data = np.random.default_rng(3).bytes(300_000)
    good = f"/models/s3d-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    bad = "/models/s3d-00000000.pth"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files = {good: data, bad: data}
    server.requests, server.drop_after = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield type("HTTP", (), {"server": server, "data": data, "good": base + good, "bad": base + bad,
                                "base": base})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def srv(http: Any) -> Any:
    http.server.requests.clear()
    http.server.drop_after.clear()
    return http


def test_weights_fresh_download_and_skip(srv: Any, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    assert fetch.fetch_s3d_weights(dest, url=srv.good, show_progress=False) == dest
    assert dest.read_bytes() == srv.data
    assert not (tmp_path / "w.pth.part").exists()
    assert fetch.fetch_s3d_weights(dest, url=srv.good, show_progress=False) == dest
    assert [r for _, r in srv.server.requests] == [None]  # the second call did not download


def test_weights_default_dest(srv: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = fetch.fetch_s3d_weights(url=srv.good, show_progress=False)
    assert path == tmp_path / "th" / "hub" / "checkpoints" / srv.good.rsplit("/", 1)[1]
    assert path.read_bytes() == srv.data


def test_default_s3d_weights_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert fetch.default_s3d_weights_path() == tmp_path / "hub/checkpoints/s3d-d76dad2f.pth"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.default_s3d_weights_path() == tmp_path / ".cache/torch/hub/checkpoints/s3d-d76dad2f.pth"
    assert fetch._hash_prefix("s3d-d76dad2f.pth") == "d76dad2f"
    assert fetch._hash_prefix("resnet18-f37072fd.pth") == "f37072fd"
    assert fetch._hash_prefix("weights.pth") is None


def test_weights_resume(srv: Any, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    half = len(srv.data) // 2
    (tmp_path / "w.pth.part").write_bytes(srv.data[:half])
    fetch.fetch_s3d_weights(dest, url=srv.good, show_progress=False)
    assert dest.read_bytes() == srv.data
    assert [r for _, r in srv.server.requests] == [f"bytes={half}-"]


def test_weights_complete_part_is_verified_not_refetched(srv: Any, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    (tmp_path / "w.pth.part").write_bytes(srv.data)
    fetch.fetch_s3d_weights(dest, url=srv.good, show_progress=False)
    assert dest.read_bytes() == srv.data
    assert [r for _, r in srv.server.requests] == [f"bytes={len(srv.data)}-"]  # answered 416


def test_weights_dropped_connection_resumes(srv: Any, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    srv.server.drop_after[srv.good.removeprefix(srv.base)] = 100_000
    fetch.fetch_s3d_weights(dest, url=srv.good, show_progress=False)
    assert dest.read_bytes() == srv.data
    assert [r for _, r in srv.server.requests] == [None, "bytes=100000-"]


def test_weights_hash_mismatch(srv: Any, tmp_path: Path) -> None:
    dest = tmp_path / "s3d-00000000.pth"
    with pytest.raises(DownloadError, match="00000000"):
        fetch.fetch_s3d_weights(dest, url=srv.bad, show_progress=False)
    assert not dest.exists() and not (tmp_path / "s3d-00000000.pth.part").exists()


def test_weights_existing_bad_file_is_replaced(srv: Any, tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"not the weights")
    fetch.fetch_s3d_weights(dest, url=srv.good, show_progress=False)
    assert dest.read_bytes() == srv.data


def test_weights_http_error(srv: Any, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        fetch.fetch_s3d_weights(tmp_path / "x.pth", url=srv.base + "/models/missing-12345678.pth",
                                show_progress=False)


def test_object_changed_since_part_was_written(s3: Any, tmp_path: Path, rec: _Recorder,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The ranged GET carries If-Match with the HEAD's ETag; a different ETag (the object was
    # replaced) makes S3 answer 412, and the stale .part is dropped rather than extended.
    part = tmp_path / (_w(1) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(s3.blobs[_w(1)][:1000])
    monkeypatch.setattr(fetch, "_head", lambda c, b, k: (len(s3.blobs[k]), "0" * 32))
    with pytest.raises(DownloadError, match="changed during the download"):
        fetch._fetch_object(rec.make_client("us-west-2", s3.endpoint), fetch.BUCKET, _w(1),
                            tmp_path / _w(1), show_progress=False)
    assert not part.exists() and not (tmp_path / _w(1)).exists()
