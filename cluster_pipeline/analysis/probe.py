"""The evaluation numbers as functions on arrays: linear probes, kNN accuracy.

A linear probe is multinomial logistic regression on standardized frozen features, fitted by
full-batch L-BFGS whose loss and gradient are sums over every rank's rows (all-reduced in
float64). Full batch makes the fit a function of the training set alone, so 1 and 8 ranks agree
up to float rounding; minibatch SGD over rank-local batches would change with the world size.
Each rank keeps its own rows: nothing of the probe features is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cluster_pipeline import dist
from cluster_pipeline.config import EvaluateConfig


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # on the test rows of every rank
    train_top1: float  # on the training rows
    loss: float  # final training objective: mean cross-entropy + weight_decay / 2 * ||W||^2
    dim: int
    iters: int  # L-BFGS iterations run (fewer than asked when it converged)


def global_count(ctx: dist.DistContext, n: int) -> int:
    """Sum of `n` over ranks. Collective: call on every rank."""
    return sum(dist.all_gather_counts(ctx, n))


def standardization(
    ctx: dist.DistContext, x: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every column over all ranks' rows, summed in float64; a constant column
    gets std 1 so it becomes 0 rather than NaN. Collective: call on every rank."""
    d = x.shape[1]
    acc = torch.zeros(2 * d + 1, dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk].double()
        acc[:d] += part.sum(0)
        acc[d : 2 * d] += (part * part).sum(0)
    acc[-1] = len(x)
    acc = dist.all_reduce(ctx, acc)
    n = max(float(acc[-1]), 1.0)
    mean = acc[:d] / n
    var = (acc[d : 2 * d] / n - mean * mean).clamp_min(0)
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
    return mean.float(), std.float()


def fit_linear_probe(
    ctx: dist.DistContext,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    iters: int,
    lr: float = EvaluateConfig.lr,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(W (d, C), b (C,), final objective, iterations) of L2-regularized softmax regression on
    this rank's standardized rows `x` and labels `y`, together with every other rank's.

    Every step's loss and gradient are all-reduced, so every rank takes the same L-BFGS steps
    and ends with the same weights. Zero initialization: the objective is strictly convex, so
    the start does not decide the answer. Collective: call on every rank.
    """
    d = x.shape[1]
    n = global_count(ctx, len(x))
    if n == 0:
        raise ValueError("no training rows for the linear probe")
    w = torch.zeros(d, num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-9)  # fmt: skip

    rows = torch.arange(len(x), device=x.device)

    @torch.no_grad()
    def objective() -> torch.Tensor:
        """Loss at (w, b), gradient into .grad: softmax's gradient is X^T (P - onehot(y))."""
        logp = torch.log_softmax(x @ w + b, dim=1)
        local = -logp[rows, y].sum()
        p = logp.exp()
        p[rows, y] -= 1.0
        flat = torch.cat([local.reshape(1), (x.T @ p).reshape(-1), p.sum(0)]).double()
        flat = dist.all_reduce(ctx, flat) / n
        w.grad = flat[1 : 1 + w.numel()].view_as(w).float() + weight_decay * w
        b.grad = flat[1 + w.numel() :].float()
        penalty = 0.5 * weight_decay * float((w.double() ** 2).sum())
        return torch.tensor(float(flat[0]) + penalty)

    opt.step(objective)
    loss = float(objective())  # at the final weights (a collective, like every step)
    return w.detach(), b.detach(), loss, int(opt.state[w].get("n_iter", 0))


def accuracy(
    ctx: dist.DistContext,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    chunk: int,
) -> float:
    """Top-1 of the linear classifier (w, b) on every rank's rows.

    Collective: call on every rank.
    """
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            pred = (x[s : s + chunk] @ w + b).argmax(1)
            correct += int((pred == y[s : s + chunk]).sum())
    counts = dist.all_reduce(ctx, np.array([correct, len(x)], dtype=np.float64))
    return float(counts[0] / max(counts[1], 1.0))


def linear_probe(
    ctx: dist.DistContext,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    weight_decay: float = EvaluateConfig.weight_decay,
    iters: int = EvaluateConfig.probe_iters,
    lr: float = EvaluateConfig.lr,
    chunk: int = EvaluateConfig.batch_size,
) -> ProbeResult:
    """Fit a probe on every rank's training rows (standardized with their global mean and std)
    and score it on every rank's test rows. Collective: call on every rank."""
    dev = ctx.device
    tr = torch.as_tensor(np.ascontiguousarray(train_x, np.float32), device=dev)
    mean, std = standardization(ctx, tr, chunk)
    tr = (tr - mean) / std
    te = (torch.as_tensor(np.ascontiguousarray(test_x, np.float32), device=dev) - mean) / std
    ytr = torch.as_tensor(np.asarray(train_y, np.int64), device=dev)
    yte = torch.as_tensor(np.asarray(test_y, np.int64), device=dev)
    w, b, loss, n_iter = fit_linear_probe(ctx, tr, ytr, num_classes, weight_decay, iters, lr)
    return ProbeResult(
        top1=accuracy(ctx, te, yte, w, b, chunk),
        train_top1=accuracy(ctx, tr, ytr, w, b, chunk),
        loss=loss,
        dim=int(tr.shape[1]),
        iters=n_iter,
    )


def knn_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    k: int = EvaluateConfig.knn_k,
    temperature: float = EvaluateConfig.knn_temperature,
    chunk: int = EvaluateConfig.batch_size,
    device: torch.device | None = None,
) -> float:
    """Top-1 of a k-nearest-neighbour classifier: cosine similarity to the training rows, and
    DINO's weighted vote (each of the k neighbours adds exp(similarity / temperature) to its
    class). Test rows are scored `chunk` at a time against all training rows (one matrix
    product each); the caller holds both sets (rank 0 after a gather)."""
    dev = device or torch.device("cpu")
    tr = F.normalize(torch.as_tensor(np.ascontiguousarray(train_x, np.float32), device=dev), dim=1)
    te = F.normalize(torch.as_tensor(np.ascontiguousarray(test_x, np.float32), device=dev), dim=1)
    ytr = torch.as_tensor(np.asarray(train_y, np.int64), device=dev)
    yte = torch.as_tensor(np.asarray(test_y, np.int64), device=dev)
    k = min(k, len(tr))
    correct = 0
    with torch.no_grad():
        for s in range(0, len(te), chunk):
            sim, nearest = (te[s : s + chunk] @ tr.T).topk(k, dim=1)
            votes = torch.zeros(len(sim), num_classes, device=dev)
            votes.scatter_add_(1, ytr[nearest], torch.exp(sim / temperature))
            correct += int((votes.argmax(1) == yte[s : s + chunk]).sum())
    return correct / max(len(te), 1)
