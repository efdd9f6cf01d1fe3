"""Kinds of stream (codec x pixel format x colour tags x rotation) from real encoders.

For every kind this PyAV build can write, `read_clip` returns exactly PyAV's frames
(`frame.to_ndarray(format="rgb24")`, torchvision's `read_video` conversion) whichever
backend is asked for, and the decord backend hands a file to PyAV for the reason
measured in `video._decord_differs`' table (`python -m weights_convert.video_kinds`).
"""

from __future__ import annotations

import numpy as np
import pytest

av = pytest.importorskip("av")  # the fixtures are written with PyAV, and PyAV is the reference

from berg_jax import video  # noqa: E402
from berg_jax.errors import VideoReadError  # noqa: E402
from berg_jax.video import pyav_reason, read_clip  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402

KINDS = {kind.name: kind for kind in vf.STREAM_KINDS}

# The phrase of `pyav_reason` for each class of `StreamKind.routed`.
REASON_PHRASE = {
    "codec": "decord 0.6.0 cannot read it",
    "bit depth": "-bit samples",
    "rotation": "display rotation of",
    "colour tags": "tag",
}


def pyav_applies_colour_tags() -> bool:
    """Whether the installed PyAV's rgb24 conversion follows a BT.709 tag (PyAV >= 17).

    Decided here independently of the reader: a red frame converted as tagged and as
    untagged. The reader's own test of the same thing is checked against this.
    """
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (255, 0, 0)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    frame.colorspace, frame.color_range = 2, 0
    plain = frame.to_ndarray(format="rgb24")
    frame.colorspace = 1
    return not np.array_equal(frame.to_ndarray(format="rgb24"), plain)


@pytest.fixture(scope="module")
def kind_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kinds")


@pytest.fixture(scope="module")
def written():
    return {}  # name -> path, so that each kind is encoded once per module


@pytest.fixture
def kind_path(request, kind_dir, written):
    """The file of the kind named by the test's `name` parameter (skipped where it cannot be written)."""
    kind = KINDS[request.getfixturevalue("name")]
    missing = kind.missing()
    if missing:
        pytest.skip(missing)
    if kind.name not in written:
        written[kind.name] = kind.write(kind_dir)
    return written[kind.name]


def decord_installed() -> bool:
    return "decord" in video.available_backends()


@pytest.mark.parametrize("name", list(KINDS))
def test_read_clip_gives_pyavs_frames(name, kind_path):
    try:
        want = read_clip(kind_path, backend="pyav")
    except VideoReadError as exc:
        if "PyAV cannot convert" in str(exc):  # ycgco under PyAV >= 17: test_ycgco_tag
            pytest.skip(f"PyAV cannot convert this kind: {exc}")
        raise
    np.testing.assert_array_equal(read_clip(kind_path), want)  # backend "auto"
    if decord_installed():  # the routing lives in the decord backend itself
        np.testing.assert_array_equal(read_clip(kind_path, backend="decord"), want)


@pytest.mark.parametrize("name", list(KINDS))
def test_routing_is_the_measured_one(name, kind_path):
    routed = KINDS[name].routed
    if routed == "colour tags" and pyav_applies_colour_tags():
        routed = None  # decord and PyAV >= 17 apply the tags alike
    reason = pyav_reason(kind_path)
    if routed is None:
        assert reason is None
    else:
        assert reason is not None and REASON_PHRASE[routed] in reason, reason


def test_readers_colour_tag_check_matches_pyav():
    assert video._pyav_applies_colour_tags()[0] == pyav_applies_colour_tags()


@pytest.mark.parametrize("name", ["h264-yuv420p-bt709", "vp9-yuv420p-pc", "h264-yuv420p-smpte240m"])
def test_colour_tags_go_to_pyav_where_pyav_ignores_them(name, kind_path, monkeypatch):
    """The PyAV <= 16 branch, run under any PyAV: with tags ignored the tagged kinds route."""
    monkeypatch.setattr(video, "_pyav_applies_colour_tags", lambda: (False, False))
    reason = pyav_reason(kind_path)
    assert reason is not None and ("colour matrix tag" in reason or "range tag" in reason), reason
    monkeypatch.setattr(video, "_pyav_applies_colour_tags", lambda: (True, True))
    assert pyav_reason(kind_path) is None


@pytest.mark.parametrize("name", ["h264-yuv420p", "h264-yuvj420p", "h264-yuv420p-bt601", "utvideo-gbrp"])
def test_tags_that_change_nothing_stay_on_decord_under_any_pyav(name, kind_path, monkeypatch):
    monkeypatch.setattr(video, "_pyav_applies_colour_tags", lambda: (False, False))
    assert pyav_reason(kind_path) is None


@pytest.mark.parametrize("name", ["h264-rotate90", "h264-rotate270"])
def test_rotation_caught_by_shape_where_pyav_cannot_report_it(name, kind_path, monkeypatch):
    """PyAV 14.0 exposes no rotation: decord's turned output shape still sends the file to PyAV."""
    if not decord_installed():
        pytest.skip("decord not installed")
    want = read_clip(kind_path, backend="pyav")
    monkeypatch.setattr(video, "_rotation", lambda stream, frame: None)
    assert pyav_reason(kind_path) is None
    np.testing.assert_array_equal(read_clip(kind_path, backend="decord"), want)


@pytest.mark.parametrize("name", ["h264-yuv420p-ycgco"])
def test_ycgco_tag(name, kind_path):
    """PyAV >= 17 refuses ycgco (swscale: not supported); decord reads it as BT.601, as PyAV <= 16 did."""
    if not pyav_applies_colour_tags():
        pytest.skip("this PyAV converts ycgco as BT.601 (test_read_clip_gives_pyavs_frames covers it)")
    with pytest.raises(VideoReadError, match=r"PyAV cannot convert its yuv420p frames \(colour matrix tag 8") as info:
        read_clip(kind_path, backend="pyav")
    assert str(info.value).startswith(f"{kind_path}: ")
    if decord_installed():
        assert read_clip(kind_path).shape == (14, 64, 96, 3)


def test_pyav_reason_names_the_path_of_a_bad_file(tmp_path):
    path = vf.write_random_bytes(tmp_path / "random.mp4")
    with pytest.raises(VideoReadError, match="not a readable video container") as info:
        pyav_reason(path)
    assert str(info.value).startswith(f"{path}: ")
