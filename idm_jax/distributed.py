"""Many processes (hosts), one program: JAX's multi-controller runtime.

Every process runs the same `main.py` command. `initialize` joins them with
`jax.distributed.initialize` (coordinator address, process count and id from flags, the
environment, or JAX's own cluster detection on SLURM / Cloud TPU); after it, `jax.devices()`
lists every process's devices and one global mesh (`condense.class_mesh`) shards the
synthetic set's class axis across hosts. Everything else in the state (step, key, model queue) is replicated:
every process computes it from the same keys and the same real batches, and `check_replicated`
compares a checksum of it across processes at checkpoints and at the end.

Outputs: only process 0 writes (`is_main`); the synthetic set is gathered first
(`condense.synthetic_arrays` does). Evaluation networks (architectures x seeds) are spread
over the processes by `evaluate.evaluate_archs`, which gathers their results here.

This module is the bottom of the library: it imports nothing else of idm_jax.

With one process (the default, no flags, no cluster) nothing here changes a thing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import zlib
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")


class DistributedError(RuntimeError):
    """The processes of a multi-process run disagree or could not meet."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cluster_detected() -> bool:
    """True under a multi-task SLURM step, Open MPI launch or multi-host Cloud TPU slice.

    Mirrors the environments jax.distributed.initialize() detects by itself (without its
    private API): one task / one TPU host is a single-process run.
    """
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, wait_s: int = 300) -> bool:
    """Joins the processes of a multi-process run; returns True when there are several.

    mode: "off" never initializes; "on" always calls jax.distributed.initialize (JAX
    fills what is not given from the cluster: SLURM, Cloud TPU, Open MPI); "auto" does
    when an address / count is given (arguments or $JAX_COORDINATOR_ADDRESS,
    $JAX_NUM_PROCESSES, $JAX_PROCESS_ID) or a cluster is detected. num_processes 0 and
    process_id -1 mean "not given". Must run before anything touches a device.

    A process that cannot meet the others within wait_s (a wrong process count, a
    wrong address) exits with one error line and status 2 instead of waiting forever; after
    meeting, every process checks that all were started with the same count.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or _env_int("JAX_NUM_PROCESSES") or 0
    pid = process_id if process_id >= 0 else _env_int("JAX_PROCESS_ID")
    pid = -1 if pid is None else pid
    if count < 0:
        raise ValueError(f"num_processes must be >= 1 (0 = from the cluster), got {count}")
    if count and not -1 <= pid < count:
        raise ValueError(f"process_id={pid} is outside 0..{count - 1} for num_processes={count}")
    if wait_s <= 0:
        raise ValueError(f"distributed_timeout must be > 0 seconds, got {wait_s}")
    given = bool(address or count or pid >= 0)
    if mode == "off" or (mode == "auto" and not given and not cluster_detected()):
        return False
    if count == 1:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    try:  # gloo is the default in recent JAX; older ones had none for CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    where = address or "the detected cluster's coordinator"
    expect = f"{count} processes" if count else "all processes"
    logging.info("joining %s at %s as process %s (timeout %d s)", expect, where,
                 pid if pid >= 0 else "(auto)", wait_s)
    message = (f"error: process {pid if pid >= 0 else '?'} could not meet {expect} at {where} within "
               f"{wait_s} s (--distributed_timeout); check that every process got the same "
               "--num_processes, a distinct --process_id and the same --coordinator_address, "
               "and that all of them were started")
    # jax aborts the process (a C++ fatal error, no Python exception) when the rendezvous
    # times out; a watchdog a little earlier exits with a clear line instead.
    done = threading.Event()

    def watchdog():
        if not done.wait(wait_s):
            print(message, file=sys.stderr, flush=True)
            logging.error("%s", message)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(address or None, count or None, pid if pid >= 0 else None,
                                   initialization_timeout=wait_s + 60)
    except (RuntimeError, ValueError) as e:  # e.g. nothing to detect with --distributed=on
        raise DistributedError(f"jax.distributed.initialize failed: {e}") from None
    finally:
        done.set()
    _check_same_count(count)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def _check_same_count(count: int) -> None:
    """Every process was told the same process count (0 = not told) as the coordinator's."""
    told = np.asarray(multihost_utils.process_allgather(np.asarray([count], np.int32))).reshape(-1)
    if any(c and c != jax.process_count() for c in told):
        raise DistributedError(
            f"the processes were started with different process counts {told.tolist()} "
            f"(process index -> --num_processes), but {jax.process_count()} met; start all of "
            "them with the same --num_processes")


def is_main() -> bool:
    """Process 0 writes the outputs (metrics, TensorBoard, synthetic set, results)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


# ----------------------------------------------------------------------------
# Replicated values agree across processes


def local_checksum(tree) -> int:
    """crc32 of every leaf's bytes as this process holds it (replicated leaves: its first shard;
    sharded leaves are skipped: they differ by design)."""
    crc = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            if not leaf.is_fully_replicated and not leaf.is_fully_addressable:
                continue
            leaf = leaf.addressable_data(0)
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
    return crc


def check_replicated(tree, what: str) -> None:
    """Raises DistributedError unless every process holds bit-identical replicated values."""
    if not multi_process():
        return
    sums = np.asarray(multihost_utils.process_allgather(
        np.asarray([local_checksum(tree)], np.int64))).reshape(-1)
    if len(set(sums.tolist())) > 1:
        raise DistributedError(f"{what} differs between processes (crc32 per process: "
                               f"{[hex(int(s)) for s in sums]}); the replicated state diverged")


def data_fingerprint(ds) -> dict[str, Any]:
    """Cheap identity of a loaded dataset: labels, shapes, normalization, every k-th image."""
    images = ds.train_images
    stride = max(1, len(images) // 256)
    return {"labels": np.asarray(ds.train_labels), "mean": np.asarray(ds.mean),
            "std": np.asarray(ds.std), "shape": np.asarray(images.shape),
            "sample": np.asarray(images[::stride])}


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a collective: all must call it)."""
    if not multi_process():
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))).any())


# ----------------------------------------------------------------------------
# Outputs


class NullWriter:
    """Stands in for run_io.MetricsWriter on processes other than 0."""

    def write(self, step, row) -> None:
        del step, row

    def close(self) -> None:
        pass


def gather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a collective: all must call it)."""
    if not multi_process():
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes)]
