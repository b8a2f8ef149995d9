"""Distributed code on real gloo processes, each result compared with a single-process reference.

Spawning ranks costs seconds, so each spawn runs several cases in sequence and returns them all;
the worker functions are module-level so the spawned processes can import them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluster_pipeline import dist
from cluster_pipeline.config import Config, DistConfig, load_config
from cluster_pipeline.data.augment import center_crop, to_float
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.data.shards import write_shards
from cluster_pipeline.data.sources import Source, digits_source
from cluster_pipeline.features import gather
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.features.gather import broadcast_labels, gather_features
from cluster_pipeline.models.nets import ClusterNet, build_model
from cluster_pipeline.testing.multiproc import run_ranks

REPO = Path(__file__).resolve().parent.parent
DIGITS_CONFIG = REPO / "configs" / "digits_test.yaml"
N_DIGITS = 1797


# ---------------------------------------------------------------------------------------------
# gather_features + broadcast_labels


GATHER_N, GATHER_D = 307, 5


def _gather_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shuffled order of 0..N-1 (so no rank's indices are contiguous), features, labels."""
    rng = np.random.default_rng(1234)
    perm = rng.permutation(GATHER_N).astype(np.int64)
    feats = rng.standard_normal((GATHER_N, GATHER_D)).astype(np.float32)
    labels = rng.integers(0, 50, GATHER_N).astype(np.int64)
    return perm, feats, labels


# Per case: how many of the shuffled indices rank 0 holds (rank 1 holds the rest).
GATHER_SPLITS = {"uneven_7_300": 7, "rank1_empty": GATHER_N, "rank0_empty": 0}


def _gather_worker(rank: int, world: int) -> dict:
    ctx = dist.init_distributed(DistConfig.timeout_s, DistConfig.heartbeat_timeout_s)
    assert (ctx.rank, ctx.world) == (rank, world) and ctx.distributed
    perm, feats, labels = _gather_data()
    # 16 rows of 5 float32 per message: rank 1's 300 rows travel in 19 chunks, the last partial.
    gather.GATHER_CHUNK_BYTES = 16 * 4 * GATHER_D
    gather.LABEL_CHUNK = 64  # the 307 labels are broadcast in 5 chunks, the last partial
    recvs = []
    real_recv = dist.recv

    def counting_recv(ctx_, shape, dtype, src):
        recvs.append(tuple(shape))
        return real_recv(ctx_, shape, dtype, src)

    dist.recv = counting_recv  # this spawned process only
    out: dict = {}
    for case, n0 in GATHER_SPLITS.items():
        recvs.clear()
        mine = perm[:n0] if rank == 0 else perm[n0:]
        gathered = gather_features(ctx, mine, feats[mine], GATHER_N)
        if gathered is not None:  # no sample skipped: row i is sample i
            np.testing.assert_array_equal(gathered.index, np.arange(GATHER_N))
            assert len(gathered.skipped) == 0
            gathered = gathered.feats
        labels_in = labels if rank == 0 else None
        got = broadcast_labels(ctx, labels_in, GATHER_N)
        out[case] = {"gathered": gathered, "labels": got, "recvs": list(recvs)}
    dist.recv = real_recv

    # Sample 4 read twice and sample 5 never, with the right total: every rank must raise.
    bad_index = {0: np.array([0, 1, 2, 4], np.int64), 1: np.array([4, 3], np.int64)}[rank]
    # One row short in total: caught from the counts alone.
    short_index = {0: np.array([0, 1], np.int64), 1: np.array([2], np.int64)}[rank]
    # Rank 1 sends an index past N-1: rank 0 names rank 1, nobody writes out of bounds or hangs.
    far_index = {0: np.array([0, 1, 2], np.int64), 1: np.array([3, 7], np.int64)}[rank]
    for case, index, n in (
        ("duplicate", bad_index, 6),
        ("missing", short_index, 4),
        ("out_of_range", far_index, 5),
    ):
        try:
            gather_features(ctx, index, np.zeros((len(index), 3), np.float32), n)
            out[case] = "no error"
        except RuntimeError as exc:
            out[case] = str(exc)
    # The group still works after the failed gathers (no rank was left behind in a collective).
    out["after_errors"] = broadcast_labels(
        ctx, np.arange(3, dtype=np.int64) if rank == 0 else None, 3
    )
    return out


