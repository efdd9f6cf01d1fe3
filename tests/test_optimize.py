"""Differentiable encoding: gradients of the encoder, `optimize_stimulus`, its objectives, `berg-jax optimize`.

The model is the synthetic one (seeded random S3D and head, K = 8), selected to lFFA.
Every test that differentiates S3D pays one XLA compilation of its backward pass
(~12 s float32, ~30 s float64 on 2 CPU cores); the objective tests need none.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax import berg_files
from berg_jax.api import BERG, encoder
from berg_jax.cli.optimize import add_parser as add_optimize_parser
from berg_jax.errors import InvalidParameterError, StimulusError, ValidationError
from berg_jax.optimize import (
    OptimizeResult,
    initial_clip,
    match_pattern,
    optimize_stimulus,
    roi_columns,
    roi_difference,
    roi_mean,
)
from berg_jax.synthetic_berg import make_synthetic_model
from berg_jax.video import read_clip, write_mp4

MODEL = "fmri-bmd-s3d"
CLIP = (1, 14, 24, 32, 3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_synthetic_model(tmp_path_factory.mktemp("optimize"), n_components=8, seed=0)


@pytest.fixture(scope="module")
def berg(env):
    return BERG(env[0], s3d_weights=env[1])


@pytest.fixture(scope="module")
def model(berg):
    return berg.get_encoding_model(MODEL, subject=1, selection={"roi": "lFFA"})


@pytest.fixture(scope="module")
def metadata(env):
    return berg_files.load_metadata(env[0], 1)


# --------------------------------------------------------------------------- gradients


@pytest.mark.slow
def test_float32_gradient_is_finite_and_nonzero(model):
    fn, params = encoder(model)
    x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, CLIP).astype(np.float32))
    grad = jax.jit(jax.grad(lambda x: jnp.mean(fn(params, x))))(x)  # lFFA's columns are all of them
    assert grad.shape == x.shape and grad.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


@pytest.mark.slow
def test_gradient_matches_central_differences_float64(model):
    """jax.grad of lFFA's mean response == central finite differences, the whole model in float64.

    f(x) = mean lFFA response of a (1, 14, 24, 32, 3) clip in 0.2..0.8. For directions v --
    the gradient's own (scaled to RMS 1 per pixel) and two standard normal ones -- the
    central difference (f(x + h v) - f(x - h v)) / 2h, h = 1e-8, must match vdot(grad, v):

        |fd - vdot(grad, v)| <= 1e-5 * |grad| |v|

    i.e. a relative error of 1e-5 of the largest directional derivative of that size (for
    the gradient direction this is the plain relative error). Why this scale: the encoder
    is piecewise linear in the pixels (ReLU and max-pool in S3D; preprocessing and head are
    affine), so the central difference is exact except for the ReLU/max-pool switches
    between x - hv and x + hv, and millions of units make those O(h) errors common
    (measured: ~3% at h = 1e-6, ~1e-7..4e-7 of |grad||v| at h = 1e-8). A random direction's
    derivative is only ~|grad||v|/sqrt(n) (n = 32,256 pixels), so dividing by it would
    measure the switches, not the gradient. A wrong gradient (a permuted or mis-scaled
    pixel axis) errs by ~|grad||v|/sqrt(n) = 5.6e-3 of that scale or more.
    float64 rounding of f (~1e-15) adds ~1e-9 of it.
    """
    fn, params = encoder(model)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, CLIP))
        f = jax.jit(lambda x: jnp.mean(fn(p64, x)))
        grad = jax.jit(jax.grad(lambda x: jnp.mean(fn(p64, x))))(x)
        assert grad.dtype == jnp.float64 and f(x).dtype == jnp.float64
        g_norm = float(jnp.linalg.norm(grad))
        directions = {"gradient": grad * (np.sqrt(grad.size) / g_norm)}
        for seed in (1, 2):
            directions[f"normal-{seed}"] = jnp.asarray(np.random.default_rng(seed).standard_normal(CLIP))
        h = 1e-8
        errors = {}
        for name, v in directions.items():
            fd = (float(f(x + h * v)) - float(f(x - h * v))) / (2 * h)
            errors[name] = abs(fd - float(jnp.vdot(grad, v))) / (g_norm * float(jnp.linalg.norm(v)))
    print("float64 |fd - grad.v| / (|grad| |v|):", {k: f"{e:.1e}" for k, e in errors.items()})
    assert max(errors.values()) <= 1e-5, errors


# --------------------------------------------------------------------------- objectives


@pytest.fixture(scope="module")
def whole_brain(berg):
    return berg.get_encoding_model(MODEL, subject=1)


@pytest.fixture(scope="module")
def two_rois(berg, metadata):
    mask = np.zeros(berg_files.N_VOXELS[1], dtype=bool)
    for roi in ("lFFA", "rFFA"):
        mask[berg_files.roi_voxel_indices(metadata, roi)] = True
    return berg.get_encoding_model(MODEL, subject=1, selection={"voxels": mask})


def _responses(model):
    """A fake response vector whose value in each column is that column's voxel index."""
    voxels = np.arange(model.n_voxels) if model.voxels is None else model.voxels
    return np.asarray(voxels, dtype=np.float32)


