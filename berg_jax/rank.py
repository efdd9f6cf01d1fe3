"""Rank the videos of an encode output by an ROI's mean response, or a contrast of two ROIs.

    from berg_jax.rank import rank_videos
    ranking = rank_videos("screen/", "lFFA", minus_roi="rFFA", subject=1, top=20, bottom=20)
    for clip in ranking.top:                  # RankedVideo(end, rank, row, path, value)
        print(clip.rank, clip.value, clip.path)
    ranking.records()                         # [(row, path, value), ...]: top, then bottom

What is ranked, per video: the ROI's mean response (`--roi`), minus another ROI's
(`--minus-roi`), for one subject or averaged over subjects (`mean_over_subjects`; by
linearity the same as the contrast of the subject-averaged means). Read from OUT, in this
order of preference, per subject:

1. `roi_means_sub-SS.npy` (`encode --roi-means`, `berg-jax responses --roi-means`), the
   ROI names from OUT/job.json (`run_config["roi_means"]`) or the CSV's header;
2. whole-brain responses (`responses.npy` of a one-subject job, `responses_sub-SS.npy`),
   averaged over the ROI's voxels from BERG's metadata (needs `berg_dir`; the job's
   selection must be the whole brain);
3. `components.npy` through the subject's ROI-mean head (needs `berg_dir`; any subject).

Streaming: `batch_rows` rows at a time (default: about 64 MB of the array read), keeping
only the best `top` and `bottom` candidates, so the arrays of a million rows need no more
memory than a block (the input paths come from job.json, read whole). Order: by value (largest first for the top, smallest first for the bottom), ties by
row (smaller first). A row whose value is NaN (a failed input, or a row not computed yet)
is skipped and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from berg_jax import berg_files
from berg_jax.atomic import atomic_write_text, csv_line
from berg_jax.errors import UsageError, ValidationError
from berg_jax.roi_means import CONFIG_KEY, read_csv_header, roi_means_file, roi_names, subject_of_file
from berg_jax.writer import COMPONENTS_FILE, JOB_FILE

__all__ = ["RankedVideo", "Ranking", "rank_videos", "ranked_roi_means", "ranking_file_name", "write_ranking_csv"]

BLOCK_BYTES = 64 << 20  # default rows per block: about this many bytes of the array read
RANKING_COLUMNS = ("end", "rank", "row", "path", "value")


@dataclasses.dataclass(frozen=True)
class RankedVideo:
    """One ranked video: `end` "top" or "bottom", `rank` 1..K from that end, `row` in OUT's
    arrays, `path` the input (empty if OUT does not record it), `value` the measure (float64)."""

    end: str
    rank: int
    row: int
    path: str
    value: float


@dataclasses.dataclass
class Ranking:
    """The result of `rank_videos`.

    measure: what was ranked, e.g. "lFFA" or "lFFA - rFFA"; who: "sub-01" or "mean over
    sub-01, sub-02"; sources: {subject: file it was read from}; n_rows: rows read;
    n_skipped: NaN rows skipped; top / bottom: the ranked videos from each end.
    """

    measure: str
    who: str
    sources: dict[int, str]
    n_rows: int
    n_skipped: int
    top: list[RankedVideo]
    bottom: list[RankedVideo]
    roi: str = ""
    minus_roi: str | None = None
    subjects: tuple[int, ...] = ()
    top_k: int = 0  # as asked (top / bottom hold fewer when fewer rows have values)
    bottom_k: int = 0

    def records(self) -> list[tuple[int, str, float]]:
        """(row, path, value) of every ranked video: the top ones, then the bottom ones."""
        return [(v.row, v.path, v.value) for v in (*self.top, *self.bottom)]


# --------------------------------------------------------------------------- sources


class _Source:
    """One subject's measure, read `rows` at a time: (m,) float64 per block."""

    path: Path
    n_rows: int
    row_bytes: int

    def values(self, lo: int, hi: int) -> np.ndarray:
        raise NotImplementedError