@pytest.fixture(scope="module")
def gather_results() -> list[dict]:
    return run_ranks(2, _gather_worker, timeout=90)


@pytest.mark.parametrize("case", list(GATHER_SPLITS))
def test_gather_features_equals_single_process(gather_results: list[dict], case: str) -> None:
    _, feats, _ = _gather_data()
    rank0, rank1 = (r[case] for r in gather_results)
    assert rank0["gathered"] is not None and rank0["gathered"].dtype == np.float32
    np.testing.assert_array_equal(rank0["gathered"], feats)  # row i is sample i
    assert rank1["gathered"] is None


def test_gather_features_sends_several_chunks(gather_results: list[dict]) -> None:
    recvs = gather_results[0]["uneven_7_300"]["recvs"]
    # One message of rank 1's 300 indices, then 18 full chunks of 16 rows and one of 12.
    assert recvs == [(300,)] + [(16, GATHER_D)] * 18 + [(12, GATHER_D)]
    # A rank holding nothing sends nothing (rank 0 must not wait for it).
    assert gather_results[0]["rank1_empty"]["recvs"] == []


@pytest.mark.parametrize("case", list(GATHER_SPLITS))
def test_broadcast_labels_gives_every_rank_rank0_labels(
    gather_results: list[dict], case: str
) -> None:
    _, _, labels = _gather_data()
    for result in gather_results:
        got = result[case]["labels"]
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, labels)


def test_gather_features_bad_indices_raise_on_every_rank(gather_results: list[dict]) -> None:
    rank0, rank1 = gather_results
    assert "1 missing (first [5]), 1 duplicated (first [4])" in rank0["duplicate"]
    assert "did not read every sample exactly once" in rank1["duplicate"]
    assert "rank 1 sent sample indices in [3, 7], outside 0..4" in rank0["out_of_range"]
    assert "did not read every sample exactly once" in rank1["out_of_range"]
    for result in gather_results:
        assert "3 rows (per rank [2, 1]) for 4 samples" in result["missing"]
        np.testing.assert_array_equal(result["after_errors"], np.arange(3))


# ---------------------------------------------------------------------------------------------
# The collectives: one core per operation, whatever the dtype, against the one-process result


def _rank_values(rank: int) -> dict[str, np.ndarray]:
    """Per dtype, rank `rank`'s array (rank r: r + 1 rows; a 0 x 3 float32 on rank 0)."""
    rng = np.random.default_rng(rank)
    return {
        "int64": rng.integers(-(2**40), 2**40, (rank + 1, 3)),
        "float64": rng.standard_normal((rank + 1, 3)),
        "float32": rng.standard_normal((rank, 3)).astype(np.float32),
    }


def _collectives_worker(rank: int, world: int) -> dict:
    ctx = dist.init_distributed(60, 0)
    out: dict = {}
    for name, values in _rank_values(rank).items():
        same = np.resize(values.reshape(-1), 6).reshape(2, 3)  # a shape every rank shares
        out["sum", name] = dist.all_reduce(ctx, same)
        out["max", name] = dist.all_reduce(ctx, same, "max")
        out["all_gather", name] = dist.all_gather(ctx, values)
        out["gather", name] = dist.gather(ctx, values)
    t = torch.arange(10, dtype=torch.float64) * (rank + 1)
    dist.collectives.REDUCE_CHUNK = 3  # 4 messages of at most 3 elements; this process only
    out["tensor"] = (dist.all_reduce(ctx, t) is t, t.numpy().copy())
    mine = np.arange(6, dtype=np.int64).reshape(2, 3) if rank == 1 else None
    out["broadcast"] = dist.broadcast(ctx, mine, (2, 3), np.int64, src=1)
    buf = torch.full((4,), float(rank))
    out["broadcast_tensor"] = dist.broadcast(ctx, buf).tolist()
    out["string"] = dist.broadcast_string(ctx, "rüns/α" if rank == 0 else None)
    out["counts"] = dist.all_gather_counts(ctx, 10 * rank)
    return out


