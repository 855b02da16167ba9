"""How close a sample is to its full-compute reference: PSNR and SSIM.

One definition for every caller: the benchmark and ``ditopt demo`` score zoo samples (values in
about [-1, 1], so ``data_range=2``); ``ditopt.tune`` ranks candidate plans on whatever its
calibration run returns (``data_range=1``). Only the range differs between them.

Example:
    >>> import torch
    >>> psnr(torch.zeros(4), torch.zeros(4))
    inf
    >>> round(psnr(torch.full((4,), 0.2), torch.zeros(4), data_range=2.0), 2)
    20.0
    >>> round(psnr([torch.full((2,), 0.1)], {"a": torch.zeros(2)}, data_range=1.0), 2)
    20.0
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["psnr", "ssim", "tensors_of"]


def psnr(x: Any, ref: Any, data_range: float = 2.0) -> float:
    """PSNR in dB of ``x`` against ``ref``: ``10 log10(data_range**2 / MSE)``, inf when equal.

    ``x`` and ``ref`` are tensors or anything :func:`tensors_of` reads (what a sampling run or a
    pipeline returned); all their values are compared, in order, in float64. They must hold the
    same number of values (``ValueError`` otherwise).
    """
    a = torch.cat([t.detach().double().flatten() for t in tensors_of(x)])
    b = torch.cat([t.detach().double().flatten() for t in tensors_of(ref)])
    if a.shape != b.shape:
        raise ValueError(f"psnr compares equal sizes, got {a.numel()} values against {b.numel()}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over the 2-D images (the last two dims) of ``x`` against ``ref`` (scikit-image,
    imported on first use; the window is 7 pixels, or the largest odd size the images allow)."""
    from skimage.metrics import structural_similarity

    a = x.detach().double().reshape(-1, *x.shape[-2:]).numpy()
    b = ref.detach().double().reshape(-1, *ref.shape[-2:]).numpy()
    win = min(7, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2
    return float(sum(structural_similarity(p, q, data_range=data_range, win_size=win) for p, q in zip(a, b)) / len(a))


def tensors_of(x: Any) -> list[torch.Tensor]:
    """The tensors in what a run returned: a tensor, a numpy array or PIL image, lists, tuples and
    dicts of them, or a pipeline output (its ``images``, ``frames`` or ``sample``).

    ``ValueError`` names the type of anything else.
    """
    if isinstance(x, torch.Tensor):
        return [x]
    if type(x).__module__ == "numpy" or hasattr(x, "__array_interface__"):  # ndarray, PIL image
        import numpy as np

        return [torch.from_numpy(np.asarray(x, dtype=np.float64))]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors_of(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_of(v)]
    for name in ("images", "frames", "sample"):
        if hasattr(x, name):
            return tensors_of(getattr(x, name))
    raise ValueError(f"psnr needs tensors (or arrays, images, or lists, dicts or pipeline outputs of them), "
                     f"got {type(x).__name__}")