class _ColumnsSource(_Source):
    """A float32 (n, width) array whose ROI value is the mean of some columns (one column for ROI means)."""

    def __init__(self, path: Path, array: np.ndarray, plus: np.ndarray, minus: np.ndarray | None):
        self.path, self.array, self.plus, self.minus = path, array, plus, minus
        self.n_rows = array.shape[0]
        self.row_bytes = array.shape[1] * array.dtype.itemsize

    def values(self, lo: int, hi: int) -> np.ndarray:
        block = np.asarray(self.array[lo:hi])
        v = block[:, self.plus].mean(axis=1, dtype=np.float64)
        if self.minus is not None:
            v = v - block[:, self.minus].mean(axis=1, dtype=np.float64)
        return v


class _ComponentsSource(_Source):
    """components.npy through the subject's ROI-mean head (the two ROIs' columns only)."""

    def __init__(self, path: Path, array: np.ndarray, regression: dict, minus: bool):
        self.path, self.array, self.regression, self.minus = path, array, regression, minus
        self.n_rows = array.shape[0]
        self.row_bytes = array.shape[1] * array.dtype.itemsize

    def values(self, lo: int, hi: int) -> np.ndarray:
        from berg_jax.api import apply_head

        means = apply_head(np.asarray(self.array[lo:hi]), self.regression).astype(np.float64)
        return means[:, 0] - means[:, 1] if self.minus else means[:, 0]


