"""The figures of `attune eval`: the Pareto plot (empathy vs safety win rate, ours with intervals beside the
paper's rows; labels placed so that none overlaps another label or a point) and the steering heatmap
(adapters x objectives, gain over base with its interval)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

# Candidate label offsets (points from the marker), nearest first: a label moves out only as far as it must.
_RADII = (7, 14, 22, 32, 44, 58, 74, 92)
_ANGLES = tuple(range(0, 360, 30))


def _offsets():
    for r in _RADII:
        for a in _ANGLES:
            yield r * math.cos(math.radians(a)), r * math.sin(math.radians(a))


def place_labels(ax, xs: list[float], ys: list[float], labels: list[str], colors: list[str] | None = None,
                 fontsize: float = 7, marker_pt: float = 4) -> list[Bbox]:
    """Annotate each point with its label at the nearest offset where the label overlaps no placed label, no
    marker and stays inside the axes (greedy, in the given order); labels moved away get a leader line. Returns
    the labels' display-space boxes."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(list(zip(xs, ys)))
    pad = marker_pt * to_px
    markers = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in pts]
    placed: list[Bbox] = []
    for i, (x, y, text) in enumerate(zip(xs, ys, labels)):
        style = {"textcoords": "offset points", "fontsize": fontsize, "color": colors[i] if colors else "black",
                 "va": "center", "zorder": 5, "bbox": {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                                                       "alpha": 0.85}}
        ann = ax.annotate(text, (x, y), xytext=(0, 0), **style)
        best, best_cost = None, math.inf
        for dx, dy in _offsets():
            ann.xyann = (dx, dy)
            ann.set_ha("left" if dx > 1e-9 else "right" if dx < -1e-9 else "center")
            box = ann.get_window_extent(renderer).expanded(1.04, 1.1)
            cost = (sum(box.overlaps(b) for b in placed) + sum(box.overlaps(m) for m in markers)
                    + 10 * (not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1))))
            if cost == 0:
                best = (dx, dy, ann.get_ha(), box)
                break
            if cost < best_cost:
                best, best_cost = (dx, dy, ann.get_ha(), box), cost
        dx, dy, ha, box = best
        ann.xyann = (dx, dy)
        ann.set_ha(ha)
        if math.hypot(dx, dy) > _RADII[0]:
            ann.remove()
            ax.annotate(text, (x, y), xytext=(dx, dy), ha=ha, **style,
                        arrowprops={"arrowstyle": "-", "color": "0.35", "lw": 0.6, "shrinkA": 0, "shrinkB": 2})
        placed.append(box)
    return placed


def pareto_plot(points: dict[str, dict], paper: dict[str, tuple[float, float]], path: Path) -> list[Bbox]:
    """`points`: {model: {"x", "y", "x_ci": (lo, hi), "y_ci": (lo, hi)}} empathy / safety win rates (%)."""
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.axhline(50, color="0.85", lw=0.8, zorder=0)
    ax.axvline(50, color="0.85", lw=0.8, zorder=0)
    xs, ys, labels, colors = [], [], [], []
    for name, p in points.items():
        color = "black" if name == "base" else "tab:red" if name.startswith("modpo") else "tab:blue"
        xerr = [[p["x"] - p["x_ci"][0]], [p["x_ci"][1] - p["x"]]] if "x_ci" in p else None
        yerr = [[p["y"] - p["y_ci"][0]], [p["y_ci"][1] - p["y"]]] if "y_ci" in p else None
        ax.errorbar(p["x"], p["y"], xerr=xerr, yerr=yerr, fmt="none", ecolor=color,
                    elinewidth=0.6, alpha=0.35, capsize=0, zorder=2)
        ax.plot(p["x"], p["y"], "o", ms=4, color=color, zorder=4)
        xs.append(p["x"]), ys.append(p["y"]), labels.append(name), colors.append(color)
    for name, (x, y) in paper.items():
        ax.scatter(x, y, marker="x", color="0.45", zorder=3)
        xs.append(x), ys.append(y), labels.append(f"paper: {name}"), colors.append("0.4")
    ax.set_xlabel("empathy win rate vs base (%)")
    ax.set_ylabel("safety win rate vs base (%)")
    ax.set_title("Empathy vs safety win rate over base, 95% bootstrap intervals\n"
                 "(red: MODPO, blue: other methods, black: base = 50/50 by construction; x: the paper's rows)",
                 fontsize=9)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    boxes = place_labels(ax, xs, ys, labels, colors)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return boxes


_SHORT = {"active_listening": "active\nlistening", "self_motivated_change": "self-motivated\nchange",
          "trust_rapport": "trust /\nrapport", "patient_autonomy": "patient\nautonomy"}


def steering_heatmap(matrix: dict, path: Path, emphasis: dict[str, str] | None = None) -> None:
    """`matrix` as evals.stats.steering_matrix returns it; cells whose interval excludes 0 are bold and
    each emphasised adapter's own objective is outlined."""
    import numpy as np

    rows, cols = matrix["adapters"], matrix["objectives"]
    gain, low, high = (np.asarray(matrix[k], dtype=float).reshape(len(rows), len(cols)) for k in ("gain", "low", "high"))
    vmax = max(float(np.nanmax(np.abs(gain))) if gain.size else 0.0, 0.05)
    fig, ax = plt.subplots(figsize=(1.45 * len(cols) + 2.8, 0.55 * len(rows) + 1.9))
    im = ax.imshow(gain, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), [_SHORT.get(c, c) for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.xaxis.tick_top()
    for i in range(len(rows)):
        for j in range(len(cols)):
            sig = low[i, j] > 0 or high[i, j] < 0
            ax.text(j, i, f"{gain[i, j]:+.2f}\n[{low[i, j]:+.2f}, {high[i, j]:+.2f}]", ha="center", va="center",
                    fontsize=6.5, fontweight="bold" if sig else "normal",
                    color="white" if abs(gain[i, j]) > 0.6 * vmax else "black")
    for o, name in (emphasis or {}).items():
        if name in rows and o in cols:
            ax.add_patch(plt.Rectangle((cols.index(o) - 0.5, rows.index(name) - 0.5), 1, 1, fill=False,
                                       edgecolor="black", lw=1.8))
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("judge score gain over base (1-5 scale)", fontsize=8)
    ax.set_title("Steering matrix: mean gain over base per objective [95% paired bootstrap interval]\n"
                 "bold: interval excludes 0; outlined: the adapter's emphasised objective", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
