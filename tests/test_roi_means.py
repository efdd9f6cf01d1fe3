"""Screening (issue 13, parts 1, 2 and 5): ROI means as a head, their files, and `rank`.

Model: synthetic, K = 8, subjects 1 and 2 with the real voxel counts and all 47 of BERG's
ROI names (`make_berg_dir(rois=ROI_NAMES)`), small 48x64 clips, batch 2.

Tolerance of the head against the full responses: an ROI mean from the folded (K, R) head
differs from the float64 mean of the float32 voxel responses by float32 rounding only (the
head's weights are averaged in float64, then rounded once; each side rounds its own K-term
dot product): |difference| <= 1e-6 x the largest |response| among the ROI's voxels
(measured: 7.5e-9 of it, 2.4e-8 absolute). ROI means computed from stored components
equal the encoder's exactly on CPU (the same compiled regression on the same components),
as responses do.
"""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest

from berg_jax import cli
from berg_jax.api import BERG, responses_from_components, roi_means_from_components
from berg_jax.berg_files import ROI_NAMES, load_metadata, roi_voxel_indices
from berg_jax.errors import InvalidParameterError, UsageError, ValidationError
from berg_jax.rank import rank_videos
from berg_jax.roi_means import fold_roi_means, read_csv_header, roi_names, write_roi_means_csv
from berg_jax.synthetic import random_state_dict, synthetic_video
from berg_jax.synthetic_berg import make_berg_dir
from berg_jax.torch_pickle import write_torch_state_dict

MODEL = "fmri-bmd-s3d"
SUBJECTS = (1, 2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("roi")
    berg_dir = make_berg_dir(root / "berg", subjects=SUBJECTS, n_components=8, seed=3, rois=ROI_NAMES)
    pth = root / "s3d.pth"
    write_torch_state_dict(random_state_dict(3), pth)
    return berg_dir, pth


@pytest.fixture(scope="module")
def berg(env):
    return BERG(env[0], s3d_weights=env[1])


@pytest.fixture(scope="module")
def videos():
    return np.stack([synthetic_video(seed=40 + i, n_frames=14, height=48, width=64) for i in range(3)])


@pytest.fixture(scope="module")
def full(berg, videos):
    """Both subjects' whole-brain responses, ROI means and components from one pass."""
    model = berg.get_encoding_model(MODEL, subject=list(SUBJECTS), roi_means=True, components=True, batch_size=2)
    return model, berg.encode(model, videos, show_progress=False)


# --------------------------------------------------------------------------- the head


def test_roi_means_equal_the_mean_of_the_full_responses_for_every_roi(env, full):
    model, out = full
    assert set(out) == {1, 2, "components", "roi_means"}
    for s in SUBJECTS:
        metadata = load_metadata(env[0], s)
        assert model.roi_names[s] == ROI_NAMES  # every ROI, in BERG's order
        means = out["roi_means"][s]
        assert means.shape == (3, len(ROI_NAMES)) and means.dtype == np.float32
        for j, name in enumerate(ROI_NAMES):
            voxels = out[s][:, roi_voxel_indices(metadata, name)]
            expected = voxels.mean(axis=1, dtype=np.float64)
            bound = 1e-6 * float(np.abs(voxels).max())
            np.testing.assert_allclose(means[:, j], expected, rtol=0, atol=bound, err_msg=f"sub-{s:02d} {name}")


def test_fold_averages_in_float64():
    """The folded weights are the float64 means of the voxel weights, rounded once."""
    rng = np.random.default_rng(0)
    coef = rng.standard_normal((3, 50)).astype(np.float32) + np.float32(1000)  # float32 sums would round
    intercept = rng.standard_normal(50).astype(np.float32)
    mask = np.zeros((62, 77, 61), bool)
    mask.ravel()[:50] = True
    metadata = {"fmri": {"sub_mask": mask, "rois": {
        "rFFA": (None, np.arange(10, 40).reshape(-1, 1), None),
        "lFFA": (None, np.array([[3], [7], [49]]), None),
        "extra": (None, np.array([[0]]), None)}}}
    folded = fold_roi_means({"coef": coef, "intercept": intercept}, metadata)
    assert folded.names == ("lFFA", "rFFA", "extra") == roi_names(metadata)
    for j, idx in enumerate(([3, 7, 49], list(range(10, 40)), [0])):
        np.testing.assert_array_equal(folded.regression["coef"][:, j],
                                      coef[:, idx].astype(np.float64).mean(axis=1).astype(np.float32))
        assert folded.regression["intercept"][j] == np.float32(intercept[idx].astype(np.float64).mean())
    assert folded.regression["coef"].dtype == np.float32 and folded.regression["coef"].shape == (3, 3)


def test_roi_means_alone_equal_those_beside_the_responses(berg, full, videos):
    model = berg.get_encoding_model(MODEL, subject=1, roi_means=True, responses=False, batch_size=2)
    assert model.returns_dict and model.output_columns == {("roi_means", 1): len(ROI_NAMES)}
    got = berg.encode(model, videos, show_progress=False)
    assert set(got) == {"roi_means"} and set(got["roi_means"]) == {1}
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got["roi_means"][1], full[1]["roi_means"][1])
    else:
        np.testing.assert_allclose(got["roi_means"][1], full[1]["roi_means"][1], rtol=1e-6, atol=1e-7)


