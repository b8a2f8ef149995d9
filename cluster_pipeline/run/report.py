"""report.png: a finished run's curves at a glance, beside its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_report(run_dir: Path, rows: list[dict[str, Any]], labels: np.ndarray | None) -> Path:
    """report.png: NMI(t-1,t) and NMI vs truth per epoch, and the last cluster-size distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [r["epoch"] for r in rows]
    for key, name in (("nmi_prev", "NMI(t-1, t)"), ("nmi_gt", "NMI vs truth")):
        pts = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="NMI", ylim=(0, 1), title="Cluster stability and quality")
    if axes[0].lines:  # runs on fixed targets have no clustering to plot
        axes[0].legend()
    axes[1].plot(epochs, [r["train_loss"] for r in rows], marker="o")
    axes[1].set(xlabel="epoch", ylabel="loss", title="Training loss on pseudo-labels")
    if labels is not None:
        sizes = np.sort(np.bincount(labels[labels >= 0]))[::-1]  # -1: skipped as unreadable
        axes[2].bar(np.arange(len(sizes)), sizes, width=1.0)
        axes[2].set(xlabel="cluster (sorted by size)", ylabel="images", title="Cluster sizes")
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
