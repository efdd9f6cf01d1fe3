"""Resumable, verified downloads of BERG's fmri-bmd-s3d files and torchvision's S3D weights.

BERG's bucket is public, so it is read anonymously (unsigned requests): no AWS account or
credentials are needed, and any the user has configured are never sent. Each file is written
to `<file>.part` first and moved to its final name only once its size and checksum verify, so
an interrupted run leaves nothing half-written under a real name and the next run resumes.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import operator
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from .errors import DownloadError, InvalidParameterError

log = logging.getLogger(__name__)

BUCKET = "brain-encoding-response-generator"
REGION = "us-west-2"
MODEL_ROOT = "encoding_models/modality-fmri/train_dataset-bmd/model-s3d"
SUBJECTS = tuple(range(1, 11))
ENDPOINT_ENV = "BERG_JAX_S3_ENDPOINT"
S3D_WEIGHTS_URL = "https://download.pytorch.org/models/s3d-d76dad2f.pth"

_MiB = 1024 * 1024
_CHUNK = _MiB
# A transfer is retried this many times in a row without receiving any new byte; an attempt
# that made progress resets the count, since the .part keeps every byte already received.
_MAX_ATTEMPTS = 5
_BACKOFF_S = 0.5
_HTTP_TIMEOUT_S = 60.0
# Part sizes of the common S3 upload tools (aws cli / boto3 8 MiB, s3cmd 15 MiB, the S3
# minimum 5 MiB used by many SDKs, 16 MiB); a multipart ETag does not record its part size.
_DEFAULT_PART_SIZES = (8 * _MiB, 16 * _MiB, 5 * _MiB, 15 * _MiB)


# --------------------------------------------------------------------------------- BERG (S3)


def berg_keys(subjects: int | Iterable[int]) -> list[str]:
    """Bucket keys the model needs: the shared PCA, then each subject's weights and metadata.

    Args:
      subjects: one subject or several, each an int in 1..10 (duplicates are dropped).
    Returns:
      keys relative to the bucket root, e.g. `<MODEL_ROOT>/metadata/metadata_sub-01.npy`.
    Raises:
      InvalidParameterError: a subject is not an integer in 1..10.
    """
    keys = [f"{MODEL_ROOT}/encoding_models_weights/pca_weights.npy"]
    for s in check_subjects(subjects):
        keys.append(f"{MODEL_ROOT}/encoding_models_weights/weights_sub-{s:02d}.npy")
        keys.append(f"{MODEL_ROOT}/metadata/metadata_sub-{s:02d}.npy")
    return keys


def fetch_berg_files(
    berg_dir: str | os.PathLike[str],
    subjects: int | Iterable[int],
    *,
    bucket: str = BUCKET,
    region: str = REGION,
    endpoint_url: str | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Download the fmri-bmd-s3d files for `subjects` into `berg_dir`, as `aws s3 sync` lays them out.

    Files already present with the right size and checksum are skipped; a `<file>.part` left
    by an interrupted run is resumed with ranged GETs.

    Args:
      berg_dir: local root; a key `K` is written to `berg_dir/K`.
      subjects: one subject or several, each an int in 1..10.
      bucket, region: where BERG's files live.
      endpoint_url: another S3 endpoint (a mirror, or a local test server); defaults to the
        environment variable BERG_JAX_S3_ENDPOINT, else AWS.
      show_progress: draw a tqdm bar per file.
    Returns:
      the local paths, in the order of `berg_keys(subjects)`.
    Raises:
      InvalidParameterError: a subject is not an integer in 1..10.
      DownloadError: a file is missing, a transfer kept failing, or a file did not verify.
    """
    keys = berg_keys(subjects)
    client = _make_client(region, endpoint_url or os.environ.get(ENDPOINT_ENV) or None)
    root = Path(berg_dir)
    return [_fetch_object(client, bucket, key, root / key, show_progress) for key in keys]


