"""Plots of one value per attention site, or per (site, head): learned map weights and the layer analysis."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stableseg_pp.backbones.base import parse_map_id
from stableseg_pp.runtime.atomic import atomic_save


def site_head_matrix(values: Mapping[str, float]) -> tuple[list[str], int, np.ndarray]:
    """Per-head values keyed by head map id -> (sites in first-seen order, heads, (sites, heads) matrix; NaN = none)."""
    sites: dict[str, dict[int, float]] = {}
    for map_id, v in values.items():
        site, head = parse_map_id(map_id)
        if head is None:
            raise ValueError(f"{map_id!r} is not a per-head map id")
        sites.setdefault(site, {})[head] = float(v)
    heads = 1 + max(h for row in sites.values() for h in row)
    matrix = np.full((len(sites), heads), np.nan)
    for i, row in enumerate(sites.values()):
        for h, v in row.items():
            matrix[i, h] = v
    return list(sites), heads, matrix


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_save(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path


def plot_site_heads(
    values: Mapping[str, float],
    path: Path,
    label: str,
    title: str,
    fmt: str = "{:.2f}",
    site_values: Mapping[str, float] | None = None,
) -> Path:
    """A site x head heat map (colour = value, written in each cell); ``site_values`` (site id -> value, e.g. of
    its head-mean map) adds a last column "mean"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites, heads, matrix = site_head_matrix(values)
    columns = [f"head {h}" for h in range(heads)]
    if site_values is not None:
        matrix = np.concatenate([matrix, [[site_values.get(s, np.nan)] for s in sites]], axis=1)
        columns.append("mean")
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(columns), 1.2 + 0.32 * len(sites)))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    for i in range(len(sites)):
        for h in range(len(columns)):
            if not np.isnan(matrix[i, h]):
                dark = image.norm(matrix[i, h]) < 0.6  # white on the dark colours, black on the bright ones
                color = "white" if dark else "black"
                ax.text(h, i, fmt.format(matrix[i, h]), ha="center", va="center", fontsize=6, color=color)
    if site_values is not None:
        ax.axvline(heads - 0.5, color="white", linewidth=2)
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(sites)), sites, fontsize=6)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_site_bars(values: Mapping[str, float], path: Path, label: str, title: str) -> Path:
    """One bar per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3.2))
    ax.bar(range(len(names)), [values[n] for n in names], color="#4477aa")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(title)
    return _save(fig, path)
