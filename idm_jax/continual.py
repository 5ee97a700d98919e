"""Class-incremental continual learning with a condensed memory (paper Sec. 5.6, Fig. 8).

GDumb protocol (Prabhu et al. 2020) as DM and IDM use it: the classes arrive in `num_steps`
groups in a fixed random order. At each step only the new classes' training images are
available; the memory receives `continual.ipc` images for each new class (condensed by IDM or
DM from those classes alone, or picked at random) and keeps those of earlier classes, so after
step t it holds exactly ipc images of every class seen so far and of no other. A network is
trained from scratch on the whole memory and tested on the test images of all classes seen so
far (its output covers the seen classes only, as GDumb masks unseen ones). Repeated for every
class order; the curve is the mean +- std over orders of each step's accuracy (each accuracy
itself the mean over config.eval.num_seeds networks).

Class orders: order(seed) = np.random.RandomState(seed).permutation(num_classes) for the seeds
in continual.class_order_seeds (default 0, 1, 2, 3, 4); they are written to continual.json.
IDM condenses with the config's hyperparameters (use the CIFAR-100 IPC-10 row:
configs/cifar100.py:10) except partition factor continual.partition_factor (the paper: l = 1);
DM with the DM preset; both for continual.iterations per step (0 = idm.iterations).

  python main.py --mode=continual --config=configs/cifar100.py:10 --workdir=runs/continual

Everything a step produces is saved as it finishes (<workdir>/orders/<method>_<n>steps_order<seed>/
step<t>.npz with the new classes' memory, step<t>.json with the accuracy), so a rerun skips the
steps already done.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from idm_jax import condense, coresets, evaluate, models, synthetic_file
from idm_jax import data as data_lib
from idm_jax import presets
from idm_jax import results as results_lib


def class_order(seed: int, num_classes: int) -> np.ndarray:
    """The class order of one repetition: a permutation of range(num_classes) fixed by `seed`."""
    return np.random.RandomState(int(seed)).permutation(num_classes).astype(np.int64)


def split_steps(order: np.ndarray, num_steps: int) -> list[np.ndarray]:
    """The order cut into `num_steps` equal groups of new classes (num_steps must divide it)."""
    n = len(order)
    if isinstance(num_steps, bool) or num_steps < 1 or n % num_steps:
        raise ValueError(f"continual.num_steps={num_steps} must be >= 1 and divide the {n} classes")
    return [np.asarray(g) for g in np.split(np.asarray(order), num_steps)]


def class_subset(ds: data_lib.ArrayDataset, classes: Any) -> data_lib.ArrayDataset:
    """The train and test images of `classes` only, relabelled 0..len(classes)-1 in that order."""
    classes = np.asarray(classes)
    lookup = np.full(ds.num_classes, -1, np.int64)
    lookup[classes] = np.arange(len(classes))
    train = np.isin(ds.train_labels, classes)
    test = np.isin(ds.test_labels, classes)
    return data_lib.ArrayDataset(
        name=ds.name, train_images=ds.train_images[train],
        train_labels=lookup[ds.train_labels[train]].astype(np.int32),
        test_images=ds.test_images[test], test_labels=lookup[ds.test_labels[test]].astype(np.int32),
        class_names=tuple(ds.class_names[c] for c in classes), mean=ds.mean, std=ds.std)


def method_config(config: Any, method: str) -> Any:
    """The condensation config of a continual method: ipc = continual.ipc, IDM with its l, or DM."""
    c = copy.deepcopy(config)
    c.ipc = int(config.continual.ipc)
    if method == "dm":
        presets.apply_method(c, "dm")
    elif method == "idm":
        c.idm.partition_factor = int(config.continual.partition_factor)
    c.idm.iterations = presets.section_iterations(config, "continual")
    return c


def condense_classes(config: Any, ds: data_lib.ArrayDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Condenses every class of `ds` to config.ipc images: (f32[K*ipc, H, W, C] normalized, int32 labels).

    A plain loop over the jitted step (one device, no checkpoints: a continual step is short).
    """
    ready = condense.step_from_config(config, ds, seed)
    state = ready.state
    for _ in range(int(config.idm.iterations)):
        state, _ = ready.step(state, ready.data)
    if int(state.nonfinite_step) >= 0:
        raise RuntimeError(f"the condensation loss became non-finite at iteration {int(state.nonfinite_step)}; "
                           "lower idm.lr_img")
    return condense.synthetic_arrays(state)


