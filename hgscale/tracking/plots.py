"""Curves shared by the end-of-run plot (Tracker) and the comparison report (hgscale.tracking.report)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def series(history) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) sorted by step from MLflow Metric objects or (step, value) pairs; last value per step wins."""
    by_step = {}
    for m in history:
        step, value = (m.step, m.value) if hasattr(m, "step") else (m[0], m[1])
        by_step[int(step)] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def at_steps(x_steps: np.ndarray, x_values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The x quantity (cumulative FLOPs, elapsed seconds) at ``steps``, interpolated linearly between the steps
    it was logged at (both grow monotonically with the step)."""
    if len(x_steps) == 0:
        return np.full(len(steps), np.nan)
    if len(x_steps) == 1:
        # one point: scale by the step (FLOPs and time are proportional to steps at a fixed batch)
        return x_values[0] * steps / max(int(x_steps[0]), 1)
    return np.interp(steps, x_steps, x_values)


def plot_panels(panels: list[dict], path: str | Path, title: str = "") -> Path:
    """One PNG with side-by-side panels; each panel ``{"curves": [(label, xs, ys)], "xlabel", "ylabel", "logx"}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, xs, ys in panel["curves"]:
            xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
            ok = np.isfinite(xs) & np.isfinite(ys)
            if ok.any():
                ax.plot(xs[ok], ys[ok], marker="o" if ok.sum() < 30 else None, markersize=3, label=label)
        if panel.get("logx"):
            ax.set_xscale("log")
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(True, alpha=0.3)
        if any(len(c[1]) for c in panel["curves"]):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
