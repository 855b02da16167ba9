"""The digit data of the zoo: scikit-learn's 8x8 digits, resized and pasted onto a 16x16 canvas.

One place for what both the trainers (``tools/train_dit_digits.py``,
``tools/train_wan_digits.py``) and the classifiers (:mod:`ditopt.zoo.classifier`) read:

* :func:`digits_16`: the dit-digits images, each digit upsampled to fill the canvas;
* :func:`digits_sized`: the digits resized to a side (12 for wan-digits' clips);
* :func:`place`: digits pasted at sub-pixel positions on the canvas (bilinear), which makes
  wan-digits' moving clips and the video classifier's training crops.

Example::

    >>> import torch
    >>> x, y = digits_sized(12)
    >>> tuple(x.shape[1:]), int(y[0])
    ((1, 12, 12), 0)
    >>> tuple(place(x[:2], torch.tensor([[0.0, 0.0], [3.5, 1.25]])).shape)
    (2, 1, 16, 16)
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 16
DIGIT = 8  # sklearn's digit side
VIDEO_DIGIT = 12  # digit side in the wan-digits clips


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    return x, torch.from_numpy(d.target.astype(np.int64))


@functools.lru_cache(maxsize=4)
def digits_sized(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits resized bilinearly to [N,1,size,size], values in [0,1], and int64 labels."""
    x, y = _digits()
    if size != DIGIT:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, y


def digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """The dit-digits training data: [N,1,16,16] in [-1,1] (bilinear upsampling) and labels."""
    x, y = _digits()
    x = F.interpolate(x, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, y


def place(digits01: torch.Tensor, pos: torch.Tensor, canvas: int = CANVAS) -> torch.Tensor:
    """Paste [N,1,d,d] digits (values in [0,1]) onto an [N,1,canvas,canvas] zero canvas with
    sub-pixel top-left positions ``pos`` [N,2] = (row, col) in [0, canvas - d]. Returns values
    in [0,1] (bilinear resampling)."""
    n, d = digits01.shape[0], digits01.shape[-1]
    # pixel centres of the canvas in canvas coordinates, mapped into digit coordinates
    ys = torch.arange(canvas, dtype=torch.float32).view(1, canvas, 1) - pos[:, 0].view(n, 1, 1)
    xs = torch.arange(canvas, dtype=torch.float32).view(1, 1, canvas) - pos[:, 1].view(n, 1, 1)
    # normalised grid for align_corners=True: -1 -> pixel 0, +1 -> pixel d-1
    gy = ys / (d - 1) * 2 - 1
    gx = xs / (d - 1) * 2 - 1
    grid = torch.stack([gx.expand(n, canvas, canvas), gy.expand(n, canvas, canvas)], dim=-1)
    return F.grid_sample(digits01, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
