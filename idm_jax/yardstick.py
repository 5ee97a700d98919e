"""DD-Ranking's scores of a set (Li et al. 2025, pip `ddranking`): HLR, IOR and LRS, and their table.

With accuracies (%) of networks trained, under one evaluator and protocol, on the set (``acc``),
on the whole real training set (``whole``) and on random real images at the set's IPC
(``random``), all with hard labels:

* HLR (hard-label recovery)   = whole - acc      (lower is better: the gap to the whole dataset);
* IOR (improvement over random) = acc - random   (higher is better);
* LRS = (e^a - e^-1) / (e - e^-1), a = w * IOR - (1 - w) * HLR, w = 0.5 by default.

The formula is meant on fractions in [0, 1] (then a lies in [-1, 1] and LRS in [0, 1]; a = 0, a set
as far above random as below the whole dataset, gives 1 / (1 + e) = 0.2689), as the paper defines
it. DD-Ranking's code (ddranking 0.2.0, metrics/hard_label.py) feeds it percentages: with w = 0.5,
a is the set's distance in points from the midpoint of the random and whole accuracies, so a set
5 pp below it scores -0.1537, next to the floor -e^-1 / (e - e^-1) = -0.1565, and one 5 pp above it
63.0. Here LRS is computed on fractions (`lrs`), and DD-Ranking's
code's number is reported beside it (`lrs_ddranking_code`), named, so the two are never mixed up;
the raw differences are in percentage points. Pure numbers and formatting only: the reference
accuracies are measured (and cached) by `idm_jax.references`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

DEFAULT_WEIGHT = 0.5
# What each number of a scores entry is measured in (results.json names them beside the numbers).
UNITS = {"accuracy, random_real, whole_data": "percent",
         "ior_pp, hlr_pp": "percentage points",
         "ior, hlr": "fractions (percentage points / 100)",
         "lrs": "LRS of the fractions, as the paper defines it, in [0, 1]",
         "lrs_ddranking_code": "LRS of the percentages, as ddranking 0.2.0's code computes it (floor -0.1565, "
                               "no ceiling)"}


def lrs(ior: float, hlr: float, w: float = DEFAULT_WEIGHT) -> float:
    """DD-Ranking's score of IOR and HLR given as fractions: (e^a - e^-1) / (e - e^-1),
    a = w * ior - (1 - w) * hlr. Raises ValueError when w is outside [0, 1] or a value is not finite."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"LRS weight w must lie in [0, 1], got {w!r}")
    if not (math.isfinite(ior) and math.isfinite(hlr)):
        raise ValueError(f"LRS needs finite IOR and HLR, got IOR {ior!r}, HLR {hlr!r}")
    a = w * ior - (1.0 - w) * hlr
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def lrs_ddranking_code(ior_pp: float, hlr_pp: float, w: float = DEFAULT_WEIGHT) -> float:
    """LRS as DD-Ranking's code computes it: the same formula on IOR and HLR in percentage points
    (its compute_metrics), so a = w * ior_pp - (1 - w) * hlr_pp spans [-100, 100]."""
    return lrs(ior_pp, hlr_pp, w)


def scores(accuracy: float, random_accuracy: float, whole_accuracy: float | None,
           w: float = DEFAULT_WEIGHT) -> dict[str, Any]:
    """HLR, IOR and LRS from three accuracies in percent (whole_accuracy None: unknown).

    Returns {ior_pp, hlr_pp: percentage points; ior, hlr: fractions; lrs: of the fractions;
    lrs_ddranking_code: of the percentages; w; units: UNITS}; hlr_pp, hlr and both LRS are None
    when the whole-data accuracy is unknown.
    """
    for name, value in (("accuracy", accuracy), ("random-real accuracy", random_accuracy),
                        ("whole-data accuracy", whole_accuracy)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 100.0):
            raise ValueError(f"{name} must be a percentage in [0, 100], got {value!r}")
    ior_pp = accuracy - random_accuracy
    hlr_pp = None if whole_accuracy is None else whole_accuracy - accuracy
    out: dict[str, Any] = {"ior_pp": ior_pp, "hlr_pp": hlr_pp, "ior": ior_pp / 100.0,
                           "hlr": None if hlr_pp is None else hlr_pp / 100.0, "w": float(w)}
    out["lrs"] = None if hlr_pp is None else lrs(out["ior"], out["hlr"], w)
    out["lrs_ddranking_code"] = None if hlr_pp is None else lrs_ddranking_code(ior_pp, hlr_pp, w)
    out["units"] = dict(UNITS)
    return out


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def scores_markdown(scores_by_arch: Mapping[str, Mapping[str, Any]]) -> str:
    """The scores table of results.md: one row per eval arch (`references.add_scores`'s entries)."""
    if not scores_by_arch:
        return ""
    w = next(iter(scores_by_arch.values())).get("w", DEFAULT_WEIGHT)
    lines = [f"#### DD-Ranking scores (hard labels; w = {w:g})", "",
             "Accuracies in %, IOR and HLR in percentage points (pp) and as fractions; LRS of the fractions "
             "(the paper's definition, in [0, 1]; compare these), and LRS as DD-Ranking's code computes it, "
             "of the percentages (floor -0.1565, where sets a few pp below the midpoint of random and whole "
             "sit; no ceiling).", "",
             "| eval arch | set (%) | random real, same IPC (%) | whole data (%) | whole-data source | "
             "IOR (pp) | HLR (pp) | IOR (fraction) | HLR (fraction) | LRS (of fractions) | "
             "LRS, DD-Ranking's code (of %) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for arch, s in scores_by_arch.items():
        whole = s.get("whole_data")
        lines.append(
            f"| {arch} | {_num(s.get('accuracy'), '.2f')} | {_num(s.get('random_real'), '.2f')} | "
            f"{_num(whole, '.2f')} | {s.get('whole_data_source') or '—'} | {_num(s.get('ior_pp'), '+.2f')} | "
            f"{_num(s.get('hlr_pp'), '+.2f')} | {_num(s.get('ior'), '+.4f')} | {_num(s.get('hlr'), '+.4f')} | "
            f"{_num(s.get('lrs'), '.4f')} | {_num(s.get('lrs_ddranking_code'), '.4f')} |")
        if s.get("note"):
            notes.append(f"{arch}: {s['note']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
