"""Loading a config file the way `--config=path[:arg]` does: `module.get_config(arg)`.

One loader for main.py's flag-error rewording and for modes that build cells from config files
(Table 1's `cifar10:10` is configs/cifar10.py with arg "10"). JAX-free.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config_file(path: str, arg: str | None = None) -> Any:
    """get_config(arg) (get_config() without arg) of the Python file at `path`.

    Raises ValueError naming the path when the file does not exist; the file's own errors
    (e.g. "IPC must be >= 1") propagate unchanged.
    """
    spec = importlib.util.spec_from_file_location("_idm_config", path)
    if spec is None or not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def split_config_value(value: str) -> tuple[str, str]:
    """"configs/cifar10.py:10,dm" -> ("configs/cifar10.py", "10,dm") (arg "" when none)."""
    path, _, arg = value.partition(":")
    return path, arg


def named_config_path(name: str) -> str:
    """The file of a config named as in Table 1's cells ("cifar10" -> <repo>/configs/cifar10.py)."""
    return os.path.join(CONFIG_DIR, f"{name}.py")
