"""Many hosts: the split of the inputs, `encode --distributed`'s set-up, `berg-jax merge`.

The merge tests build shard folders with `writer.ResponseWriter` directly (no model, fast)
and compare the merged OUT with a single writer's OUT of all inputs, byte for byte. The
end-to-end test (slow) starts two real `berg-jax encode --distributed` processes that meet
through jax.distributed on 127.0.0.1, merges, and compares with a single-process encode.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from berg_jax import cli, distributed, merge, volumes, writer
from berg_jax.distributed import SHARD_FILE, Shard, shard_dir_name, shard_rows

REPO = Path(__file__).resolve().parents[1]
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
               "SLURM_PROCID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


# --------------------------------------------------------------------------- the split


def test_shard_rows_are_disjoint_complete_deterministic_and_balanced():
    for n in range(0, 41):
        for count in range(1, 10):
            blocks = [shard_rows(n, Shard(i, count)) for i in range(count)]
            assert [r for b in blocks for r in b] == list(range(n)), (n, count)  # disjoint, all
            assert blocks == [shard_rows(n, Shard(i, count)) for i in range(count)]
            sizes = [len(b) for b in blocks]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
            assert all(b.step == 1 for b in blocks)  # contiguous
    assert shard_rows(10, Shard(0, 3)) == range(0, 3)
    assert shard_rows(10, Shard(2, 3)) == range(6, 10)
    with pytest.raises(ValueError):
        shard_rows(10, Shard(3, 3))
    assert shard_dir_name(1, 2) == "process-00001-of-00002"


# --------------------------------------------------------------------------- set-up


def _args(**kw):
    base = {"distributed": False, "coordinator": None, "num_processes": None, "process_id": None}
    return argparse.Namespace(**{**base, **kw})


def test_without_distributed_setup_is_a_no_op_and_its_flags_are_usage_errors(tmp_path, capsys):
    assert distributed.setup(_args()) is None
    for extra in (["--num-processes", "2"], ["--process-id", "0"], ["--coordinator", "h:1"]):
        argv = ["encode", str(tmp_path / "x.mp4"), "--berg-dir", str(tmp_path), "--subject", "1",
                "--out", str(tmp_path / "out"), *extra]
        assert cli.main(argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{extra[0]} only go with --distributed: add --distributed" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, message", [
    ({"num_processes": 2, "process_id": 2}, "--process-id 2 is not below --num-processes 2"),
    ({"num_processes": 0}, "--num-processes must be at least 1"),
    ({"process_id": -1}, "--process-id must be 0 or more"),
    ({"coordinator": "nohostport", "num_processes": 2, "process_id": 0}, "give HOST:PORT"),
    ({"coordinator": "host:99999", "num_processes": 2, "process_id": 0}, "give HOST:PORT"),
])
def test_setup_checks_the_flags(kw, message):
    with pytest.raises(cli.UsageError, match=message):
        distributed.setup(_args(distributed=True, **kw))


def test_no_coordinator_computes_one_shard_alone(monkeypatch, capsys):
    import jax

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("initialize called"))
    shard = distributed.setup(_args(distributed=True, num_processes=3, process_id=1))
    assert shard == Shard(1, 3)
    assert "process 1 of 3, on its own" in capsys.readouterr().out


def test_setup_meets_the_others_then_detaches(monkeypatch, capsys):
    import jax
    from jax._src import distributed as jd

    calls = []

    def initialize(**kw):
        calls.append(("initialize", kw))
        monkeypatch.setattr(jd.global_state, "process_id", 1)
        monkeypatch.setattr(jd.global_state, "num_processes", 2)

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "shutdown", lambda: calls.append(("shutdown", {})))
    monkeypatch.delenv(distributed.KEEP_RUNTIME_ENV, raising=False)
    shard = distributed.setup(_args(distributed=True, coordinator="127.0.0.1:1234",
                                    num_processes=2, process_id=1))
    assert shard == Shard(1, 2)
    assert calls == [("initialize", {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                     "process_id": 1}), ("shutdown", {})]
    # detached: from here on a plain single-process JAX
    assert (jd.global_state.process_id, jd.global_state.num_processes) == (0, 1)
    out = capsys.readouterr().out
    assert "joining the coordinator 127.0.0.1:1234" in out and "process 1 of 2 (rendezvous done" in out

    # Everything from the environment (Slurm, TPU, ...): no flags are passed on.
    calls.clear()
    assert distributed.setup(_args(distributed=True)) == Shard(1, 2)
    assert calls[0] == ("initialize", {"coordinator_address": None, "num_processes": None,
                                       "process_id": None})

    # On a Cloud TPU VM (here forced) the runtime stays up, with a long exit barrier.
    calls.clear()
    monkeypatch.setenv(distributed.KEEP_RUNTIME_ENV, "1")
    assert distributed.setup(_args(distributed=True, num_processes=2, process_id=1,
                                   coordinator="h:1")) == Shard(1, 2)
    assert [c[0] for c in calls] == ["initialize"]
    assert calls[0][1]["shutdown_timeout_seconds"] >= 24 * 3600
    assert "the JAX distributed runtime stays up" in capsys.readouterr().out


NO_CLUSTER_CHILD = """
import sys
from berg_jax import cli, distributed
from tests.test_distributed import _args
try:
    distributed.setup(_args(distributed=True))
