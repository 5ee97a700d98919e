"""Progress text shared by the long loops (condensation iterations, evaluation epochs)."""

from __future__ import annotations

import math


def hms(seconds: float) -> str:
    """3725.4 -> "1:02:05"; negative or non-finite -> "0:00:00"."""
    seconds = int(max(seconds, 0)) if math.isfinite(seconds) else 0
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def speed_and_eta(units_per_second: float, remaining_units: float, unit: str) -> str:
    """"2.50 it/s | ETA 0:01:20" for rates of 1 or more per second, else "3.10 s/epoch | ETA ..."."""
    if units_per_second <= 0:
        return f"- {unit}/s | ETA -"
    speed = (f"{units_per_second:.2f} {unit}/s" if units_per_second >= 1
             else f"{1 / units_per_second:.2f} s/{unit}")
    return f"{speed} | ETA {hms(remaining_units / units_per_second)}"
