"""The heartbeat: how a rank that died (SIGKILL, out of memory, a failed node) is found and named.

A collective cannot tell a dead peer from a busy one, so the survivors learn of a loss from the
heartbeat within dist.heartbeat_timeout_s, not from a collective's timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from types import FrameType, TracebackType

import torch.distributed as tdist

from cluster_pipeline.dist.errors import (
    EXIT_RANK_LOST,
    RankFailedError,
    RankLostError,
    error_line,
    exit_status_of,
)

log = logging.getLogger(__name__)

# What gloo says when a collective's wait passed the group's timeout.
GLOO_TIMEOUT = "Timed out waiting"
# Heartbeat values that are not beats: the rank left the group normally, or on an error.
_LEFT, _FAILED = -1, -2
# The package whose functions `_where` names (cluster_pipeline/, not only dist/).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frames of the context managers around a run: never where a rank "was".
_WRAPPERS = ("naming_lost_ranks", "process_group")


def start_heartbeat(rank: int, world: int, timeout_s: float) -> Heartbeat | None:
    """This rank's `Heartbeat`, in the rendezvous TCPStore of the process group just joined."""
    if timeout_s <= 0:
        return None
    store = tdist.distributed_c10d._get_default_store()
    while isinstance(store, tdist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, tdist.TCPStore):
        log.warning("no heartbeat: the process group's store is a %s, not a TCPStore; a dead "
                    "rank is found only by dist.timeout_s", type(store).__name__)  # fmt: skip
        return None
    heartbeat = Heartbeat(store.host, store.port, rank, world, timeout_s)
    heartbeat.start()
    return heartbeat


