"""Whether a run in a folder is finished: the one check that sweeps and Table 1 share.

JAX-free (json and the file system only), so a scheduler can ask it before anything starts.
A run is finished when its results.json holds the final evaluation of the iterations asked for;
a coreset baseline (no iterations) is finished once its results.json exists.
"""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS = "results.json"


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or cut short (a kill mid-write)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def finished_results(run_dir: str, iterations: int | None) -> dict[str, Any] | None:
    """run_dir's results.json when it scores `iterations` condensation iterations (None: a
    baseline, any results.json), else None: the run has still to be done or finished."""
    results = read_json(os.path.join(run_dir, RESULTS))
    if results is None:
        return None
    if iterations is None:
        return results
    return results if int(results.get("iterations", -1)) == int(iterations) else None
