"""Figures of the paper's other experiments, drawn with matplotlib (an optional dependency).

matplotlib is imported only inside the plotting functions, so `idm_jax` works without it; a
plot asked for without it fails with `MissingDependency` naming the extra to install
(`pip install "idm_jax[plots]"`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from idm_jax.errors import MissingDependency


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or MissingDependency."""
    try:
        import matplotlib  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise MissingDependency(
            'plotting needs matplotlib, which is not installed: pip install "idm_jax[plots]" '
            '(or pip install "matplotlib>=3.8,<4")') from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def line_panels(path: str, panels: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """One subplot per panel, one line (mean with a ±std band) per series; returns `path`.

    panels: [{title, xlabel, ylabel, series: [{label, x: [..], y: [..], std: [..] (optional)}],
    markers: [{label, x, y}] (optional single points, e.g. the paper's final numbers),
    xticks: [..] (optional), xticklabels: [..] (optional)}].
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, s in enumerate(panel.get("series", [])):
            color = f"C{i}"
            ax.plot(s["x"], s["y"], marker="o", color=color, label=s["label"])
            if s.get("std") is not None:
                lo = [m - d for m, d in zip(s["y"], s["std"])]
                hi = [m + d for m, d in zip(s["y"], s["std"])]
                ax.fill_between(s["x"], lo, hi, color=color, alpha=0.2)
        for i, m in enumerate(panel.get("markers", [])):
            ax.scatter([m["x"]], [m["y"]], marker="*", s=140, color=m.get("color", f"C{i}"),
                       edgecolors="black", zorder=5, label=m["label"])
        if panel.get("xticks") is not None:
            ax.set_xticks(panel["xticks"])
            if panel.get("xticklabels") is not None:
                ax.set_xticklabels(panel["xticklabels"], rotation=panel.get("rotation", 0),
                                   ha="right" if panel.get("rotation") else "center")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def bars(path: str, labels: Sequence[str], means: Sequence[float], stds: Sequence[float], *,
         paper: Sequence[float | None] | None = None, paper_label: str = "paper", title: str = "",
         ylabel: str = "") -> str:
    """A bar per label (mean with a std error bar), the paper's number as a star where known."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels)), 4.0))
    xs = list(range(len(labels)))
    ax.bar(xs, means, yerr=stds, capsize=4, color="C0", label="measured")
    if paper is not None and any(p is not None for p in paper):
        px = [x for x, p in zip(xs, paper) if p is not None]
        py = [p for p in paper if p is not None]
        ax.scatter(px, py, marker="*", s=140, color="C3", edgecolors="black", zorder=5,
                   label=paper_label)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
