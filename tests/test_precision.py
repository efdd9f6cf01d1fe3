"""Precision as a choice: "highest" (default, BERG parity), "tf32", "bf16" (`berg_jax.precision`).

On the CPU, with the K=8 synthetic model the encoder tests use: "highest" is today's float32
HIGHEST path (the parity tests in test_encoder / test_s3d_parity hold it to torch; here: its
lowering has no bfloat16 and every conv/dot at HIGHEST, and the legacy spellings give the
same bits); "tf32" is lax's DEFAULT, which XLA:CPU computes exactly as HIGHEST; "bf16"
stays within BF16_RTOL of "highest" (measured 3.7e-3 on these videos, see below) and returns
float32. The deviation on the real-shaped K=100 model is `python -m benchmarks.precision`'s.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax import cli, precision as prec
from berg_jax.api import BERG, apply_head, encoder, responses_from_components
from berg_jax.errors import InvalidParameterError
from berg_jax.fused import encode_frames
from berg_jax.synthetic import synthetic_video
from berg_jax.synthetic_berg import make_synthetic_model

MODEL = "fmri-bmd-s3d"
# bf16 vs highest, max |diff| / max |highest| over all videos and voxels: measured 3.7e-3 on
# these two videos (K=8 synthetic model); the bound leaves ~5x margin. The floor proves
# bfloat16 is really used (float32 paths agree to ~1e-6 or exactly).
BF16_RTOL = 2e-2
BF16_FLOOR = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_synthetic_model(tmp_path_factory.mktemp("precision"), n_components=8, seed=0)


@pytest.fixture(scope="module")
def berg(env):
    return BERG(env[0], s3d_weights=env[1])


@pytest.fixture(scope="module")
def frames():
    """Two (14, 64, 80, 3) uint8 videos, channels-last as `encoder`'s fn takes them."""
    return np.stack([synthetic_video(seed=s, n_frames=14, height=64, width=80) for s in (1, 2)])


@pytest.fixture(scope="module")
def highest(berg):
    return berg.get_encoding_model(MODEL, subject=1)


@pytest.fixture(scope="module")
def highest_out(highest, frames):
    fn, params = encoder(highest)
    return np.asarray(fn(params, frames))