@pytest.fixture(scope="module")
def collective_results() -> list[dict]:
    return run_ranks(2, _collectives_worker, timeout=90)


def test_collectives_equal_the_one_process_result(collective_results: list[dict]) -> None:
    """Every core on 2 ranks, for int64, float64 and float32 alike, against numpy on both
    ranks' arrays; dtypes kept, int64 sums exact past 2**53."""
    arrays = [_rank_values(r) for r in range(2)]
    for name in ("int64", "float64", "float32"):
        parts = [a[name] for a in arrays]
        same = [np.resize(p.reshape(-1), 6).reshape(2, 3) for p in parts]
        for rank, result in enumerate(collective_results):
            got = result["sum", name]
            assert got.dtype == parts[0].dtype, name
            np.testing.assert_array_equal(got, same[0] + same[1])
            np.testing.assert_array_equal(result["max", name], np.maximum(*same))
            gathered = result["all_gather", name]
            assert [g.shape for g in gathered] == [p.shape for p in parts], name
            for g, p in zip(gathered, parts, strict=True):
                assert g.dtype == p.dtype
                np.testing.assert_array_equal(g, p)
            if rank == 0:
                for g, p in zip(result["gather", name], parts, strict=True):
                    np.testing.assert_array_equal(g, p)
            else:
                assert result["gather", name] is None
    for result in collective_results:
        in_place, summed = result["tensor"]
        assert in_place
        np.testing.assert_array_equal(summed, np.arange(10) * 3.0)
        np.testing.assert_array_equal(result["broadcast"], np.arange(6).reshape(2, 3))
        assert result["broadcast_tensor"] == [0.0] * 4
        assert result["string"] == "rüns/α"
        assert result["counts"] == [0, 10]


# ---------------------------------------------------------------------------------------------
# process_group: teardown on every exit path


class _Agreed(Exception):
    """Raised by every rank at the same point, as a stop agreed over the ranks."""


def _heartbeat_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "heartbeat"]


def _process_group_worker(rank: int, world: int) -> dict:
    # This test checks the state dist leaves behind, which only torch.distributed can tell.
    import torch.distributed as tdist  # noqa: TID251

    from cluster_pipeline.testing.multiproc import next_rendezvous_port

    out: dict = {}
    for case in ("ok", "error", "agreed", "one_rank_fails"):
        next_rendezvous_port()
        try:
            with dist.process_group(60, 30, together=(_Agreed,)) as ctx:
                out[case, "inside"] = (tdist.is_initialized(), _heartbeat_threads())
                dist.barrier(ctx)
                if case == "error":
                    raise ValueError(f"rank {rank} failed")
                if case == "agreed":
                    raise _Agreed()
                if case == "one_rank_fails":
                    error = ValueError("a bad sample") if rank == 1 else None
                    dist.raise_if_any_rank_failed(ctx, error)
            out[case] = "left"
        except Exception as exc:
            out[case] = f"{type(exc).__name__}: {exc}"
        out[case, "after"] = (tdist.is_initialized(), _heartbeat_threads(), _gloo_threads())
    return out


def test_process_group_tears_down_on_every_exit_path() -> None:
    """A normal end, an error, an error every rank raises together and one rank's error
    spread to all: each leaves torch.distributed uninitialized, no heartbeat thread and no
    gloo thread, and the error goes on as it was."""
    results = run_ranks(2, _process_group_worker, timeout=120)
    for rank, r in enumerate(results):
        assert r["ok"] == "left"
        assert r["error"] == f"ValueError: rank {rank} failed"
        assert r["agreed"] == "_Agreed: "
        spread = "RankFailedError: rank 1 failed: a bad sample"
        assert r["one_rank_fails"] == ("ValueError: a bad sample" if rank else spread)
        for case in ("ok", "error", "agreed", "one_rank_fails"):
            assert r[case, "inside"] == (True, ["heartbeat"]), (case, r[case, "inside"])
            assert r[case, "after"] == (False, [], []), (case, r[case, "after"])


