"""The screening pictures: the contact sheet of ranked clips and one clip's ROI-means bars.

The sheet is checked by its pixels: videos whose frames are each one flat colour (a
different one per frame), so the centre of each frame cell tells which frame of which
video was drawn there; `ContactSheetLayout` says where the cells are.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")  # the `plot` extra
av = pytest.importorskip("av")  # the videos are written with PyAV

import matplotlib.image  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from berg_jax import screening_plots as sp  # noqa: E402
from berg_jax.berg_files import ROI_NAMES  # noqa: E402
from berg_jax.errors import InvalidParameterError  # noqa: E402
from berg_jax.frames import sample_frame_indices  # noqa: E402
from berg_jax.plots import PlotDependencyError  # noqa: E402
from berg_jax.video import read_clip, write_mp4  # noqa: E402

N_SOURCE_FRAMES = 20  # sampled: 0, 1, 2, 4, 5, 7, 8, 10, ...; the sheet's middle (sample 7) is frame 10


def flat_colour(video: int, frame: int) -> np.ndarray:
    """The one colour of source frame `frame` of test video `video`: uint8 (3,)."""
    return np.array([20 + 10 * frame, 230 - 9 * frame, 40 + 70 * video], np.uint8)


def write_flat_video(path, video: int, height: int = 48, width: int = 64) -> str:
    frames = np.stack([np.broadcast_to(flat_colour(video, k), (height, width, 3))
                       for k in range(N_SOURCE_FRAMES)])
    write_mp4(path, frames)
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three flat-colour videos of different shapes (landscape, portrait, square)."""
    d = tmp_path_factory.mktemp("sheet_videos")
    shapes = [(48, 64), (64, 36), (40, 40)]
    return [write_flat_video(d / f"clip{v}.mp4", v, *shape) for v, shape in enumerate(shapes)]


def read_png(path) -> np.ndarray:
    """The PNG as uint8 (H, W, 3)."""
    image = matplotlib.image.imread(str(path))
    return np.round(image[..., :3] * 255).astype(np.uint8)