def test_roi_means_from_components_equal_the_encoders(env, full):
    out = full[1]
    comps = np.concatenate([out["components"], np.full((1, 8), np.nan, np.float32)])  # + a failed row
    got = roi_means_from_components(comps, env[0], subject=list(SUBJECTS), batch_rows=2)
    for s in SUBJECTS:
        np.testing.assert_array_equal(got[s][:3], out["roi_means"][s])
        assert np.isnan(got[s][3]).all()
    one = responses_from_components(out["components"], env[0], subject=2, roi_means=True)
    np.testing.assert_array_equal(one, out["roi_means"][2])


@pytest.mark.parametrize("kwargs, match", [
    ({"subject": None, "components": True, "roi_means": True}, "needs a subject"),
    ({"subject": 1, "responses": False}, "leaves no output"),
    ({"subject": 1, "roi_means": True, "responses": False, "selection": {"roi": "lFFA"}}, "drop the selection"),
])
def test_api_errors(berg, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        berg.get_encoding_model(MODEL, **kwargs)


# --------------------------------------------------------------------------- the CSV


def test_csv_rows_round_trip_and_failed_rows_are_empty(tmp_path):
    rng = np.random.default_rng(1)
    means = rng.standard_normal((5, 3)).astype(np.float32) * np.float32(1e-3)
    means[2] = np.nan
    paths = ["a.mp4", "with,comma.mp4", 'quote".mp4', "b.mp4", "c.mp4"]
    target = write_roi_means_csv(tmp_path / "m.csv", means, ("lFFA", "rFFA", "lV1v"), paths, block_rows=2)
    with open(target, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "row", "lFFA", "rFFA", "lV1v"] and read_csv_header(target) == ("lFFA", "rFFA", "lV1v")
    assert [r[0] for r in rows[1:]] == paths and [r[1] for r in rows[1:]] == ["0", "1", "2", "3", "4"]
    assert rows[3][2:] == ["", "", ""]  # the failed row
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(np.array(rows[i + 1][2:], np.float32), means[i])  # %.9g round-trips
    assert not list(tmp_path.glob(".*"))  # no temporary file left


# --------------------------------------------------------------------------- rank (library)


def _roi_folder(folder: Path, values: dict[int, np.ndarray], names=("lFFA", "rFFA", "lV1v")) -> Path:
    """A folder as `berg-jax responses --roi-means` writes it (no job.json: names from the CSV)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, v in values.items():
        np.save(folder / f"roi_means_sub-{s:02d}.npy", v.astype(np.float32))
        write_roi_means_csv(folder / f"roi_means_sub-{s:02d}.csv", v.astype(np.float32), names,
                            [f"clip{i}.mp4" for i in range(len(v))])
    return folder


def test_rank_orders_by_value_ties_by_row_and_skips_nan(tmp_path):
    v = np.zeros((8, 3), np.float32)
    v[:, 0] = [0.5, 2.0, np.nan, 2.0, -1.0, 0.5, 3.0, -1.0]  # lFFA
    v[:, 1] = [0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, -0.5]      # rFFA
    folder = _roi_folder(tmp_path / "r", {1: v})
    ranking = rank_videos(folder, "lFFA", top=4, bottom=3)
    assert [c.row for c in ranking.top] == [6, 1, 3, 0]  # 3.0, then the tie 2.0 by row, then 0.5 (row 0 before 5)
    assert [c.row for c in ranking.bottom] == [4, 7, 0]
    assert [c.value for c in ranking.top] == [3.0, 2.0, 2.0, 0.5]
    assert ranking.n_skipped == 1 and ranking.n_rows == 8 and ranking.top[0].path == "clip6.mp4"
    assert ranking.records()[0] == (6, "clip6.mp4", 3.0) and len(ranking.records()) == 7
    contrast = rank_videos(folder, "lFFA", minus_roi="rFFA", top=2)
    assert [(c.row, c.value) for c in contrast.top] == [(3, 3.0), (6, 3.0)]  # 2 - (-1) ties 3 - 0: by row
    assert contrast.measure == "lFFA - rFFA"


def test_rank_streams_blocks_and_equals_a_full_sort(tmp_path):
    rng = np.random.default_rng(2)
    n = 100_000
    v = rng.standard_normal((n, 47)).astype(np.float32)
    v[rng.integers(0, n, 50), :] = np.nan
    lffa = ROI_NAMES.index("lFFA")
    v[[5, *range(10, 20)], lffa] = np.nanmax(v[:, lffa]) + 1  # a tie at the top across block boundaries
    folder = tmp_path / "big"
    folder.mkdir()
    np.save(folder / "roi_means_sub-01.npy", v)
    (folder / "roi_means_sub-01.csv").write_text(",".join(("path", "row", *ROI_NAMES)) + "\n")  # the names
    tracemalloc.start()
    ranking = rank_videos(folder, "lFFA", top=25, bottom=25, batch_rows=7)  # 14,286 blocks
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    col = v[:, lffa].astype(np.float64)
    ok = np.flatnonzero(~np.isnan(col))
    expect_top = ok[np.lexsort((ok, -col[ok]))][:25]
    expect_bottom = ok[np.lexsort((ok, col[ok]))][:25]
    assert [c.row for c in ranking.top] == expect_top.tolist()
    assert [c.row for c in ranking.bottom] == expect_bottom.tolist()
    assert ranking.n_skipped == n - ok.size
    # The 18.8 MB array is memory-mapped and read 7 rows at a time: what Python allocates
    # stays far below it (a whole-array read would take 18.8 MB, its float64 column 0.8 MB).
    assert peak < 400_000, peak
    one_block = rank_videos(folder, "lFFA", top=25, bottom=25)
    assert one_block.top == ranking.top and one_block.bottom == ranking.bottom


def test_rank_errors(tmp_path):
    with pytest.raises(UsageError, match="--roi-means"):
        rank_videos(tmp_path, "lFFA")  # nothing there: says what to run
    folder = _roi_folder(tmp_path / "two", {1: np.ones((3, 3)), 2: np.ones((3, 3))})
    with pytest.raises(ValidationError, match="unknown ROI 'nope'.*valid ROIs: lFFA, rFFA, lV1v"):
        rank_videos(folder, "nope", subject=1)
    with pytest.raises(UsageError, match="give --subject N, or --mean-over-subjects"):
        rank_videos(folder, "lFFA")
    with pytest.raises(UsageError, match="name two ROIs"):
        rank_videos(folder, "lFFA", minus_roi="lFFA", subject=1)
    with pytest.raises(UsageError, match="no ROI means or responses of subject 3"):
        rank_videos(folder, "lFFA", subject=3)
    # responses of a selection are not the whole brain; whole-brain ones need the ROIs' voxels
    selected = tmp_path / "selected"
    selected.mkdir()
    np.save(selected / "responses.npy", np.ones((3, 5), np.float32))
    job = {"inputs": ["a", "b", "c"], "arrays": {"responses.npy": 5},
           "run_config": {"subject": 1, "selection": {"roi": "lFFA"}}}
    (selected / "job.json").write_text(json.dumps(job))
    with pytest.raises(UsageError, match="not the whole brain.*--roi-means"):
        rank_videos(selected, "lFFA", berg_dir=tmp_path)
    job["run_config"]["selection"] = None
    (selected / "job.json").write_text(json.dumps(job))
    with pytest.raises(UsageError, match="give --berg-dir DIR"):
        rank_videos(selected, "lFFA")


def test_mean_over_subjects_averages_the_measure(tmp_path):
    a = np.array([[1.0, 0, 0], [0.0, 0, 0], [5.0, 0, 0]])
    b = np.array([[2.0, 1, 0], [4.0, 0, 0], [-5.0, 0, 0]])
    folder = _roi_folder(tmp_path / "m", {1: a, 2: b})
    ranking = rank_videos(folder, "lFFA", minus_roi="rFFA", mean_over_subjects=True, top=3)
    assert [(c.row, c.value) for c in ranking.top] == [(1, 2.0), (0, 1.0), (2, 0.0)]
    assert ranking.who == "mean over sub-01, sub-02"


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    pytest.importorskip("av")  # the clips are written with PyAV
    from tests import video_fixtures as vf

    d = tmp_path_factory.mktemp("roi_videos")
    for i, n in enumerate((14, 18, 15, 16)):
        vf.write_test_video(d / f"clip{i}.mp4", n_frames=n, height=48, width=64, seed=i)
    (d / "broken.mp4").write_bytes(b"not a video")
    return d


def _encode(env, folder, out, *extra):
    return cli.main(["encode", str(folder), "--berg-dir", str(env[0]), "--s3d-weights", str(env[1]),
                     "--out", str(out), "--batch-size", "2", "-q", *extra])


@pytest.fixture(scope="module")
def screen(env, clips, tmp_path_factory):
    """`encode --subject 1,2 --roi-means --no-responses` of the clips (broken.mp4 is row 0)."""
    out = tmp_path_factory.mktemp("screen") / "out"
    assert _encode(env, clips, out, "--subject", "1,2", "--roi-means", "--no-responses") == 1
    return out


def test_cli_screen_writes_roi_means_alone(screen):
    assert sorted(p.name for p in screen.glob("*.npy")) == ["roi_means_sub-01.npy", "roi_means_sub-02.npy"]
    job = json.loads((screen / "job.json").read_text())
    assert job["run_config"]["roi_means"] == {f"roi_means_sub-{s:02d}.npy": list(ROI_NAMES) for s in SUBJECTS}
    for s in SUBJECTS:
        means = np.load(screen / f"roi_means_sub-{s:02d}.npy")
        assert means.shape == (5, 47) and np.isnan(means[0]).all() and not np.isnan(means[1:]).any()
        with open(screen / f"roi_means_sub-{s:02d}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["path", "row", *ROI_NAMES]
        assert [r[0] for r in rows[1:]] == job["inputs"] and rows[1][2:] == [""] * 47
        np.testing.assert_array_equal(np.array([r[2:] for r in rows[2:]], np.float32), means[1:])


def test_cli_roi_means_with_responses_and_components_then_rank_from_each(env, clips, screen, tmp_path, capsys):
    out = tmp_path / "out"
    assert _encode(env, clips, out, "--subject", "1", "--roi-means", "--components") == 1
    np.testing.assert_array_equal(np.load(out / "roi_means_sub-01.npy"), np.load(screen / "roi_means_sub-01.npy"))
    capsys.readouterr()
    # the same ranking from the ROI means, the whole-brain responses and the components
    assert cli.main(["rank", str(out), "--roi", "lFFA", "--minus-roi", "rFFA", "--top", "2", "--bottom"]) == 0
    printed = capsys.readouterr().out
    assert "lFFA - rFFA, sub-01, from roi_means_sub-01.npy: 5 videos, 1 without a value" in printed
    written = out / "rank_lFFA_minus_rFFA_sub-01_top-2_bottom-2.csv"
    with open(written, newline="") as f:
        by_means = list(csv.DictReader(f))
    assert [r["end"] for r in by_means] == ["top", "top", "bottom", "bottom"]
    means = np.load(out / "roi_means_sub-01.npy").astype(np.float64)
    contrast = means[:, ROI_NAMES.index("lFFA")] - means[:, ROI_NAMES.index("rFFA")]
    assert [int(r["row"]) for r in by_means[:2]] == (np.argsort(-contrast[1:], kind="stable")[:2] + 1).tolist()
    assert by_means[0]["path"].endswith(f"clip{int(by_means[0]['row']) - 1}.mp4")

    for name in ("roi_means_sub-01.npy", "roi_means_sub-01.csv"):
        (out / name).rename(tmp_path / name)
    assert cli.main(["rank", str(out), "--roi", "lFFA", "--minus-roi", "rFFA", "--top", "2", "--bottom"]) == 2
    assert "give --berg-dir DIR" in capsys.readouterr().err
    from_responses = rank_videos(out, "lFFA", minus_roi="rFFA", top=2, bottom=2, berg_dir=env[0])
    assert from_responses.sources == {1: "responses.npy"}
    (out / "responses.npy").rename(tmp_path / "responses.npy")
    from_components = rank_videos(out, "lFFA", minus_roi="rFFA", subject=1, top=2, bottom=2, berg_dir=env[0])
    assert from_components.sources == {1: "components.npy"}
    for ranking in (from_responses, from_components):
        assert [str(c.row) for c in (*ranking.top, *ranking.bottom)] == [r["row"] for r in by_means]
        np.testing.assert_allclose([c.value for c in (*ranking.top, *ranking.bottom)],
                                   [float(r["value"]) for r in by_means], rtol=0, atol=1e-6)


def test_cli_a_resume_with_another_roi_means_choice_is_refused(env, clips, screen, capsys):
    assert _encode(env, clips, screen, "--subject", "1,2", "--no-responses", "--components") == 2
    assert "different job" in capsys.readouterr().err
    assert _encode(env, clips, screen, "--subject", "1,2", "--roi-means", "--no-responses") == 1  # the same: fine


def test_cli_usage_errors(env, clips, tmp_path, capsys):
    assert _encode(env, clips, tmp_path / "x", "--no-responses", "--subject", "1") == 2
    assert "add --roi-means" in capsys.readouterr().err
    assert _encode(env, clips, tmp_path / "x", "--roi-means", "--components") == 2
    assert "give --subject N too" in capsys.readouterr().err
    assert cli.main(["rank", str(tmp_path), "--roi", "lFFA"]) == 2
    assert "--roi-means" in capsys.readouterr().err


def test_cli_responses_roi_means_from_components(env, clips, screen, tmp_path):
    out = tmp_path / "enc"
    assert _encode(env, clips, out, "--components") == 1
    target = tmp_path / "from_components"
    assert cli.main(["responses", str(out / "components.npy"), "--berg-dir", str(env[0]), "--subject", "1,2",
                     "--roi-means", "--no-responses", "--out", str(target), "-q"]) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "roi_means_sub-01.csv", "roi_means_sub-01.npy", "roi_means_sub-02.csv", "roi_means_sub-02.npy"]
    for name in ("roi_means_sub-01.npy", "roi_means_sub-02.npy", "roi_means_sub-01.csv", "roi_means_sub-02.csv"):
        assert (target / name).read_bytes() == (screen / name).read_bytes(), name  # paths from out/job.json


def test_merge_writes_the_csv_a_single_process_writes(env, clips, screen, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    out = tmp_path / "dist"
    for i in (0, 1):
        assert _encode(env, clips, out, "--subject", "1,2", "--roi-means", "--no-responses", "--distributed",
                       "--process-id", str(i), "--num-processes", "2") in (0, 1)
    assert cli.main(["merge", str(out)]) == 1  # broken.mp4 failed
    for name in ("roi_means_sub-01.npy", "roi_means_sub-02.npy", "roi_means_sub-01.csv", "roi_means_sub-02.csv",
                 "job.json", "manifest.csv"):
        assert (out / name).read_bytes() == (screen / name).read_bytes(), name


def test_cli_rank_draws_the_sheet_and_the_bars(screen, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the plot extra
    import matplotlib.image

    from berg_jax.rank import rank_videos, ranked_roi_means
    from berg_jax.screening_plots import ContactSheetLayout

    sheet, bars = tmp_path / "top.png", tmp_path / "bars"
    code = cli.main(["rank", str(screen), "--roi", "lFFA", "--mean-over-subjects", "--top", "2", "--bottom",
                     "--write", str(tmp_path / "rank.csv"), "--sheet", str(sheet), "--bars", str(bars)])
    stdout = capsys.readouterr().out
    assert code == 0 and f"contact sheet: {sheet}" in stdout and f"contact sheet: {tmp_path / 'top_bottom.png'}" in stdout
    # one row per ranked clip, laid out as ContactSheetLayout says
    for png in (sheet, tmp_path / "top_bottom.png"):
        height, width = matplotlib.image.imread(png).shape[:2]
        assert (width, height) == ContactSheetLayout(2).size_pixels
    assert sorted(p.name for p in bars.iterdir()) == sorted(
        f"{end}-{rank:03d}_{row}.png" for end, rank, row in _ranked(rank_videos(
            screen, "lFFA", mean_over_subjects=True, top=2, bottom=2)))
    # the bars show the subjects' average of each ROI mean
    ranking = rank_videos(screen, "lFFA", mean_over_subjects=True, top=2)
    names, means = ranked_roi_means(ranking, screen)
    both = [np.load(screen / f"roi_means_sub-{s:02d}.npy") for s in SUBJECTS]
    row = ranking.top[0].row
    np.testing.assert_allclose(means[row], (both[0][row].astype(np.float64) + both[1][row]) / 2)
    assert names == tuple(ROI_NAMES) and means[row][names.index("lFFA")] == pytest.approx(ranking.top[0].value)


def _ranked(ranking):
    return [(v.end, v.rank, v.row) for v in (*ranking.top, *ranking.bottom)]