# ---------------------------------------------------------------------------------------------
# Exactly-once extraction across ranks x workers


EXTRACT_WORKERS = (0, 1, 2)
EXTRACT_BATCH = 97  # divides neither 1797 nor any rank's share


def _config(shards: Path, workers: int = 0, batch: int = EXTRACT_BATCH) -> Config:
    return load_config(
        DIGITS_CONFIG,
        [
            f"data.shards={shards}",
            f"data.num_workers={workers}",
            f"data.extract_batch_size={batch}",
        ],
    )


def _seeded_model(cfg: Config) -> ClusterNet:
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.channels, cfg.cluster.k)


def _extract_worker(rank: int, world: int, shards: Path, tiny_shards: Path) -> dict:
    """Per (shard set, workers): this rank's (indices, features) and rank 0's gathered matrix."""
    ctx = dist.init_distributed(DistConfig.timeout_s, DistConfig.heartbeat_timeout_s)
    assert (ctx.rank, ctx.world) == (rank, world)
    out: dict = {}
    for name, root in (("digits", shards), ("tiny", tiny_shards)):
        for workers in EXTRACT_WORKERS:
            cfg = _config(root, workers)
            model = _seeded_model(cfg)
            model.train()
            reader = SampleReader(ShardIndex.load(root), cfg.data.load_size, cfg.data.channels)
            idx, feats, skipped = extract_features(model, reader, cfg, ctx)
            assert model.training, "extract_features must restore train mode"
            assert len(skipped) == 0
            gathered = gather_features(ctx, idx, feats, reader.index.num_samples, skipped)
            out[name, workers] = (idx, feats, None if gathered is None else gathered.feats)
    return out


