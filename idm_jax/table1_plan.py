"""Table 1's cells: which run, in what order, and how long each still needs.

JAX-free library of --mode=table1 (idm_jax/table1.py); config_check reads a config's
table1.cells / methods / order / pace through it before any compute. The estimate of a cell:
remaining iterations x seconds per iteration (from `table1.pace`, the cell's own metrics, the
tuning table, or docs/gpu_speed.json's last figures, in that order) + a fixed part:
`table1.startup_s` plus the evaluation, scaled from an IPC-10 set's (`table1.eval_s`, else
docs/gpu_speed.json's) by the images it trains on, its epochs, networks and architectures (an
IPC-50 set costs 5x an IPC-10 set).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any

from idm_jax import cell_status
from idm_jax import config_files
from idm_jax import workdir as workdir_lib

METHODS = ("random", "dm", "idm")  # cheapest first: an evaluation only, DM's cheap step, IDM's
STEP_METHODS = ("idm", "dm")  # tuned in this order: IDM's step is most of Table 1's time
EVAL_REFERENCE_IMAGES = 400  # CIFAR-10 IPC 10 at l = 2: the set docs/gpu_speed.json's evaluation times
GPU_SPEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "gpu_speed.json")


@dataclasses.dataclass(frozen=True)
class Cell:
    config_name: str  # configs/<config_name>.py
    ipc: int
    method: str
    dataset: str = ""  # the dataset's short name (publish.dataset_key); "" = config_name

    @property
    def name(self) -> str:
        """Its folder: <dataset>_ipc<ipc>_<method>, e.g. cifar10_ipc10_idm or digits_ipc1_dm (the
        form `python -m idm_jax.publish` expects)."""
        return f"{self.dataset or self.config_name}_ipc{self.ipc}_{self.method}"

    @property
    def spec(self) -> str:
        return f"{self.config_name}:{self.ipc}:{self.method}"

    @property
    def config_arg(self) -> str:
        return f"{self.ipc},dm" if self.method == "dm" else str(self.ipc)


# ----------------------------------------------------------------------------------------------
# What to run


def cell_items(text: str) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]: a comma list of table1's options."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


def parse_cells(text: str) -> list[tuple[str, int]]:
    """"cifar10:1,cifar10:10" -> [("cifar10", 1), ("cifar10", 10)] (the form only: `check_config_files`
    looks for the files, which only the mode needs)."""
    cells = []
    for item in cell_items(text):
        name, sep, ipc = item.partition(":")
        if not sep or not ipc.isdigit() or int(ipc) < 1:
            raise ValueError(f"table1.cells: bad cell {item!r}; expected <config file name>:<ipc>, "
                             "e.g. cifar10:10 or quick:1")
        cells.append((name, int(ipc)))
    if not cells:
        raise ValueError("table1.cells is empty; e.g. --config.table1.cells=cifar10:10")
    return cells


def check_config_files(cells: list[tuple[str, int]]) -> None:
    """Refuses a cell whose configs/<name>.py does not exist, naming it."""
    for name, ipc in cells:
        if not os.path.isfile(config_files.named_config_path(name)):
            raise ValueError(f"table1.cells: no config file configs/{name}.py for cell '{name}:{ipc}'")


def parse_methods(text: str) -> list[str]:
    methods = cell_items(text)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"table1.methods: {','.join(unknown) or 'none given'}; expected some of "
                         f"{','.join(METHODS)}")
    return methods


def plan(cells: list[tuple[str, int]], methods: list[str], order: str = "",
         datasets: dict[str, str] | None = None) -> list[Cell]:
    """The cells in the order they run: those named in `order` ("cifar10:10:idm,...") first, then
    every Random cell, every DM cell and every IDM cell, each over `cells` in their order.
    datasets: {config name: dataset short name} for the folders' names."""
    datasets = datasets or {}
    planned = [Cell(name, ipc, m, datasets.get(name, "")) for m in METHODS if m in methods for name, ipc in cells]
    by_spec = {c.spec: c for c in planned}
    first = []
    for item in cell_items(order):
        if item not in by_spec:
            raise ValueError(f"table1.order: {item!r} is not among the cells to run "
                             f"({', '.join(by_spec)})")
        first.append(by_spec[item])
    return list(dict.fromkeys(first + planned))


# ----------------------------------------------------------------------------------------------
# Estimates


