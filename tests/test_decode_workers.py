"""Decoding in worker processes (`berg_jax.decode_workers`): the same clips as the thread
path, a crashing worker fails only its file, no orphan processes however the run ends
(close, consumer exception, Ctrl-C, kill -9 of the parent), and `berg-jax encode
--decode-workers 2` interrupted by Ctrl-C resumes to the files of a clean run.

The read functions below run inside the workers, which import them by name: keep this
module's top-level imports light (the end-to-end tests import the model code lazily).
Processes are watched through /proc (Linux), always by polling against a deadline.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")  # the videos are written with PyAV

from berg_jax import video  # noqa: E402
from berg_jax.decode_workers import (  # noqa: E402
    DecodeWorkerError,
    default_decode_workers,
    died_externally,
    prefetch_clips,
    worker_died_message,
)
from berg_jax.errors import InvalidParameterError  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402
from tests.processes import sigint_not_ignored  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches processes through /proc (Linux)")


# --------------------------------------------------------------------------- readers (run in the workers)


def crashing_read(path: str, **kwargs) -> np.ndarray:
    """`read_clip`, except that files named sigkill*, sigterm*, segv*, exit3* end the worker process."""
    name = os.path.basename(path)
    if name.startswith("sigkill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("sigterm"):
        os.kill(os.getpid(), signal.SIGTERM)
    if name.startswith("segv"):
        ctypes.string_at(0)  # a NULL read: SIGSEGV, as a crashing decoder would
    if name.startswith("exit3"):
        os._exit(3)
    return video.read_clip(path, **kwargs)


def segv_read(path: str, **kwargs) -> np.ndarray:
    """`read_clip`, except that files named segv* crash the worker (a file's own fault)."""
    if os.path.basename(path).startswith("segv"):
        ctypes.string_at(0)
    return video.read_clip(path, **kwargs)


def hanging_read(path: str, marker_dir: str, **kwargs) -> np.ndarray:
    """`read_clip`, except that on files named hang* it writes MARKER_DIR/<pid>-<name> and never returns."""
    name = os.path.basename(path)
    if name.startswith("hang"):
        Path(marker_dir, f"{os.getpid()}-{name}").touch()
        threading.Event().wait()
    return video.read_clip(path, **kwargs)


def package_free_read(path: str, **kwargs) -> np.ndarray:
    """`read_clip`, failing if the worker has run berg_jax/__init__.py (the model code)."""
    loaded = [m for m in ("berg_jax.api", "berg_jax.fused", "berg_jax.s3d", "berg_jax.head") if m in sys.modules]
    if loaded or "BERG" in vars(sys.modules["berg_jax"]):  # not hasattr: that would run __init__
        raise RuntimeError(f"the decode worker imported the model code: {loaded}")
    return video.read_clip(path, **kwargs)


def jax_free_read(path: str, **kwargs) -> np.ndarray:
    """`read_clip`, failing if the worker has imported JAX."""
    clip = video.read_clip(path, **kwargs)
    if "jax" in sys.modules:
        raise RuntimeError("the decode worker imported jax")
    return clip


def reader_of_package_names(path: str, **kwargs) -> np.ndarray:
    """`read_clip` through names of berg_jax's __init__, which the worker then has to run."""
    import berg_jax

    assert issubclass(berg_jax.VideoReadError, berg_jax.BERGError)
    return berg_jax.video.read_clip(path, **kwargs)


# --------------------------------------------------------------------------- helpers


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process ("Z": a zombie, ended but not reaped), None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running (a zombie has ended; once its parent is gone, reaping it is init's business)."""
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"


def decode_workers_of(parent: int) -> set[int]:
    """Pids of the decode worker processes of `parent`, zombies included: a parent must reap its workers."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is None or st[1] != parent:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"berg_jax.decode_workers" in f.read():
                    found.add(int(entry))
        except OSError:
            continue
    return found


def wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll `predicate` until it returns something true; fail naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def all_gone(pids: set[int]) -> bool:
    return not any(alive(p) for p in pids)


def kill_survivors(pids: set[int]) -> None:
    """After a failed check: leave no stray process behind on the test machine."""
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)


def as_lists(batches):
    """Batches as comparable values: (indices, [(dtype, shape, bytes)], errors)."""
    return [(i, [(c.dtype, c.shape, c.tobytes()) for c in clips], e) for i, clips, e in batches]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Good videos of three sizes (small, large, small: a worker's slot grows, then is reused),
    a corrupt file, a missing path and a 9-frame video."""
    d = tmp_path_factory.mktemp("decode_workers")
    sizes = [(48, 64), (64, 80), (96, 128), (48, 64), (64, 80), (96, 128), (48, 64)]
    paths = [vf.write_test_video(d / f"v{i}.mp4", n_frames=14 + i, height=h, width=w, seed=i)
             for i, (h, w) in enumerate(sizes)]
    paths.insert(2, vf.write_random_bytes(d / "corrupt.mp4"))
    paths.insert(5, str(d / "missing.mp4"))
    paths.append(vf.write_short(d / "short.mp4"))
    return paths


# --------------------------------------------------------------------------- same results as threads


@pytest.mark.parametrize("skip, pad_short", [(None, False), ({0, 3, 4}, True)])
def test_same_clips_as_the_thread_path(videos, skip, pad_short):
    kwargs = dict(batch_size=3, queue_size=1, skip=skip, pad_short=pad_short)
    expected = as_lists(video.prefetch_clips(videos, num_threads=2, **kwargs))
    got = as_lists(prefetch_clips(videos, num_workers=2, **kwargs))
    assert got == expected
    errors = {i: e for _, _, errs in got for i, e in errs.items()}
    # the reader's own reasons, naming the path
    assert errors[2].startswith(f"{videos[2]}: not a readable video container")
    assert errors[5] == f"{videos[5]}: no such file"
    assert (9 in errors) != pad_short


def test_worker_runs_no_model_code(videos):
    (indices, clips, errors), = prefetch_clips(videos[:2], 2, read=package_free_read, num_workers=1)
    assert errors == {} and indices == [0, 1]


def test_worker_imports_no_jax(videos):
    (indices, clips, errors), = prefetch_clips(videos[:2], 2, read=jax_free_read, num_workers=1)
    assert errors == {}


def test_shared_memory_is_anonymous(videos, tmp_path):
    """The clips cross in a memfd (no name, so nothing to leak in /dev/shm), in both processes."""

    def shm_mappings(pid: int) -> set[str]:
        return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/" in line}

    # The test process may map /dev/shm files of its own (e.g. multiprocessing's semaphores,
    # made by earlier tests): only new ones would be ours.
    before = shm_mappings(os.getpid())
    gen = prefetch_clips([videos[0], str(tmp_path / "hang.mp4")], 1, read=hanging_read,
                         num_workers=1, queue_size=1, marker_dir=str(tmp_path))
    try:
        (indices, _, _) = next(gen)
        assert indices == [0]
        (worker,) = wait_for(lambda: decode_workers_of(os.getpid()), "the worker")
        for pid, known in ((worker, set()), (os.getpid(), before)):
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "/memfd:berg-decode-slot" in maps and shm_mappings(pid) <= known
    finally:
        gen.close()


# --------------------------------------------------------------------------- crashes


def test_a_worker_that_dies_fails_only_its_file(videos, tmp_path):
    paths = list(videos[:2])
    for name in ("sigkill.mp4", "segv.mp4", "exit3.mp4"):
        Path(tmp_path / name).write_bytes(Path(videos[0]).read_bytes())  # a good video: only the name kills
        paths.insert(1, str(tmp_path / name))
    paths += [videos[3], videos[4]]
    batches = []
    for batch in prefetch_clips(paths, 2, read=crashing_read, num_workers=2):
        batches.append(batch)
        # dead workers are reaped and replaced, never more than num_workers processes
        assert len(decode_workers_of(os.getpid())) <= 2
    errors = {i: e for _, _, errs in batches for i, e in errs.items()}
    assert errors == {
        1: f"decode worker died (exit code 3) while reading {paths[1]}",
        2: f"decode worker died (signal 11) while reading {paths[2]}",
        3: f"decode worker died (signal 9) while reading {paths[3]}",
    }
    clips = {i: c for idx, cs, _ in batches for i, c in zip(idx, cs)}
    assert sorted(clips) == [0, 4, 5, 6]
    for i, clip in clips.items():
        np.testing.assert_array_equal(clip, video.read_clip(paths[i]), err_msg=paths[i])
    assert decode_workers_of(os.getpid()) == set()


def test_which_deaths_are_not_the_files_fault():
    path = "videos/a (1) while reading b.mp4"
    assert worker_died_message("signal 9", path) == f"decode worker died (signal 9) while reading {path}"
    assert died_externally(worker_died_message("signal 9", path))  # the OOM killer, kill -9
    assert died_externally(worker_died_message("signal 15", path))  # kill
    assert died_externally(worker_died_message("exit code 0", path, while_reading=False))  # never got the file
    for how in ("signal 11", "signal 6", "signal 7", "exit code 3", "exit code -9"):  # the decoder's crashes
        assert not died_externally(worker_died_message(how, path)), how
    assert not died_externally(f"{path}: not a readable video container")
    assert not died_externally("x: decode worker died (signal 9) while reading x")  # only the whole message
    assert not died_externally("decode worker died (signal 9) while reading ")  # names no file


def test_readers_that_use_the_package_or_do_not_import(videos, monkeypatch):
    (indices, clips, errors), = prefetch_clips(videos[:1], 1, read=reader_of_package_names, num_workers=1)
    np.testing.assert_array_equal(clips[0], video.read_clip(videos[0]))

    with pytest.raises(InvalidParameterError, match="top level of an importable module"):
        prefetch_clips(videos, 2, read=lambda p: p, num_workers=1)
    with pytest.raises(InvalidParameterError, match="must pickle"):
        prefetch_clips(videos, 2, num_workers=1, key=lambda: 0)
    with pytest.raises(InvalidParameterError, match="num_workers must be >= 1"):
        prefetch_clips(videos, 2, num_workers=0)
    # Importable here, not in a fresh process: the run stops (every row would fail alike).
    module = types.ModuleType("berg_jax_test_parent_only")
    exec("def read(path, **kwargs):\n    return None\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    gen = prefetch_clips(videos, 2, read=module.read, num_workers=1)
    with pytest.raises(DecodeWorkerError, match="cannot import the read function berg_jax_test_parent_only:read"):
        next(gen)
    assert decode_workers_of(os.getpid()) == set()


def test_default_worker_count():
    assert default_decode_workers() == max(1, len(os.sched_getaffinity(0)) - 2)


# --------------------------------------------------------------------------- no orphans


@pytest.mark.parametrize("how", ["close", "consumer exception", "KeyboardInterrupt"])
def test_no_orphans_when_the_consumer_stops(videos, tmp_path, how):
    """Workers stuck inside a decode are killed and reaped before the generator returns."""
    # batches: two good files, two good files, two files whose reads never return
    paths = [videos[0], videos[1], videos[3], videos[4], str(tmp_path / "hang0.mp4"), str(tmp_path / "hang1.mp4")]
    gen = prefetch_clips(paths, 2, read=hanging_read, num_workers=2, marker_dir=str(tmp_path))
    workers = set()
    try:
        indices, _, _ = next(gen)
        assert indices == [0, 1]
        # both workers are inside a read that never returns
        wait_for(lambda: len([m for m in os.listdir(tmp_path) if "-hang" in m]) == 2, "two hanging reads")
        workers = decode_workers_of(os.getpid())
        assert len(workers) == 2
        if how == "KeyboardInterrupt":  # Ctrl-C arriving while the consumer waits on the generator
            with pytest.raises(KeyboardInterrupt):
                gen.throw(KeyboardInterrupt)
        elif how == "consumer exception":
            with pytest.raises(RuntimeError):
                for _ in gen:  # the second batch, decoded already
                    raise RuntimeError("the consumer failed")
            del gen  # the last reference: the generator closes as the consumer's frame lets go of it
        else:
            gen.close()
    finally:
        if "gen" in locals():
            gen.close()
    assert workers and decode_workers_of(os.getpid()) == set(), "workers outlived the generator, or were not reaped"


def test_workers_die_with_a_killed_parent(videos, tmp_path):
    """kill -9 of the parent while both workers are inside a decode: the kernel ends them."""
    paths = [str(tmp_path / f"hang{i}.mp4") for i in range(4)]
    script = (f"import sys; sys.path[:0] = {[str(REPO)]!r}\n"
              "from berg_jax.decode_workers import prefetch_clips\n"
              "from tests.test_decode_workers import hanging_read\n"
              f"for _ in prefetch_clips({paths!r}, 1, read=hanging_read, num_workers=2, "
              f"marker_dir={str(tmp_path)!r}):\n"
              "    pass\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(lambda: len([m for m in os.listdir(tmp_path) if "-hang" in m]) == 2 or proc.poll() is not None,
                 "two hanging reads")
        assert proc.poll() is None, "the parent exited early"
        workers = decode_workers_of(proc.pid)
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    try:
        wait_for(lambda: all_gone(workers), "the orphaned workers to exit", timeout=60)
    finally:
        kill_survivors(workers)


# --------------------------------------------------------------------------- berg-jax encode


def _journal(out: Path) -> bytes:
    try:
        return (out / "progress.jsonl").read_bytes()
    except FileNotFoundError:
        return b""


@pytest.mark.slow
def test_encode_ctrl_c_leaves_no_workers_and_resumes_byte_identical(tmp_path, capsys):
    from berg_jax import cli
    from berg_jax.synthetic_berg import make_synthetic_model

    berg_dir, pth = make_synthetic_model(tmp_path / "model", n_components=8, seed=0)
    d = tmp_path / "videos"
    d.mkdir()
    for i in range(16):
        vf.write_test_video(d / f"v{i:02d}.mp4", n_frames=14 + i % 5, height=64, width=80, seed=i)
    vf.write_random_bytes(d / "v05b.mp4")
    out, ref = tmp_path / "out", tmp_path / "ref"

    def argv(o, workers):
        return ["encode", str(d), "--berg-dir", str(berg_dir), "--subject", "1", "--s3d-weights", str(pth),
                "--out", str(o), "--batch-size", "2", "-q", "--decode-workers", str(workers)]

    child_env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Output to files, not pipes: a stray worker would hold a pipe open and hide behind a hang.
    with open(tmp_path / "stderr", "w") as err, open(tmp_path / "stdout", "w") as std:
        with sigint_not_ignored():  # the child must see Ctrl-C even when pytest ignores it
            proc = subprocess.Popen([sys.executable, "-m", "berg_jax.cli", *argv(out, 2)], env=child_env,
                                    stdout=std, stderr=err)
    workers: set[int] = set()
    try:
        wait_for(lambda: b'"ok"' in _journal(out) or proc.poll() is not None, "a journaled row")
        workers = decode_workers_of(proc.pid)
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be interrupted")
        assert workers, "no decode worker process while encoding"
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: proc.poll() is not None, "berg-jax encode to exit after Ctrl-C")
        wait_for(lambda: all_gone(workers), "the decode workers to exit", timeout=60)
    finally:
        proc.kill()
        proc.wait()
        kill_survivors(workers)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130, f"stderr: {stderr!r}; stdout: {(tmp_path / 'stdout').read_text()!r}"
    assert "interrupted; run the same command again to resume" in stderr and "Traceback" not in stderr
    assert not (out / "manifest.csv").exists()

    # Resume with 2 workers, in this process; the reference decodes in threads.
    assert cli.main(argv(out, 2)) == 1
    assert "videos were already done (resumed)" in capsys.readouterr().out
    assert decode_workers_of(os.getpid()) == set()
    assert cli.main(argv(ref, 0)) == 1
    for name in ("responses.npy", "manifest.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows].count("failed") == 1
    assert json.loads((out / "run.json").read_text())["decode_workers"] == 2
    assert json.loads((ref / "run.json").read_text())["decode_workers"] == 0


@pytest.mark.slow
def test_encode_retries_files_whose_worker_was_killed_from_outside(videos, tmp_path, monkeypatch, capsys):
    """A file whose worker got SIGKILL or SIGTERM is read again by the next run and ends as if it
    had never failed; a file that crashed its worker (SIGSEGV) stays failed."""
    from berg_jax import pipeline
    from berg_jax.api import BERG
    from berg_jax.verify import verify_folder
    from berg_jax.synthetic_berg import make_synthetic_model

    berg_dir, pth = make_synthetic_model(tmp_path / "model", n_components=8, seed=0)
    model = BERG(berg_dir, s3d_weights=pth).get_encoding_model("fmri-bmd-s3d", subject=1, batch_size=2)
    paths = [videos[0]]
    for name, source in (("sigkill.mp4", videos[3]), ("segv.mp4", videos[6]), ("sigterm.mp4", videos[0])):
        Path(tmp_path / name).write_bytes(Path(source).read_bytes())  # good videos of one frame size
        paths.append(str(tmp_path / name))
    out, ref = tmp_path / "out", tmp_path / "ref"

    def encode(o: Path, read) -> dict:
        monkeypatch.setattr(pipeline, "read_clip", read)  # the workers import it by name
        return pipeline.encode_files(model, paths, o, decode_workers=1, show_progress=False)

    first = encode(out, crashing_read)
    assert dict(first["failed"]) == {paths[1]: worker_died_message("signal 9", paths[1]),
                                     paths[2]: worker_died_message("signal 11", paths[2]),
                                     paths[3]: worker_died_message("signal 15", paths[3])}
    assert "retried" not in first
    capsys.readouterr()

    again = encode(out, video.read_clip)  # the same command, with nothing killing the workers
    assert dict(again["failed"]) == {paths[2]: worker_died_message("signal 11", paths[2])}
    assert again["retried"]["n_rows"] == 2 and again["retried"]["rows"] == "1, 3"
    notes = [line for line in capsys.readouterr().err.splitlines() if "retrying" in line]
    assert notes == [f"berg-jax: {out}: {again['retried']['why']}"]
    assert json.loads((out / "run.json").read_text())["retried"] == again["retried"]
    assert again["n_resumed"] == 2 and again["n_this_run"] == 2

    encode(ref, segv_read)  # a run where only the file that crashes its worker failed
    for name in ("responses.npy", "manifest.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert verify_folder(out).ok, verify_folder(out).problems
    assert decode_workers_of(os.getpid()) == set()