def check_subjects(subjects: int | Iterable[int]) -> list[int]:
    """Validated, de-duplicated subjects in their given order."""
    items = list(subjects) if isinstance(subjects, Iterable) else [subjects]
    out: list[int] = []
    for s in items:
        # operator.index admits numpy integers but not floats or strings; bool is an int
        # subclass that would silently mean subject 1.
        try:
            if isinstance(s, bool):
                raise TypeError
            v = operator.index(s)
        except TypeError:
            raise InvalidParameterError(f"subject must be an integer in 1..10, got {s!r}") from None
        if v not in SUBJECTS:
            raise InvalidParameterError(f"subject must be an integer in 1..10, got {v}")
        if v not in out:
            out.append(v)
    if not out:
        raise InvalidParameterError("no subject given; pass one or more of 1..10")
    return out


def _make_client(region: str, endpoint_url: str | None) -> Any:
    """An anonymous S3 client; a separate function so tests can observe its calls."""
    try:
        import boto3
        import botocore
        from botocore.config import Config
    except ImportError as e:  # boto3 is an optional dependency
        raise DownloadError("fetching BERG's files needs boto3: pip install boto3") from e
    config = Config(
        signature_version=botocore.UNSIGNED,
        # Path style, because a custom endpoint is often an IP address or localhost where
        # bucket subdomains do not resolve.
        s3={"addressing_style": "path"} if endpoint_url else {},
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint_url, config=config)


def _fetch_object(client: Any, bucket: str, key: str, dest: Path, show_progress: bool) -> Path:
    """Make `dest` hold a verified copy of `s3://bucket/key`, downloading only what is missing."""
    size, etag = _head(client, bucket, key)
    if dest.is_file() and dest.stat().st_size == size:
        if _verify_s3(dest, size, etag):
            log.info("%s is complete, skipped", dest)
            return dest
        log.warning("%s has the right size but does not match ETag %s; downloading it again", dest, etag)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    resumed = part.is_file() and part.stat().st_size > 0
    if resumed and part.stat().st_size > size:
        log.warning("%s is larger than the object (%d B); starting over", part, size)
        part.unlink()
        resumed = False

    _download_s3_to_part(client, bucket, key, etag, size, part, show_progress)
    if not _verify_s3(part, size, etag) and resumed:
        # Bytes kept from an earlier run may be corrupt or from an older object version; one
        # clean download tells that apart from a bad transfer now.
        log.warning("resumed %s did not verify against ETag %s; downloading it again from scratch", key, etag)
        part.unlink()
        _download_s3_to_part(client, bucket, key, etag, size, part, show_progress)
    if not _verify_s3(part, size, etag):
        part.unlink(missing_ok=True)
        raise DownloadError(f"s3://{bucket}/{key}: the downloaded file does not match its size {size} and ETag {etag}")
    os.replace(part, dest)
    return dest


def _head(client: Any, bucket: str, key: str) -> tuple[int, str]:
    """(size, ETag without quotes) of an object, or DownloadError naming it."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        why = "not found" if code in ("404", "NoSuchKey", "NotFound") else str(e)
        raise DownloadError(f"s3://{bucket}/{key}: {why}") from e
    except BotoCoreError as e:
        raise DownloadError(f"s3://{bucket}/{key}: {e}") from e
    return int(head["ContentLength"]), head.get("ETag", "").strip('"')


def _download_s3_to_part(
    client: Any, bucket: str, key: str, etag: str, size: int, part: Path, show_progress: bool
) -> None:
    """Append the object's missing bytes to `part` with ranged GETs, retrying broken transfers."""
    import urllib3
    from botocore.exceptions import BotoCoreError, ClientError

    with open(part, "ab") as f, _bar(size, f.tell(), part.name[: -len(".part")], show_progress) as bar:
        failures, last_error = 0, None
        while f.tell() < size:
            start = f.tell()
            try:
                # If-Match makes S3 refuse the range should the object change under us, so
                # the .part never mixes two versions.
                resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-", IfMatch=f'"{etag}"')
                _copy_stream(resp["Body"], f, bar)
                if f.tell() < size:
                    raise DownloadError(f"stream ended at byte {f.tell()} of {size}")
                continue
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status == 412:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"s3://{bucket}/{key} changed during the download; run again") from e
                if status < 500 and status not in (408, 429):
                    raise DownloadError(f"s3://{bucket}/{key}: {e}") from e
                last_error = e
            except (BotoCoreError, urllib3.exceptions.HTTPError, OSError, DownloadError) as e:
                last_error = e
            failures = 0 if f.tell() > start else failures + 1
            if failures >= _MAX_ATTEMPTS:
                raise DownloadError(
                    f"s3://{bucket}/{key}: transfer failed {failures} times in a row at byte {f.tell()} of {size}: "
                    f"{last_error}; run again to resume from {part}"
                ) from last_error
            log.info("s3://%s/%s: transfer broke at byte %d (%s); resuming", bucket, key, f.tell(), last_error)
            time.sleep(_BACKOFF_S * 2 ** max(failures - 1, 0))


