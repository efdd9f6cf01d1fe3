"""Feeding the device (`berg_jax.feed`, `BERG.encode`): layouts moved on the device, tail batches
that cost their own size, no host copies that need not be, failures attributed to their batch.

Every equality here is exact (assert_array_equal): moving the channel axis or taking the 14
frames on the device instead of the host changes where bytes go, not a single value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax import feed, fused
from berg_jax.api import BERG
from berg_jax.feed import device_frame_indices, sample_batch
from berg_jax.preprocess import check_stimulus, sample_frame_indices
from berg_jax.synthetic_berg import make_synthetic_model

MODEL = "fmri-bmd-s3d"


@pytest.fixture(scope="module")
def berg(tmp_path_factory):
    berg_dir, pth = make_synthetic_model(tmp_path_factory.mktemp("feed"), subjects=(1,), n_components=8, seed=3)
    return BERG(berg_dir, s3d_weights=pth)


def videos(n: int, t: int, h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """(n, t, 3, h, w) uint8, BERG's layout."""
    return np.random.default_rng(seed).integers(0, 256, (n, t, 3, h, w), dtype=np.uint8)


def reference(model, clips_last: np.ndarray, batch: int) -> np.ndarray:
    """The fused function on host-prepared (n, 14, H, W, 3) clips, `batch` at a time, last batch padded."""
    out = []
    for lo in range(0, len(clips_last), batch):
        x = feed.pad_batch(clips_last[lo: lo + batch], batch)
        res = fused.encode_outputs(model.dict_params(), x, precision=model.precision, conv_impl=model.conv_impl,
                                   backbone_chunk=model.backbone_chunk_for(batch))
        out.append(np.asarray(res["responses"][1])[: len(clips_last) - lo])
    return np.concatenate(out)


# -- layouts and sampling on the device ---------------------------------------------------------


@pytest.mark.parametrize("t", [14, 20, 40])
def test_both_layouts_equal_the_host_prepared_path(berg, t):
    """BERG.encode on the CPU: the host takes the 14 frames (T > 14), the device moves the channels."""
    model = berg.get_encoding_model(MODEL, subject=1, device="cpu", batch_size=4)
    v = videos(4, t, seed=t)
    idx = sample_frame_indices(t)
    expected = reference(model, np.ascontiguousarray(v[:, idx].transpose(0, 1, 3, 4, 2)), 4)
    first = berg.encode(model, v, show_progress=False)
    last = berg.encode(model, np.ascontiguousarray(v.transpose(0, 1, 3, 4, 2)), show_progress=False)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(last, expected)


@pytest.mark.parametrize("channels_first", [True, False])
def test_frames_sampled_on_the_device_equal_the_host_prepared_path(berg, channels_first):
    """What accelerators get for T <= 28: all T frames transferred, the 14 taken on the device."""
    model = berg.get_encoding_model(MODEL, subject=1, device="cpu", batch_size=4)
    v = videos(4, 20, seed=1)
    source, info = check_stimulus(v if channels_first else np.ascontiguousarray(v.transpose(0, 1, 3, 4, 2)))
    idx = device_frame_indices(source, info, "gpu")
    assert idx == tuple(sample_frame_indices(20)) and device_frame_indices(source, info, "cpu") is None
    batch = sample_batch(source, info, 0, 4, device_sampling=True)
    assert batch.shape[1] == 20 and np.shares_memory(batch, source)
    got = model.encode_fn(channels_first=channels_first, frame_indices=idx)(batch, np.int32(4))
    expected = reference(model, np.ascontiguousarray(v[:, list(idx)].transpose(0, 1, 3, 4, 2)), 4)
    np.testing.assert_array_equal(np.asarray(got["responses"][1]), expected)


def test_jax_input_stays_on_the_device(berg):
    model = berg.get_encoding_model(MODEL, subject=1, device="cpu", batch_size=4)
    v = videos(3, 20, seed=5)
    np.testing.assert_array_equal(berg.encode(model, jnp.asarray(v), show_progress=False),
                                  berg.encode(model, v, show_progress=False))


def test_batches_are_views_of_the_callers_array_when_nothing_must_be_dropped():
    v = videos(6, 14)
    source, info = check_stimulus(v)
    assert source is v  # no whole-stimulus copy, no transposed view
    batch = sample_batch(source, info, 2, 5, device_sampling=False)
    assert np.shares_memory(batch, v) and batch.flags.c_contiguous
    # T=90: one copy of just the 14 kept frames, still in the caller's layout, aligned for XLA:CPU.
    v90 = videos(2, 90, h=8, w=10)
    source, info = check_stimulus(v90)
    batch = sample_batch(source, info, 0, 2, device_sampling=device_frame_indices(source, info, "gpu") is not None)
    assert not np.shares_memory(batch, v90) and batch.ctypes.data % feed.HOST_ALIGNMENT == 0
    np.testing.assert_array_equal(batch, v90[:, sample_frame_indices(90)])


