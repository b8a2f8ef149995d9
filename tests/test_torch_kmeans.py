"""cluster.backend=torch against the faiss backend, on CPU: the same clustering bit for bit (the
fp32 path is certified as the CPU search is), in gather and sharded mode; its fixed-point sums
against NumPy's; the torch PCA against NumPy's; and a run of the backend with no faiss at all,
as on the GPU check's machine."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster_pipeline import dist
from cluster_pipeline.clustering import exact, kmeans, pca
from cluster_pipeline.clustering.ranks import Ranks
from cluster_pipeline.clustering.sharded import Shard, cluster_shard
from cluster_pipeline.clustering.torch_kmeans import TorchEngine, fixed_point_sums
from cluster_pipeline.config import ClusterConfig, ConfigError, DistConfig, load_config
from cluster_pipeline.testing.multiproc import run_ranks

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo_mnist.yaml"
N, D, K, SEED = 4000, 48, 40, 3
FAISS = ClusterConfig(k=K, pca_dim=24, niter=12, use_gpu=False)
TORCH = dataclasses.replace(FAISS, backend="torch")


def overlapping(n: int = N, seed: int = 0) -> np.ndarray:
    """Blobs that overlap: Lloyd's iterations move many points, and many rows are near-ties."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, D)) * 2.0
    return (centers[rng.integers(0, K, n)] + 2.0 * rng.normal(size=(n, D))).astype(np.float32)


def separated(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, 16)) * 50.0
    truth = np.repeat(np.arange(10), 200)
    return (centers[truth] + rng.normal(size=(2000, 16))).astype(np.float32), truth


def test_torch_backend_equals_faiss_backend_bit_for_bit_on_overlapping_data() -> None:
    x = overlapping()
    a = kmeans.cluster_features(x, FAISS, SEED)
    b = kmeans.cluster_features(x, TORCH, SEED)
    assert len(np.unique(a.labels)) == K
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.loss == b.loss
    assert abs(a.loss - b.loss) <= 1e-4 * a.loss  # the bound, met with room


def test_torch_backend_finds_well_separated_clusters_as_faiss_does() -> None:
    x, _ = separated()
    c = dataclasses.replace(FAISS, k=10, pca_dim=0)
    a = kmeans.cluster_features(x, c, SEED)
    b = kmeans.cluster_features(x, dataclasses.replace(c, backend="torch"), SEED)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(np.unique(b.labels)) == 10


@pytest.mark.parametrize("matmul", ["tf32", "bf16"])
def test_tensor_core_precisions_stay_close_to_fp32(matmul: str) -> None:
    """Not certified (the GPU's fast paths; on CPU tf32 is float32 itself, bf16 truly rounds):
    on overlapping data the loss stays within 1% of fp32's and 95% of the labels agree."""
    x = overlapping()
    ref = kmeans.cluster_features(x, TORCH, SEED)
    got = kmeans.cluster_features(x, dataclasses.replace(TORCH, torch_matmul=matmul), SEED)
    assert abs(got.loss - ref.loss) <= 0.01 * ref.loss, (got.loss, ref.loss)
    assert (got.labels == ref.labels).mean() >= 0.95


def test_torch_search_decides_near_ties_exactly() -> None:
    """Rows exactly between two centroids: the float32 gap is 0, never above the margin, so the
    exact search decides them, ties to the lowest index, as search.assign does."""
    centroids = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    x = np.array([[0.0, 0.1], [0.0, -0.3], [0.9, 0.0], [0.0, 4.0]], dtype=np.float32)
    got = TorchEngine("cpu").assign(x, centroids)
    assert got.tolist() == [0, 0, 0, 2]
    assert got.dtype == np.int32


def test_fixed_point_sums_on_torch_equal_numpys() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3001, 17)).astype(np.float32)
    labels = rng.integers(0, 9, 3001)
    scale = exact.fixed_point_scale(float(np.abs(x).max()), len(x))
    sums, counts = exact.fixed_point_sums(x, labels, 9, scale)
    got = fixed_point_sums(torch.from_numpy(x), torch.from_numpy(labels), 9, scale, 4096).numpy()
    np.testing.assert_array_equal(got[:, :-1], sums)
    np.testing.assert_array_equal(got[:, -1], counts)


def test_torch_pca_equals_numpy_pca() -> None:
    rng = np.random.default_rng(6)
    z = rng.normal(size=(5000, 6)) * np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    x = z @ rng.normal(size=(6, 40)) + 0.05 * rng.normal(size=(5000, 40)) + 3.0
    x = x.astype(np.float32)
    ref = pca.fit_pca(x, 6, whiten=True)
    got = pca.fit_pca(x, 6, whiten=True, device="cpu")
    np.testing.assert_array_equal(got.mean, ref.mean)
    np.testing.assert_allclose(got.proj, ref.proj, rtol=1e-4, atol=1e-6)
    assert got.device == "cpu"
    np.testing.assert_allclose(got.apply(x), ref.apply(x), rtol=1e-4, atol=1e-4)


