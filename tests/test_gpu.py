"""The GPU paths: faiss on every GPU of rank 0's node, each rank's own GPU in sharded mode,
bf16 + channels_last extraction, and NCCL ranks. Without CUDA each test is skipped, saying
what it needs; none returns early and passes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from test_e2e import cli

from cluster_pipeline.clustering import kmeans, search
from cluster_pipeline.config import ClusterConfig, load_config
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.dist import DistContext
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.nets import build_model

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"
)
needs_faiss_gpu = pytest.mark.skipif(
    search.num_gpus() == 0, reason="needs faiss-gpu and a GPU (pip install '.[gpu]' on a GPU node)"
)
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for 2 NCCL ranks on one node"
)


def blobs(n: int = 20000, d: int = 64, k: int = 50) -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, d)).astype(np.float32) * 4
    return centers[rng.integers(0, k, n)] + rng.standard_normal((n, d)).astype(np.float32)


@needs_faiss_gpu
def test_gather_mode_searches_on_every_gpu_and_agrees_with_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = blobs()
    used: list[int] = []
    real = faiss.index_cpu_to_gpu_multiple_py

    def spy(resources: list, index: faiss.Index, *args: object, **kw: object) -> faiss.Index:
        used.append(len(resources))
        return real(resources, index, *args, **kw)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", spy)
    c = ClusterConfig(k=50, pca_dim=0, l2_normalize=False, niter=10, use_gpu=True)
    on_gpu = kmeans.cluster_features(x, c, seed=0)
    assert set(used) == {search.num_gpus()}  # rank 0 searches on all of its node's GPUs
    on_cpu = kmeans.cluster_features(x, dataclasses.replace(c, use_gpu=False), seed=0)
    assert len(used) == 11  # 10 Lloyd iterations and the final assignment; none on CPU
    # Same start, same sums: only the GPU's rounding of near-ties can differ.
    assert (on_gpu.labels == on_cpu.labels).mean() > 0.99


@needs_faiss_gpu
def test_a_ranks_own_gpu_search_assigns_like_the_cpu() -> None:
    x = blobs()
    centroids = x[:50].copy()
    l_cpu = search.assign(x, centroids)
    l_gpu = search.assign(x, centroids, search.GpuSearch(0))
    assert (l_gpu == l_cpu).mean() > 0.999


@needs_cuda
def test_extraction_in_bf16_channels_last_matches_fp32_on_cpu(digits_shards: Path) -> None:
    cfg = load_config(
        "configs/digits_test.yaml",
        [f"data.shards={digits_shards}", "data.num_workers=0", "model.extract_bf16=true",
         "model.channels_last=true"],
    )  # fmt: skip
    reader = SampleReader(ShardIndex.load(digits_shards), cfg.data.load_size, 1)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    gpu_model = build_model(cfg.model, 1, 10)
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.cuda().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    cpu = DistContext(0, 1, 0, torch.device("cpu"))
    gpu = DistContext(0, 1, 0, torch.device("cuda", 0))
    idx_c, f_c, _ = extract_features(model, reader, cfg, cpu)
    idx_g, f_g, _ = extract_features(gpu_model, reader, cfg, gpu)
    assert np.array_equal(idx_c, idx_g) and f_g.dtype == np.float32
    cos = (f_c * f_g).sum(1) / (np.linalg.norm(f_c, axis=1) * np.linalg.norm(f_g, axis=1))
    assert cos.min() > 0.99  # bf16 rounding only


@needs_cuda
def test_train_one_epoch_on_the_gpu(digits_shards: Path, tmp_path: Path) -> None:
    res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={tmp_path / 'run'}", "train.epochs=1")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epoch"] == 0 and rows[0]["n_empty_before_split"] is not None


@needs_two_gpus
def test_two_nccl_ranks_train_and_extract(digits_shards: Path, tmp_path: Path) -> None:
    for mode in ("gather", "sharded"):
        res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
                  f"run.dir={tmp_path / mode}", "train.epochs=2", f"cluster.mode={mode}",
                  nproc=2)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        rows = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [0, 1]
    res = cli("extract", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={tmp_path / 'x'}", "--out", str(tmp_path / "f"), nproc=2)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "f" / "index.npy"), np.arange(1797))


@needs_cuda
def test_training_step_runs_under_bf16_autocast_on_the_gpu() -> None:
    from cluster_pipeline.config import Config
    from cluster_pipeline.training.recipe import make_optimizer
    from cluster_pipeline.training.step import train_step

    cfg = Config()
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28).cuda(), torch.randint(0, 10, (32,)).cuda()
    losses, dtypes = [], []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, 1, 10).cuda()
        model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        out = train_step(model, make_optimizer(model, cfg, 32), x, y, bf16=bf16)
        losses.append(out[0].item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert dtypes == [torch.float32, torch.bfloat16]
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


@needs_cuda
def test_train_one_compiled_epoch_on_the_gpu(digits_shards: Path, tmp_path: Path) -> None:
    res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={tmp_path / 'run'}", "train.epochs=1", "train.compile=true",
              "optim.schedule=cosine", "optim.warmup_epochs=0.5")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training through torch.compile (mode default, backend inductor)" in res.stdout


@needs_cuda
def test_deepcluster_v2_trains_an_epoch_on_the_gpu_with_the_torch_backend(
    digits_shards: Path, tmp_path: Path
) -> None:
    res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={tmp_path / 'run'}", "train.epochs=2", "train.method=deepcluster_v2",
              "dcv2.prototypes=[10,12]", "dcv2.small_crops=2", "dcv2.small_size=4",
              "cluster.backend=torch", "optim.optimizer=lars")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["nmi_heads"] is not None
