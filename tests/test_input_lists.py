"""`encode --inputs-from LIST`: video paths from a list file (or standard input), in its order.

`video.read_input_list` on its own (order, comments, line endings, undecodable bytes, no
path looked at, the errors), then the command line: the rows follow the list, the same
command resumes, and `--distributed` takes the same block of a list as of a folder.
The encodes run in process through `cli.main`, on the K=8 synthetic model of test_cli.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")  # the videos are written with PyAV

from berg_jax import cli  # noqa: E402
from berg_jax.distributed import inputs_digest, shard_dir_name  # noqa: E402
from berg_jax.errors import UsageError  # noqa: E402
from berg_jax.synthetic_berg import make_synthetic_model  # noqa: E402
from berg_jax.video import list_videos, read_input_list  # noqa: E402
from tests import video_fixtures as vf  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_synthetic_model(tmp_path_factory.mktemp("lists"), n_components=8, seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good 64x80 videos: good0.mp4 (14 frames), good1.mp4 (17), good2.mp4 (20)."""
    d = tmp_path_factory.mktemp("list_videos") / "videos"
    d.mkdir()
    for i, n in enumerate((14, 17, 20)):
        vf.write_test_video(d / f"good{i}.mp4", n_frames=n, height=64, width=80, seed=i)
    return d


def encode_argv(env, out, *extra):
    return ["encode", "--berg-dir", str(env[0]), "--subject", "1", "--s3d-weights", str(env[1]),
            "--out", str(out), "--batch-size", "2", "-q", *map(str, extra)]


def run_cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest_paths(out):
    with open(Path(out) / "manifest.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [(r["path"], r["status"]) for r in csv.DictReader(f)]


def feed_stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


# --------------------------------------------------------------------------- the reader


def test_the_list_keeps_its_order_and_skips_comments_and_blank_lines(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_bytes(
        b"# clips of the screen, best source first\n"
        b"z/last-by-name.mp4\r\n"          # CRLF line ending: the \r is not part of the path
        b"\n"
        b"   \t\n"                          # whitespace only: blank
        b"a/first-by-name.mp4\n"
        b"  # an indented hash is a path, not a comment\n"
        b"m/with trailing space.mp4 \n"     # spaces are part of the path
        b"a/first-by-name.mp4\n"            # duplicates are kept
        b"caf\xe9-latin1.mp4\n"             # not UTF-8: kept as its bytes
        b"./#hash-named.mp4"                # no newline at the end
    )
    paths = read_input_list(listed)
    assert paths[:6] == ["z/last-by-name.mp4", "a/first-by-name.mp4",
                         "  # an indented hash is a path, not a comment", "m/with trailing space.mp4 ",
                         "a/first-by-name.mp4", paths[5]]
    assert os.fsencode(paths[5]) == b"caf\xe9-latin1.mp4"  # opens the same file
    assert paths[6:] == ["./#hash-named.mp4"]
    assert read_input_list(str(listed)) == paths  # str and PathLike alike


def test_no_listed_path_is_looked_at(tmp_path, monkeypatch):
    """A million paths on shared storage: no stat, no folder walk while reading the list."""
    (tmp_path / "a-folder").mkdir()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'a-folder'}\n{tmp_path / 'missing.mp4'}\n")

    listed_paths = {str(tmp_path / "a-folder"), str(tmp_path / "missing.mp4")}
    looked_at = []

    def watch(original):
        def watched(*args, **kwargs):
            if args and isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]) in listed_paths:
                looked_at.append((original.__name__, os.fspath(args[0])))
            return original(*args, **kwargs)
        return watched

    for module, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (os, "walk"), (os, "listdir"),
                         (os.path, "isdir"), (os.path, "exists"), (os.path, "isfile")):
        monkeypatch.setattr(module, name, watch(getattr(module, name)))
    assert read_input_list(listed) == [str(tmp_path / "a-folder"), str(tmp_path / "missing.mp4")]
    assert looked_at == []


def test_a_dash_reads_the_list_from_standard_input(monkeypatch):
    feed_stdin(monkeypatch, b"b.mp4\n# note\na.mp4\r\n")
    assert read_input_list("-") == ["b.mp4", "a.mp4"]


@pytest.mark.parametrize("content, message", [
    (None, "input list {list}: no such file"),
    (b"", "input list {list} is empty"),
    (b"# only a comment\n\n", "input list {list} has 2 lines but no path"),
    ("folder", "input list {list}: is a folder"),
])
def test_a_missing_or_empty_list_is_a_usage_error_naming_it(tmp_path, content, message):
    listed = tmp_path / "list.txt"
    if content == "folder":
        listed.mkdir()
    elif content is not None:
        listed.write_bytes(content)
    with pytest.raises(UsageError) as info:
        read_input_list(listed)
    assert message.format(list=listed) in str(info.value)


# --------------------------------------------------------------------------- the command line


