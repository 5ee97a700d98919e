"""The paper's Table 1 as one command: its cells run in turn, resumable, cheapest first.

  python main.py --mode=table1 --workdir=runs/table1 --config=configs/cifar10.py \
      --config.table1.cells=cifar10:1,cifar10:10,cifar10:50 --config.table1.methods=random,dm,idm

A cell is `<config file name>:<ipc>` and a method (random real images, DM or IDM). Each runs in
<workdir>/<name>_ipc<ipc>_<method>/ exactly as the single-cell command would (`main.py
--config=configs/<name>.py:<ipc>[,dm]`, or `--mode=baseline` for Random): a rerun resumes a cell
that was cut and never recomputes a finished one (idm_jax.cell_status). The command's own
`--config.<field>` overrides (not table1.*) apply to every cell.

Order: Random cells first (an evaluation only), then DM, then IDM, each over the cells in the
order given; `table1.order` puts named cells (`cifar10:10:idm`) first. Before the first DM or
IDM cell, the step variants are timed (idm_jax.step_variants, `table1.tune_s` seconds) and the
fastest is run by every later cell of that method (recorded in its row and command).

With `table1.budget_s` > 0 a cell starts only when its estimate (idm_jax/table1_plan.py) fits in
what is left, else one line says why.

After every cell: <workdir>/table1.json (one row per cell: accuracy mean/std, networks, the
paper's value, DD-Ranking scores, the variant, the command with the data it read), table1.md
and table1.png; with `table1.export_dir` these and one <folder>.tar.gz per finished cell (its
results, cell.json and set) are copied there, within `table1.export_max_files` files of at most
`table1.export_max_mb` MB each.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from typing import Any

from idm_jax import cell_status
from idm_jax import config_check
from idm_jax import config_files
from idm_jax import data as data_lib
from idm_jax import presets
from idm_jax import results as results_lib
from idm_jax import step_variants
from idm_jax import table1_plan
from idm_jax import workdir as workdir_lib
from idm_jax import publish
from idm_jax.publish import RUN_INFO

IDM_TUNING_SHARE = 2 / 3  # of table1.tune_s; DM's step gets the rest
TUNING = "tuning.json"
LOG = "table1.log"


# ----------------------------------------------------------------------------------------------
# A cell's config and command


def cell_config(cell: table1_plan.Cell, iterations: int, overrides: dict[str, Any], variant: dict[str, Any]):
    """The cell's config: its file's get_config("<ipc>[,dm]"), the command's overrides, the
    iterations, the tuned variant (DM and IDM), locked like main.py's."""
    c = config_files.load_config_file(config_files.named_config_path(cell.config_name), cell.config_arg)
    if cell.method == "random":
        c.baseline.method = "random"
    for key, value in overrides.items():
        presets.set_dotted(c, key, value)
    c.idm.iterations = int(iterations)
    c.eval.compare_random = False  # the table has its own Random cells
    for key, value in variant.items():
        presets.set_dotted(c, key, value)
    c.lock()
    return c


def dataset_key(config) -> str:
    """The short name of config's dataset, as a published set's name has it ("cifar10", "digits")."""
    return publish.dataset_key(str(config.data.source))


def command_line(cell: table1_plan.Cell, cell_dir: str, config, overrides: dict[str, Any],
                 variant: dict[str, Any]) -> str:
    """What a user types to run this cell alone, naming the data it read (data.source)."""
    words = ["python main.py", f"--config=configs/{cell.config_name}.py:{cell.config_arg}"]
    if cell.method == "random":
        words += ["--mode=baseline", "--config.baseline.method=random"]
    words.append(f"--workdir={cell_dir}")
    fields = {"data.source": config.data.source, **overrides}
    if cell.method != "random":
        fields["idm.iterations"] = int(config.idm.iterations)
        fields.update(variant)
    words += [f"--config.{k}={v}" for k, v in fields.items()]
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# The run


class _Log:
    """Lines a user must see (skips, starts, ends): printed and appended to <workdir>/table1.log."""

    def __init__(self, workdir: str, start: float, clock):
        self.path, self.start, self.clock = os.path.join(workdir, LOG), start, clock

    def __call__(self, text: str) -> None:
        line = f"[{self.clock() - self.start:.0f}s] {text}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _command_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (overrides or {}).items() if not k.startswith("table1.")}


def _device() -> str:
    import jax  # pylint: disable=g-import-not-at-top

    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


def _done_iterations(cell_dir: str) -> int:
    if not os.path.isdir(os.path.join(cell_dir, "checkpoints")):
        return 0
    from idm_jax import checkpoints  # pylint: disable=g-import-not-at-top  (orbax)
    return checkpoints.latest_checkpoint(cell_dir) or 0


