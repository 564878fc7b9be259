"""Histograms of rewards and margins as PNG files (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

__all__ = ["histogram_png"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plots need matplotlib, which is not installed: pip install 'endokern[plot]'"
        ) from err
    return Figure, FigureCanvasAgg


def histogram_png(
    path: str,
    series: Dict[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    thresholds: Optional[Dict[str, float]] = None,
    bins: int = 50,
    zero_line: bool = True,
) -> str:
    """Write overlaid, semi-transparent histograms of ``series`` (label -> values; the legend gives each count)
    to the PNG ``path``, with a dashed vertical line per entry of ``thresholds`` (label -> x) and, when
    ``zero_line`` and 0 lies within the values' range, a thin line at 0 (where a margin changes sign). All
    series share the same bins. Values that are not finite are left out (the legend says how many). Draws
    on matplotlib's Agg canvas without touching pyplot's global state. Returns ``path``."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    Figure, FigureCanvasAgg = _matplotlib()
    clean: Dict[str, list] = {}
    dropped: Dict[str, int] = {}
    for label, values in series.items():
        values = [float(v) for v in values]
        clean[label] = [v for v in values if math.isfinite(v)]
        dropped[label] = len(values) - len(clean[label])
    everything = [v for values in clean.values() for v in values]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if everything:
        lo, hi = min(everything), max(everything)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
        for i, (label, values) in enumerate(clean.items()):
            name = f"{label} ({len(values)})" + (f", {dropped[label]} not finite" if dropped[label] else "")
            if values:
                ax.hist(values, bins=edges, alpha=0.5, color=_COLORS[i % len(_COLORS)], label=name,
                        edgecolor=_COLORS[i % len(_COLORS)], linewidth=0.6)
            else:
                ax.plot([], [], color=_COLORS[i % len(_COLORS)], label=name)
        if zero_line and lo <= 0 <= hi:
            ax.axvline(0.0, color="#444444", linewidth=0.8, alpha=0.7)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="#666666")
    for j, (label, x) in enumerate((thresholds or {}).items()):
        if x is not None and math.isfinite(x):
            ax.axvline(float(x), color="#222222", linestyle=("--", ":", "-.")[j % 3], linewidth=1.4,
                       label=f"{label} = {x:.4g}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
