"""Many hosts: `berg-jax encode --distributed` and `berg-jax merge OUT`.

Every process runs the same command:

    berg-jax encode VIDEOS... --berg-dir DIR --subject 1 --out OUT --distributed \\
        [--coordinator HOST:PORT --num-processes N --process-id I]

`setup` starts `jax.distributed.initialize()`, which takes the coordinator address, the
process count and this process's id from the flags or, where they are left out, from the
environment JAX recognises (Slurm, Open MPI, Cloud TPU pod slices, Kubernetes jobs; and
its own `JAX_COORDINATOR_ADDRESS` / `JAX_COORDINATOR_PORT` / `JAX_LOCAL_DEVICE_IDS`).
The runtime is only the rendezvous: once every process knows its index and the count,
`setup` shuts it down again, before any backend starts, and resets JAX's record to
"process 0 of 1" (else jax.process_count() stays > 1 and orbax, which loads the model,
asks for the runtime). The processes never exchange data, and a live runtime would tie
their fates together: JAX aborts every process when one of them dies, and all of them
when one reaches the exit barrier more than its shutdown timeout (5 minutes) before the
slowest (both observed with jax 0.10 on CPU). Detached, each process is a plain single-process JAX on its own devices
(`jax.local_devices()`), exactly as in a normal run, and a crash costs only that shard's
unsaved work. Cloud TPU VMs are the exception (`_keep_runtime`): the TPU runtime spans
every host of a pod slice anyway, so the runtime stays up, with a long exit barrier.

`shard_inputs` gives process i of n the contiguous block of the (sorted, identical on every
host) input list with rows [i * len // n, (i + 1) * len // n): disjoint, covering every
input, deterministic, block sizes differing by at most one. Its results go to a normal
encode output folder OUT/shards/process-IIIII-of-NNNNN/ (see `outputs`), plus `shard.json`:
`{"format", "index", "count", "first_row", "n_rows", "n_inputs", "inputs_sha256"}`, so
`merge` can check that the shards cover rows 0..n_inputs-1 exactly once, of the same list.
Re-running the same command resumes that shard (the usual `outputs` resume protocol).

`--num-processes N --process-id I` without a coordinator (flag or JAX_COORDINATOR_ADDRESS)
skips the runtime: shard I of N is computed on its own. That is how one shard is
(re)computed alone, or how shards run as independent jobs (a Slurm job array).

`berg-jax merge OUT` checks the shards (all present, finished, not in use, same settings,
rows 0..n-1 exactly once) and writes into OUT itself what a single-process
`berg-jax encode` of all inputs writes: job.json, every array (streamed block by block into
a hidden temporary file, then renamed: memory stays bounded for any number of rows),
progress.jsonl, manifest.csv with global rows, run.json ("merged_from", per-shard run
infos), and, when every shard has them, the 4-D NIfTIs (volumes concatenated) and the
plots (renamed to global rows). job.json, the arrays, manifest.csv and the NIfTIs are
byte-identical to the single-process run's; OUT is then a finished encode folder like any
other (a single-process `encode` of the same inputs into it finds nothing left to do).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SHARDS_DIR = "shards"
SHARD_FILE = "shard.json"
SHARD_FORMAT = "berg-jax-shard/1"
_SHARD_NAME = re.compile(r"process-(\d+)-of-(\d+)")
_COPY_BYTES = 64 << 20  # arrays are copied in blocks of about this many bytes
_JOURNAL_ROWS = 4096  # merged progress.jsonl: ok rows per line
_ENCODE = "`berg-jax encode --distributed`"


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among `count` processes (jax.process_index / process_count)."""

    index: int
    count: int


def _usage_error(message: str) -> Exception:
    from berg_jax.cli import UsageError  # lazily: cli imports this module

    return UsageError(message)


# --------------------------------------------------------------------------- the split


def shard_dir_name(index: int, count: int) -> str:
    """`process-IIIII-of-NNNNN`, the folder of shard `index` of `count` under OUT/shards."""
    return f"process-{index:05d}-of-{count:05d}"


