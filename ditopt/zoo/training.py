"""The training loop both zoo models were trained with (``tools/train_dit_digits.py``,
``tools/train_wan_digits.py``); each tool supplies its model(s) and the loss of one batch.

Objective: rectified flow / flow matching, the convention of diffusers'
``FlowMatchEulerDiscreteScheduler`` (:func:`flow_matching`)::

    x_t = (1 - s) * x0 + s * noise,   target = noise - x0,   timestep = 1000 * s

Labels are dropped to :data:`NULL_CLASS` for classifier-free guidance (:func:`drop_labels`).
The loop (:func:`train`): epochs of seeded random batches, AdamW, linear warm-up then a cosine
learning rate down to 5% (:func:`learning_rate`), gradient clipping at 1, and an EMA of the
weights (what the zoo ships). One generator draws everything random in order (the batch order,
then whatever the loss draws), so a run is deterministic given the seed and the step count;
``minutes`` is only a safety cap, and a run it stops depends on the machine's speed.

Example::

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> data = torch.randn(16, 2)
    >>> cfg = TrainConfig(steps=3, batch=4, lr=1e-2, warmup=1, ema=0.9, minutes=1.0, progress=False)
    >>> result = train([net], lambda idx: net(data[idx]).pow(2).mean(), len(data),
    ...                torch.Generator().manual_seed(0), cfg)   # doctest: +ELLIPSIS
    done: 3 steps in 0.0 min, final loss (mean last 200) ...
    >>> result.steps_done, len(result.ema), result.stopped_early
    (3, 1, False)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

NULL_CLASS = 10  # the label of CFG's unconditional branch (digits are 0..9)


@dataclass
class TrainConfig:
    """The loop's knobs; the training tools' flags of the same names set them."""

    steps: int  # optimizer steps
    batch: int  # samples per step
    lr: float  # peak learning rate (after warm-up; the cosine ends at 5% of it)
    warmup: int  # steps of linear warm-up
    ema: float  # EMA decay of the shipped weights (ramped in as (1 + step) / (10 + step))
    minutes: float  # wall-clock safety cap
    log_every: int = 50  # steps between progress-bar updates
    loss_window: int = 200  # the final loss is the mean over this many last steps
    name: str = "train"  # the progress bar's label
    progress: bool = True  # show a progress bar


@dataclass
class Trained:
    """What :func:`train` returns: EMA copies of the trained modules (in their order) and the run."""

    ema: list[torch.nn.Module]
    steps_done: int
    seconds: float
    final_loss: float  # mean over the last ``loss_window`` steps
    stopped_early: bool  # by the ``minutes`` cap


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then a cosine from ``cfg.lr`` down to 5% of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def drop_labels(labels: torch.Tensor, p_uncond: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``labels`` with each replaced by :data:`NULL_CLASS` with probability ``p_uncond``."""
    labels = labels.clone()
    labels[torch.rand(labels.shape[0], generator=gen) < p_uncond] = NULL_CLASS
    return labels


def flow_matching(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised input ``x_t`` and the velocity target at noise levels ``sigma`` [B]."""
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0 + s * noise, noise - x0


def parameter_count(modules: Sequence[torch.nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def train(modules: Sequence[torch.nn.Module], loss_of: Callable[[torch.Tensor], torch.Tensor], n: int,
          gen: torch.Generator, cfg: TrainConfig) -> Trained:
    """Train ``modules`` (in train mode) jointly on ``loss_of(indices)``, the loss of one batch
    of ``cfg.batch`` indices into a data set of ``n``; batches walk a random permutation, drawn
    anew when the rest is shorter than a batch."""
    params = [p for m in modules for p in m.parameters()]
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    ema_params = [p for m in ema for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    t0 = time.time()
    losses: list[float] = []
    perm, pos, step, stopped_early = torch.randperm(n, generator=gen), 0, 0, False
    bar = tqdm(range(cfg.steps), desc=cfg.name, mininterval=5.0, disable=not cfg.progress)
    for step in bar:
        if pos + cfg.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch]
        pos += cfg.batch
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema_params, params):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-cfg.loss_window:]):.4f}", lr=f"{learning_rate(step, cfg):.2e}")
        if (time.time() - t0) > cfg.minutes * 60:
            stopped_early = True
            print(f"time cap reached at step {step + 1}")
            break
    elapsed = time.time() - t0
    final_loss = float(np.mean(losses[-cfg.loss_window:]))
    print(f"done: {step + 1} steps in {elapsed / 60:.1f} min, "
          f"final loss (mean last {cfg.loss_window}) {final_loss:.4f}")
    return Trained(ema, step + 1, elapsed, final_loss, stopped_early)