@pytest.mark.parametrize("which", ["model", "whole_brain", "two_rois"])
def test_roi_mean_reads_the_rois_voxels(request, metadata, which):
    m = request.getfixturevalue(which)
    objective = roi_mean(m, "lFFA")
    expected = berg_files.roi_voxel_indices(metadata, "lFFA").astype(np.float64).mean()
    np.testing.assert_allclose(float(objective(_responses(m))), expected, rtol=1e-6)
    assert objective.name == "mean(lFFA)"


def test_roi_columns_follow_the_selection_order(model, two_rois, metadata):
    lffa = berg_files.roi_voxel_indices(metadata, "lFFA")
    np.testing.assert_array_equal(model.voxels[roi_columns(model, "lFFA")], lffa)
    np.testing.assert_array_equal(two_rois.voxels[roi_columns(two_rois, "lFFA")], lffa)


def test_roi_difference(two_rois, metadata):
    r = _responses(two_rois)
    a, b = (berg_files.roi_voxel_indices(metadata, roi).astype(np.float64).mean() for roi in ("lFFA", "rFFA"))
    np.testing.assert_allclose(float(roi_difference(two_rois, "lFFA", "rFFA")(r)), a - b, rtol=1e-5)
    with pytest.raises(InvalidParameterError, match="both 'lFFA'"):
        roi_difference(two_rois, "lFFA", "lFFA")


def test_roi_outside_the_selection_is_an_error(model):
    with pytest.raises(InvalidParameterError, match=r"'rFFA'.*not in this model's selection.*selection=None"):
        roi_mean(model, "rFFA")
    with pytest.raises(ValidationError, match="unknown ROI 'nope'.*lFFA"):
        roi_mean(model, "nope")


def test_match_pattern():
    r = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    assert float(match_pattern(r)(r)) == 0.0
    np.testing.assert_allclose(float(match_pattern(np.zeros(4))(r)), -7.5)
    np.testing.assert_allclose(float(match_pattern([2.0, 2.0], indices=[0, 3])(r)), -2.5)
    with pytest.raises(InvalidParameterError, match="target has 3 values but the model gives 4"):
        match_pattern(np.zeros(3))(r)
    with pytest.raises(InvalidParameterError, match="index 7 is outside"):
        match_pattern([0.0], indices=[7])(r)
    with pytest.raises(InvalidParameterError, match="indices names 1 columns"):
        match_pattern([0.0, 1.0], indices=[0])
    with pytest.raises(InvalidParameterError, match="NaN"):
        match_pattern([np.nan])


