"""`make gpu-check`: the GPU path, measured on one lent GPU in under 6 minutes (issue 18).

    python -m bench.gpu_check [--out DIR]     on the GPU machine: figures to DIR/gpu_check.json
    python -m bench.gpu_check --cpu           the same steps at smoke sizes on the CPU (the
                                              suite runs it: tests/test_gpu_check.py)

It needs only what the lent machine has (torch, numpy, scipy, scikit-learn, pillow, pyyaml)
plus two small wheels that `make gpu-wheels` downloads beforehand (omegaconf and simplejpeg,
under 1 MiB together; DEVELOPERS.md says how to carry them): no faiss, webdataset, wandb or
submitit. Each step is timed on its own and a failed step is recorded and the next one runs:

1. k-means with cluster.backend=torch, 1,281,167 x 256 -> 10,000, 20 iterations, fp32
   (certified exact) and tf32: seconds, TFLOP/s and the fraction of the GPU's FP32 / TF32
   peak; the rows the certificate left to the exact search. Target: <= 2 s.
2. PCA on the GPU, 1,281,167 x 2048 -> 256 (fit on the 200,000-row sample, then applied to
   every row): seconds.
3. ResNet-50 extraction in bf16 and channels_last from real shards (224-px JPEGs, decoded by
   the loader's workers) against the model's forward alone on the same batches in memory:
   img/s and the ratio. Targets: >= 3,000 img/s and >= 0.8.
4. A 2-epoch DeepCluster run (`cluster-pipeline train`, one rank on the GPU, the torch
   backend, scikit-learn's digits as shards): its phase times from metrics.jsonl. One GPU
   cannot host two NCCL ranks, so this run has no process group; the collectives over NCCL
   need a node of two GPUs or more (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
# Dense peaks (TFLOP/s) by device name, for the fraction of the limit: NVIDIA's data sheets.
PEAKS = {"H200": {"fp32": 67.0, "tf32": 494.7}, "H100": {"fp32": 67.0, "tf32": 494.7}}
FULL = {"kmeans": (1_281_167, 256, 10_000, 20), "pca": (1_281_167, 2048, 256),
        "extract": (12_800, 256, 14), "train_epochs": 2}  # fmt: skip
SMOKE = {"kmeans": (6_000, 32, 60, 4), "pca": (4_000, 64, 16), "extract": (96, 32, 2),
         "train_epochs": 2}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixture_on(device: torch.device, n: int, d: int, components: int, seed: int) -> np.ndarray:
    """n rows of a Gaussian mixture, L2-normalized (as after PCA and L2), made on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn(components, d, generator=gen, device=device)
    out = np.empty((n, d), dtype=np.float32)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        which = torch.randint(0, components, (m,), generator=gen, device=device)
        rows = centers[which] + 0.7 * torch.randn(m, d, generator=gen, device=device)
        out[s : s + m] = torch.nn.functional.normalize(rows, dim=1).cpu().numpy()
    return out


def peak_fraction(tflops: float, precision: str) -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, peaks in PEAKS.items():
        if key in name:
            return tflops / peaks[precision]
    return None