def _load_job(out: Path) -> dict | None:
    try:
        job = json.loads((out / JOB_FILE).read_text("utf-8", errors="surrogateescape"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{out / JOB_FILE} is not readable JSON ({exc}): is {out} an encode output folder?") from None
    return job if isinstance(job, dict) else None


def _open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable .npy ({exc}); encode again into a new folder") from None
    if array.ndim != 2 or array.dtype != np.float32:
        raise UsageError(f"{path}: expected a float32 (n, columns) array, found {array.dtype} {array.shape}")
    return array


def _check_roi(name: str, names: tuple[str, ...] | list[str], where: str) -> None:
    if name not in names:
        raise ValidationError(f"unknown ROI {name!r} in {where}; valid ROIs: {', '.join(names)}")


def _responses_files(job: dict | None) -> dict[int, str]:
    """{subject: responses file} of an encode job, from its run_config and arrays."""
    if job is None:
        return {}
    config = job.get("run_config") or {}
    arrays = job.get("arrays") or {}
    subject = config.get("subject")
    found = {}
    if isinstance(subject, int) and "responses.npy" in arrays:
        found[subject] = "responses.npy"
    for name in arrays:
        if name.startswith("responses_sub-") and name.endswith(".npy") and name[14:-4].isdigit():
            found[int(name[14:-4])] = name
    return found


def _roi_means_names(out: Path, job: dict | None, name: str) -> tuple[str, ...]:
    recorded = ((job or {}).get("run_config") or {}).get(CONFIG_KEY) or {}
    if name in recorded:
        return tuple(recorded[name])
    header = read_csv_header(out / (name[: -len(".npy")] + ".csv"))
    if header is None:
        raise UsageError(f"{out / name}: its ROI names are recorded neither in {out / JOB_FILE} nor in "
                         f"{name[: -len('.npy')]}.csv; write the ROI means again (`berg-jax encode "
                         "--roi-means` or `berg-jax responses --roi-means`)")
    return header


def _available(out: Path, job: dict | None) -> dict[int, list[str]]:
    """{subject: the files in OUT that hold its ROI means or responses, preferred first}."""
    found: dict[int, list[str]] = {}
    for path in sorted(out.glob("roi_means_sub-*.npy")):
        s = subject_of_file(path.name)
        if s is not None:
            found.setdefault(s, []).append(path.name)
    for s, name in _responses_files(job).items():
        if (out / name).is_file():
            found.setdefault(s, []).append(name)
    return dict(sorted(found.items()))


def _source(out: Path, job: dict | None, subject: int, name: str, roi: str, minus_roi: str | None,
            berg_dir: str | os.PathLike | None) -> _Source:
    """`subject`'s measure from OUT/`name`: its ROI means, or its whole-brain responses."""
    wanted = [r for r in (roi, minus_roi) if r is not None]
    path = out / name
    if name == roi_means_file(subject):
        names = _roi_means_names(out, job, name)
        for r in wanted:
            _check_roi(r, names, str(path))
        array = _open_npy(path)
        if array.shape[1] != len(names):
            raise UsageError(f"{path} has {array.shape[1]} columns but {len(names)} ROI names are recorded")
        cols = [np.array([names.index(r)]) for r in wanted]
        return _ColumnsSource(path, array, cols[0], cols[1] if minus_roi else None)
    selection = ((job or {}).get("run_config") or {}).get("selection")
    if selection is not None:
        raise UsageError(f"{path} holds the voxels of selection {selection}, not the whole brain, so "
                         f"ROI means cannot be taken from it: encode with --roi-means (or without "
                         "--roi/--voxels) to rank")
    if berg_dir is None:
        raise UsageError(f"{path} holds whole-brain responses: give --berg-dir DIR (BERG's files, for "
                         "the ROIs' voxels), or encode with --roi-means")
    metadata = berg_files.load_metadata(berg_dir, subject)
    for r in wanted:
        _check_roi(r, roi_names(metadata), f"sub-{subject:02d}'s metadata")
    idx = [berg_files.roi_voxel_indices(metadata, r) for r in wanted]
    return _ColumnsSource(path, _open_npy(path), idx[0], idx[1] if minus_roi else None)


def _components_source(out: Path, subject: int, roi: str, minus_roi: str | None,
                       berg_dir: str | os.PathLike) -> _Source:
    from berg_jax.api import load_roi_heads

    path = out / COMPONENTS_FILE
    roi_head = load_roi_heads(berg_dir, subject, "cpu")[subject]
    wanted = [r for r in (roi, minus_roi) if r is not None]
    for r in wanted:
        _check_roi(r, roi_head.names, f"sub-{subject:02d}'s metadata")
    cols = np.array([roi_head.names.index(r) for r in wanted])
    regression = {"coef": np.asarray(roi_head.regression["coef"])[:, cols],
                  "intercept": np.asarray(roi_head.regression["intercept"])[cols]}
    array = _open_npy(path)
    if array.shape[1] != regression["coef"].shape[0]:
        raise UsageError(f"{path} has {array.shape[1]} components per video, the model in {berg_dir} K = "
                         f"{regression['coef'].shape[0]}: give the --berg-dir it was encoded with")
    return _ComponentsSource(path, array, regression, minus_roi is not None)


def _what_to_run(out: Path) -> str:
    return (f"{out} holds no ROI means, responses or components to rank: run `berg-jax encode VIDEOS "
            f"--berg-dir DIR --subject N --roi-means --no-responses --out {out}` first (or rank the "
            "folder such a run wrote)")


# --------------------------------------------------------------------------- top and bottom


class _Best:
    """The k best (value, row) pairs seen so far; ties by row, smaller first."""

    def __init__(self, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.values = np.empty(0, np.float64)
        self.rows = np.empty(0, np.int64)

    def add(self, values: np.ndarray, rows: np.ndarray) -> None:
        if self.k == 0 or values.size == 0:
            return
        v = np.concatenate([self.values, values])
        r = np.concatenate([self.rows, rows])
        key = -v if self.largest else v
        if key.size > 4 * self.k:
            # Cheap cut first: keep every entry at least as good as the k-th (ties included).
            kth = np.partition(key, self.k - 1)[self.k - 1]
            keep = key <= kth
            v, r, key = v[keep], r[keep], key[keep]
        order = np.lexsort((r, key))[: self.k]
        self.values, self.rows = v[order], r[order]


def _blocks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, step):
        yield lo, min(lo + step, n)


def rank_videos(
    out_dir: str | os.PathLike,
    roi: str,
    *,
    minus_roi: str | None = None,
    subject: int | None = None,
    mean_over_subjects: bool = False,
    top: int = 10,
    bottom: int = 0,
    berg_dir: str | os.PathLike | None = None,
    batch_rows: int | None = None,
) -> Ranking:
    """The `top` and `bottom` videos of an encode output by ROI mean (or contrast); see the module docstring.

    Args:
      out_dir: an encode output folder (or one `berg-jax responses --roi-means` wrote).
      roi: the ROI whose mean response is ranked; minus_roi: subtract this ROI's mean.
      subject: the subject (1..10); None: the only subject in OUT. mean_over_subjects:
        average over every subject OUT holds (for components only: every subject in berg_dir).
      top, bottom: how many videos from each end (>= 0).
      berg_dir: BERG's files, needed to rank from responses or components.
      batch_rows: rows read per block (default: about 64 MB of the array).
    Returns:
      Ranking (paths from OUT/job.json, else from the ROI-means CSV, else empty).
    Raises:
      ValidationError: an unknown ROI (the message lists the valid ones).
      UsageError: nothing to rank in OUT (the message says what to run), no --berg-dir where
        one is needed, an ambiguous or missing subject, a selection that is not the whole brain.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder: pass the --out of `berg-jax encode`")
    if top < 0 or bottom < 0 or top + bottom == 0:
        raise UsageError(f"rank at least one video: top={top}, bottom={bottom}")
    if minus_roi is not None and minus_roi == roi:
        raise UsageError(f"--roi and --minus-roi are both {roi!r}: name two ROIs")
    if subject is not None and mean_over_subjects:
        raise UsageError("give --subject N or --mean-over-subjects, not both")
    if subject is not None:
        subject = berg_files.check_subject(subject)
    job = _load_job(out)
    found = _available(out, job)
    has_components = (out / COMPONENTS_FILE).is_file()

    if subject is not None:
        subjects: tuple[int, ...] = (subject,)
    elif found:
        subjects = tuple(found)
        if len(subjects) > 1 and not mean_over_subjects:
            raise UsageError(f"{out} holds subjects {', '.join(map(str, subjects))}: give --subject N, or "
                             "--mean-over-subjects to average them")
    elif has_components:
        if berg_dir is None:
            raise UsageError(f"{out} holds components only: give --berg-dir DIR (and --subject N or "
                             "--mean-over-subjects) to rank through the ROI-mean head")
        if not mean_over_subjects:
            raise UsageError(f"{out} holds components only: give --subject N (or --mean-over-subjects)")
        from berg_jax.head import available_subjects

        subjects = tuple(available_subjects(berg_dir))
        if not subjects:
            raise UsageError(f"{berg_dir} holds no subject's weights: `berg-jax fetch --berg-dir {berg_dir} "
                             "--subjects N`")
    else:
        raise UsageError(_what_to_run(out))

    sources: dict[int, _Source] = {}
    for s in subjects:
        if s in found:
            sources[s] = _source(out, job, s, found[s][0], roi, minus_roi, berg_dir)  # the preferred file
        elif has_components and berg_dir is not None:
            sources[s] = _components_source(out, s, roi, minus_roi, berg_dir)
        elif has_components:
            raise UsageError(f"{out} holds no ROI means or responses of subject {s}, only components: "
                             "give --berg-dir DIR to rank through the ROI-mean head")
        elif found:
            raise UsageError(f"{out} holds no ROI means or responses of subject {s} (it has subjects "
                             f"{', '.join(map(str, found))})")
        else:
            raise UsageError(_what_to_run(out))
    n_rows = {src.n_rows for src in sources.values()}
    if len(n_rows) != 1:
        raise UsageError(f"{out}: the arrays have different row counts "
                         f"({', '.join(f'{src.path.name}: {src.n_rows}' for src in sources.values())})")
    n = n_rows.pop()
    if batch_rows is None:
        batch_rows = max(1, BLOCK_BYTES // max(src.row_bytes for src in sources.values()))

    best_top, best_bottom = _Best(top, largest=True), _Best(bottom, largest=False)
    n_skipped = 0
    for lo, hi in _blocks(n, int(batch_rows)):
        values = sources[subjects[0]].values(lo, hi)
        for s in subjects[1:]:
            values = values + sources[s].values(lo, hi)
        values = values / len(subjects)
        ok = ~np.isnan(values)
        n_skipped += int(values.size - np.count_nonzero(ok))
        rows = np.arange(lo, hi, dtype=np.int64)[ok]
        best_top.add(values[ok], rows)
        best_bottom.add(values[ok], rows)

    wanted = {int(r) for r in (*best_top.rows, *best_bottom.rows)}
    paths = _paths(out, job, subjects, wanted, n)

    def ranked(best: _Best, end: str) -> list[RankedVideo]:
        return [RankedVideo(end, i + 1, int(r), paths.get(int(r), ""), float(v))
                for i, (v, r) in enumerate(zip(best.values, best.rows))]

    measure = roi if minus_roi is None else f"{roi} - {minus_roi}"
    who = f"sub-{subjects[0]:02d}" if len(subjects) == 1 else \
        f"mean over {', '.join(f'sub-{s:02d}' for s in subjects)}"
    return Ranking(measure, who, {s: src.path.name for s, src in sources.items()}, n, n_skipped,
                   ranked(best_top, "top"), ranked(best_bottom, "bottom"), roi, minus_roi, subjects, top, bottom)


def _paths(out: Path, job: dict | None, subjects: tuple[int, ...], rows: set[int], n: int) -> dict[int, str]:
    """{row: input path} for `rows`: from job.json's inputs, else a ROI-means CSV's path column."""
    inputs = (job or {}).get("inputs")
    if isinstance(inputs, list) and len(inputs) == n:
        return {r: inputs[r] for r in rows}
    for s in subjects:
        path = out / (roi_means_file(s)[: -len(".npy")] + ".csv")
        if not rows or not path.is_file():
            continue
        found = {}
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            next(reader, None)
            for record in reader:  # streamed: only the wanted rows are kept
                if len(record) >= 2 and record[1].isdigit() and int(record[1]) in rows:
                    found[int(record[1])] = record[0]
        return found
    return {}


# --------------------------------------------------------------------------- output


def ranking_file_name(ranking: Ranking) -> str:
    """`rank_<roi>[_minus_<roi>]_<sub-SS|mean-over-subjects>_top-K[_bottom-K].csv` (K as asked)."""
    measure = ranking.roi + (f"_minus_{ranking.minus_roi}" if ranking.minus_roi else "")
    who = f"sub-{ranking.subjects[0]:02d}" if len(ranking.subjects) == 1 else "mean-over-subjects"
    ends = "_".join([f"top-{ranking.top_k}"] * bool(ranking.top_k) + [f"bottom-{ranking.bottom_k}"] * bool(ranking.bottom_k))
    return f"rank_{measure}_{who}_{ends}.csv"


def write_ranking_csv(ranking: Ranking, path: str | os.PathLike) -> Path:
    """The ranking as CSV (atomically): header `end,rank,row,path,value`, the top rows then
    the bottom rows, values as `%.9g` (a float32 ROI mean round-trips exactly)."""
    text = csv_line(RANKING_COLUMNS) + "".join(
        csv_line((v.end, v.rank, v.row, v.path, "%.9g" % v.value)) for v in (*ranking.top, *ranking.bottom))
    path = Path(path)
    atomic_write_text(path, text)
    return path


def ranked_roi_means(ranking: Ranking, out_dir: str | os.PathLike) -> tuple[tuple[str, ...], dict[int, np.ndarray]]:
    """Every ROI mean of each ranked video: (ROI names, {row: float64 (R,)}), from OUT's ROI means.

    Averaged over `ranking.subjects` when there are several (`--mean-over-subjects`); each
    subject's ROI means must be in OUT (`encode --roi-means`).

    Raises:
      UsageError: a subject's ROI means are not in OUT, or the subjects have other ROIs.
    """
    out = Path(out_dir)
    job = _load_job(out)
    rows = sorted({v.row for v in (*ranking.top, *ranking.bottom)})
    names: tuple[str, ...] | None = None
    total = {r: None for r in rows}
    for s in ranking.subjects:
        name = roi_means_file(s)
        if not (out / name).is_file():
            raise UsageError(f"{out / name} is missing: the bar plots show OUT's ROI means; encode with "
                             f"--roi-means (or run `berg-jax responses --roi-means`) for sub-{s:02d}")
        these = _roi_means_names(out, job, name)
        if names is not None and these != names:
            raise UsageError(f"sub-{s:02d} has other ROIs than the first subject: draw the bars per subject")
        names = these
        means = np.load(out / name, mmap_mode="r")
        for r in rows:
            row = np.asarray(means[r], np.float64)
            total[r] = row if total[r] is None else total[r] + row
        del means
    n = max(len(ranking.subjects), 1)
    return names or (), {r: v / n for r, v in total.items()}
