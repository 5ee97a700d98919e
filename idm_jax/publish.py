"""Publishing a finished run's synthetic set in the repository: synthetic_sets/<cell>.npz + a README row.

    python -m idm_jax.publish runs/table1/cifar10_ipc10_idm --cell=cifar10_ipc10_idm

The run's workdir must hold synthetic.npz (its config_json says how it was made) and results.json
(the accuracy of its final evaluation). A set is published only when its config says the paper's
20,000 iterations (`--allow_short` writes a shorter one only outside the repository, for tests)
and the published file is at most 10 MB: the run's file is copied byte for byte when it fits, else
rewritten compressed, without the derivable pixel copy `images` if still needed (loading rebuilds
it from `images_normalized`; the values the evaluator trains on are unchanged). The row of
synthetic_sets/README.md for the cell (cell, accuracy, command, date, sha256) is written or
replaced, and the one-line command that evaluates the published set is printed.

Cell names are <dataset>_ipc<images per class>_<method>, e.g. cifar10_ipc10_idm, cifar10_ipc1_dm,
cifar10_ipc50_random; the set must agree with its name. The command and date come from the
workdir's cell.json (written by main.py --mode=table1) unless given.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idm_jax import synthetic_file
from idm_jax import results as results_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(REPO_ROOT, "synthetic_sets")
MAX_BYTES = 10_000_000  # per published file: 10 MB keeps the repository small
PAPER_ITERATIONS = 20000
README = "README.md"
COLUMNS = ("cell", "accuracy (%)", "command", "date", "sha256")
CELL_NAME = re.compile(r"^(?P<dataset>[a-z0-9]+)_ipc(?P<ipc>[1-9][0-9]*)_(?P<method>[a-z0-9]+)$")
RUN_INFO = "cell.json"  # {command, date, device, seconds, variant} of the run, written by --mode=table1
NEW_README = "# Published synthetic sets\n\n" + "| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|\n"


class PublishError(ValueError):
    """A set that must not be published as asked; the message says why."""


def parse_cell(cell: str) -> dict[str, Any]:
    """{dataset, ipc, method} of a cell name, or PublishError naming the expected form."""
    match = CELL_NAME.match(cell)
    if not match:
        raise PublishError(f"bad cell name {cell!r}: expected <dataset>_ipc<images per class>_<method>, "
                           "e.g. cifar10_ipc10_idm")
    return {"dataset": match["dataset"], "ipc": int(match["ipc"]), "method": match["method"]}


def config_iterations(config_json: str) -> int | None:
    """idm.iterations of a set's config_json (synthetic_file.recorded_config), None if absent."""
    value = synthetic_file.recorded_config(config_json).get("idm.iterations")
    return int(value) if isinstance(value, (int, float)) else None