def step_kmeans(device: torch.device, sizes: dict) -> dict:
    from cluster_pipeline.clustering.exact import fixed_point_scale
    from cluster_pipeline.clustering.holders import LOCAL
    from cluster_pipeline.clustering.keys import SALT_TRAIN
    from cluster_pipeline.clustering.kmeans import initial_centroids
    from cluster_pipeline.clustering.torch_kmeans import TorchEngine

    n, d, k, niter = sizes["kmeans"]
    x = mixture_on(device, n, d, components=k, seed=0)
    index = np.arange(n, dtype=np.int64)
    init = initial_centroids(LOCAL, x, index, k, seed=0)
    scale = fixed_point_scale(float(np.abs(x).max()), n)
    out: dict[str, Any] = {"n": n, "d": d, "k": k, "niter": niter}
    flops = 2.0 * n * k * d * niter
    for matmul in ("fp32", "tf32"):
        engine = TorchEngine(device, matmul)
        engine.lloyd(LOCAL, x[: 4 * k], init, 1, scale, np.random.default_rng(0))  # warm-up
        engine.exact_rows = 0
        sync(device)
        start = time.perf_counter()
        centroids = engine.lloyd(
            LOCAL, x, init, niter, scale, np.random.default_rng([0, SALT_TRAIN])
        )
        sync(device)
        seconds = time.perf_counter() - start
        tflops = flops / seconds / 1e12
        out[matmul] = {"seconds": seconds, "tflops": tflops,
                       "fraction_of_peak": peak_fraction(tflops, matmul),
                       "exact_rows": engine.exact_rows,
                       "exact_rows_fraction": engine.exact_rows / (n * niter),
                       "finite": bool(np.isfinite(centroids).all())}  # fmt: skip
        print(f"  kmeans {matmul}: {seconds:.2f} s, {tflops:.1f} TFLOP/s, exact rows "
              f"{engine.exact_rows}", flush=True)  # fmt: skip
    out["target_s"], out["met"] = 2.0, out["fp32"]["seconds"] <= 2.0
    return out


def step_pca(device: torch.device, sizes: dict) -> dict:
    from cluster_pipeline.clustering.pca import fit_pca

    n, d, dim = sizes["pca"]
    gen = torch.Generator(device=device).manual_seed(1)
    basis = torch.randn(dim * 2, d, generator=gen, device=device)
    x = np.empty((n, d), dtype=np.float32)
    step = 1 << 16
    for s in range(0, n, step):
        m = min(step, n - s)
        z = torch.randn(m, dim * 2, generator=gen, device=device)
        x[s : s + m] = (z @ basis + 0.1 * torch.randn(m, d, generator=gen, device=device)).cpu()
    sync(device)
    start = time.perf_counter()
    pca = fit_pca(x, dim, whiten=True, device=str(device))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    y = pca.apply(x)
    apply_s = time.perf_counter() - start
    print(f"  pca: fit {fit_s:.2f} s, apply {apply_s:.2f} s", flush=True)
    var = float(y[: min(n, 100_000)].var(axis=0).mean())  # whitened: about 1
    return {"n": n, "d": d, "dim": dim, "fit_s": fit_s, "apply_s": apply_s,
            "seconds": fit_s + apply_s, "whitened_variance": var}  # fmt: skip


def step_extract(device: torch.device, sizes: dict, cpu: bool, tmp: Path) -> dict:
    from cluster_pipeline import dist
    from cluster_pipeline.config import load_config
    from cluster_pipeline.data.augment import center_crop, to_float
    from cluster_pipeline.data.shards import write_shards
    from cluster_pipeline.data.sources import synthetic_source
    from cluster_pipeline.features.extract import as_layout, extract_features, extraction_precision
    from cluster_pipeline.run.setup import open_data_and_model

    n, size, workers = sizes["extract"]
    shards = tmp / "jpegs"
    start = time.perf_counter()
    write_shards(synthetic_source(n, size=size, classes=100), shards, samples_per_shard=1000,
                 workers=min(8, os.cpu_count() or 1))  # fmt: skip
    write_s = time.perf_counter() - start
    arch = "small_cnn" if cpu else "resnet50"
    cfg = load_config(REPO / "configs" / "demo_mnist.yaml", [
        f"data.shards={shards}", f"data.load_size={size}", f"data.image_size={size}",
        "data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
        f"data.num_workers={workers}", f"data.extract_batch_size={32 if cpu else 256}",
        f"model.arch={arch}", "cluster.k=10", "model.extract_bf16=true",
        "model.channels_last=true", "run.progress=false", "wandb.mode=disabled",
    ])  # fmt: skip
    ctx = dist.init_distributed(cfg.dist.timeout_s, 0)
    index, reader, model = open_data_and_model(cfg, ctx)
    extract_features(model, reader, cfg, ctx)  # warm-up: workers' server, cuDNN's choices
    sync(device)
    start = time.perf_counter()
    _, feats, _ = extract_features(model, reader, cfg, ctx)
    sync(device)
    extract_s = time.perf_counter() - start
    assert len(feats) == index.num_samples and np.isfinite(feats).all()
    images = torch.from_numpy(reader.read_batch(np.arange(index.num_samples)))
    if device.type == "cuda":
        images = images.pin_memory()
    b = cfg.data.extract_batch_size
    model.eval()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(images), b):
            x = to_float(images[s : s + b].to(device, non_blocking=True), cfg.data.mean,
                         cfg.data.std)  # fmt: skip
            with extraction_precision(cfg, ctx):
                model.features(as_layout(center_crop(x, size), cfg, ctx))
    sync(device)
    forward_s = time.perf_counter() - start
    reader.close()
    out = {"images": n, "size": size, "arch": arch, "workers": workers, "write_shards_s": write_s,
           "extract_s": extract_s, "extract_img_s": n / extract_s, "forward_s": forward_s,
           "forward_img_s": n / forward_s, "ratio": forward_s / extract_s}  # fmt: skip
    out["met"] = out["extract_img_s"] >= 3000 and out["ratio"] >= 0.8
    print(f"  extract: {out['extract_img_s']:.0f} img/s, forward alone "
          f"{out['forward_img_s']:.0f} img/s, ratio {out['ratio']:.2f}", flush=True)  # fmt: skip
    return out


