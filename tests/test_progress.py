"""Progress on rank 0: a tqdm bar on a terminal, plain log lines when stdout or stderr is a file
(no \\r or ANSI codes in a log), and nothing, no thread either, when not shown."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading

import pytest

from cluster_pipeline.run.logs import progress

LINE = re.compile(r"^train 3: (\d)/4 batches \((\d+)%\), [\d.]+ batch/s, (eta \d+|done in \S+) s$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def redirected(monkeypatch: pytest.MonkeyPatch) -> tuple[io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    return out, err


def test_redirected_output_gets_no_bar_and_no_thread(
    redirected: tuple[io.StringIO, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster_pipeline")
    threads = threading.active_count()
    seen = [(item, threading.active_count()) for item in progress(list(range(4)), "train 3", True)]
    assert seen == [(i, threads) for i in range(4)]
    for stream in redirected:
        assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue(), stream.getvalue()
    assert [LINE.match(r.getMessage()) is not None for r in caplog.records] == [True]  # the end


def test_a_line_every_interval_with_count_rate_and_eta(
    redirected: tuple[io.StringIO, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster_pipeline")
    assert list(progress(list(range(4)), "train 3", True, every_s=0.0)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines  # one per item (every_s=0), and the end
    assert [m.group(1, 2) for m in matches if m] == [("1", "25"), ("2", "50"), ("3", "75"),
                                                     ("4", "100"), ("4", "100")]  # fmt: skip
    assert [m.group(3).startswith("eta") for m in matches if m] == [True] * 4 + [False]


def test_lines_wait_for_the_interval_and_count_without_a_length(
    redirected: tuple[io.StringIO, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster_pipeline")
    assert list(progress((i for i in range(3)), "extract", True)) == [0, 1, 2]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["extract: 3 batches"]


def test_not_shown_is_the_items_themselves(redirected: tuple[io.StringIO, io.StringIO]) -> None:
    items = [1, 2, 3]
    assert progress(items, "train 0", False) is items


def test_a_terminal_keeps_the_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress([1, 2], "train 0", True)
    assert isinstance(bar, tqdm)
    bar.close()
