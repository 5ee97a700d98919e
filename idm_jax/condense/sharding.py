"""How the state lies on several devices: a 1-D mesh over the synthetic set's class axis, the
state's shardings (classes split, the rest replicated) and replicated inputs."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idm_jax.condense.state import CondenseState

CLASS_AXIS = "classes"  # mesh axis the synthetic set's class axis is sharded over


def class_mesh(num_devices: int, num_classes: int) -> Mesh | None:
    """A 1-D mesh (axis CLASS_AXIS) over the devices of every process, or None for one device.

    One process: num_devices 0 picks the most local devices that divide num_classes evenly
    (10 classes on 8 GPUs -> 5); an explicit count must divide it. Several processes:
    num_devices counts the devices of all processes together and must be a multiple of the
    process count (each process gives as many); 0 picks the most devices per process such that
    all of them divide num_classes evenly.
    """
    if jax.process_count() > 1:
        return _multi_process_mesh(num_devices, num_classes)
    available = jax.local_devices()
    if num_devices < 0 or num_devices > len(available):
        raise ValueError(f"mesh_devices={num_devices}, but this process sees "
                         f"{len(available)} device(s) ({available[0].platform}); use 0..{len(available)}")
    if num_devices == 0:
        num_devices = max(d for d in range(1, len(available) + 1) if num_classes % d == 0)
    elif num_classes % num_devices:
        raise ValueError(f"mesh_devices={num_devices} does not divide the {num_classes} classes; "
                         "pick a divisor or 0 (automatic)")
    if num_devices == 1:
        return None
    return Mesh(np.asarray(available[:num_devices]), (CLASS_AXIS,))


def _multi_process_mesh(num_devices: int, num_classes: int) -> Mesh:
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
    return Mesh(np.asarray(devices), (CLASS_AXIS,))


def state_shardings(state: CondenseState, mesh: Mesh):
    """NamedShardings for `state`: SynSet leaves split on the class axis, the rest replicated."""
    split, whole = NamedSharding(mesh, PartitionSpec(CLASS_AXIS)), NamedSharding(mesh, PartitionSpec())
    syn = jax.tree.map(lambda _: split, state.syn)
    rest = jax.tree.map(lambda _: whole, state.replace(syn=None))
    return rest.replace(syn=syn)


def shard_state(state: CondenseState, mesh: Mesh | None) -> CondenseState:
    """Places `state` on the mesh (a no-op without one)."""
    return state if mesh is None else jax.device_put(state, state_shardings(state, mesh))


def replicate(tree, mesh: Mesh | None):
    """Copies `tree` (e.g. DeviceData) to every device of the mesh (a no-op without one)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
