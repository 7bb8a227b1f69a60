"""PNG plots for ``docs/results.md`` (matplotlib, a dev extra: imported only when a plot is drawn).

Each function takes plain data (names, numbers) and a path, draws one figure, and returns the path it wrote.
Colours follow the model type so the same type looks the same in every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bytelm.eval.curves import Curve

KIND_COLORS = {
    "flat": "tab:blue",
    "hierarchical": "tab:orange",
    "mrt5": "tab:green",
    "hf-bytes": "tab:purple",
    "teacher": "tab:gray",
}
_EXTRA = ["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colors_for(kinds: Mapping[str, str]) -> dict[str, str]:
    """``{name: colour}``: by type, with a different shade for a second run of the same type."""
    out, used = {}, set()
    for i, (name, kind) in enumerate(kinds.items()):
        c = KIND_COLORS.get(kind, _EXTRA[i % len(_EXTRA)])
        if c in used:
            c = _EXTRA[i % len(_EXTRA)]
        used.add(c)
        out[name] = c
    return out


def plot_curves(curves: Mapping[str, Curve], kinds: Mapping[str, str], x: str, path: Path) -> Path:
    """Validation bpb against training FLOPs (``x='flops'``) or estimated wall-clock seconds
    (``x='wall'``)."""
    plt = _plt()
    colors = colors_for(kinds)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in curves.items():
        xs = c.flops if x == "flops" else c.wall_s
        if not xs or len(xs) != len(c.bpb):
            continue
        style = "-" if c.flops_exact or x != "flops" else "--"
        ax.plot(xs, c.bpb, style, marker="o", ms=3, color=colors[name], label=f"{name} ({kinds[name]})")
    ax.set_xlabel(
        "training FLOPs" if x == "flops" else "training wall-clock (s, estimated from logged step times)"
    )
    ax.set_ylabel("validation bits per byte")
    if x == "flops":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Validation bpb vs " + ("training compute" if x == "flops" else "training time"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    kinds: Mapping[str, str],
    path: Path,
    ylabel: str,
    title: str,
    hline: float | None = None,
    horizontal: bool = False,
) -> Path:
    """One bar per (group, series): e.g. groups = noise conditions, series = models."""
    import numpy as np

    plt = _plt()
    colors = colors_for(kinds)
    n = max(len(series), 1)
    pos = np.arange(len(groups))
    width = 0.8 / n
    size = (
        (7.0, max(3.5, 0.28 * len(groups) * max(1, n // 2) + 1.5))
        if horizontal
        else (max(6.4, 0.6 * len(groups) * n / 2 + 2), 4.2)
    )
    fig, ax = plt.subplots(figsize=size)
    for i, (name, vals) in enumerate(series.items()):
        off = pos - 0.4 + width * (i + 0.5)
        if horizontal:
            ax.barh(off, vals, height=width, color=colors[name], label=name)
        else:
            ax.bar(off, vals, width=width, color=colors[name], label=name)
    if horizontal:
        ax.set_yticks(pos, groups, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
        if hline is not None:
            ax.axvline(hline, color="k", lw=0.8, ls=":")
    else:
        ax.set_xticks(pos, groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if hline is not None:
            ax.axhline(hline, color="k", lw=0.8, ls=":")
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratios(ratios: Mapping[str, float], path: Path, title: str = "Measured speed ratios") -> Path:
    """Horizontal bars of benchmark ratios (1.0 marked)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.35 * len(ratios) + 1.2)))
    names = list(ratios)
    ax.barh(range(len(names)), [ratios[k] for k in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("ratio")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