def _reference_features(shards: Path) -> np.ndarray:
    """Every sample in one forward pass, without the loader, the partition or extract_features."""
    cfg = _config(shards)
    model = _seeded_model(cfg).eval()
    index = ShardIndex.load(shards)
    reader = SampleReader(index, cfg.data.load_size, cfg.data.channels)
    images = torch.from_numpy(reader.read_batch(np.arange(index.num_samples)))
    x = center_crop(to_float(images, cfg.data.mean, cfg.data.std), cfg.data.image_size)
    with torch.no_grad():
        return model.features(x).numpy()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two samples: with three ranks, rank 0's share is empty."""
    full = digits_source()
    source = Source(full.images[:2], full.ext[:2], full.labels[:2], full.classes)
    out = tmp_path_factory.mktemp("tiny")
    write_shards(source, out, samples_per_shard=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_extraction_reads_every_sample_exactly_once(
    world: int, digits_shards: Path, tiny_shards: Path, dist_env: None
) -> None:
    if world == 1:  # this process is the world of one
        results = [_extract_worker(0, 1, digits_shards, tiny_shards)]
    else:
        results = run_ranks(world, _extract_worker, digits_shards, tiny_shards, timeout=120)
    for name, root, n in (("digits", digits_shards, N_DIGITS), ("tiny", tiny_shards, 2)):
        ref = _reference_features(root)
        assert ref.shape == (n, 128)
        for workers in EXTRACT_WORKERS:
            what = f"{name} shards, {world} ranks x {workers} workers"
            per_rank = [r[name, workers] for r in results]
            union = np.concatenate([idx for idx, _, _ in per_rank])
            assert len(union) == n, what
            np.testing.assert_array_equal(np.bincount(union, minlength=n), np.ones(n), what)
            for idx, feats, _ in per_rank:
                assert feats.shape == (len(idx), 128), what
                np.testing.assert_allclose(feats, ref[idx], rtol=0, atol=1e-5, err_msg=what)
            np.testing.assert_allclose(per_rank[0][2], ref, rtol=0, atol=1e-5, err_msg=what)
            assert all(gathered is None for _, _, gathered in per_rank[1:]), what
    if world == 3:  # the case the tiny set exists for: a rank with nothing to read
        assert [len(r["tiny", 2][0]) for r in results] == [0, 1, 1]


# ---------------------------------------------------------------------------------------------
# One DDP step equals one process on the global batch

GLOBAL_BATCH = 16


def _global_batch(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(GLOBAL_BATCH, cfg.data.channels, cfg.data.image_size, cfg.data.image_size,
                    generator=g)  # fmt: skip
    y = torch.randint(0, cfg.cluster.k, (GLOBAL_BATCH,), generator=g)
    return x, y


def _freeze_bn_stats(model: nn.Module) -> None:
    """BatchNorm on running statistics: per-rank batch statistics would differ from the global."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.named_parameters()}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _ddp_worker(rank: int, world: int, shards: Path) -> dict:
    from cluster_pipeline.training.recipe import make_optimizer  # imports sklearn: only here
    from cluster_pipeline.training.step import train_step

    ctx = dist.init_distributed(DistConfig.timeout_s, DistConfig.heartbeat_timeout_s)
    cfg = _config(shards)
    x, y = _global_batch(cfg)
    half = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    out: dict = {}
    for bn in ("frozen", "per_rank"):
        model = _seeded_model(cfg)
        model.train()
        if bn == "frozen":
            _freeze_bn_stats(model)
        ddp = dist.wrap_ddp(ctx, model)
        assert type(ddp).__name__ == "DistributedDataParallel" and ddp.module is model
        optimizer = make_optimizer(model, cfg, GLOBAL_BATCH)
        loss, _accuracy = train_step(ddp, optimizer, x[half], y[half])
        out[bn] = {"params": _params(model), "loss": float(loss)}
    return out


@pytest.fixture(scope="module")
def ddp_results(digits_shards: Path) -> list[dict]:
    return run_ranks(2, _ddp_worker, digits_shards, timeout=90)


def test_ddp_step_equals_one_process_on_global_batch(
    ddp_results: list[dict], digits_shards: Path
) -> None:
    """Two ranks on 8 images each take the step one process takes on all 16.

    BatchNorm uses running statistics here: SyncBatchNorm (model.sync_bn) rejects CPU tensors, so
    on gloo the batch statistics cannot be shared. `per_rank` below covers train-mode BatchNorm.
    """
    from cluster_pipeline.training.recipe import make_optimizer
    from cluster_pipeline.training.step import train_step

    results = ddp_results
    cfg = _config(digits_shards)
    x, y = _global_batch(cfg)
    model = _seeded_model(cfg)
    initial = _params(model)
    model.train()
    _freeze_bn_stats(model)
    optimizer = make_optimizer(model, cfg, GLOBAL_BATCH)
    train_step(model, optimizer, x, y)
    want = _params(model)

    half_only = _seeded_model(cfg)
    _freeze_bn_stats(half_only)
    train_step(half_only, make_optimizer(half_only, cfg, GLOBAL_BATCH), x[:8], y[:8])
    for rank, result in enumerate(results):
        got = result["frozen"]["params"]
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6,
                                       err_msg=f"rank {rank} {name}")  # fmt: skip
    # The comparison can fail: the step moved the weights far beyond the tolerance, and a step on
    # one rank's half alone (gradients not averaged) lands elsewhere.
    assert _max_diff(want, initial) > 1e-3
    assert _max_diff(want, _params(half_only)) > 1e-3


def test_ddp_step_with_per_rank_batchnorm_averages_rank_gradients(
    ddp_results: list[dict], digits_shards: Path
) -> None:
    """Train-mode BatchNorm under DDP: each rank normalizes its own 8 images, gradients averaged.

    The reference is one process minimizing the mean of the two halves' losses, each half
    through BatchNorm with its own batch statistics.
    """
    from cluster_pipeline.training.recipe import make_optimizer
    from cluster_pipeline.training.step import train_step

    results = ddp_results
    cfg = _config(digits_shards)
    x, y = _global_batch(cfg)
    model = _seeded_model(cfg)
    model.train()
    optimizer = make_optimizer(model, cfg, GLOBAL_BATCH)
    halves = [F.cross_entropy(model(x[s : s + 8]), y[s : s + 8]) for s in (0, 8)]
    optimizer.zero_grad()
    ((halves[0] + halves[1]) / 2).backward()
    optimizer.step()
    want = _params(model)
    # Per-half batch statistics matter: the full-batch train-mode step is far from this one.
    whole = _seeded_model(cfg)
    train_step(whole, make_optimizer(whole, cfg, GLOBAL_BATCH), x, y)
    assert _max_diff(want, _params(whole)) > 1e-3
    for rank, result in enumerate(results):
        assert result["per_rank"]["loss"] == pytest.approx(float(halves[rank].detach()), abs=1e-6)
        for name, value in want.items():
            np.testing.assert_allclose(result["per_rank"]["params"][name], value, rtol=0,
                                       atol=1e-6, err_msg=f"rank {rank} {name}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# shutdown frees the process group


def _gloo_threads() -> list[str]:
    names = []
    for t in Path("/proc/self/task").iterdir():
        try:  # a thread that ends between the listing and the read has no comm left
            names.append((t / "comm").read_text().strip())
        except FileNotFoundError:
            continue
    return [n for n in names if "gloo" in n]


def _shutdown_worker(rank: int, world: int) -> dict:
    ctx = dist.init_distributed(timeout_s=60, heartbeat_timeout_s=0)
    w = torch.zeros(3, requires_grad=True)
    # An optimizer's first step imports torch._dynamo, and with it torch.distributed.nn, after
    # the group exists: that once kept the group (and gloo's threads) alive past shutdown.
    torch.optim.SGD([w], lr=0.1).step(lambda: dist.all_reduce(ctx, torch.ones(4)).sum())
    running = _gloo_threads()
    dist.shutdown(ctx)
    return {"running": running, "after": _gloo_threads()}


@pytest.mark.slow
def test_shutdown_joins_gloo_threads_after_an_optimizer_step() -> None:
    """A gloo worker thread alive at interpreter exit can abort the rank with SIGABRT while it
    releases a finished collective's tensor (seen in CI); shutdown must leave none running."""
    for r in run_ranks(2, _shutdown_worker):
        assert r["running"] and r["after"] == [], r


TEARDOWNS = 12


def _teardown_worker(rank: int, world: int) -> int:
    """TEARDOWNS times: a process group, a DDP step, small broadcasts, shutdown, then the DDP
    wrapper freed, which frees the group it still holds (holding the GIL)."""
    port = int(os.environ["MASTER_PORT"])
    for i in range(TEARDOWNS):
        os.environ["MASTER_PORT"] = str(port + 1 + i)  # a fresh store each time
        ctx = dist.init_distributed(timeout_s=60, heartbeat_timeout_s=0)
        model = nn.Linear(4, 4)
        ddp = dist.wrap_ddp(ctx, model)
        ddp(torch.ones(8, 4)).sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        for _ in range(3):
            dist.broadcast_string(ctx, "run dir" if ctx.is_main else None)
        dist.shutdown(ctx)
        del ddp
    return TEARDOWNS


@pytest.mark.slow
def test_process_group_teardown_never_hangs() -> None:
    """A gloo worker thread that drops a finished broadcast's tensors takes the GIL; the main
    thread freeing the group (DDP's reducer holds it past shutdown) joins that worker holding
    the GIL. A rank once hung there at the end of a finished run on a loaded machine, and this
    loop without shutdown's pause hung within 5 to 12 teardowns beside two busy processes."""
    assert run_ranks(2, _teardown_worker, timeout=120) == [TEARDOWNS] * 2
