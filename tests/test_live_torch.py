"""Live parity against torchvision itself, on fresh random weights (skipped where torch is absent)."""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from berg_jax import TAP_NAMES, extract_taps, load_s3d, preprocess
from berg_jax.synthetic import random_state_dict, synthetic_video
from weights_convert.make_reference import torch_model, torch_preprocess

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def torch():
    """torch, with torchvision importable (skips here, not at collection: the test stays selectable by -m torch)."""
    torch = pytest.importorskip("torch")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    pytest.importorskip("torchvision")
    return torch


def test_torch_saved_weights_video_to_taps(tmp_path, torch):
    """torch.save'd weights -> load_s3d, a 240x426 video -> preprocess -> taps, against torchvision end to end."""
    state_dict = random_state_dict(seed=7)
    path = tmp_path / "s3d.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    params = load_s3d(path)

    clip = synthetic_video(seed=5, n_frames=14, height=240, width=426)
    ref_input, _, _ = torch_preprocess(clip)  # (3, 14, 224, 224)
    ours = np.asarray(preprocess(clip[None]))[0]
    np.testing.assert_array_equal(ours, ref_input.numpy().transpose(1, 2, 3, 0))

    _, extractor = torch_model(state_dict)
    with torch.no_grad():
        ref = extractor(ref_input[None])
    out = extract_taps(params, jnp.asarray(ours[None]), precision=jax.lax.Precision.HIGHEST)
    for name in TAP_NAMES:
        np.testing.assert_allclose(
            np.asarray(out[name]), ref[name].numpy().transpose(0, 2, 3, 4, 1), rtol=0, atol=1e-4, err_msg=name)
