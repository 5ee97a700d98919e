"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import resource


def peak_memory_gib() -> float:
    """Peak device memory so far (GPU/TPU allocator), else this process's peak resident memory."""
    import jax  # pylint: disable=g-import-not-at-top

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:  # CPU: no allocator statistics
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak / 2**30
