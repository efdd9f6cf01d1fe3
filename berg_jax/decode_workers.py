"""Video decoding in worker processes: `prefetch_clips` with processes instead of threads.

`video.prefetch_clips` decodes in threads; decord and PyAV release the GIL, but not
everywhere (demuxing, colour conversion, Python glue), so threads stop scaling on a large
host (measured on 16 cores: 1 thread 13.7 videos/s, 16 threads 217, 16 processes 273).
This module runs `video.read_clip` (or any importable reader) in worker processes and
has exactly the same contract: batches `(indices, clips, errors)` in input order, `skip=`
for resume, about (queue_size + 1) * batch_size clips in memory, closing cancels.

How it works, and why:

* Workers are fresh interpreters (`subprocess.Popen` of `sys.executable`), not forks:
  the parent has JAX loaded and JAX is not fork-safe. Not `multiprocessing`'s spawn
  either, which re-imports the parent's `__main__` (berg_jax.cli, hence JAX) in every
  child. A worker imports only this module, numpy and the reader's module, and loads
  `berg_jax`'s submodules without running `berg_jax/__init__.py` (which loads JAX for
  the public API); see `_BOOT`.
* Each worker is driven by one parent thread: the thread sends a path over a Unix
  socket, the worker decodes it into its shared-memory slot and answers
  `("ok", shape, dtype)` or `("error", message)`; the thread copies the clip out of the
  slot (the one copy) and sends the next path. Frames are never pickled.
* A slot is an anonymous shared memory file (`os.memfd_create` on Linux, an unlinked
  temporary file elsewhere) that the worker creates and hands to the parent as a file
  descriptor (SCM_RIGHTS) whenever it needs a bigger one. It has no name, so nothing can
  be left behind in /dev/shm whoever dies, and it is not bounded by /dev/shm's size
  (64 MB by default in Docker).
* A worker that dies while reading a file (a segfault in the decoder, os._exit, a
  SIGKILL from outside) is seen at once: its socket reaches end-of-file, and its exit
  status is then collected (no timeouts). The file is recorded as failed ("decode
  worker died (signal 9) while reading PATH", `worker_died_message`), a new worker is
  started, the run goes on. `died_externally` tells which of those failures were not the
  file's fault, so that the next run of the same job tries those files again.
* No orphans: workers run in their own session, so Ctrl-C reaches only the parent,
  which kills and reaps them when the generator closes (exhaustion, close(), an
  exception or KeyboardInterrupt in the consumer). If the parent itself dies (kill -9),
  Linux kills the workers (PR_SET_PDEATHSIG); elsewhere an idle worker exits on the
  socket's end-of-file, a busy one when its answer cannot be sent.

Unix only (file descriptor passing); on other systems use `video.prefetch_clips`.
"""

from __future__ import annotations

import importlib
import mmap
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from berg_jax.errors import BERGError, InvalidParameterError, VideoReadError
from berg_jax.video import batches_in_order, input_batches

__all__ = [
    "DecodeWorkerError",
    "EXTERNAL_SIGNALS",
    "RESERVED_CORES",
    "default_decode_workers",
    "died_externally",
    "prefetch_clips",
    "worker_died_message",
]

# Cores left to the process feeding the device (its Python thread, the runtime's threads).
RESERVED_CORES = 2

# The reader the pipeline uses, by name: the parent never needs to import it for this.
DEFAULT_READ = "berg_jax.video:read_clip"


# Signals that end a worker from outside, whatever file it is reading: SIGKILL (the
# out-of-memory killer, `kill -9`, a job scheduler) and SIGTERM (`kill`, a shutdown). A
# worker ended by one of these failed its file through no fault of the file's, so a later
# run reads it again. SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL and exit codes come from the
# decoder crashing on that file: reading it again would crash again, on every run, so those
# failures stay recorded. (An OOM kill can be the file's doing -- a huge frame size -- but
# then it costs one worker per run, never the run itself.)
EXTERNAL_SIGNALS = frozenset({int(signal.SIGKILL), int(signal.SIGTERM)})

# The failure text of a file whose worker died, as `worker_died_message` builds it.
_WORKER_DIED = re.compile(r"decode worker died \((?:signal (?P<signal>\d+)|exit code -?\d+)\) "
                          r"(?P<when>while|before) reading .+", re.DOTALL)


