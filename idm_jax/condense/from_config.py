"""From a config to a step ready to run: `step_from_config` (config -> dataset -> step settings
-> device data and initial state -> jitted step), the setup every single-device condensation
loop outside the runner shares (benchmarks, continual learning)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from idm_jax import data as data_lib
from idm_jax.condense.real_data import DeviceData, device_data
from idm_jax.condense.settings import StepSettings, settings_from_config
from idm_jax.condense.state import CondenseState, init_state
from idm_jax.condense.step import make_step


@dataclasses.dataclass
class StepSetup:
    """What a condensation loop needs: `state, metrics = step(state, data)` (the state is donated,
    so feed each call the previous output)."""

    dataset: data_lib.ArrayDataset
    settings: StepSettings
    data: DeviceData
    state: CondenseState
    step: Callable[[CondenseState, DeviceData], tuple[CondenseState, dict[str, Any]]]


def step_from_config(config: Any, ds: data_lib.ArrayDataset | None = None, seed: int = 0) -> StepSetup:
    """The one-device setup of `config`: its dataset (`ds` when given, e.g. a class subset or
    random images of the right shape; else data.load_config_dataset), the step settings, the real
    data on the device, the initial state (seed, config.idm.init) and the jitted step."""
    ds = data_lib.load_config_dataset(config) if ds is None else ds
    s = settings_from_config(config, ds)
    state = init_state(s, ds, seed, config.idm.init)
    return StepSetup(dataset=ds, settings=s, data=device_data(ds), state=state, step=make_step(s))
