"""Glass-brain pictures: a response vector, and the model's test accuracy, on MNI152.

Optional: needs the `plot` extra (nilearn + matplotlib), `pip install 'berg-jax[plot]'`.
`new_figure`, `save_figure` and `require_matplotlib` are shared with `screening_plots`
(pictures without a brain: matplotlib alone).
Nothing here is imported by the rest of berg-jax until a picture is asked for, and a
missing extra raises `PlotDependencyError` with that install line.

Pictures are nilearn glass brains (maximum-intensity projections through the MNI152
outline, sagittal / coronal / axial) of volumes built with `volumes.responses_to_volume`
from the subject's `sub_mask` and `sub_mask_affine` (voxels outside the selection are NaN
and not drawn). Rendering uses matplotlib's headless Agg backend unless the caller already
chose a backend (a notebook keeps its own), and every PNG is written atomically.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from berg_jax.atomic import atomic_write_bytes
from berg_jax.errors import BERGError, ModelLoadError

PLOT_EXTRA = "pip install 'berg-jax[plot]'"

__all__ = [
    "PLOT_EXTRA",
    "PlotDependencyError",
    "accuracy_maps",
    "new_figure",
    "plot_accuracy",
    "plot_response",
    "require_matplotlib",
    "require_plotting",
    "response_image",
    "save_figure",
]


class PlotDependencyError(BERGError, ImportError):
    """nilearn or matplotlib (the `plot` extra) is not installed."""


def require_matplotlib() -> Any:
    """Import matplotlib (on Agg when headless), or raise.

    For pictures that need no brain template (`screening_plots`); `require_plotting` adds nilearn.
    Returns:
      the `matplotlib` module.
    Raises:
      PlotDependencyError: with the pip line that installs the `plot` extra.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotDependencyError(f"plotting needs matplotlib: {PLOT_EXTRA}") from exc
    if "matplotlib.pyplot" not in sys.modules:
        # Headless by default (servers, CI, the CLI); a session that already imported pyplot
        # (e.g. a notebook with its inline backend) keeps its backend.
        matplotlib.use("Agg")
    return matplotlib


def require_plotting() -> Any:
    """Import nilearn's plotting module (and matplotlib, on Agg when headless), or raise.

    Returns:
      `nilearn.plotting`.
    Raises:
      PlotDependencyError: with the pip line that installs the `plot` extra.
    """
    require_matplotlib()
    try:
        from nilearn import plotting
    except ImportError as exc:
        raise PlotDependencyError(f"plotting needs nilearn: {PLOT_EXTRA}") from exc
    return plotting


def response_image(
    response: np.ndarray,
    sub_mask: np.ndarray,
    affine: np.ndarray,
    selected_indices: Sequence[int] | None = None,
) -> Any:
    """One response vector as a 3-D nibabel image on the subject's MNI152 grid.

    Args:
      response: (n_sel,) float; column j is the j-th selected voxel.
      sub_mask: bool (62, 77, 61), `metadata['fmri']['sub_mask']`.
      affine: (4, 4) `metadata['fmri']['sub_mask_affine']`.
      selected_indices: the selection's indices into the N_s voxels (None: whole brain).
    Returns:
      nibabel.Nifti1Image, float32, NaN outside the selection.
    """
    import nibabel as nib

    from berg_jax.volumes import responses_to_volume

    vol = responses_to_volume(np.asarray(response), sub_mask, selected_indices)
    return nib.Nifti1Image(vol, np.asarray(affine, dtype=float))


