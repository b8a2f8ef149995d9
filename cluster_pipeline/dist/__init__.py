"""Every call to torch.distributed lives here: every collective of an epoch, in one file.

A function that is a collective says "Collective: call on every rank" in its docstring. With a
world of one process no process group exists and each collective degenerates to a local copy.

A rank that dies (SIGKILL, out of memory, a failed node) is found by the heartbeat of the
survivors, not by a collective timeout: they stop within dist.heartbeat_timeout_s with an error
naming it (`Heartbeat`, `naming_lost_ranks`).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

# torch.distributed.nn's functions take `group=group.WORLD` as a default argument, bound when the
# module is first imported, and torch imports it lazily (an optimizer's first step pulls it in
# through torch._dynamo). Imported after the group exists, it would hold the group for good:
# destroy_process_group would not free it, gloo's worker threads would outlive `shutdown`, and one
# of them releasing a finished collective's tensor while the interpreter exits aborted ranks
# ("terminate called without an active exception"). Imported here, before any group exists.
import torch.distributed.nn
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rows per message in `gather_features`: bounds the extra memory on rank 0 to one chunk.
GATHER_CHUNK_BYTES = 64 << 20
# Seconds without a heartbeat after which a rank is lost (config: dist.heartbeat_timeout_s).
HEARTBEAT_TIMEOUT_S = 180.0
# Seconds `shutdown` leaves the GIL to gloo's worker threads before the group is freed.
QUIESCE_S = 0.25
# Exit status of a rank that stops because another rank is lost (EX_UNAVAILABLE).
EXIT_RANK_LOST = 69
# Heartbeat values that are not beats: the rank left the group normally, or on an error.
_LEFT, _FAILED = -1, -2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class RankLostError(RuntimeError):
    """Another rank is gone (killed, out of memory, its node failed): the run cannot go on."""


class RankFailedError(RuntimeError):
    """Another rank raised an error; the message names that rank and repeats its error.

    `exit_status` is the failing rank's own (2 for bad input: a damaged sample, a bad config
    key), so every rank of a run ends with the status of its cause.
    """

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def exit_status_of(exc: BaseException) -> int:
    """The process exit status an error stands for: its `exit_status` (ConfigError and
    ShardError: 2, bad input), else 1."""
    return int(getattr(exc, "exit_status", 1))


def error_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    heartbeat: Heartbeat | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed(
    timeout_s: int = 600, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S
) -> DistContext:
    """Join the process group described by the environment (torchrun or submitit), else run alone.

    torchrun and submitit's TorchDistributedEnvironment both export RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT; a plain `python -m cluster_pipeline` has none and is one process.
    `timeout_s` bounds a collective's wait for a live peer; a dead one is found by the heartbeat
    within `heartbeat_timeout_s` (0: no heartbeat). Collective: call on every rank.
    """
    heartbeat = None
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        log.info("rank %d/%d joined the %s process group", rank, world, backend)
        heartbeat = start_heartbeat(rank, world, heartbeat_timeout_s)
    return DistContext(rank, world, local_rank, device, heartbeat)


def shutdown(ctx: DistContext) -> None:
    """Stop the heartbeat, then leave the process group. Collective: call on every rank.

    The barrier between the two keeps rank 0, which may host the rendezvous store, from leaving
    before every rank has said in the store that it is leaving, not lost, and every rank from
    tearing gloo down while a peer is still in a collective. Leaving frees the group and joins
    its worker threads (see the import of torch.distributed.nn above for what once kept it).

    Before leaving, this thread lets go of the GIL for QUIESCE_S: a gloo worker thread drops its
    reference to a finished collective's tensors only after the caller saw it finish, and that
    drop takes the GIL. Whoever frees the group (destroy_process_group, or DDP's reducer when
    the wrapper is freed later) joins the worker threads while holding the GIL, so a worker
    still dropping a tensor then waits on a thread that waits on it: a finished run that never
    exited, seen on a loaded machine. After the barrier no collective is issued; once the
    workers had a moment to take the GIL they are idle, and freeing the group is safe whenever
    it happens.
    """
    if ctx.heartbeat is not None:
        ctx.heartbeat.stop()
    if ctx.distributed and tdist.is_initialized():
        tdist.barrier()
        time.sleep(QUIESCE_S)
        tdist.destroy_process_group()


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
        and f.f_code.co_name != "naming_lost_ranks"
    ]
    if not names:  # called from a user's script: its innermost function outside the libraries
        libraries = tuple(sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib"))
        own = [f.f_code for f in frames if not f.f_code.co_filename.startswith(libraries)]
        return f"{own[-1].co_name} ({os.path.basename(own[-1].co_filename)})" if own else "?"
    return names[-1] if len(names) == 1 else f"{names[-1]} ({' > '.join(names)})"


@contextlib.contextmanager
def naming_lost_ranks(ctx: DistContext) -> Iterator[None]:
    """Raise a collective's failure caused by a rank that is gone as an error that names it.

    gloo raises "Connection closed by peer" at once when a rank dies; the heartbeats tell which
    rank stopped beating (RankLostError) or left on an error of its own (RankFailedError, with
    that error's first line and exit status). Leaving on any error marks this rank as failed in
    the store for the others, with its error. An error of this rank's own making (a bad sample,
    a full disk: one that says its `exit_status`) is this rank's, whatever the others did, and
    goes on as it is: only a collective's failure is explained by the others' state.
    """
    try:
        yield
    except BaseException as exc:
        better = None
        own = hasattr(exc, "exit_status") or not isinstance(exc, RuntimeError)
        if ctx.heartbeat is not None and not own and not isinstance(exc, RankLostError):
            better = ctx.heartbeat.explain(exc)
        if ctx.heartbeat is not None:
            ctx.heartbeat.stop(failed=True, error=exc if better is None else better)
        if better is None:
            raise
        log.error("%s", better)
        raise better from exc


def _comm_device(ctx: DistContext) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    """Collective: call on every rank."""
    if ctx.distributed:
        tdist.barrier()


def all_gather_counts(ctx: DistContext, count: int) -> list[int]:
    """Each rank's `count`, in rank order. Collective: call on every rank."""
    if not ctx.distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=_comm_device(ctx))
    out = [torch.zeros_like(mine) for _ in range(ctx.world)]
    tdist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def raise_if_any_rank_failed(ctx: DistContext, error: BaseException | None) -> None:
    """Turn one rank's failure into an error on every rank instead of a hang in the next collective.

    The failing rank re-raises its own exception; the others raise a RankFailedError that names
    it and repeats its error's first line, with its exit status: a damaged sample on rank 1 ends
    rank 0 with status 2 and the sample's name too. Collective: call on every rank.
    """
    status = 0 if error is None else max(1, exit_status_of(error))
    statuses = all_gather_counts(ctx, status)
    failed = [r for r, s in enumerate(statuses) if s]
    if not failed:
        return
    first = failed[0]
    line = broadcast_string(ctx, error_line(error) if error is not None else "", src=first)
    if error is not None:
        raise error
    raise RankFailedError(f"rank {first} failed: {line}", statuses[first])