class DecodeWorkerError(BERGError):
    """A decode worker process could not start (the reader does not import there, ...)."""


def worker_died_message(how: str, path: str, while_reading: bool = True) -> str:
    """The failure recorded for `path` when its worker process ended.

    Args:
      how: how it ended, "signal N" or "exit code N".
      path: the file it was given.
      while_reading: True when it died with the file in hand; False when it was already
        gone before it got the path (twice in a row: the file was never read).
    Returns:
      "decode worker died (signal 9) while reading PATH" (or "... before reading PATH").
    """
    return f"decode worker died ({how}) {'while' if while_reading else 'before'} reading {path}"


def died_externally(error: str) -> bool:
    """Whether a recorded failure is a decode worker ended from outside, not by its file.

    True for `worker_died_message` texts of a worker killed by one of `EXTERNAL_SIGNALS`
    while reading, and of a worker that was gone before it got the path (however it
    ended: the file was never read). False for every other text: a decoder crash on the
    file (SIGSEGV, SIGABRT, ..., an exit code), the reader's own reasons, encoding errors.
    """
    found = _WORKER_DIED.fullmatch(error)
    if found is None:
        return False
    if found["when"] == "before":
        return True
    return found["signal"] is not None and int(found["signal"]) in EXTERNAL_SIGNALS


def default_decode_workers() -> int:
    """Decode worker processes for this host: its usable cores less `RESERVED_CORES`, at least 1.

    Usable cores are the process's CPU affinity (a Slurm or container CPU set), not the
    machine's core count.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        cores = os.cpu_count() or 1
    return max(1, cores - RESERVED_CORES)


# --------------------------------------------------------------------------- messages
#
# A message is a 4-byte big-endian length and a pickle of a small tuple (paths, shapes,
# error text; never frames). File descriptors ride along as SCM_RIGHTS ancillary data.

_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    message = _HEADER.pack(len(data)) + data
    if not fds:
        sock.sendall(message)
        return
    sent = socket.send_fds(sock, [message], fds)
    if sent < len(message):
        sock.sendall(message[sent:])


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    """n bytes (None at end-of-file); descriptors that arrive on the way are appended to fds."""
    buf = bytearray()
    while len(buf) < n:
        # recv_fds even where no descriptor is expected: a plain recv would drop one.
        data, got, _, _ = socket.recv_fds(sock, n - len(buf), 4)
        fds += got
        if not data:
            return None
        buf += data
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """(message, descriptors received with it), or None when the other side is gone."""
    fds: list[int] = []
    header = _recv_exact(sock, _HEADER.size, fds)
    payload = None if header is None else _recv_exact(sock, _HEADER.unpack(header)[0], fds)
    if payload is None:
        for fd in fds:
            os.close(fd)
        return None
    return pickle.loads(payload), fds


# --------------------------------------------------------------------------- the worker process

# What a worker runs (`python -P -c _BOOT INIT FD PARENT_PID`). It registers the
# `berg_jax` package from its __init__.py's path without executing that file, so that
# `berg_jax.decode_workers`, `berg_jax.errors` and `berg_jax.video` load on their own;
# the rest of the package stays unloaded unless the reader asks for it
# (`_package_getattr`). -P: no current directory on sys.path (the parent's path is set
# from the first message).
_BOOT = """\
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location(
    "berg_jax", sys.argv[1], submodule_search_locations=[os.path.dirname(sys.argv[1])])
sys.modules["berg_jax"] = importlib.util.module_from_spec(spec)
from berg_jax.decode_workers import worker_main
sys.exit(worker_main(int(sys.argv[2]), int(sys.argv[3])))
"""


def _package_getattr(name: str) -> Any:
    """`berg_jax.<name>` inside a worker: a submodule is imported alone; any other name
    (a reader using `berg_jax.BERG`, say) runs the real __init__.py once, then resolves."""
    if name.startswith("__"):  # probes for optional dunders (pickle, inspect) need no model code
        raise AttributeError(f"module 'berg_jax' has no attribute {name!r}")
    package = sys.modules["berg_jax"]
    base = os.path.join(package.__path__[0], name)
    if os.path.isfile(base + ".py") or os.path.isdir(base):
        return importlib.import_module(f"berg_jax.{name}")
    del package.__getattr__
    package.__spec__.loader.exec_module(package)
    return getattr(package, name)


def _resolve(name: str) -> Callable[..., Any]:
    """"module:qualname" -> the object."""
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the parent dies, even in the middle of a decode.

    Linux only (PR_SET_PDEATHSIG). It fires when the parent *thread* that started this
    process ends; the parent starts workers from the pool threads that drive them,
    which live exactly as long as their workers should.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


def _anonymous_memory(size: int) -> int:
    """A file descriptor of `size` bytes of shared memory with no name anywhere."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("berg-decode-slot", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as f:  # unlinked at creation on POSIX
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


