"""report.png: a finished run's curves at a glance, beside its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Above this many clusters one bar per cluster is a solid block (k=10000 on 1350 pixels): the
# sizes are drawn sorted on log-log axes instead, where a long tail of tiny clusters shows.
MAX_BARS = 100


def write_report(
    run_dir: Path,
    rows: list[dict[str, Any]],
    labels: np.ndarray | None,
    *,
    run_name: str | None = None,
    k: int | None = None,
    arch: str | None = None,
    epochs: int | None = None,
) -> Path:
    """report.png in run_dir: the figure of `report_figure`, titled by default with the run
    directory's name and the number of epochs in `rows`."""
    fig = report_figure(rows, labels, run_name=run_name or run_dir.name, k=k, arch=arch,
                        epochs=epochs)  # fmt: skip
    out = run_dir / "report.png"
    fig.savefig(out, dpi=90)
    return out


def report_figure(
    rows: list[dict[str, Any]],
    labels: np.ndarray | None,
    *,
    run_name: str | None = None,
    k: int | None = None,
    arch: str | None = None,
    epochs: int | None = None,
) -> Figure:
    """NMI(t-1,t) and NMI vs truth per epoch, the training loss, and the last cluster sizes,
    under a title that says which run this is (reports are compared side by side)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure to close, no backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    epochs_run = [r["epoch"] for r in rows]
    for key, name in (("nmi_prev", "NMI(t-1, t)"), ("nmi_gt", "NMI vs truth")):
        pts = [(e, r[key]) for e, r in zip(epochs_run, rows, strict=True) if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="NMI", ylim=(0, 1), title="Cluster stability and quality")
    if axes[0].lines:  # runs on fixed targets have no clustering to plot
        axes[0].legend()
    axes[1].plot(epochs_run, [r["train_loss"] for r in rows], marker="o")
    axes[1].set(xlabel="epoch", ylabel="loss", title="Training loss on pseudo-labels")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if labels is not None:
        # -1: skipped as unreadable; minlength: clusters left empty count too
        sizes = np.sort(np.bincount(labels[labels >= 0], minlength=k or 0))[::-1]
        plot_cluster_sizes(axes[2], sizes)
    if epochs is None:
        epochs = len(rows)
    about = [run_name, arch, None if k is None else f"k={k}", f"{epochs} epochs"]
    fig.suptitle("  ·  ".join(a for a in about if a))
    fig.tight_layout()
    return fig


def plot_cluster_sizes(ax: Axes, sizes: np.ndarray) -> None:
    """One bar per cluster, largest first; log-log for more than MAX_BARS clusters."""
    from matplotlib.ticker import MaxNLocator

    empty = int((sizes == 0).sum())  # not on log axes: say how many
    title = f"Cluster sizes ({len(sizes)} clusters{f', {empty} empty' if empty else ''})"
    if len(sizes) > MAX_BARS:
        ranks = np.arange(1, len(sizes) + 1)
        ax.loglog(ranks[sizes > 0], sizes[sizes > 0], drawstyle="steps-post")
        ax.set(xlabel="cluster rank (by size, log)", ylabel="images (log)", title=title)
        return
    ax.bar(np.arange(len(sizes)), sizes, width=1.0)
    ax.set(xlabel="cluster (sorted by size)", ylabel="images", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
