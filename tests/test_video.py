"""berg_jax.video: frame sampling, backend agreement, bad inputs, folder listing, prefetching."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

av = pytest.importorskip("av")  # the fixtures are written with PyAV

from berg_jax import video  # noqa: E402
from berg_jax.errors import InvalidParameterError, VideoReadError  # noqa: E402
from berg_jax.preprocess import sample_frame_indices  # noqa: E402
from berg_jax.video import list_videos, prefetch_clips, read_clip  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402

@pytest.fixture(params=["decord", "pyav"])
def backend(request):
    if request.param not in video.available_backends():
        pytest.skip(f"{request.param} not installed")
    return request.param


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    """Every test video, written once per module: {name: path}."""
    d = tmp_path_factory.mktemp("videos")
    return {
        "h264": vf.write_test_video(d / "h264.mp4", n_frames=23),
        "short": vf.write_short(d / "short.mp4", n_frames=9),
        "zero": vf.write_zero_length(d / "zero.mp4"),
        "random": vf.write_random_bytes(d / "random.mp4"),
        "truncated": vf.write_truncated(d / "truncated.mp4"),
        "audio": vf.write_audio_only(d / "audio.mkv"),
        "unknown_codec": vf.write_unknown_codec(d / "unknown.avi"),
        "gray": vf.write_gray(d / "gray.mkv"),
        "gray_alpha": vf.write_gray(d / "ya8.mov", codec="png", pix_fmt="ya8"),
        "rgba": vf.write_alpha(d / "rgba.mov"),
        "argb": vf.write_alpha(d / "argb.mov", codec="qtrle", pix_fmt="argb"),
        "yuva": vf.write_alpha(d / "yuva.mkv", codec="ffv1", pix_fmt="yuva420p"),
        "corrupt_tail": vf.write_corrupt_tail(d / "corrupt_tail.mp4", n_frames=20, n_bad=4),
        "open_gop": vf.write_open_gop(d / "open_gop.mp4", n_frames=20),
        "dir": str(d),
        "missing": str(d / "missing.mp4"),
    }


def levels(clip: np.ndarray) -> list[int]:
    return [vf.frame_level(f) for f in clip]


def expected_levels(n_total: int) -> list[int]:
    return [int(k) % vf.PERIOD for k in sample_frame_indices(n_total)]


# --- good files ---------------------------------------------------------------------


def test_sampled_frames_are_the_linspace_indices(vids, backend):
    clip = read_clip(vids["h264"], backend=backend)
    assert clip.shape == (14, 48, 64, 3) and clip.dtype == np.uint8 and clip.flags.c_contiguous
    assert levels(clip) == expected_levels(23)  # [0, 1, 3, 5, 6, 8, 10, 11, 13, 15, 16, 18, 20, 22]


def test_auto_prefers_decord(vids):
    assert video.available_backends()[0] == "decord" or "decord" not in video.available_backends()
    np.testing.assert_array_equal(read_clip(vids["h264"]), read_clip(vids["h264"], backend="pyav"))


AGREE_CASES = {
    # name: (suffix, write_test_video kwargs)
    "h264-yuv420p-mp4": (".mp4", {}),
    "h264-bframes-mp4": (".mp4", {"options": {"crf": "0", "preset": "medium"}}),  # closed GOP
    "h264-lossy-mkv": (".mkv", {"options": {"crf": "23", "preset": "fast"}}),  # mkv: no frame count
    "mpeg4-avi": (".avi", {"codec": "mpeg4"}),
    "ffv1-yuv444p-mkv": (".mkv", {"codec": "ffv1", "pix_fmt": "yuv444p"}),
    "mjpeg-avi": (".avi", {"codec": "mjpeg", "pix_fmt": "yuvj420p"}),
    "png-rgb24-mov": (".mov", {"codec": "png", "pix_fmt": "rgb24"}),
    "gif": (".gif", {"codec": "gif", "pix_fmt": "rgb8"}),  # decord cannot open: PyAV reads it
}


@pytest.mark.parametrize("case", list(AGREE_CASES))
def test_decord_and_pyav_agree(tmp_path, case):
    if "decord" not in video.available_backends():
        pytest.skip("decord not installed")
    suffix, kwargs = AGREE_CASES[case]
    path = vf.write_test_video(tmp_path / f"v{suffix}", n_frames=20, **kwargs)
    a = read_clip(path, backend="decord").astype(np.int16)
    b = read_clip(path, backend="pyav").astype(np.int16)
    # Measured bit-exact for every case here (decord 0.6.0 vs PyAV 18); a colour-conversion
    # rounding change between their FFmpeg builds may cost 1-2 levels, a wrong frame far more.
    assert np.abs(a - b).max() <= 2
    assert levels(a) == expected_levels(20)


def test_lossless_codec_returns_source_frames(tmp_path, backend):
    path = vf.write_test_video(tmp_path / "rgb.mkv", n_frames=20, codec="ffv1", pix_fmt="bgr0", seed=3)
    want = np.stack([vf.frame_rgb(int(k), seed=3) for k in sample_frame_indices(20)])
    np.testing.assert_array_equal(read_clip(path, backend=backend), want)


def test_pad_short_repeats_the_last_frame(vids, backend):
    clip = read_clip(vids["short"], pad_short=True, backend=backend)
    assert clip.shape == (14, 48, 64, 3)
    assert levels(clip) == list(range(9)) + [8] * 5
    np.testing.assert_array_equal(clip[9:], np.broadcast_to(clip[8], (5, 48, 64, 3)))


def test_pad_short_leaves_long_videos_alone(vids, backend):
    np.testing.assert_array_equal(
        read_clip(vids["h264"], pad_short=True, backend=backend),
        read_clip(vids["h264"], backend=backend),
    )


def test_undecodable_tail_uses_the_frames_that_decode(vids, backend):
    # The container reports 20 frames; the last 4 packets are garbage. decord's get_batch
    # fails on the late indices and PyAV's count of 16 real frames decides the sample.
    with pytest.warns(RuntimeWarning) as record:
        clip = read_clip(vids["corrupt_tail"], backend=backend)
    assert levels(clip) == expected_levels(16)
    messages = [str(w.message) for w in record]
    assert messages[-1].endswith("4 packets failed to decode; using the 16 frames that decoded")
    if backend == "decord":
        assert "decord failed" in messages[0] and "decoding sequentially with PyAV" in messages[0]


def test_open_gop_frames_are_right(vids, backend):
    assert levels(read_clip(vids["open_gop"], backend=backend)) == expected_levels(20)


def test_decord_get_batch_quirk_on_open_gop(vids):
    """Documents why the keyframe-order scan exists: decord's seeks miss on this file."""
    decord = pytest.importorskip("decord")
    assert video._probe(vids["open_gop"], scan=True).keyframes_reordered
    assert not video._probe(vids["h264"], scan=True).keyframes_reordered
    vr = decord.VideoReader(vids["open_gop"], ctx=decord.cpu(0), num_threads=1)
    raw = levels(vr.get_batch(sample_frame_indices(len(vr))).asnumpy())
    if raw == expected_levels(20):
        pytest.skip("this decord build seeks correctly on open GOPs")
    assert raw != expected_levels(20)  # decord 0.6.0: [0, 1, 2, 6, 7, 9, ...]


