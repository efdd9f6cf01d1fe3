"""Feeding the device: batches in, results out, with the host's work hidden behind the device's.

    for key, result in run_batches(fn, batches, call_size, put):
        ...   # result: numpy rows of the batch `key`, padding dropped

One loop for both entry points (`BERG.encode` from memory, `pipeline.encode_files` from
files). Per batch, in order:

  1. `put` (pad to the call size, then `jax.device_put`) runs in a helper thread while the
     main thread waits for the previous result, so the host's staging copy overlaps the
     device's compute and the previous batch's copy back;
  2. `fn(device_frames, n_valid)` dispatches the jitted model (asynchronous);
  3. the result's copy to the host is started at once (`copy_to_host_async`), so it runs
     on the device's copy engine as soon as the compute ends;
  4. the previous batch's result is pulled (by then usually already on the host) and
     yielded; the caller writes it while the device works on this one.

Nothing on the host transposes or converts frames: the caller hands contiguous slices in
its own layout, and the model moves channels on the device (`fused.encode_outputs`'
`channels_first`).

Tail batches: `call_size` picks the compiled batch a group of n videos runs as. Where the
backbone runs clip by clip (XLA:CPU), the full batch is kept and `n_valid` makes S3D skip
the padding inside the one compiled program; elsewhere the group runs at the smallest of
batch, batch/2, batch/4, batch/8 that holds it (each compiled once, on first use), so a
tail of 2 costs a batch of 4, not of 32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from berg_jax.preprocess import N_FRAMES, StimulusInfo

__all__ = ["BatchFailed", "DEVICE_SAMPLING_MAX_RATIO", "TAIL_HALVINGS", "call_size", "device_frame_indices",
           "host_buffer", "pad_batch", "put", "run_batches", "sample_batch", "take_rows"]

# How many times a tail may halve the compiled batch (batch/8 at most): each size compiles
# once, so this bounds the extra programs to three.
TAIL_HALVINGS = 3

# Up to this many input frames per kept frame, a batch goes to the device whole and the 14
# frames are taken there: one transfer of T/14 the bytes beats a host gather plus a transfer.
DEVICE_SAMPLING_MAX_RATIO = 2.0

# XLA:CPU uses a host array in place (no copy) when its data is aligned to this many bytes;
# numpy's own large arrays are only 16-byte aligned, and then `device_put` copies at about
# a quarter of memcpy's speed (measured: 53 ms against 13 ms for 110 MB).
HOST_ALIGNMENT = 64


def host_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous numpy array whose data is `HOST_ALIGNMENT`-byte aligned.

    A fresh one per batch, never reused: on the CPU the device array aliases it while the
    computation runs.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % HOST_ALIGNMENT
    return raw[offset: offset + nbytes].view(dtype).reshape(shape)


def device_frame_indices(source: Any, info: StimulusInfo, platform: str) -> tuple[int, ...] | None:
    """The 14 frame indices the device takes from `sample_batch`'s batches; None when the batches already hold them.

    Args:
      source, info: from `preprocess.check_stimulus`.
      platform: the model's ("cpu", "gpu", "tpu"). On the CPU the host takes the frames
        itself, into an aligned buffer XLA then uses in place: one copy of the kept bytes,
        where a transfer would copy all T frames. Elsewhere a transfer copies anyway.
    """
    t = source.shape[1]
    if t == N_FRAMES or t / N_FRAMES > DEVICE_SAMPLING_MAX_RATIO or platform == "cpu":
        return None
    return tuple(int(i) for i in info.frame_indices)


def sample_batch(source: Any, info: StimulusInfo, lo: int, hi: int, device_sampling: bool) -> Any:
    """Videos lo..hi of `check_stimulus`' source, contiguous, in the source's layout.

    The frames are all T of them when the device samples (`device_sampling`, from
    `device_frame_indices`), else the 14 kept ones: one copy of just those bytes (numpy
    input), none at all when the slice already is what the device needs.

    Returns:
      (hi - lo, T or 14, ...) numpy (C-contiguous) for numpy source, jax.Array for jax source.
    """
    batch = source[lo:hi]
    if isinstance(batch, jax.Array):
        if batch.shape[1] != N_FRAMES and not device_sampling:
            batch = jax.numpy.take(batch, info.frame_indices, axis=1)
        return batch
    if batch.shape[1] != N_FRAMES and not device_sampling:
        out = host_buffer((batch.shape[0], N_FRAMES, *batch.shape[2:]), batch.dtype)
        # mode="clip": with out= and the default mode="raise", numpy copies through a buffer.
        return np.take(batch, info.frame_indices, axis=1, out=out, mode="clip")
    if not batch.flags.c_contiguous:
        out = host_buffer(batch.shape, batch.dtype)
        np.copyto(out, batch)
        return out
    return batch


# A host->accelerator transfer from ordinary (pageable) memory first copies the bytes into
# a staging buffer on one core (measured on an H100 host: ~4 GB/s for a 32-video batch, the
# ceiling of BERG.encode at TF32). Large batches are therefore sent in this many slices
# from as many threads, and joined on the device.
TRANSFER_THREADS = 4
TRANSFER_SLICE_MIN_BYTES = 8 << 20
_transfer_pool: ThreadPoolExecutor | None = None


def _transfer_threads() -> ThreadPoolExecutor:
    global _transfer_pool
    if _transfer_pool is None:
        _transfer_pool = ThreadPoolExecutor(max_workers=max(TRANSFER_THREADS, 1), thread_name_prefix="berg-transfer")
    return _transfer_pool


def put(frames: Any, placement: Any) -> jax.Array:
    """frames (host or device) -> on `placement` (a device or a sharding).

    On the CPU a host array is first copied into an aligned buffer when it is not aligned
    already: one memcpy, after which XLA uses it in place, instead of its slower own copy.
    On one accelerator a large host batch goes over in `TRANSFER_THREADS` slices at once.
    """
    if not isinstance(frames, np.ndarray):
        return jax.device_put(frames, placement)
    devices = getattr(placement, "device_set", None) or {placement}
    if all(d.platform == "cpu" for d in devices):
        if frames.ctypes.data % HOST_ALIGNMENT:
            aligned = host_buffer(frames.shape, frames.dtype)
            np.copyto(aligned, frames)
            frames = aligned
        return jax.device_put(frames, placement)
    slices = min(TRANSFER_THREADS, frames.shape[0], frames.nbytes // TRANSFER_SLICE_MIN_BYTES)
    if len(devices) > 1 or slices < 2:
        return jax.device_put(frames, placement)
    bounds = np.linspace(0, frames.shape[0], slices + 1).astype(int)
    parts = list(_transfer_threads().map(lambda lo_hi: jax.device_put(frames[lo_hi[0]: lo_hi[1]], placement),
                                         zip(bounds[:-1], bounds[1:])))
    return jax.numpy.concatenate(parts)


class BatchFailed(Exception):
    """The model failed on one batch (at transfer, dispatch or when its result came back).

    Attributes:
      key: the batch's key as given to `run_batches`.
      cause: the exception raised (also `__cause__`).
    """

    def __init__(self, key: Any, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.key = key
        self.cause = cause


def call_size(n: int, batch_size: int, n_devices: int = 1, skips_padding: bool = False) -> int:
    """The compiled batch size a group of `n` <= `batch_size` videos runs as.

    Args:
      n: real videos in the group (1..batch_size).
      batch_size: the model's full batch.
      n_devices: devices the batch is split over (every size is a multiple of it).
      skips_padding: the program skips padded rows itself (the clip-by-clip backbone with
        `n_valid`): the full batch is kept, one program for every tail.
    Returns:
      batch_size, or the smallest batch_size / 2**k (k <= TAIL_HALVINGS, a whole multiple
      of n_devices, at least 2) that is >= n.
    """
    if not 1 <= n <= batch_size:
        raise ValueError(f"a group of {n} videos does not fit a batch of {batch_size}")
    if skips_padding:
        return batch_size
    size = batch_size
    for k in range(1, TAIL_HALVINGS + 1):
        smaller = batch_size >> k
        # Never below 2: XLA:CPU runs a one-row matmul with its matrix-vector kernel, which
        # rounds differently from the batched one (responses would depend on the batch split).
        if smaller << k != batch_size or smaller < max(n, 2) or smaller % n_devices:
            break
        size = smaller
    return size


def pad_batch(frames: Any, size: int) -> Any:
    """Pad (n, ...) to (size, ...) by repeating the last clip (the padded rows' outputs are dropped).

    numpy stays numpy (one copy, only when padding is needed); a jax.Array is padded on its device.
    """
    n = frames.shape[0]
    if n == size:
        return frames
    if isinstance(frames, jax.Array):
        return jax.numpy.concatenate([frames, jax.numpy.repeat(frames[-1:], size - n, axis=0)])
    out = host_buffer((size, *frames.shape[1:]), frames.dtype)
    out[:n] = frames
    out[n:] = frames[-1:]
    return out


def take_rows(result: Any, n: int) -> Any:
    """The first n rows of every array of a result (an array, or a dict of them), on the host."""
    return jax.tree.map(lambda a: np.asarray(a)[:n], result)


def _copy_back_async(result: Any) -> None:
    for leaf in jax.tree.leaves(result):
        start = getattr(leaf, "copy_to_host_async", None)
        if start is not None:
            start()


def run_batches(
    fn: Callable[[Any, np.ndarray], Any],
    batches: Iterable[tuple[Any, Any]],
    size_of: Callable[[int], int],
    put: Callable[[Any], Any] = lambda x: x,
) -> Iterator[tuple[Any, Any]]:
    """Run `fn` over (key, frames) batches, one batch in flight on the device while the next is staged.

    Args:
      fn: `fn(device_frames, n_valid) -> result` (an array or a dict of arrays, rows =
        videos), dispatched asynchronously (a jitted function). n_valid is an int32 scalar.
      batches: (key, frames) with frames (n, ...) numpy or jax, n >= 1; consumed from
        the calling thread only.
      size_of: n -> the compiled batch size to pad to (`call_size`).
      put: frames padded to size_of(n) -> device array; runs in a helper thread.
    Yields:
      (key, result) in input order, result on the host with the padding dropped.
    Raises:
      BatchFailed: naming the key of the batch whose transfer, dispatch or result failed;
        the results before it have been yielded, the batches after it not consumed further.
    """
    stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="berg-put")
    it = iter(batches)

    def stage() -> tuple[Any, int, Future] | None:
        item = next(it, None)
        if item is None:
            return None
        key, frames = item
        n = int(frames.shape[0])
        return key, n, stager.submit(lambda: put(pad_batch(frames, size_of(n))))

    try:
        previous: tuple[Any, int, Any] | None = None
        nxt = stage()
        while nxt is not None:
            key, n, staged = nxt
            failure: BatchFailed | None = None
            try:
                out = fn(staged.result(), np.int32(n))
                _copy_back_async(out)
            except Exception as exc:  # noqa: BLE001 - attributed to this batch
                failure = BatchFailed(key, exc)
                failure.__cause__ = exc
            if failure is None:
                nxt = stage()  # the next transfer overlaps this batch's compute and the pull below
            if previous is not None:
                yield previous[0], _pull(previous)
                previous = None
            if failure is not None:  # after the previous batch's result is out: nothing is lost
                raise failure
            previous = (key, n, out)
        if previous is not None:
            yield previous[0], _pull(previous)
    finally:
        stager.shutdown(wait=True, cancel_futures=True)


def _pull(item: tuple[Any, int, Any]) -> Any:
    key, n, out = item
    try:
        return take_rows(out, n)
    except Exception as exc:  # noqa: BLE001 - e.g. the device ran out of memory running it
        raise BatchFailed(key, exc) from exc
