"""Consistency ratio (paper Sec. 5.3, Fig. 4): do synthetic images sit among real images of their class?

For a synthetic image s of class c and a feature network f, take the k real training images
nearest to s in feature space (L2 between f(s) and f(x), the distance the matching loss uses);
its consistency at k is the fraction of those k that belong to class c. The curve is the mean
over all synthetic images, for k = 1..K. `consistency_ratio` is that pure computation on
feature arrays; `run_consistency` (main.py --mode=consistency) trains the feature network on the
real training set, embeds real and synthetic images and draws one curve per synthetic set.

  python main.py --mode=consistency --config=configs/cifar100.py:10 --workdir=runs/fig4 \
      --synthetic="DM=runs/dm/synthetic.npz,IDM=runs/idm/synthetic.npz"

Without --synthetic the sets are condensed first: the cells of the sweep named by
config.consistency.sets ("fig4": DM, DM + model sampling, DM + model sampling + regularization,
all with l = 1) at config.sweep.iterations (0 = idm.iterations). Synthetic sets stored with a
partition factor l > 1 are cut into their l x l pieces first (the images a network trains on).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from idm_jax import augment, config_check, data, measure, models, presets, sweep_table, synthetic_file, trainer
from idm_jax import results as results_lib


def consistency_ratio(syn_features: Any, syn_labels: Any, real_features: Any, real_labels: Any,
                      max_k: int, *, chunk: int = 256) -> np.ndarray:
    """Mean fraction of each synthetic image's k nearest real images that share its class.

    syn_features: f[S, D]; syn_labels: int[S]; real_features: f[R, D]; real_labels: int[R];
    returns f64[max_k], entry k-1 for k neighbours (L2 distance; ties go to the lower real
    index). Raises ValueError when max_k is not in [1, R] or the shapes disagree.
    """
    syn = np.asarray(syn_features, np.float64)
    real = np.asarray(real_features, np.float64)
    syn_labels, real_labels = np.asarray(syn_labels), np.asarray(real_labels)
    if syn.ndim != 2 or real.ndim != 2 or syn.shape[1] != real.shape[1]:
        raise ValueError(f"features must be [S, D] and [R, D] with the same D, got {syn.shape} and {real.shape}")
    if syn_labels.shape != (syn.shape[0],) or real_labels.shape != (real.shape[0],):
        raise ValueError(f"need one label per feature row: {syn_labels.shape} for {syn.shape[0]} synthetic, "
                         f"{real_labels.shape} for {real.shape[0]} real")
    if isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or not 1 <= max_k <= real.shape[0]:
        raise ValueError(f"max_k must be an integer in [1, {real.shape[0]}] (the real images), got {max_k!r}")
    real_sq = np.sum(real ** 2, axis=1)
    hits = np.zeros(max_k, np.float64)
    for start in range(0, syn.shape[0], chunk):
        s = syn[start:start + chunk]
        dist = np.sum(s ** 2, axis=1, keepdims=True) + real_sq[None] - 2.0 * s @ real.T
        # A stable sort: among equal distances the lower real index comes first.
        order = np.argsort(np.maximum(dist, 0.0), axis=1, kind="stable")[:, :max_k]
        same = real_labels[order] == syn_labels[start:start + chunk, None]
        hits += np.cumsum(same, axis=1).sum(axis=0)
    return hits / (np.arange(1, max_k + 1) * syn.shape[0])


def parse_sets(text: str) -> dict[str, str]:
    """'DM=a.npz,IDM=b.npz' (or 'a.npz,b.npz', named by file) -> {name: path}; paths checked."""
    sets: dict[str, str] = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, path = part.split("=", 1) if "=" in part else (None, part)
        path = os.path.expanduser(path.strip())
        if not os.path.exists(path):
            raise FileNotFoundError(f"synthetic set {path!r} does not exist")
        name = (name or os.path.basename(os.path.dirname(os.path.abspath(path))) or path).strip()
        if name in sets:
            raise ValueError(f"two synthetic sets are named {name!r}; name them: NAME=PATH,...")
        sets[name] = path
    if not sets:
        raise ValueError(f"no synthetic set in {text!r}; expected NAME=PATH[,NAME=PATH...]")
    return sets


def feature_network(config: Any, dataset: Any, key: jax.Array) -> tuple[Any, Any, dict[str, Any]]:
    """config.model trained on the whole real training set for consistency.feature_epochs epochs.

    Returns (model, variables of the one network, description dict naming it).
    """
    epochs = int(config.consistency.feature_epochs)
    model = models.get_model(config.model, dataset.num_classes, dataset.channels)
    nets = trainer.train_networks(
        model, dataset.train_images, dataset.train_labels, key=key, num_seeds=1, epochs=epochs,
        batch_size=int(config.eval.batch_size), lr=float(config.eval.lr),
        momentum=float(config.eval.momentum), weight_decay=float(config.eval.weight_decay),
        dsa_strategy="", mean=dataset.mean, std=dataset.std, loop=str(config.eval.loop),
        schedule="paper", name=f"{config.model} (consistency features)")
    test_acc = measure.measure_accuracy(model, nets.variables, dataset.test_images, dataset.test_labels,
                                         mean=dataset.mean, std=dataset.std,
                                         test_batch_size=int(config.eval.test_batch_size))
    info = {"arch": str(config.model), "epochs": epochs, "trained_on": f"{dataset.name} train split (real, "
            f"{len(dataset.train_labels)} images, no augmentation)",
            "train_accuracy": float(nets.train_accuracy[0]), "test_accuracy": float(test_acc[0]),
            "seconds": float(nets.seconds)}
    info["name"] = (f"{info['arch']} trained {epochs} epochs on the real {dataset.name} training set "
                    f"(test acc. {info['test_accuracy']:.1f} %)")
    return model, jax.tree.map(lambda a: a[0], nets.variables), info


def synthetic_features(model, variables, path: str, dataset: Any) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features f32[S, D] and labels of a synthetic.npz (cut into its l x l pieces), plus facts."""
    synset = synthetic_file.load_synthetic(path, action="evaluate")
    synthetic_file.check_compatible(synset, dataset)
    images = data.renormalize(synset.images_normalized, synset.mean, synset.std, dataset.mean, dataset.std)
    labels = np.asarray(synset.labels)
    if synset.partition_factor > 1:
        images, labels = augment.partition_expand(jnp.asarray(images), jnp.asarray(labels), synset.partition_factor)
        images, labels = np.asarray(images), np.asarray(labels)
    # Already normalized: embed with mean 0, std 1.
    zeros, ones = np.zeros(dataset.channels, np.float32), np.ones(dataset.channels, np.float32)
    feats = measure.embed_images(model, variables, images, mean=zeros, std=ones)
    return feats, labels, {"method": synset.method, "partition_factor": synset.partition_factor,
                           "num_images": int(labels.shape[0]), "path": os.path.abspath(path)}


