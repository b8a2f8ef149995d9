"""Image grids for people to look at: the activations pages and the W&B cluster grids."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

TILE_PX = 64  # images are shown at about this size: small ones magnified, large ones shrunk
PAD_PX = 2


def tile_size(side: int) -> int:
    """Pixels per tile for side x side images: an integer magnification up to TILE_PX, or
    TILE_PX for larger images."""
    return side * max(1, TILE_PX // side) if side <= TILE_PX else TILE_PX


def tile_grid(images: np.ndarray, cols: int) -> Image.Image:
    """(m, S, S, C) uint8 images, row-major in a grid `cols` wide (ceil(m / cols) rows) on white,
    PAD_PX between tiles; tile j is image j resized to `tile_size(S)`."""
    m, side, _, channels = images.shape
    t = tile_size(side)
    rows = max(1, math.ceil(m / cols))
    mode = "L" if channels == 1 else "RGB"
    grid = Image.new(mode, (cols * (t + PAD_PX) + PAD_PX, rows * (t + PAD_PX) + PAD_PX), 255)
    how = Image.Resampling.NEAREST if t % side == 0 else Image.Resampling.BILINEAR
    for j in range(m):
        img = Image.fromarray(images[j, :, :, 0] if channels == 1 else images[j], mode)
        r, c = divmod(j, cols)
        grid.paste(img.resize((t, t), how), (PAD_PX + c * (t + PAD_PX), PAD_PX + r * (t + PAD_PX)))
    return grid
