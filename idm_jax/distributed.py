"""Many processes (hosts), one program: JAX's multi-controller runtime.

Every process runs the same `main.py` command. `initialize` joins them with
`jax.distributed.initialize` (coordinator address, process count and id from flags, the
environment, or JAX's own cluster detection on SLURM / Cloud TPU); after it, `jax.devices()`
lists every process's devices and one global mesh (`class_mesh`) shards the synthetic set's
class axis across hosts. Everything else in the state (step, key, model queue) is replicated:
every process computes it from the same keys and the same real batches, and `check_replicated`
compares a checksum of it across processes at checkpoints and at the end.

Outputs: only process 0 writes (`is_main`); the synthetic set is gathered first
(`condense.synthetic_arrays` does). Evaluation networks (architectures x seeds) are spread
over the processes (`evaluate_archs`) and their results gathered.

With one process (the default, no flags, no cluster) nothing here changes a thing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import zlib
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

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
               process_id: int = -1, timeout_s: int = 300) -> bool:
    """Joins the processes of a multi-process run; returns True when there are several.

    mode: "off" never initializes; "on" always calls jax.distributed.initialize (JAX
    fills what is not given from the cluster: SLURM, Cloud TPU, Open MPI); "auto" does
    when an address / count is given (arguments or $JAX_COORDINATOR_ADDRESS,
    $JAX_NUM_PROCESSES, $JAX_PROCESS_ID) or a cluster is detected. num_processes 0 and
    process_id -1 mean "not given". Must run before anything touches a device.

    A process that cannot meet the others within timeout_s (a wrong process count, a
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
    if timeout_s <= 0:
        raise ValueError(f"distributed_timeout must be > 0 seconds, got {timeout_s}")
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
                 pid if pid >= 0 else "(auto)", timeout_s)
    message = (f"error: process {pid if pid >= 0 else '?'} could not meet {expect} at {where} within "
               f"{timeout_s} s (--distributed_timeout); check that every process got the same "
               "--num_processes, a distinct --process_id and the same --coordinator_address, "
               "and that all of them were started")
    # jax aborts the process (a C++ fatal error, no Python exception) when the rendezvous
    # times out; a watchdog a little earlier exits with a clear line instead.
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            print(message, file=sys.stderr, flush=True)
            logging.error("%s", message)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(address or None, count or None, pid if pid >= 0 else None,
                                   initialization_timeout=timeout_s + 60)
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


def class_mesh(num_devices: int, num_classes: int) -> Mesh | None:
    """The class-axis mesh: condense.class_mesh on one process, else one over all processes.

    Several processes: num_devices counts devices of all processes together and must be a
    multiple of the process count (each process gives as many); 0 picks the most devices
    per process such that all of them divide num_classes evenly.
    """
    from idm_jax import condense  # pylint: disable=g-import-not-at-top
    if not multi_process():
        return condense.class_mesh(num_devices, num_classes)
    procs, local = jax.process_count(), jax.local_device_count()
    if num_devices == 0:
        fits = [d for d in range(1, local + 1) if num_classes % (d * procs) == 0]
        if not fits:
            raise ValueError(f"{num_classes} classes cannot be split evenly over {procs} processes; "
                             "run on a process count that divides the class count")
        per = max(fits)
    else:
        if num_devices % procs or num_devices // procs > local or num_devices < 0:
            raise ValueError(f"mesh_devices={num_devices} must be a multiple of the {procs} processes "
                             f"with at most {local} device(s) each; use 0 (automatic)")
        if num_classes % num_devices:
            raise ValueError(f"mesh_devices={num_devices} does not divide the {num_classes} classes; "
                             "pick a divisor or 0 (automatic)")
        per = num_devices // procs
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    devices = [d for p in sorted(by_process) for d in by_process[p][:per]]
    return Mesh(np.asarray(devices), (condense.CLASS_AXIS,))


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
    """Stands in for runner.MetricsWriter on processes other than 0."""

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


def evaluation_tasks(archs: Sequence[str], num_seeds: int, process: int,
                     processes: int) -> dict[str, list[int]]:
    """{arch: seed indices} this process trains: the archs x seeds networks dealt round-robin."""
    tasks = [(a, s) for a in archs for s in range(num_seeds)]
    mine: dict[str, list[int]] = {a: [] for a in archs}
    for i, (a, s) in enumerate(tasks):
        if i % processes == process:
            mine[a].append(s)
    return mine


def merge_evaluations(parts: Sequence[dict[str, dict[str, Any]]], seeds_of: Sequence[dict[str, list[int]]],
                      archs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One evaluate_archs result from the processes' partial ones (each holding some seeds)."""
    per_seed = ("accuracies", "train_loss", "train_accuracy")
    out = {}
    for a in archs:
        rows = [(seeds[a], part[a]) for part, seeds in zip(parts, seeds_of) if seeds.get(a)]
        order = np.argsort([s for seeds, _ in rows for s in seeds], kind="stable")
        merged = dict(rows[0][1])
        for k in per_seed:
            values = [v for _, r in rows for v in r[k]]
            merged[k] = [values[i] for i in order]
        accs = np.asarray(merged["accuracies"], np.float64)
        merged.update(mean=float(accs.mean()), std=float(accs.std()), num_seeds=len(accs),
                      train_seconds=float(sum(r["train_seconds"] for _, r in rows)),
                      test_seconds=float(sum(r["test_seconds"] for _, r in rows)),
                      processes=len(rows))
        out[a] = merged
    return out


def evaluate_archs(images, labels, dataset, eval_cfg, *, archs, key, partition_factor,
                   epochs=None) -> dict[str, dict[str, Any]]:
    """evaluate.evaluate_archs, its networks spread over the processes; same result everywhere.

    One process: exactly evaluate.evaluate_archs. Several: process p trains every
    processes-th network of the archs x seeds list (each with the key it has in a
    one-process run), and the per-seed results are gathered and merged.
    """
    from idm_jax import evaluate, models  # pylint: disable=g-import-not-at-top
    if not multi_process():
        return evaluate.evaluate_archs(images, labels, dataset, eval_cfg, archs=archs, key=key,
                                       partition_factor=partition_factor, epochs=epochs)
    archs = models.parse_archs(archs)
    num_seeds = int(eval_cfg.get("num_seeds", 5))
    seeds_of = [evaluation_tasks(archs, num_seeds, p, jax.process_count())
                for p in range(jax.process_count())]
    mine = seeds_of[jax.process_index()]
    logging.info("evaluating %s of the %d x %d networks on this process",
                 {a: s for a, s in mine.items() if s}, len(archs), num_seeds)
    part = evaluate.evaluate_archs(images, labels, dataset, eval_cfg, archs=archs, key=key,
                                   partition_factor=partition_factor, epochs=epochs, seeds_of=mine)
    return merge_evaluations(gather_objects(part), seeds_of, archs)
