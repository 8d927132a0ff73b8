"""evals/plots.py: both figures render from synthetic figures, and no two Pareto labels overlap even when
the points crowd together (as our adapters do around 50/50)."""
from __future__ import annotations

import numpy as np

from alignment.objectives import OBJECTIVES
from evals import plots, stats
from evals.alignment_report import PAPER

NAMES = ["base", "sft", "dpo-empathy", "dpo-safety", "joint-dpo-empathy-safety", "soup-empathy-safety",
         "modpo-empathy-safety", "modpo-balanced", "modpo-empathy", "modpo-safety", "modpo-listening",
         "modpo-change", "modpo-rapport", "modpo-autonomy"]


def _crowded_points():
    rng = np.random.default_rng(0)
    pts = {}
    for name in NAMES:
        x, y = (50.0, 50.0) if name == "base" else tuple(rng.uniform(45, 62, size=2))
        pts[name] = {"x": x, "y": y, "x_ci": (x - 9, x + 9), "y_ci": (y - 9, y + 9)}
    return pts


def test_pareto_plot_labels_do_not_overlap(tmp_path):
    path = tmp_path / "pareto.png"
    boxes = plots.pareto_plot(_crowded_points(), PAPER, path)
    assert path.stat().st_size > 10_000
    assert len(boxes) == len(NAMES) + len(PAPER)
    clashes = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert clashes == []


def test_steering_heatmap_renders(tmp_path):
    rng = np.random.default_rng(1)
    judged = {n: 3 + rng.normal(0, 0.4, size=(60, 6)) for n in NAMES}
    judged["modpo-empathy"][:, 0] += 0.4
    m = stats.steering_matrix(stats.compare(judged), list(OBJECTIVES))
    path = tmp_path / "steering.png"
    plots.steering_heatmap(m, path, {"empathy": "modpo-empathy", "safety": "modpo-safety"})
    assert path.stat().st_size > 10_000