# --- bad files ----------------------------------------------------------------------

BAD_CASES = {
    "missing": "no such file",
    "dir": "is a directory",
    "zero": r"file is empty \(0 bytes\)",
    "random": "not a readable video container",
    "truncated": "not a readable video container",
    "audio": r"no video stream \(streams found: audio\)",
    "unknown_codec": "unsupported video codec",
    "gray": r"grey-scale stream \(pix_fmt gray, 1 channel\); S3D needs 3-channel RGB colour video",
    "gray_alpha": r"grey-scale stream with an alpha channel \(pix_fmt ya8, 2 channels\)",
    "rgba": r"colour stream with an alpha channel \(pix_fmt rgba, 4 channels\); S3D needs 3-channel RGB",
    "argb": r"alpha channel \(pix_fmt argb, 4 channels\)",
    "yuva": r"alpha channel \(pix_fmt yuva420p, 4 channels\)",
    "short": "has 9 frames, S3D needs at least 14; pass --pad-short to repeat the last frame",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_video_read_error(vids, backend, case):
    path = vids[case]
    with pytest.raises(VideoReadError, match=BAD_CASES[case]) as info:
        read_clip(path, backend=backend)
    assert str(info.value).startswith(f"{path}: ")


def test_unknown_backend(vids):
    with pytest.raises(InvalidParameterError, match="unknown video backend 'opencv'"):
        read_clip(vids["h264"], backend="opencv")


def test_decord_alone_without_pyav(vids, monkeypatch):
    """Where PyAV is missing: decord reads good files; bad ones still raise VideoReadError."""
    if "decord" not in video.available_backends():
        pytest.skip("decord not installed")
    want = read_clip(vids["h264"], backend="decord")
    monkeypatch.setattr(video, "_av", None)
    assert video.available_backends() == ["decord"]
    np.testing.assert_array_equal(read_clip(vids["h264"]), want)
    for case, reason in [("random", "decord could not open it"), ("audio", "no decodable video stream"),
                         ("unknown_codec", "no decodable video stream"), ("short", "has 9 frames"),
                         ("missing", "no such file"),
                         ("corrupt_tail", "decord reports 20 frames but failed decoding them")]:
        with pytest.raises(VideoReadError, match=reason):
            read_clip(vids[case])


def test_pyav_alone_without_decord(vids, monkeypatch):
    want = read_clip(vids["h264"], backend="pyav")
    monkeypatch.setattr(video, "_decord", None)
    assert video.available_backends() == ["pyav"]
    np.testing.assert_array_equal(read_clip(vids["h264"]), want)
    with pytest.raises(InvalidParameterError, match="'decord' is not installed"):
        read_clip(vids["h264"], backend="decord")


# --- list_videos --------------------------------------------------------------------


def test_list_videos_expands_folders_and_keeps_files(tmp_path):
    for rel in ["b.mp4", "a.AVI", "notes.txt", "sub/c.mkv", "sub/deeper/d.webm", "a_sub/e.gif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    root = str(tmp_path)
    single = str(tmp_path / "notes.txt")
    missing = str(tmp_path / "gone.mp4")
    got = list_videos([single, tmp_path, missing, single])  # os.PathLike accepted
    found = ["a.AVI", "a_sub/e.gif", "b.mp4", "sub/c.mkv", "sub/deeper/d.webm"]
    found = [os.path.join(root, p) for p in found]
    assert got == [single, *found, missing, single]


# --- prefetch_clips -----------------------------------------------------------------


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("berg-video")]


def fake_read(path: str, **kwargs) -> np.ndarray:
    """Decode stand-in: clip filled with the path's number; slow and out of order on purpose."""
    k = int(path)
    time.sleep(0.002 * ((k * 7) % 5))  # later files often finish first
    if k % 5 == 3:
        raise VideoReadError(f"{path}: bad on purpose")
    if k == 7:
        raise ValueError("unexpected")
    return np.full((14, 2, 2, 3), k, np.uint8)


def test_prefetch_order_and_error_isolation():
    paths = [str(k) for k in range(12)]
    batches = list(prefetch_clips(paths, batch_size=5, read=fake_read, num_threads=3, queue_size=1))
    assert [sorted([*b[0], *b[2]]) for b in batches] == [list(range(5)), list(range(5, 10)), [10, 11]]
    indices = [i for b in batches for i in b[0]]
    assert indices == [0, 1, 2, 4, 5, 6, 9, 10, 11]
    assert all(int(c[0, 0, 0, 0]) == i for b in batches for i, c in zip(b[0], b[1]))
    errors = {i: m for b in batches for i, m in b[2].items()}
    assert errors == {3: "3: bad on purpose", 8: "8: bad on purpose", 7: "7: ValueError: unexpected"}
    assert not worker_threads()


def test_prefetch_skip_and_kwargs():
    seen = []

    def read(path, **kwargs):
        seen.append((path, kwargs))
        return np.zeros((14, 1, 1, 3), np.uint8)

    batches = list(prefetch_clips(["a", "b", "c", "d"], 2, read=read, skip={0, 2}, pad_short=True))
    assert [(b[0], b[2]) for b in batches] == [([1, 3], {})]
    assert sorted(seen) == [("b", {"pad_short": True}), ("d", {"pad_short": True})]


DEADLINE_S = 60.0  # for polls: generous on a loaded 2-core machine; a pass takes milliseconds


def wait_until(condition, what: str, timeout: float = DEADLINE_S) -> None:
    """Poll `condition()` until true; fail after `timeout` s (a hang, not a slow machine)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def submitted(monkeypatch) -> list:
    """The futures prefetch_clips submits to its decode pool, in order."""
    futures: list = []

    class CountingPool(video.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            futures.append(future)
            return future

    monkeypatch.setattr(video, "ThreadPoolExecutor", CountingPool)
    return futures


def test_prefetch_runs_ahead_but_bounded(submitted):
    started = []

    def read(path, **kwargs):
        started.append(path)
        return np.zeros((14, 1, 1, 3), np.uint8)

    paths = [str(k) for k in range(40)]
    gen = prefetch_clips(paths, batch_size=2, read=read, num_threads=2, queue_size=1)
    try:
        next(gen)
        # While the consumer "computes" (the generator is suspended: nothing more is submitted):
        # the yielded batch, the one queued ahead, and the one submitted when it was yielded.
        assert len(submitted) == 6
        # ... and the workers decode them meanwhile, not on the next call.
        wait_until(lambda: all(f.done() for f in submitted), "the 6 submitted decodes")
        assert sorted(started, key=int) == [str(k) for k in range(6)]
    finally:
        gen.close()


@pytest.mark.parametrize("how", ["close", "break", "exception", "keyboard_interrupt"])
def test_prefetch_stops_threads_when_consumer_stops(how, submitted):
    """When the consumer stops after the first batch, the queued decodes are cancelled, not run.

    Reads past the first batch block until a decode has been cancelled, and the consumer
    stops once two of them (num_threads) run, so the rest are queued whatever the timing.
    """
    started = []
    gate = threading.Event()

    def gated_read(path, **kwargs):
        started.append(path)
        if int(path) >= 2:
            gate.wait(DEADLINE_S)
        return np.zeros((14, 1, 1, 3), np.uint8)

    def open_gate_on_cancel():
        try:
            wait_until(lambda: any(f.cancelled() for f in list(submitted)), "a cancelled decode")
        finally:
            gate.set()

    opener = threading.Thread(target=open_gate_on_cancel, daemon=True)
    opener.start()
    paths = [str(k) for k in range(50)]

    def start():
        return prefetch_clips(paths, batch_size=2, read=gated_read, num_threads=2, queue_size=2)

    def both_workers_blocked():
        wait_until(lambda: len(started) == 4, "reads 2 and 3 to start")

    def consume():
        # No reference to the generator outlives the loop: dropping it must stop the threads.
        for _ in start():
            both_workers_blocked()
            if how == "break":
                break
            raise RuntimeError("consumer failed")

    if how == "close":
        gen = start()
        next(gen)
        both_workers_blocked()
        gen.close()
    elif how == "break":
        consume()
    elif how == "exception":
        with pytest.raises(RuntimeError):
            consume()
    else:
        gen = start()
        next(gen)
        both_workers_blocked()
        with pytest.raises(KeyboardInterrupt):
            gen.throw(KeyboardInterrupt)
    assert not worker_threads()
    opener.join(DEADLINE_S)
    # 3 batches ahead + 1 submitted when the first was yielded; the 2 running finished,
    # the 4 queued were cancelled and never started.
    assert len(submitted) == 8
    assert sorted(started, key=int) == ["0", "1", "2", "3"]
    assert [f.cancelled() for f in submitted] == [False] * 4 + [True] * 4


def test_prefetch_real_files(vids):
    names = ["h264", "missing", "short", "gray", "h264"]
    paths = [vids[n] for n in names]
    batches = list(prefetch_clips(paths, batch_size=2, backend="pyav"))
    assert [b[0] for b in batches] == [[0], [], [4]]
    errors = {i: m for b in batches for i, m in b[2].items()}
    assert sorted(errors) == [1, 2, 3]
    assert "no such file" in errors[1] and "has 9 frames" in errors[2] and "grey-scale" in errors[3]
    np.testing.assert_array_equal(batches[0][1][0], read_clip(vids["h264"], backend="pyav"))


def test_prefetch_argument_errors():
    with pytest.raises(InvalidParameterError):
        prefetch_clips(["a"], batch_size=0)
    with pytest.raises(InvalidParameterError):
        prefetch_clips(["a"], batch_size=1, queue_size=-1)