def new_class_memory(method: str, config: Any, ds: data_lib.ArrayDataset, classes: np.ndarray,
                     seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Memory for the step's new `classes`: (images f32[len*ipc, H, W, C] normalized, global labels
    int32, partition factor), built only from those classes' training images."""
    sub = class_subset(ds, classes)
    ipc = int(config.continual.ipc)
    if method == "random":
        idx = coresets.select_random(jax.random.PRNGKey(seed), sub.train_labels, sub.num_classes, ipc)
        images = np.asarray(data_lib.normalize(sub.train_images[idx], ds.mean, ds.std), np.float32)
        local, factor = sub.train_labels[idx], 1
    else:
        c = method_config(config, method)
        images, local = condense_classes(c, sub, seed)
        factor = int(c.idm.partition_factor)
    return images, np.asarray(classes)[np.asarray(local)].astype(np.int32), factor


def evaluate_memory(config: Any, ds: data_lib.ArrayDataset, images: np.ndarray, labels: np.ndarray,
                    seen: np.ndarray, partition_factor: int, key: jax.Array) -> dict[str, Any]:
    """Trains config.eval.num_seeds fresh networks (first of eval.archs) on the memory; tests on `seen`."""
    seen_ds = class_subset(ds, seen)
    lookup = np.full(ds.num_classes, -1, np.int64)
    lookup[np.asarray(seen)] = np.arange(len(seen))
    local = lookup[labels]
    if (local < 0).any():
        raise RuntimeError("the memory holds a class that has not been seen")
    arch = models.parse_archs(config.eval.archs)[0]
    return evaluate.evaluate_archs(images, local.astype(np.int32), seen_ds, config.eval, archs=[arch],
                                   key=key, partition_factor=partition_factor)[arch]


def run_order(config: Any, ds: data_lib.ArrayDataset, method: str, num_steps: int, order_seed: int,
              workdir: str) -> list[dict[str, Any]]:
    """One repetition: every step's memory and accuracy (resumable step by step). Returns step records."""
    order = class_order(order_seed, ds.num_classes)
    groups = split_steps(order, num_steps)
    folder = os.path.join(workdir, "orders", f"{method}_{num_steps}steps_order{order_seed}")
    os.makedirs(folder, exist_ok=True)
    mem_images, mem_labels, records = [], [], []
    eval_key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), order_seed)
    for t, new in enumerate(groups):
        seen = np.concatenate(groups[:t + 1])
        npz, record_path = os.path.join(folder, f"step{t}.npz"), os.path.join(folder, f"step{t}.json")
        if os.path.exists(npz):
            saved = synthetic_file.load_synthetic(npz, action="resume")
            images, labels, factor = saved.images_normalized, saved.labels, saved.partition_factor
        else:
            t0 = time.perf_counter()
            images, labels, factor = new_class_memory(method, config, ds, new,
                                                      int(config.seed) + 1000 * order_seed + t)
            synthetic_file.save_synthetic(npz, images, labels, mean=ds.mean, std=ds.std, class_names=ds.class_names,
                                          partition_factor=factor, method=method, dataset=ds.name)
            logging.info("continual %s, %d steps, order %d, step %d: memory for %d new classes in %.1f s",
                         method, num_steps, order_seed, t + 1, len(new), time.perf_counter() - t0)
        mem_images.append(np.asarray(images, np.float32))
        mem_labels.append(np.asarray(labels, np.int32))
        if os.path.exists(record_path):
            with open(record_path) as f:
                records.append(json.load(f))
            continue
        images_all, labels_all = np.concatenate(mem_images), np.concatenate(mem_labels)
        result = evaluate_memory(config, ds, images_all, labels_all, seen, factor,
                                 jax.random.fold_in(eval_key, t))
        counts = np.bincount(labels_all, minlength=ds.num_classes)
        record = {"step": t + 1, "new_classes": new.tolist(), "num_seen": int(len(seen)),
                  "memory_images": int(len(labels_all)), "partition_factor": factor,
                  "memory_class_counts": {int(c): int(counts[c]) for c in np.flatnonzero(counts)},
                  "accuracy": result["mean"], "accuracies": result["accuracies"],
                  "arch": result["arch"], "epochs": result["epochs"]}
        results_lib.write_results(folder, record, name=f"step{t}.json")
        logging.info("continual %s, %d steps, order %d, step %d/%d: %d classes seen, memory %d images, "
                     "accuracy %.2f %%", method, num_steps, order_seed, t + 1, num_steps, len(seen),
                     len(labels_all), result["mean"])
        records.append(record)
    return records


