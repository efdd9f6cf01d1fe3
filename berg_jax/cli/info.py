"""`berg-jax info`: the model card, and what of the model is present in --berg-dir."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from berg_jax.cli.common import EXIT_OK, file_size
from berg_jax.errors import UsageError


def add_parser(sub: Any) -> None:
    """Register `info`."""
    p = sub.add_parser("info", help="the model card: subjects, voxels, ROIs, files, weights",
                       description="Describe the model and what of it is present in --berg-dir.")
    p.add_argument("--berg-dir", required=True, metavar="DIR")
    p.add_argument("--subject", type=int, metavar="N", help="also list this subject's ROIs and accuracy")
    p.add_argument("--plot", metavar="OUT.png",
                   help="draw the subject's test accuracy on MNI152 (needs --subject and berg-jax[plot])")
    p.add_argument("--s3d-weights", metavar="PTH", help="S3D weights to look for (default: torch hub's cache path)")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from berg_jax import berg_files, head
    from berg_jax.fetch import default_s3d_weights_path
    from berg_jax.errors import ModelLoadError

    berg_dir = Path(args.berg_dir).expanduser()
    if args.plot and args.subject is None:
        raise UsageError("--plot needs --subject N (whose test accuracy to draw)")
    if args.subject is not None:
        berg_files.check_subject(args.subject)
    model_dir = berg_files.model_dir(berg_dir)
    pca = berg_files.pca_weights_path(berg_dir)
    print(f"{berg_files.MODEL_ID}: BERG's in silico fMRI encoding model of the BOLD Moments Dataset")
    print("  video -> 14 frames -> S3D (Kinetics-400) -> 7 taps, F = 4,084,096 features")
    print(f"  -> StandardScaler + PCA (K = {berg_files.N_COMPONENTS} in BERG's files) -> linear regression per voxel")
    print("  -> float32 response per voxel (z-scored units) on the subject's (62, 77, 61) MNI152 grid")
    print(f"berg dir: {berg_dir}{'' if berg_dir.is_dir() else '  (does not exist)'}")
    print(f"  model files: {model_dir}")
    print(f"  pca_weights.npy: {'present, ' + file_size(pca) if pca.is_file() else 'missing'}")
    converted = head.is_converted(berg_dir) if pca.is_file() else False
    state = "not yet: made on first use, or `berg-jax convert`"
    if converted:
        state = "current"
        try:
            state += f", K = {head.converted_components(berg_dir)} components"
        except ModelLoadError:
            pass
    print(f"  converted copy: {head.converted_dir(berg_dir)} ({state})")
    print("subjects (voxels; files in this berg dir):")
    present = []
    for s in berg_files.SUBJECTS:
        w, m = berg_files.subject_weights_path(berg_dir, s), berg_files.metadata_path(berg_dir, s)
        if w.is_file() and m.is_file():
            present.append(s)
            conv = "converted" if converted and head.is_converted(berg_dir, s) else "not converted"
            state = f"present ({file_size(w)} weights), {conv}"
        elif w.is_file() or m.is_file():
            state = f"incomplete: {(m if w.is_file() else w).name} missing"
        else:
            state = "not downloaded"
        print(f"  sub-{s:02d}  {berg_files.N_VOXELS[s]:>7,} voxels  {state}")
    if not present:
        print(f"  get one with: berg-jax fetch --berg-dir {berg_dir} --subjects 1")
    s3d = Path(args.s3d_weights).expanduser() if args.s3d_weights else default_s3d_weights_path()
    print(f"S3D weights: {s3d} "
          f"({'present, ' + file_size(s3d) if s3d.exists() else 'missing: get them with `berg-jax fetch --s3d`'})")
    if args.subject is not None:
        _subject_card(berg_dir, args.subject, args.plot)
    return EXIT_OK


def _subject_card(berg_dir: Path, subject: int, plot: str | None) -> None:
    import numpy as np

    from berg_jax import berg_files

    meta = berg_files.load_metadata(berg_dir, subject)  # ModelLoadError says how to fetch it
    fmri = meta["fmri"]
    affine = np.asarray(fmri["sub_mask_affine"], dtype=float)
    vox_mm = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    print(f"sub-{subject:02d}: {int(np.count_nonzero(fmri['sub_mask'])):,} voxels in a "
          f"{tuple(fmri['sub_mask'].shape)} grid, voxel size {' x '.join(f'{v:g}' for v in vox_mm)} mm (MNI152)")
    rois = fmri["rois"]
    names = [n for n in berg_files.ROI_NAMES if n in rois] + sorted(n for n in rois if n not in berg_files.ROI_NAMES)
    print(f"  ROIs ({len(names)}; --roi NAME), voxels each:")
    cells = []
    for name in names:
        try:
            cells.append(f"{name} {len(berg_files.roi_voxel_indices(meta, name))}")
        except Exception as exc:  # noqa: BLE001 - a malformed ROI is reported, not fatal
            cells.append(f"{name} (unreadable: {type(exc).__name__})")
    for i in range(0, len(cells), 6):
        print("    " + "  ".join(f"{c:<16}" for c in cells[i:i + 6]).rstrip())
    acc = meta.get("encoding_models") or {}
    if "r2" in acc and "explained_variance" in acc:
        r2 = np.asarray(acc["r2"], float)
        ev = np.asarray(acc["explained_variance"], float)
        print(f"  test accuracy (BMD's 102 test videos): median r2 {np.nanmedian(r2):.3f} "
              f"(max {np.nanmax(r2):.3f}); median explained variance {np.nanmedian(ev):.1f}% "
              f"of the noise ceiling")
    if plot:
        from berg_jax import plots

        path = plots.plot_accuracy(meta, plot, subject=subject)
        print(f"  accuracy map: {path}")