def _read_one(read: Callable[..., Any], path: str, kwargs: dict[str, Any]) -> np.ndarray | str:
    """The clip, or the failure as a message naming the path (as `video.prefetch_clips` words it)."""
    try:
        clip = read(path, **kwargs)
    except VideoReadError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
        return f"{path}: {type(exc).__name__}: {exc}"
    if not isinstance(clip, np.ndarray) or clip.dtype.hasobject:
        what = f"an array of {clip.dtype}" if isinstance(clip, np.ndarray) else type(clip).__name__
        return f"{path}: the read function returned {what}, not a numpy array of numbers"
    return np.ascontiguousarray(clip)


def worker_main(sock_fd: int, parent_pid: int) -> int:
    """A decode worker's life: configuration, then one path in, one answer out, until end-of-file.

    Messages in: {"read": "module:qualname", "kwargs": {...}, "sys_path": [...]} once,
    then paths (str). Out: ("ready",) or ("fatal", message) once, then per path
    ("ok", shape, dtype) with the clip in the slot (and the slot's descriptor attached
    when it is a new one) or ("error", message).
    Returns the exit status.
    """
    _exit_with_parent(parent_pid)
    # Ctrl-C is the parent's to handle (it then stops the workers); workers also run in
    # their own session, so this only matters for a signal sent to them by pid.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    package = sys.modules.get("berg_jax")
    if package is not None and not hasattr(package, "__version__"):  # the bare package of _BOOT
        package.__getattr__ = _package_getattr
    # Not inherited by anything the reader may start: the socket's end-of-file must mean
    # that this process is gone.
    os.set_inheritable(sock_fd, False)
    sock = socket.socket(fileno=sock_fd)
    try:
        got = _recv(sock)
        if got is None:
            return 0
        config = got[0]
        sys.path[:] = config["sys_path"]
        try:
            read = _resolve(config["read"])
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            _send(sock, ("fatal", f"cannot import the read function {config['read']}: {type(exc).__name__}: {exc}"))
            return 1
        kwargs = config["kwargs"]
        _send(sock, ("ready",))
        slot: mmap.mmap | None = None
        while (got := _recv(sock)) is not None:
            path = got[0]
            clip = _read_one(read, path, kwargs)
            if isinstance(clip, str):
                _send(sock, ("error", clip))
                continue
            fds = []
            if slot is None or clip.nbytes > len(slot):
                # Grow only: one slot per worker, as big as its largest clip so far.
                size = -(-max(clip.nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
                fd = _anonymous_memory(size)
                if slot is not None:
                    slot.close()
                slot = mmap.mmap(fd, size)
                fds = [fd]
            view = np.frombuffer(slot, dtype=clip.dtype, count=clip.size).reshape(clip.shape)
            view[...] = clip
            del view  # a live view would keep the slot from closing
            _send(sock, ("ok", clip.shape, clip.dtype.str), fds)
            for fd in fds:
                os.close(fd)  # the parent holds its own copy now; the map stays
        return 0
    except (BrokenPipeError, ConnectionResetError):  # the parent is gone: nothing left to do
        return 0


# --------------------------------------------------------------------------- the parent's side


class _Died(Exception):
    """The worker process ended; str() says how ("signal 9", "exit code 3")."""


class _NotSent(_Died):
    """The worker was already gone before it got the path (not the file's fault)."""


def _exit_reason(returncode: int) -> str:
    return f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"


class _Worker:
    """One worker process, the socket to it, and the parent's map of its current slot."""

    def __init__(self, config: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _BOOT, _PACKAGE_INIT, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,  # keep stdout for results
                start_new_session=True,  # Ctrl-C in a terminal reaches the parent only
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.slot: mmap.mmap | None = None
        self.config = config

    def died(self, cls: type[_Died] = _Died) -> _Died:
        """The exception for a worker whose socket closed: waits for its exit status."""
        return cls(_exit_reason(self.proc.wait()))

    def handshake(self) -> None:
        """Send the configuration and wait until the worker has imported the reader."""
        try:
            _send(self.sock, self.config)
        except OSError:
            raise self.died() from None
        got = _recv(self.sock)
        if got is None:
            raise self.died()
        if got[0][0] == "fatal":
            raise DecodeWorkerError(f"a video decoding worker process could not start: {got[0][1]}; "
                                    "check that the reader imports in a fresh Python process, or "
                                    "decode with threads (decode_workers=0, --decode-workers 0)")

    def decode(self, path: str) -> np.ndarray | str:
        """Have the worker read `path`; the clip (a private copy) or the failure message."""
        try:
            _send(self.sock, path)
        except OSError:
            raise self.died(_NotSent) from None
        got = _recv(self.sock)
        if got is None:
            raise self.died()
        message, fds = got
        if fds:  # a bigger slot: map it, drop the old one
            size = os.fstat(fds[0]).st_size
            if self.slot is not None:
                self.slot.close()
            self.slot = mmap.mmap(fds[0], size)
            for fd in fds:
                os.close(fd)
        if message[0] == "error":
            return message[1]
        _, shape, dtype = message
        n = int(np.prod(shape, dtype=np.int64))
        view = np.frombuffer(self.slot, dtype=np.dtype(dtype), count=n)
        clip = view.reshape(shape).copy()
        del view
        return clip

    def kill(self) -> None:
        self.proc.kill()  # a no-op once it has been reaped

    def dispose(self) -> None:
        """Kill, reap, and release the socket and the slot."""
        self.proc.kill()
        self.proc.wait()
        self.sock.close()
        if self.slot is not None:
            self.slot.close()
            self.slot = None


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capture objects
        return False
    return True


_PACKAGE_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")
_CANCELLED = object()  # what a decode returns once the pool is stopping


class _WorkerPool:
    """Worker processes, one per thread of the thread pool that drives them.

    `decode(path)` runs in those threads. A worker starts on its thread's first path; a
    worker that dies is reaped and replaced on the thread's next path.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.local = threading.local()
        self.workers: list[_Worker] = []
        self.stopping = False

    def _worker(self) -> _Worker | None:
        worker = getattr(self.local, "worker", None)
        if worker is not None:
            return worker
        with self.lock:  # so that `stop` kills every worker that will ever have started
            if self.stopping:
                return None
            worker = _Worker(self.config)
            self.workers.append(worker)
        try:
            worker.handshake()
        except _Died as died:
            self._retire(worker)
            if self.stopping:
                return None
            raise DecodeWorkerError(
                f"a video decoding worker process exited ({died}) before it was ready (its error "
                "output, if any, is above); decode with threads instead: decode_workers=0 "
                "(--decode-workers 0)") from None
        except BaseException:
            self._retire(worker)
            raise
        self.local.worker = worker
        return worker

    def _retire(self, worker: _Worker) -> None:
        if getattr(self.local, "worker", None) is worker:
            self.local.worker = None
        with self.lock:
            if worker in self.workers:
                self.workers.remove(worker)
        worker.dispose()

    def decode(self, path: str, attempt: int = 1) -> Any:
        """The clip, the failure message, or `_CANCELLED`."""
        worker = self._worker()
        if worker is None:
            return _CANCELLED
        try:
            return worker.decode(path)
        except _NotSent as died:
            # Gone while idle (killed from outside), not the file's doing: a new worker reads it.
            self._retire(worker)
            if attempt == 1:
                return self.decode(path, attempt=2)
            return worker_died_message(str(died), path, while_reading=False)
        except _Died as died:
            self._retire(worker)
            if self.stopping:
                return _CANCELLED
            return worker_died_message(str(died), path)

    def stop(self) -> None:
        """Kill every worker now: decodes in progress end at once (their results are not wanted)."""
        with self.lock:
            self.stopping = True
            workers = list(self.workers)
        for worker in workers:
            worker.kill()

    def close(self) -> None:
        """Reap what `stop` killed; call once no thread uses the pool any more."""
        with self.lock:
            workers, self.workers = self.workers, []
        for worker in workers:
            worker.dispose()


def _read_function_name(read: Callable[..., Any]) -> str:
    """"module:qualname" of `read`, checked to load back as the same object."""
    module = getattr(read, "__module__", None)
    qualname = getattr(read, "__qualname__", None)
    found = None
    if module and qualname and module != "__main__" and "<" not in qualname:
        try:
            found = _resolve(f"{module}:{qualname}")
        except (ImportError, AttributeError):
            pass
    if found is not read:
        raise InvalidParameterError(
            f"read={read!r} cannot be loaded by a decode worker process: it must be a function defined "
            "at the top level of an importable module (not a lambda, a nested function, a "
            "functools.partial or a function of the __main__ script); pass its settings as keyword "
            "arguments, or decode with threads (decode_workers=0)")
    return f"{module}:{qualname}"


def prefetch_clips(
    paths: list[str],
    batch_size: int,
    read: Callable[..., np.ndarray] | None = None,
    num_workers: int | None = None,
    queue_size: int = 2,
    skip: set[int] | frozenset[int] | None = None,
    **read_kwargs: Any,
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
    """Decode `paths` in worker processes, yielding batches in input order.

    The contract of `video.prefetch_clips` (see there), with processes for threads.

    Args:
      paths: video paths (e.g. from `video.list_videos`).
      batch_size: files attempted per batch (the last batch may be smaller).
      read: `read(path, **read_kwargs) -> array`, default `video.read_clip` (uint8
        (14, H, W, 3)); it runs in the workers, so it must be a top-level function of an
        importable module (the workers import it by name).
      num_workers: worker processes, default `default_decode_workers()`.
      queue_size: batches decoded ahead of the consumer (>= 0).
      skip: indices into `paths` not to decode (resume); they appear in no batch.
      **read_kwargs: passed to `read` (n_frames, pad_short, backend); must pickle.
    Yields:
      (indices, clips, errors):
        indices: list[int], positions in `paths` of the clips, ascending;
        clips: list of uint8 (14, H, W, 3) arrays (whatever `read` returns), aligned
          with `indices`, each the consumer's own copy (not shared memory);
        errors: {index: message} for files of this batch that failed; the message names
          the path and the reason, "decode worker died (signal 11) while reading PATH"
          when the worker crashed on it.
    Raises (on the first next()):
      DecodeWorkerError: a worker could not start (e.g. the reader does not import).
    Closing the generator early (break, exception, KeyboardInterrupt, `close()`) kills
    and reaps the workers and drops the queued decodes before returning.
    """
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = default_decode_workers()
    if num_workers < 1:
        raise InvalidParameterError(f"num_workers must be >= 1, got {num_workers}")
    if queue_size < 0:
        raise InvalidParameterError(f"queue_size must be >= 0, got {queue_size}")
    if not hasattr(socket, "send_fds"):
        raise InvalidParameterError("decode worker processes need a Unix system; decode with threads "
                                    "(decode_workers=0, --decode-workers 0)")
    try:
        pickle.dumps(read_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise InvalidParameterError(f"the read function's keyword arguments must pickle to reach the "
                                    f"decode workers: {type(exc).__name__}: {exc}") from None
    config = {"read": DEFAULT_READ if read is None else _read_function_name(read),
              "kwargs": read_kwargs, "sys_path": list(sys.path)}
    return _prefetch(paths, input_batches(len(paths), batch_size, skip), config, num_workers, queue_size)


def _prefetch(
    paths: list[str],
    batches: Iterator[list[int]],
    config: dict[str, Any],
    num_workers: int,
    queue_size: int,
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
    # A separate generator so that argument errors raise at the call, not at first next().
    pool = _WorkerPool(config)
    threads = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="berg-decode-worker")
    try:
        yield from batches_in_order(paths, batches, lambda path: threads.submit(pool.decode, path), queue_size)
    finally:
        # Exhaustion, close(), a thrown exception, garbage collection: kill the workers
        # first so that the decodes in progress return at once, then drop the queued
        # ones, wait for the threads, and reap.
        pool.stop()
        threads.shutdown(wait=True, cancel_futures=True)
        pool.close()