def test_several_subject_models_are_refused(model):
    several = dataclasses.replace(model, subject=(1, 2))
    with pytest.raises(InvalidParameterError, match=r"one-subject model.*subject=N"):
        roi_mean(several, "lFFA")
    with pytest.raises(InvalidParameterError, match=r"one-subject model.*subject=N"):
        optimize_stimulus(several, lambda r: r.mean(), steps=1, show_progress=False)


def test_initial_clip():
    noise = initial_clip(3, size=(10, 12))
    assert noise.shape == (14, 10, 12, 3) and noise.dtype == np.float32
    assert noise.min() >= 0 and noise.max() < 1
    np.testing.assert_array_equal(noise, initial_clip(3, size=(10, 12)))
    frames = np.random.default_rng(0).integers(0, 256, (14, 6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(initial_clip(frames), frames.astype(np.float32) / 255)
    np.testing.assert_array_equal(initial_clip(frames.transpose(0, 3, 1, 2)), frames.astype(np.float32) / 255)
    with pytest.raises(StimulusError, match="0..1"):
        initial_clip(frames.astype(np.float32))  # 0..255 floats
    with pytest.raises(InvalidParameterError, match=r"\(14, H, W, 3\)"):
        initial_clip(frames[None])
    with pytest.raises(InvalidParameterError, match="steps"):
        optimize_stimulus(_OneSubject(), lambda r: r, steps=-1)


@dataclasses.dataclass
class _OneSubject:
    subject: int = 1


def test_write_mp4_checks(tmp_path):
    frames = np.zeros((2, 6, 8, 3), np.uint8)
    with pytest.raises(InvalidParameterError, match="even"):
        write_mp4(tmp_path / "a.mp4", frames[:, :5])
    with pytest.raises(InvalidParameterError, match="uint8"):
        write_mp4(tmp_path / "a.mp4", frames.astype(np.float32))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- optimisation


@pytest.mark.slow
def test_optimize_stimulus_raises_the_roi_response(model):
    steps = 4
    result = optimize_stimulus(model, roi_mean(model, "lFFA"), init=0, steps=steps, learning_rate=0.05,
                               size=(32, 32), show_progress=False)
    assert isinstance(result, OptimizeResult)
    assert result.clip.shape == (14, 32, 32, 3) and result.clip.dtype == np.float32
    assert result.clip.min() >= 0 and result.clip.max() <= 1
    assert result.trajectory.shape == (steps + 1,) and np.isfinite(result.trajectory).all()
    print("trajectory:", np.array2string(result.trajectory, precision=4))
    assert result.trajectory[-1] > result.trajectory[0]
    # The trajectory is the objective of the clips themselves: its last value is the result's.
    fn, params = encoder(model)
    np.testing.assert_allclose(float(jnp.mean(fn(params, result.clip[None]))), result.trajectory[-1],
                               rtol=1e-5, atol=1e-6)
    u8 = result.clip_uint8()
    assert u8.dtype == np.uint8 and np.abs(u8 / 255 - result.clip).max() <= 0.5 / 255 + 1e-7


@pytest.mark.slow
def test_optimize_stimulus_with_a_components_model(berg):
    """A one-subject model that also returns components: the subject's responses are optimised."""
    model = berg.get_encoding_model(MODEL, subject=1, selection={"roi": "lFFA"}, components=True)
    objective = roi_mean(model, "lFFA")
    result = optimize_stimulus(model, objective, init=0, steps=1, size=(32, 32), show_progress=False)
    assert result.trajectory.shape == (2,) and np.isfinite(result.trajectory).all()
    # The trajectory is the objective of subject 1's lFFA responses, before and after the step:
    # recomputed here from the model's own outputs for the initial and the final clip.
    fn, params = encoder(model)
    clips = np.stack([initial_clip(0, (32, 32)), result.clip])
    out = fn(params, clips)
    assert set(out) == {"responses", "components"} and out["responses"][1].shape == (2, model.n_voxels_of(1))
    expected = [float(objective(r)) for r in np.asarray(out["responses"][1])]
    np.testing.assert_allclose(result.trajectory, expected, rtol=1e-5, atol=1e-6)
    # The bug this test is for: the objective read another array (the K components); its
    # value there differs from the responses' by far more than the tolerance above.
    wrong = [float(objective(c)) for c in out["components"]]  # jax arrays: out-of-range reads clamp
    assert np.abs(np.subtract(wrong, expected)).min() > 1e-3 * np.abs(expected).max()


# --------------------------------------------------------------------------- CLI


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_optimize_parser(sub)
    args = parser.parse_args(["optimize", *argv])
    return args.func(args)


@pytest.mark.slow
def test_cli_optimize_writes_clip_and_trajectory(env, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _run_cli(["--berg-dir", str(env[0]), "--subject", "1", "--s3d-weights", str(env[1]), "--roi", "lFFA",
                   "--steps", "2", "--lr", "0.05", "--size", "32x32", "--seed", "0", "--out", str(out), "-q"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "clip.npy", "trajectory.csv"]
    clip = np.load(out / "clip.npy")
    assert clip.shape == (14, 32, 32, 3) and clip.dtype == np.float32 and 0 <= clip.min() <= clip.max() <= 1
    with open(out / "trajectory.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "objective"] and [int(r[0]) for r in rows[1:]] == [0, 1, 2]
    trajectory = [float(r[1]) for r in rows[1:]]
    decoded = read_clip(out / "clip.mp4", backend="pyav")
    assert decoded.shape == (14, 32, 32, 3)
    # Lossy: yuv420p halves the chroma resolution (pixel noise loses its colour), but the
    # luma is kept (measured on uniform noise: mean error 0.018, correlation 0.994).
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs((decoded.astype(np.float32) / 255 - clip) @ luma).mean() < 0.05
    text = capsys.readouterr().out
    assert f"mean(lFFA): {trajectory[0]:.6g} -> {trajectory[-1]:.6g}" in text


@pytest.mark.parametrize("argv, match", [
    (["--size", "31x32"], "even"),
    (["--size", "big"], "HEIGHTxWIDTH"),
    (["--steps", "0"], "--steps"),
    (["--minus-roi", "lFFA"], "same ROI"),
    (["--target", "/nonexistent/t.npy"], "no such file"),
])
def test_cli_usage_errors(env, tmp_path, argv, match):
    from berg_jax.cli import UsageError

    base = ["--berg-dir", str(env[0]), "--subject", "1", "--roi", "lFFA", "--out", str(tmp_path / "o")]
    with pytest.raises(UsageError, match=match):
        _run_cli(base + argv)
    assert not (tmp_path / "o").exists()


def test_cli_target_file(tmp_path):
    from berg_jax.cli import UsageError
    from berg_jax.cli.optimize import _load_target

    roi_voxels = np.array([5, 2, 7])
    whole = np.arange(10, dtype=np.float64)
    np.save(tmp_path / "whole.npy", whole)
    np.testing.assert_array_equal(_load_target(str(tmp_path / "whole.npy"), 3, roi_voxels, 10), [5, 2, 7])
    np.save(tmp_path / "row.npy", np.ones((1, 3)))
    assert _load_target(str(tmp_path / "row.npy"), 3, roi_voxels, 10).dtype == np.float32
    np.save(tmp_path / "bad.npy", np.ones(4))
    with pytest.raises(UsageError, match="has 4 values; expected 3"):
        _load_target(str(tmp_path / "bad.npy"), 3, roi_voxels, 10)


def test_cli_target_and_minus_roi_exclude_each_other(env, tmp_path):
    with pytest.raises(SystemExit):
        _run_cli(["--berg-dir", str(env[0]), "--subject", "1", "--roi", "lFFA", "--minus-roi", "rFFA",
                  "--target", "t.npy", "--out", str(tmp_path)])