def run_consistency(config: Any, workdir: str, synthetic: str | dict[str, str] | None = None) -> dict[str, Any]:
    """main.py --mode=consistency: curves for several synthetic sets; writes consistency.json/.md/.png."""
    from idm_jax import sweeps  # pylint: disable=g-import-not-at-top
    config_check.validate(config)  # consistency.max_k >= 1 among them
    max_k = int(config.consistency.max_k)
    os.makedirs(workdir, exist_ok=True)
    if synthetic:
        sets = parse_sets(synthetic) if isinstance(synthetic, str) else dict(synthetic)
        condensed = None
    else:
        sweep_name = str(config.consistency.sets)
        sweep = sweep_table.get_sweep(sweep_name)
        budget = presets.section_iterations(config, "sweep")
        sets, condensed = {}, {"sweep": sweep_name, "iterations": budget}
        for cell in sweep_table.selected_cells(sweep, config.sweep.cells):
            out = sweeps.run_cell(config, os.path.join(workdir, "sets"), cell, sweep["cells"][cell],
                                  iterations=budget, evaluate_at_end=False)
            if out["interrupted"]:
                logging.warning("stopped while condensing %r; rerun the same command to resume", cell)
                return {"interrupted": True, "cell": cell}
            sets[cell] = out["synthetic"]
    dataset = data.load_config_dataset(config)
    if max_k > len(dataset.train_labels):
        raise ValueError(f"consistency.max_k={max_k} exceeds the {len(dataset.train_labels)} real images")
    model, variables, net_info = feature_network(config, dataset, jax.random.PRNGKey(int(config.seed)))
    real = measure.embed_images(model, variables, dataset.train_images, mean=dataset.mean, std=dataset.std)
    curves = {}
    for name, path in sets.items():
        feats, labels, info = synthetic_features(model, variables, path, dataset)
        ratio = consistency_ratio(feats, labels, real, dataset.train_labels, max_k)
        curves[name] = {**info, "ratio": ratio.tolist()}
        logging.info("consistency of %s: k=1 %.3f, k=%d %.3f", name, ratio[0], max_k, ratio[-1])
    result = {"dataset": dataset.name, "max_k": max_k, "feature_network": net_info,
              "condensed": condensed, "sets": curves}
    results_lib.write_report(workdir, "consistency", result, markdown(result))
    plot(os.path.join(workdir, "consistency.png"), result)
    return result


def _ks(max_k: int) -> list[int]:
    return sorted({k for k in (1, 5, 10, 20, 50, 100, max_k) if k <= max_k})


def markdown(result: dict[str, Any]) -> str:
    ks = _ks(result["max_k"])
    lines = [f"### Consistency ratio on {result['dataset']}", "",
             f"Feature network: {result['feature_network']['name']}.", "",
             "| synthetic set | images | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for name, c in result["sets"].items():
        lines.append(f"| {name} | {c['num_images']} | " + " | ".join(f"{c['ratio'][k - 1]:.3f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def plot(path: str, result: dict[str, Any]) -> str:
    from idm_jax import plots  # pylint: disable=g-import-not-at-top
    ks = list(range(1, result["max_k"] + 1))
    panel = {"title": f"feature net: {result['feature_network']['name']}", "xlabel": "k nearest real images",
             "ylabel": "consistency ratio",
             "series": [{"label": name, "x": ks, "y": c["ratio"]} for name, c in result["sets"].items()]}
    return plots.line_panels(path, [panel], title=f"Consistency ratio, {result['dataset']}")