def shard_rows(n_inputs: int, shard: Shard) -> range:
    """The rows of shard `shard.index` of `shard.count` among `n_inputs` inputs.

    Contiguous blocks [i * n // count, (i + 1) * n // count): disjoint, together exactly
    0..n-1, sizes floor(n / count) or one more (empty blocks only when n < count).
    """
    if not 0 <= shard.index < shard.count:
        raise ValueError(f"shard index {shard.index} not in 0..{shard.count - 1}")
    return range(shard.index * n_inputs // shard.count, (shard.index + 1) * n_inputs // shard.count)


def inputs_digest(paths: Sequence[str]) -> str:
    """sha256 of the input list in order (NUL-separated; undecodable names as their bytes)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fspath(p).encode("utf-8", errors="surrogateescape") + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- encode side


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--distributed, --coordinator HOST:PORT, --num-processes N, --process-id I on `encode`."""
    g = p.add_argument_group(
        "many hosts", "Run the same command in every process; each encodes its own contiguous "
                      "block of the inputs into OUT/shards/, then `berg-jax merge OUT` assembles "
                      "them. Without the flags below, JAX takes them from the environment "
                      "(Slurm, Open MPI, Cloud TPU pods, Kubernetes, JAX_COORDINATOR_ADDRESS).")
    g.add_argument("--distributed", action="store_true",
                   help="be one of several processes (hosts) sharing the inputs")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which every process can reach (with --distributed)")
    g.add_argument("--num-processes", type=int, metavar="N", help="how many processes in all")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process, 0..N-1 (without --coordinator: compute shard I of N on its "
                        "own, without the JAX distributed runtime)")


def _check_coordinator(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _usage_error(f"--coordinator {text}: give HOST:PORT of process 0, e.g. "
                           "node001:12345 (the same in every process)")
    return text.strip()


def setup(args: argparse.Namespace) -> Shard | None:
    """Start jax.distributed when --distributed is given; None otherwise.

    Must run before anything initialises a JAX backend. Returns this process's Shard;
    the runtime is shut down again before returning (see the module docstring).
    """
    coordinator = getattr(args, "coordinator", None)
    num = getattr(args, "num_processes", None)
    pid = getattr(args, "process_id", None)
    if not getattr(args, "distributed", False):
        given = [flag for flag, v in (("--coordinator", coordinator), ("--num-processes", num),
                                      ("--process-id", pid)) if v is not None]
        if given:
            raise _usage_error(f"{', '.join(given)} only go with --distributed: add --distributed "
                               "(one of several processes), or leave them out for a "
                               "single-process run")
        return None
    if num is not None and num < 1:
        raise _usage_error(f"--num-processes must be at least 1, got {num}")
    if pid is not None and pid < 0:
        raise _usage_error(f"--process-id must be 0 or more, got {pid}")
    if num is not None and pid is not None and pid >= num:
        raise _usage_error(f"--process-id {pid} is not below --num-processes {num}: "
                           f"the processes are numbered 0..{num - 1}")
    if coordinator is not None:
        coordinator = _check_coordinator(coordinator)
    if coordinator is None and not os.environ.get("JAX_COORDINATOR_ADDRESS") \
            and num is not None and pid is not None:
        print(f"berg-jax encode: process {pid} of {num}, on its own (no --coordinator: "
              "computing this shard without the JAX distributed runtime)", flush=True)
        return Shard(pid, num)
    return _rendezvous(coordinator, num, pid)


# With the runtime kept (TPU pod slices), a process that finishes first waits at JAX's exit
# barrier for the slowest one; JAX's default of 5 minutes would abort them all instead.
_KEEP_SHUTDOWN_TIMEOUT_S = 7 * 24 * 3600
KEEP_RUNTIME_ENV = "BERG_JAX_KEEP_DISTRIBUTED"


def _keep_runtime() -> bool:
    """Whether to keep the JAX distributed runtime for the whole run instead of detaching.

    Kept on Cloud TPU VMs: there the TPU runtime spans every host of the slice
    (jax.process_count() > 1 whatever we do), and multi-process JAX code (orbax's restore
    barriers, used to load the model) needs the distributed client. Elsewhere each process
    becomes a plain single-process JAX. `BERG_JAX_KEEP_DISTRIBUTED=1` / `=0` overrides.
    """
    forced = os.environ.get(KEEP_RUNTIME_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:  # pragma: no cover
        return False
    return bool(running_in_cloud_tpu_vm)


def _rendezvous(coordinator: str | None, num: int | None, pid: int | None) -> Shard:
    """jax.distributed.initialize, read index and count, and (off TPU) detach again."""
    import jax

    where = f"the coordinator {coordinator}" if coordinator else "the coordinator"
    if pid is not None and num is not None:
        who = f"process {pid} of {num}"
    else:
        who = "this process (number and count from the environment)"
    print(f"berg-jax encode: --distributed: {who} joining {where}; every process must "
          "start within 5 minutes", flush=True)
    keep = _keep_runtime()
    kwargs: dict[str, Any] = {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}
    if keep:
        kwargs["shutdown_timeout_seconds"] = _KEEP_SHUTDOWN_TIMEOUT_S
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as exc:  # what JAX could not find out
        raise _usage_error(
            f"--distributed: JAX could not tell the coordinator, process count and process id "
            f"({exc}): no Slurm, Open MPI, Cloud TPU or Kubernetes environment was detected; "
            "pass --coordinator HOST:PORT --num-processes N --process-id I") from None
    except RuntimeError as exc:  # a backend already running, or initialised twice
        raise _usage_error(f"--distributed: {exc}") from None
    try:
        from jax._src import distributed as _jd  # the runtime's own record: no backend started

        state = _jd.global_state
        index, count = int(state.process_id), int(state.num_processes)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - another JAX
        state, keep = None, True
        index, count = jax.process_index(), jax.process_count()
    if (num is not None and num != count) or (pid is not None and pid != index):
        raise _usage_error(f"--distributed: JAX says this is process {index} of {count}, the "
                           f"flags say {pid} of {num}")
    if not keep:
        # Detach before any backend starts: from here on this process is a plain
        # single-process JAX (process 0 of 1, its own devices), as in a normal run.
        jax.distributed.shutdown()
        state.process_id, state.num_processes = 0, 1
        state.coordinator_address = state.partition_index = None
    print(f"berg-jax encode: process {index} of {count} (rendezvous done; "
          f"{'the JAX distributed runtime stays up' if keep else 'from here on independent'}, "
          "computing on this process's own devices)", flush=True)
    return Shard(index, count)


def _shard_record(shard: Shard, paths: Sequence[str]) -> dict:
    rows = shard_rows(len(paths), shard)
    return {"format": SHARD_FORMAT, "index": shard.index, "count": shard.count,
            "first_row": rows.start, "n_rows": len(rows), "n_inputs": len(paths),
            "inputs_sha256": inputs_digest(paths)}


def _shard_folders(root: Path) -> dict[tuple[int, int], Path]:
    """{(index, count): folder} of the shard folders under OUT/shards."""
    found = {}
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    for entry in entries:
        m = _SHARD_NAME.fullmatch(entry.name)
        if m and entry.is_dir():
            found[int(m.group(1)), int(m.group(2))] = entry
    return found


def shard_inputs(paths: list[str], out: str | os.PathLike, shard: Shard) -> tuple[list[str], Path]:
    """This process's contiguous block of `paths`, and its own output folder under OUT.

    Writes (atomically) OUT/shards/process-IIIII-of-NNNNN/shard.json. Raises OutputDirError
    when OUT holds the shards of a run with another process count, or this shard's folder
    was made from another input list; UsageError for an empty block (fewer inputs than
    processes) -- its empty shard is recorded first, so `merge` needs nothing more from it.
    """
    from berg_jax.outputs import OutputDirError, _pretty_json, atomic_write_text

    paths = [os.fspath(p) for p in paths]
    out = Path(out)
    root = out / SHARDS_DIR
    others = sorted({c for (_, c) in _shard_folders(root) if c != shard.count})
    if others:
        raise OutputDirError(
            f"{root} holds the shards of a run with {' and '.join(map(str, others))} processes, "
            f"this one has {shard.count}: resume that run with --num-processes {others[0]}, or "
            f"choose another --out (or delete {root} to start over)")
    folder = root / shard_dir_name(shard.index, shard.count)
    record = _shard_record(shard, paths)
    marker = folder / SHARD_FILE
    if marker.exists():
        try:
            old = json.loads(marker.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputDirError(f"{marker} is not readable ({exc}); delete {folder} to "
                                 "compute this shard again") from None
        if old != record:
            raise OutputDirError(
                f"{folder} was made from another input list ({old.get('n_inputs')} inputs, rows "
                f"{old.get('first_row')}..+{old.get('n_rows')}; now {len(paths)} inputs, rows "
                f"{record['first_row']}..+{record['n_rows']}): the inputs changed since that run; "
                f"choose another --out, or delete {root} to start over")
    folder.mkdir(parents=True, exist_ok=True)
    text = _pretty_json(record)
    if not marker.exists() or marker.read_text("utf-8") != text:
        atomic_write_text(marker, text)
    rows = shard_rows(len(paths), shard)
    if not rows:
        raise _usage_error(
            f"process {shard.index} of {shard.count} has nothing to encode: {len(paths)} inputs "
            f"for {shard.count} processes (its empty shard is recorded in {folder}; "
            f"`berg-jax merge {out}` needs nothing more from it)")
    print(f"berg-jax encode: process {shard.index} of {shard.count}: inputs {rows.start}.."
          f"{rows.stop - 1} of {len(paths)} -> {folder}\n"
          f"  when every process has finished: berg-jax merge {out}", flush=True)
    return paths[rows.start:rows.stop], folder


# --------------------------------------------------------------------------- merge


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """Register `berg-jax merge OUT`."""
    p = sub.add_parser(
        "merge", help="assemble the shards of `encode --distributed` in OUT",
        description="Check the shards in OUT/shards/ (all there, finished, same settings, every "
                    "input once) and write into OUT what a single-process `berg-jax encode` of all "
                    "the inputs writes: the arrays, manifest.csv (global rows), run.json, and the "
                    "NIfTIs and plots when every shard has them. Memory stays bounded; the shards "
                    "are kept (delete OUT/shards afterwards if you like). Exit status 1 when some "
                    "inputs failed, as for encode.")
    p.add_argument("out", metavar="OUT", help="the --out of the `encode --distributed` processes")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    summary = merge_shards(args.out)
    print_merge_summary(summary)
    return 1 if summary["n_failed"] else 0


@dataclasses.dataclass
class _ShardInfo:
    index: int
    folder: Path
    first_row: int
    n_rows: int
    job: dict | None = None  # None for an empty shard
    run: dict | None = None


def _fix(i: int, count: int, again: bool = True) -> str:
    return (f"run the same {_ENCODE} command for process {i}{' again' if again else ''} "
            f"(--process-id {i} of --num-processes {count}, or on its host)")


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8", errors="surrogateescape"))


def _read_shard(root: Path, i: int, count: int, folders: dict) -> _ShardInfo:
    from berg_jax import outputs

    what = f"shard {i} of {count}"
    folder = folders.get((i, count))
    if folder is None:
        raise outputs.OutputDirError(f"{what} is missing (no {root / shard_dir_name(i, count)}): "
                                     f"{_fix(i, count, again=False)}")
    try:
        rec = _load_json(folder / SHARD_FILE)
    except FileNotFoundError:
        raise outputs.OutputDirError(f"{what} has no {SHARD_FILE} in {folder}: it was not made by "
                                     f"{_ENCODE}; {_fix(i, count, again=False)}") from None
    except ValueError as exc:
        raise outputs.OutputDirError(f"{what}: {folder / SHARD_FILE} is not valid JSON ({exc}); "
                                     f"delete {folder} and {_fix(i, count, again=False)}") from None
    if rec.get("format") != SHARD_FORMAT or (rec.get("index"), rec.get("count")) != (i, count):
        raise outputs.OutputDirError(f"{what}: {folder / SHARD_FILE} does not describe shard {i} "
                                     f"of {count}; delete {folder} and {_fix(i, count, again=False)}")
    info = _ShardInfo(i, folder, int(rec["first_row"]), int(rec["n_rows"]))
    if info.n_rows == 0:
        return info
    missing = [n for n in (outputs.JOB_FILE, outputs.MANIFEST_FILE, outputs.RUN_FILE)
               if not (folder / n).is_file()]
    if missing:
        raise outputs.OutputDirError(f"{what} is not finished ({folder} has no "
                                     f"{' or '.join(missing)}): {_fix(i, count)}; it resumes "
                                     "where it stopped")
    try:
        info.job = _load_json(folder / outputs.JOB_FILE)
        info.run = _load_json(folder / outputs.RUN_FILE)
    except ValueError as exc:
        raise outputs.OutputDirError(f"{what}: unreadable job.json/run.json in {folder} ({exc}); "
                                     f"delete {folder} and {_fix(i, count, again=False)}") from None
    if info.job.get("n_inputs") != info.n_rows or len(info.job.get("inputs") or ()) != info.n_rows:
        raise outputs.OutputDirError(f"{what}: {folder / outputs.JOB_FILE} has "
                                     f"{info.job.get('n_inputs')} inputs, {SHARD_FILE} says "
                                     f"{info.n_rows}; delete {folder} and {_fix(i, count, again=False)}")
    return info


def _config_difference(a: dict, b: dict) -> str:
    diffs = []
    for key in ("format", "arrays", "n_voxels"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} {a.get(key)!r} != {b.get(key)!r}")
    ca, cb = a.get("run_config") or {}, b.get("run_config") or {}
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key, "<unset>") != cb.get(key, "<unset>"):
            diffs.append(f"run_config[{key!r}] {repr(ca.get(key, '<unset>'))[:80]} != "
                         f"{repr(cb.get(key, '<unset>'))[:80]}")
    return "; ".join(diffs)


def _manifest_rows(info: _ShardInfo) -> Iterator[list[str]]:
    """The data rows of a shard's manifest.csv, header checked."""
    from berg_jax import outputs

    path = info.folder / outputs.MANIFEST_FILE
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        if tuple(next(reader, ())) != outputs.MANIFEST_COLUMNS:
            raise outputs.OutputDirError(f"{path} does not start with the header "
                                         f"{','.join(outputs.MANIFEST_COLUMNS)}")
        yield from reader


def _check_rows(info: _ShardInfo, count: int, failed: list[tuple[str, str]]) -> int:
    """Check a shard's manifest against its job and journal; returns its failed count."""
    import numpy as np

    from berg_jax import outputs

    what = f"shard {info.index} of {count}"
    status = np.zeros(info.n_rows, np.uint8)  # 0 unrecorded, 1 ok, 2 failed
    entries, _ = outputs._read_journal(info.folder / outputs.PROGRESS_FILE, info.n_rows)
    for e in entries:
        status[np.asarray(e["rows"], np.int64)] = 1 if e["status"] == "ok" else 2
    inputs = info.job["inputs"]
    n_failed, j = 0, -1
    for j, row in enumerate(_manifest_rows(info)):
        bad = (len(row) != 4 or j >= info.n_rows or row[1] != str(j) or row[0] != inputs[j]
               or row[2] not in ("ok", "failed"))
        if bad or status[j] != (1 if row[2] == "ok" else 2):
            raise outputs.OutputDirError(
                f"{what} is not finished or is damaged (manifest.csv line {j + 2} "
                f"{','.join(row)[:120]!r} does not match its job.json/progress.jsonl): "
                f"{_fix(info.index, count)}; if that does not help, delete {info.folder} and "
                f"{_fix(info.index, count, again=False)}")
        if row[2] == "failed":
            n_failed += 1
            failed.append((row[0], row[3]))
    if j + 1 != info.n_rows:
        raise outputs.OutputDirError(f"{what}: manifest.csv has {j + 1} rows, expected "
                                     f"{info.n_rows}; {_fix(info.index, count)}")
    return n_failed


def _lock(folder: Path, what: str) -> Any:
    from berg_jax import outputs

    try:
        return outputs._lock_dir(folder)
    except outputs.OutputDirError:
        raise outputs.OutputDirError(
            f"{what} ({folder}) is in use by a running berg-jax process: wait for it to finish, "
            "then merge again") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def merge_shards(out: str | os.PathLike) -> dict:
    """Assemble OUT/shards/* into OUT (see the module docstring); returns a summary dict.

    Raises:
      UsageError: OUT holds no shards.
      outputs.OutputDirError: a shard is missing, unfinished, in use, damaged or made with
        other settings or another input list than the others; or OUT itself holds the
        results of another job. The message names the shard and the fix.
    """
    from berg_jax import outputs

    out = Path(out)
    root = out / SHARDS_DIR
    folders = _shard_folders(root)
    if not folders:
        raise _usage_error(f"{out} holds no shards (no {root}/process-*-of-*): run {_ENCODE} "
                           f"--out {out} in every process first")
    counts = sorted({c for _, c in folders})
    if len(counts) > 1:
        raise outputs.OutputDirError(
            f"{root} holds the shards of runs with {' and '.join(map(str, counts))} processes: "
            "delete the folders of the run you do not want, then merge again")
    count = counts[0]
    stray = sorted(i for i, _ in folders if i >= count)
    if stray:
        raise outputs.OutputDirError(f"{root} holds {shard_dir_name(stray[0], count)}, but "
                                     f"processes are numbered 0..{count - 1}: delete it")
    locks = []
    try:
        shards = []
        for i in range(count):
            info = _read_shard(root, i, count, folders)
            if info.n_rows:
                locks.append(_lock(info.folder, f"shard {i} of {count}"))
            shards.append(info)
        return _merge_locked(out, root, count, shards, locks)
    finally:
        for lock in locks:
            if lock is not None:
                lock.close()


def _merge_locked(out: Path, root: Path, count: int, shards: list[_ShardInfo], locks: list) -> dict:
    from berg_jax import __version__, outputs

    # ---- the shards agree with each other and cover 0..n-1 exactly once
    full = [s for s in shards if s.n_rows]
    recs = [_load_json(s.folder / SHARD_FILE) for s in shards]
    n_total = recs[0]["n_inputs"]
    for s, rec in zip(shards, recs):
        expect = shard_rows(n_total, Shard(s.index, count))
        if rec["n_inputs"] != n_total or rec["inputs_sha256"] != recs[0]["inputs_sha256"] \
                or (s.first_row, s.n_rows) != (expect.start, len(expect)):
            raise outputs.OutputDirError(
                f"shard {s.index} of {count} was made from another input list than shard 0 "
                f"({rec['n_inputs']} inputs, rows {s.first_row}..+{s.n_rows}; shard 0: "
                f"{n_total} inputs): every process must list the same inputs; delete "
                f"{s.folder} and {_fix(s.index, count, again=False)} with the same inputs as "
                "the others")
    if not full:
        raise outputs.OutputDirError(f"every shard in {root} is empty: there is nothing to merge")
    ref = full[0]
    for s in full[1:]:
        diff = _config_difference(ref.job, s.job)
        if diff:
            raise outputs.OutputDirError(
                f"shard {s.index} of {count} was encoded with other settings than shard "
                f"{ref.index} ({diff}): every process must run the same command; delete "
                f"{s.folder} and {_fix(s.index, count, again=False)} with the others' options")
    paths: list[str] = []
    for s in full:
        paths += s.job["inputs"]
    if len(paths) != n_total or inputs_digest(paths) != recs[0]["inputs_sha256"]:
        raise outputs.OutputDirError(f"the shards' inputs do not add up to the list they were "
                                     f"split from ({len(paths)} of {n_total}); delete {root} and "
                                     "encode again")
    failed: list[tuple[str, str]] = []
    n_failed = sum(_check_rows(s, count, failed) for s in full)
    # job.json stores "arrays" with sorted keys; its "n_voxels" is the first array's width in
    # the writer's order, so put an array of that width first (the fingerprint sorts keys).
    arrays: dict[str, int] = dict(sorted(((k, int(v)) for k, v in ref.job["arrays"].items()),
                                         key=lambda kv: kv[1] != ref.job["n_voxels"]))
    run_config = ref.job["run_config"]
    job = outputs._job_record(paths, arrays, run_config)

    # ---- OUT itself: ours to (re)write, or another job's?
    out_lock = _lock(out, "the output folder")
    locks.append(out_lock)
    job_path = out / outputs.JOB_FILE
    if job_path.exists():
        try:
            old = _load_json(job_path)
        except ValueError:
            old = {}
        if old.get("fingerprint") != job["fingerprint"]:
            raise outputs.OutputDirError(
                f"{out} already holds the results of another job ({job_path}; "
                f"{outputs._job_difference(old, job)}): merging would overwrite them; move them "
                "away, then merge again")
    else:
        ours = [n for n in (*arrays, outputs.PROGRESS_FILE, outputs.MANIFEST_FILE, outputs.RUN_FILE)
                if (out / n).exists()]
        if ours:
            raise outputs.OutputDirError(
                f"{out} already holds {', '.join(ours)} but no {outputs.JOB_FILE}, so they are not "
                "known to be this job's: move them away, then merge again")
    for leftover in out.glob(f".*{outputs._TMP_MARK}*"):  # from a merge killed mid-write
        leftover.unlink(missing_ok=True)
    # An interrupted merge must never look finished: the completion files go first, come last.
    for name in (outputs.RUN_FILE, outputs.MANIFEST_FILE, outputs.PROGRESS_FILE):
        (out / name).unlink(missing_ok=True)
    text = outputs._pretty_json(job)
    if not job_path.exists() or job_path.read_text("utf-8", errors="surrogateescape") != text:
        outputs.atomic_write_text(job_path, text)

    # ---- arrays, block by block
    files: dict[str, Path] = {}
    for name, width in arrays.items():
        _merge_array(out / name, full, count, width, n_total, outputs)
        files["responses" if name == outputs.RESPONSES_FILE else name[: -len(".npy")]] = out / name
    files["manifest"] = out / outputs.MANIFEST_FILE
    files["run"] = out / outputs.RUN_FILE

    # ---- NIfTIs and plots, when the shards have them
    notes: list[str] = []
    for name in arrays:
        if not name.startswith("responses"):
            continue
        nii = name[: -len(".npy")] + ".nii.gz"
        have = [s for s in full if (s.folder / nii).is_file()]
        if have and len(have) == len(full):
            _merge_nifti(out / nii, full, count, n_total, outputs)
            files["nifti" if nii == outputs.NIFTI_FILE else nii[: -len(".nii.gz")] + "_nifti"] = out / nii
        elif have:
            notes.append(f"only {len(have)} of {len(full)} shards have {nii}: not merged; the "
                         f"per-shard files are in {root}/*/{nii} (encode every shard with --nifti "
                         "to get a merged one)")
    plot_shards = [s for s in full if (s.folder / "plots").is_dir()]
    if plot_shards:
        n_plots = _merge_plots(out, plot_shards, n_total, outputs)
        files["plots"] = out / "plots"
        if len(plot_shards) != len(full):
            notes.append(f"only {len(plot_shards)} of {len(full)} shards drew plots "
                         f"(--plot): {n_plots} plots in {out / 'plots'}")

    # ---- progress.jsonl, manifest.csv, run.json
    _write_journal(out / outputs.PROGRESS_FILE, full, outputs)
    _write_manifest(out / outputs.MANIFEST_FILE, full, outputs)
    run = {
        **run_config,
        "berg_jax_version": __version__,
        "merged_from": count,
        "merge_time": _now(),
        "outputs": {k: str(v) for k, v in files.items()},
        "shards": [
            {"index": s.index, "first_row": s.first_row, "n_rows": s.n_rows,
             "dir": f"{SHARDS_DIR}/{s.folder.name}",
             "run": {k: v for k, v in (s.run or {}).items() if k not in run_config}}
            for s in shards
        ],
        "n_inputs": n_total,
        "n_ok": n_total - n_failed,
        "n_failed": n_failed,
        "n_voxels": job["n_voxels"],
        "arrays": arrays,
    }
    outputs.atomic_write_text(out / outputs.RUN_FILE, outputs._pretty_json(run))
    return {**run, "out_dir": str(out), "outputs": files, "failed": failed, "notes": notes,
            "n_shards": count, "n_empty_shards": count - len(full)}


def _merge_array(path: Path, shards: list[_ShardInfo], count: int, width: int, n_total: int,
                 outputs: Any) -> None:
    """Concatenate the shards' `path.name` arrays into `path` (temp file + fsync + rename)."""
    import numpy as np

    with outputs.atomic_npy(path, (n_total, width)) as dst:
        step = max(1, _COPY_BYTES // (4 * width))
        for s in shards:
            src_path = s.folder / path.name
            try:
                src = np.load(src_path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise outputs.OutputDirError(
                    f"shard {s.index} of {count}: {src_path} is not readable ({exc}); "
                    f"{_fix(s.index, count)}") from None
            if src.shape != (s.n_rows, width) or src.dtype != np.float32:
                raise outputs.OutputDirError(
                    f"shard {s.index} of {count}: {src_path} is {src.dtype} {src.shape}, expected "
                    f"float32 {(s.n_rows, width)}; delete {s.folder} and "
                    f"{_fix(s.index, count, again=False)}")
            for start in range(0, s.n_rows, step):
                stop = min(start + step, s.n_rows)
                dst[s.first_row + start:s.first_row + stop] = src[start:stop]
                dst.flush()  # bounded dirty pages
            del src


def _merge_nifti(path: Path, shards: list[_ShardInfo], count: int, n_total: int, outputs: Any) -> None:
    """Concatenate the shards' 4-D NIfTIs along time, streaming.

    A 4-D float32 NIfTI stores volume after volume (x fastest), so the merged data are the
    shards' data regions one after the other; the header is shard 0's with the new volume
    count, which is exactly what a single-process run writes (checked for every shard).
    """
    import nibabel as nib
    import numpy as np

    def raw_header(src: Path) -> Any:  # as stored: nib.load's copy resets offset and scaling
        with gzip.open(src, "rb") as f:
            return nib.Nifti1Header.from_fileobj(f)

    first = raw_header(shards[0].folder / path.name)
    shape = tuple(int(d) for d in first.get_data_shape())
    merged = first.copy()
    merged.set_data_shape(shape[:3] + (n_total,))
    offset = int(merged.get_data_offset())
    volume_bytes = int(np.prod(shape[:3])) * np.dtype(np.float32).itemsize
    sources = []
    for s in shards:
        src = s.folder / path.name
        hdr = raw_header(src)
        same = hdr.copy()
        same.set_data_shape(shape[:3] + (n_total,))
        if hdr.get_data_dtype() != np.float32 or tuple(hdr.get_data_shape()) != shape[:3] + (s.n_rows,) \
                or same.binaryblock != merged.binaryblock:
            raise outputs.OutputDirError(
                f"shard {s.index} of {count}: {src} is not a float32 {shape[:3] + (s.n_rows,)} NIfTI "
                f"with the other shards' header; delete it and {_fix(s.index, count)}")
        sources.append((src, int(hdr.get_data_offset()), s.n_rows * volume_bytes))
    head = io.BytesIO()
    merged.write_to(head)
    head.write(b"\0" * (offset - head.tell()))
    with outputs.atomic_open(path) as raw:
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)
        gz.write(head.getvalue())
        for src, src_offset, n_bytes in sources:
            with gzip.open(src, "rb") as f:
                f.seek(src_offset)
                left = n_bytes
                while left:
                    chunk = f.read(min(left, 8 << 20))
                    if not chunk:
                        raise outputs.OutputDirError(f"{src} is truncated: delete it and encode "
                                                     "that shard again")
                    gz.write(chunk)
                    left -= len(chunk)
        gz.close()  # the gzip trailer; `raw` stays open for atomic_open to commit


def _merge_plots(out: Path, shards: list[_ShardInfo], n_total: int, outputs: Any) -> int:
    """Copy the shards' plots into OUT/plots, renamed from shard rows to global rows."""
    import shutil

    from berg_jax.pipeline import PLOTS_DIR, plot_file_name

    dst_dir = out / PLOTS_DIR
    dst_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in shards:
        for row in _manifest_rows(s):
            if row[2] != "ok":
                continue
            j = int(row[1])
            src = s.folder / PLOTS_DIR / plot_file_name(row[0], j, s.n_rows)
            if not src.is_file():
                continue
            with open(src, "rb") as f, outputs.atomic_open(
                    dst_dir / plot_file_name(row[0], s.first_row + j, n_total)) as g:
                shutil.copyfileobj(f, g)
            n += 1
    return n


def _write_journal(path: Path, shards: list[_ShardInfo], outputs: Any) -> None:
    """A progress.jsonl recording every row, so OUT is a finished encode folder like any other."""
    with outputs.atomic_open(path) as f:
        def emit(entry: dict) -> None:
            f.write((json.dumps(entry) + "\n").encode("ascii"))

        for s in shards:
            ok: list[int] = []
            for row in _manifest_rows(s):
                r = s.first_row + int(row[1])
                if row[2] == "ok":
                    ok.append(r)
                    if len(ok) == _JOURNAL_ROWS:
                        emit({"rows": ok, "status": "ok"})
                        ok = []
                else:
                    if ok:
                        emit({"rows": ok, "status": "ok"})
                        ok = []
                    emit({"rows": [r], "status": "failed", "error": row[3]})
            if ok:
                emit({"rows": ok, "status": "ok"})


def _write_manifest(path: Path, shards: list[_ShardInfo], outputs: Any) -> None:
    """manifest.csv with global rows, written as `ResponseWriter.finish` writes it."""
    with outputs.atomic_open(path) as f:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(outputs.MANIFEST_COLUMNS)
        for s in shards:
            for k, row in enumerate(_manifest_rows(s)):
                w.writerow((row[0], s.first_row + int(row[1]), row[2], row[3]))
                if k % 4096 == 4095:
                    f.write(buf.getvalue().encode("utf-8", errors="surrogateescape"))
                    buf.seek(0)
                    buf.truncate()
        f.write(buf.getvalue().encode("utf-8", errors="surrogateescape"))


def print_merge_summary(summary: dict) -> None:
    n, n_ok, n_failed = summary["n_inputs"], summary["n_ok"], summary["n_failed"]
    empty = summary["n_empty_shards"]
    print(f"berg-jax merge: {summary['n_shards']} shards"
          f"{f' ({empty} empty)' if empty else ''} -> {summary['out_dir']}: "
          f"{n_ok} of {n} videos encoded, {n_failed} failed")
    out = summary["outputs"]
    for name, width in summary["arrays"].items():
        label = "responses" if name == "responses.npy" else name[: -len(".npy")]
        print(f"  {label:<10} {out[label]}  (float32 ({n}, {width}), row i = input i, NaN rows = failed)")
    print(f"  {'manifest':<10} {out['manifest']}  (path,row,status,error per input, global rows)")
    print(f"  {'run info':<10} {out['run']}  (settings, counts, each shard's run info)")
    for label, path in out.items():
        if label == "nifti" or label.endswith("_nifti"):
            print(f"  {'NIfTI':<10} {path}  (4-D MNI152, volume i = row i)")
    if "plots" in out:
        print(f"  {'plots':<10} {out['plots']}  (one glass-brain PNG per encoded video)")
    print(f"  {'shards':<10} {Path(summary['out_dir']) / SHARDS_DIR}  (kept: each is a finished "
          "encode folder; delete them when no longer needed)")
    for note in summary["notes"]:
        print(f"note: {note}")
    failed = summary["failed"]
    if failed:
        print(f"failed ({len(failed)}, recorded in manifest.csv):")
        for path, reason in failed[:20]:
            print(f"  {reason if reason.startswith(path) else f'{path}: {reason}'}")
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more (manifest.csv)")
    sys.stdout.flush()
