"""Augmentation and normalization on the batch, on the device: one grid_sample for the batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NHWC -> normalized float NCHW."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    min_scale: float,
    flip: bool,
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    max_scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample random crop (area in [min_scale, max_scale], aspect in `ratio`), resize and
    h-flip.

    Each sample's crop is an affine map of the sampling grid, so the whole batch is one
    `affine_grid` + `grid_sample` call.
    """
    b = x.shape[0]
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device="cpu").to(dev) * (hi - lo) + lo

    area = uniform(min_scale, max_scale)
    log_r = uniform(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    sw = torch.sqrt(area * r).clamp(max=1.0)
    sh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (uniform(-1.0, 1.0)) * (1 - sw)
    cy = (uniform(-1.0, 1.0)) * (1 - sh)
    sign = torch.ones(b, device=dev)
    if flip:
        sign = torch.where(uniform(0.0, 1.0) < 0.5, -sign, sign)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = sw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
