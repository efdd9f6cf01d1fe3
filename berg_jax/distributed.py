"""Many hosts: the JAX multi-process runtime and the split of the inputs into shards.

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

`shard_inputs` gives process i of n the contiguous block of the input list (identical on
every host: a folder's sorted listing, or an `--inputs-from` list in its order) with rows
[i * len // n, (i + 1) * len // n): disjoint, covering every input, deterministic, block
sizes differing by at most one. Its results go to a normal
encode output folder OUT/shards/process-IIIII-of-NNNNN/ (see `writer`), plus `shard.json`:
`{"format", "index", "count", "first_row", "n_rows", "n_inputs", "inputs_sha256"}`, so
`merge` can check that the shards cover rows 0..n_inputs-1 exactly once, of the same list.
Re-running the same command resumes that shard (the usual `writer` resume protocol).

`--num-processes N --process-id I` without a coordinator (flag or JAX_COORDINATOR_ADDRESS)
skips the runtime: shard I of N is computed on its own. That is how one shard is
(re)computed alone, or how shards run as independent jobs (a Slurm job array).

`berg-jax merge OUT` (`merge.merge_shards`) then assembles the shards into OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from berg_jax.atomic import atomic_write_text, pretty_json
from berg_jax.errors import UsageError
from berg_jax.writer import OutputDirError

SHARDS_DIR = "shards"
SHARD_FILE = "shard.json"
SHARD_FORMAT = "berg-jax-shard/1"
_SHARD_NAME = re.compile(r"process-(\d+)-of-(\d+)")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among `count` processes (jax.process_index / process_count)."""

    index: int
    count: int


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


# --------------------------------------------------------------------------- the runtime


def _check_coordinator(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {text}: give HOST:PORT of process 0, e.g. "
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
            raise UsageError(f"{', '.join(given)} only go with --distributed: add --distributed "
                               "(one of several processes), or leave them out for a "
                               "single-process run")
        return None
    if num is not None and num < 1:
        raise UsageError(f"--num-processes must be at least 1, got {num}")
    if pid is not None and pid < 0:
        raise UsageError(f"--process-id must be 0 or more, got {pid}")
    if num is not None and pid is not None and pid >= num:
        raise UsageError(f"--process-id {pid} is not below --num-processes {num}: "
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
        raise UsageError(
            f"--distributed: JAX could not tell the coordinator, process count and process id "
            f"({exc}): no Slurm, Open MPI, Cloud TPU or Kubernetes environment was detected; "
            "pass --coordinator HOST:PORT --num-processes N --process-id I") from None
    except RuntimeError as exc:  # a backend already running, or initialised twice
        raise UsageError(f"--distributed: {exc}") from None
    try:
        from jax._src import distributed as _jd  # the runtime's own record: no backend started

        state = _jd.global_state
        index, count = int(state.process_id), int(state.num_processes)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - another JAX
        state, keep = None, True
        index, count = jax.process_index(), jax.process_count()
    if (num is not None and num != count) or (pid is not None and pid != index):
        raise UsageError(f"--distributed: JAX says this is process {index} of {count}, the "
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


def shard_folders(root: Path) -> dict[tuple[int, int], Path]:
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
    paths = [os.fspath(p) for p in paths]
    out = Path(out)
    root = out / SHARDS_DIR
    others = sorted({c for (_, c) in shard_folders(root) if c != shard.count})
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
    text = pretty_json(record)
    if not marker.exists() or marker.read_text("utf-8") != text:
        atomic_write_text(marker, text)
    rows = shard_rows(len(paths), shard)
    if not rows:
        raise UsageError(
            f"process {shard.index} of {shard.count} has nothing to encode: {len(paths)} inputs "
            f"for {shard.count} processes (its empty shard is recorded in {folder}; "
            f"`berg-jax merge {out}` needs nothing more from it)")
    print(f"berg-jax encode: process {shard.index} of {shard.count}: inputs {rows.start}.."
          f"{rows.stop - 1} of {len(paths)} -> {folder}\n"
          f"  when every process has finished: berg-jax merge {out}", flush=True)
    return paths[rows.start:rows.stop], folder