except cli.UsageError as exc:
    import jax
    print("USAGE:", exc)
    print("INITIALIZED:", jax.distributed.is_initialized())
    sys.exit(0)
print("NO ERROR")
"""


def test_no_cluster_environment_is_a_usage_error_naming_the_flags():
    """In a fresh process (no JAX backend started yet, whatever ran before in this one):
    JAX finds no cluster to go by, and the one-line error names the flags to pass."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", NO_CLUSTER_CHILD], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "INITIALIZED: False", proc.stdout
    usage = lines[-2]
    assert usage.startswith("USAGE: --distributed: JAX could not tell the coordinator"), usage
    assert "pass --coordinator HOST:PORT --num-processes N --process-id I" in usage


def test_distributed_after_a_backend_started_is_a_usage_error(monkeypatch):
    """In this process, once a JAX backend runs: JAX refuses to start the runtime after it,
    and berg-jax passes that on as a usage error."""
    import jax

    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    jax.devices()  # a backend is running from here on, whatever the test order
    with pytest.raises(cli.UsageError, match=r"^--distributed: .*before") as info:
        distributed.setup(_args(distributed=True, coordinator="127.0.0.1:1", num_processes=2, process_id=0))
    assert "\n" not in str(info.value)
    assert not jax.distributed.is_initialized()


# --------------------------------------------------------------------------- shard_inputs


def test_shard_inputs_gives_the_block_and_records_it(tmp_path, capsys):
    paths = [f"/v/{i}.mp4" for i in range(7)]
    out = tmp_path / "out"
    block, folder = distributed.shard_inputs(paths, out, Shard(1, 3))
    assert block == paths[2:4] and folder == out / "shards" / "process-00001-of-00003"
    rec = json.loads((folder / SHARD_FILE).read_text())
    assert rec == {"format": "berg-jax-shard/1", "index": 1, "count": 3, "first_row": 2, "n_rows": 2,
                   "n_inputs": 7, "inputs_sha256": distributed.inputs_digest(paths)}
    assert f"inputs 2..3 of 7 -> {folder}" in capsys.readouterr().out
    # the same again (a resume): fine
    assert distributed.shard_inputs(paths, out, Shard(1, 3)) == (block, folder)
    # the inputs changed since: refused, naming the fix
    with pytest.raises(writer.OutputDirError, match="inputs changed since that run"):
        distributed.shard_inputs(paths + ["/v/new.mp4"], out, Shard(1, 3))
    # another process count into the same OUT: refused
    with pytest.raises(writer.OutputDirError, match="resume that run with --num-processes 3"):
        distributed.shard_inputs(paths, out, Shard(0, 2))


