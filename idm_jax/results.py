"""What a run reports: results.json / results.md, and the paper's numbers printed beside them.

`results_record` is the results.json of every mode (what was evaluated, then {arch: result});
`results_markdown` is its table, measured accuracy beside the paper's; `finish_results` writes
both. Files are written atomically (workdir.atomic_file). The paper's numbers live in one data
file, ``idm_jax/paper_results.json``; `paper_accuracy` finds the one for a setting.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from idm_jax import workdir as workdir_lib
from idm_jax import yardstick


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # jax arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _finite(value: Any) -> Any:
    """NaN / inf floats -> None (strict JSON has no NaN), through dicts, lists and tuples."""
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def write_results(workdir: str, results: Mapping[str, Any], name: str = "results.json") -> str:
    """Writes `results` as indented JSON to `workdir`/`name` atomically; returns the path.

    numpy / jax values become plain numbers and lists; NaN and inf become null.
    """
    path = os.path.join(workdir, name)
    plain = json.loads(json.dumps(results, default=_to_json))
    data = json.dumps(_finite(plain), indent=2, allow_nan=False).encode() + b"\n"
    with workdir_lib.atomic_file(path, needed_bytes=len(data)) as f:
        f.write(data)
    return path


@functools.lru_cache(maxsize=1)
def paper_results() -> dict:
    """The paper's numbers (idm_jax/paper_results.json), parsed once."""
    text = importlib.resources.files("idm_jax").joinpath("paper_results.json").read_text()
    return json.loads(text)


def _squash(name: str) -> str:
    name = name.lower()
    name = name.split(":", 1)[1] if name.startswith("tfds:") else name
    name = os.path.basename(name.rstrip("/"))
    name = re.sub(r"\.(tar\.gz|tgz|tar|zip)$", "", name)
    return re.sub(r"[^a-z0-9]", "", name)


def paper_dataset_key(dataset: str) -> str | None:
    """The paper_results.json key of a dataset name ('cifar10', 'tfds:cifar10', 'cifar10-jpeg', ...)."""
    squashed = _squash(dataset)
    for key, entry in paper_results()["datasets"].items():
        if squashed in entry["aliases"]:
            return key
    return None