def on_rank0(ctx: DistContext, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args) on rank 0 only; if it raises, every rank raises with rank 0's message (a full
    disk while checkpointing reads the same in every rank's log). Collective: call on every rank.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args)
        except Exception as exc:
            log.exception("rank 0 failed")
            error = exc
    if not ctx.distributed:
        if error is not None:
            raise error
        return result
    outcome: str | None = None
    if ctx.is_main:
        outcome = "0 ok" if error is None else f"{exit_status_of(error)} {error}"
    status, _, text = broadcast_string(ctx, outcome).partition(" ")
    if error is not None:
        raise error
    if status != "0":
        raise RankFailedError(f"rank 0 failed: {text or 'error'}", int(status))
    return result


def max_over_ranks(ctx: DistContext, value: int) -> int:
    """The largest of the ranks' `value`s, e.g. whether any rank caught a stop signal.

    Collective: call on every rank.
    """
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(ctx))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def all_gather_floats(ctx: DistContext, value: float) -> np.ndarray:
    """Each rank's float64 `value`, in rank order. Collective: call on every rank."""
    if not ctx.distributed:
        return np.array([value], dtype=np.float64)
    mine = torch.tensor([value], dtype=torch.float64, device=_comm_device(ctx))
    out = [torch.zeros_like(mine) for _ in range(ctx.world)]
    tdist.all_gather(out, mine)
    return torch.cat(out).cpu().numpy()


