"""How the state lies on several devices: a 1-D mesh over the synthetic set's class axis, the
state's shardings (classes split, the rest replicated) and replicated inputs."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idm_jax.condense.state import CondenseState

CLASS_AXIS = "classes"  # mesh axis the synthetic set's class axis is sharded over


def class_mesh(num_devices: int, num_classes: int) -> Mesh | None:
    """A 1-D mesh (axis CLASS_AXIS) of local devices, or None for one device.

    num_devices 0 picks the most local devices that divide num_classes
    evenly (10 classes on 8 GPUs -> 5); an explicit count must divide it.
    """
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