def test_more_processes_than_inputs_records_an_empty_shard(tmp_path):
    # 3 inputs for 4 processes: blocks [0, 0), [0, 1), [1, 2), [2, 3)
    with pytest.raises(cli.UsageError, match="process 0 of 4 has nothing to encode: 3 inputs"):
        distributed.shard_inputs(["a.mp4", "b.mp4", "c.mp4"], tmp_path, Shard(0, 4))
    rec = json.loads((tmp_path / "shards" / shard_dir_name(0, 4) / SHARD_FILE).read_text())
    assert (rec["first_row"], rec["n_rows"]) == (0, 0)


# --------------------------------------------------------------------------- merge (no model)

CONFIG = {"model_id": "fmri-bmd-s3d", "subject": [1, 2], "selection": None, "pad_short": False,
          "n_voxels": {"responses_sub-01.npy": 5, "responses_sub-02.npy": 4}, "weights_fingerprint": "ab"}
COLUMNS = {"responses_sub-01.npy": 5, "responses_sub-02.npy": 4, "components.npy": 3}


def _values(n, columns):
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((n, w)).astype(np.float32) for name, w in columns.items()}


def _fill(writer, rows, values, failed, offset=0):
    """Write `rows` (indices of this writer) in pairs, failing those in `failed` (global rows)."""
    ok = [r for r in rows if r + offset not in failed]
    for r in rows:
        if r + offset in failed:
            writer.mark_failed(r, f"{writer.paths[r]}: {failed[r + offset]}")
    for k in range(0, len(ok), 2):
        idx = ok[k:k + 2]
        writer.write_rows(idx, {n: v[[i + offset for i in idx]] for n, v in values.items()})


def make_reference(tmp_path, paths, failed, columns=COLUMNS, config=CONFIG):
    ref = tmp_path / "ref"
    values = _values(len(paths), columns)
    w = writer.ResponseWriter.open(ref, paths, columns, config)
    _fill(w, w.pending(), {n: values[n] for n in columns}, failed)
    w.finish({"batch_size": 2})
    return ref


def make_shards(out, paths, count, failed, unfinished=(), configs=None, columns=COLUMNS):
    values = _values(len(paths), columns)
    for i in range(count):
        try:
            block, folder = distributed.shard_inputs(paths, out, Shard(i, count))
        except cli.UsageError:  # an empty shard
            continue
        first = shard_rows(len(paths), Shard(i, count)).start
        config = (configs or {}).get(i, CONFIG)
        w = writer.ResponseWriter.open(folder, block, columns, config)
        rows = w.pending()
        if i in unfinished:
            rows = rows[:1]
        _fill(w, rows, {n: values[n] for n in columns}, failed, offset=first)
        if i in unfinished:
            w.close()
        else:
            w.finish({"batch_size": 2, "device": f"cpu:{i}", "seconds": 1.0 + i})