def _plot_image(values: np.ndarray, sub_mask: np.ndarray, affine: np.ndarray,
                selected_indices: Sequence[int] | None = None) -> Any:
    """`response_image` with NaN (unselected voxels) as 0, which the threshold hides anyway;
    nilearn would do the same replacement, with a warning per picture."""
    import nibabel as nib

    img = response_image(values, sub_mask, affine, selected_indices)
    return nib.Nifti1Image(np.nan_to_num(np.asarray(img.dataobj), nan=0.0), img.affine)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Render `fig` as a PNG at `dpi` and write it to `path` atomically (parent folders made).

    The PNG is rendered in memory first: a failure while drawing leaves `path` as it was.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of width x height inches with its own Agg canvas (no pyplot).

    Call `require_matplotlib` (or `require_plotting`) first.
    """
    # A bare Figure with an Agg canvas, not pyplot: nothing global to close, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _finite_limit(values: np.ndarray, q: float = 99.0) -> float:
    """A robust colour limit: the q-th percentile of |finite values| (1.0 when none)."""
    v = np.abs(values[np.isfinite(values)])
    if v.size == 0:
        return 1.0
    lim = float(np.percentile(v, q))
    return lim if lim > 0 else float(v.max()) or 1.0


def plot_response(
    response: np.ndarray,
    sub_mask: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    selected_indices: Sequence[int] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw one in silico response vector as a glass brain and save it as a PNG.

    Signed values (z-scored units) on a symmetric blue-red scale clipped at the 99th
    percentile of |response|; voxels below 25% of that limit are left transparent so the
    projection shows where the response is strong rather than a uniform haze.

    Args:
      response: (n_sel,) float, one row of `responses.npy`.
      sub_mask, affine, selected_indices: as in `response_image`.
      path: the PNG to write (parent folders are created).
      title: drawn above the brain.
    Returns:
      `path` as a Path.
    """
    plotting = require_plotting()
    response = np.asarray(response, dtype=np.float32)
    img = _plot_image(response, sub_mask, affine, selected_indices)
    vmax = _finite_limit(response)
    fig = new_figure(8.0, 3.2)
    plotting.plot_glass_brain(
        img, figure=fig, display_mode="lyrz", colorbar=True, plot_abs=False,
        symmetric_cbar=True, vmin=-vmax, vmax=vmax, threshold=0.25 * vmax, cmap="cold_hot",
        title=title, annotate=True, black_bg=False,
    )
    # The figure is not registered with pyplot (see new_figure): saving it is all; it is
    # freed with its last reference, and nilearn's display.close() (plt.close) must not run.
    return save_figure(fig, path, dpi)


def accuracy_maps(metadata: Mapping) -> dict[str, np.ndarray]:
    """The two accuracy maps `plot_accuracy` draws, each (N_s,) float32.

    Keys used from `metadata['encoding_models']` (BERG's
    berg_creation_code/03_test_encoding_models/train_dataset-bmd/01_test_encoding.py
    computed them on BMD's 102 test videos, responses averaged over their 10 repeats):

    * "r2": the squared Pearson correlation between predicted and measured test responses
      per voxel, with negative correlations set to 0 first.
    * "explained_variance": the noise-ceiling-normalised accuracy as BERG stored it, in
      percent: 100 * r2 / noiseceiling_task_test_n_10 (the noise ceiling of the 10-repeat
      test average, zeros replaced by 1e-14), capped at 100. It is used as stored, not
      recomputed, so the picture shows BERG's own numbers.
    """
    accuracy = metadata.get("encoding_models") if isinstance(metadata, Mapping) else None
    out = {}
    for key in ("r2", "explained_variance"):
        if not isinstance(accuracy, Mapping) or key not in accuracy:
            raise ModelLoadError(
                f"metadata has no encoding_models[{key!r}]; re-download the subject's "
                "metadata_sub-SS.npy with `berg-jax fetch`")
        out[key] = np.asarray(accuracy[key], dtype=np.float32).reshape(-1)
    return out


def plot_accuracy(
    metadata: Mapping,
    path: str | os.PathLike,
    *,
    subject: int | None = None,
    dpi: int = 100,
) -> Path:
    """Draw a subject's test accuracy (r2, and % of the noise ceiling) as two glass brains.

    Args:
      metadata: the subject's BERG metadata dict (`berg_files.load_metadata`).
      path: the PNG to write.
      subject: for the titles.
    Returns:
      `path` as a Path.
    """
    plotting = require_plotting()
    fmri = metadata["fmri"]
    sub_mask, affine = fmri["sub_mask"], fmri["sub_mask_affine"]
    maps = accuracy_maps(metadata)
    who = f"subject {subject}: " if subject is not None else ""
    panels = [
        ("r2", f"{who}test accuracy, r\u00b2 (squared Pearson r)"),
        ("explained_variance", f"{who}explained variance, % of the noise ceiling"),
    ]
    fig = new_figure(8.0, 6.4)
    for i, (key, title) in enumerate(panels):
        img = _plot_image(maps[key], sub_mask, affine)
        ax = fig.add_subplot(2, 1, i + 1)
        plotting.plot_glass_brain(
            img, figure=fig, axes=ax, display_mode="lyrz", colorbar=True, plot_abs=False,
            symmetric_cbar=False, vmin=0.0, vmax=max(_finite_limit(maps[key]), 1e-6),
            threshold=1e-6, cmap="afmhot_r",
            title=title, annotate=True, black_bg=False,
        )
    return save_figure(fig, path, dpi)