def all_reduce_sum(ctx: DistContext, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of a small float64 vector. Collective: call on every rank."""
    if not ctx.distributed:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(_comm_device(ctx))
    tdist.all_reduce(t)
    return t.cpu().numpy()


# Elements per all-reduce in `all_reduce_sum_`: 64 MiB of float64, so a 10k x 10k matrix of
# sums (800 MB) needs no second copy in the backend's buffers.
REDUCE_CHUNK = 8 << 20


def all_reduce_sum_(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a contiguous tensor of any shape and dtype over ranks, in place, in chunks of
    REDUCE_CHUNK elements; returns it. The tensor stays where it is (the GPU for NCCL); gloo
    reduces a CUDA tensor through a CPU copy. Collective: call on every rank.
    """
    if not ctx.distributed:
        return values
    if not values.is_contiguous():
        raise ValueError("all_reduce_sum_ needs a contiguous tensor")
    dev = _comm_device(ctx)
    flat = values.view(-1)
    for s in range(0, flat.numel(), REDUCE_CHUNK):
        part = flat[s : s + REDUCE_CHUNK]
        if part.device == dev:
            tdist.all_reduce(part)
        else:
            staged = part.to(dev)
            tdist.all_reduce(staged)
            part.copy_(staged)
    return values


@dataclass(frozen=True)
class Gathered:
    """Rank 0's features of one extraction: row j is sample `index[j]`.

    `index` and `skipped` are sorted and together are 0..N-1, each sample once: the samples
    left out are exactly those reported unreadable (data.on_error=skip), never fewer rows
    by accident. Without skips `index` is 0..N-1 and row i is sample i.
    """

    feats: np.ndarray  # (N - len(skipped), d) float32
    index: np.ndarray  # int64 sample indices of the rows
    skipped: np.ndarray  # int64 sample indices that could not be read

    @property
    def num_samples(self) -> int:
        return len(self.index) + len(self.skipped)

    def per_sample(self, values: np.ndarray, fill: int = -1) -> np.ndarray:
        """Per-row `values` spread over all N samples, `fill` at the skipped ones."""
        out = np.full(self.num_samples, fill, dtype=values.dtype)
        out[self.index] = values
        return out


def gather_features(
    ctx: DistContext,
    index: np.ndarray,
    feats: np.ndarray,
    num_samples: int,
    skipped: np.ndarray | None = None,
) -> Gathered | None:
    """Gather every rank's (index, features) rows, and its `skipped` sample indices, on rank 0.

    Ranks may hold different counts, including none. Skipped indices travel first, so rank 0
    knows where each row goes; rows travel as tensors in chunks of GATHER_CHUNK_BYTES and are
    scattered into the preallocated result, so rank 0 peaks near one copy of the matrix.
    Raises on every rank unless each sample 0..num_samples-1 was extracted exactly once or
    skipped exactly once, by some rank. Returns None on ranks other than 0.
    Collective: call on every rank.
    """
    d = feats.shape[1]
    skipped = np.zeros(0, np.int64) if skipped is None else skipped
    counts = all_gather_counts(ctx, len(index))
    skip_counts = all_gather_counts(ctx, len(skipped))
    if sum(counts) + sum(skip_counts) != num_samples:
        skips = f" and skipped {sum(skip_counts)} (per rank {skip_counts})"
        raise RuntimeError(
            f"extraction produced {sum(counts)} rows (per rank {counts}) for {num_samples} "
            f"samples{skips if any(skip_counts) else ''}"
        )
    dev = _comm_device(ctx)
    bad: RuntimeError | None = None
    seen = np.zeros(num_samples if ctx.is_main else 0, dtype=np.int64)
    skip_seen: np.ndarray | None = None
    rows: np.ndarray | None = None  # sample -> row of the result; None: row i is sample i
    if any(skip_counts):
        parts = _gather_skipped(ctx, skipped, skip_counts)
        for src, part in enumerate(parts):
            bad = bad or _count_indices(seen, part, src)
        skip_seen = seen.copy()
        kept = seen == 0
        rows = np.cumsum(kept) - 1
    out: np.ndarray | None = None
    if ctx.is_main:
        out = np.empty((num_samples - int((seen > 0).sum()), d), dtype=np.float32)
        bad = bad or _count_indices(seen, index, 0)
        if bad is None:
            out[index if rows is None else rows[index]] = feats
    chunk_rows = max(1, GATHER_CHUNK_BYTES // max(1, 4 * d))
    for src in range(1, ctx.world):
        n = counts[src]
        if n == 0:
            continue
        if ctx.rank == src:
            tdist.send(torch.from_numpy(np.ascontiguousarray(index, np.int64)).to(dev), dst=0)
            for s in range(0, n, chunk_rows):
                part = np.ascontiguousarray(feats[s : s + chunk_rows], dtype=np.float32)
                tdist.send(torch.from_numpy(part).to(dev), dst=0)
        elif ctx.is_main:
            assert out is not None
            idx_t = torch.empty(n, dtype=torch.int64, device=dev)
            tdist.recv(idx_t, src=src)
            idx = idx_t.cpu().numpy()
            bad = bad or _count_indices(seen, idx, src)
            dest = idx if rows is None else rows[idx]
            buf = torch.empty((min(chunk_rows, n), d), dtype=torch.float32, device=dev)
            for s in range(0, n, chunk_rows):
                m = min(chunk_rows, n - s)
                view = buf[:m]
                tdist.recv(view, src=src)
                if bad is None:  # after an error the chunks are still received, then dropped
                    out[dest[s : s + m]] = view.cpu().numpy()
    if ctx.is_main and bad is None and not np.all(seen == 1):
        bad = _coverage_error(seen, skip_seen)
    status = [0]
    if ctx.distributed:
        flag = torch.tensor([int(bad is not None)], device=dev)
        tdist.broadcast(flag, src=0)
        status = [int(flag.item())]
    if bad is not None:
        raise bad
    if status[0]:
        raise RuntimeError(
            "rank 0 found that extraction did not read every sample exactly once (or report it "
            "skipped once), or read indices outside 0..N-1; see logs/rank0.log"
        )
    if not ctx.is_main:
        return None
    assert out is not None
    if skip_seen is None:
        return Gathered(out, np.arange(num_samples, dtype=np.int64), np.zeros(0, np.int64))
    lost = np.flatnonzero(skip_seen)
    log.warning("%d of %d samples could not be read and are left out (first: %s); the rank "
                "logs name each shard and reason", len(lost), num_samples,
                " ".join(f"{i:09d}" for i in lost[:5]))  # fmt: skip
    return Gathered(out, np.flatnonzero(skip_seen == 0), lost)


def _gather_skipped(ctx: DistContext, skipped: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """Every rank's skipped indices on rank 0, in rank order (empty lists elsewhere).

    Collective: call on every rank.
    """
    parts = [np.asarray(skipped, dtype=np.int64)] if ctx.is_main else []
    dev = _comm_device(ctx)
    for src in range(1, ctx.world):
        if counts[src] == 0:
            if ctx.is_main:
                parts.append(np.zeros(0, np.int64))
            continue
        if ctx.rank == src:
            tdist.send(torch.from_numpy(np.ascontiguousarray(skipped, np.int64)).to(dev), dst=0)
        elif ctx.is_main:
            t = torch.empty(counts[src], dtype=torch.int64, device=dev)
            tdist.recv(t, src=src)
            parts.append(t.cpu().numpy())
    return parts


def _count_indices(seen: np.ndarray, index: np.ndarray, src: int) -> RuntimeError | None:
    """Add one rank's sample indices to `seen`, once per rank; out of 0..N-1 is an error."""
    if len(index) and (index.min() < 0 or index.max() >= len(seen)):
        return RuntimeError(
            f"rank {src} sent sample indices in [{index.min()}, {index.max()}], outside "
            f"0..{len(seen) - 1}; its shards do not match the index"
        )
    seen += np.bincount(index, minlength=len(seen))
    return None


def _coverage_error(seen: np.ndarray, skip_seen: np.ndarray | None) -> RuntimeError:
    """Which samples were not extracted-or-skipped exactly once, for rank 0's error."""
    missing, dup = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    msg = (
        f"extraction did not read every sample exactly once: {len(missing)} missing "
        f"(first {missing[:5].tolist()}), {len(dup)} duplicated (first {dup[:5].tolist()})"
    )
    if skip_seen is not None:
        both = np.flatnonzero((skip_seen > 0) & (seen > skip_seen))
        twice = np.flatnonzero(skip_seen > 1)
        msg += (
            f"; of these, {len(both)} both extracted and skipped (first {both[:5].tolist()}), "
            f"{len(twice)} skipped more than once (first {twice[:5].tolist()})"
        )
    return RuntimeError(msg)


def broadcast_labels(ctx: DistContext, labels: np.ndarray | None, num_samples: int) -> np.ndarray:
    """Rank 0's per-sample labels (int64, indexed by sample) on every rank.

    Collective: call on every rank.
    """
    if not ctx.distributed:
        assert labels is not None
        return labels
    dev = _comm_device(ctx)
    if ctx.is_main:
        assert labels is not None and len(labels) == num_samples
        t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(dev)
    else:
        t = torch.empty(num_samples, dtype=torch.int64, device=dev)
    tdist.broadcast(t, src=0)
    return t.cpu().numpy()


def broadcast_string(ctx: DistContext, text: str | None, src: int = 0) -> str:
    """Rank `src`'s string on every rank (e.g. the run directory). Collective: call on every
    rank."""
    if not ctx.distributed:
        assert text is not None
        return text
    dev = _comm_device(ctx)
    data = (text or "").encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    tdist.broadcast(n, src=src)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    if ctx.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    tdist.broadcast(buf, src=src)
    return bytes(buf.cpu().numpy()).decode()


def broadcast_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    every rank holds the statistics of its own last batch; features extracted with those
    would depend on the rank that read the sample. Collective: call on every rank.
    """
    if not ctx.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in model.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf.data)
    for bufs in by_dtype.values():  # one message per dtype rather than one per buffer
        flat = torch.cat([b.reshape(-1) for b in bufs])
        tdist.broadcast(flat, src=0)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def wrap_ddp(ctx: DistContext, model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (rank 0's weights are broadcast on construction).

    Collective: call on every rank.
    """
    if not ctx.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------------------------------------
# Sharded k-means (cluster.mode=sharded): the features stay on their rank; only the PCA sample,
# k x d sums and the labels travel.

# Entries of the N-vector of labels per all-reduce in `all_gather_labels` (64 MiB of int64).
LABEL_CHUNK = 8 << 20


def all_reduce_sum_int64(ctx: DistContext, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of an int64 array of any shape, exact and independent of the
    reduction order (sharded k-means: per-cluster fixed-point sums and counts).

    Collective: call on every rank.
    """
    values = np.ascontiguousarray(values, dtype=np.int64)
    if not ctx.distributed:
        return values
    t = torch.from_numpy(values.copy()).to(_comm_device(ctx))
    tdist.all_reduce(t)
    return t.cpu().numpy()


def all_reduce_max_float(ctx: DistContext, value: float) -> float:
    """The largest of the ranks' float64 `value`s. Collective: call on every rank."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(ctx))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def all_gather_int64(ctx: DistContext, values: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D int64 `values` (lengths may differ), in rank order, on every rank.

    Collective: call on every rank.
    """
    values = np.ascontiguousarray(values, dtype=np.int64)
    if not ctx.distributed:
        return [values]
    counts = all_gather_counts(ctx, len(values))
    dev = _comm_device(ctx)
    padded = torch.full((max(max(counts), 1),), -1, dtype=torch.int64, device=dev)
    padded[: len(values)] = torch.from_numpy(values).to(dev)
    out = [torch.empty_like(padded) for _ in range(ctx.world)]
    tdist.all_gather(out, padded)
    return [t[:n].cpu().numpy() for t, n in zip(out, counts, strict=True)]


def gather_rows(
    ctx: DistContext, index: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's (sample index, row) pairs on rank 0, sorted by sample index, as tensors (no
    pickling); None elsewhere. For a bounded sample (the PCA fit's), not for all N rows: rank 0
    holds the result whole. Collective: call on every rank.
    """
    d = rows.shape[1]
    index = np.ascontiguousarray(index, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    counts = all_gather_counts(ctx, len(index))
    dev = _comm_device(ctx)
    parts: list[tuple[np.ndarray, np.ndarray]] = [(index, rows)]
    for src in range(1, ctx.world):
        if counts[src] == 0:
            continue
        if ctx.rank == src:
            tdist.send(torch.from_numpy(index).to(dev), dst=0)
            tdist.send(torch.from_numpy(rows).to(dev), dst=0)
        elif ctx.is_main:
            idx_t = torch.empty(counts[src], dtype=torch.int64, device=dev)
            rows_t = torch.empty((counts[src], d), dtype=torch.float32, device=dev)
            tdist.recv(idx_t, src=src)
            tdist.recv(rows_t, src=src)
            parts.append((idx_t.cpu().numpy(), rows_t.cpu().numpy()))
    if not ctx.is_main:
        return None
    all_index = np.concatenate([i for i, _ in parts])
    order = np.argsort(all_index, kind="stable")
    return all_index[order], np.concatenate([r for _, r in parts])[order]


def broadcast_float32(
    ctx: DistContext, values: np.ndarray | None, shape: tuple[int, ...]
) -> np.ndarray:
    """Rank 0's float32 array of a shape every rank knows (a fitted PCA) on every rank.

    Collective: call on every rank.
    """
    if not ctx.distributed:
        assert values is not None
        return np.ascontiguousarray(values, dtype=np.float32)
    dev = _comm_device(ctx)
    if ctx.is_main:
        assert values is not None and values.shape == shape
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dev)
    else:
        t = torch.empty(shape, dtype=torch.float32, device=dev)
    tdist.broadcast(t, src=0)
    return t.cpu().numpy()


def all_gather_labels(
    ctx: DistContext,
    index: np.ndarray,
    labels: np.ndarray,
    skipped: np.ndarray,
    num_samples: int,
) -> np.ndarray:
    """Every rank's per-row labels spread into one int64 N-vector by sample index, on every
    rank; the `skipped` samples get -1.

    Each rank adds 2**32 + label + 1 at its samples and 2**32 at its skipped ones to a zero
    N-vector, all-reduced in chunks of LABEL_CHUNK entries: the high half then counts how often
    each sample was seen, so this is also sharded mode's check that every sample was extracted
    or skipped exactly once, and it raises (on every rank alike) otherwise. Collective: call on
    every rank.
    """
    index = np.asarray(index, dtype=np.int64)
    skipped = np.asarray(skipped, dtype=np.int64)
    mine = np.concatenate([index, skipped])
    outside = bool(len(mine)) and (mine.min() < 0 or mine.max() >= num_samples)
    if max_over_ranks(ctx, int(outside)):
        raise RuntimeError(
            f"sample indices outside 0..{num_samples - 1} were extracted"
            + (f" by rank {ctx.rank}" if outside else " by another rank; see its log")
        )
    values = np.concatenate([labels.astype(np.int64) + 1, np.zeros(len(skipped), np.int64)])
    order = np.argsort(mine, kind="stable")
    mine, values = mine[order], values[order]
    out = np.empty(num_samples, dtype=np.int64)
    missing = duplicated = 0
    first_bad: list[int] = []
    for s in range(0, num_samples, LABEL_CHUNK):
        n = min(LABEL_CHUNK, num_samples - s)
        lo, hi = np.searchsorted(mine, [s, s + n])
        pos = mine[lo:hi] - s
        chunk = np.bincount(pos, minlength=n).astype(np.int64) << 32
        chunk[pos] += values[lo:hi]
        chunk = all_reduce_sum_int64(ctx, chunk)
        hits = chunk >> 32
        out[s : s + n] = (chunk & 0xFFFFFFFF) - 1
        missing += int((hits == 0).sum())
        duplicated += int((hits > 1).sum())
        if len(first_bad) < 5:
            first_bad += (np.flatnonzero(hits != 1)[: 5 - len(first_bad)] + s).tolist()
    if missing or duplicated:
        raise RuntimeError(
            f"extraction did not read every sample exactly once: {missing} missing, "
            f"{duplicated} duplicated (first {first_bad})"
        )
    return out
