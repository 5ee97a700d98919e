"""Parity bookkeeping in idm_jax's environment: convert the release's snapshots, tabulate, plot.

Pure numpy (matplotlib only for the plot), so the test suite checks every function here on
tiny fake outputs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from idm_jax import synthetic_file

IMPLEMENTATIONS = ("idm_jax", "release")


def release_snapshot_to_synthetic(snapshot_path: str, out_path: str, *, mean, std, class_names,
                                  partition_factor: int, dataset: str) -> str:
    """snap_<budget>.npz from release_side.py (f32[N, C, H, W] normalized) -> idm_jax synthetic.npz."""
    with np.load(snapshot_path, allow_pickle=False) as f:
        images_nchw, labels = f["images_nchw"], f["labels"]
    if images_nchw.ndim != 4:
        raise ValueError(f"{snapshot_path}: images_nchw must be [N, C, H, W], got {images_nchw.shape}")
    images = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
    return synthetic_file.save_synthetic(out_path, images, labels, mean=mean, std=std, class_names=class_names,
                                         partition_factor=partition_factor, method="idm (authors' release)",
                                         dataset=dataset)


def median_iteration_seconds(seconds: list[float]) -> float:
    """Median seconds per iteration; NaN when none were timed."""
    seconds = [s for s in seconds if s > 0]
    return float(np.median(seconds)) if seconds else float("nan")


def accuracy_rows(root: str, budgets: list[int]) -> list[dict[str, Any]]:
    """One row per budget: each implementation's accuracies (idm_jax's evaluator) where measured."""
    rows = []
    for budget in budgets:
        row: dict[str, Any] = {"budget": budget}
        for impl in IMPLEMENTATIONS:
            path = os.path.join(root, "eval", f"{impl}_{budget}", "results.json")
            if os.path.exists(path):
                with open(path) as f:
                    result = json.load(f)["archs"]["ConvNet"]
                row[impl] = {"accuracies": result["accuracies"], "mean": result["mean"], "std": result["std"],
                             "epochs": result["epochs"]}
        rows.append(row)
    return rows


def pooled_rows(roots: list[str], budgets: list[int]) -> list[dict[str, Any]]:
    """Rows over several condensation runs (one root per condensation seed).

    Each implementation's cell holds one accuracy per run (the mean of that run's evaluation
    networks), so its spread, and the standard error of a difference, include the randomness of
    the condensation itself (which real images are drawn), not only that of the evaluation.
    """
    return pool_rows([accuracy_rows(root, budgets) for root in roots])


def pool_rows(per_run: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """pooled_rows from each run's accuracy_rows (same budgets, same order)."""
    rows = []
    for i, first in enumerate(per_run[0]):
        row: dict[str, Any] = {"budget": first["budget"]}
        for impl in IMPLEMENTATIONS:
            runs = [r[i][impl] for r in per_run if impl in r[i]]
            if runs:
                means = [float(np.mean(r["accuracies"])) for r in runs]
                row[impl] = {"accuracies": means, "mean": float(np.mean(means)), "std": float(np.std(means)),
                             "epochs": runs[0]["epochs"], "runs": len(runs),
                             "networks": sum(len(r["accuracies"]) for r in runs)}
        rows.append(row)
    return rows


def pooled_timings(timings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Several runs' timings.json as one: every timed iteration, the largest peak memory."""
    timings = [t for t in timings if t]
    if not timings:
        return None
    return {"iteration_seconds": [s for t in timings for s in t["iteration_seconds"]],
            "peak_rss_gib": max(t["peak_rss_gib"] for t in timings), "runs": len(timings)}


def difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """(mean of a - mean of b, the standard error of that difference from the seeds' spread, ddof 1)."""
    xa, xb = np.asarray(a["accuracies"]), np.asarray(b["accuracies"])
    var = lambda x: float(np.var(x, ddof=1)) if len(x) > 1 else float("nan")
    return float(xa.mean() - xb.mean()), math.sqrt(var(xa) / len(xa) + var(xb) / len(xb))


# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom (standard tables).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def welch_df(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means (NaN below 2 values a side)."""
    xa, xb = np.asarray(a["accuracies"]), np.asarray(b["accuracies"])
    if len(xa) < 2 or len(xb) < 2:
        return float("nan")
    va, vb = np.var(xa, ddof=1) / len(xa), np.var(xb, ddof=1) / len(xb)
    if va + vb == 0:
        return float(len(xa) + len(xb) - 2)
    return float((va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1)))


def t_critical_95(df: float) -> float:
    """Two-sided 95% critical value for `df` degrees of freedom, rounded down (conservative)."""
    if math.isnan(df) or df < 1:
        return float("nan")
    return _T95[int(df) - 1] if df < 31 else 1.96


def verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'yes' when Welch's t-test at 5 % finds no difference, 'NO' when it does, 'n/a' without a spread."""
    d, se = difference(a, b)
    crit = t_critical_95(welch_df(a, b))
    if math.isnan(se) or math.isnan(crit):
        return "n/a"
    return "yes" if abs(d) <= crit * se else "NO"


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "(pending)"
    if "runs" in result:  # pooled: spread over condensation runs, each the mean of its networks
        runs = f"{result['runs']} run" + ("s" if result["runs"] != 1 else "")
        return f"{result['mean']:.2f} ± {result['std']:.2f} ({runs}, {result['networks']} nets)"
    return f"{result['mean']:.2f} ± {result['std']:.2f} ({len(result['accuracies'])})"


def markdown(rows: list[dict[str, Any]], timings: dict[str, dict[str, Any]],
             cross_check: dict[str, Any] | None, header: str) -> str:
    """The parity table: accuracy per budget for both, their difference, then the timing summary."""
    lines = [header, "",
             "| iterations | idm_jax (%) | release (%) | difference (pp) | same (Welch t, 5 %) |",
             "|---|---|---|---|---|"]
    for row in rows:
        a, b = row.get("idm_jax"), row.get("release")
        if a and b:
            d, se = difference(a, b)
            diff = f"{d:+.2f} ± {se:.2f}"
            ok = verdict(a, b)
        else:
            diff, ok = "—", "—"
        lines.append(f"| {row['budget']} | {_cell(a)} | {_cell(b)} | {diff} | {ok} |")
    lines.append("")
    if any("runs" in row.get(impl, {}) for row in rows for impl in IMPLEMENTATIONS):
        lines.append("Accuracy: mean ± std over condensation runs (different seeds), each run the mean of its "
                     "evaluation networks, all scored by idm_jax's evaluator; difference ± its standard error "
                     "from the runs' spread.")
    else:
        lines.append("Accuracy: mean ± std (number of evaluation networks), all scored by idm_jax's evaluator "
                     "with the same seeds; difference ± its standard error from the seeds' spread.")
    lines.append("Same: Welch's t-test finds no difference at the 5 % level (critical value for the "
                 "Welch-Satterthwaite degrees of freedom, rounded down); n/a: one value on a side, no spread. "
                 "With 2-3 values a side the test only catches large differences.")
    jax_t, rel_t = timings.get("idm_jax"), timings.get("release")
    if jax_t or rel_t:
        lines += ["", "| | idm_jax | release | release / idm_jax |", "|---|---|---|---|"]
        js = median_iteration_seconds(jax_t["iteration_seconds"]) if jax_t else float("nan")
        rs = median_iteration_seconds(rel_t["iteration_seconds"]) if rel_t else float("nan")
        lines.append(f"| median s / iteration | {js:.2f} | {rs:.2f} | {rs / js:.2f}x |")
        jm = jax_t["peak_rss_gib"] if jax_t else float("nan")
        rm = rel_t["peak_rss_gib"] if rel_t else float("nan")
        lines.append(f"| peak resident memory (GiB) | {jm:.2f} | {rm:.2f} | {rm / jm:.2f}x |")
        n_j = len(jax_t["iteration_seconds"]) if jax_t else 0
        n_r = len(rel_t["iteration_seconds"]) if rel_t else 0
        lines.append(f"| iterations timed | {n_j} | {n_r} | |")
        lines.append("")
        lines.append("Each implementation is timed while it runs (the first, compiling iteration of each idm_jax "
                     "call left out); the ratio is a speed figure only when both ran on an otherwise quiet machine.")
    if cross_check:
        lines += ["", f"Evaluator cross-check on {cross_check['set']}: idm_jax's evaluator "
                  f"{_cell(cross_check.get('idm_jax'))}, the release's `evaluate_synset` "
                  f"{_cell(cross_check.get('release'))} (same epochs; different random streams)."]
        if cross_check.get("idm_jax") and cross_check.get("release"):
            d, se = difference(cross_check["idm_jax"], cross_check["release"])
            lines.append(f"Difference {d:+.2f} ± {se:.2f} pp; seconds per training pass of one network: idm_jax "
                         f"{cross_check.get('idm_jax_pass_seconds', float('nan')):.3g}, release "
                         f"{cross_check.get('release_pass_seconds', float('nan')):.3g}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Accuracy vs iterations, both implementations, error bars = std over networks; None if nothing to draw."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    drawn = False
    for impl, marker, offset in (("idm_jax", "o", -0.4), ("release", "s", 0.4)):
        pts = [(r["budget"] + offset, r[impl]["mean"], r[impl]["std"]) for r in rows if impl in r]
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker=marker, capsize=3, label=impl)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("condensation iterations")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path
