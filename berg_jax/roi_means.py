"""ROI means as a head: all of a subject's ROI mean responses from one (K, R) matmul.

An ROI's mean response is linear in the K components c:

    mean_{v in ROI} (c . w_v + b_v) = c . mean_{v in ROI}(w_v) + mean_{v in ROI}(b_v)

so the subject's R ROIs (47 in BERG's metadata) fold, once at load time, into a
`Regression` of the same form as the voxel head -- coef (K, R), intercept (R,) -- that the
encoder applies to the same components (`fused.encode_outputs`): S3D runs once and a
screen writes R numbers per clip and subject instead of ~108k.

Files (written by `pipeline.encode_files`, `merge`, `berg-jax responses --roi-means`):

- `roi_means_sub-SS.npy`: float32 (n_inputs, R), row i = input i, column j = the j-th ROI
  of `roi_names` (BERG's `ROI_NAMES` order, only the subject's ROIs); a failed input's
  row is NaN. Written through `writer.ResponseWriter` like every array of an encode job.
- `roi_means_sub-SS.csv`: header `path,row,<ROI names>`, one line per input in row order,
  values as `%.9g` (float32 round-trips exactly), a failed input's values empty.
  An encode job also records the names in job.json (`run_config["roi_means"]`:
  {npy file: [ROI names]}).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from berg_jax import berg_files, head
from berg_jax.atomic import atomic_open, csv_field
from berg_jax.fused import ROI_MEANS  # the outputs' key in `encode_outputs` and `BERG.encode`

__all__ = ["CONFIG_KEY", "ROI_MEANS", "RoiHead", "fold_roi_means", "load_roi_head", "read_csv_header",
           "roi_means_csv_file", "roi_means_file", "roi_names", "subject_of_file", "write_csvs_for_job",
           "write_roi_means_csv"]
# Key of the ROI names in an encode job's run_config (job.json), {npy file: [names]}.
CONFIG_KEY = "roi_means"
CSV_BLOCK_ROWS = 4096  # rows formatted per write: memory stays bounded for any n


@dataclasses.dataclass(frozen=True)
class RoiHead:
    """A subject's ROI-mean head.

    names: the R ROI names, column order of every ROI-mean output.
    regression: {"coef": float32 (K, R), "intercept": float32 (R,)}, the form `head.regress` takes.
    """

    names: tuple[str, ...]
    regression: head.Regression


def roi_names(metadata: Mapping) -> tuple[str, ...]:
    """The subject's ROIs in BERG's `ROI_NAMES` order, then any other names it has, sorted."""
    rois = metadata["fmri"]["rois"]
    return tuple(n for n in berg_files.ROI_NAMES if n in rois) + tuple(
        sorted(str(n) for n in rois if n not in berg_files.ROI_NAMES))


def fold_roi_means(regression: head.Regression, metadata: Mapping) -> RoiHead:
    """Fold a subject's whole-brain regression into its ROI-mean head.

    Args:
      regression: {"coef": (K, N_s), "intercept": (N_s,)}, whole brain (`head.load_regression`
        with voxels=None), any float dtype.
      metadata: the subject's BERG metadata (`berg_files.load_metadata`).
    Returns:
      RoiHead with coef (K, R) and intercept (R,) float32: each ROI's column is the mean,
      accumulated in float64, of its voxels' columns (indices `berg_files.roi_voxel_indices`,
      as stored), then rounded once to float32 -- the same weights the voxel head holds,
      averaged without float32 rounding error.
    Raises:
      ValidationError / ModelLoadError: an ROI without voxels or with malformed indices.
    """
    coef, intercept = np.asarray(regression["coef"]), np.asarray(regression["intercept"])
    names = roi_names(metadata)
    k = coef.shape[0]
    out_coef = np.empty((k, len(names)), np.float64)
    out_intercept = np.empty(len(names), np.float64)
    for j, name in enumerate(names):
        idx = berg_files.roi_voxel_indices(metadata, name)
        out_coef[:, j] = coef[:, idx].mean(axis=1, dtype=np.float64)
        out_intercept[j] = intercept[idx].mean(dtype=np.float64)
    return RoiHead(names, {"coef": out_coef.astype(np.float32), "intercept": out_intercept.astype(np.float32)})


def load_roi_head(berg_dir: str | os.PathLike, subject: int) -> RoiHead:
    """A subject's ROI-mean head from berg_dir's converted regression and BERG's metadata.

    The regression must be converted already (`head.ensure_converted`); folding takes
    milliseconds, so it is done at each load rather than stored.
    """
    return fold_roi_means(head.load_regression(berg_dir, subject), berg_files.load_metadata(berg_dir, subject))


def roi_means_file(subject: int) -> str:
    """`roi_means_sub-SS.npy`: float32 (n, R) ROI means (always named by subject, even alone)."""
    return f"roi_means_sub-{berg_files.check_subject(subject):02d}.npy"


def roi_means_csv_file(subject: int) -> str:
    """`roi_means_sub-SS.csv`, the CSV beside `roi_means_file(subject)`."""
    return roi_means_file(subject)[: -len(".npy")] + ".csv"


def subject_of_file(name: str) -> int | None:
    """`roi_means_sub-SS.npy` (or .csv) -> SS; None for any other name."""
    stem = name.rsplit(".", 1)[0]
    prefix = "roi_means_sub-"
    if not stem.startswith(prefix) or not stem[len(prefix):].isdigit():
        return None
    return int(stem[len(prefix):])


def write_roi_means_csv(path: str | os.PathLike, means: Any, names: Sequence[str],
                        paths: Sequence[str] | None = None, block_rows: int = CSV_BLOCK_ROWS) -> Path:
    """Write ROI means as CSV, atomically (temporary file, fsync, rename), streamed in blocks.

    Args:
      path: the CSV to write (e.g. OUT/roi_means_sub-01.csv).
      means: float32 (n, R), e.g. a memory-mapped roi_means_sub-SS.npy; read `block_rows` at a time.
      names: the R column names.
      paths: the n inputs' paths (the path column), or None for an empty path column.
    Returns:
      `path`. Header `path,row,<names>`; `\\n` line ends; values `%.9g` (float32 values
      round-trip exactly); NaN values (a failed input's row) are empty fields.
    """
    path = Path(path)
    n, r = means.shape
    if r != len(names):
        raise ValueError(f"{path.name}: {r} columns but {len(names)} names")
    if paths is not None and len(paths) != n:
        raise ValueError(f"{path.name}: {n} rows but {len(paths)} paths")
    values_fmt = ",".join(["%.9g"] * r)
    with atomic_open(path) as f:
        f.write((",".join(csv_field(c) for c in ("path", "row", *names)) + "\n").encode("utf-8"))
        for lo in range(0, n, block_rows):
            block = np.asarray(means[lo: lo + block_rows], dtype=np.float64)
            nan = np.isnan(block)
            buf = io.StringIO()
            for j, (row, holes) in enumerate(zip(block.tolist(), nan.any(axis=1).tolist())):
                i = lo + j
                buf.write(f"{csv_field(paths[i]) if paths is not None else ''},{i},")
                if holes:  # a failed row: NaN in every column, written as empty fields
                    buf.write(",".join("" if v != v else "%.9g" % v for v in row))
                else:
                    buf.write(values_fmt % tuple(row))
                buf.write("\n")
            f.write(buf.getvalue().encode("utf-8", errors="surrogateescape"))
    return path


def read_csv_header(path: str | os.PathLike) -> tuple[str, ...] | None:
    """The ROI names of a roi_means CSV (its header after `path,row`), or None if it has none."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            header = next(csv.reader(f), None)
    except OSError:
        return None
    if not header or tuple(header[:2]) != ("path", "row"):
        return None
    return tuple(header[2:])


def write_csvs_for_job(out_dir: str | os.PathLike, paths: Sequence[str], run_config: Mapping) -> dict[str, Path]:
    """Each ROI-mean array of an encode job in OUT -> its CSV beside it; {files key: csv path}.

    For `pipeline.encode_files` and `merge`, which then write identical CSVs: the arrays are
    identical and the names come from the job's run_config.
    """
    out = Path(out_dir)
    written = {}
    for npy, names in (run_config.get(CONFIG_KEY) or {}).items():
        csv_name = npy[: -len(".npy")] + ".csv"
        means = np.load(out / npy, mmap_mode="r")
        written[csv_name[: -len(".csv")] + "_csv"] = write_roi_means_csv(out / csv_name, means, names, paths)
        del means
    return written
