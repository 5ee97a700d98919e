"""JAX's persistent compilation cache, shared by every idm_jax process on a machine.

A compiled program is written to disk once and read back by any later process that compiles the
same program (same shapes, flags and JAX version): a resumed run, Table 1's cells after the step
tuning, the evaluations. The folder is $JAX_COMPILATION_CACHE_DIR when set, else
<idm_jax cache>/jax_compilation (the data cache's folder: $IDM_CACHE_DIR or ~/.cache/idm_jax).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from idm_jax.data import cache as data_cache

SUBFOLDER = "jax_compilation"


def cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """Where compiled programs are kept (see the module's docstring)."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    return os.path.join(environ.get("IDM_CACHE_DIR") or data_cache.resolve_cache_dir(None), SUBFOLDER)


def enable(environ: Mapping[str, str] | None = None) -> str:
    """Points JAX at cache_dir() (for this process and, through the environment, its children)."""
    import jax  # pylint: disable=g-import-not-at-top

    path = cache_dir(environ)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
