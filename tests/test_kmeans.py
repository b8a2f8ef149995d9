"""The clustering package as pure functions on arrays: NumPy (and faiss inside search.py) only,
no torch. The clustering step reads its parameters from the config's `cluster` section."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from cluster_pipeline.clustering import exact, metrics
from cluster_pipeline.clustering import kmeans as km
from cluster_pipeline.clustering import pca as pca_module
from cluster_pipeline.clustering.exact import squared_distances
from cluster_pipeline.clustering.kmeans import cluster_features
from cluster_pipeline.clustering.metrics import nmi
from cluster_pipeline.clustering.pca import fit_pca, l2_normalize, pca_whiten
from cluster_pipeline.clustering.search import assign, faiss_kmeans
from cluster_pipeline.clustering.split import split_empty_clusters
from cluster_pipeline.config import ClusterConfig

# The modules of the clustering step that know nothing of torch (sharded.py talks to `dist`).
PURE = ("kmeans", "exact", "keys", "pca", "search", "split", "holders")


def section(k: int, **fields) -> ClusterConfig:
    """The `cluster` section of a CPU run: the defaults but for `k` and `fields`."""
    return ClusterConfig(k=k, use_gpu=False, **fields)


def brute_force_sq_dist(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, k) squared L2 distances in float64, the reference for faiss."""
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def low_rank_gaussian(n: int, d: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, rank)) * np.linspace(3.0, 1.0, rank)  # distinct variances
    mix = rng.normal(size=(rank, d))
    return (z @ mix + 0.01 * rng.normal(size=(n, d)) + 5.0).astype(np.float32)


def subspace_projector(basis: np.ndarray) -> np.ndarray:
    """Orthogonal projector onto the column span of `basis`."""
    q, _ = np.linalg.qr(basis.astype(np.float64))
    return q @ q.T


def blobs(n_per: int, k: int, d: int, seed: int, spread: float = 0.05):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 10.0
    truth = np.repeat(np.arange(k), n_per)
    x = centers[truth] + spread * rng.normal(size=(len(truth), d))
    perm = rng.permutation(len(truth))
    return x[perm].astype(np.float32), truth[perm]


@pytest.mark.parametrize("module", PURE)
def test_clustering_modules_do_not_import_torch(module: str):
    code = f"import sys, cluster_pipeline.clustering.{module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_config_does_not_import_clustering():
    """clustering may name the config's type; the config never imports clustering (no cycle)."""
    code = (
        "import sys, cluster_pipeline.config; "
        "sys.exit(any(m.startswith('cluster_pipeline.clustering') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------- PCA / whitening


def test_pca_whiten_output_dim_and_dtype():
    x = np.random.default_rng(0).normal(size=(300, 16))  # float64 in, float32 out
    out = pca_whiten(x, 5)
    assert out.shape == (300, 5)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous


def test_whitened_output_has_identity_covariance():
    rng = np.random.default_rng(1)
    # Anisotropic full-rank Gaussian: variances from 100 down to 0.25, correlated by a rotation.
    rot, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    x = (rng.normal(size=(4000, 16)) * np.geomspace(10.0, 0.5, 16)) @ rot.T
    out = pca_whiten(x.astype(np.float32), 8, whiten=True, l2=False)
    cov = np.cov(out.T.astype(np.float64))
    np.testing.assert_allclose(cov, np.eye(8), atol=2e-3)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-3)


def test_pca_without_whitening_keeps_top_variances_in_order():
    rng = np.random.default_rng(2)
    scales = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    x = (rng.normal(size=(5000, 6)) * scales).astype(np.float32)
    out = pca_whiten(x, 3, whiten=False, l2=False)
    var = out.astype(np.float64).var(axis=0, ddof=1)
    np.testing.assert_allclose(var, scales[:3] ** 2, rtol=0.08)
    assert var[0] > var[1] > var[2]


