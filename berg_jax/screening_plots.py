"""Pictures of a screen's results: a contact sheet of ranked clips, and one clip's ROI means.

Optional, like `plots`: needs matplotlib (the `plot` extra, `pip install 'berg-jax[plot]'`;
no nilearn here). A missing matplotlib raises `plots.PlotDependencyError` with that line.
Figures are bare matplotlib Figures on the Agg canvas (`plots.new_figure`: no pyplot, nothing
global to close), and every PNG is written atomically (`plots.save_figure`: rendered in
memory, then a hidden temporary file renamed onto the path), so a reader never sees half a
picture and a failure leaves an existing file as it was.

* `contact_sheet(entries, path)`: one row per ranked clip -- its rank, file name and value,
  then three of the 14 frames the model sees (first, middle, last), read back from the
  video file with `video.read_clip`, i.e. the encoder's own reader and frame sampling. A
  clip whose file can no longer be read gets a row with the reason instead of frames.
* `roi_means_bars(values, roi_names, path)`: one clip's R ROI means as bars, each left
  hemisphere ROI beside its right hemisphere partner.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from berg_jax.errors import InvalidParameterError, VideoReadError
from berg_jax.frames import N_FRAMES
from berg_jax.plots import new_figure, require_matplotlib, save_figure

__all__ = [
    "SHEET_FRAMES",
    "SHEET_MAX_ROWS",
    "ContactSheetLayout",
    "RankedClip",
    "SheetRow",
    "contact_sheet",
    "hemisphere_order",
    "read_sheet_row",
    "roi_means_bars",
]

# Which of the 14 sampled frames a row shows: the first, the middle and the last. 14 has no
# middle frame; sampled frame 7 is the one nearer the video's temporal middle: the samples
# sit at floor(k * (T - 1) / 13), so truncation moves frame 7 (at 7/13 = 0.54 of the video)
# towards the middle and frame 6 (at 0.46) away from it (T = 90: frames 41 and 47 of a
# middle at 44.5).
SHEET_FRAMES: tuple[int, int, int] = (0, 7, N_FRAMES - 1)

# Rows drawn at most: at the default dpi a 50-row sheet is 810 x 5,915 pixels, as tall as
# one still scrolls through. Longer rankings are cut to their first rows, with a note.
SHEET_MAX_ROWS = 50

_TEXT_COLOUR = "#202020"
_MUTED_COLOUR = "#707070"
_ERROR_COLOUR = "#b01010"
_RULE_COLOUR = "#d0d0d0"
_NAME_CHARS = 34  # what fits the text column at 8.5 pt


@dataclass(frozen=True)
class RankedClip:
    """One ranked clip: its place in the ranking, its video file and the value it was ranked by.

    `contact_sheet` also takes plain (rank, path, value) tuples.
    """

    rank: int
    path: str
    value: float


@dataclass(frozen=True)
class SheetRow:
    """What a contact sheet's row shows: the clip, and its frames or why there are none.

    frames: uint8 (3, h, w, 3) RGB, sampled frames `SHEET_FRAMES` reduced for display
      (whole-pixel box averages, never below the drawn size), or None;
    error: None, or why the video could not be read (the reader's reason without the path).
    """

    clip: RankedClip
    frames: np.ndarray | None
    error: str | None


@dataclass(frozen=True)
class ContactSheetLayout:
    """Where `contact_sheet` draws what, for `n_rows` rows at `dpi` (inches; pixels below).

    From the top: the title band, the column headings, `n_rows` rows of `row_height`
    inches (a text column, then three frame cells), a footnote. Frames keep their aspect
    ratio inside their cell (letterboxed, centred).
    """

    n_rows: int
    dpi: int = 100
    margin: float = 0.15
    title_height: float = 0.45
    heading_height: float = 0.25
    footer_height: float = 0.3
    text_width: float = 2.7
    frame_width: float = 1.6
    frame_height: float = 1.0
    gap: float = 0.1
    row_padding: float = 0.16

    @property
    def row_height(self) -> float:
        return self.frame_height + self.row_padding

    @property
    def size_pixels(self) -> tuple[int, int]:
        """(width, height) of the PNG in pixels."""
        width = 2 * self.margin + self.text_width + 3 * (self.gap + self.frame_width)
        height = (self.margin + self.title_height + self.heading_height
                  + self.n_rows * self.row_height + self.footer_height)
        return round(width * self.dpi), round(height * self.dpi)

    @property
    def size_inches(self) -> tuple[float, float]:
        """(width, height) of the figure in inches: `size_pixels` and half a pixel.

        Agg truncates the figure's size in pixels; the half pixel keeps float rounding
        (173 / 50 * 50 = 172.99999...) from losing a row of pixels.
        """
        width, height = self.size_pixels
        return (width + 0.5) / self.dpi, (height + 0.5) / self.dpi

    def row_top(self, row: int) -> float:
        """Inches from the figure's top edge to the top of row `row` (0-based)."""
        return self.margin + self.title_height + self.heading_height + row * self.row_height

    def frame_left(self, column: int) -> float:
        """Inches from the figure's left edge to frame cell `column` (0: first, 1: middle, 2: last)."""
        return self.margin + self.text_width + self.gap + column * (self.frame_width + self.gap)

    def frame_cell_pixels(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixel bounds of a frame cell, as image array indices."""
        top = self.row_top(row) + self.row_padding / 2
        left = self.frame_left(column)
        return (round(top * self.dpi), round(left * self.dpi),
                round((top + self.frame_height) * self.dpi), round((left + self.frame_width) * self.dpi))

    def figure_box(self, left: float, top: float, width: float, height: float) -> list[float]:
        """An axes rectangle [left, bottom, width, height] in figure fractions, from inches measured from the top-left."""
        fig_w, fig_h = self.size_inches
        return [left / fig_w, 1.0 - (top + height) / fig_h, width / fig_w, height / fig_h]


# --------------------------------------------------------------------------- reading


def _as_ranked_clip(entry: Any) -> RankedClip:
    if isinstance(entry, RankedClip):
        return entry
    try:
        rank, path, value = entry
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"contact_sheet: each entry must be a RankedClip or a (rank, path, value) tuple, got {entry!r}") from None
    return RankedClip(int(rank), os.fspath(path), float(value))


def _shrink(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reduce (H, W, 3) uint8 by the largest whole factor that stays at least height x width (0: keep whole).

    Box averages, so fine detail does not alias; a figure of 150 full-resolution frames
    would otherwise hold gigabytes until it is rendered.
    """
    if height < 1 or width < 1:
        return frame
    factor = max(1, min(frame.shape[0] // height, frame.shape[1] // width))
    if factor == 1:
        return frame
    h, w = frame.shape[0] // factor * factor, frame.shape[1] // factor * factor
    blocks = frame[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return np.round(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)


def read_sheet_row(entry: RankedClip | tuple[int, str, float], *, pad_short: bool = True,
                   min_size: tuple[int, int] = (0, 0)) -> SheetRow:
    """Read one ranked clip's frames for its contact-sheet row; never raises for a bad file.

    Args:
      entry: a RankedClip or (rank, path, value).
      pad_short: passed to `video.read_clip`. True shows a clip shorter than 14 frames as
        `encode --pad-short` fed it to the model; for any clip of 14 or more frames it
        changes nothing.
      min_size: (height, width) the frames may be reduced to, not below (0: kept whole).
    Returns:
      SheetRow with frames uint8 (3, h, w, 3) -- sampled frames `SHEET_FRAMES` -- or, when
      the file cannot be read (gone, corrupt, ...), frames None and the reason.
    """
    from berg_jax.video import read_clip

    clip = _as_ranked_clip(entry)
    try:
        frames = read_clip(clip.path, pad_short=pad_short)
    except Exception as exc:  # noqa: BLE001 - one unreadable clip becomes a row saying why
        reason = str(exc).strip()
        prefix = f"{clip.path}: "  # the readers' messages start with the path; the row shows it
        reason = " ".join((reason[len(prefix):] if reason.startswith(prefix) else reason).split())
        if not isinstance(exc, VideoReadError):  # an unexpected failure: say of what kind
            reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        return SheetRow(clip, None, reason)
    picked = np.stack([_shrink(frames[i], *min_size) for i in SHEET_FRAMES])
    return SheetRow(clip, picked, None)


# --------------------------------------------------------------------------- drawing


def _display_text(text: str) -> str:
    """`text` with undecodable file-name bytes (held as lone surrogates) shown as U+FFFD."""
    return os.fsencode(text).decode("utf-8", errors="replace") if any(
        "\udc80" <= c <= "\udcff" for c in text) else text


def _shorten(text: str, width: int) -> str:
    """`text`, cut in the middle with an ellipsis when longer than `width` characters."""
    if len(text) <= width:
        return text
    head = (width - 1) * 2 // 3
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def _format_value(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def _draw_row(fig: Any, layout: ContactSheetLayout, i: int, row: SheetRow, value_label: str) -> None:
    text_ax = fig.add_axes(layout.figure_box(layout.margin, layout.row_top(i), layout.text_width,
                                             layout.row_height))
    text_ax.set_axis_off()
    clip = row.clip
    path = _display_text(clip.path)
    parent = os.path.basename(os.path.dirname(path)) or os.path.dirname(path)
    common = dict(transform=text_ax.transAxes, parse_math=False, ha="left", va="center")
    text_ax.text(0.0, 0.78, f"#{clip.rank}", fontsize=13, fontweight="bold", color=_TEXT_COLOUR, **common)
    text_ax.text(0.27, 0.78, f"{_shorten(value_label, 18)}  {_format_value(clip.value)}", fontsize=10,
                 color=_TEXT_COLOUR, **common)
    text_ax.text(0.0, 0.47, _shorten(os.path.basename(path), _NAME_CHARS), fontsize=8.5,
                 color=_TEXT_COLOUR, **common)
    if parent:
        text_ax.text(0.0, 0.24, _shorten(parent + os.sep, _NAME_CHARS + 4), fontsize=7,
                     color=_MUTED_COLOUR, **common)
    if row.frames is None:
        frames_width = 3 * layout.frame_width + 2 * layout.gap
        err_ax = fig.add_axes(layout.figure_box(layout.frame_left(0), layout.row_top(i), frames_width,
                                                layout.row_height))
        err_ax.set_axis_off()
        lines = textwrap.wrap(f"cannot read this video: {_display_text(row.error or '')}", width=80)
        if len(lines) > 4:
            lines = lines[:4]
            lines[-1] = lines[-1][:77] + "..."
        err_ax.text(0.02, 0.5, "\n".join(lines), transform=err_ax.transAxes, parse_math=False,
                    ha="left", va="center", fontsize=8, color=_ERROR_COLOUR)
        return
    cell_top = layout.row_top(i) + layout.row_padding / 2
    for column, frame in enumerate(row.frames):
        ax = fig.add_axes(layout.figure_box(layout.frame_left(column), cell_top, layout.frame_width,
                                            layout.frame_height))
        # aspect "equal" with the axes box adjusted and centred: the frame keeps its shape.
        ax.imshow(frame, interpolation="antialiased", aspect="equal")
        ax.set_anchor("C")
        ax.set_axis_off()


def contact_sheet(
    entries: Sequence[RankedClip | tuple[int, str, float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    value_label: str = "value",
    max_rows: int = SHEET_MAX_ROWS,
    pad_short: bool = True,
    dpi: int = 100,
    decode_threads: int = 2,
) -> Path:
    """Draw ranked clips as a contact sheet PNG: one row per clip, three of its frames each.

    Each row shows the clip's rank, its value (labelled `value_label`), its file name and
    parent folder (cut in the middle with an ellipsis when long), then the first, middle
    and last of the 14 frames the model sees (`SHEET_FRAMES`: sampled frames 0, 7 and 13,
    read with `video.read_clip`, the encoder's reader and sampling). A clip whose file
    cannot be read any more gets its reason in red where the frames would be; nothing
    raises for a bad video. Rows are drawn in the order given (rank them first).

    The sheet is `ContactSheetLayout(n_rows, dpi).size_pixels` large: 810 pixels wide and
    about 116 pixels per row at dpi 100. At most `max_rows` rows are drawn (default 50,
    about 5,900 pixels tall); beyond that the footnote says how many were left out.

    Args:
      entries: RankedClip or (rank: int, video path: str, value: float) per clip.
      path: the PNG to write (parent folders are created); written atomically.
      title: drawn at the top (default: "N clips ranked by VALUE_LABEL").
      value_label: what the values are, e.g. "lFFA mean".
      max_rows: rows drawn at most (>= 1).
      pad_short: `read_sheet_row`'s (True shows a short clip as --pad-short fed it).
      dpi: pixels per inch of the PNG.
      decode_threads: videos read at once.
    Returns:
      `path` as a Path.
    Raises:
      PlotDependencyError: matplotlib is not installed.
      InvalidParameterError: an entry that is not (rank, path, value), or max_rows < 1.
    """
    require_matplotlib()
    from matplotlib.lines import Line2D

    if max_rows < 1:
        raise InvalidParameterError(f"contact_sheet: max_rows must be at least 1, got {max_rows}")
    clips = [_as_ranked_clip(e) for e in entries]
    shown = clips[:max_rows]
    layout = ContactSheetLayout(len(shown), dpi=dpi)
    min_size = (round(layout.frame_height * dpi), round(layout.frame_width * dpi))
    with ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="berg-sheet") as pool:
        rows = list(pool.map(lambda c: read_sheet_row(c, pad_short=pad_short, min_size=min_size), shown))

    fig = new_figure(*layout.size_inches)
    fig.patch.set_facecolor("white")
    fig_w, fig_h = layout.size_inches
    heading = _display_text(title if title is not None else f"{len(clips)} clips ranked by {value_label}")
    value_label = _display_text(value_label)
    fig.text(layout.margin / fig_w, 1 - (layout.margin + layout.title_height / 2) / fig_h, heading,
             ha="left", va="center", fontsize=13, fontweight="bold", color=_TEXT_COLOUR, parse_math=False)
    heading_y = 1 - (layout.margin + layout.title_height + layout.heading_height / 2) / fig_h
    fig.text(layout.margin / fig_w, heading_y, f"rank, {value_label}, file", ha="left", va="center",
             fontsize=8, color=_MUTED_COLOUR, parse_math=False)
    for column, (name, index) in enumerate(zip(("first", "middle", "last"), SHEET_FRAMES)):
        x = (layout.frame_left(column) + layout.frame_width / 2) / fig_w
        fig.text(x, heading_y, f"{name} (frame {index + 1} of {N_FRAMES})", ha="center", va="center",
                 fontsize=8, color=_MUTED_COLOUR)
    for i, row in enumerate(rows):
        _draw_row(fig, layout, i, row, value_label)
        y = 1 - layout.row_top(i + 1) / fig_h
        fig.add_artist(Line2D([layout.margin / fig_w, 1 - layout.margin / fig_w], [y, y],
                              transform=fig.transFigure, color=_RULE_COLOUR, linewidth=0.6))
    note = f"frames: the first, middle and last of the {N_FRAMES} frames the model sees"
    if len(clips) > len(shown):
        note += f"; the first {len(shown)} of {len(clips)} ranked clips are shown"
    fig.text(layout.margin / fig_w, (layout.footer_height / 2) / fig_h, note, ha="left", va="center",
             fontsize=7.5, color=_MUTED_COLOUR, parse_math=False)
    return save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- ROI means


def hemisphere_order(roi_names: Sequence[str]) -> list[int]:
    """Indices into `roi_names` that put each left ROI beside its right partner, left first.

    A pair is "lX" and "rX" both present (BERG's names: lFFA / rFFA, lhV4 / rhV4,
    lIPS1-2-3 / rIPS1-2-3); a pair takes the place of whichever of the two comes first;
    every other name (BMDgeneral) keeps its place. Returns a permutation of range(R).
    """
    names = list(roi_names)
    where = {name: i for i, name in enumerate(names)}
    order: list[int] = []
    placed: set[int] = set()
    for i, name in enumerate(names):
        if i in placed:
            continue
        partner = None
        if len(name) > 1 and name[0] in "lr":
            partner = where.get(("r" if name[0] == "l" else "l") + name[1:])
        if partner is None or partner in placed:
            pair = [i]
        else:
            pair = [i, partner] if name[0] == "l" else [partner, i]
        order += pair
        placed.update(pair)
    return order


def roi_means_bars(
    values: Sequence[float] | np.ndarray,
    roi_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    value_label: str = "mean response (z)",
    dpi: int = 100,
) -> Path:
    """Draw one clip's ROI means as a bar plot PNG (e.g. BERG's 47 ROIs, `berg_files.ROI_NAMES`).

    Bars in `hemisphere_order` (lX beside rX), left hemisphere blue, right orange, others
    grey; a zero line; an ROI without a value (NaN) gets a grey cross on the zero line
    instead of a bar. Written atomically.

    Args:
      values: (R,) float, ROI r's mean response.
      roi_names: R names, in the order of `values`.
      path: the PNG to write (parent folders are created).
      title: drawn at the top.
      value_label: the y axis' label.
    Returns:
      `path` as a Path.
    Raises:
      PlotDependencyError: matplotlib is not installed.
      InvalidParameterError: values not 1-D, or not as many as roi_names, or none.
    """
    require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    values = np.asarray(values, dtype=np.float64)
    names = [str(n) for n in roi_names]
    if values.ndim != 1 or values.size != len(names) or not names:
        raise InvalidParameterError(
            f"roi_means_bars: values must be 1-D with one value per ROI name; got shape "
            f"{values.shape} for {len(names)} names")
    order = hemisphere_order(names)
    # Pairs sit together; a small gap separates one pair (or lone ROI) from the next.
    positions, x = [], 0.0
    for k, i in enumerate(order):
        if k and not (names[i][0] == "r" and names[order[k - 1]][0] == "l"
                      and names[i][1:] == names[order[k - 1]][1:]):
            x += 0.45
        positions.append(x)
        x += 1.0
    colours = {"l": "#3b6fb6", "r": "#e08a2c"}
    # A hemisphere is the name's first letter, l or r, before BERG's capital or digit (lFFA, r7AL) or
    # the h of lhV4 / rhV4: so an ROI whose partner is missing keeps its colour.
    sides = [names[i][0] if len(names[i]) > 1 and names[i][0] in "lr"
             and (names[i][1].isupper() or names[i][1].isdigit() or names[i][1] == "h") else None for i in order]
    bar_colours = [colours[side] if side else "#8c8c8c" for side in sides]
    shown = values[order]
    finite = np.isfinite(shown)

    # Inches: the title, then the legend, in the top band; the rotated names in the bottom one.
    left, right, top, bottom, height = 0.8, 0.2, 0.75, 0.95, 4.3
    width = max(6.0, left + right + 0.17 * x)
    fig = new_figure(width, height)
    fig.patch.set_facecolor("white")
    ax = fig.add_axes([left / width, bottom / height, 1 - (left + right) / width, 1 - (top + bottom) / height])
    ax.bar(np.asarray(positions)[finite], shown[finite], width=0.9,
           color=np.asarray(bar_colours)[finite], edgecolor="none")
    if (~finite).any():
        ax.plot(np.asarray(positions)[~finite], np.zeros(int((~finite).sum())), linestyle="none",
                marker="x", color="#8c8c8c", markersize=6)
    ax.axhline(0.0, color="#202020", linewidth=0.8)
    ax.set_xticks(positions)
    ax.set_xticklabels([_display_text(names[i]) for i in order], rotation=90, fontsize=8)
    ax.set_xlim(positions[0] - 0.8, positions[-1] + 0.8)
    if finite.any():
        low, high = min(0.0, float(shown[finite].min())), max(0.0, float(shown[finite].max()))
        pad = 0.08 * ((high - low) or 1.0)
        ax.set_ylim(low - pad, high + pad)
    else:
        ax.set_ylim(-1.0, 1.0)
    ax.set_ylabel(_display_text(value_label), fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.6)
    ax.set_axisbelow(True)
    handles = [Patch(color=colours["l"], label="left hemisphere"),
               Patch(color=colours["r"], label="right hemisphere")]
    if any(side is None for side in sides):
        handles.append(Patch(color="#8c8c8c", label="no hemisphere"))
    if (~finite).any():
        handles.append(Line2D([], [], linestyle="none", marker="x", color="#8c8c8c", label="no value (NaN)"))
    fig.legend(handles=handles, fontsize=7.5, frameon=False, loc="center right",
               bbox_to_anchor=(1 - right / width, 1 - 0.55 / height), ncol=len(handles))
    if title is not None:
        fig.text(left / width, 1 - 0.22 / height, _display_text(title), ha="left", va="center", fontsize=11,
                 fontweight="bold", parse_math=False)
    return save_figure(fig, path, dpi)
