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
    ax.set_yticks(range(len(sites)), short_site_labels(sites), fontsize=7)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


# diffusers' module names, shortened for plot labels
ABBREVIATIONS = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "attentions": "att",
                 "transformer_blocks": "block", "single_transformer_blocks": "single"}  # fmt: skip


def short_site_labels(names: list[str]) -> list[str]:
    """Labels that tell the sites apart in a plot: the dotted parts every name shares at its start and end left
    out, diffusers' block names abbreviated (``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``up.1.att.0``
    beside the other U-Net sites)."""
    parts = [n.split(".") for n in names]
    head = 0
    while len(parts) > 1 and all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while len(parts) > 1 and all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    head -= int(head > 0 and all(len(p) == head + tail + 1 and p[head].isdigit() for p in parts))  # "block.3", not "3"
    kept = [p[head : len(p) - tail] for p in parts]
    labels = [".".join(ABBREVIATIONS.get(t, t) for t in k) for k in kept]
    return labels if len(set(labels)) == len(labels) else list(names)


def plot_site_bars(values: Mapping[str, float], path: Path, label: str, title: str) -> Path:
    """One horizontal bar per site, labelled with its short name, the value written at the bar's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    labels = short_site_labels(names)
    width = 4.5 + 0.07 * max(map(len, labels))
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.38 * len(names)))
    y = range(len(names))[::-1]  # the first site on top
    bars = ax.barh(list(y), [values[n] for n in names], color="#4477aa")
    ax.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel(label)
    ax.set_title(title, fontsize=10, loc="left")
    ax.margins(x=0.18)
    return _save(fig, path)