def step_train(sizes: dict, tmp: Path) -> dict:
    shards, run_dir = tmp / "digits", tmp / "run"
    py = [sys.executable, "-m", "cluster_pipeline"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    subprocess.run([*py, "make-shards", "--source", "digits", "--out", str(shards)], check=True,
                   cwd=REPO, env=env, timeout=300)  # fmt: skip
    start = time.perf_counter()
    subprocess.run([*py, "train", "--config", "configs/digits_test.yaml", f"data.shards={shards}",
                    f"run.dir={run_dir}", f"train.epochs={sizes['train_epochs']}",
                    "cluster.backend=torch", "wandb.mode=disabled", "data.num_workers=2"],
                   check=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [{k: v for k, v in r.items() if k.startswith("time_") or k in ("epoch", "nmi_gt")}
              for r in rows]  # fmt: skip
    print(f"  train: {len(rows)} epochs in {wall:.1f} s", flush=True)
    return {"wall_s": wall, "epochs": len(rows), "phases": phases}


def run_step(name: str, fn: Callable[[], dict], results: dict) -> None:
    print(f"{name}:", flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn() | {"ok": True}
    except Exception as exc:  # recorded: the next step still runs
        traceback.print_exc()
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    results[name]["step_s"] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="smoke sizes on the CPU (the suite's run)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of gpu_check.json")
    p.add_argument("--only", nargs="*", choices=["kmeans", "pca", "extract", "train"])
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run on the GPU machine, or pass --cpu for the smoke run")
    device = torch.device("cpu" if args.cpu else "cuda:0")
    sizes = SMOKE if args.cpu else FULL
    os.environ.setdefault("WANDB_MODE", "disabled")
    only = set(args.only or ("kmeans", "pca", "extract", "train"))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if not args.cpu else "cpu",
                               "torch": torch.__version__, "cpu_smoke": args.cpu}  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if "kmeans" in only:
            run_step("kmeans", lambda: step_kmeans(device, sizes), results)
        if "pca" in only:
            run_step("pca", lambda: step_pca(device, sizes), results)
        if "extract" in only:
            run_step("extract", lambda: step_extract(device, sizes, args.cpu, Path(tmp)), results)
        if "train" in only:
            run_step("train", lambda: step_train(sizes, Path(tmp)), results)
    results["total_s"] = time.perf_counter() - start
    out = Path(args.out) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} ({results['total_s']:.0f} s)", flush=True)
    return 0 if all(results[s]["ok"] for s in only) else 1


if __name__ == "__main__":
    sys.exit(main())