def cell_centre(image: np.ndarray, layout: sp.ContactSheetLayout, row: int, column: int) -> np.ndarray:
    top, left, bottom, right = layout.frame_cell_pixels(row, column)
    return image[(top + bottom) // 2, (left + right) // 2].astype(int)


def test_each_row_shows_the_first_middle_and_last_sampled_frame_of_its_clip(videos, tmp_path):
    assert list(sample_frame_indices(N_SOURCE_FRAMES)[list(sp.SHEET_FRAMES)]) == [0, 10, 19]
    entries = [(1, videos[2], 2.5), sp.RankedClip(2, videos[0], 1.25), (3, videos[1], -0.5)]
    path = sp.contact_sheet(entries, tmp_path / "sheet.png", value_label="lFFA mean")
    image = read_png(path)
    layout = sp.ContactSheetLayout(3)
    assert image.shape[:2] == layout.size_pixels[::-1]
    for row, video in enumerate((2, 0, 1)):
        clip = read_clip(videos[video])  # the encoder's frames, whatever the codec did to the colours
        for column, sample in enumerate(sp.SHEET_FRAMES):
            expected = clip[sample][clip.shape[1] // 2, clip.shape[2] // 2].astype(int)
            got = cell_centre(image, layout, row, column)
            assert np.abs(got - expected).max() <= 3, (row, column, got, expected)
    assert not [p for p in os.listdir(tmp_path) if p != "sheet.png"]  # no temporary file left


def test_an_unreadable_video_gets_a_row_with_its_reason(videos, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    missing = str(tmp_path / r"gone $\notatexcommand$.mp4")  # drawn as written, not as TeX
    entries = [(1, missing, 3.0), (2, videos[0], 2.0), (3, str(corrupt), float("nan"))]

    rows = [sp.read_sheet_row(e) for e in entries]
    assert rows[0].frames is None and rows[0].error == "no such file"  # the path is on the row already
    assert rows[1].error is None and rows[1].frames.shape == (3, 48, 64, 3) and rows[1].frames.dtype == np.uint8
    assert rows[2].frames is None and "not a readable video container" in rows[2].error

    image = read_png(sp.contact_sheet(entries, tmp_path / "sheet.png"))
    layout = sp.ContactSheetLayout(3)
    assert image.shape[:2] == layout.size_pixels[::-1]
    frame_colours = {tuple(int(c) for c in flat_colour(0, k)) for k in range(N_SOURCE_FRAMES)}
    for row in (0, 2):
        top, left, bottom, _ = layout.frame_cell_pixels(row, 0)
        right = layout.frame_cell_pixels(row, 2)[3]
        band = image[top:bottom, left:right].reshape(-1, 3).astype(int)
        # no frame drawn, but the reason in red
        assert not any(tuple(p) in frame_colours for p in band[::7])
        reddish = (band[:, 0] > 150) & (band[:, 1] < 90) & (band[:, 2] < 90)
        assert reddish.sum() > 100, row
    assert np.abs(cell_centre(image, layout, 1, 0) - read_clip(videos[0])[0, 24, 32]).max() <= 3


def test_a_long_ranking_is_cut_to_max_rows(videos, tmp_path):
    entries = [(i + 1, videos[i % 3], 10.0 - i) for i in range(5)]
    image = read_png(sp.contact_sheet(entries, tmp_path / "sheet.png", max_rows=2, dpi=50))
    assert image.shape[:2] == sp.ContactSheetLayout(2, dpi=50).size_pixels[::-1]
    with pytest.raises(InvalidParameterError, match="max_rows must be at least 1"):
        sp.contact_sheet(entries, tmp_path / "none.png", max_rows=0)
    with pytest.raises(InvalidParameterError, match=r"\(rank, path, value\)"):
        sp.contact_sheet([("just a path",)], tmp_path / "none.png")
    assert sorted(os.listdir(tmp_path)) == ["sheet.png"]


@pytest.mark.parametrize("draw", ["sheet", "bars"])
def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(videos, tmp_path, monkeypatch, draw):
    target = tmp_path / "picture.png"
    target.write_bytes(b"the previous picture")

    def savefig_that_fails_halfway(self, fname, *args, **kwargs):
        data = b"\x89PNG half a picture"
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as f:
                f.write(data)
        else:
            fname.write(data)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", savefig_that_fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        if draw == "sheet":
            sp.contact_sheet([(1, videos[0], 1.0)], target)
        else:
            sp.roi_means_bars(np.zeros(len(ROI_NAMES)), ROI_NAMES, target)
    assert target.read_bytes() == b"the previous picture"
    assert os.listdir(tmp_path) == ["picture.png"]


def test_hemisphere_order_puts_each_left_roi_beside_its_right_partner():
    order = sp.hemisphere_order(ROI_NAMES)
    assert sorted(order) == list(range(len(ROI_NAMES)))
    names = [ROI_NAMES[i] for i in order]
    assert names[:4] == ["lV1v", "rV1v", "lV1d", "rV1d"]
    for pair in (("lSTS", "rSTS"), ("lIPS1-2-3", "rIPS1-2-3"), ("lhV4", "rhV4")):  # rSTS comes first in BERG's list
        assert names.index(pair[1]) == names.index(pair[0]) + 1
    assert names[-1] == "BMDgeneral"
    assert sp.hemisphere_order(["rX", "BMDgeneral", "lX", "rY"]) == [2, 0, 1, 3]


def test_roi_means_bars_draws_every_roi_nan_included(tmp_path):
    values = np.linspace(-1.5, 2.0, len(ROI_NAMES))
    values[[3, 10]] = np.nan
    path = sp.roi_means_bars(values, ROI_NAMES, tmp_path / "bars.png", title="clip 7")
    image = read_png(path)
    height, width = image.shape[:2]
    assert height == 430 and width > 900  # 4.3 inches high; 47 bars need room
    blue, orange = np.array([0x3B, 0x6F, 0xB6]), np.array([0xE0, 0x8A, 0x2C])
    assert (np.abs(image.astype(int) - blue).max(axis=-1) <= 2).sum() > 500  # left-hemisphere bars
    assert (np.abs(image.astype(int) - orange).max(axis=-1) <= 2).sum() > 500  # right-hemisphere bars
    # left beside right in the picture too: the bars' colours along a line through them
    sp.roi_means_bars(np.ones(4), ["lA", "lB", "rA", "rB"], tmp_path / "pairs.png")
    pairs = read_png(tmp_path / "pairs.png").astype(int)
    line = pairs[pairs.shape[0] // 2]
    classes = [("l" if np.abs(p - blue).max() <= 2 else "r") for p in line
               if np.abs(p - blue).max() <= 2 or np.abs(p - orange).max() <= 2]
    assert [c for k, c in enumerate(classes) if k == 0 or c != classes[k - 1]] == ["l", "r", "l", "r"]
    # an ROI whose partner is missing keeps its hemisphere's colour (digits after l/r too)
    sp.roi_means_bars(np.ones(3), ["l7AL", "rFFA", "BMDgeneral"], tmp_path / "alone.png")
    alone = read_png(tmp_path / "alone.png").astype(int)
    assert (np.abs(alone - blue).max(axis=-1) <= 2).sum() > 500
    assert (np.abs(alone - orange).max(axis=-1) <= 2).sum() > 500
    # nothing but NaN still draws (an empty plot with its zero line)
    sp.roi_means_bars(np.full(len(ROI_NAMES), np.nan), ROI_NAMES, tmp_path / "none.png")
    assert read_png(tmp_path / "none.png").shape[:2] == (height, width)
    with pytest.raises(InvalidParameterError, match="one value per ROI name"):
        sp.roi_means_bars(values[:-1], ROI_NAMES, tmp_path / "short.png")
    assert sorted(os.listdir(tmp_path)) == ["alone.png", "bars.png", "none.png", "pairs.png"]


def test_without_matplotlib_it_says_how_to_install_it(videos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    with pytest.raises(PlotDependencyError, match=r"pip install 'berg-jax\[plot\]'"):
        sp.contact_sheet([(1, videos[0], 1.0)], tmp_path / "sheet.png")
    with pytest.raises(PlotDependencyError, match=r"pip install 'berg-jax\[plot\]'"):
        sp.roi_means_bars(np.zeros(2), ["lFFA", "rFFA"], tmp_path / "bars.png")
    assert os.listdir(tmp_path) == []


def test_titles_with_undecodable_file_names_draw(videos, tmp_path):
    name = os.fsdecode(b"clip_\xff\xfe.mp4")  # bytes that are not UTF-8, as Python holds them
    sp.roi_means_bars(np.ones(2), ["lFFA", "rFFA"], tmp_path / "bars.png", title=f"{name}: top 1",
                      value_label=name)
    sp.contact_sheet([(1, videos[0], 1.0)], tmp_path / "sheet.png", title=f"{name}: top 1", value_label=name)
    assert read_png(tmp_path / "bars.png").size and read_png(tmp_path / "sheet.png").size
