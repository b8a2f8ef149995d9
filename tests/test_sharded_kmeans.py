"""cluster.mode=sharded (sharded.py) against gather mode (kmeans.cluster_features), on 1,
2 and 3 real gloo ranks holding uneven, shuffled shares of the samples: the same bits.

The worker runs every case in one process group and returns the results; the worker function
is module-level so the spawned processes can import it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans, pca, ranks
from cluster_pipeline.clustering.exact import fixed_point_scale
from cluster_pipeline.clustering.metrics import nmi
from cluster_pipeline.clustering.sharded import Ranks, Shard, cluster_shard
from cluster_pipeline.clustering.split import split_empty_clusters, split_empty_clusters_keyed
from cluster_pipeline.config import ClusterConfig, DistConfig
from cluster_pipeline.features.gather import all_gather_labels, gather_features
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import launcher_env, run_ranks

REPO = Path(__file__).resolve().parent.parent

# Blobs: N samples of which SKIPPED were unreadable; rank 0 holds RANK0_ROWS of the rest.
N, D, K, PCA_DIM, NITER, SEED = 3000, 32, 15, 16, 10, 7
SKIPPED, RANK0_ROWS = 6, 700
# Duplicates: 60 distinct points, 5 copies each, into 100 clusters: at least 40 start empty.
DUP_DISTINCT, DUP_COPIES, DUP_K = 60, 5, 100
# PCA on a sample: the fit's row cap, lowered from 200k so that 3000 rows are sampled.
PCA_CAP = 400
# The `cluster` sections of the blobs and of the duplicates (CPU: the bits are promised there).
BLOBS = ClusterConfig(k=K, pca_dim=PCA_DIM, niter=NITER, use_gpu=False)
DUP = ClusterConfig(k=DUP_K, pca_dim=0, l2_normalize=False, niter=5, use_gpu=False)
# Spherical k-means on L2-normalized rows (DeepCluster-v2's), with each backend.
SPHERICAL = ClusterConfig(k=K, pca_dim=0, spherical=True, niter=NITER, use_gpu=False)


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian blobs: Lloyd's iterations move many points (checked below)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, D)) * 3.0
    truth = rng.integers(0, K, N)
    return (centers[truth] + 2.0 * rng.normal(size=(N, D))).astype(np.float32), truth


def share(rank: int, world: int, n: int, n_skipped: int, rank0_rows: int):
    """This rank's (sample indices, skipped indices): shuffled, uneven, never contiguous.

    Rank 0 holds `rank0_rows` rows; with 3 ranks rank 1 holds a third of the rest."""
    perm = np.random.default_rng(1).permutation(n).astype(np.int64)
    skipped, kept = perm[:n_skipped], perm[n_skipped:]
    if world == 1:
        return kept, skipped
    rest = len(kept) - rank0_rows
    rows = [0, rank0_rows, *[rank0_rows + rest * r // 3 for r in range(1, world - 1)], len(kept)]
    skips = [len(skipped) * r // (world + 1) for r in range(world)] + [len(skipped)]
    return kept[rows[rank] : rows[rank + 1]], skipped[skips[rank] : skips[rank + 1]]


def duplicates() -> np.ndarray:
    base = np.random.default_rng(2).normal(size=(DUP_DISTINCT, 8)).astype(np.float32)
    return np.repeat(base, DUP_COPIES, axis=0)


def low_rank(n: int = N, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(n, 3)) * np.array([3.0, 2.0, 1.0])
    return (z @ rng.normal(size=(3, d)) + 0.01 * rng.normal(size=(n, d)) + 5.0).astype(np.float32)


def _worker(rank: int, world: int) -> dict:
    ctx = dist.init_distributed(DistConfig.timeout_s, DistConfig.heartbeat_timeout_s)
    assert (ctx.rank, ctx.world) == (rank, world)
    out: dict = {}

    # Blobs: sharded mode, and gather mode through the real gather on rank 0.
    x, _ = blobs()
    idx, skipped = share(rank, world, N, SKIPPED, RANK0_ROWS)
    c = cluster_shard(ctx, Shard(idx, x[idx], skipped, N), BLOBS, SEED)
    labels = all_gather_labels(ctx, idx, c.labels, skipped, N)
    out["blobs"] = {"labels": labels, "centroids": c.centroids, "loss": c.loss,
                    "n_empty": c.n_empty_before_split}  # fmt: skip
    gathered = gather_features(ctx, idx, x[idx], N, skipped)
    if gathered is not None:
        g = kmeans.cluster_features(gathered.feats, BLOBS, SEED, index=gathered.index)
        out["gather"] = {"labels": gathered.per_sample(g.labels), "centroids": g.centroids,
                         "loss": g.loss, "n_empty": g.n_empty_before_split}  # fmt: skip

    # Spherical, on both backends.
    for case, backend in (("spherical", "faiss"), ("spherical_torch", "torch")):
        cfg = dataclasses.replace(SPHERICAL, backend=backend)
        c = cluster_shard(ctx, Shard(idx, x[idx], skipped, N), cfg, SEED)
        out[case] = {"labels": all_gather_labels(ctx, idx, c.labels, skipped, N),
                     "centroids": c.centroids, "n_empty": c.n_empty_before_split}  # fmt: skip

    # Duplicates with k close to N: empty clusters that only the coins can fill.
    xd = duplicates()
    n_dup = len(xd)
    idx, _ = share(rank, world, n_dup, 0, 111)
    c = cluster_shard(ctx, Shard(idx, xd[idx], idx[:0], n_dup), DUP, SEED)
    out["dup"] = {"labels": all_gather_labels(ctx, idx, c.labels, idx[:0], n_dup),
                  "centroids": c.centroids, "n_empty": c.n_empty_before_split}  # fmt: skip

    # The split alone, on distinct points, against split.split_empty_clusters (rank 0).
    rng = np.random.default_rng(4)
    xs = rng.normal(size=(500, 8)).astype(np.float32)
    start = rng.integers(0, 3, size=500)  # clusters 3..11 empty
    cs = np.stack([xs[start == j].mean(axis=0) for j in range(3)] + [np.zeros(8)] * 9)
    cs = cs.astype(np.float32)
    idx, _ = share(rank, world, 500, 0, 137)
    scale = fixed_point_scale(float(np.abs(xs).max()), 500)
    lab, cen, n_empty = split_empty_clusters_keyed(
        Ranks(ctx), xs[idx], idx, start[idx], cs, scale, seed=SEED
    )
    out["split"] = {"labels": all_gather_labels(ctx, idx, lab, idx[:0], 500),
                    "centroids": cen, "n_empty": n_empty}  # fmt: skip
    if ctx.is_main:
        out["split_ref"] = split_empty_clusters(xs, start, cs, np.random.default_rng(SEED))

    # PCA fitted on a sample of about PCA_CAP rows of every rank, gathered to rank 0.
    pca.PCA_FIT_MAX_ROWS = PCA_CAP  # this spawned process only
    sampled: list[int] = []
    real_gather_rows = ranks.gather_rows

    def counting_gather_rows(ctx_, index, rows):
        result = real_gather_rows(ctx_, index, rows)
        if result is not None:
            sampled.append(len(result[0]))
        return result

    ranks.gather_rows = counting_gather_rows
    xl = low_rank()
    idx, _ = share(rank, world, N, 0, RANK0_ROWS)
    fitted = pca.fit_pca_on_sample(Ranks(ctx), idx, xl[idx], N, 3, True, SEED)
    ranks.gather_rows = real_gather_rows
    out["pca"] = {"mean": fitted.mean, "proj": fitted.proj, "sampled": sampled}

    # A sample labeled twice and one never: every rank raises, naming both.
    shares = {1: [[0, 1, 2, 4, 4, 3]], 2: [[0, 1, 2, 4], [4, 3]], 3: [[0, 1], [2, 4], [4, 3]]}
    bad = shares[world][rank]
    try:
        all_gather_labels(ctx, np.asarray(bad), np.zeros(len(bad), np.int64), idx[:0], 6)
        out["coverage"] = "no error"
    except RuntimeError as exc:
        out["coverage"] = str(exc)
    return out


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(2, _worker, timeout=120)


@pytest.fixture(scope="module")
def world1() -> dict:
    return run_ranks(1, _worker, timeout=120)[0]


@pytest.fixture(scope="module")
def world3() -> list[dict]:
    return run_ranks(3, _worker, timeout=120)


def test_sharded_assignments_equal_gather_mode(world2: list[dict]) -> None:
    sharded, gather = world2[0]["blobs"], world2[0]["gather"]
    # One algorithm (kmeans.cluster): the ranks as holders, or rank 0 holding every row.
    np.testing.assert_array_equal(sharded["labels"], gather["labels"])
    np.testing.assert_array_equal(sharded["centroids"], gather["centroids"])
    assert sharded["loss"] == gather["loss"]
    assert sharded["n_empty"] == gather["n_empty"] == 0
    assert (sharded["labels"] == -1).sum() == SKIPPED  # skipped samples: label -1
    # The comparison means something: the 10 iterations moved many points away from the
    # assignment to the initial centroids, and the clustering found the blobs.
    x, truth = blobs()
    one_step = kmeans.cluster_features(x, dataclasses.replace(BLOBS, niter=1), SEED)
    kept = sharded["labels"] >= 0
    assert (one_step.labels[kept] != sharded["labels"][kept]).mean() > 0.01
    assert nmi(truth[kept], sharded["labels"][kept]) > 0.8


def test_every_rank_gets_the_same_labels_and_centroids(world2: list[dict]) -> None:
    for case in ("blobs", "dup", "split", "spherical"):
        a, b = (r[case] for r in world2)
        np.testing.assert_array_equal(a["labels"], b["labels"], err_msg=case)
        np.testing.assert_array_equal(a["centroids"], b["centroids"], err_msg=case)
        assert a["n_empty"] == b["n_empty"], case


@pytest.mark.parametrize("world", [2, 3])
def test_one_rank_equals_more_ranks_exactly(
    world1: dict, world2: list[dict], world3: list[dict], world: int
) -> None:
    """Choices keyed by sample index, exact products and integer sums: no bit of the labels,
    centroids, loss or PCA depends on the world size or on where a row sits on its rank."""
    many = {2: world2, 3: world3}[world][0]
    for case in ("blobs", "dup", "split", "spherical", "spherical_torch"):
        one, other = world1[case], many[case]
        np.testing.assert_array_equal(one["labels"], other["labels"], err_msg=case)
        np.testing.assert_array_equal(one["centroids"], other["centroids"], err_msg=case)
        assert one["n_empty"] == other["n_empty"], case
    assert world1["blobs"]["loss"] == many["blobs"]["loss"]
    np.testing.assert_array_equal(world1["pca"]["proj"], many["pca"]["proj"])
    np.testing.assert_array_equal(world1["pca"]["mean"], many["pca"]["mean"])


def test_spherical_kmeans_has_unit_centroids_and_assigns_by_dot_product(
    world2: list[dict],
) -> None:
    """cluster.spherical: unit-length centroids, each point with the centroid of largest dot
    product; the same bits with the torch backend; not what Euclidean k-means gives."""
    sph = world2[0]["spherical"]
    np.testing.assert_array_equal(sph["labels"], world2[0]["spherical_torch"]["labels"])
    np.testing.assert_array_equal(sph["centroids"], world2[0]["spherical_torch"]["centroids"])
    np.testing.assert_allclose(np.linalg.norm(sph["centroids"], axis=1), 1.0, atol=1e-6)
    x, _ = blobs()
    kept = sph["labels"] >= 0
    unit = x[kept] / np.linalg.norm(x[kept], axis=1, keepdims=True)
    dots = unit @ sph["centroids"].T
    best = dots.max(axis=1)
    mine = dots[np.arange(len(unit)), sph["labels"][kept]]
    assert (mine >= best - 1e-6).all()  # no point has a centroid of clearly larger dot
    assert sph["n_empty"] == 0 and len(np.unique(sph["labels"][kept])) == K
    plain = kmeans.cluster_features(x, dataclasses.replace(SPHERICAL, spherical=False), SEED)
    assert not np.allclose(np.linalg.norm(plain.centroids, axis=1), 1.0, atol=1e-3)


def test_split_leaves_no_empty_cluster_with_duplicates(world2: list[dict]) -> None:
    dup = world2[0]["dup"]
    sizes = np.bincount(dup["labels"], minlength=DUP_K)
    assert len(sizes) == DUP_K and sizes.min() >= 1
    assert dup["n_empty"] >= DUP_K - DUP_DISTINCT
    # Splitting copies never mixes distinct points: each cluster holds copies of one point.
    point = np.repeat(np.arange(DUP_DISTINCT), DUP_COPIES)
    for c in range(DUP_K):
        assert len(np.unique(point[dup["labels"] == c])) == 1, c
    np.testing.assert_allclose(dup["centroids"][dup["labels"]], duplicates(), atol=1e-6)


def test_split_on_distinct_points_equals_gather_mode_split(world2: list[dict]) -> None:
    """Same donors, same perturbations, same points moved: the coins are only for duplicates."""
    split = world2[0]["split"]
    ref_labels, ref_centroids, ref_empty = world2[0]["split_ref"]
    assert split["n_empty"] == ref_empty == 9
    np.testing.assert_array_equal(split["labels"], ref_labels)
    np.testing.assert_allclose(split["centroids"], ref_centroids, rtol=0, atol=1e-6)
    assert np.bincount(split["labels"], minlength=12).min() >= 1


def test_pca_fitted_on_a_sample_is_close_to_the_full_pca(world2: list[dict]) -> None:
    x = low_rank()
    full = pca.fit_pca(x, 3, whiten=True)  # every row (3000 < 200k)
    rank0, rank1 = (r["pca"] for r in world2)
    # About PCA_CAP of the 3000 rows were sent to rank 0 (binomial: +-4 sigma), not all.
    (sampled,) = rank0["sampled"]
    assert abs(sampled - PCA_CAP) < 4 * np.sqrt(PCA_CAP), sampled
    assert rank1["sampled"] == []
    np.testing.assert_array_equal(rank0["proj"], rank1["proj"])  # broadcast, not refitted
    np.testing.assert_array_equal(rank0["mean"], rank1["mean"])

    def projector(basis: np.ndarray) -> np.ndarray:
        q, _ = np.linalg.qr(basis.astype(np.float64))
        return q @ q.T

    assert np.abs(projector(rank0["proj"]) - projector(full.proj)).max() < 1e-2
    np.testing.assert_allclose(rank0["mean"], full.mean, atol=0.2)
    # Whitening scales from the sample: within sampling error of the full data's.
    ratio = np.linalg.norm(rank0["proj"], axis=0) / np.linalg.norm(full.proj, axis=0)
    np.testing.assert_allclose(ratio, 1.0, atol=0.15)


def test_labels_of_a_sample_seen_twice_or_never_raise_on_every_rank(
    world1: dict, world2: list[dict], world3: list[dict]
) -> None:
    for result in (world1, *world2, *world3):
        assert "1 missing, 1 duplicated (first [4, 5])" in result["coverage"]


# ------------------------------------------------------------------------------ end to end


def _train(shards: Path, run_dir: Path, *overrides: str) -> None:
    env = launcher_env()
    res = subprocess.run(
        [sys.executable, "-m", "launch.local", "--nproc", "2", "train", "--config",
         "configs/digits_test.yaml", f"data.shards={shards}", f"run.dir={run_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=limit(240),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_two_rank_sharded_run_has_no_empty_cluster_and_matches_gather(
    digits_shards: Path, tmp_path: Path
) -> None:
    """torchrun, 2 ranks, digits: cluster.mode=sharded trains; its first clustering (same
    model, same features) equals gather mode's."""
    _train(digits_shards, tmp_path / "sharded", "cluster.mode=sharded")
    _train(digits_shards, tmp_path / "gather", "cluster.mode=gather", "train.epochs=1")
    rows = [
        json.loads(x) for x in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [0, 1]
    for epoch, row in enumerate(rows):
        labels = np.load(tmp_path / "sharded" / "assignments" / f"epoch-{epoch:04d}.npy")
        sizes = np.bincount(labels, minlength=20)
        assert len(labels) == 1797 and len(sizes) == 20 and sizes.min() >= 1
        assert row["n_empty_clusters"] == 0 and row["k"] == 20
        assert row["cluster_size_min"] == sizes.min() and row["time_gather_s"] < 1.0
    gather0 = np.load(tmp_path / "gather" / "assignments" / "epoch-0000.npy")
    sharded0 = np.load(tmp_path / "sharded" / "assignments" / "epoch-0000.npy")
    np.testing.assert_array_equal(sharded0, gather0)