def test_cpu_transfers_use_the_host_buffer_in_place():
    """XLA:CPU aliases an aligned host array: `feed.put` aligns once instead of XLA copying slowly."""
    v = videos(4, 14)
    x = feed.put(v, jax.devices("cpu")[0])
    np.testing.assert_array_equal(np.asarray(x), v)
    aligned = feed.host_buffer(v.shape, v.dtype)
    aligned[...] = v
    assert feed.put(aligned, jax.devices("cpu")[0]).unsafe_buffer_pointer() == aligned.ctypes.data


# -- tail batches -----------------------------------------------------------------------------


@pytest.fixture
def s3d_clips(monkeypatch):
    """Counts the clips S3D really runs (at run time, not trace time): a list of per-call clip counts."""
    seen: list[int] = []
    real = fused.backbone_apply

    def counting(params, clips, precision=None, conv_impl="2d"):
        jax.debug.callback(lambda n: seen.append(int(n)), jnp.int32(clips.shape[0]))
        return real(params, clips, precision, conv_impl)

    monkeypatch.setattr(fused, "backbone_apply", counting)
    jax.clear_caches()  # programs traced before the patch would not count
    yield seen
    jax.clear_caches()  # nor should the counting programs outlive the patch


@pytest.mark.parametrize("n, expected", [(8, 8), (10, 10), (11, 11), (16, 16)])
def test_clip_by_clip_backbone_runs_only_the_real_clips(berg, s3d_clips, n, expected):
    """CPU default (batch 8, S3D one clip at a time): 10 videos run 10 clips, not 16."""
    model = berg.get_encoding_model(MODEL, subject=1, device="cpu", batch_size=8)
    assert model.backbone_chunk_for(8) == 1
    berg.encode(model, videos(n, 14, h=24, w=32), show_progress=False)
    assert sum(s3d_clips) == expected


@pytest.mark.parametrize("n, expected", [(8, 8), (9, 8 + 2), (10, 8 + 2), (11, 8 + 4), (13, 8 + 8)])
def test_whole_batch_backbone_runs_the_tail_at_a_smaller_size(berg, s3d_clips, n, expected):
    """Accelerators (S3D on the whole batch): the tail runs at batch/2, /4 or /8 (never below 2)."""
    model = berg.get_encoding_model(MODEL, subject=1, device="cpu", batch_size=8)
    model.backbone_chunk = None  # what a GPU/TPU model has
    berg.encode(model, videos(n, 14, h=24, w=32), show_progress=False)
    assert sum(s3d_clips) == expected


def test_tail_results_equal_a_full_batch_run(berg):
    """The tail's values do not depend on it being a tail (clip-by-clip backbone)."""
    model = berg.get_encoding_model(MODEL, subject=1, device="cpu", batch_size=8)
    v = videos(10, 14, h=24, w=32, seed=9)
    np.testing.assert_array_equal(berg.encode(model, v, show_progress=False)[8:],
                                  berg.encode(model, np.concatenate([v[8:]] * 4), show_progress=False)[:2])


@pytest.mark.parametrize("n, bs, devices, skips, size", [
    (32, 32, 1, False, 32), (1, 32, 1, False, 4), (5, 32, 1, False, 8), (17, 32, 1, False, 32),
    (2, 32, 1, True, 32), (3, 8, 1, False, 4), (1, 8, 1, False, 2), (2, 8, 4, False, 4), (1, 6, 1, False, 3),
    (1, 12, 3, False, 3), (5, 12, 3, False, 6),
])
def test_call_size(n, bs, devices, skips, size):
    assert feed.call_size(n, bs, devices, skips) == size
    assert size % devices == 0


# -- run_batches --------------------------------------------------------------------------------


def test_run_batches_yields_in_order_with_padding_dropped():
    calls = []

    def fn(x, n_valid):
        calls.append((x.shape[0], int(n_valid)))
        return {"y": jnp.asarray(x) * 2}

    batches = [(k, np.full((n, 3), k, np.float32)) for k, n in enumerate([4, 4, 1, 3])]
    got = list(feed.run_batches(fn, batches, lambda n: 4, jnp.asarray))
    assert [k for k, _ in got] == [0, 1, 2, 3]
    assert [r["y"].shape for _, r in got] == [(4, 3), (4, 3), (1, 3), (3, 3)]
    np.testing.assert_array_equal(got[2][1]["y"], np.full((1, 3), 4.0))
    assert calls == [(4, 4), (4, 4), (4, 1), (4, 3)]


@pytest.mark.parametrize("stage", ["put", "dispatch", "pull"])
def test_a_failure_names_its_batch_after_the_batches_before_it(stage):
    class Poisoned:
        def __array__(self, *a, **k):
            raise RuntimeError("pull failed")

    def put(x):
        if stage == "put" and x[0, 0] == 2:
            raise RuntimeError("put failed")
        return jnp.asarray(x)

    def fn(x, n_valid):
        if x[0, 0] == 2:
            if stage == "dispatch":
                raise RuntimeError("dispatch failed")
            if stage == "pull":
                return Poisoned()
        return x + 1

    batches = [(k, np.full((2, 2), k, np.float32)) for k in range(4)]
    done = []
    with pytest.raises(feed.BatchFailed) as info:
        for k, _ in feed.run_batches(fn, batches, lambda n: 2, put):
            done.append(k)
    assert info.value.key == 2 and f"{stage} failed" in str(info.value.cause)
    assert done == [0, 1]