class Heartbeat:
    """Proof of life of every rank, kept apart from the collectives.

    A collective cannot tell a dead peer from a busy one: the other ranks wait in
    `broadcast_labels` for as long as rank 0 clusters (many minutes on ImageNet). So a daemon
    thread on every rank counts beats into the rendezvous TCPStore every `interval_s`, over a
    connection of its own (the process group's may be held for minutes by a blocking store call
    of NCCL's), and reads every other rank's count. Counting beats instead of comparing times
    needs no synchronized clocks. A rank whose count has not moved for `timeout_s` is lost, and
    so is the store's host (rank 0, or torchrun's agent) when the store stops answering. The
    thread then logs which rank and where this rank was, and ends the process with
    EXIT_RANK_LOST: the main thread may be blocked in a C++ collective that no Python exception
    can interrupt.
    """

    def __init__(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.interval_s = min(5.0, max(0.5, timeout_s / 6))
        self.address = f"{host}:{port}"
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        self.store_host = "torchrun's agent" if agent else "rank 0"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.keys = [f"cluster_pipeline/heartbeat/{attempt}/{r}" for r in range(world)]
        # "<exit status> <first line of the error>" of a rank that left on an error
        self.error_keys = [f"cluster_pipeline/error/{attempt}/{r}" for r in range(world)]
        self._store = tdist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                     timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        self._main = threading.get_ident()
        self._lock = threading.Lock()
        self._beats = [0] * world  # the last count read of each rank
        self._moved = [time.monotonic()] * world  # when it last changed (this rank's clock)
        self._store_down_since: float | None = None
        self._store_error = ""
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        """First beat, then wait until every rank has beaten once, then beat on in a thread."""
        self._store.set(self.keys[self.rank], "1")
        try:
            self._store.wait(self.keys, datetime.timedelta(seconds=self.timeout_s))
        except Exception:
            missing = [r for r, key in enumerate(self.keys) if not self._store.check([key])]
            raise RankLostError(
                f"rank(s) {missing} joined the process group but sent no heartbeat within "
                f"{self.timeout_s:.0f} s (dist.heartbeat_timeout_s)"
            ) from None
        self._thread.start()
        atexit.register(self.stop, failed=True)  # a rank leaving on an error says so

    def stop(self, failed: bool = False, error: BaseException | None = None) -> None:
        """Stop beating and tell the other ranks that this one left, normally or on an error;
        the error itself (status and first line) first, so that a rank that sees this one
        failed can repeat what went wrong rather than only who."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        atexit.unregister(self.stop)
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s)
        if tdist.is_initialized() and self._store_down_since is None:
            with contextlib.suppress(Exception):
                if error is not None and not isinstance(error, RankFailedError):
                    text = f"{exit_status_of(error)} {error_line(error)}"
                    self._store.set(self.error_keys[self.rank], text)
                self._store.set(self.keys[self.rank], str(_FAILED if failed or error else _LEFT))

    def _run(self) -> None:
        beat, last = 1, time.monotonic()
        while not self._stopped.wait(self.interval_s):
            if not tdist.is_initialized():  # the group was destroyed without `shutdown`
                return
            if time.monotonic() - last > 3 * self.interval_s:
                # This thread did not run for a while (the job was suspended, or the thread
                # starved): the others' silence is not theirs. Give each a new timeout_s.
                with self._lock:
                    self._moved = [time.monotonic()] * self.world
            last = time.monotonic()
            beat += 1
            try:
                self._store.set(self.keys[self.rank], str(beat))
                counts = [int(v) for v in self._store.multi_get(self.keys)]
            except Exception as exc:
                self._store_failed(exc)
                continue
            now = time.monotonic()
            with self._lock:
                for r, count in enumerate(counts):
                    if count != self._beats[r]:
                        self._beats[r], self._moved[r] = count, now
            verdict = self._verdict(now)
            if verdict is not None:
                self._exit(*verdict)

    def _store_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        down_s = self._mark_store_down(exc, now)
        # Two beats of grace: a run that ends without `shutdown` (the group destroyed directly)
        # may see rank 0 take its store away first.
        if down_s >= 2 * self.interval_s and not self._stopped.is_set() and tdist.is_initialized():
            self._exit(self._store_lost(now, self._where_main()))

    def _mark_store_down(self, exc: Exception, now: float) -> float:
        """Record the store's first failure; seconds since then."""
        with self._lock:
            if self._store_down_since is None:
                self._store_down_since = now
                self._store_error = error_line(exc)
            return now - self._store_down_since

    def _verdict(self, now: float) -> tuple[str, int] | None:
        """Why this rank must stop: a peer silent for timeout_s, or one that left on an error
        timeout_s ago while this rank is still in the run."""
        with self._lock:
            beats, moved = list(self._beats), list(self._moved)
        peers = [r for r in range(self.world) if r != self.rank]
        silent = [r for r in peers if beats[r] >= 0 and now - moved[r] > self.timeout_s]
        if silent:
            lost = self._lost(silent, now - max(moved[r] for r in silent), self._where_main())
            return lost, EXIT_RANK_LOST
        failed = [r for r in peers if beats[r] == _FAILED and now - moved[r] > self.timeout_s]
        if failed:
            error = self._failed(failed, self._where_main())
            return str(error), error.exit_status
        return None

    def explain(self, exc: BaseException) -> RuntimeError | None:
        """The error naming the rank that is gone, when a collective has just failed with `exc`.

        gloo says only "Connection closed by peer", once the peer's process is gone. A live
        rank beats again within one interval of the counts read now, so a rank that has not
        beaten 2.5 intervals later is the one lost. None when every rank is alive: the failure
        is something else.
        """
        if not self._thread.is_alive():
            return None
        where = _where(_frames_of(exc.__traceback__))
        try:  # counts read after the failure: a beat sent just before a death is not a sign of life
            before = [int(v) for v in self._store.multi_get(self.keys)]
        except Exception as store_exc:
            self._mark_store_down(store_exc, time.monotonic())
            before = []
        peers = [r for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + 2.5 * self.interval_s
        while True:
            now = time.monotonic()
            with self._lock:
                beats, moved, down = list(self._beats), list(self._moved), self._store_down_since
            if down is not None:  # its host is gone; it may have said that it failed first
                if beats[0] == _FAILED:
                    return self._failed([0], where)
                return RankLostError(self._store_lost(now, where))
            failed = [r for r in peers if _FAILED in (before[r], beats[r])]
            silent = [r for r in peers if min(before[r], beats[r]) >= 0 and beats[r] <= before[r]]
            if silent and now > deadline:
                return RankLostError(self._lost(silent, now - max(moved[r] for r in silent), where))
            if not silent:
                return self._failed(failed, where) if failed else None
            time.sleep(0.05)

    def _lost(self, ranks: list[int], silent_s: float, where: str) -> str:
        who = f"rank {ranks[0]} is" if len(ranks) == 1 else f"ranks {ranks} are"
        logs = ", ".join(f"logs/rank{r}.log" for r in ranks[:4])
        return (
            f"{who} lost: no heartbeat for {silent_s:.0f} s (killed, or its node failed; "
            f"{logs} ends where it stopped); rank {self.rank} was in {where}"
        )

    def _store_lost(self, now: float, where: str) -> str:
        assert self._store_down_since is not None
        ago = now - self._store_down_since
        if self.store_host == "rank 0":
            who = f"rank 0 is lost: the rendezvous store it hosts at {self.address}"
            why = "killed, or its node failed; logs/rank0.log ends where it stopped"
        else:
            who = f"the rendezvous store of torchrun's agent at {self.address} is lost: it"
            why = "the agent or its node failed"
        return (
            f"{who} stopped answering {ago:.0f} s ago ({self._store_error}; {why}); "
            f"rank {self.rank} was in {where}"
        )

    def _failed(self, ranks: list[int], where: str) -> RankFailedError:
        """The error of the first of `ranks` that said what it was, else where to read it."""
        for r in ranks:
            with contextlib.suppress(Exception):
                if self._store.check([self.error_keys[r]]):
                    status, _, line = self._store.get(self.error_keys[r]).decode().partition(" ")
                    return RankFailedError(f"rank {r} failed: {line}", int(status))
        logs = ", ".join(f"logs/rank{r}.log" for r in ranks[:4])
        return RankFailedError(
            f"rank(s) {ranks} stopped on an error (see {logs}); rank {self.rank} was in {where}"
        )

    def _where_main(self) -> str:
        frame = sys._current_frames().get(self._main)
        stack: list[FrameType] = []
        while frame is not None:
            stack.append(frame)
            frame = frame.f_back
        return _where(stack[::-1])

    def _exit(self, message: str, status: int = EXIT_RANK_LOST) -> None:
        """Log why, flush, and end the process: the main thread may be stuck in C++."""
        log.critical("%s", message)
        if self.rank != 0 and logging.getLogger().handlers:  # rank 0 logs to stdout already
            print(f"rank {self.rank}: error: {message}", file=sys.stderr)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _frames_of(tb: TracebackType | None) -> list[FrameType]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _where(frames: list[FrameType]) -> str:
    """'f (a > b > f)': the package's functions on a stack, outermost first; f the innermost."""
    names = [
        f.f_code.co_name
        for f in frames
        if f.f_code.co_filename.startswith(_PACKAGE_DIR)
        and os.path.basename(f.f_code.co_filename) not in ("cli.py", "__main__.py")
        and f.f_code.co_name not in _WRAPPERS
    ]
    if not names:  # called from a user's script: its innermost function outside the libraries
        libraries = tuple(sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib"))
        own = [f.f_code for f in frames if not f.f_code.co_filename.startswith(libraries)]
        return f"{own[-1].co_name} ({os.path.basename(own[-1].co_filename)})" if own else "?"
    return names[-1] if len(names) == 1 else f"{names[-1]} ({' > '.join(names)})"


@contextlib.contextmanager
def naming_lost_ranks(heartbeat: Heartbeat | None, timeout_s: float = 0) -> Iterator[None]:
    """Raise a collective's failure caused by a rank that is gone as an error that names it.

    gloo raises "Connection closed by peer" at once when a rank dies; the heartbeats tell which
    rank stopped beating (RankLostError) or left on an error of its own (RankFailedError, with
    that error's first line and exit status). Leaving on any error marks this rank as failed in
    the store for the others, with its error. An error of this rank's own making (a bad sample,
    a full disk: one that says its `exit_status`) is this rank's, whatever the others did, and
    goes on as it is: only a collective's failure is explained by the others' state. A
    collective that timed out while every peer still beats waited on a live but slow one: that
    says which setting to raise (`timeout_s`, the group's).
    """
    try:
        yield
    except BaseException as exc:
        better = None
        own = hasattr(exc, "exit_status") or not isinstance(exc, RuntimeError)
        if heartbeat is not None and not own and not isinstance(exc, RankLostError):
            better = heartbeat.explain(exc)
        if better is None and not own and GLOO_TIMEOUT in str(exc):
            better = RuntimeError(
                f"a collective waited dist.timeout_s={timeout_s:g} s for another rank that is "
                "alive and busy (its heartbeat kept beating): raise dist.timeout_s above the "
                "longest phase one rank works alone, such as rank 0's clustering in "
                f"cluster.mode=gather while the others wait for the labels ({error_line(exc)})"
            )
        if heartbeat is not None:
            heartbeat.stop(failed=True, error=exc if better is None else better)
        if better is None:
            raise
        log.error("%s", better)
        raise better from exc
