"""The method presets and the one dotted-key override of a config: plain data, no JAX.

configs/ build their ConfigDicts with these, and the library checks configs against them
(idm_jax/config_check.py), so what "dm" means is written once. Importing this module pulls in
nothing heavier than the standard library, so a config file stays cheap to load.
"""

from __future__ import annotations

import difflib
from typing import Any

METHODS = ("idm", "dm")
# How --mode=continual builds each step's memory: condensed by a method, or random real images.
CONTINUAL_METHODS = METHODS + ("random",)

# DM (Zhao & Bilen 2023, docs/RELEASE.md#dm): a fresh random net each iteration, no queue, no
# partition, no regularizer, synthetic lr 1.0, one step on the summed class losses.
DM_PRESET = {
    "idm.use_queue": False,
    "idm.partition_factor": 1,
    "idm.use_ce": False,
    "idm.ce_weight": 0.0,
    "idm.lr_img": 1.0,
    "idm.batch_real": 256,
    "idm.update_mode": "joint",
    "idm.keep_lowest_ce_real": 0,  # the release's IDM-only l = 1 branch
    "idm.ce_only_misclassified": False,
}
# The preset fields that make a run DM at all; the others (lr, batch) may be swept under DM.
DM_DEFINING = ("idm.use_queue", "idm.partition_factor", "idm.use_ce")


def field_problem(config: Any, key: str) -> str | None:
    """Why `key` ('a.b.c') names no field of `config` (with a close match), or None if it does."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node.keys():
            where = ".".join(parts[:depth]) or "the config"
            close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, "keys") else [])
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{where} has no field {part!r}{hint}"
        node = node[part]
    return None


def get_dotted(config: Any, key: str) -> Any:
    """config[a][b] for key 'a.b'."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def set_dotted(config: Any, key: str, value: Any) -> None:
    """config[a][b] = value for key 'a.b'; a key the config lacks is a ValueError naming it (a
    typo must not add a field)."""
    problem = field_problem(config, key)
    if problem:
        raise ValueError(f"config has no field {key!r}: {problem}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def section_iterations(config: Any, section: str) -> int:
    """The condensation iterations of a mode's section (config.continual / config.sweep):
    its own `iterations`, where 0 means config.idm.iterations."""
    return int(config[section].iterations or config.idm.iterations)


def int_list(text: Any, what: str) -> list[int]:
    """"5,10" (or a list) -> [5, 10]; a ValueError naming `what` (the config field) otherwise."""
    items = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    try:
        out = [int(p) for p in items]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise ValueError(f"{what} is empty ({text!r})")
    return out


def name_list(text: Any, what: str, valid: tuple[str, ...]) -> list[str]:
    """"idm,dm" (or a list) -> ["idm", "dm"], each one of `valid`; a ValueError naming `what` otherwise."""
    items = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    for name in items:
        if name not in valid:
            raise ValueError(f"{what} names unknown method {name!r}; valid: {', '.join(valid)}")
    if not items:
        raise ValueError(f"{what} is empty ({text!r})")
    return items


def apply_method(config: Any, method: str) -> None:
    """Sets config.method and the switches that define `method` ("idm" or "dm") in place."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    config.method = method
    if method == "dm":
        for key, value in DM_PRESET.items():
            set_dotted(config, key, value)