def run_continual(config: Any, workdir: str) -> dict[str, Any]:
    """main.py --mode=continual: every method x step setting x class order; continual.json/.md/.png."""
    from idm_jax import config_check  # pylint: disable=g-import-not-at-top
    config_check.validate(config)  # the continual section included
    methods = presets.name_list(config.continual.methods, "continual.methods", presets.CONTINUAL_METHODS)
    step_settings = presets.int_list(config.continual.num_steps, "continual.num_steps")
    seeds = presets.int_list(config.continual.class_order_seeds, "continual.class_order_seeds")
    ipc = int(config.continual.ipc)
    for m in methods:
        if m != "random":
            config_check.validate(method_config(config, m))
    ds = data_lib.load_config_dataset(config)
    for n in step_settings:
        split_steps(np.arange(ds.num_classes), n)  # fail before any compute
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, Any] = {}
    for n in step_settings:
        results[str(n)] = {}
        for m in methods:
            per_order = [[r["accuracy"] for r in run_order(config, ds, m, n, s, workdir)] for s in seeds]
            acc = np.asarray(per_order, np.float64)
            results[str(n)][m] = {"num_seen": [(t + 1) * ds.num_classes // n for t in range(n)],
                                  "mean": acc.mean(axis=0).tolist(), "std": acc.std(axis=0).tolist(),
                                  "per_order": per_order}
    out = {"dataset": ds.name, "num_classes": ds.num_classes, "ipc": ipc,
           "iterations": presets.section_iterations(config, "continual"),
           "idm_partition_factor": int(config.continual.partition_factor),
           "eval": {"arch": models.parse_archs(config.eval.archs)[0], "epochs": int(config.eval.epochs),
                    "num_seeds": int(config.eval.num_seeds)},
           "class_order_seeds": seeds,
           "class_orders": {str(s): class_order(s, ds.num_classes).tolist() for s in seeds},
           "results": results, "paper": paper_continual(ds.name)}
    results_lib.write_report(workdir, "continual", out, markdown(out))
    plot(os.path.join(workdir, "continual.png"), out)
    return out


def paper_continual(dataset: str) -> dict[str, Any] | None:
    """{'steps': [5, 10], method: [final acc 5 steps, 10 steps]} when `dataset` is the paper's (CIFAR-100)."""
    paper = results_lib.paper_results()["continual"]
    return paper if results_lib.paper_dataset_key(dataset) == paper["dataset"] else None


def _paper_final(paper: dict[str, Any] | None, method: str, num_steps: int) -> float | None:
    if not paper or method not in paper or num_steps not in paper["steps"]:
        return None
    return paper[method][paper["steps"].index(num_steps)]


def markdown(out: dict[str, Any]) -> str:
    lines = [f"### Continual learning on {out['dataset']} (GDumb, {out['ipc']} images per class)", "",
             f"Condensation: {out['iterations']} iterations per step (IDM with l = {out['idm_partition_factor']}); "
             f"evaluation: {out['eval']['arch']}, {out['eval']['num_seeds']} seeds x {out['eval']['epochs']} "
             f"epochs per step; mean ± std over {len(out['class_order_seeds'])} class orders "
             f"(seeds {', '.join(map(str, out['class_order_seeds']))}). Paper: final accuracy, CIFAR-100, "
             "full budget, no std reported.", ""]
    for n, by_method in out["results"].items():
        seen = next(iter(by_method.values()))["num_seen"]
        lines += [f"#### {n} steps", "",
                  "| method | " + " | ".join(f"{s} classes" for s in seen) + " | paper final (%) |",
                  "|---|" + "---|" * len(seen) + "---|"]
        for m, r in by_method.items():
            paper = _paper_final(out["paper"], m, int(n))
            lines.append(f"| {m} | " + " | ".join(f"{a:.2f} ± {d:.2f}" for a, d in zip(r["mean"], r["std"]))
                         + f" | {'—' if paper is None else f'{paper:.1f}'} |")
        lines.append("")
    return "\n".join(lines)


def plot(path: str, out: dict[str, Any]) -> str:
    """continual.png: one panel per step setting, one line per method, the paper's final as stars."""
    from idm_jax import plots  # pylint: disable=g-import-not-at-top
    panels = []
    for n, by_method in out["results"].items():
        series, markers = [], []
        for i, (m, r) in enumerate(by_method.items()):
            series.append({"label": m.upper() if m != "random" else "Random", "x": r["num_seen"],
                           "y": r["mean"], "std": r["std"]})
            paper = _paper_final(out["paper"], m, int(n))
            if paper is not None:
                markers.append({"label": f"paper {m} final", "x": r["num_seen"][-1], "y": paper,
                                "color": f"C{i}"})
        panels.append({"title": f"{n} steps", "xlabel": "classes seen", "ylabel": "test accuracy (%)",
                       "series": series, "markers": markers, "xticks": next(iter(by_method.values()))["num_seen"]})
    return plots.line_panels(path, panels, title=f"Class-incremental {out['dataset']}, "
                                                 f"{out['ipc']} images per class (GDumb)")