def gpu_speed_figures(path: str = GPU_SPEED) -> dict[str, Any]:
    """docs/gpu_speed.json's last figures ({} when absent)."""
    return cell_status.read_json(path) or {}


def parse_paces(text: str) -> dict[str, float]:
    """table1.pace "idm=0.1,dm=0.02" -> {"idm": 0.1, "dm": 0.02}."""
    paces = {}
    for item in cell_items(text):
        method, sep, value = item.partition("=")
        try:
            paces[method] = float(value)
        except ValueError:
            sep = ""
        if not sep or method not in STEP_METHODS or paces.get(method, -1) <= 0:
            raise ValueError(f"table1.pace: bad entry {item!r}; expected e.g. idm=0.1,dm=0.02 (s/iteration)")
    return paces


def metrics_pace(cell_dir: str) -> float | None:
    """Median seconds per iteration logged in the cell's metrics.jsonl (a run started before)."""
    rates = []
    try:
        with open(os.path.join(cell_dir, workdir_lib.METRICS)) as f:
            for line in f:
                try:
                    rate = json.loads(line).get("it_per_s")
                except ValueError:
                    continue  # a row cut by a kill
                if rate:
                    rates.append(1.0 / float(rate))
    except OSError:
        return None
    return statistics.median(rates) if rates else None


def pace(cell: Cell, cell_dir: str, paces: dict[str, float], tuned: dict[str, float],
         figures: dict[str, Any]) -> tuple[float | None, str]:
    """(seconds per iteration, where it comes from) for a DM or IDM cell, or (None, why not)."""
    if cell.method in paces:
        return paces[cell.method], "table1.pace"
    own = metrics_pace(cell_dir)
    if own:
        return own, "its own metrics"
    if cell.spec in tuned:
        return tuned[cell.spec], "the tuning table"
    figure = figures.get(f"{cell.config_name}_ipc{cell.ipc}_s_per_it")
    if figure:
        return float(figure), "docs/gpu_speed.json" + (" (IDM's, an upper bound)" if cell.method == "dm" else "")
    return None, "no pace known (no tuning figure, metrics or docs/gpu_speed.json figure; set table1.pace)"


def eval_seconds(config, num_classes: int, partition_factor: int, reference_s: float) -> float:
    """The evaluation's seconds: `reference_s` (5 networks x 1000 epochs of an IPC-10 set of
    EVAL_REFERENCE_IMAGES images) scaled by the images trained on (ipc x classes x l^2), epochs,
    networks and archs."""
    images = config.ipc * num_classes * partition_factor ** 2
    archs = len(cell_items(config.eval.archs))
    return (reference_s * images / EVAL_REFERENCE_IMAGES * config.eval.epochs / 1000
            * config.eval.num_seeds / 5 * archs)


@dataclasses.dataclass(frozen=True)
class Estimate:
    seconds: float | None  # None: unknown
    text: str  # how it was made, for the skip line


def estimate(cell: Cell, config, cell_dir: str, done_its: int, num_classes: int, t1,
             paces: dict[str, float], tuned: dict[str, float], figures: dict[str, Any]) -> Estimate:
    """The seconds `cell` still needs (see the module docstring)."""
    reference = float(t1.eval_s) or float(figures.get("eval_5nets_1000ep_ipc10_s") or 0.0)
    l = 1 if cell.method == "random" else int(config.idm.partition_factor)
    fixed = float(t1.startup_s) + eval_seconds(config, num_classes, l, reference)
    if cell.method == "random":
        return Estimate(fixed, f"{fixed:.0f} s fixed (start-up and the evaluation)")
    its = max(0, int(config.idm.iterations) - done_its)
    s_per_it, source = pace(cell, cell_dir, paces, tuned, figures)
    if s_per_it is None:
        return Estimate(None, f"{its} its, {source}")
    need = its * s_per_it + fixed
    return Estimate(need, f"{its} its x {s_per_it:.4f} s/it ({source}) + {fixed:.0f} s fixed = {need:.0f} s")


def skip_line(cell: Cell, est: Estimate, left: float) -> str | None:
    """The one line saying why `cell` does not start with `left` seconds left, or None."""
    if est.seconds is not None and est.seconds <= left:
        return None
    return f"skip {cell.spec}: {est.text}" + (f" > {left:.0f} s left" if est.seconds is not None else "")