def dataset_key(name: str) -> str:
    """The short dataset name a cell uses: paper key ('cifar10-jpeg' -> 'cifar10') or the name squashed."""
    return results_lib.paper_dataset_key(name) or re.sub(r"[^a-z0-9]", "", os.path.basename(name.lower()))


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_published_file(src: str, dst: str, max_bytes: int | None = None) -> str:
    """Copies the run's npz to `dst` if it fits in max_bytes (None: MAX_BYTES), else a compressed
    rewrite (without the pixel copy `images` if still too big). Returns how: 'copy', 'compressed' or
    'compressed, no pixel copy'."""
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    if os.path.getsize(src) <= max_bytes:
        how, payload = "copy", None
    else:
        arrays = synthetic_file.read_npz(src)
        how, payload = "compressed", _npz_bytes(arrays)
        if len(payload) > max_bytes and "images_normalized" in arrays:
            how, payload = "compressed, no pixel copy", _npz_bytes(
                {k: v for k, v in arrays.items() if k != "images"})
        if len(payload) > max_bytes:
            raise PublishError(f"refusing to publish {src}: {len(payload) / 1e6:.1f} MB even compressed "
                               f"without its pixel copy, over the {max_bytes / 1e6:g} MB limit")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp"
    if payload is None:
        shutil.copyfile(src, tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(payload)
    os.replace(tmp, dst)
    return how


def accuracy_text(results: Mapping[str, Any]) -> str:
    """'mean ± std (n nets)' of the matching network's evaluation (Table 1's ConvNet)."""
    archs = results.get("archs") or {}
    if not archs:
        raise PublishError("results.json has no evaluation (archs is empty): evaluate the set first")
    arch = results.get("train_arch") if results.get("train_arch") in archs else next(iter(archs))
    r = archs[arch]
    return f"{r['mean']:.2f} ± {r['std']:.2f} ({r.get('num_seeds', len(r.get('accuracies', [])))} {arch})"


# ----------------------------------------------------------------------------------------------
# synthetic_sets/README.md: one table, one row per published cell


def _cells_of(line: str) -> list[str]:
    """The cells of a markdown table row; an escaped pipe (\\|) stays inside its cell."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def read_table(readme_path: str) -> dict[str, dict[str, str]]:
    """{cell: {column: text}} of the README's table (rows after the header line, up to a non-row)."""
    lines = open(readme_path).read().splitlines()
    header = _header_index(lines, readme_path)
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        values = _cells_of(line)
        rows[values[0]] = dict(zip(COLUMNS, values))
    return rows


def _header_index(lines: Sequence[str], readme_path: str) -> int:
    for i, line in enumerate(lines):
        if line.startswith("|") and tuple(_cells_of(line)) == COLUMNS:
            return i
    raise PublishError(f"{readme_path} has no table with columns {' | '.join(COLUMNS)}")


def _row_line(row: Mapping[str, str]) -> str:
    return "| " + " | ".join(str(row[c]).replace("|", "\\|") for c in COLUMNS) + " |"


def upsert_row(readme_path: str, row: Mapping[str, str]) -> None:
    """Writes `row` into the README's table: replaces the cell's row, or appends it."""
    if not os.path.exists(readme_path):
        with open(readme_path, "w") as f:
            f.write(NEW_README)
    lines = open(readme_path).read().splitlines()
    end = header = _header_index(lines, readme_path) + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    rows = [line for line in lines[header:end] if _cells_of(line)[0] != row["cell"]] + [_row_line(row)]
    text = "\n".join(lines[:header] + rows + lines[end:]) + "\n"
    with open(readme_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(readme_path + ".tmp", readme_path)


# ----------------------------------------------------------------------------------------------


def _inside_repo(path: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(REPO_ROOT)
    return os.path.commonpath([path, root]) == root


def _run_info(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def evaluate_command(npz_path: str, command: str, cell: str) -> str:
    """The one line that scores a published set with the config of the command that made it."""
    match = re.search(r"--config[= ](\S+)", command)
    config = match[1] if match else f"configs/{parse_cell(cell)['dataset']}.py:{parse_cell(cell)['ipc']}"
    config = config.split(",")[0]  # the method suffix (",dm") changes condensation only
    shown = os.path.relpath(npz_path, REPO_ROOT) if _inside_repo(npz_path) else os.path.abspath(npz_path)
    return f"python main.py --config={config} --mode=evaluate --synthetic={shown} --workdir=runs/eval_{cell}"


def publish(workdir: str, cell: str, dest: str = DEFAULT_DEST, *, allow_short: bool = False,
            command: str | None = None, date: str | None = None) -> dict[str, str]:
    """Publishes workdir's synthetic.npz as dest/<cell>.npz with its README row (see the module
    docstring). Returns the row plus 'evaluate' (the command line) and 'how' (copy / compressed).
    Everything is checked before anything is written."""
    parsed = parse_cell(cell)
    if allow_short and _inside_repo(dest):
        raise PublishError(f"--allow_short publishes only outside the repository (a tmp or test folder), "
                           f"not into {dest}")
    npz, results_path = os.path.join(workdir, "synthetic.npz"), os.path.join(workdir, "results.json")
    for path in (npz, results_path):
        if not os.path.exists(path):
            raise PublishError(f"{path} does not exist: publish a finished run's workdir")
    synset = synthetic_file.load_synthetic(npz, action="publish")
    iterations = config_iterations(synset.config_json)
    if iterations != PAPER_ITERATIONS and not allow_short:
        raise PublishError(f"refusing to publish {npz}: its config says idm.iterations={iterations}, not the "
                           f"paper's {PAPER_ITERATIONS} (--allow_short writes a short set only outside the "
                           "repository)")
    found = {"dataset": dataset_key(synset.dataset), "ipc": synset.ipc, "method": synset.method}
    wrong = {k: v for k, v in found.items() if v != parsed[k]}
    if wrong:
        raise PublishError(f"cell {cell!r} does not match the set in {npz}: it has "
                           + ", ".join(f"{k} {v!r}" for k, v in wrong.items()))
    with open(results_path) as f:
        results = json.load(f)
    if results.get("iterations", iterations) != iterations:
        raise PublishError(f"{results_path} evaluates iteration {results.get('iterations')}, but the set "
                           f"is from iteration {iterations}: evaluate the final set first")
    info = _run_info(workdir)
    command = command or info.get("command")
    if not command:
        raise PublishError(f"no command for {workdir}: pass --command (the exact command that made the run) "
                           f"or write it in {os.path.join(workdir, RUN_INFO)}")
    date = date or info.get("date") or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    accuracy = accuracy_text(results)

    dst = os.path.join(dest, f"{cell}.npz")
    how = write_published_file(npz, dst)
    synthetic_file.load_synthetic(dst, action="publish")  # the published file reads back
    row = {"cell": cell, "accuracy (%)": accuracy, "command": f"`{command}`", "date": date,
           "sha256": sha256_file(dst)}
    upsert_row(os.path.join(dest, README), row)
    return {**row, "how": how, "path": dst, "evaluate": evaluate_command(dst, command, cell)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idm_jax.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a finished run's workdir (synthetic.npz, results.json)")
    parser.add_argument("--cell", required=True, help="<dataset>_ipc<ipc>_<method>, e.g. cifar10_ipc10_idm")
    parser.add_argument("--dest", default=DEFAULT_DEST, help="folder of the published sets and README.md")
    parser.add_argument("--allow_short", action="store_true",
                        help="publish a set of fewer than 20,000 iterations (only outside the repository)")
    parser.add_argument("--command", default=None, help="the command that made the run (default: cell.json)")
    parser.add_argument("--date", default=None, help="the run's date (default: cell.json, else today)")
    args = parser.parse_args(argv)
    try:
        row = publish(args.workdir, args.cell, args.dest, allow_short=args.allow_short, command=args.command,
                      date=args.date)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published {row['path']} ({row['how']}, sha256 {row['sha256']}); {row['accuracy (%)']}")
    print(f"evaluate it: {row['evaluate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
