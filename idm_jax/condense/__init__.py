"""IDM condensation: the state pytree, the one jitted step, and its parts.

`CondenseState` (step, base PRNG key, synthetic set, model queue) is all
that changes during a run; `make_step` builds `step(state, data) -> (state,
metrics)`, jitted once with the state donated. The real data lives on the
device (`DeviceData`: uint8 images + per-class index tables), so real
batches are drawn inside the jit and the host only loops and logs.
Datasets too large for that (the 224x224 ImageNet subset, ~19 GB) stay on
the host, memory-mapped: `HostSampler` draws the same indices the device path
would (same keys, computed with jax on the CPU), gathers the images and feeds
them to the same step as a `HostBatch` (config data.on_device, see
`resolve_data_placement`).
The run loop (logging, checkpoints, outputs) lives in `idm_jax.runner`.

Several devices: `class_mesh` builds a 1-D mesh, `shard_state` splits the
synthetic set's class axis over it (everything else is replicated) and
`make_step(s, mesh)` runs the per-class loss and update under `shard_map`,
each device on its own classes; the queue training stays replicated.
Several processes (hosts): `idm_jax.distributed` builds the same mesh over all of them.

One concept per module; this package re-exports their names, so `condense.X` is the way to reach them:

* settings.py: `StepSettings`, `settings_from_config` (what is static about the step).
* real_data.py: `DeviceData` / `HostBatch`, data.on_device, the real batches' indices and pixel space.
* networks.py: apply / init functions and the queue members' training.
* state.py: `SynSet`, `CondenseState`, `init_synset`, `init_state`, the set read back to the host.
* step.py: `make_step`, `make_multi_step` and the per-class update they run.
* sharding.py: `class_mesh`, `state_shardings`, `shard_state`, `replicate`.
* host_batches.py: `plan_indices`, `HostSampler` (data.on_device = "host").
* from_config.py: `step_from_config`, `StepSetup` (config -> dataset -> settings -> state -> step).
"""

from idm_jax.condense.from_config import StepSetup, step_from_config
from idm_jax.condense.host_batches import HostSampler, plan_indices
from idm_jax.condense.networks import (
    make_apply_fn,
    make_init_fn,
    make_member_train_fn,
    member_inputs,
    queue_steps_unrolled,
)
from idm_jax.condense.real_data import (
    PASS_SALT,
    PLACEMENTS,
    DeviceData,
    HostBatch,
    class_batch_indices,
    device_data,
    normalize_real,
    pixel_stats,
    queue_pass_indices,
    resolve_data_placement,
)
from idm_jax.condense.settings import StepSettings, auto_class_batch, real_images_per_iteration, settings_from_config
from idm_jax.condense.sharding import CLASS_AXIS, class_mesh, replicate, shard_state, state_shardings
from idm_jax.condense.state import (
    INITS_FROM_REAL,
    CondenseState,
    SynSet,
    host_array,
    init_state,
    init_synset,
    synthetic_arrays,
)
from idm_jax.condense.step import (
    MAX_UNROLLED_CHUNKS,
    matching_nets,
    update_synset,
    chunks_unrolled,
    iteration_keys,
    make_multi_step,
    make_step,
    map_in_chunks,
    momentum_sgd_update,
    real_class_mean,
)

__all__ = [
    "StepSettings", "settings_from_config", "auto_class_batch", "real_images_per_iteration",
    "PLACEMENTS", "PASS_SALT", "DeviceData", "HostBatch", "resolve_data_placement", "device_data", "pixel_stats",
    "normalize_real", "class_batch_indices", "queue_pass_indices",
    "make_apply_fn", "make_init_fn", "make_member_train_fn", "member_inputs", "queue_steps_unrolled",
    "SynSet", "CondenseState", "INITS_FROM_REAL", "init_synset", "init_state", "synthetic_arrays", "host_array",
    "CLASS_AXIS", "class_mesh", "state_shardings", "shard_state", "replicate",
    "matching_nets", "update_synset", "momentum_sgd_update", "MAX_UNROLLED_CHUNKS", "chunks_unrolled",
    "map_in_chunks", "real_class_mean",
    "iteration_keys", "make_step", "make_multi_step", "plan_indices", "HostSampler",
    "StepSetup", "step_from_config",
]
