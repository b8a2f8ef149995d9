"""cluster.backend=torch: Lloyd's iterations and the assignment with torch, on the rank's GPU
(or on the CPU), behind the same two calls as the faiss backend (`kmeans.Engine`).

The points go to the device once; each iteration is one distance GEMM per block of rows with
its top-2, and the per-cluster sums of the points in the fixed point of `exact` (int64
`index_add_`: integers, so the sums do not depend on the order of the atomic adds, the rank
count or the device). Only k x (d + 1) int64 sums leave the device, to be summed over the
holders (an all-reduce over NCCL in sharded mode) and turned into centroids by the same code
as the faiss backend's, with the same split of a cluster that empties.

`matmul=fp32` (the default) certifies each row's nearest centroid as the CPU search does
(`search.assign`): where the float32 top-2 gap exceeds the bound on float32's rounding error,
the float32 answer is the exact argmin; the few other rows are searched exactly. The labels,
and so the whole clustering, are then bit-identical to the faiss backend's on CPU, on a GPU as
on the CPU. `tf32` and `bf16` take the GPU's tensor cores (8x and 16x fp32's rate on an H200)
and their answer as it comes: not certified, not bitwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from cluster_pipeline.clustering.exact import (
    FixedColumns,
    centroids_from_sums,
    power_of_two_scale,
)
from cluster_pipeline.clustering.holders import Holders
from cluster_pipeline.clustering.labels import LABEL_DTYPE
from cluster_pipeline.clustering.search import search_margin
from cluster_pipeline.clustering.split import split_empty_centroids

# Bytes of one block's float32 scores (rows x k) on the device: 1 GiB on a GPU, where large
# GEMMs keep it busy; 16 MiB on the CPU, which stays in its caches.
GPU_SCORE_BYTES = 1 << 30
CPU_SCORE_BYTES = 16 << 20
MATMULS = ("fp32", "tf32", "bf16")


class TorchEngine:
    """Lloyd's iterations and assignments on `device` with `matmul` precision (fp32 exact)."""

    def __init__(
        self, device: torch.device | str, matmul: str = "fp32", spherical: bool = False
    ) -> None:
        if matmul not in MATMULS:
            raise ValueError(f"cluster.torch_matmul={matmul!r}: expected one of {MATMULS}")
        self.device = torch.device(device)
        self.matmul = matmul
        self.spherical = spherical  # cluster.spherical: unit-length centroids
        on_gpu = self.device.type == "cuda"
        self.score_bytes = GPU_SCORE_BYTES if on_gpu else CPU_SCORE_BYTES
        self.exact_rows = 0  # rows the certificate left to the exact search, so far

    @property
    def exact_pca(self) -> bool:
        """PCA with exact products on the CPU (bitwise, as the faiss backend's); on a GPU, the
        torch PCA of `pca_torch` instead."""
        return self.device.type == "cpu"

    @property
    def pca_device(self) -> str | None:
        return None if self.device.type == "cpu" else str(self.device)

    def assign(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """Each row's nearest centroid (int32), ties to the lowest index (fp32: exactly
        `search.exact_nearest`'s labels)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(centroids) == 1 or not len(x):
            return np.zeros(len(x), dtype=LABEL_DTYPE)
        points = Points.on(x, self.device)
        return self.nearest(points, centroids).cpu().numpy().astype(LABEL_DTYPE)

    def lloyd(
        self,
        holders: Holders,
        x: np.ndarray,
        centroids: np.ndarray,
        niter: int,
        scale: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """`niter` Lloyd iterations, as `kmeans.lloyd`: assign on the device, fixed-point sums
        on the device, one sum over holders of k x (d + 1) int64 per iteration, centroids and
        the split of a cluster that empties on the host, alike on every holder.

        Collective when `holders` is: call on every rank.
        """
        k = len(centroids)
        points = Points.on(np.ascontiguousarray(x, dtype=np.float32), self.device)
        for it in range(niter):
            labels = self.nearest(points, centroids)
            sums = fixed_point_sums(points.x, labels, k, scale)
            total = holders.sum(sums.cpu().numpy())
            centroids = centroids_from_sums(
                total[:, :-1], total[:, -1], scale, centroids, self.spherical
            )
            if it < niter - 1:
                centroids, _, _ = split_empty_centroids(centroids, total[:, -1], rng)
        return centroids

    def nearest(self, points: Points, centroids: np.ndarray) -> torch.Tensor:
        """Each point's nearest centroid as an int64 tensor on the device."""
        k, d = centroids.shape
        c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        c_sq64 = np.square(centroids, dtype=np.float64).sum(axis=1)
        c_sq = torch.from_numpy(c_sq64.astype(np.float32)).to(self.device)
        minus_two_ct = (c.T * -2.0).contiguous()  # exact: a power of two
        c_norm = float(np.sqrt(c_sq64.max()))
        exact: ExactSearch | None = None  # made on the first near-tie
        labels = torch.empty(len(points.x), dtype=torch.int64, device=self.device)
        step = max(1, self.score_bytes // (4 * k))
        for s in range(0, len(points.x), step):
            part = points.x[s : s + step]
            with self._precision():
                if self.matmul == "bf16":
                    scores = (part.bfloat16() @ minus_two_ct.bfloat16()).float() + c_sq
                else:
                    scores = torch.addmm(c_sq, part, minus_two_ct)
            two = scores.topk(2, dim=1, largest=False, sorted=True)
            best = two.indices[:, 0]
            if self.matmul == "fp32":
                gap = two.values[:, 1].double() - two.values[:, 0].double()
                margin = search_margin(points.norms[s : s + step], c_norm, d)
                unsure = torch.nonzero(~(gap > margin)).flatten()
                self.exact_rows += len(unsure)
                if len(unsure):  # near-ties: decided by the exact search, on the device
                    exact = exact or ExactSearch(centroids, c_sq64, self.device)
                    best[unsure] = exact.nearest(part[unsure])
            labels[s : s + len(part)] = best
        return labels

    def _precision(self) -> contextlib.AbstractContextManager:
        """fp32: TF32 off on CUDA whatever the process set; tf32: on; bf16 and CPU: as is."""
        if self.device.type != "cuda" or self.matmul == "bf16":
            return contextlib.nullcontext()
        return cuda_tf32(self.matmul == "tf32")


@contextlib.contextmanager
def cuda_tf32(allow: bool) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 (`allow`) or in full float32, restored afterwards (torch
    2.9+ spells it fp32_precision, the older allow_tf32)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before, matmul.fp32_precision = matmul.fp32_precision, "tf32" if allow else "ieee"
    else:
        before, matmul.allow_tf32 = matmul.allow_tf32, allow
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


class ExactSearch:
    """`search.exact_nearest` on a torch device, to the bit: the centroids' columns rounded
    by `exact.FixedColumns` (on the host, once), each row rounded to its power-of-two fixed
    point as `exact.exact_matmul` rounds it, and a float64 product of integers, exact in any
    order on any device; then the first minimum of |c|^2 - 2 x.c, as NumPy's argmin."""

    def __init__(self, centroids: np.ndarray, c_sq: np.ndarray, device: torch.device) -> None:
        cols = FixedColumns.of(centroids.T)
        self.values = torch.from_numpy(cols.values).to(device)
        self.col_scale = torch.from_numpy(cols.scale).to(device)
        self.row_bits = cols.row_bits
        self.c_sq = torch.from_numpy(c_sq).to(device)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x).argmin(dim=1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, k) float64 |c|^2 - 2 x.c, the bits of `exact_nearest`'s."""
        top = torch.maximum(x.amax(dim=1).clamp(min=0.0), -x.amin(dim=1).clamp(max=0.0))
        # The rows' scales by NumPy itself (a few rows: those the certificate left over).
        host = np.minimum(power_of_two_scale(top.cpu().numpy(), self.row_bits), 2.0**100)
        scale = torch.from_numpy(host.astype(np.float32)).to(x.device)[:, None]
        aq = torch.round(x.float() * scale)
        scores = aq.double() @ self.values
        scores /= scale.double()
        scores /= self.col_scale
        scores *= -2.0
        scores += self.c_sq
        return scores


class Points:
    """Rows on the device (float32) with their L2 norms (float64, for the certificate)."""

    def __init__(self, x: torch.Tensor, norms: torch.Tensor) -> None:
        self.x, self.norms = x, norms

    @classmethod
    def on(cls, x: np.ndarray, device: torch.device, block_rows: int = 1 << 18) -> Points:
        """The rows copied to `device` once; their norms computed there, in float64. (They
        need not be NumPy's bits: the certificate only needs them accurate.)"""
        rows = torch.from_numpy(x).to(device)
        norms = torch.empty(len(x), dtype=torch.float64, device=device)
        for s in range(0, len(x), block_rows):
            norms[s : s + block_rows] = torch.linalg.vector_norm(
                rows[s : s + block_rows].double(), dim=1
            )
        return cls(rows, norms)


def fixed_point_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int, scale: float, block_bytes: int = 256 << 20
) -> torch.Tensor:
    """(k, d + 1) int64 on the device: per-cluster sums of rint(x * scale), then the counts;
    the same integers as `exact.fixed_point_sums` (float32 times a power of two is exact in
    float64, and torch.round rounds half to even as np.rint does)."""
    d = x.shape[1]
    sums = torch.zeros((k, d), dtype=torch.int64, device=x.device)
    step = max(1, block_bytes // (8 * d))
    for s in range(0, len(x), step):
        q = torch.round(x[s : s + step].double() * scale).long()
        sums.index_add_(0, labels[s : s + step], q)
    return torch.cat([sums, torch.bincount(labels, minlength=k)[:, None]], dim=1)
