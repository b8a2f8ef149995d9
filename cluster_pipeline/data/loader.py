"""Batches from the shards for a rank: one DataLoader worker decodes one whole batch into
shared memory, and each rank's slice of the samples for exactly-once extraction.

The DataLoader hands each item to exactly one worker, so within a rank every index is read
exactly once whatever the number of workers; `rank_partition` tiles 0..N-1 over the ranks.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import importlib
import math
import multiprocessing
import multiprocessing.forkserver
import signal
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cluster_pipeline import dist
from cluster_pipeline.data.reader import SampleReader
from cluster_pipeline.run.stop import shield_child


class Batch(NamedTuple):
    """One loader item. `skipped` and `reasons` are empty unless the loader skips bad samples."""

    indices: torch.Tensor  # (n,) int64 sample indices of `images`
    images: torch.Tensor  # (n, H, W, C) uint8
    skipped: torch.Tensor  # (m,) int64 samples of this batch that could not be read
    reasons: list[str]  # per skipped sample: "shard <path>: sample <key>: <why>"


# Batches a worker may have decoded ahead of the main process (DataLoader's prefetch_factor).
PREFETCH_BATCHES = 4
# Image buffers per worker, reused in turn: the prefetched batches, the one the main process
# holds, and one spare.
RING_SLOTS = PREFETCH_BATCHES + 2


class BatchDataset(Dataset):
    """Item j is the decoded batch `batches[j]`: one worker reads one whole batch.

    In a worker the images are decoded into a ring of RING_SLOTS shared-memory buffers made
    once, and `BatchLoader` keeps every buffer it received mapped in the main process, so
    handing a batch over moves a file descriptor, not pages. A fresh shared buffer per batch
    cost ~0.2 ms of CPU per 224-px image in page faults, mapping and unmapping (against ~0.4 ms
    to decode it); the ring costs ~0.05 ms.
    """

    def __init__(
        self, reader: SampleReader, batches: list[np.ndarray], skip_errors: bool = False
    ) -> None:
        self.reader = reader
        self.batches = batches
        self.skip_errors = skip_errors
        self.rows = max((len(b) for b in batches), default=0)
        self.ring: list[torch.Tensor] = []  # filled in each worker, on its first batch
        self.served = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Batch:
        idx = self.batches[j].astype(np.int64)
        buf = self._images(len(idx))
        if self.skip_errors:
            idx, images, skipped, reasons = self.reader.read_batch_skipping(idx, buf.numpy())
        else:
            images, skipped, reasons = self.reader.read_batch(idx, buf.numpy()), idx[:0], []
        # `images` is buf's memory unless bad samples were dropped (then a smaller copy).
        tensor = buf if len(images) == len(buf) else torch.from_numpy(images)
        return Batch(torch.from_numpy(idx), tensor, torch.from_numpy(skipped), reasons)

    def _images(self, n: int) -> torch.Tensor:
        """The batch's uint8 image tensor; in a loader worker, the next buffer of its ring."""
        r = self.reader
        shape = (self.rows, r.load_size, r.load_size, r.channels)
        if n == 0 or get_worker_info() is None:
            return torch.empty((n, *shape[1:]), dtype=torch.uint8)
        if not self.ring:
            self.ring = [_shared_uint8(shape) for _ in range(RING_SLOTS)]
        slot = self.ring[self.served % RING_SLOTS]
        self.served += 1
        return slot[:n]


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor in shared memory from the start: one allocated privately would be copied into
    shared memory each time it is sent."""
    empty = torch.empty(0, dtype=torch.uint8)
    storage = empty._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return empty.new(storage).view(shape)


class BatchLoader:
    """A DataLoader over `BatchDataset` that keeps the workers' ring buffers mapped.

    A batch's `images` stay valid until RING_SLOTS - 1 further batches of the same worker
    have arrived: copy them (to the device, to float) before then, as extraction and training
    do at once. Holding the last RING_SLOTS batches of every worker keeps each buffer mapped
    in this process, so torch reuses the mapping instead of mapping and faulting it again.
    """

    def __init__(self, loader: DataLoader, workers: int) -> None:
        self.loader = loader
        self.held: collections.deque[Batch] = collections.deque(maxlen=RING_SLOTS * max(1, workers))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for batch in self.loader:
                if self.loader.num_workers:
                    self.held.append(batch)
                yield batch
        finally:
            self.held.clear()


# Imported by the forkserver only, never here: it makes the process that imports it ignore
# the stop signals and die with its parent.
FORKSERVER_GUARD = "cluster_pipeline.data.forkserver_guard"


def batch_loader(
    reader: SampleReader,
    indices: np.ndarray,
    batch_size: int,
    num_workers: int,
    timeout_s: float = 0,
    skip_errors: bool = False,
) -> BatchLoader:
    """Batches (`Batch`: sample indices, uint8 NHWC images, skipped) in order, one per worker.

    A sample that cannot be read (SampleError) stops the loader, or with `skip_errors` is left
    out of its batch and reported in `skipped` and `reasons`, from worker to main process.

    The DataLoader hands each item to exactly one worker, so within a rank every index in
    `indices` is read exactly once whatever the number of workers. Workers come from a
    forkserver when this process runs more than one thread: forking a rank that runs gloo, tqdm
    and OpenMP threads can deadlock the child (CPython gh-112275), which would stall every rank
    until the collective timeout (`worker_start_method`). A batch that
    takes more than `timeout_s` (0: no limit) is an error rather than a silent stall.
    """
    batches = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    workers: dict = {}
    if num_workers > 0:
        context = worker_start_method()
        prepare_workers(context)
        workers = {
            "multiprocessing_context": context,
            "worker_init_fn": _worker_init,
            "prefetch_factor": PREFETCH_BATCHES,
            "timeout": timeout_s,
        }
    loader = DataLoader(
        BatchDataset(reader, batches, skip_errors),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        **workers,
    )
    return BatchLoader(loader, num_workers)


# What every worker needs and would otherwise import on its own, before its first batch:
# numpy.random (0.15 s: numpy loads it on first use, and torch's worker loop seeds it) and,
# through the guard, PIL's format plugins (0.2 s).
WORKER_PRELOAD = ["torch", "numpy.random", __name__]


def worker_start_method() -> str:
    """'fork' in a process that is in no process group and runs no Python thread but its main
    one (a single process reading shards: no forkserver to start, which imports torch anew,
    ~1.5 s before the first batch); 'forkserver' otherwise: a rank runs gloo's, tqdm's and the
    heartbeat's threads, and a fork can inherit a lock one of them held (CPython gh-112275).

    The feeder threads of multiprocessing queues do not count: a finished loader leaves its
    own behind for a moment, and a worker never touches another loader's queues. The native
    pools a lone process may run, OpenBLAS's and OpenMP's, reset themselves in a forked child
    (pthread_atfork), as every fork-started DataLoader relies on."""
    if "fork" not in multiprocessing.get_all_start_methods() or dist.in_group():
        return "forkserver"
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    return "forkserver" if any(t.name != "QueueFeederThread" for t in others) else "fork"


def prepare_workers(method: str) -> None:
    """Have what the workers need loaded once where they start from: the forkserver (started
    if it is not running), or this process before it forks."""
    if method == "forkserver":
        start_worker_server()
        return
    for name in WORKER_PRELOAD:
        importlib.import_module(name)
    Image.preinit()


def start_worker_server() -> None:
    """Start the forkserver the DataLoader workers come from, if it is not running. Called at
    set-up, its import of torch (seconds) overlaps the rest of the start-up instead of delaying
    the first batch; the first loader then finds it running."""
    torch.multiprocessing.set_forkserver_preload([*WORKER_PRELOAD, FORKSERVER_GUARD])
    multiprocessing.forkserver.ensure_running()


def _kill_workers_at_exit() -> None:
    """Kill the daemonic children (DataLoader workers) still alive when the interpreter exits.

    At exit torch's loader skips its own worker shutdown, and multiprocessing then SIGTERMs its
    daemonic children and joins them. Our workers ignore SIGTERM (`shield_child`: a stop of
    the rank's process group must not kill them mid-batch), so that join would wait forever and
    a rank holding a live loader iterator, or a test process, would never exit. Registered
    after multiprocessing's exit hook, so it runs first (atexit is last in, first out).

    Forked workers are this process's own children, and torch's SIGCHLD handler raises when a
    live loader's worker dies ("DataLoader worker ... exited unexpectedly"): raised in here, it
    left the other workers alive and the exit hung. The default SIGCHLD action comes first."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [c for c in multiprocessing.active_children() if c.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


atexit.register(_kill_workers_at_exit)


def _worker_init(worker_id: int) -> None:
    """A worker ignores the stop signals of its rank's process group (the rank stops it when
    it stops) and dies with its parent, the forkserver, which dies with the rank."""
    shield_child()
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h): a worker's decode buffers (an ImageNet JPEG is ~0.5 MB
# of pixels before the resize) come from its heap and go back to it, not to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
WORKER_MMAP_THRESHOLD = 64 << 20
WORKER_TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Have this process's malloc serve allocations below 64 MiB from its heap and keep up to
    256 MiB freed there. By default glibc maps each allocation over its (adaptive) threshold
    anew and unmaps it when freed, so every decoded image's buffer is faulted in again: on a
    VM that costs 12-37% of a worker's decode rate (measured with 2 workers on 500x375 JPEGs,
    BENCHMARKS.md). False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
    )


def rank_partition(num_samples: int, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous slice of 0..N-1 for extraction; slices of all ranks tile 0..N-1.

    Splitting by sample rather than by shard balances ranks whatever the shard count, and a rank
    whose slice is empty simply reads nothing.
    """
    lo, hi = rank * num_samples // world, (rank + 1) * num_samples // world
    return np.arange(lo, hi, dtype=np.int64)