def paper_accuracy(dataset: str, method: str, ipc: int | None, arch: str, *,
                   partition_factor: int = 2, train_arch: str = "ConvNet"
                   ) -> tuple[float, float, str] | None:
    """The paper's (mean, std, where) for a setting, or None when the paper has no such number.

    dataset: a dataset name; method: idm | dm | random | herding | forgetting | whole;
    ipc: images per class (ignored for whole); arch: evaluation network; partition_factor: the
    l the synthetic set is evaluated with; train_arch: the network it was condensed with.
    """
    paper = paper_results()
    key = paper_dataset_key(dataset)
    if key is None:
        return None
    entry = paper["datasets"][key]
    method = method.lower()
    if method == "whole":
        if arch == entry["arch"]:
            return (*entry["whole"], f"Table 1, {entry['display']}, whole dataset")
        return None
    cross = paper["cross_arch"]
    if (method in ("idm", "dm") and key == cross["dataset"] and ipc == cross["ipc"]
            and partition_factor == cross["partition_factor"]
            and arch in cross[method].get(train_arch, {})):
        mean, std = cross[method][train_arch][arch]
        return mean, std, f"Table 5, {method.upper()} {train_arch} -> {arch}, l=1"
    # Table 1: ConvNet-family evaluation; IDM with partition l=2, everything else without.
    expected_partition = 2 if method == "idm" else 1
    row = entry["table1"].get(method, {}).get(str(ipc))
    if row is None or arch != entry["arch"] or partition_factor != expected_partition:
        return None
    if method in ("idm", "dm") and train_arch != entry["arch"]:
        return None
    return (*row, f"Table 1, {entry['display']} IPC {ipc}")


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """A markdown table of measured accuracy (mean ± std over seeds) beside the paper's number.

    results: {'method', 'dataset', 'ipc', 'partition_factor', 'train_arch', 'archs': {arch:
    {'mean', 'std', 'accuracies', 'epochs', 'train_seconds', ...}}} as written by
    `idm_jax.evaluate_set.run_evaluation` and `idm_jax.baselines.run_baseline`.
    """
    method = str(results.get("method", "?"))
    dataset = str(results.get("dataset", "?"))
    ipc = results.get("ipc")
    partition = int(results.get("partition_factor", 1))
    train_arch = str(results.get("train_arch", "ConvNet"))
    title = f"{method} on {dataset}" + (f", {ipc} image{'s' if ipc != 1 else ''} per class" if ipc else "")
    lines = [f"### {title} (partition l={partition})", "",
             "| eval arch | seeds | epochs | train images | measured acc. (%) | paper (%) | paper setting |",
             "|---|---|---|---|---|---|---|"]
    for arch, r in results.get("archs", {}).items():
        paper = paper_accuracy(dataset, method, ipc, arch, partition_factor=partition,
                               train_arch=train_arch)
        paper_text, where = (_fmt(paper[0], paper[1], 1), paper[2]) if paper else ("—", "—")
        lines.append(f"| {arch} | {r.get('num_seeds', len(r.get('accuracies', [])))} | "
                     f"{r.get('epochs', '?')} | {r.get('num_train_images', '?')} | "
                     f"{_fmt(r['mean'], r['std'], 2)} | {paper_text} | {where} |")
    for arch, r in results.get("random_reference", {}).items():  # eval.compare_random
        paper = paper_accuracy(dataset, "random", ipc, arch, partition_factor=1)
        paper_text, where = (_fmt(paper[0], paper[1], 1), paper[2]) if paper else ("—", "—")
        lines.append(f"| {arch}, Random real images (reference) | {r.get('num_seeds', len(r.get('accuracies', [])))} | "
                     f"{r.get('epochs', '?')} | {r.get('num_train_images', '?')} | "
                     f"{_fmt(r['mean'], r['std'], 2)} | {paper_text} | {where} |")
    if results.get("scores"):  # eval.scores: idm_jax/references.py
        lines += ["", yardstick.scores_markdown(results["scores"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def results_record(*, method: str, dataset: str, ipc: int | None, partition_factor: int, num_images: int,
                   train_arch: str, archs: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The results.json of every mode: what was evaluated, `extra` fields, then {arch: result}.

    ipc: images per class (None for the whole dataset); partition_factor: l of the set's images;
    num_images: stored images; train_arch: the network that condensed (or selected) them;
    archs: `evaluate.evaluate_archs`'s dict; extra: e.g. iterations, synthetic (path).
    """
    return {"method": str(method), "dataset": str(dataset), "ipc": None if ipc is None else int(ipc),
            "partition_factor": int(partition_factor), "num_images": int(num_images),
            "train_arch": str(train_arch), **extra, "archs": dict(archs)}


def write_report(workdir: str, stem: str, record: Mapping[str, Any], markdown: str) -> None:
    """<stem>.json (the record) and <stem>.md (its table) in workdir, both atomically; logs the table."""
    os.makedirs(workdir, exist_ok=True)
    write_results(workdir, record, name=f"{stem}.json")
    data = markdown.encode()
    with workdir_lib.atomic_file(os.path.join(workdir, f"{stem}.md"), needed_bytes=len(data)) as f:
        f.write(data)
    logging.info("%s:\n%s", os.path.join(workdir, f"{stem}.json"), markdown)


def finish_results(workdir: str, results: dict[str, Any]) -> dict[str, Any]:
    """Writes results.json and results.md in workdir and logs the markdown table."""
    write_report(workdir, "results", results, results_markdown(results))
    return results


def combine_runs(run_results: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict over several condensations: every evaluation network of every run.

    The release runs 5 condensations and evaluates each with 5 networks; the paper's mean and
    std are over those 25 networks. Per arch: all accuracies, their mean and std (ddof 0, as
    np.std), num_seeds = networks in all, and each run's own mean in run_means.
    """
    if not run_results:
        raise ValueError("combine_runs needs at least one run's results")
    first = run_results[0]
    archs = {}
    for arch in first["archs"]:
        per_run = [r["archs"][arch] for r in run_results]
        accs = [float(a) for r in per_run for a in r["accuracies"]]
        archs[arch] = {**per_run[0], "accuracies": accs, "mean": float(np.mean(accs)),
                       "std": float(np.std(accs)), "num_seeds": len(accs),
                       "run_means": [float(r["mean"]) for r in per_run],
                       "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in per_run))}
    return {**{k: v for k, v in first.items() if k not in ("archs", "synthetic")}, "runs": len(run_results),
            "synthetic": [r.get("synthetic") for r in run_results], "archs": archs}
