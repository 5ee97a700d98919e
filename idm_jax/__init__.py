"""idm_jax: Improved Distribution Matching for dataset condensation, in JAX.

The library face (each name is imported on first use, so `import idm_jax` stays light and has
no side effects):

    from idm_jax import idm_loss, dm_loss, LossOptions, get_model, dsa, partition_expand

* losses: `idm_loss`, `dm_loss`, `LossOptions` (idm_jax.loss): pure, jittable; the
  condensation step differentiates exactly these per-class terms.
* networks: `get_model`, `init_variables`, `MODEL_NAMES` (idm_jax.models).
* augmentation: `dsa` (Siamese / per-image DSA), `partition_expand`, `init_from_real`
  (idm_jax.augment).
* the model queue: `ModelQueue` (idm_jax.queue).
* evaluation: `train_and_evaluate` (idm_jax.evaluate): the paper's train-from-scratch protocol.
* entry points (what main.py runs): `run_condensation` (idm_jax.runner), `run_evaluation`
  (idm_jax.evaluate_set), `run_baseline` (idm_jax.baselines), `validate_config`
  (idm_jax.config_check): call it once on a config before an entry point, as main.py does.
  Configs are the files in the repository's configs/ folder (`configs.cifar10.get_config("10")`).
"""

import importlib

_EXPORTS = {
    "idm_loss": "loss", "dm_loss": "loss", "LossOptions": "loss",
    "get_model": "models", "init_variables": "models", "MODEL_NAMES": "models",
    "dsa": "augment", "partition_expand": "augment", "init_from_real": "augment",
    "ModelQueue": "queue",
    "train_and_evaluate": "evaluate", "run_evaluation": "evaluate_set",
    "run_condensation": "runner", "run_baseline": "baselines", "validate_config": "config_check",
}
_RENAMED = {"validate_config": "validate"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idm_jax' has no attribute {name!r}")
    module = importlib.import_module(f"idm_jax.{_EXPORTS[name]}")
    value = getattr(module, _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