def test_encode_inputs_from_writes_rows_in_list_order_and_resumes(env, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(folder)  # relative paths are opened from the current folder, as a shell would
    listed_paths = [str(folder / "good2.mp4"), "good0.mp4", str(folder / "missing.mp4"), "good1.mp4"]
    listed = tmp_path / "list.txt"
    listed.write_text("# not sorted on purpose\n" + "\n".join(listed_paths) + "\n")
    out = tmp_path / "out"
    argv = encode_argv(env, out, "--inputs-from", listed)

    code, stdout, err = run_cli(capsys, argv)
    assert code == 1, err  # the missing file
    assert manifest_paths(out) == [(listed_paths[0], "ok"), ("good0.mp4", "ok"),
                                   (listed_paths[2], "failed"), ("good1.mp4", "ok")]
    assert json.loads((out / "job.json").read_text("utf-8"))["inputs"] == listed_paths
    responses = np.load(out / "responses.npy")
    assert np.isfinite(responses[[0, 1, 3]]).all() and np.isnan(responses[2]).all()
    before = {name: (out / name).read_bytes() for name in ("responses.npy", "manifest.csv", "job.json")}

    # The same command again finds the same job, done; so does the list on standard input.
    code, stdout, err = run_cli(capsys, argv)
    assert code == 1 and "4 videos were already done (resumed)" in stdout, err
    feed_stdin(monkeypatch, listed.read_bytes())
    code, stdout, err = run_cli(capsys, encode_argv(env, out, "--inputs-from", "-"))
    assert code == 1 and "4 videos were already done (resumed)" in stdout, err
    assert {name: (out / name).read_bytes() for name in before} == before

    # The list in another order is another job: refused, OUT untouched.
    listed.write_text("\n".join(sorted(listed_paths)) + "\n")
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and "holds the results of a different job" in err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_distributed_shard_of_a_list_is_its_first_block_as_for_a_folder(env, folder, tmp_path, capsys):
    shard_argv = ("--distributed", "--process-id", "0", "--num-processes", "2")
    shard = Path("shards") / shard_dir_name(0, 2)

    # The folder, and a list of exactly its listing: the same shard, byte for byte.
    from_folder, from_list = tmp_path / "from_folder", tmp_path / "from_list"
    code, stdout, err = run_cli(capsys, encode_argv(env, from_folder, folder, *shard_argv))
    assert code == 0, err
    listing = list_videos([folder])
    (tmp_path / "listing.txt").write_text("\n".join(listing) + "\n")
    code, stdout, err = run_cli(capsys, encode_argv(env, from_list, "--inputs-from", tmp_path / "listing.txt",
                                                    *shard_argv))
    assert code == 0, err
    assert "inputs 0..0 of 3" in stdout
    for name in ("shard.json", "manifest.csv", "job.json", "responses.npy"):
        assert (from_list / shard / name).read_bytes() == (from_folder / shard / name).read_bytes(), name

    # A list in another order: shard 0 is the first block of the list as written, not sorted.
    reordered = [listing[2], listing[0], listing[1]]
    (tmp_path / "reordered.txt").write_text("\n".join(reordered) + "\n")
    out = tmp_path / "from_reordered"
    code, stdout, err = run_cli(capsys, encode_argv(env, out, "--inputs-from", tmp_path / "reordered.txt",
                                                    *shard_argv))
    assert code == 0, err
    assert manifest_paths(out / shard) == [(reordered[0], "ok")]
    record = json.loads((out / shard / "shard.json").read_text("utf-8"))
    assert (record["first_row"], record["n_rows"], record["n_inputs"]) == (0, 1, 3)
    assert record["inputs_sha256"] == inputs_digest(reordered)


def test_inputs_from_usage_errors_are_one_line_exit_2(env, folder, tmp_path, capsys):
    listed = tmp_path / "list.txt"
    listed.write_text(f"{folder / 'good0.mp4'}\n")
    cases = {
        "both": ([folder, "--inputs-from", listed], "not both"),
        "neither": ([], "give video files or folders to encode, or --inputs-from LIST"),
        "missing list": (["--inputs-from", tmp_path / "nope.txt"], f"input list {tmp_path / 'nope.txt'}: no such file"),
        "empty list": (["--inputs-from", tmp_path / "empty.txt"], f"input list {tmp_path / 'empty.txt'} is empty"),
    }
    (tmp_path / "empty.txt").write_bytes(b"")
    for label, (extra, message) in cases.items():
        code, _, err = run_cli(capsys, encode_argv(env, tmp_path / "out", *extra))
        assert code == 2, label
        assert err.count("\n") == 1 and err.startswith("berg-jax encode: error: "), (label, err)
        assert message in err and "Traceback" not in err, (label, err)
    assert not (tmp_path / "out").exists()


def test_demo_still_runs_encode_through_its_parser(folder):
    """`demo` hands its clips to encode's parser as arguments; --inputs-from stays unset."""
    demo = cli.build_parser().parse_args(["demo"])
    args = demo.encode_parser.parse_args([str(folder / "good0.mp4"), "--berg-dir", "b", "--out", "o"])
    assert args.inputs == [str(folder / "good0.mp4")] and args.inputs_from is None
