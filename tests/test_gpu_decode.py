"""berg_jax.gpu_decode: NVDEC fallback rules, the decoder choice, the reader's logic, the thread pool.

Everything but the last section runs on the CPU (PyNvVideoCodec is faked where needed).
The last section decodes with NVDEC and skips, saying why, without an NVIDIA GPU as
JAX's default device or without PyNvVideoCodec.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from types import SimpleNamespace

import numpy as np
import pytest

av = pytest.importorskip("av")  # the fixtures are written with PyAV

from berg_jax import gpu_decode as gd  # noqa: E402
from berg_jax.errors import InvalidParameterError, VideoReadError  # noqa: E402
from berg_jax.preprocess import sample_frame_indices  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402

MP4 = "mov,mp4,m4a,3gp,3g2,mj2"
# A 360x640 H.264 High yuv420p mp4 of 60 frames, as a probe reports it.
PLAIN = dict(codec="h264", pix_fmt="yuv420p", width=640, height=360, profile="High", container=MP4,
             field_order=1, color_range=0, colorspace=2, n_frames=60, n_packets=60)
# crf 18 with B-frames: lossless (the fixtures' default) makes x264 write High 4:4:4
# Predictive, which NVDEC on Hopper does not decode.
LOSSY = {"crf": "18", "preset": "medium"}


def reason(**changes):
    return gd.nvdec_fallback_reason(**{**PLAIN, **changes})


# --- nvdec_fallback_reason ------------------------------------------------------------


def test_plain_h264_goes_to_nvdec():
    assert reason() is None
    assert gd.nvdec_fallback_reason("h264", "yuv420p", 640, 360) is None  # keywords default to fine
    assert reason(codec="hevc", profile="Main") is None
    assert reason(codec="vp9", profile="Profile 0", container="matroska,webm", n_frames=0) is None
    assert reason(pix_fmt="nv12", colorspace=6, field_order=0, color_range=1) is None


@pytest.mark.parametrize("changes, words", [
    ({"codec": "av1"}, "codec av1: CPU only (NVDEC on Hopper"),
    ({"codec": "mpeg4"}, "codec mpeg4: CPU only"),
    ({"codec": "vp8"}, "codec vp8: CPU only"),
    ({"codec": "ffv1"}, "codec ffv1: CPU only (NVDEC has no decoder"),
    ({"codec": None}, "codec unknown"),
    ({"pix_fmt": "gray"}, "grey-scale"),
    ({"pix_fmt": "ya8"}, "grey-scale"),
    ({"pix_fmt": "yuva420p"}, "alpha"),
    ({"pix_fmt": "rgba"}, "alpha"),
    ({"pix_fmt": "yuv420p10le"}, "more than 8 bits"),
    ({"pix_fmt": "p010le"}, "more than 8 bits"),
    ({"pix_fmt": "yuv422p"}, "chroma not 4:2:0"),
    ({"pix_fmt": "yuv444p"}, "chroma not 4:2:0"),
    ({"pix_fmt": "rgb24"}, "not YUV 4:2:0"),
    ({"pix_fmt": None}, "unknown pixel format"),
    ({"pix_fmt": "yuvj420p"}, "full-range"),
    ({"color_range": 2}, "full-range"),
    ({"profile": "High 10"}, "H.264 profile High 10"),
    ({"profile": "High 4:4:4 Predictive"}, "H.264 profile"),
    ({"width": 641}, "odd frame size"),
    ({"height": 361}, "odd frame size"),
    ({"field_order": 2}, "interlaced"),
    ({"field_order": 5}, "interlaced"),
    ({"colorspace": 9}, "colour matrix 9"),
    ({"colorspace": 1}, "colour matrix 1"),  # BT.709: measured 27 levels off PyAV's frames on an H100
    ({"container": "matroska,webm"}, "h264 in Matroska"),  # measured: frame indices off on an H100
    ({"container": "avi"}, "container avi"),
    ({"container": "mpeg"}, "container mpeg"),
    ({"n_frames": 10, "n_packets": 10}, "10 frames, fewer than 14"),
    ({"n_frames": 61}, "counts 61 frames but holds 60 packets"),
    ({"n_corrupt": 2}, "2 corrupt packets"),
    ({"n_discarded": 1}, "1 packet to be discarded"),
    ({"keyframes_reordered": True}, "keyframes reordered"),
])
def test_each_rule_sends_the_file_to_the_cpu_with_its_reason(changes, words):
    got = reason(**changes)
    assert got is not None and words in got, got
    assert "\n" not in got  # one line for the manifest


def test_min_frames_follows_the_clip_length():
    assert reason(n_frames=10, n_packets=10, min_frames=8) is None
    assert "fewer than 14" in reason(n_frames=13, n_packets=13)


@pytest.mark.parametrize("codec, ok, bad", [
    ("h264", [(48, 16), (4096, 4096), (4096, 2160)], [(46, 16), (48, 14), (4098, 2160), (2160, 4098)]),
    ("hevc", [(144, 144), (8192, 8192), (7680, 4320)], [(142, 144), (144, 142), (8194, 4320)]),
    ("vp9", [(128, 128), (8192, 8192)], [(126, 128), (128, 126), (8192, 8194)]),
])
def test_frame_size_limits(codec, ok, bad):
    for w, h in ok:
        assert reason(codec=codec, profile=None, width=w, height=h) is None, (w, h)
    for w, h in bad:
        got = reason(codec=codec, profile=None, width=w, height=h)
        assert got is not None and "outside NVDEC's" in got, (w, h, got)


# --- probe_stream on real files -------------------------------------------------------


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_decode_videos")
    return {
        "h264": vf.write_test_video(d / "h264.mp4", n_frames=23, options=LOSSY),
        "mkv": vf.write_test_video(d / "h264.mkv", n_frames=23, options=LOSSY),
        "lossless": vf.write_test_video(d / "lossless.mp4", n_frames=23),
        "yuv444": vf.write_test_video(d / "yuv444.mp4", n_frames=23, pix_fmt="yuv444p", options=LOSSY),
        "yuvj": vf.write_test_video(d / "yuvj.mp4", n_frames=23, pix_fmt="yuvj420p", options=LOSSY),
        "open_gop": vf.write_test_video(
            d / "open_gop.mp4", n_frames=40,
            options={"preset": "medium", "x264-params": "open-gop=1:keyint=8:bframes=3:scenecut=0"}),
        "short": vf.write_test_video(d / "short.mp4", n_frames=9, options=LOSSY),
        "gray": vf.write_gray(d / "gray.mkv"),
        "mpeg4": vf.write_open_gop(d / "mpeg4.mp4"),
        "audio": vf.write_audio_only(d / "audio.mkv"),
        "random": vf.write_random_bytes(d / "random.mp4"),
        "corrupt_tail": vf.write_corrupt_tail(d / "corrupt_tail.mp4", n_frames=20, n_bad=4),
        "missing": str(d / "missing.mp4"),
    }


def test_probe_counts_t_as_decord_does(vids):
    decord = pytest.importorskip("decord")
    for name in ("h264", "mkv"):
        info = gd.probe_stream(vids[name])
        assert (info.codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 64, 48)
        assert info.n_packets == 23 == len(decord.VideoReader(vids[name]))
        assert gd.stream_fallback_reason(info) == (None if name == "h264" else
                                                   "h264 in Matroska: NVDEC's frame indices did not match FFmpeg's (measured)")
    assert gd.probe_stream(vids["h264"]).n_frames == 23
    assert gd.probe_stream(vids["mkv"]).n_frames == 0  # matroska stores no count: T is the packet count


@pytest.mark.parametrize("name, words", [
    ("lossless", "H.264 profile High 4:4:4 Predictive"),
    ("yuv444", "chroma not 4:2:0"),
    ("yuvj", "full-range"),
    ("open_gop", "keyframes reordered"),
    ("short", "9 frames, fewer than 14"),
    ("gray", "codec ffv1"),
    ("mpeg4", "codec mpeg4"),
])
def test_probed_files_nvdec_must_not_take(vids, name, words):
    got = gd.stream_fallback_reason(gd.probe_stream(vids[name]))
    assert got is not None and words in got, got


def test_probe_names_the_codec_not_ffmpegs_decoder(tmp_path):
    """FFmpeg decodes AV1 with "libdav1d": the rule must still see "av1"."""
    encoder = next((c for c in ("libsvtav1", "libaom-av1") if c in av.codecs_available), None)
    if encoder is None:
        pytest.skip("no AV1 encoder in this PyAV build")
    path = vf.write_test_video(tmp_path / "av1.mp4", n_frames=16, height=64, width=64, codec=encoder,
                               options={"preset": "12"} if encoder == "libsvtav1" else {"cpu-used": "8"})
    info = gd.probe_stream(path)
    assert info.codec == "av1"
    assert "codec av1: CPU only (NVDEC on Hopper" in gd.stream_fallback_reason(info)


@pytest.mark.parametrize("name, words", [
    ("audio", "no video stream"), ("random", "PyAV could not open it"), ("missing", "PyAV could not open it"),
])
def test_unreadable_files_fall_back_for_the_cpu_readers_to_word_the_error(vids, name, words):
    with pytest.raises(gd.NvdecFallback, match=words) as info:
        gd.probe_stream(vids[name])
    assert info.value.path == vids[name] and words in info.value.reason


# --- resolve_decoder and device_platform ----------------------------------------------


@pytest.fixture
def extra(monkeypatch):
    """extra(None) makes PyNvVideoCodec importable, extra("why") not; counts the checks."""
    calls = []

    def set_problem(problem):
        def fake():
            calls.append(problem)
            return problem
        monkeypatch.setattr(gd, "nvdec_import_error", fake)
        return calls

    return set_problem


@pytest.mark.parametrize("platform", ["cuda", "cpu", "tpu", "rocm", "gpu"])
def test_cpu_is_always_cpu(extra, platform):
    calls = extra("ModuleNotFoundError: No module named 'PyNvVideoCodec'")
    assert gd.resolve_decoder("cpu", platform) == "cpu"
    assert calls == []


def test_auto_is_both_on_an_nvidia_gpu_with_the_extra(extra):
    extra(None)
    assert gd.resolve_decoder("auto", "cuda") == "both"


def test_auto_is_cpu_without_the_extra(extra):
    extra("ModuleNotFoundError: No module named 'PyNvVideoCodec'")
    assert gd.resolve_decoder("auto", "cuda") == "cpu"


@pytest.mark.parametrize("platform", ["cpu", "tpu", "rocm", "gpu"])
def test_auto_is_cpu_off_nvidia_without_importing_pynvvideocodec(extra, platform):
    calls = extra(None)
    assert gd.resolve_decoder("auto", platform) == "cpu"
    assert calls == []


@pytest.mark.parametrize("choice", ["gpu", "both"])
def test_gpu_and_both_on_an_nvidia_gpu_with_the_extra(extra, choice):
    extra(None)
    assert gd.resolve_decoder(choice, "cuda") == choice


@pytest.mark.parametrize("choice", ["gpu", "both"])
@pytest.mark.parametrize("platform", ["cpu", "tpu", "rocm"])
def test_gpu_and_both_need_an_nvidia_gpu(extra, choice, platform):
    extra(None)
    with pytest.raises(InvalidParameterError) as info:
        gd.resolve_decoder(choice, platform)
    msg = str(info.value)
    assert "NVIDIA" in msg and platform in msg and "--decoder cpu" in msg and "\n" not in msg


@pytest.mark.parametrize("choice", ["gpu", "both"])
def test_gpu_and_both_need_the_extra(extra, choice):
    extra("ModuleNotFoundError: No module named 'PyNvVideoCodec'")
    with pytest.raises(InvalidParameterError) as info:
        gd.resolve_decoder(choice, "cuda")
    msg = str(info.value)
    assert 'pip install "berg-jax[gpu-decode]"' in msg and "--decoder cpu" in msg
    assert "No module named" in msg and "\n" not in msg


@pytest.mark.parametrize("choice", ["GPU", "nvdec", "", None])
def test_unknown_choice(extra, choice):
    extra(None)
    with pytest.raises(InvalidParameterError, match="unknown decoder"):
        gd.resolve_decoder(choice, "cuda")


def test_nvdec_import_error_here_is_one_line_or_none():
    problem = gd.nvdec_import_error()
    assert problem is None or (problem and "\n" not in problem)


def _device(platform, client_platform="", version="", kind=""):
    return SimpleNamespace(platform=platform, device_kind=kind,
                           client=SimpleNamespace(platform=client_platform, platform_version=version))


@pytest.mark.parametrize("device, expected", [
    (_device("gpu", "cuda", "cuda 12080", "NVIDIA H100 80GB HBM3"), "cuda"),
    (_device("gpu", "", "", "NVIDIA A100-SXM4-40GB"), "cuda"),
    (_device("gpu", "rocm", "rocm 60200", "AMD Instinct MI300X"), "rocm"),
    (_device("gpu", "", "", "Some GPU"), "gpu"),
    (_device("cpu", "cpu", "cpu", "cpu"), "cpu"),
    (_device("tpu", "tpu", "", "TPU v5 lite"), "tpu"),
])
def test_device_platform_names_nvidia(device, expected):
    assert gd.device_platform(device) == expected


def test_device_platform_defaults_to_jax_default_device():
    import jax

    got = gd.device_platform()
    assert got == gd.device_platform(jax.devices()[0])
    if jax.devices()[0].platform == "cpu":
        assert got == "cpu"


# --- GpuClipReader's logic with a fake PyNvVideoCodec --------------------------------------


class _FakeSimpleDecoder:
    """Stands in for PyNvVideoCodec.SimpleDecoder: T frames, records calls, fails on request."""

    instances: list[_FakeSimpleDecoder] = []

    def __init__(self, path, gpu_id=0, use_device_memory=True, output_color_type=None, **_):
        assert use_device_memory and output_color_type == "RGB"
        self.path, self.gpu_id = path, gpu_id
        self.reconfigured: list[str] = []
        self.asked: list[list[int]] = []
        self.instances.append(self)

    def reconfigure_decoder(self, path):
        self.reconfigured.append(path)
        self.path = path

    def __len__(self):
        return FAKE["len"]

    def get_batch_frames_by_index(self, indices):
        self.asked.append(list(indices))
        if FAKE["raise"]:
            raise RuntimeError(FAKE["raise"] + "\nsecond line")
        return [np.zeros((2, 2, 3), np.uint8)] * (len(indices) - FAKE["drop"])


FAKE: dict = {}


@pytest.fixture
def fake_nvc(monkeypatch):
    module = types.ModuleType("PyNvVideoCodec")
    module.SimpleDecoder = _FakeSimpleDecoder
    module.OutputColorType = SimpleNamespace(RGB="RGB", RGBP="RGBP", NATIVE="NATIVE")
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", module)
    monkeypatch.setattr(_FakeSimpleDecoder, "instances", [])
    FAKE.clear()
    FAKE.update({"len": 30, "raise": None, "drop": 0})
    return _FakeSimpleDecoder


def test_reader_asks_nvdec_for_the_cpu_readers_indices(fake_nvc):
    reader = gd.GpuClipReader(gpu_id=0)
    FAKE["drop"] = 1  # stop at the frame check, before DLPack (which needs a GPU)
    with pytest.raises(gd.NvdecFallback, match="returned 13 of the 14 frames"):
        reader.decode("a.mp4", 30, (2, 2))
    (dec,) = fake_nvc.instances
    assert dec.asked == [[int(i) for i in sample_frame_indices(30)]]


def test_reader_falls_back_when_nvdec_counts_another_t(fake_nvc):
    FAKE["len"] = 31
    with pytest.raises(gd.NvdecFallback, match="NVDEC's demuxer counts 31 frames, the CPU readers 30"):
        gd.GpuClipReader().decode("a.mp4", 30, (2, 2))
    assert fake_nvc.instances[0].asked == []


def test_reader_reuses_its_decoder_and_rebuilds_it_after_a_failure(fake_nvc):
    reader = gd.GpuClipReader()
    FAKE["drop"] = 1
    for path in ("a.mp4", "b.mp4"):
        with pytest.raises(gd.NvdecFallback):
            reader.decode(path, 30, (2, 2))
    assert len(fake_nvc.instances) == 1 and fake_nvc.instances[0].reconfigured == ["b.mp4"]
    FAKE["raise"] = "cuvid error"
    with pytest.raises(gd.NvdecFallback) as info:
        reader.decode("c.mp4", 30, (2, 2))
    assert info.value.reason == "NVDEC failed: RuntimeError: cuvid error"  # one line
    FAKE["raise"] = None
    with pytest.raises(gd.NvdecFallback, match="returned 13"):
        reader.decode("d.mp4", 30, (2, 2))
    assert [d.path for d in fake_nvc.instances] == ["c.mp4", "d.mp4"]  # a fresh decoder after the failure


def test_reader_without_reuse_opens_a_decoder_per_file(fake_nvc):
    reader = gd.GpuClipReader(reuse_decoder=False)
    FAKE["drop"] = 1
    for path in ("a.mp4", "b.mp4"):
        with pytest.raises(gd.NvdecFallback):
            reader.decode(path, 30, (2, 2))
    assert [d.path for d in fake_nvc.instances] == ["a.mp4", "b.mp4"]
    assert all(d.reconfigured == [] for d in fake_nvc.instances)


def test_reader_belongs_to_one_thread(fake_nvc):
    reader = gd.GpuClipReader()
    FAKE["drop"] = 1
    with pytest.raises(gd.NvdecFallback):
        reader.decode("a.mp4", 30, (2, 2))
    errors = []

    def other():
        try:
            reader.decode("b.mp4", 30, (2, 2))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "one thread" in str(errors[0])


def test_reader_read_vets_before_decoding(fake_nvc, vids):
    with pytest.raises(gd.NvdecFallback, match="fewer than 14"):
        gd.GpuClipReader().read(vids["short"])
    assert fake_nvc.instances == []


# --- DecodePool ----------------------------------------------------------------------------


class _FakeReader:
    """A GPU reader without a GPU: refuses paths with 'refuse', raises on 'boom'."""

    def __init__(self, gpu_id):
        self.gpu_id = gpu_id
        self.thread = threading.get_ident()

    def read(self, path, n_frames):
        assert threading.get_ident() == self.thread  # used by the thread that made it
        if "refuse" in path:
            raise gd.NvdecFallback(path, "test reason")
        if "boom" in path:
            raise ValueError("reader bug")
        return np.full((n_frames, 2, 2, 3), 7, np.uint8)


def _cpu_read(path, n_frames=14, pad_short=False):
    if "bad" in path:
        raise VideoReadError(f"{path}: no such file")
    return np.full((n_frames, 2, 2, 3), 3 if pad_short else 1, np.uint8)


def _results(pool, paths):
    futures = [pool.submit(p) for p in paths]
    return [f.result(timeout=30) for f in futures]


@pytest.mark.parametrize("cpu_threads", [0, 2])
def test_pool_decodes_on_the_gpu_and_hands_refused_files_to_the_cpu(cpu_threads):
    paths = ["a.mp4", "refuse.mp4", "x_boom.mp4", "refuse_bad.mp4", "b.mp4"] * 3
    with gd.DecodePool(2, cpu_threads, cpu_read=_cpu_read, make_reader=_FakeReader, n_frames=14, pad_short=True) as pool:
        results = _results(pool, paths)
    for path, res in zip(paths, results):
        if path in ("a.mp4", "b.mp4"):
            assert isinstance(res, gd.Decoded) and res.decoder == "gpu" and res.fallback is None
            assert res.clip.shape == (14, 2, 2, 3) and res.clip[0, 0, 0, 0] == 7
        elif path == "refuse.mp4":
            assert res.decoder == "cpu" and res.fallback == "test reason"
            assert res.clip[0, 0, 0, 0] == 3  # the CPU reader got the read kwargs (pad_short)
        elif path == "x_boom.mp4":
            assert res.decoder == "cpu" and res.fallback == "NVDEC reader raised ValueError: reader bug"
        else:
            assert res == "refuse_bad.mp4: no such file"  # the CPU reader's failure message


def test_pool_takes_failure_messages_returned_by_the_cpu_reader():
    """A CPU reader may answer a message instead of raising (as decode worker processes do)."""
    def answers(path, **_):
        return f"{path}: decode worker died" if "bad" in path else np.zeros((14, 2, 2, 3), np.uint8)

    # One route per pool, so which thread takes a file is not left to the scheduler (a CPU
    # thread also takes files from the queue): a GPU thread alone decodes what NVDEC
    # refuses on the CPU itself; a CPU thread alone reads every file directly.
    with gd.DecodePool(1, 0, cpu_read=answers, make_reader=_FakeReader) as pool:
        results = _results(pool, ["refuse_bad.mp4", "refuse.mp4"])
    assert results[0] == "refuse_bad.mp4: decode worker died"
    assert (results[1].decoder, results[1].fallback) == ("cpu", "test reason")
    with gd.DecodePool(0, 1, cpu_read=answers, make_reader=_FakeReader) as pool:
        results = _results(pool, ["refuse_bad.mp4", "refuse.mp4"])
    assert results[0] == "refuse_bad.mp4: decode worker died"
    assert (results[1].decoder, results[1].fallback) == ("cpu", None)


def test_pool_cpu_threads_share_the_queue():
    paths = [f"v{i}.mp4" for i in range(40)]
    with gd.DecodePool(0, 3, cpu_read=_cpu_read) as pool:
        results = _results(pool, paths)
    assert all(r.decoder == "cpu" and r.fallback is None for r in results)


def test_pool_without_nvdec_decodes_on_the_cpu_and_says_why():
    def no_nvdec(gpu_id):
        raise RuntimeError("Driver version is too old\nTROUBLESHOOTING")

    with gd.DecodePool(2, 0, cpu_read=_cpu_read, make_reader=no_nvdec) as pool:
        results = _results(pool, ["a.mp4", "b.mp4"])
    assert [(r.decoder, r.fallback) for r in results] == [
        ("cpu", "NVDEC unavailable: RuntimeError: Driver version is too old")] * 2


def _set_when(event: threading.Event, condition, timeout: float = 60.0) -> None:
    """Set `event` from a helper thread once `condition()` holds (polled; set anyway after `timeout` s)."""
    def run():
        end = time.monotonic() + timeout
        while not condition() and time.monotonic() < end:
            time.sleep(0.005)
        event.set()

    threading.Thread(target=run, daemon=True).start()


def test_pool_shutdown_cancels_what_has_not_started():
    started, release = threading.Event(), threading.Event()

    class SlowReader(_FakeReader):
        def read(self, path, n_frames):
            started.set()
            release.wait(30)
            return super().read(path, n_frames)

    pool = gd.DecodePool(1, 0, cpu_read=_cpu_read, make_reader=SlowReader)
    futures = [pool.submit(f"v{i}.mp4") for i in range(5)]
    assert started.wait(30)
    # The read in progress ends only once shutdown has cancelled the queue (no timer race).
    _set_when(release, lambda: futures[1].cancelled())
    pool.shutdown(wait=True, cancel_futures=True)
    assert futures[0].result(timeout=1).decoder == "gpu"
    assert all(f.cancelled() for f in futures[1:])
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit("late.mp4")


def test_pool_shutdown_still_decodes_files_handed_on_late():
    """A file a GPU thread refuses after shutdown began still reaches a CPU thread."""
    started, release = threading.Event(), threading.Event()

    class SlowRefuser(_FakeReader):
        def read(self, path, n_frames):
            started.set()
            release.wait(30)
            raise gd.NvdecFallback(path, "late refusal")

    pool = gd.DecodePool(1, 1, cpu_read=_cpu_read, make_reader=SlowRefuser)
    fut = pool.submit("v.mp4")
    assert started.wait(30)
    _set_when(release, lambda: pool._closed)  # the refusal comes after shutdown began
    pool.shutdown(wait=True)
    res = fut.result(timeout=5)
    assert (res.decoder, res.fallback) == ("cpu", "late refusal")


def test_pool_needs_a_thread():
    with pytest.raises(InvalidParameterError, match="at least one decoding thread"):
        gd.DecodePool(0, 0, cpu_read=_cpu_read)


# --- on an NVIDIA GPU with PyNvVideoCodec ------------------------------------------------


def _nvdec_skip_reason() -> str | None:
    platform = gd.device_platform()
    if platform != "cuda":
        return f"needs an NVIDIA GPU as JAX's default device (here: {platform})"
    problem = gd.nvdec_import_error()
    if problem is not None:
        return f"needs PyNvVideoCodec ({problem}): pip install \"berg-jax[gpu-decode]\""
    return None


nvdec = pytest.mark.skipif(_nvdec_skip_reason() is not None, reason=str(_nvdec_skip_reason()))


@pytest.fixture(scope="module")
def gpu_vids(tmp_path_factory):
    d = tmp_path_factory.mktemp("nvdec_videos")
    big = dict(height=128, width=160, options=LOSSY)
    return {
        "h264": vf.write_test_video(d / "h264.mp4", n_frames=23, **big),
        "mkv": vf.write_test_video(d / "h264.mkv", n_frames=31, **big),
        "long": vf.write_test_video(d / "long.mp4", n_frames=90, **big),
        "short": vf.write_test_video(d / "short.mp4", n_frames=9, **big),
    }


@nvdec
@pytest.mark.parametrize("name", ["h264", "long"])
def test_nvdec_frames_equal_the_cpu_readers_within_2_levels(gpu_vids, name):
    import jax

    from berg_jax.video import read_clip

    clip = gd.GpuClipReader().read(gpu_vids[name])
    assert isinstance(clip, jax.Array) and clip.dtype == np.uint8 and clip.shape == (14, 128, 160, 3)
    assert {d.platform for d in clip.devices()} == {"gpu"}
    cpu = read_clip(gpu_vids[name])
    diff = np.abs(np.asarray(clip).astype(np.int16) - cpu.astype(np.int16))
    assert diff.max() <= 2, (name, int(diff.max()), float(diff.mean()))


@nvdec
@pytest.mark.parametrize("name", ["h264", "long"])
def test_nvdec_t_is_counted_as_the_cpu_readers_count_it(gpu_vids, name):
    decord = pytest.importorskip("decord")
    path = gpu_vids[name]
    info = gd.probe_stream(path)
    with av.open(path) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    assert info.n_packets == len(decord.VideoReader(path)) == decoded
    clip = np.asarray(gd.GpuClipReader().read(path))
    # Each frame carries its number (frame_level): the right frames, not merely similar ones.
    assert [vf.frame_level(f) for f in clip] == [int(k) % vf.PERIOD for k in sample_frame_indices(decoded)]


@nvdec
def test_nvdec_reader_decodes_file_after_file_and_refuses_short_ones(gpu_vids):
    reader = gd.GpuClipReader()
    for name in ("h264", "long", "h264"):
        assert reader.read(gpu_vids[name]).shape == (14, 128, 160, 3)
    with pytest.raises(gd.NvdecFallback, match="fewer than 14"):
        reader.read(gpu_vids["short"])
    with pytest.raises(gd.NvdecFallback, match="h264 in Matroska"):  # measured misaligned on an H100
        reader.read(gpu_vids["mkv"])


@nvdec
def test_nvdec_pool_end_to_end(gpu_vids):
    from berg_jax.video import read_clip

    paths = [gpu_vids[n] for n in ("h264", "mkv", "long", "short")] * 3
    with gd.DecodePool(3, 1, pad_short=True) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(p) for p in paths]]
    for path, res in zip(paths, results):
        assert isinstance(res, gd.Decoded), res
        assert res.decoder == ("cpu" if path in (gpu_vids["short"], gpu_vids["mkv"]) else "gpu"), (path, res.fallback)
        diff = np.abs(np.asarray(res.clip).astype(np.int16) - read_clip(path, pad_short=True).astype(np.int16))
        assert diff.max() <= 2