def tune_steps(t1, cells: list[table1_plan.Cell], workdir: str, iterations: int, overrides: dict[str, Any], log,
               time_fn: step_variants.TimeFn, clock, deadline: float | None) -> dict[str, Any]:
    """{method: {"cell", "rows", "pick"}}: the tuning table of the first unfinished cell of each
    step method, timed now or read back from <workdir>/tuning.json (a rerun does not time again)."""
    path = os.path.join(workdir, TUNING)
    tuning = cell_status.read_json(path) or {}
    budget = float(t1.tune_s)
    if budget <= 0:
        return tuning
    for method in table1_plan.STEP_METHODS:
        todo = [c for c in cells if c.method == method
                and cell_status.finished_results(os.path.join(workdir, c.name), iterations) is None]
        if not todo or method in tuning:
            continue
        cell = todo[0]
        share = budget * (IDM_TUNING_SHARE if method == "idm" and "dm" in {c.method for c in cells} else 1.0)
        if method == "dm":
            share = budget - sum(t.get("seconds", 0.0) for t in tuning.values())
        if deadline is not None:
            share = min(share, deadline - clock())
        if share <= 0:
            continue
        config = cell_config(cell, iterations, overrides, {})
        ds = data_lib.load_config_dataset(config)
        log(f"tuning {cell.spec}'s step: up to {share:.0f} s")
        t0 = clock()
        table = step_variants.tune(config, ds, share, time_fn=time_fn, clock=clock)
        best = step_variants.fastest(table)
        tuning[method] = {"cell": cell.spec, "seconds": clock() - t0, "rows": [t.row() for t in table],
                          "pick": dict(best.overrides) if best else {}}
        for t in table:
            figures = (f"compile {t.compile_s:.1f} s, {t.s_per_it:.4f} s/it" if t.s_per_it is not None else t.note)
            log(f"  {t.label}: {figures}")
        log(f"picked for {method}: {best.label if best else 'as configured (nothing timed)'}")
        workdir_lib.atomic_write(path, json.dumps(tuning, indent=1))
    return tuning


def tuned_paces(tuning: dict[str, Any]) -> dict[str, float]:
    """{cell spec: seconds per iteration of the picked variant} from the tuning table."""
    out = {}
    for entry in tuning.values():
        timed = [r["s_per_it"] for r in entry["rows"] if r["s_per_it"] is not None]
        if timed:
            out[entry["cell"]] = min(timed)
    return out


