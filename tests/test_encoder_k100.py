"""BERG's real component count: a K=100 synthetic berg_dir (the 1.7 GB pca_weights.npy), end to end."""

from __future__ import annotations

import time

import numpy as np
import pytest

from berg_jax.api import BERG
from berg_jax.berg_files import load_subject_head
from berg_jax.synthetic import random_state_dict, synthetic_video
from berg_jax.synthetic_berg import make_berg_dir
from berg_jax.torch_pickle import write_torch_state_dict
from tests.reference import SOURCES, WEIGHTS_SEED, load_reference
from weights_convert.make_reference import BERG_SEED, regress_f64

pytestmark = pytest.mark.slow


def test_k100_end_to_end(tmp_path):
    berg_dir = make_berg_dir(tmp_path / "berg", subjects=(1,), n_components=100, seed=BERG_SEED)
    pth = tmp_path / "s3d.pth"
    write_torch_state_dict(random_state_dict(WEIGHTS_SEED), pth)
    berg = BERG(berg_dir, s3d_weights=pth)
    start = time.perf_counter()
    model = berg.get_encoding_model("fmri-bmd-s3d", subject=1)
    print(f"K=100: first load incl. conversion {time.perf_counter() - start:.1f} s")

    i = 1  # the 360x640 source
    h, w, t = SOURCES[i]
    video = synthetic_video(seed=10 + i, n_frames=t, height=h, width=w)[None]
    got = berg.encode(model, video, show_progress=False)
    coef, intercept = load_subject_head(berg_dir, 1, 100)
    ref = regress_f64(load_reference()["components_k100"][i: i + 1], coef, intercept)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"K=100: max relative error {err:.2e}")
    assert err <= 1e-4