def test_pca_matches_numpy_svd_subspace_for_low_rank_gaussian():
    x = low_rank_gaussian(2000, 20, rank=3, seed=3)
    pca = fit_pca(x, 3, whiten=True)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), rtol=1e-5, atol=1e-5)
    xc = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = subspace_projector(vt[:3].T)
    got = subspace_projector(pca.proj)
    assert np.abs(got - ref).max() < 1e-3
    # Each direction individually, not just the span: principal axes are in SVD order.
    for j in range(3):
        cos = abs(np.dot(pca.proj[:, j], vt[j])) / np.linalg.norm(pca.proj[:, j])
        assert cos > 0.999


def test_float32_pca_of_the_gpu_path_agrees_with_the_exact_one():
    """cluster() fits and applies its PCA with float32 BLAS when the search runs on GPUs
    (PCA.exact=False): the same projection up to float32 rounding (and each axis's sign)."""
    x = low_rank_gaussian(3000, 20, rank=3, seed=3)
    exact, fast = fit_pca(x, 3), fit_pca(x, 3, exact=False)
    assert exact.exact and not fast.exact
    a, b = exact.apply(x), fast.apply(x)
    signs = np.sign((a * b).sum(axis=0))
    np.testing.assert_allclose(b * signs, a, rtol=0, atol=1e-5 * np.abs(a).max())
    assert not np.array_equal(b * signs, a)  # really another computation


def test_pca_fit_on_row_subsample_still_finds_subspace(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pca_module, "PCA_FIT_MAX_ROWS", 500)
    x = low_rank_gaussian(3000, 12, rank=2, seed=4)
    pca = fit_pca(x, 2, seed=0)
    xc = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    assert np.abs(subspace_projector(pca.proj) - subspace_projector(vt[:2].T)).max() < 1e-2
    assert pca.apply(x).shape == (3000, 2)  # applied to every row, not only the fitted ones


def test_l2_rows_have_unit_norm():
    x = np.random.default_rng(5).normal(size=(500, 10)) * 7.0
    out = pca_whiten(x, 4, l2=True)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(x), axis=1), 1.0, atol=1e-12)


def test_l2_normalize_leaves_zero_rows_finite():
    out = l2_normalize(np.zeros((3, 4), dtype=np.float32))
    assert np.isfinite(out).all()


def test_pca_dim_zero_keeps_dims():
    x = np.random.default_rng(6).normal(size=(50, 7)).astype(np.float32)
    np.testing.assert_array_equal(pca_whiten(x, 0, l2=False), x)
    out = pca_whiten(x, 0, l2=True)
    assert out.shape == (50, 7)
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("dim", [17, 100])
def test_pca_dim_above_feature_dim_raises(dim: int):
    x = np.random.default_rng(7).normal(size=(200, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="16"):
        pca_whiten(x, dim)
    with pytest.raises(ValueError):
        fit_pca(x, dim)


# ----------------------------------------------------------------------- split_empty_clusters


def test_split_fills_every_empty_cluster():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    k = 10
    labels = rng.integers(0, 3, size=60)  # clusters 3..9 empty
    centroids = rng.normal(size=(k, 4)).astype(np.float32)
    labels_in, centroids_in = labels.copy(), centroids.copy()
    new_labels, new_centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(0)
    )
    assert n_empty == 7
    assert new_labels.shape == (60,)
    assert np.bincount(new_labels, minlength=k).min() >= 1
    assert new_centroids.shape == (k, 4)
    # Inputs are not modified in place.
    np.testing.assert_array_equal(labels, labels_in)
    np.testing.assert_array_equal(centroids, centroids_in)
    # A point either stays or moves to a formerly empty cluster.
    moved = new_labels != labels
    assert np.isin(new_labels[moved], np.arange(3, 10)).all()
    # Every touched cluster's centroid is the mean of its points.
    for c in np.unique(np.concatenate([np.arange(3, 10), labels[moved]])):
        np.testing.assert_allclose(new_centroids[c], x[new_labels == c].mean(axis=0), atol=1e-5)


def test_split_reports_empty_count_with_scattered_empties():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    k = 8
    labels = rng.choice([0, 2, 5], size=40)  # 1, 3, 4, 6, 7 empty
    labels[:3] = [0, 2, 5]
    centroids = rng.normal(size=(k, 3)).astype(np.float32)
    new_labels, _, n_empty = split_empty_clusters(x, labels, centroids, np.random.default_rng(1))
    assert n_empty == 5
    assert np.bincount(new_labels, minlength=k).min() >= 1


