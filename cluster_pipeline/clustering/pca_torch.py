"""PCA on a torch device, for a clustering whose search runs on GPUs: the covariance and its
eigendecomposition in float64 on the device, the projection in full float32 (no TF32) a block
of rows at a time. The same PCA as `pca.fit_pca` / `PCA.apply` up to rounding, with the same
sample of rows and the same sign rule for each component (tests/test_torch_kmeans.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cluster_pipeline.clustering.torch_kmeans import cuda_tf32

# Rows per block moved to the device and projected: bounds the device copy of the features.
APPLY_BLOCK_BYTES = 1 << 30


def covariance_eigh(
    x: np.ndarray, mean: np.ndarray, dim: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, eigenvectors) of the top `dim` components of the covariance of `x`
    around `mean`, ascending, as NumPy float64: the Gram matrix summed a block of rows at a
    time in float64 on the device."""
    dev = torch.device(device)
    d = x.shape[1]
    gram = torch.zeros((d, d), dtype=torch.float64, device=dev)
    mu = torch.from_numpy(mean.astype(np.float64)).to(dev)
    step = max(1, APPLY_BLOCK_BYTES // (8 * d))
    for s in range(0, len(x), step):
        q = torch.from_numpy(np.ascontiguousarray(x[s : s + step])).to(dev).double() - mu
        gram.addmm_(q.T, q)
    evals, evecs = torch.linalg.eigh(gram / max(1, len(x) - 1))
    return evals[d - dim :].cpu().numpy(), evecs[:, d - dim :].cpu().numpy()


def apply(x: np.ndarray, mean: np.ndarray, proj: np.ndarray, device: str) -> np.ndarray:
    """(x - mean) @ proj in float32 on `device`, TF32 off; the result on the host."""
    dev = torch.device(device)
    out = np.empty((len(x), proj.shape[1]), dtype=np.float32)
    mu = torch.from_numpy(mean).to(dev)
    p = torch.from_numpy(np.ascontiguousarray(proj)).to(dev)
    step = max(1, APPLY_BLOCK_BYTES // (4 * max(1, x.shape[1])))
    with cuda_tf32(False) if dev.type == "cuda" else contextlib.nullcontext():
        for s in range(0, len(x), step):
            block = torch.from_numpy(np.ascontiguousarray(x[s : s + step])).to(dev)
            out[s : s + len(block)] = ((block - mu) @ p).cpu().numpy()
    return out
