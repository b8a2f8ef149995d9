"""report.png says which run it is, counts epochs and clusters in whole numbers, and stays
readable at k=10000."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from cluster_pipeline.run.report import report_figure, write_report

ROWS = [{"epoch": e, "nmi_prev": None if e == 0 else 0.5, "nmi_gt": 0.4, "train_loss": 2.0 - e / 4}
        for e in range(3)]  # fmt: skip


def labels_of(k: int, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, k, size=n)


def bars(ax) -> int:
    return sum(isinstance(p, Rectangle) for p in ax.patches)


def test_title_names_the_run_its_k_arch_and_epochs() -> None:
    fig = report_figure(ROWS, labels_of(20, 500), run_name="digits-0412", k=20,
                        arch="small_cnn", epochs=3)  # fmt: skip
    title = fig._suptitle.get_text()
    for part in ("digits-0412", "k=20", "small_cnn", "3 epochs"):
        assert part in title, title


def test_default_call_still_writes_a_titled_report(tmp_path: Path) -> None:
    out = write_report(tmp_path, ROWS, labels_of(20, 500))
    assert out == tmp_path / "report.png" and out.stat().st_size > 0


def test_epoch_and_cluster_axes_tick_whole_numbers() -> None:
    epoch_loss, _, sizes = report_figure(ROWS, labels_of(20, 500), k=20).axes
    for axis in (epoch_loss.xaxis, sizes.xaxis):
        assert isinstance(axis.get_major_locator(), MaxNLocator)
        ticks = axis.get_ticklocs()
        assert np.array_equal(ticks, np.round(ticks)), ticks


def test_few_clusters_are_one_bar_each() -> None:
    sizes = report_figure(ROWS, labels_of(20, 500), k=20).axes[2]
    assert bars(sizes) == 20 and sizes.get_yscale() == "linear"


def test_ten_thousand_clusters_are_a_log_log_size_curve() -> None:
    sizes = report_figure(ROWS, labels_of(10_000, 60_000), k=10_000).axes[2]
    assert bars(sizes) == 0
    assert sizes.get_xscale() == "log" and sizes.get_yscale() == "log"