def test_split_with_no_empty_cluster_is_identity():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    labels = np.arange(30) % 5
    centroids = rng.normal(size=(5, 3)).astype(np.float32)
    new_labels, new_centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(0)
    )
    assert n_empty == 0
    np.testing.assert_array_equal(new_labels, labels)
    np.testing.assert_array_equal(new_centroids, centroids)


def test_split_with_all_points_identical():
    x = np.ones((30, 5), dtype=np.float32) * 3.0
    k = 10
    labels = np.zeros(30, dtype=np.int64)
    centroids = np.zeros((k, 5), dtype=np.float32)
    centroids[0] = 3.0
    new_labels, new_centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(0)
    )
    assert n_empty == 9
    assert np.bincount(new_labels, minlength=k).min() >= 1
    np.testing.assert_allclose(new_centroids, 3.0)  # every centroid is the (single) point


def test_split_with_many_copies_of_few_points():
    rng = np.random.default_rng(11)
    base = rng.normal(size=(5, 6)).astype(np.float32)
    x = np.repeat(base, 8, axis=0)  # 40 points, 5 distinct values
    k = 38
    labels = np.repeat(np.arange(5), 8)
    centroids = np.zeros((k, 6), dtype=np.float32)
    centroids[:5] = base
    new_labels, new_centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(0)
    )
    assert n_empty == 33
    sizes = np.bincount(new_labels, minlength=k)
    assert sizes.min() >= 1 and sizes.sum() == 40
    # Splitting duplicates never mixes distinct values: each cluster holds copies of one point.
    for c in range(k):
        members = x[new_labels == c]
        np.testing.assert_array_equal(members, np.broadcast_to(members[0], members.shape))
        np.testing.assert_allclose(new_centroids[c], members[0], atol=1e-6)


@pytest.mark.parametrize("identical", [False, True])
def test_split_with_n_equal_k_gives_one_point_per_cluster(identical: bool):
    rng = np.random.default_rng(12)
    k = 12
    x = np.zeros((k, 3), np.float32) if identical else rng.normal(size=(k, 3)).astype(np.float32)
    labels = np.zeros(k, dtype=np.int64)
    labels[7:] = 4  # two non-empty clusters, ten empty
    centroids = rng.normal(size=(k, 3)).astype(np.float32)
    new_labels, new_centroids, n_empty = split_empty_clusters(
        x, labels, centroids, np.random.default_rng(3)
    )
    assert n_empty == 10
    np.testing.assert_array_equal(np.bincount(new_labels, minlength=k), np.ones(k))
    np.testing.assert_allclose(new_centroids[new_labels], x, atol=1e-6)


def test_split_is_deterministic_for_a_seed():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    labels = rng.integers(0, 2, size=50)
    centroids = rng.normal(size=(9, 4)).astype(np.float32)
    a = split_empty_clusters(x, labels, centroids, np.random.default_rng(5))
    b = split_empty_clusters(x, labels, centroids, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_split_with_fewer_points_than_clusters_raises():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="5 clusters from 4 points"):
        split_empty_clusters(
            x, np.zeros(4, np.int64), np.zeros((5, 2), np.float32), np.random.default_rng(0)
        )


# --------------------------------------------------------------------------- cluster_features


@pytest.mark.parametrize("pca_dim", [0, 4])
def test_cluster_features_duplicates_with_k_close_to_n(pca_dim: int):
    rng = np.random.default_rng(14)
    feats = np.repeat(rng.normal(size=(5, 8)), 8, axis=0)  # 40 points, 5 distinct values
    k = 38
    res = cluster_features(feats, section(k, pca_dim=pca_dim, niter=5), seed=0)
    assert res.labels.shape == (40,)
    assert res.labels.dtype == np.int32
    assert np.bincount(res.labels, minlength=k).min() >= 1
    assert res.labels.max() < k
    # At most 5 clusters can be non-empty after assignment, so at least 33 were split.
    assert res.n_empty_before_split >= 33
    assert res.centroids.shape == (k, pca_dim or 8)
    # Copies of one point share a value; clusters never mix distinct values.
    point_id = np.repeat(np.arange(5), 8)
    for c in range(k):
        assert len(np.unique(point_id[res.labels == c])) == 1
    assert res.loss == pytest.approx(0.0, abs=1e-6)


