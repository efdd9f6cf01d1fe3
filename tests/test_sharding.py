"""All local devices: each batch is sharded over a 1-D mesh (batch axis), parameters replicated.

Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the device
count is fixed when JAX starts). With batch 8 each device computes two videos, so the
4-device outputs must equal a 1-device run at batch 2 bit for bit (the same per-device
program), and a 1-device run at batch 8 to the parity tolerance, 1e-4 relative
(XLA:CPU may block convolutions of different batch sizes differently; measured 0 here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from berg_jax.api import BERG
    from berg_jax.errors import InvalidParameterError
    from berg_jax.synthetic import synthetic_video
    from berg_jax.synthetic_berg import make_synthetic_model

    berg_dir, pth = make_synthetic_model(sys.argv[1], subjects=(1,), n_components=8, seed=5)
    berg = BERG(berg_dir, s3d_weights=pth)
    videos = np.stack([synthetic_video(seed=i, n_frames=14, height=48, width=64) for i in range(8)])
    four = berg.get_encoding_model("fmri-bmd-s3d", subject=1, components=True, batch_size=8)
    one = berg.get_encoding_model("fmri-bmd-s3d", subject=1, components=True, batch_size=8, n_devices=1)
    per_device = berg.get_encoding_model("fmri-bmd-s3d", subject=1, components=True, batch_size=2, n_devices=1)
    a, b = berg.encode(four, videos, show_progress=False), berg.encode(one, videos, show_progress=False)
    c = berg.encode(per_device, videos, show_progress=False)
    shardings = {str(four.encode_fn()(videos)["components"].sharding.spec)}
    try:
        berg.get_encoding_model("fmri-bmd-s3d", subject=1, batch_size=6)
        refused = ""
    except InvalidParameterError as exc:
        refused = str(exc)
    default = berg.get_encoding_model("fmri-bmd-s3d", subject=1)
    print(json.dumps({
        "devices": len(jax.local_devices()), "model_devices": len(four.devices), "one_devices": len(one.devices),
        "default_batch": default.batch_size, "spec": sorted(shardings), "refused": refused,
        "max_rel": {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in (1, "components")},
        "max_rel_per_device": {k: float(np.abs(a[k] - c[k]).max() / np.abs(c[k]).max()) for k in (1, "components")},
        "equal_per_device": {k: bool(np.array_equal(a[k], c[k])) for k in (1, "components")},
    }))
""")


@pytest.mark.slow
def test_four_devices_equal_one(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"4 CPU devices vs 1: max relative difference {got['max_rel']}")
    assert got["devices"] == 4 and got["model_devices"] == 4 and got["one_devices"] == 1
    assert got["default_batch"] % 4 == 0
    assert got["spec"][0] in ("P('batch',)", "PartitionSpec('batch',)")
    assert "multiple of the 4 devices" in got["refused"]
    print(f"4 CPU devices vs 1 device at batch 2 (the same per-device shapes): {got['max_rel_per_device']}")
    assert max(got["max_rel"].values()) <= 1e-4
    # README: "the 4-device outputs equal a 1-device run at batch 2 bit for bit".
    assert got["equal_per_device"] == {"1": True, "components": True}
