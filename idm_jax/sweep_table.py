"""The paper's ablations as data: named sweeps of config overrides (cells) and how to read them.

JAX-free library: the sweep and consistency modes run the cells (idm_jax/sweeps.py,
idm_jax/consistency.py) and config_check looks a sweep's name up here before any compute.
A sweep is {title, paper_setting, x (dotted key plotted on the x axis, None = categories),
xlabel, cells: {cell name: {dotted config key: value}}, paper: {cell: [mean, std]}}. The key
"method" selects a preset (`idm_jax.presets.apply_method`); every other key is a config field.
"""

from __future__ import annotations

import re
from typing import Any

_T2 = "CIFAR-100, 10 images per class (paper Table 2)"
_FIG = "CIFAR-100, 10 images per class (paper Figs. 5-7; values only in the figures)"

SWEEPS: dict[str, dict[str, Any]] = {
    "table2": {
        "title": "Table 2: IDM's components switched on and off",
        "paper_setting": _T2,
        "x": None,
        "cells": {
            "DM": {"method": "dm"},
            "DM + augmentation": {"idm.use_queue": False, "idm.use_ce": False},
            "DM + model sampling": {"idm.partition_factor": 1, "idm.use_ce": False},
            "DM + model sampling + augmentation": {"idm.use_ce": False},
            "DM + model sampling + regularization": {"idm.partition_factor": 1},
            "IDM (all three)": {},
        },
        "paper": {
            "DM": [29.7, 0.3],
            "DM + model sampling": [32.0, 0.5],
            "DM + model sampling + regularization": [34.3, 0.3],
            "IDM (all three)": [45.1, 0.1],
        },
    },
    "table3": {
        "title": "Table 3: partition factor l (l x l pieces per synthetic image)",
        "paper_setting": "ImageNet subset, 1 image per class (paper Table 3)",
        "x": "idm.partition_factor",
        "xlabel": "partition factor l",
        "cells": {f"l={l}": {"idm.partition_factor": l} for l in (1, 2, 3)},
        "paper": {"l=1": [5.4, 0.1], "l=2": [11.2, 0.5], "l=3": [10.7, 0.7]},
    },
    "fig5": {
        "title": "Fig. 5: weight of the CE regularizer lambda_reg",
        "paper_setting": _FIG,
        "x": "idm.ce_weight",
        "xlabel": "lambda_reg (idm.ce_weight)",
        "cells": {f"lambda={v:g}": {"idm.ce_weight": v} for v in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)},
        "paper": {},
    },
    "fig6": {
        "title": "Fig. 6: queue training steps K per fetched network and iteration",
        "paper_setting": _FIG,
        "x": "idm.model_train_steps",
        "xlabel": "K (idm.model_train_steps)",
        "cells": {f"K={v}": {"idm.model_train_steps": v} for v in (1, 5, 10, 20, 50, 100)},
        "paper": {},
    },
    "fig7": {
        "title": "Fig. 7: queue capacity N_max",
        "paper_setting": _FIG,
        "x": "idm.net_num",
        "xlabel": "N_max (idm.net_num)",
        "cells": {f"N_max={v}": {"idm.net_num": v} for v in (5, 10, 20, 50, 100, 200)},
        "paper": {},
    },
    "fig3": {
        "title": "Fig. 3: DM with nets pre-trained E epochs vs random nets vs model sampling",
        "paper_setting": "CIFAR-100, 10 images per class (paper Fig. 3; values only in the figure)",
        "x": None,
        "cells": {
            "DM (random nets)": {"method": "dm"},
            **{f"DM, pool E={e}": {"method": "dm", "idm.pool_epochs": e} for e in (10, 20, 30, 40, 50, 60)},
            "DM + model sampling": {"idm.partition_factor": 1, "idm.use_ce": False},
        },
        "paper": {},
    },
    "fig4": {
        "title": "Fig. 4 sets: DM, + model sampling, + regularization (l = 1)",
        "paper_setting": "CIFAR-100, 10 images per class (paper Fig. 4)",
        "x": None,
        "cells": {
            "DM": {"method": "dm"},
            "DM + model sampling": {"idm.partition_factor": 1, "idm.use_ce": False},
            "DM + model sampling + regularization": {"idm.partition_factor": 1},
        },
        "paper": {},
    },
}


def get_sweep(name: str) -> dict[str, Any]:
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid: {', '.join(SWEEPS)}")
    return SWEEPS[name]


def cell_slug(cell: str) -> str:
    """A folder name for a cell: 'DM + model sampling' -> 'DM_model_sampling'."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", cell).strip("_")


def selected_cells(sweep: dict[str, Any], cells: str | list[str] | None) -> list[str]:
    """Cell names to run: all when `cells` is empty, else the named ones (checked)."""
    names = [c.strip() for c in cells.split(",")] if isinstance(cells, str) else list(cells or [])
    names = [c for c in names if c]
    if not names:
        return list(sweep["cells"])
    by_slug = {cell_slug(c): c for c in sweep["cells"]}
    out = []
    for n in names:
        if n in sweep["cells"]:
            out.append(n)
        elif n in by_slug:
            out.append(by_slug[n])
        else:
            raise ValueError(f"sweep has no cell {n!r}; cells: {', '.join(sweep['cells'])}")
    return out