def _merge(capsys, out):
    code = cli.main(["merge", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


PATHS = [f"/data/videos/clip_{i:02d}.mp4" for i in range(11)] + ["/data/videos/naïve, \"quoted\".mp4"]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_merge_equals_a_single_writer_byte_for_byte(tmp_path, capsys, count):
    failed = {1: "not a readable video container", 6: "has 9 frames, S3D needs at least 14"}
    ref = make_reference(tmp_path, PATHS, failed)
    out = tmp_path / "out"
    make_shards(out, PATHS, count, failed)
    capsys.readouterr()
    code, stdout, err = _merge(capsys, out)
    assert code == 1, err  # some inputs failed, as for encode
    for name in (*COLUMNS, "manifest.csv", "job.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    run = json.loads((out / "run.json").read_text())
    assert run["merged_from"] == count and (run["n_inputs"], run["n_ok"], run["n_failed"]) == (12, 10, 2)
    assert run["arrays"] == COLUMNS and run["subject"] == [1, 2] and len(run["shards"]) == count
    assert run["shards"][-1]["run"]["device"] == f"cpu:{count - 1}"
    assert "model_id" not in run["shards"][0]["run"]  # the shared run_config is said once
    assert f"berg-jax merge: {count} shards -> {out}: 10 of 12 videos encoded, 2 failed" in stdout
    assert "failed (2, recorded in manifest.csv):" in stdout
    assert "/data/videos/clip_06.mp4: has 9 frames" in stdout
    # OUT is a finished encode folder of all the inputs: a writer resuming it has nothing to do
    w = writer.ResponseWriter.open(out, PATHS, COLUMNS, CONFIG)
    assert w.pending() == []
    with open(ref / "manifest.csv", newline="") as f:
        ref_rows = [(r["path"], int(r["row"]), r["status"], r["error"]) for r in csv.DictReader(f)]
    assert w.manifest_rows() == ref_rows
    w.close()
    # merging again gives the same files
    before = {n: (out / n).read_bytes() for n in (*COLUMNS, "manifest.csv", "job.json", "progress.jsonl")}
    assert _merge(capsys, out)[0] == 1
    assert before == {n: (out / n).read_bytes() for n in before}
    assert not list(out.glob(".*berg-tmp-*"))


def test_merge_without_failures_exits_0_and_skips_empty_shards(tmp_path, capsys):
    paths = PATHS[:3]
    columns = {"responses.npy": 6}
    config = {**CONFIG, "subject": 1, "n_voxels": 6}
    ref = make_reference(tmp_path, paths, {}, columns, config)
    out = tmp_path / "out"
    make_shards(out, paths, 5, {}, configs={i: config for i in range(5)}, columns=columns)
    assert len(list((out / "shards").iterdir())) == 5  # 2 of them empty
    code, stdout, _ = _merge(capsys, out)
    assert code == 0
    assert "5 shards (2 empty)" in stdout and "3 of 3 videos encoded, 0 failed" in stdout
    for name in ("responses.npy", "manifest.csv", "job.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_merge_refuses_an_unfinished_shard(tmp_path, capsys):
    out = tmp_path / "out"
    make_shards(out, PATHS, 3, {}, unfinished=(1,))
    code, _, err = _merge(capsys, out)
    assert code == cli.EXIT_USAGE
    assert "shard 1 of 3 is not finished" in err
    assert "run the same `berg-jax encode --distributed` command for process 1 again" in err
    assert "--process-id 1" in err and "Traceback" not in err
    assert not (out / "manifest.csv").exists() and not (out / "run.json").exists()


def test_merge_refuses_a_missing_shard(tmp_path, capsys):
    out = tmp_path / "out"
    make_shards(out, PATHS, 3, {})
    shutil.rmtree(out / "shards" / shard_dir_name(2, 3))
    code, _, err = _merge(capsys, out)
    assert code == cli.EXIT_USAGE
    assert "shard 2 of 3 is missing" in err and "command for process 2" in err


def test_merge_refuses_shards_with_other_settings(tmp_path, capsys):
    out = tmp_path / "out"
    make_shards(out, PATHS, 2, {}, configs={1: {**CONFIG, "pad_short": True}})
    with pytest.raises(writer.OutputDirError, match=r"shard 1 of 2 was encoded with other settings "
                                                     r"than shard 0 \(run_config\['pad_short'\]"):
        merge.merge_shards(out)
    assert _merge(capsys, out)[0] == cli.EXIT_USAGE


def test_merge_refuses_no_shards_mixed_counts_a_shard_in_use_and_another_job(tmp_path, capsys):
    code, _, err = _merge(capsys, tmp_path / "nothing")
    assert code == cli.EXIT_USAGE and "holds no shards" in err

    out = tmp_path / "out"
    make_shards(out, PATHS, 2, {})
    # a shard being (re)written right now
    lock = writer.lock_dir(out / "shards" / shard_dir_name(0, 2))
    try:
        with pytest.raises(writer.OutputDirError, match="shard 0 of 2 .* is in use"):
            merge.merge_shards(out)
    finally:
        lock.close()
    # OUT itself holding another job's results is never overwritten
    (out / "job.json").write_text(json.dumps({"fingerprint": "other", "inputs": []}))
    with pytest.raises(writer.OutputDirError, match="already holds the results of another job"):
        merge.merge_shards(out)
    (out / "job.json").unlink()
    # folders of a run with another process count
    (out / "shards" / shard_dir_name(0, 3)).mkdir()
    with pytest.raises(writer.OutputDirError, match="runs with 2 and 3 processes"):
        merge.merge_shards(out)


def test_merge_concatenates_niftis_and_renames_plots(tmp_path, capsys):
    from berg_jax.pipeline import plot_file_name

    paths = PATHS[:5]
    mask = np.zeros((4, 5, 3), bool)
    mask.flat[[1, 7, 20, 33, 50, 59]] = True
    affine = np.diag([-2.5, 2.5, 2.5, 1.0])
    columns, config = {"responses.npy": 6}, {**CONFIG, "subject": 1, "n_voxels": 6}
    failed = {3: "broken"}
    ref = make_reference(tmp_path, paths, failed, columns, config)
    volumes.write_responses_nifti(ref / "responses.nii.gz", np.load(ref / "responses.npy"), mask, affine)
    out = tmp_path / "out"
    make_shards(out, paths, 2, failed, configs={0: config, 1: config}, columns=columns)
    for i in range(2):
        folder = out / "shards" / shard_dir_name(i, 2)
        volumes.write_responses_nifti(folder / "responses.nii.gz", np.load(folder / "responses.npy"),
                                      mask, affine)
        rows = shard_rows(len(paths), Shard(i, 2))
        (folder / "plots").mkdir()
        for j, r in enumerate(rows):
            if r not in failed:
                (folder / "plots" / plot_file_name(paths[r], j, len(rows))).write_bytes(b"png %d" % r)
    code, stdout, _ = _merge(capsys, out)
    assert code == 1
    assert (out / "responses.nii.gz").read_bytes() == (ref / "responses.nii.gz").read_bytes()
    assert f"NIfTI      {out / 'responses.nii.gz'}" in stdout
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == sorted(plot_file_name(paths[r], r, 5) for r in range(5) if r not in failed)
    assert (out / "plots" / plot_file_name(paths[4], 4, 5)).read_bytes() == b"png 4"

    # NIfTIs in only some shards: not merged, and the summary says where they are
    (out / "shards" / shard_dir_name(1, 2) / "responses.nii.gz").unlink()
    (out / "responses.nii.gz").unlink()
    code, stdout, _ = _merge(capsys, out)
    assert "only 1 of 2 shards have responses.nii.gz: not merged" in stdout
    assert not (out / "responses.nii.gz").exists()


# --------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from berg_jax.synthetic_berg import make_synthetic_model

    return make_synthetic_model(tmp_path_factory.mktemp("dist_model"), n_components=8, seed=0)


@pytest.mark.slow
def test_two_processes_then_merge_equal_one_process(model, tmp_path, capsys):
    pytest.importorskip("av")
    from tests import video_fixtures as vf

    videos = tmp_path / "videos"
    videos.mkdir()
    sizes = [(32, 32), (64, 64), (48, 64), (64, 64), (32, 48)]
    names = ["v0.mp4", "v2.mp4", "v3.mp4", "v4.mp4", "v5.mp4"]
    for k, (name, (h, w)) in enumerate(zip(names, sizes)):
        vf.write_test_video(videos / name, n_frames=14 + k, height=h, width=w, seed=k)
    vf.write_truncated(videos / "v1_broken.mp4")  # row 1: in process 0's block
    base = ["encode", str(videos), "--berg-dir", str(model[0]), "--subject", "1",
            "--s3d-weights", str(model[1]), "--batch-size", "2", "-q", "--nifti", "--device", "cpu"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "berg_jax.cli"]

    def report(line):  # shown with -s, past capsys
        with capsys.disabled():
            print(f"\n  {line}", end="")

    # One process, all inputs (also converts the model once and fills the compilation cache).
    single = tmp_path / "single"
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *base, "--out", str(single)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr  # the broken file
    report(f"single process: {time.perf_counter() - t0:.1f} s")

    # Two processes meeting on 127.0.0.1.
    out = tmp_path / "out"
    port = _free_port()

    def dist_argv(i, coordinator=True):
        extra = ["--coordinator", f"127.0.0.1:{port}"] if coordinator else []
        return [*cmd, *base, "--out", str(out), "--distributed", *extra,
                "--num-processes", "2", "--process-id", str(i)]

    def run_both():
        procs = [subprocess.Popen(dist_argv(i), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            texts = [p.communicate(timeout=300) for p in procs]
            return [(p.returncode, o, e) for p, (o, e) in zip(procs, texts)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    t0 = time.perf_counter()
    (rc0, out0, err0), (rc1, out1, err1) = run_both()
    report(f"two processes: {time.perf_counter() - t0:.1f} s")
    assert rc0 == 1, err0  # v1_broken.mp4 is in process 0's block
    assert rc1 == 0, err1
    assert "process 0 of 2 (rendezvous done" in out0 and "inputs 0..2 of 6" in out0
    assert "process 1 of 2 (rendezvous done" in out1 and "inputs 3..5 of 6" in out1
    assert "2 of 3 videos encoded, 1 failed" in out0 and "3 of 3 videos encoded, 0 failed" in out1

    code, stdout, err = _merge(capsys, out)
    assert code == 1, err
    assert "2 shards" in stdout and "5 of 6 videos encoded, 1 failed" in stdout

    def compare():
        a, b = np.load(out / "responses.npy"), np.load(single / "responses.npy")
        diff = float(np.nanmax(np.abs(a - b)))
        report(f"max |two processes merged - one process| = {diff:g}")
        assert np.array_equal(np.isnan(a), np.isnan(b))
        for name in ("responses.npy", "manifest.csv", "job.json", "responses.nii.gz"):
            assert (out / name).read_bytes() == (single / name).read_bytes(), name
        return diff

    assert compare() == 0.0

    # Resume, per shard. Shard 1 loses its finish and its last journal entries (as if killed);
    # its command alone, without the coordinator, finishes it from where it stopped.
    shard1 = out / "shards" / shard_dir_name(1, 2)
    (shard1 / "run.json").unlink()
    (shard1 / "manifest.csv").unlink()
    journal = (shard1 / "progress.jsonl").read_bytes().splitlines(keepends=True)
    (shard1 / "progress.jsonl").write_bytes(journal[0])
    n_kept = len(json.loads(journal[0])["rows"])
    code, _, err = _merge(capsys, out)
    assert code == cli.EXIT_USAGE and "shard 1 of 2 is not finished" in err
    t0 = time.perf_counter()
    proc = subprocess.run(dist_argv(1, coordinator=False), env=env, capture_output=True,
                          text=True, timeout=300)
    report(f"shard 1 alone, resumed: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr
    assert "process 1 of 2, on its own" in proc.stdout
    assert f"{n_kept} videos were already done (resumed)" in proc.stdout
    # And the same two commands again: both find their shard done.
    t0 = time.perf_counter()
    (rc0, out0, err0), (rc1, out1, err1) = run_both()
    report(f"two processes again (all resumed): {time.perf_counter() - t0:.1f} s")
    assert (rc0, rc1) == (1, 0), err0 + err1
    assert "3 videos were already done (resumed)" in out0 and "3 videos were already done (resumed)" in out1
    assert _merge(capsys, out)[0] == 1
    assert compare() == 0.0

