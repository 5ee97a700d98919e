"""Helpers of benchmarks/paper_cells.sh: a cell's state and run record, Table 1, the curve, packing.

    python benchmarks/paper_cells.py state  --workdir=W                 # prints new | partial | done
    python benchmarks/paper_cells.py record --workdir=W --command=C --device=D [--seconds=S --rc=R]
    python benchmarks/paper_cells.py report --root=R --out=O            # O/table1.md, O/curve.png
    python benchmarks/paper_cells.py pack   --root=R --out=O            # O/results.tar.gz (+ sets_<k>.tar.gz)

A cell is one workdir under ROOT named <dataset>_ipc<ipc>_<method> (idm, dm: condensation runs;
random: the coreset baseline). Its cell.json records the command, device, date and the wall
seconds of every call that worked on it (a cell cut by a time limit resumes in the next call).
Only numpy and the standard library here (matplotlib for the curve), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from idm_jax import checkpoints  # noqa: E402
from idm_jax import export  # noqa: E402
from idm_jax.publish import CELL_NAME, RUN_INFO  # noqa: E402

METHODS = ("idm", "dm", "random")
PAPER_PARTITION = {"idm": 2, "dm": 1, "random": 1}  # Table 1's l of each method
ARCHIVE_BYTES = 15 * 2**20  # a device run brings back files of at most 16 MiB
MAX_SET_ARCHIVES = 3  # 8 files come back: table1.md, curve.png, timings.txt, devices.txt, results.tar.gz, 3 more
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


def record(workdir: str, command: str, device: str, seconds: float | None = None, rc: int | None = None) -> dict:
    """Starts (no seconds) or closes (seconds, rc) one call's entry in workdir/cell.json."""
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
    info["seconds"] = round(sum(c.get("seconds", 0.0) for c in info["calls"]), 1)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)
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
    found = export.paper_accuracy(dataset, method, ipc, "ConvNet", partition_factor=PAPER_PARTITION[method])
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
        paper = export.paper_accuracy(m["dataset"], m["method"], int(m["ipc"]), "ConvNet",
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
        with tarfile.open(os.path.join(out, name), "w:gz") as tar:
            for path, arcname in members:
                tar.add(path, arcname=arcname)
    return left_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["state", "record", "report", "pack"])
    parser.add_argument("--workdir")
    parser.add_argument("--root")
    parser.add_argument("--out")
    parser.add_argument("--command", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rc", type=int, default=None)
    args = parser.parse_args(argv)
    if args.action == "state":
        print(cell_state(args.workdir))
    elif args.action == "record":
        record(args.workdir, args.command, args.device, args.seconds, args.rc)
    elif args.action == "report":
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table1.md"), "w") as f:
            f.write(table_markdown(args.root))
        plot_curves(args.root, os.path.join(args.out, "curve.png"))
    else:
        left_out = pack(args.root, args.out)
        if left_out:
            print(f"sets left out (over the size of what comes back; rerun with CELLS set to them): "
                  f"{', '.join(left_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
