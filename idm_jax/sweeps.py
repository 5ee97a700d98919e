"""The paper's ablations as named sweeps: cells of config overrides, run and scored one by one.

A sweep is data: {cell name: {dotted config key: value}} plus how to read and plot it. One
command runs every cell for a given iteration budget (`run_condensation` into
<workdir>/cells/<cell>/, which also trains and tests the evaluation networks), then writes
<workdir>/sweep.json, sweep.md and sweep.png. A cell whose results.json already holds that
budget is skipped on a rerun; an interrupted cell resumes from its checkpoint.

  python main.py --mode=sweep --config=configs/cifar10.py:10 --workdir=runs/sweep_table2 \
      --config.sweep.name=table2 --config.sweep.iterations=1000

The key "method" selects a preset ("dm" loads the DM baseline's switches, as
`idm_jax.presets.apply_method`); every other key is a config field. Cells start from the config
given (it must be the IDM preset), so the non-DM cells keep IDM's synthetic-update settings
(lr_img, per-class steps) and only toggle the named switches.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

from absl import logging

from idm_jax import cell_status
from idm_jax import presets
from idm_jax import sweep_table
from idm_jax import results as results_lib

def cell_config(config, overrides: dict[str, Any], *, iterations: int | None = None):
    """A copy of `config` with a cell's overrides (and the sweep's iteration budget) applied."""
    c = copy.deepcopy(config)
    overrides = dict(overrides)
    method = overrides.pop("method", None)
    if method is not None:
        presets.apply_method(c, method)
    for key, value in overrides.items():
        presets.set_dotted(c, key, value)
    if iterations:
        c.idm.iterations = int(iterations)
    return c


def _budget(config) -> int:
    return presets.section_iterations(config, "sweep")


def run_cell(config, workdir: str, cell: str, overrides: dict[str, Any], *, iterations: int,
             evaluate_at_end: bool = True) -> dict[str, Any]:
    """Condenses (and by default scores) one cell in workdir/cells/<slug>; skipped when done.

    Returns {"results": results.json dict or None, "synthetic": path, "skipped": bool,
    "interrupted": bool, "seconds": float}.
    """
    from idm_jax import runner  # pylint: disable=g-import-not-at-top  (runner pulls in orbax)
    cell_dir = os.path.join(workdir, "cells", sweep_table.cell_slug(cell))
    done = cell_status.finished_results(cell_dir, iterations)
    synthetic = os.path.join(cell_dir, "synthetic.npz")
    if done is not None or (not evaluate_at_end and _synthetic_done(synthetic, iterations)):
        logging.info("sweep cell %r: done already (%s), skipped", cell, cell_dir)
        return {"results": done, "synthetic": synthetic, "skipped": True, "interrupted": False,
                "seconds": 0.0}
    c = cell_config(config, overrides, iterations=iterations)
    c.eval.at_end = bool(evaluate_at_end)
    c.eval.compare_random = False  # a sweep's table has its own reference cells
    logging.info("sweep cell %r: %s, %d iterations -> %s", cell, overrides or "(as configured)",
                 iterations, cell_dir)
    t = time.perf_counter()
    summary = runner.run_condensation(c, cell_dir)
    if evaluate_at_end and summary.get("results") is None and not summary.get("interrupted"):
        raise RuntimeError(f"sweep cell {cell!r} finished without results in {cell_dir}")
    if not summary.get("interrupted"):
        with open(os.path.join(cell_dir, "condensed_iterations.txt"), "w") as f:
            f.write(f"{iterations}\n")
    return {"results": summary.get("results"), "synthetic": summary.get("synthetic", synthetic),
            "skipped": False, "interrupted": bool(summary.get("interrupted")),
            "seconds": time.perf_counter() - t}


def _synthetic_done(path: str, iterations: int) -> bool:
    marker = os.path.join(os.path.dirname(path), "condensed_iterations.txt")
    if not (os.path.exists(path) and os.path.exists(marker)):
        return False
    with open(marker) as f:
        return f.read().strip() == str(iterations)


def run_sweep(config, workdir: str, *, name: str | None = None, iterations: int | None = None,
              cells: str | list[str] | None = None) -> dict[str, Any]:
    """main.py --mode=sweep: runs the cells of sweep `name` (config.sweep.name) and tabulates them.

    iterations: condensation iterations per cell (default config.sweep.iterations, 0 meaning
    config.idm.iterations); cells: names (or folder slugs) to run, default config.sweep.cells
    (empty = all). Writes workdir/sweep.json, sweep.md, sweep.png; returns the sweep.json dict.
    """
    name = name or str(config.sweep.name)
    sweep = sweep_table.get_sweep(name)
    if config.method != "idm":
        raise ValueError(f"sweeps start from the IDM preset (cells switch parts off); got method "
                         f"{config.method!r}: drop ',{config.method}' from --config")
    budget = int(iterations or _budget(config))
    names = sweep_table.selected_cells(sweep, config.sweep.cells if cells is None else cells)
    for cell in names:  # every cell's config is checked before any compute
        from idm_jax import config_check  # pylint: disable=g-import-not-at-top
        try:
            config_check.validate(cell_config(config, sweep["cells"][cell], iterations=budget))
        except ValueError as e:
            raise ValueError(f"sweep {name!r}, cell {cell!r}: {e}") from None
    os.makedirs(workdir, exist_ok=True)
    rows = []
    interrupted = False
    for cell in names:
        out = run_cell(config, workdir, cell, sweep["cells"][cell], iterations=budget)
        if out["interrupted"]:
            interrupted = True
            break
        rows.append(_row(sweep, cell, out))
    table = {"sweep": name, "title": sweep["title"], "paper_setting": sweep["paper_setting"],
             "dataset": str(config.data.source), "ipc": int(config.ipc), "iterations": budget,
             "eval": {"archs": str(config.eval.archs), "epochs": int(config.eval.epochs),
                      "num_seeds": int(config.eval.num_seeds)},
             "complete": not interrupted and len(rows) == len(sweep["cells"]), "cells": rows}
    write_outputs(workdir, sweep, table)
    return table


def _row(sweep: dict[str, Any], cell: str, out: dict[str, Any]) -> dict[str, Any]:
    results = out["results"]
    overrides = sweep["cells"][cell]
    return {"cell": cell, "overrides": overrides,
            "x": overrides.get(sweep["x"]) if sweep.get("x") else None,
            "archs": {a: {"mean": r["mean"], "std": r["std"], "accuracies": r["accuracies"]}
                      for a, r in results["archs"].items()},
            "partition_factor": results.get("partition_factor"),
            "paper": sweep["paper"].get(cell), "skipped": out["skipped"],
            "seconds": out["seconds"]}


def markdown(table: dict[str, Any]) -> str:
    """The sweep as a markdown table: one row per cell, one column per evaluation arch."""
    archs = list(table["cells"][0]["archs"]) if table["cells"] else []
    ev = table["eval"]
    lines = [f"### {table['title']}", "",
             f"{table['dataset']}, {table['ipc']} images per class, {table['iterations']} condensation "
             f"iterations per cell; evaluation: {ev['num_seeds']} seeds x {ev['epochs']} epochs. "
             f"Paper numbers: {table['paper_setting']}, at the paper's full budget."
             + ("" if table["complete"] else " **Incomplete: not every cell has run.**"), "",
             "| cell | overrides | " + " | ".join(f"{a} acc. (%)" for a in archs) + " | paper (%) |",
             "|---|---|" + "---|" * len(archs) + "---|"]
    for r in table["cells"]:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(IDM preset)"
        accs = " | ".join(f"{r['archs'][a]['mean']:.2f} ± {r['archs'][a]['std']:.2f}" for a in archs)
        paper = f"{r['paper'][0]:.1f} ± {r['paper'][1]:.1f}" if r["paper"] else "—"
        lines.append(f"| {r['cell']} | {over} | {accs} | {paper} |")
    return "\n".join(lines) + "\n"


def plot(path: str, sweep: dict[str, Any], table: dict[str, Any]) -> str:
    """sweep.png: accuracy per cell (a line over the swept value, or bars for categories)."""
    from idm_jax import plots  # pylint: disable=g-import-not-at-top
    rows = table["cells"]
    arch = next(iter(rows[0]["archs"]))
    means = [r["archs"][arch]["mean"] for r in rows]
    stds = [r["archs"][arch]["std"] for r in rows]
    title = f"{table['title']}\n{table['dataset']}, {table['iterations']} iterations per cell"
    if sweep.get("x"):
        xs = [float(r["x"]) for r in rows]
        markers = [{"label": f"paper ({table['paper_setting'].split(' (')[0]})" if i == 0 else "_",
                    "x": float(r["x"]), "y": r["paper"][0], "color": "C3"}
                   for i, r in enumerate(r for r in rows if r["paper"])]
        panel = {"title": "", "xlabel": sweep.get("xlabel", sweep["x"]), "ylabel": f"{arch} test accuracy (%)",
                 "series": [{"label": "measured", "x": xs, "y": means, "std": stds}], "markers": markers,
                 "xticks": xs}
        return plots.line_panels(path, [panel], title=title)
    return plots.bars(path, [r["cell"] for r in rows], means, stds,
                      paper=[r["paper"][0] if r["paper"] else None for r in rows],
                      paper_label=f"paper ({table['paper_setting'].split(' (')[0]})", title=title,
                      ylabel=f"{arch} test accuracy (%)")


def write_outputs(workdir: str, sweep: dict[str, Any], table: dict[str, Any]) -> None:
    results_lib.write_report(workdir, "sweep", table, markdown(table))
    if table["cells"]:
        plot(os.path.join(workdir, "sweep.png"), sweep, table)

