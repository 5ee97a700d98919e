"""Helpers of benchmarks/paper_cells.sh: a cell's state and run record, Table 1, the curve, packing.

    python benchmarks/paper_cells.py state  --workdir=W                 # prints new | partial | done
    python benchmarks/paper_cells.py record --workdir=W --command=C --device=D [--seconds=S --rc=R]
    python benchmarks/paper_cells.py report --root=R --out=O            # O/table1.md, O/curve.png
    python benchmarks/paper_cells.py pack   --root=R --out=O            # O/results.tar.gz (+ sets_<k>.tar.gz)
    python benchmarks/paper_cells.py cells  --root=R --out=O --cells="cifar10:1 cifar10:10" --deadline=T ...
                                          # the device command's loop (paper_cells.sh): Random, DM, then
                                          # IDM cells, each only when its estimate fits before T

A cell is one workdir under ROOT named <dataset>_ipc<ipc>_<method> (idm, dm: condensation runs;
random: the coreset baseline). Its cell.json records the command, device, date and the wall
seconds of every call that worked on it (a cell cut by a time limit resumes in the next call).
Only numpy and the standard library here (matplotlib for the curve; the cells loop reads a
config's iterations, ml_collections), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from idm_jax import checkpoints  # noqa: E402
from idm_jax import results as results_lib  # noqa: E402
from idm_jax import workdir as workdir_lib  # noqa: E402
from idm_jax.publish import CELL_NAME, RUN_INFO  # noqa: E402

METHODS = ("idm", "dm", "random")
PAPER_PARTITION = {"idm": 2, "dm": 1, "random": 1}  # Table 1's l of each method
ARCHIVE_BYTES = 15 * 2**20  # a device run brings back files of at most 16 MiB
# 8 files come back: table1.md, curve.png, timings.txt, devices.txt, results.tar.gz, 2 set archives
# and one more for the temporary of the file being replaced (every file goes into $OUT by a rename).
MAX_SET_ARCHIVES = 2
DATA_CAVEAT = ("CIFAR-10 is the archive $IDM_CIFAR10 names (cifar10-jpeg.tar.gz), a JPEG re-encode of "
               "the original images (about 29 dB PSNR), unless the command's data.source says otherwise.")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _config(workdir: str) -> dict:
    return _read_json(os.path.join(workdir, "config.json")) or {}


def cell_state(workdir: str) -> str:
    """'done' when results.json holds the final evaluation (of the last iteration for a
    condensation), 'partial' when the workdir holds a started run, else 'new'."""
    results = _read_json(os.path.join(workdir, "results.json"))
    if results is not None:
        total = (_config(workdir).get("idm") or {}).get("iterations")
        if "iterations" not in results or results["iterations"] == total:
            return "done"
    return "partial" if os.path.exists(os.path.join(workdir, "config.json")) else "new"


def record(workdir: str, command: str, device: str, seconds: float | None = None, rc: int | None = None,
           s_per_it: float | None = None) -> dict:
    """Starts (no seconds) or closes (seconds, rc) one call's entry in workdir/cell.json; s_per_it,
    the pace this call measured, is kept for the next call's estimate (cell_pace)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_INFO)
    info = _read_json(path) or {"command": command, "calls": [],
                                  "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    info.update(command=command, device=device)
    if seconds is None:
        info["calls"].append({"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "device": device})
    else:
        info["calls"][-1].update(seconds=round(float(seconds), 1), rc=rc, state=cell_state(workdir))
        if s_per_it:
            info["calls"][-1]["s_per_it"] = info["s_per_it"] = s_per_it
    info["seconds"] = round(sum(c.get("seconds", 0.0) for c in info["calls"]), 1)
    workdir_lib.atomic_write(path, json.dumps(info, indent=2))
    return info


def _order(name: str) -> tuple:
    """The issue's order: CIFAR-10 before CIFAR-100, IPC 10, 50, 1, then IDM, DM, Random."""
    m = CELL_NAME.match(name)
    ipc = int(m["ipc"])
    return (m["dataset"] != "cifar10", m["dataset"], (10, 50, 1).index(ipc) if ipc in (10, 50, 1) else ipc,
            METHODS.index(m["method"]) if m["method"] in METHODS else len(METHODS), m["method"])


def cells(root: str) -> list[str]:
    """The cell workdirs under root, in the issue's order."""
    names = [n for n in os.listdir(root) if CELL_NAME.match(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=_order)


def _arch(workdir: str, results: dict | None) -> str:
    if results and results.get("train_arch"):
        return results["train_arch"]
    return _config(workdir).get("model", "ConvNet")


def curve_points(workdir: str) -> list[tuple[int, float]]:
    """(iteration, mean accuracy) of the periodic evaluations (config eval.interval) in metrics.jsonl."""
    key = f"eval/{_arch(workdir, _read_json(os.path.join(workdir, 'results.json')))}/mean"
    points = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                if key in row:
                    points[int(row["step"])] = float(row[key])
    except OSError:
        pass
    return sorted(points.items())


def _measured(workdir: str) -> str:
    results = _read_json(os.path.join(workdir, "results.json"))
    state = cell_state(workdir)
    if state != "done":
        metrics = os.path.join(workdir, "metrics.jsonl")
        last = checkpoints.latest_checkpoint(workdir) or 0  # a run cut between log points saved here
        if os.path.exists(metrics):
            with open(metrics) as f:
                last = max([last] + [json.loads(line).get("step", 0) for line in f if line.strip()])
        total = (_config(workdir).get("idm") or {}).get("iterations")
        return f"(running: {last:,} of {total:,} it.)" if state == "partial" and total else "—"
    r = results["archs"][_arch(workdir, results)]
    return f"{r['mean']:.2f} ± {r['std']:.2f} ({r.get('num_seeds', len(r['accuracies']))})"


def _paper(dataset: str, method: str, ipc: int) -> str:
    found = results_lib.paper_accuracy(dataset, method, ipc, "ConvNet", partition_factor=PAPER_PARTITION[method])
    return f"{found[0]:.1f} ± {found[1]:.1f}" if found else "—"


def table_markdown(root: str) -> str:
    """Table 1's rows (dataset, IPC) for every cell under root: paper and idm_jax side by side, then
    how each cell was run, then the intermediate evaluations."""
    found = {(m["dataset"], int(m["ipc"]), m["method"]): os.path.join(root, n)
             for n in cells(root) for m in [CELL_NAME.match(n)]}
    rows = list(dict.fromkeys((d, i) for d, i, _ in found))  # cells() is in the order
    lines = ["# Table 1 at the paper's schedule (idm_jax)", "",
             "ConvNet test accuracy (%), mean ± std over the evaluation networks (their count in brackets); "
             "IDM evaluated with partition l = 2, DM and Random with l = 1, as in the paper.", "",
             "| dataset | IPC | paper IDM | idm_jax IDM | paper DM | idm_jax DM | paper Random | idm_jax Random |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset, ipc in rows:
        values = []
        for method in METHODS:
            wd = found.get((dataset, ipc, method))
            values += [_paper(dataset, method, ipc), _measured(wd) if wd else "—"]
        lines.append(f"| {dataset} | {ipc} | " + " | ".join(values) + " |")
    lines += ["", DATA_CAVEAT, "", "## How each cell ran", "",
              "| cell | state | device | wall time (s, all calls) | calls | date | command |",
              "|---|---|---|---|---|---|---|"]
    for name in cells(root):
        wd = os.path.join(root, name)
        info = _read_json(os.path.join(wd, RUN_INFO)) or {}
        lines.append(f"| {name} | {cell_state(wd)} | {info.get('device', '?')} | {info.get('seconds', '?')} | "
                     f"{len(info.get('calls', []))} | {info.get('date', '?')} | `{info.get('command', '?')}` |")
    curves = [(n, curve_points(os.path.join(root, n))) for n in cells(root)]
    if any(points for _, points in curves):
        lines += ["", "## Accuracy during condensation (eval.interval_epochs epochs, ConvNet)", "",
                  "| cell | iteration: accuracy (%) |", "|---|---|"]
        lines += [f"| {n} | " + ", ".join(f"{it:,}: {acc:.2f}" for it, acc in points) + " |"
                  for n, points in curves if points]
    return "\n".join(lines) + "\n"


def plot_curves(root: str, path: str) -> str | None:
    """Accuracy vs iteration, one panel per (dataset, IPC): IDM and DM's periodic evaluations, their
    final evaluation and the paper's number as stars. None when no cell has a point yet."""
    from idm_jax import plots  # pylint: disable=g-import-not-at-top

    panels = {}
    for name in cells(root):
        m, wd = CELL_NAME.match(name), os.path.join(root, name)
        if m["method"] not in ("idm", "dm"):
            continue
        panel = panels.setdefault((m["dataset"], int(m["ipc"])), {
            "title": f"{m['dataset']} IPC {m['ipc']}", "xlabel": "iteration",
            "ylabel": "ConvNet test accuracy (%)", "series": [], "markers": []})
        points = curve_points(wd)
        color = "C0" if m["method"] == "idm" else "C1"
        if points:
            panel["series"].append({"label": f"idm_jax {m['method'].upper()} (periodic)",
                                    "x": [p[0] for p in points], "y": [p[1] for p in points]})
        results = _read_json(os.path.join(wd, "results.json"))
        if cell_state(wd) == "done":
            r = results["archs"][_arch(wd, results)]
            panel["markers"].append({"label": f"idm_jax {m['method'].upper()} final", "x": results["iterations"],
                                     "y": r["mean"], "color": color})
        paper = results_lib.paper_accuracy(m["dataset"], m["method"], int(m["ipc"]), "ConvNet",
                                      partition_factor=PAPER_PARTITION[m["method"]])
        total = (_config(wd).get("idm") or {}).get("iterations", 20000)
        if paper:
            panel["markers"].append({"label": f"paper {m['method'].upper()}", "x": total, "y": paper[0],
                                     "color": "C3" if m["method"] == "idm" else "C2"})
    panels = [p for p in panels.values() if p["series"] or p["markers"]]
    if not panels:
        return None
    return plots.line_panels(path, panels, title="Accuracy vs condensation iterations")


def pack(root: str, out: str) -> list[str]:
    """out/results.tar.gz: every cell's small files (config, metrics, results, cell.json, log, png)
    and as many finished cells' synthetic.npz as fit in ARCHIVE_BYTES; the other sets in
    out/sets_<k>.tar.gz (at most MAX_SET_ARCHIVES). Never checkpoints or TensorBoard events.
    Returns the cells whose set did not fit."""
    small, sets = [], []
    for name in cells(root):
        wd = os.path.join(root, name)
        for f in sorted(os.listdir(wd)):
            path = os.path.join(wd, f)
            if os.path.isfile(path) and f != "synthetic.npz" and not f.startswith("."):
                small.append((path, f"{name}/{f}"))
        if cell_state(wd) == "done" and os.path.exists(os.path.join(wd, "synthetic.npz")):
            sets.append((os.path.join(wd, "synthetic.npz"), f"{name}/synthetic.npz"))
    archives = [[*small]]
    sizes = [sum(os.path.getsize(p) for p, _ in small)]
    left_out = []
    for path, arcname in sets:
        size = os.path.getsize(path)
        slot = next((i for i, used in enumerate(sizes) if used + size <= ARCHIVE_BYTES), None)
        if slot is None and len(archives) < 1 + MAX_SET_ARCHIVES and size <= ARCHIVE_BYTES:
            archives.append([])
            sizes.append(0)
            slot = len(archives) - 1
        if slot is None:
            left_out.append(arcname.split("/")[0])
            continue
        archives[slot].append((path, arcname))
        sizes[slot] += size
    for i, members in enumerate(archives):
        name = "results.tar.gz" if i == 0 else f"sets_{i + 1}.tar.gz"
        with workdir_lib.atomic_file(os.path.join(out, name)) as f:  # whole or not at all, should a kill come
            with tarfile.open(fileobj=f, mode="w:gz") as tar:
                for path, arcname in members:
                    tar.add(path, arcname=arcname)
    return left_out


# ----------------------------------------------------------------------------------------------
# The device command's loop (paper_cells.sh runs `paper_cells.py cells`), issue 32: what fits first.

ORDER = ("random", "dm", "idm")  # an evaluation only, then DM's cheap iterations, then IDM's
POLL_S = 0.5
KILL_GRACE_S = 25  # a cell told to stop (SIGTERM) saves its checkpoint (the ~250 MB model queue) first


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: str
    ipc: int
    method: str

    @property
    def name(self) -> str:
        return f"{self.dataset}_ipc{self.ipc}_{self.method}"

    @property
    def label(self) -> str:
        return f"{self.dataset} ipc{self.ipc} {self.method}"


def plan(specs: list[str], methods: list[str]) -> list[Cell]:
    """Every Random cell first (an evaluation only), then every DM cell, then IDM's, each over the
    specs ("dataset:ipc") in their order: the cheap cells are never starved by IDM's 20,000 its."""
    unknown = sorted(set(methods) - set(ORDER))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {ORDER}")
    specs = [spec.split(":") for spec in specs]
    return [Cell(dataset, int(ipc), method) for method in ORDER if method in methods for dataset, ipc in specs]


@dataclasses.dataclass(frozen=True)
class Budget:
    """When the cells must end and how a cell's duration is estimated."""

    start: float  # epoch seconds the command started (the log's zero)
    deadline: float  # epoch seconds by which every cell has ended
    min_cell: float  # no cell starts with less left than this
    fixed: float  # seconds a cell needs beside its iterations: start-up, compilation, evaluations
    prefix: int  # iterations timed before the command commits to a condensation cell
    paces: dict  # injected s/it by method ("" = every method), instead of the measured pace

    def left(self) -> float:
        return self.deadline - time.time()

    def pace(self, method: str) -> float | None:
        return self.paces.get(method, self.paces.get(""))


def parse_paces(text: str) -> dict:
    """'0.1' (every condensation cell) or 'idm=0.1,dm=0.02' -> {method or '': s/it}."""
    paces = {}
    for item in filter(None, text.split(",")):
        method, _, value = item.rpartition("=")
        paces[method] = float(value)
    return paces


class Log:
    """timings.txt's lines, '[seconds since the command started] text', also printed."""

    def __init__(self, out: str, start: float):
        self.path, self.start = os.path.join(out, "timings.txt"), start

    def __call__(self, text: str) -> None:
        line = f"[{int(time.time() - self.start)}s] {text}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def has_data(dataset: str) -> bool:
    """The device has no network: CIFAR-100 needs the archive $IDM_CIFAR100 names."""
    path = os.environ.get("IDM_CIFAR100", "")
    return dataset != "cifar100" or bool(path and os.path.exists(path))


def config_file(dataset: str) -> str:
    return "configs/quick.py" if dataset == "digits" else f"configs/{dataset}.py"


def main_args(cell: Cell, workdir: str, curve: str, extra: list[str]) -> list[str]:
    """main.py's flags for a cell: its config's unchanged command, the workdir, the curve's interval."""
    config = f"{config_file(cell.dataset)}:{cell.ipc}"
    if cell.method == "random":
        return [f"--config={config}", "--mode=baseline", "--config.baseline.method=random", f"--workdir={workdir}",
                *extra]
    suffix = ",dm" if cell.method == "dm" else ""
    return [f"--config={config}{suffix}", f"--workdir={workdir}", f"--config.eval.interval={curve}", *extra]


def total_iterations(cell: Cell, extra: list[str]) -> int:
    """The cell's idm.iterations: the command's override, else its config's (20,000 in Table 1)."""
    import importlib.util  # pylint: disable=g-import-not-at-top

    for arg in reversed(extra):
        if arg.startswith("--config.idm.iterations="):
            return int(arg.split("=", 1)[1])
    spec = importlib.util.spec_from_file_location("cell_config", os.path.join(ROOT, config_file(cell.dataset)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.get_config(f"{cell.ipc},dm" if cell.method == "dm" else str(cell.ipc)).idm.iterations)


def progress(workdir: str) -> int:
    """Iterations a cell has done: its newest checkpoint's, where a resumed run starts."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return 0
    return checkpoints.latest_checkpoint(workdir) or 0


def cell_pace(workdir: str) -> float | None:
    """The s/it an earlier call measured for this cell (cell.json), if any."""
    return (_read_json(os.path.join(workdir, RUN_INFO)) or {}).get("s_per_it")


def skip_reason(cell: Cell, its: int, pace: float | None, fixed: float, left: float) -> str | None:
    """The one line saying why `cell` is skipped, or None when its estimate fits in `left` seconds:
    its remaining iterations at `pace` (a Random cell: none) plus the fixed seconds."""
    if cell.method == "random":
        need, why = fixed, f"{fixed:.0f} s fixed (an evaluation)"
    elif pace is None:  # not started yet: the fixed part alone must fit before the pace is timed
        need, why = fixed, f"{its} its at a pace not yet timed + {fixed:.0f} s fixed"
    else:
        need, why = its * pace + fixed, f"{its} its x {pace:.3f} s/it = {its * pace:.0f} s + {fixed:.0f} s fixed"
    return None if need <= left else f"skip {cell.label}: {why} > {left:.0f} s left"


def new_rows(path: str, offset: int) -> list[dict]:
    """metrics.jsonl's complete rows after byte `offset` (those of the run in flight)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def measured_pace(rows: list[dict], start: int) -> tuple[int, int, float | None]:
    """(iterations timed, last iteration logged, s/it) from a run's metrics rows since it started
    at iteration `start`. A row's it_per_s covers the iterations since the row before (the first
    row: since the first iteration, whose compilation it leaves out), evaluations excluded."""
    timed, seconds, last = 0, 0.0, start + 1
    for row in rows:
        step = int(row.get("step", 0))
        if row.get("it_per_s") and step > last:
            timed, seconds, last = timed + step - last, seconds + (step - last) / row["it_per_s"], step
    return timed, last, (seconds / timed if timed else None)


def supervise(cell: Cell, cmd: list[str], workdir: str, budget: Budget, total: int, log) -> tuple[int, float | None]:
    """Runs a cell's command (in a process group of its own) to its end or the deadline; a
    condensation's first budget.prefix iterations are timed, and the run is stopped there (it
    checkpoints, so the prefix is kept for a later call) when its estimate does not fit.
    Returns (return code, the measured s/it or None)."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    offset = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    start, pace, decided = progress(workdir), None, cell.method == "random"
    with open(os.path.join(workdir, "main.log"), "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, process_group=0)
    try:
        while proc.poll() is None:
            if budget.left() <= 0:
                log(f"{cell.name}: stopped at the deadline (checkpointed: a later call resumes)")
                common.end_group(proc, KILL_GRACE_S)
                return 124, pace
            if not decided:
                timed, last, pace = measured_pace(new_rows(metrics, offset), start)
                if timed >= budget.prefix:
                    decided = True
                    reason = skip_reason(cell, total - last, budget.pace(cell.method) or pace, budget.fixed,
                                         budget.left())
                    if reason:
                        log(f"{reason} (timed over {timed} its; stopped with a checkpoint: a later call resumes)")
                        common.end_group(proc, KILL_GRACE_S)
                        return proc.returncode, pace
            time.sleep(POLL_S)
    except BaseException:
        common.end_group(proc, 5)
        raise
    if not decided:  # ended before the prefix was timed: its rows still give a pace
        pace = measured_pace(new_rows(metrics, offset), start)[2]
    return proc.returncode, pace


def report(root: str, out: str) -> None:
    """out/table1.md and out/curve.png, each written whole (a temporary, then a rename)."""
    workdir_lib.atomic_write(os.path.join(out, "table1.md"), table_markdown(root))
    if plot_curves(root, os.path.join(out, "curve.tmp.png")):
        os.replace(os.path.join(out, "curve.tmp.png"), os.path.join(out, "curve.png"))


def publish(root: str, out: str, log) -> None:
    """What comes back, brought up to date: the table, the curve and the archives."""
    report(root, out)
    left_out = pack(root, out)
    if left_out:
        log(f"sets left out (over the size of what comes back; rerun with CELLS set to them): {', '.join(left_out)}")


def run_cells(plan_: list[Cell], root: str, out: str, budget: Budget, device: str, curve: str,
              extra: list[str], log, main: str = "main.py") -> None:
    """Runs the cells in plan order while time is left: a cell whose estimate does not fit is
    skipped with one line saying why; each finished cell's set goes into `out` at once. `main`:
    the script each cell runs (the tests give a stand-in)."""
    no_data = set()
    for cell in plan_:
        if not has_data(cell.dataset):
            if cell.dataset not in no_data:
                log(f"skip {cell.dataset}: no data on this machine (set IDM_CIFAR100 or stage .carry/cifar100*.tar.gz)")
            no_data.add(cell.dataset)
            continue
        workdir = os.path.join(root, cell.name)
        state = cell_state(workdir)
        if state == "done":
            log(f"{cell.name}: done before")
            continue
        left = budget.left()
        if left < budget.min_cell:
            log(f"{cell.name}: not started, {left:.0f}s left (a later call runs it)")
            break
        total = 0 if cell.method == "random" else total_iterations(cell, extra)
        pace, earlier = budget.pace(cell.method), None
        if pace is None and cell.method != "random":
            pace = earlier = cell_pace(workdir)
        reason = skip_reason(cell, total - progress(workdir), pace, budget.fixed, left)
        if reason:
            log(reason + (" (pace measured by an earlier call)" if earlier else ""))
            continue
        args = main_args(cell, workdir, curve, extra)
        command = "python main.py " + " ".join(args)
        record(workdir, command, device)
        log(f"start {cell.name} ({state}, limit {left:.0f}s): {command}")
        t0 = time.time()
        rc, measured = supervise(cell, [sys.executable, main, *args], workdir, budget, total, log)
        record(workdir, command, device, seconds=time.time() - t0, rc=rc, s_per_it=measured)
        state = cell_state(workdir)
        log(f"end {cell.name} rc={rc} ({state})")
        if rc:
            with open(os.path.join(workdir, "main.log"), errors="replace") as f:
                print("".join(f.readlines()[-3:]), end="", flush=True)
        if state == "done":  # its set comes back even if a later cell is cut
            publish(root, out, log)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["state", "record", "report", "pack", "cells"])
    parser.add_argument("--workdir")
    parser.add_argument("--root")
    parser.add_argument("--out")
    parser.add_argument("--command", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rc", type=int, default=None)
    cells_args = parser.add_argument_group("cells (the device command's loop, run by paper_cells.sh)")
    cells_args.add_argument("--cells", default="cifar10:1 cifar10:10 cifar10:50", help="dataset:ipc ...")
    cells_args.add_argument("--methods", default="random dm idm", help="run in the order random, dm, idm")
    cells_args.add_argument("--start", type=float, default=0.0, help="epoch seconds the command started")
    cells_args.add_argument("--deadline", type=float, default=0.0, help="epoch seconds by which cells end")
    cells_args.add_argument("--min-cell", type=float, default=60.0, help="no cell starts with less left")
    cells_args.add_argument("--fixed", type=float, default=120.0,
                            help="seconds a cell needs beside its iterations (start-up, compilation, evaluations)")
    cells_args.add_argument("--prefix", type=int, default=30, help="iterations timed before committing to a cell")
    cells_args.add_argument("--pace", default="", help="s/it instead of the measured pace: 0.1 or idm=0.1,dm=0.02")
    cells_args.add_argument("--curve", default="5000", help="eval.interval of IDM and DM cells")
    cells_args.add_argument("--extra", default="", help="more main.py flags for every cell (the dry run's sizes)")
    args = parser.parse_args(argv)
    if args.action == "state":
        print(cell_state(args.workdir))
    elif args.action == "record":
        record(args.workdir, args.command, args.device, args.seconds, args.rc)
    elif args.action == "report":
        report(args.root, args.out)
    elif args.action == "pack":
        left_out = pack(args.root, args.out)
        if left_out:
            print(f"sets left out (over the size of what comes back; rerun with CELLS set to them): "
                  f"{', '.join(left_out)}")
    else:
        budget = Budget(args.start or time.time(), args.deadline, args.min_cell, args.fixed, args.prefix,
                        parse_paces(args.pace))
        log = Log(args.out, budget.start)
        run_cells(plan(args.cells.split(), args.methods.split()), args.root, args.out, budget, args.device,
                  args.curve, shlex.split(args.extra), log)
        publish(args.root, args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