def test_cluster_features_labels_cover_all_points_when_faiss_subsamples():
    rng = np.random.default_rng(15)
    feats = rng.normal(size=(5000, 16)).astype(np.float32)
    k, pca_dim = 10, 8
    # faiss trains on k * 39 = 390 points; the labels must still cover all 5000.
    res = cluster_features(
        feats, section(k, pca_dim=pca_dim, niter=10, max_points_per_centroid=39), seed=0
    )
    assert res.labels.shape == (5000,)
    assert res.n_empty_before_split == 0
    assert np.bincount(res.labels, minlength=k).min() >= 1
    x = pca_whiten(feats, pca_dim, seed=0)
    d2 = brute_force_sq_dist(x, res.centroids)
    nearest = d2.argmin(axis=1)
    # Every label is a nearest centroid (float32 ties aside) ...
    np.testing.assert_allclose(
        d2[np.arange(5000), res.labels], d2.min(axis=1), rtol=1e-5, atol=1e-6
    )
    # ... and in practice the very same one.
    assert (res.labels == nearest).mean() > 0.999
    assert res.loss == pytest.approx(d2[np.arange(5000), res.labels].mean(), rel=1e-4)


def test_cluster_features_k_above_n_raises_naming_k():
    feats = np.random.default_rng(16).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k=11.*10"):
        cluster_features(feats, section(11, pca_dim=0), seed=0)
    with pytest.raises(ValueError, match="k=11"):
        faiss_kmeans(feats, 11, use_gpu=False)


def test_cluster_features_k_equal_n_gives_singletons():
    feats = np.random.default_rng(17).normal(size=(15, 4)).astype(np.float32)
    res = cluster_features(feats, section(15, pca_dim=0, niter=5), seed=0)
    np.testing.assert_array_equal(np.sort(res.labels), np.arange(15))


def test_cluster_features_separated_blobs_give_nmi_one():
    x, truth = blobs(n_per=100, k=5, d=8, seed=18)
    # faiss starts from k random points (no k-means++, one run), so a single seed can stop in a
    # local minimum that merges two blobs. Keep the lowest-loss of a few seeds, as nredo would:
    # that also checks `loss` ranks the solutions correctly.
    runs = [cluster_features(x, section(5, pca_dim=4, niter=20), seed=s) for s in range(4)]
    best = min(runs, key=lambda r: r.loss)
    assert nmi(best.labels, truth) > 0.99
    assert best.n_empty_before_split == 0
    assert best.loss < 1e-3  # points sit on their blob centres in the whitened, L2 space