def rel_err(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def conv_and_dot_lines(fn, *args, **kwargs) -> tuple[str, list[str]]:
    text = fn.lower(*args, **kwargs).as_text()
    return text, [ln for ln in text.splitlines() if "stablehlo.convolution" in ln or "stablehlo.dot_general" in ln]


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("given, name", [
    ("highest", "highest"), ("tf32", "tf32"), ("bf16", "bf16"), (" BF16 ", "bf16"), ("Highest", "highest"),
    (None, "tf32"), (jax.lax.Precision.HIGHEST, "highest"), (jax.lax.Precision.DEFAULT, "tf32"),
])
def test_names_and_legacy_values(given, name):
    assert prec.normalize(given) == name
    policy = prec.resolve(given)
    assert policy.name == name
    assert policy.compute_dtype == (jnp.bfloat16 if name == "bf16" else None)
    assert policy.lax_precision == (jax.lax.Precision.HIGHEST if name == "highest" else jax.lax.Precision.DEFAULT)
    hash(name)  # a static jit argument


@pytest.mark.parametrize("bad", ["fp16", "float32", "tensorfloat32", "", jax.lax.Precision.HIGH, 3])
def test_unknown_precision_fails_listing_the_choices(berg, bad):
    for call in (lambda: prec.normalize(bad),
                 lambda: berg.get_encoding_model(MODEL, subject=1, precision=bad),
                 lambda: apply_head(np.zeros((2, 8), np.float32), {"coef": np.zeros((8, 3), np.float32),
                                                                   "intercept": np.zeros(3, np.float32)}, bad)):
        with pytest.raises(InvalidParameterError, match=r"precision must be one of 'highest', 'tf32', 'bf16', got"):
            call()


# --------------------------------------------------------------------------- highest


def test_highest_is_float32_highest_throughout(highest, frames):
    assert highest.precision == "highest"
    leaves = jax.tree.leaves(highest.params)
    assert {str(a.dtype) for a in leaves} == {"float32"}
    text, ops = conv_and_dot_lines(encode_frames, highest.params, frames, precision=highest.precision)
    assert "bf16" not in text
    assert len(ops) > 60  # S3D's convolutions and matmuls, the 7 tap projections, the regression
    for line in ops:
        assert "HIGHEST" in line and "DEFAULT" not in line, line


def test_highest_legacy_spellings_give_the_same_bits(berg, highest, highest_out, frames):
    legacy = berg.get_encoding_model(MODEL, subject=1, precision=jax.lax.Precision.HIGHEST)
    assert legacy.precision == "highest"
    fn, params = encoder(legacy)
    np.testing.assert_array_equal(np.asarray(fn(params, frames)), highest_out)
    # The jitted function called directly with the lax enum, as code written before took it.
    direct = encode_frames(highest.params, frames, precision=jax.lax.Precision.HIGHEST, conv_impl="2d",
                           backbone_chunk=highest.backbone_chunk)
    np.testing.assert_array_equal(np.asarray(direct), highest_out)


# --------------------------------------------------------------------------- tf32


def test_tf32_is_lax_default_and_equals_highest_on_cpu(berg, highest, highest_out, frames):
    for given in ("tf32", None):
        model = berg.get_encoding_model(MODEL, subject=1, precision=given)
        assert model.precision == "tf32"
        assert {str(a.dtype) for a in jax.tree.leaves(model.params)} == {"float32"}
    text, ops = conv_and_dot_lines(encode_frames, model.params, frames, precision="tf32")
    assert "bf16" not in text
    for line in ops:
        assert "HIGHEST" not in line, line
    if jax.default_backend() != "cpu":
        pytest.skip("tf32 == highest only on XLA:CPU")
    fn, params = encoder(model)
    np.testing.assert_array_equal(np.asarray(fn(params, frames)), highest_out)


# --------------------------------------------------------------------------- bf16


@pytest.fixture(scope="module")
def bf16(berg):
    return berg.get_encoding_model(MODEL, subject=1, precision="bf16")


@pytest.fixture(scope="module")
def bf16_out(bf16, frames):
    fn, params = encoder(bf16)
    return np.asarray(fn(params, frames))


def test_bf16_params_are_cast_once_at_load(berg, bf16, highest):
    assert bf16.precision == "bf16"
    s3d, projection, regression = bf16.params.s3d, bf16.params.projection, bf16.params.regression
    leaves = jax.tree_util.tree_leaves_with_path(s3d)
    assert {str(a.dtype) for p, a in leaves if p[-1].key == "kernel"} == {"bfloat16"}
    assert {str(w.dtype) for w in projection["weights"]} == {"bfloat16"}
    # float32: the biases are added to float32 accumulators; the regression is float32
    assert {str(a.dtype) for p, a in leaves if p[-1].key != "kernel"} == {"float32"}
    assert projection["bias"].dtype == np.float32
    assert {str(a.dtype) for a in jax.tree.leaves(regression)} == {"float32"}
    # One bfloat16 copy per BERG and device, shared by every bf16 model; the float32 one untouched.
    again = berg.get_encoding_model(MODEL, subject=1, precision="bf16", selection={"roi": "lFFA"})
    assert again.params.projection["weights"][0] is projection["weights"][0]
    assert jax.tree.leaves(again.params.s3d)[0] is jax.tree.leaves(s3d)[0]
    assert highest.params.projection["weights"][0].dtype == np.float32


def test_bf16_lowering_is_bfloat16_with_float32_accumulation(bf16, frames):
    text, ops = conv_and_dot_lines(encode_frames, bf16.params, frames, precision="bf16")
    n_bf16 = 0
    for line in ops:
        operands, result = line.rsplit("->", 1)
        assert "f32" in result, line  # every conv and dot accumulates into float32
        n_bf16 += "xbf16>" in operands
    assert n_bf16 == len(ops) - 1  # all but the regression: (B, K) f32 @ (K, N) f32 at HIGHEST
    regression = [ln for ln in ops if "xbf16>" not in ln.rsplit("->", 1)[0]]
    assert len(regression) == 1 and "HIGHEST" in regression[0]


def test_bf16_stays_close_to_highest_and_returns_float32(bf16_out, highest_out):
    assert bf16_out.dtype == np.float32 and bf16_out.shape == highest_out.shape
    assert np.isfinite(bf16_out).all()
    err = rel_err(bf16_out, highest_out)
    print(f"bf16 vs highest: max |diff| / max |highest| = {err:.2e}")
    assert BF16_FLOOR < err <= BF16_RTOL


def test_bf16_on_float32_params_equals_the_load_time_cast(highest, bf16_out, frames):
    """Cast per call (float32 params into the bf16 function) == cast once at load: same rounding."""
    got = encode_frames(highest.params, frames, precision="bf16", conv_impl=highest.conv_impl,
                        backbone_chunk=highest.backbone_chunk)
    np.testing.assert_array_equal(np.asarray(got), bf16_out)


def test_bf16_components_are_float32_and_give_its_responses(env, berg, bf16_out, frames):
    """A bf16 components model: float32 components, and `responses_from_components` (default
    "highest") turns them into the bf16 encode's responses (its regression is float32 HIGHEST)."""
    model = berg.get_encoding_model(MODEL, subject=1, precision="bf16", components=True)
    fn, params = encoder(model)
    out = fn(params, frames)
    components, responses = np.asarray(out["components"]), np.asarray(out["responses"][1])
    assert components.dtype == responses.dtype == np.float32 and components.shape == (2, 8)
    np.testing.assert_array_equal(responses, bf16_out)
    again = responses_from_components(components, env[0], subject=1, device="cpu")
    np.testing.assert_array_equal(again, bf16_out)


# --------------------------------------------------------------------------- command line


def test_cli_precision_flag(env):
    parser = cli.build_parser()
    base = ["encode", "v.mp4", "--berg-dir", str(env[0]), "--subject", "1", "--out", "o"]
    assert parser.parse_args(base).precision == "highest"
    for name in prec.PRECISIONS:
        assert parser.parse_args([*base, "--precision", name]).precision == name
    opt = ["optimize", "--berg-dir", str(env[0]), "--subject", "1", "--roi", "lFFA", "--out", "o"]
    assert parser.parse_args(opt).precision == "highest"
    assert parser.parse_args([*opt, "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*base, "--precision", "fp16"])
    assert exc.value.code == 2


def test_cli_encode_records_precision_in_run_json(env, tmp_path, capsys):
    pytest.importorskip("av")
    from tests import video_fixtures as vf

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        vf.write_test_video(videos / f"v{i}.mp4", n_frames=14, height=64, width=80, seed=i)
    out = tmp_path / "out"
    code = cli.main(["encode", str(videos), "--berg-dir", str(env[0]), "--subject", "1", "--s3d-weights",
                     str(env[1]), "--out", str(out), "--batch-size", "2", "-q", "--precision", "bf16"])
    capsys.readouterr()
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == "bf16"
    responses = np.load(out / "responses.npy")
    assert responses.dtype == np.float32 and np.isfinite(responses).all()


@pytest.mark.slow
def test_bf16_gradient_is_finite_and_close(berg):
    """The optimiser's gradient through a bf16 model: finite, float32, pointing as highest's."""
    from berg_jax.optimize import initial_clip

    clip = jnp.asarray(initial_clip(0, (32, 32)))
    grads = {}
    for name in ("highest", "bf16"):
        fn, params = encoder(berg.get_encoding_model(MODEL, subject=1, precision=name, selection={"roi": "lFFA"}))
        grads[name] = np.asarray(jax.grad(lambda c: jnp.mean(fn(params, c[None])))(clip))
    assert grads["bf16"].dtype == np.float32 and np.isfinite(grads["bf16"]).all()
    a, b = grads["highest"].ravel(), grads["bf16"].ravel()
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    print(f"bf16 vs highest gradient cosine: {cos:.4f}")
    assert cos > 0.9