def test_pca_components_have_a_fixed_sign() -> None:
    """The largest entry of each component is positive, whichever solver found it."""
    x = overlapping(2000)
    for device in (None, "cpu"):
        proj = pca.fit_pca(x, 8, whiten=False, device=device).proj
        at = np.abs(proj).argmax(axis=0)
        assert (proj[at, np.arange(8)] > 0).all()


def _sharded_worker(rank: int, world: int) -> dict:
    ctx = dist.init_distributed(DistConfig.timeout_s, DistConfig.heartbeat_timeout_s)
    x = overlapping()
    idx = np.random.default_rng(9).permutation(N)[rank::world].astype(np.int64)
    out = {}
    for name, c in (("faiss", FAISS), ("torch", TORCH)):
        got = cluster_shard(ctx, Shard(idx, x[idx], idx[:0], N), c, SEED)
        labels = np.full(N, -1, np.int64)
        labels[idx] = got.labels
        out[name] = (Ranks(ctx).sum(labels + 1) - 1 if world > 1 else labels, got.centroids,
                     got.loss)  # fmt: skip
    return out


@pytest.mark.slow
def test_sharded_torch_backend_on_two_ranks_equals_one_process() -> None:
    """Sums all-reduced in fixed point: 2 gloo ranks give the single process's clustering."""
    ref = kmeans.cluster_features(overlapping(), FAISS, SEED)
    ranks = run_ranks(2, _sharded_worker, timeout=240)
    for r in ranks:
        for name in ("faiss", "torch"):
            labels, centroids, loss = r[name]
            np.testing.assert_array_equal(labels, ref.labels)
            np.testing.assert_array_equal(centroids, ref.centroids)
            assert loss == ref.loss


NO_FAISS = """
import sys
sys.modules["faiss"] = None  # import faiss raises ImportError, as where it is not installed
import numpy as np
from cluster_pipeline.clustering import kmeans
from cluster_pipeline.config import ClusterConfig
x = np.random.default_rng(0).normal(size=(600, 12)).astype(np.float32)
c = ClusterConfig(k=6, pca_dim=8, niter=5, backend="torch")
print(len(np.unique(kmeans.cluster_features(x, c, 0).labels)))
"""


def test_torch_backend_needs_no_faiss() -> None:
    out = subprocess.run([sys.executable, "-c", NO_FAISS], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6"]


def test_bad_backend_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.backend.*faiss.*torch"):
        load_config(DEMO, ["cluster.backend=cuml"])
    with pytest.raises(ConfigError, match=r"cluster\.torch_matmul.*fp32"):
        load_config(DEMO, ["cluster.torch_matmul=fp16"])


def test_exact_search_on_torch_equals_numpys_to_the_bit() -> None:
    from cluster_pipeline.clustering.search import exact_nearest
    from cluster_pipeline.clustering.torch_kmeans import ExactSearch

    rng = np.random.default_rng(8)
    centroids = rng.normal(size=(50, 24)).astype(np.float32)
    x = np.concatenate([rng.normal(size=(500, 24)), np.zeros((2, 24)), 1e-30 * np.ones((1, 24))])
    x = x.astype(np.float32)
    c_sq = np.square(centroids, dtype=np.float64).sum(axis=1)
    search = ExactSearch(centroids, c_sq, torch.device("cpu"))
    want = exact.exact_matmul(x, exact.FixedColumns.of(centroids.T)) * -2.0 + c_sq
    np.testing.assert_array_equal(search.scores(torch.from_numpy(x)).numpy(), want)
    np.testing.assert_array_equal(search.nearest(torch.from_numpy(x)).numpy(),
                                  exact_nearest(x, centroids))  # fmt: skip


def test_make_engine_follows_cluster_backend_and_names_a_missing_faiss_gpu(caplog) -> None:
    cpu_torch = kmeans.make_engine(TORCH, None, all_gpus=True)
    assert isinstance(cpu_torch, TorchEngine) and cpu_torch.device.type == "cpu"
    assert cpu_torch.exact_pca and cpu_torch.pca_device is None
    gpu_torch = kmeans.make_engine(dataclasses.replace(TORCH, use_gpu=True), 1, all_gpus=False)
    assert isinstance(gpu_torch, TorchEngine) and str(gpu_torch.device) == "cuda:1"
    assert not gpu_torch.exact_pca and gpu_torch.pca_device == "cuda:1"
    assert kmeans.make_engine(FAISS, None, all_gpus=True) == kmeans.FaissEngine()
    # a GPU rank without faiss-gpu (faiss-cpu here): the CPU search, and a warning saying so
    with caplog.at_level("WARNING"):
        engine = kmeans.make_engine(dataclasses.replace(FAISS, use_gpu=True), 0, all_gpus=True)
    assert engine == kmeans.FaissEngine()
    assert "cluster.backend=torch" in caplog.text