def test_cluster_features_is_deterministic_for_a_seed():
    x, _ = blobs(n_per=50, k=6, d=8, seed=19, spread=1.0)
    a = cluster_features(x, section(6, pca_dim=4, niter=5), seed=3)
    b = cluster_features(x, section(6, pca_dim=4, niter=5), seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


FIELDS = dict(k=23, pca_dim=5, whiten=False, l2_normalize=False, niter=4,
              max_points_per_centroid=8)  # fmt: skip


@pytest.mark.parametrize("field", [*FIELDS, "split_eps"])
def test_cluster_features_reads_each_field_of_its_section(
    monkeypatch: pytest.MonkeyPatch, field: str
):
    """The step takes the `cluster` section, not a list of loose arguments: changing any one
    of its fields changes the clustering (split_eps: reaches the split, which these distinct
    points never need)."""
    rng = np.random.default_rng(21)
    centres = np.repeat(rng.normal(size=(4, 8)) * 5, 30, axis=0)
    x = (centres + 0.3 * rng.normal(size=(120, 8))).astype(np.float32)
    base = section(24, pca_dim=4, niter=3, max_points_per_centroid=4)
    eps_seen: list[float] = []
    real_split = km.split_empty_clusters_keyed

    def spy(*args, **kwargs):
        eps_seen.append(args[-1])
        return real_split(*args, **kwargs)

    monkeypatch.setattr(km, "split_empty_clusters_keyed", spy)
    ref = cluster_features(x, base, seed=1)
    changed = {**FIELDS, "split_eps": 0.3}[field]
    other = cluster_features(x, dataclasses.replace(base, **{field: changed}), seed=1)
    if field == "split_eps":
        assert eps_seen == [base.split_eps, 0.3]
    else:
        same = other.centroids.shape == ref.centroids.shape and np.array_equal(
            other.centroids, ref.centroids
        )
        assert not (same and np.array_equal(other.labels, ref.labels)), field


# ------------------------------------------------------------------------------------- assign


@pytest.mark.parametrize("block_bytes", [exact.BLOCK_BYTES, 100 * 8 * 8])
def test_assign_equals_brute_force_argmin(monkeypatch: pytest.MonkeyPatch, block_bytes: int):
    monkeypatch.setattr(exact, "BLOCK_BYTES", block_bytes)  # 1003 rows: blocks that do not divide
    rng = np.random.default_rng(20)
    x = rng.normal(size=(1003, 8)).astype(np.float32)
    centroids = rng.normal(size=(17, 8)).astype(np.float32)
    labels = assign(x, centroids)
    d2 = brute_force_sq_dist(x, centroids)
    assert labels.dtype == np.int32 and labels.shape == (1003,)
    np.testing.assert_array_equal(labels, d2.argmin(axis=1))
    sq = squared_distances(x, centroids, labels)
    np.testing.assert_allclose(sq, d2.min(axis=1), rtol=1e-12)


@pytest.mark.parametrize(("chunk", "cells"), [(1 << 20, 1 << 23), (7, 1 << 23), (7, 50)])
def test_nmi_and_ari_are_scikit_learns(
    chunk: int, cells: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metrics.nmi/ari compute scikit-learn's definitions without importing it (start-up), to
    the bit (runs resumed across this change keep their metrics): random labelings of many
    sizes, partly agreeing, and the degenerate cases; in one chunk, in chunks of 7 samples
    (the bounded-memory passes of large N), and with tables counted in blocks of 50 cells
    (k x k' beyond metrics.CELLS), where NMI adds the blocks' sums and may differ in the
    last bits."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    monkeypatch.setattr(metrics, "CHUNK", chunk)
    monkeypatch.setattr(metrics, "CELLS", cells)
    exact = cells > 1 << 20

    rng = np.random.default_rng(0)
    cases = [([0, 0], [1, 1]), ([0, 1], [0, 0]), ([0, 1], [1, 0]), ([3], [5]),
             ([0, 0, 1, 1], [0, 1, 0, 1]), ([7, 7, 2], [1, 1, 1])]  # fmt: skip
    for _ in range(200):
        n, ka, kb = rng.integers(1, 2000), rng.integers(1, 40), rng.integers(1, 40)
        a = rng.integers(0, ka, n)
        b = np.where(rng.random(n) < rng.random(), a, rng.integers(0, kb, n))
        cases.append((a * 1000 + 5, b))  # labels need not be 0..k-1
    cases.append((rng.integers(0, 3, 50) * 10**12, rng.integers(0, 4, 50)))  # nor small
    assert cells > 1 << 20 or any(len(set(a)) * len(set(b)) > cells for a, b in cases)
    for a, b in cases:
        a, b = np.asarray(a), np.asarray(b)
        expected = normalized_mutual_info_score(a, b)
        assert metrics.nmi(a, b) == (expected if exact else pytest.approx(expected, rel=1e-12))
        assert metrics.ari(a, b) == adjusted_rand_score(a, b)
    skipped = np.array([0, 1, -1, 1])  # -1: a sample skipped as unreadable is left out
    assert metrics.nmi(skipped, np.array([0, 1, 0, 1])) == 1.0
