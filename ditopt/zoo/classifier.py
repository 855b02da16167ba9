"""Digit classifiers used to judge the zoo models' samples.

Two scikit-learn SVCs, both trained on sklearn's digits (the same data the zoo
models were trained on, :mod:`ditopt.zoo.digits`) and fitted lazily on first
use (well under a second each, cached per process):

* ``image``: for ``dit-digits`` samples, [N, 1, 16, 16] images in [-1, 1] whose
  digit fills the canvas.  Images are 2x2 average-pooled back to 8x8.  The
  classifier is fitted on digits that went through the same round trip
  (bilinear 8->16 upsampling, then 2x2 average pooling).
* ``video``: for ``wan-digits`` frames, 16x16 frames in [-1, 1] holding a
  ``digit_size`` x ``digit_size`` digit (12 for the shipped model: the 8x8
  digit resized bilinearly) somewhere on the canvas.  Each frame is re-centred:
  a ``digit_size`` window is cropped (bilinearly) around the frame's intensity
  centre of mass and average-pooled to 8x8.  The classifier is fitted on
  digits pasted at random sub-pixel positions and re-cropped the same way.

``classify(x)`` dispatches on the number of dimensions: 4-D [N, C, H, W] is an
image batch (returns [N] labels), 5-D [N, C, T, H, W] is a clip batch (returns
[N, T] labels, one per frame).

Example::

    >>> import torch
    >>> from ditopt.zoo.classifier import classify
    >>> from ditopt.zoo.digits import digits_16
    >>> x, y = digits_16()
    >>> bool((classify(x[:50]) == y[:50].numpy()).mean() > 0.9)
    True
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .digits import CANVAS, DIGIT, VIDEO_DIGIT, digits_16, digits_sized, place


def _crop(frames01: torch.Tensor, top_left: torch.Tensor, size: int = DIGIT) -> torch.Tensor:
    """Bilinear crop of [N,1,H,W] at sub-pixel top-left [N,2] -> [N,1,size,size]."""
    n, _, h, w = frames01.shape
    ys = torch.arange(size, dtype=torch.float32).view(1, size, 1) + top_left[:, 0].view(n, 1, 1)
    xs = torch.arange(size, dtype=torch.float32).view(1, 1, size) + top_left[:, 1].view(n, 1, 1)
    gy = ys / (h - 1) * 2 - 1
    gx = xs / (w - 1) * 2 - 1
    grid = torch.stack([gx.expand(n, size, size), gy.expand(n, size, size)], dim=-1)
    return F.grid_sample(frames01, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _centre_of_mass(v: torch.Tensor) -> torch.Tensor:
    """[N,1,H,W] non-negative -> [N,2] (row, col) centre of mass (image centre if empty)."""
    n, _, h, w = v.shape
    m = v.sum(dim=(1, 2, 3))
    r = (v.sum(dim=(1, 3)) * torch.arange(h, dtype=torch.float32)).sum(-1)
    c = (v.sum(dim=(1, 2)) * torch.arange(w, dtype=torch.float32)).sum(-1)
    com = torch.stack([r, c], dim=-1) / m.clamp_min(1e-6).unsqueeze(-1)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    return torch.where((m > 1e-3).unsqueeze(-1), com, centre)


@functools.lru_cache(maxsize=4)
def _digit_com_offset(size: int) -> torch.Tensor:
    x, _ = digits_sized(size)
    return _centre_of_mass(x).mean(0)


def _recentre(frames: torch.Tensor, size: int = DIGIT) -> torch.Tensor:
    """[N,1,16,16] frames in [-1,1] -> [N,1,8,8] in [0,1]: a size x size crop
    centred on the digit, average-pooled to 8x8."""
    v = ((frames.float() + 1) / 2).clamp(0, 1)
    w = torch.where(v < 0.15, torch.zeros_like(v), v)  # ignore faint background noise for the centre
    tl = _centre_of_mass(w) - _digit_com_offset(size)
    tl = tl.clamp(0, frames.shape[-1] - size)
    crop = _crop(v, tl, size)
    if size != DIGIT:
        crop = F.adaptive_avg_pool2d(crop, (DIGIT, DIGIT))
    return crop


def _svc():
    from sklearn.svm import SVC

    return SVC(gamma=0.001, C=10.0)


@functools.lru_cache(maxsize=1)
def image_classifier():
    """SVC on 16x16 -> 8x8 round-tripped digits (features: 64 values in [0,16])."""
    x, y = digits_16()
    feats = _image_features(x)
    return _svc().fit(feats, y.numpy())


@functools.lru_cache(maxsize=4)
def video_classifier(size: int = VIDEO_DIGIT):
    """SVC on re-centred, 8x8-pooled crops of size x size digits pasted at
    random sub-pixel positions on the 16x16 canvas."""
    x, y = digits_sized(size)
    g = torch.Generator().manual_seed(1234)
    xs, ys = [F.adaptive_avg_pool2d(x, (DIGIT, DIGIT))], [y]
    for _ in range(2):
        pos = torch.rand(x.shape[0], 2, generator=g) * (CANVAS - size)
        xs.append(_recentre(place(x, pos) * 2 - 1, size))
        ys.append(y)
    feats = torch.cat(xs).reshape(-1, DIGIT * DIGIT).numpy() * 16.0
    return _svc().fit(feats, torch.cat(ys).numpy())


def _image_features(images: torch.Tensor) -> np.ndarray:
    v = ((images.float() + 1) / 2).clamp(0, 1)
    if v.shape[-1] != DIGIT:
        v = F.adaptive_avg_pool2d(v, (DIGIT, DIGIT))
    return v.reshape(v.shape[0], -1).numpy() * 16.0


def classify(x, kind: str | None = None, digit_size: int = VIDEO_DIGIT) -> np.ndarray:
    """Classify zoo samples (values in [-1, 1]; clamped).

    * 4-D [N, C, H, W] (or ``kind="image"``): dit-digits images -> [N] labels.
    * 5-D [N, C, T, H, W] (or ``kind="video"``): wan-digits clips -> [N, T]
      labels, one per frame; ``digit_size`` is the digit side in the frames.
    """
    x = torch.as_tensor(x).detach().cpu().float()
    if kind is None:
        kind = {4: "image", 5: "video"}.get(x.dim())
    if kind == "image":
        if x.dim() == 3:
            x = x[:, None]
        return image_classifier().predict(_image_features(x[:, :1]))
    if kind == "video":
        if x.dim() != 5:
            raise ValueError(f"video input must be [N, C, T, H, W], got {tuple(x.shape)}")
        n, _, t, h, w = x.shape
        frames = x[:, :1].permute(0, 2, 1, 3, 4).reshape(n * t, 1, h, w)
        feats = _recentre(frames, digit_size).reshape(n * t, -1).numpy() * 16.0
        return video_classifier(digit_size).predict(feats).reshape(n, t)
    raise ValueError(f"cannot classify input of shape {tuple(x.shape)} (kind={kind!r})")