def _copy_stream(body: Any, f: BinaryIO, bar: tqdm) -> None:
    """Copy a response body to `f` chunk by chunk, flushing so a crash keeps what arrived."""
    try:
        while chunk := body.read(_CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
    finally:
        f.flush()
        body.close()


def _verify_s3(path: Path, size: int, etag: str) -> bool:
    """Whether `path` has `size` bytes and matches the object's ETag (when it can be checked).

    A single-part ETag is the MD5 of the content. A multipart one is MD5(concatenated part
    MD5s) + "-N"; the part size is not recorded, so the common ones and size/N rounded to MiB
    are tried in a single pass; when none of them reproduces the ETag, only the size is
    checked (said at debug level), since a wrong guess and a corrupt file look the same. A
    single-part ETag that is not the content's MD5 (as under SSE-KMS) therefore fails, and an
    ETag of no known form is checked by size only.
    """
    if path.stat().st_size != size:
        return False
    m = re.fullmatch(r"([0-9a-fA-F]{32})(?:-(\d+))?", etag)
    if m is None:
        log.debug("%s: ETag %r is not an MD5; verified by size only", path, etag)
        return True
    digest, n_parts = m.group(1).lower(), m.group(2)
    if n_parts is None:
        return _md5_parts(path, [max(size, 1)])[0][0].hex() == digest
    n = int(n_parts)
    candidates = [p for p in _part_size_candidates(size, n) if p > 0 and -(-size // p) == n]
    if not candidates:
        log.debug("%s: no known part size gives %d parts of %d B; verified by size only", path, n, size)
        return True
    for p, parts in zip(candidates, _md5_parts(path, candidates)):
        if hashlib.md5(b"".join(parts)).hexdigest() == digest:
            log.debug("%s: multipart ETag verified with %d B parts", path, p)
            return True
    log.debug("%s: no tried part size %s reproduces ETag %s; verified by size only", path, candidates, etag)
    return True


def _part_size_candidates(size: int, n: int) -> list[int]:
    """Plausible part sizes for a `n`-part upload of `size` bytes, most common first."""
    guesses = list(_DEFAULT_PART_SIZES)
    if n > 0:
        # Rounded to the nearest MiB and up to the next one: a tool that picks its part size
        # from the file size usually picks a whole number of MiB just above size/N.
        guesses += [round(size / n / _MiB) * _MiB, -(-size // (n * _MiB)) * _MiB]
    return list(dict.fromkeys(guesses))


def _md5_parts(path: Path, part_sizes: list[int]) -> list[list[bytes]]:
    """For each part size, the MD5 digests of the file's consecutive parts; one read for all."""
    # Per candidate: [hash of the current part, part size, finished digests, bytes in current].
    states: list[list[Any]] = [[hashlib.md5(), p, [], 0] for p in part_sizes]
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for st in states:
                view = memoryview(chunk)
                while view:
                    take = min(len(view), st[1] - st[3])
                    st[0].update(view[:take])
                    st[3] += take
                    view = view[take:]
                    if st[3] == st[1]:
                        st[2].append(st[0].digest())
                        st[0], st[3] = hashlib.md5(), 0
    for cur, _, done, filled in states:
        if filled or not done:  # a trailing short part, or an empty file
            done.append(cur.digest())
    return [done for _, _, done, _ in states]


# ------------------------------------------------------------------------ S3D weights (HTTP)


def default_s3d_weights_path(url: str = S3D_WEIGHTS_URL) -> Path:
    """Where torch hub caches `url`: `$TORCH_HOME/hub/checkpoints/<file name>` (~/.cache/torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints" / _url_file_name(url)


def fetch_s3d_weights(
    dest: str | os.PathLike[str] | None = None,
    url: str = S3D_WEIGHTS_URL,
    show_progress: bool = True,
) -> Path:
    """Download torchvision's S3D Kinetics-400 state_dict, resuming and checking its SHA-256.

    As torch hub does, the file name's hash part (after the last '-', before the extension;
    `d76dad2f` for the default) must be a prefix of the content's SHA-256; a name without one
    is checked by size only. An existing file that verifies is not downloaded again.

    Args:
      dest: target file; defaults to torch hub's cache path (`default_s3d_weights_path(url)`),
        so torchvision finds the file there too.
      url: http(s) source.
      show_progress: draw a tqdm bar.
    Returns:
      the path of the verified file.
    Raises:
      DownloadError: the transfer kept failing, or the content does not match the hash
        prefix (the `.part` is then removed).
    """
    dest = Path(dest) if dest is not None else default_s3d_weights_path(url)
    prefix = _hash_prefix(_url_file_name(url))
    if dest.is_file():
        if prefix is None or _sha256(dest).startswith(prefix):
            log.info("%s is complete, skipped", dest)
            return dest
        log.warning("%s does not match hash prefix %s; downloading it again", dest, prefix)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    _download_http_to_part(url, part, show_progress)
    if prefix is not None:
        digest = _sha256(part)
        if not digest.startswith(prefix):
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: SHA-256 {digest} does not start with {prefix}; the download was removed")
    os.replace(part, dest)
    return dest


def _download_http_to_part(url: str, part: Path, show_progress: bool) -> None:
    """Append the missing bytes of `url` to `part` (HTTP Range), retrying broken transfers."""
    failures, last_error, total = 0, None, None
    bar = _bar(None, 0, part.name[: -len(".part")], show_progress)
    with bar, open(part, "ab") as f:
        while total is None or f.tell() < total:
            start = f.tell()
            try:
                total = _http_get_into(url, f, bar)
                if f.tell() < total:
                    raise DownloadError(f"stream ended at byte {f.tell()} of {total}")
                continue
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):
                    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
                last_error = e
            except (OSError, http.client.HTTPException, DownloadError) as e:
                last_error = e
            failures = 0 if f.tell() > start else failures + 1
            if failures >= _MAX_ATTEMPTS:
                raise DownloadError(
                    f"{url}: transfer failed {failures} times in a row at byte {f.tell()}: {last_error}; "
                    f"run again to resume from {part}"
                ) from last_error
            log.info("%s: transfer broke at byte %d (%s); resuming", url, f.tell(), last_error)
            time.sleep(_BACKOFF_S * 2 ** max(failures - 1, 0))


def _http_get_into(url: str, f: BinaryIO, bar: tqdm) -> int:
    """One GET from `f`'s end onwards, appended to `f`; returns the full size of the resource."""
    start = f.tell()
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(req, timeout=_HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code != 416:
            raise
        # Nothing past our end: the .part is already whole (or longer than the resource,
        # which the hash check then catches); the range header tells the true size.
        m = re.search(r"/(\d+)", e.headers.get("Content-Range", "") or "")
        e.close()
        total = int(m.group(1)) if m else start
        if total != start:
            f.truncate(0)
            f.seek(0)
            raise DownloadError(f"range not satisfiable at {start} of {total}; starting over") from e
        bar.reset(total)
        bar.update(start)
        return total
    with resp:
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
            if m is None or int(m.group(1)) != start:
                raise DownloadError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(2)) if m.group(2) != "*" else start + int(resp.headers["Content-Length"])
        else:
            # The server ignored the range and sends everything: start the .part over.
            f.truncate(0)
            f.seek(0)
            total = int(resp.headers.get("Content-Length") or -1)
        bar.reset(total if total >= 0 else None)
        bar.update(f.tell())
        while chunk := resp.read(_CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
        f.flush()
        return total if total >= 0 else f.tell()


# ------------------------------------------------------------------------------ shared bits


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _url_file_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def _hash_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix torch hub reads from a file name (`s3d-d76dad2f.pth` -> `d76dad2f`)."""
    stem = file_name.rsplit(".", 1)[0]
    if "-" not in stem:
        return None
    tail = stem.rsplit("-", 1)[1].lower()
    return tail if re.fullmatch(r"[0-9a-f]+", tail) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _bar(total: int | None, initial: int, desc: str, show_progress: bool) -> tqdm:
    """A byte progress bar (size, rate, ETA), binary units, resumed bytes counted as done."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not show_progress,
        leave=False,
    )