def run_table1(config, workdir: str, *, overrides: dict[str, Any] | None = None,
               time_fn: step_variants.TimeFn = step_variants.time_step,
               clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """main.py --mode=table1 (module docstring). overrides: the command's --config.<field>
    values (main.py passes them; they apply to every cell). Returns the table1.json dict."""
    from idm_jax import baselines  # pylint: disable=g-import-not-at-top  (modes: orbax, evaluation)
    from idm_jax import runner  # pylint: disable=g-import-not-at-top

    t1 = config.table1
    start = clock()
    iterations = int(t1.iterations)
    if iterations < 1:
        raise ValueError(f"table1.iterations must be >= 1, got {iterations}")
    overrides = _command_overrides(overrides)
    specs = table1_plan.parse_cells(t1.cells)
    table1_plan.check_config_files(specs)
    datasets = {name: dataset_key(config_files.load_config_file(config_files.named_config_path(name), str(ipc)))
                for name, ipc in specs}
    cells = table1_plan.plan(specs, table1_plan.parse_methods(t1.methods), t1.order, datasets)
    paces = table1_plan.parse_paces(t1.pace)
    for cell in cells:  # every cell's config is checked before any compute
        try:
            config_check.validate(cell_config(cell, iterations, overrides, {}))
        except ValueError as e:
            raise ValueError(f"table1 cell {cell.spec}: {e}") from None
    os.makedirs(workdir, exist_ok=True)
    log = _Log(workdir, start, clock)
    deadline = start + float(t1.budget_s) if float(t1.budget_s) > 0 else None
    tuning = tune_steps(t1, cells, workdir, iterations, overrides, log, time_fn, clock, deadline)
    tuned = tuned_paces(tuning)
    figures = table1_plan.gpu_speed_figures()
    skipped: dict[str, str] = {}
    for cell in cells:
        cell_dir = os.path.join(workdir, cell.name)
        its = None if cell.method == "random" else iterations
        if cell_status.finished_results(cell_dir, its) is not None:
            log(f"{cell.spec}: finished before ({cell_dir})")
            continue
        info = cell_status.read_json(os.path.join(cell_dir, RUN_INFO)) or {}
        # A cell started before keeps its variant (its checkpoint was made with it).
        variant = info.get("variant", (tuning.get(cell.method) or {}).get("pick", {}))
        c = cell_config(cell, iterations, overrides, variant)
        if deadline is not None:
            ds_classes = data_lib.load_config_dataset(c).num_classes
            done_its = 0 if cell.method == "random" else _done_iterations(cell_dir)
            est = table1_plan.estimate(cell, c, cell_dir, done_its, ds_classes, t1, paces, tuned, figures)
            line = table1_plan.skip_line(cell, est, deadline - clock())
            if line:
                log(line)
                skipped[cell.spec] = line
                continue
        command = command_line(cell, cell_dir, c, overrides, variant)
        os.makedirs(cell_dir, exist_ok=True)
        info.update(command=command, variant=variant, device=_device(),
                    date=info.get("date") or datetime.datetime.now(datetime.timezone.utc).date().isoformat())
        workdir_lib.atomic_write(os.path.join(cell_dir, RUN_INFO), json.dumps(info, indent=1))
        log(f"start {cell.spec}: {command}")
        t0 = clock()
        if cell.method == "random":
            baselines.run_baseline(c, cell_dir)
            interrupted = False
        else:
            interrupted = bool(runner.run_condensation(c, cell_dir).get("interrupted"))
        info["seconds"] = round(float(info.get("seconds", 0.0)) + clock() - t0, 1)
        workdir_lib.atomic_write(os.path.join(cell_dir, RUN_INFO), json.dumps(info, indent=1))
        log(f"end {cell.spec}: {info['seconds']:.0f} s" + (" (interrupted: a rerun resumes it)" if interrupted else ""))
        write_outputs(workdir, table(cells, workdir, iterations, tuning, skipped), t1, log)
        if interrupted:
            break
    record = table(cells, workdir, iterations, tuning, skipped)
    write_outputs(workdir, record, t1, log)
    return record


# ----------------------------------------------------------------------------------------------
# The table


def _accuracy(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(arch, its result): the matching network's when evaluated, else the first arch."""
    archs = results["archs"]
    arch = results.get("train_arch") if results.get("train_arch") in archs else next(iter(archs))
    return arch, archs[arch]


def cell_row(cell: table1_plan.Cell, cell_dir: str, iterations: int, skipped: str | None) -> dict[str, Any]:
    """table1.json's row of a cell, from its results.json and cell.json."""
    info = cell_status.read_json(os.path.join(cell_dir, RUN_INFO)) or {}
    results = cell_status.finished_results(cell_dir, None if cell.method == "random" else iterations)
    row = {"cell": f"{cell.config_name}:{cell.ipc}", "method": cell.method, "folder": cell.name,
           "iterations": None if cell.method == "random" else iterations,
           "state": "done" if results else ("skipped" if skipped else "not run"),
           "mean": None, "std": None, "networks": None, "arch": None, "paper": None, "scores": None,
           "variant": step_variants.variant_label(info.get("variant", {})) if cell.method != "random" else None,
           "command": info.get("command"), "seconds": info.get("seconds"), "skipped": skipped}
    if results:
        arch, r = _accuracy(results)
        found = results_lib.paper_accuracy(results["dataset"], cell.method, cell.ipc, arch,
                                           partition_factor=int(results.get("partition_factor", 1)),
                                           train_arch=results.get("train_arch", arch))
        row.update(mean=r["mean"], std=r["std"], networks=len(r.get("accuracies", [])), arch=arch,
                   dataset=results["dataset"], paper=list(found[:2]) if found else None,
                   scores=(results.get("scores") or {}).get(arch))
    return row


def table(cells: list[table1_plan.Cell], workdir: str, iterations: int, tuning: dict[str, Any],
          skipped: dict[str, str]) -> dict[str, Any]:
    rows = [cell_row(c, os.path.join(workdir, c.name), iterations, skipped.get(c.spec)) for c in cells]
    return {"iterations": iterations, "complete": all(r["state"] == "done" for r in rows),
            "rows": rows, "tuning": tuning}


SCORE_TEXT = (("ior_pp", "IOR {:+.2f} pp"), ("hlr_pp", "HLR {:.2f} pp"), ("lrs", "LRS {:.4f}"))


def _score_text(scores: dict[str, Any] | None) -> str:
    """DD-Ranking's scores of a row (references.py's keys), "—" where none were measured."""
    parts = [fmt.format(scores[key]) for key, fmt in SCORE_TEXT
             if isinstance((scores or {}).get(key), (int, float))]
    return ", ".join(parts) or "—"


def markdown(record: dict[str, Any]) -> str:
    lines = ["# Table 1 (idm_jax)", "",
             f"Test accuracy (%), mean ± std over the evaluation networks; {record['iterations']} condensation "
             "iterations for DM and IDM." + ("" if record["complete"] else " **Incomplete: not every cell has run.**"),
             "", "| cell | method | accuracy (%) | networks | paper (%) | DD-Ranking | variant | state |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        acc = f"{r['mean']:.2f} ± {r['std']:.2f}" if r["mean"] is not None else "—"
        paper = f"{r['paper'][0]:.1f} ± {r['paper'][1]:.1f}" if r["paper"] else "—"
        lines.append(f"| {r['cell']} | {r['method']} | {acc} | {r['networks'] or '—'} | {paper} | "
                     f"{_score_text(r['scores'])} | {r['variant'] or '—'} | {r['skipped'] or r['state']} |")
    lines += ["", "Commands (each cell alone, with the data it read):", ""]
    lines += [f"* {r['folder']}: `{r['command']}`" for r in record["rows"] if r["command"]]
    for method, entry in record["tuning"].items():
        lines += ["", f"Step variants timed at {entry['cell']} ({method}; picked: "
                  f"{step_variants.variant_label(entry['pick'])}):", "",
                  "| variant | compile (s) | s / iteration |", "|---|---:|---:|"]
        for row in entry["rows"]:
            timed = row["s_per_it"] is not None
            lines.append(f"| {row['variant']} | {row['compile_s']:.1f} | {row['s_per_it']:.4f} |" if timed
                         else f"| {row['variant']} | — | {row['note']} |")
    return "\n".join(lines) + "\n"


def plot(path: str, record: dict[str, Any]) -> str | None:
    """table1.png: a bar per finished cell, the paper's value as a star."""
    from idm_jax import plots  # pylint: disable=g-import-not-at-top

    done = [r for r in record["rows"] if r["mean"] is not None]
    if not done:
        return None
    return plots.bars(path, [f"{r['cell']} {r['method']}" for r in done], [r["mean"] for r in done],
                      [r["std"] for r in done], paper=[r["paper"][0] if r["paper"] else None for r in done],
                      title=f"Table 1 (idm_jax), {record['iterations']} iterations", ylabel="test accuracy (%)")


def write_outputs(workdir: str, record: dict[str, Any], t1, log) -> None:
    """table1.json, table1.md, table1.png, then the copy into table1.export_dir."""
    results_lib.write_report(workdir, "table1", record, markdown(record))
    plot(os.path.join(workdir, "table1.png"), record)
    if t1.export_dir:
        for line in export(workdir, record, str(t1.export_dir), int(t1.export_max_files),
                           float(t1.export_max_mb)):
            log(line)


CELL_FILES = ("results.json", "results.md", RUN_INFO, "synthetic.npz", "synthetic.png")  # a cell's archive


def export_plan(workdir: str, record: dict[str, Any]) -> list[tuple[list[tuple[str, str]], str]]:
    """([(file, name in the archive)], name in the export folder), in priority order: the table's
    files, then one <folder>.tar.gz per finished cell (its results, cell.json and set: what
    `python -m idm_jax.publish` needs once unpacked into a folder)."""
    plan_ = [([(os.path.join(workdir, n), n)], n) for n in ("table1.json", "table1.md", "table1.png")]
    for r in record["rows"]:
        if r["state"] == "done":
            files = [(os.path.join(workdir, r["folder"], n), f"{r['folder']}/{n}") for n in CELL_FILES]
            plan_.append((files, f"{r['folder']}.tar.gz"))
    return [([(src, arc) for src, arc in files if os.path.exists(src)], name) for files, name in plan_
            if os.path.exists(files[0][0])]


def export(workdir: str, record: dict[str, Any], dest: str, max_files: int, max_mb: float) -> list[str]:
    """Copies export_plan's files into dest, each whole (a temporary beside it, then a rename):
    one whose content is over max_mb MB is left out, and dest never holds more than max_files
    files (the temporary included) of ours. 0 = no cap. Returns one line per file left out."""
    os.makedirs(dest, exist_ok=True)
    lines, kept = [], 0
    for files, name in export_plan(workdir, record):
        size = sum(os.path.getsize(src) for src, _ in files)
        if max_mb and size > max_mb * 1e6:
            lines.append(f"export: {name} left out ({size / 1e6:.1f} MB > table1.export_max_mb={max_mb:g})")
            continue
        if max_files and kept + 1 >= max_files:  # one slot stays free for the temporary
            lines.append(f"export: {name} left out (table1.export_max_files={max_files} reached)")
            continue
        with workdir_lib.atomic_file(os.path.join(dest, name), needed_bytes=size) as out:
            if name.endswith(".tar.gz"):
                with tarfile.open(fileobj=out, mode="w:gz") as tar:
                    for src, arcname in files:
                        tar.add(src, arcname=arcname)
            else:
                with open(files[0][0], "rb") as f:
                    shutil.copyfileobj(f, out)
        kept += 1
    return lines
