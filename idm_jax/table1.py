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

With `table1.budget_s` > 0 a cell starts only when its estimate fits in what is left, else one
line says why. The estimate: remaining iterations x seconds per iteration (from `table1.pace`,
the cell's own metrics, the tuning table, or docs/gpu_speed.json's last figures, in that order)
+ a fixed part: `table1.startup_s` plus the evaluation, scaled from an IPC-10 set's
(`table1.eval_s`, else docs/gpu_speed.json's) by the images it trains on, its epochs, networks
and architectures (an IPC-50 set costs 5x an IPC-10 set).

After every cell: <workdir>/table1.json (one row per cell: accuracy mean/std, networks, the
paper's value, DD-Ranking scores, the variant, the command with the data it read), table1.md
and table1.png; with `table1.export_dir` these and one <folder>.tar.gz per finished cell (its
results, cell.json and set) are copied there, within `table1.export_max_files` files of at most
`table1.export_max_mb` MB each.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import statistics
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
from idm_jax import workdir as workdir_lib
from idm_jax import publish
from idm_jax.publish import RUN_INFO

METHODS = ("random", "dm", "idm")  # cheapest first: an evaluation only, DM's cheap step, IDM's
STEP_METHODS = ("idm", "dm")  # tuned in this order: IDM's step is most of Table 1's time
IDM_TUNING_SHARE = 2 / 3  # of table1.tune_s; DM's step gets the rest
EVAL_REFERENCE_IMAGES = 400  # CIFAR-10 IPC 10 at l = 2: the set docs/gpu_speed.json's evaluation times
GPU_SPEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "gpu_speed.json")
TUNING = "tuning.json"
LOG = "table1.log"


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


def _items(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def parse_cells(text: str) -> list[tuple[str, int]]:
    """"cifar10:1,cifar10:10" -> [("cifar10", 1), ("cifar10", 10)], each config file checked."""
    cells = []
    for item in _items(text):
        name, sep, ipc = item.partition(":")
        if not sep or not ipc.isdigit() or int(ipc) < 1:
            raise ValueError(f"table1.cells: bad cell {item!r}; expected <config file name>:<ipc>, "
                             "e.g. cifar10:10 or quick:1")
        if not os.path.isfile(config_files.named_config_path(name)):
            raise ValueError(f"table1.cells: no config file configs/{name}.py for cell {item!r}")
        cells.append((name, int(ipc)))
    if not cells:
        raise ValueError("table1.cells is empty; e.g. --config.table1.cells=cifar10:10")
    return cells


def parse_methods(text: str) -> list[str]:
    methods = _items(text)
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
    for item in _items(order):
        if item not in by_spec:
            raise ValueError(f"table1.order: {item!r} is not among the cells to run "
                             f"({', '.join(by_spec)})")
        first.append(by_spec[item])
    return list(dict.fromkeys(first + planned))


def cell_config(cell: Cell, iterations: int, overrides: dict[str, Any], variant: dict[str, Any]):
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


def command_line(cell: Cell, cell_dir: str, config, overrides: dict[str, Any], variant: dict[str, Any]) -> str:
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
# Estimates


def gpu_speed_figures(path: str = GPU_SPEED) -> dict[str, Any]:
    """docs/gpu_speed.json's last figures ({} when absent)."""
    return cell_status.read_json(path) or {}


def parse_paces(text: str) -> dict[str, float]:
    """table1.pace "idm=0.1,dm=0.02" -> {"idm": 0.1, "dm": 0.02}."""
    paces = {}
    for item in _items(text):
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
    archs = len(_items(config.eval.archs))
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


def tune_steps(t1, cells: list[Cell], workdir: str, iterations: int, overrides: dict[str, Any], log,
               time_fn: step_variants.TimeFn, clock, deadline: float | None) -> dict[str, Any]:
    """{method: {"cell", "rows", "pick"}}: the tuning table of the first unfinished cell of each
    step method, timed now or read back from <workdir>/tuning.json (a rerun does not time again)."""
    path = os.path.join(workdir, TUNING)
    tuning = cell_status.read_json(path) or {}
    budget = float(t1.tune_s)
    if budget <= 0:
        return tuning
    for method in STEP_METHODS:
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
    specs = parse_cells(t1.cells)
    datasets = {name: dataset_key(config_files.load_config_file(config_files.named_config_path(name), str(ipc)))
                for name, ipc in specs}
    cells = plan(specs, parse_methods(t1.methods), t1.order, datasets)
    paces = parse_paces(t1.pace)
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
    figures = gpu_speed_figures()
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
            est = estimate(cell, c, cell_dir, done_its, ds_classes, t1, paces, tuned, figures)
            line = skip_line(cell, est, deadline - clock())
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


def cell_row(cell: Cell, cell_dir: str, iterations: int, skipped: str | None) -> dict[str, Any]:
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


def table(cells: list[Cell], workdir: str, iterations: int, tuning: dict[str, Any],
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
