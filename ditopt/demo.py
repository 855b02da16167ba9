"""``ditopt demo``: a sampling loop on a diffusers DiT, full compute against a FORA plan.

Prints, per step, which blocks were reused, and at the end the time ratio (full / FORA,
measured in this process, best of ``repeats``) and the largest difference against the
full-compute run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ditopt import optimize, presets, reset, stats

from .errors import MAX_STEPS, InputError, check_count
from .metrics import psnr
from .small_models import random_dit


@dataclass
class DemoResult:
    decisions: dict[str, list[str]]
    time_full: float
    time_fast: float
    max_abs_diff: float
    calls: list[tuple[int, int]] = field(default_factory=list)  # (step, CFG branch) of each call

    @property
    def speedup(self) -> float:
        return self.time_full / self.time_fast


def sample(model, steps: int, *, batch: int = 2, sample_size: int = 32, seed: int = 0, progress: bool = False):
    """A plain DDIM sampling loop with classifier-free guidance batched as [cond, uncond]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, sample_size, sample_size, generator=g)
    labels = torch.arange(batch) % 10
    null = torch.full_like(labels, 999)
    with torch.no_grad():
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
            out = model(torch.cat([x, x]), timestep=t.expand(2 * batch), class_labels=torch.cat([labels, null]),
                        return_dict=False)[0]
            cond, uncond = out.chunk(2)
            eps = uncond + 4.0 * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
    return x


def check_hidden(hidden: int) -> int:
    """The width of :func:`~ditopt.small_models.random_dit`: heads of 64 (one below 64) and a
    multiple of 4 (the 2-D sin-cos position embedding splits it in four)."""
    check_count(hidden, "hidden", minimum=4, maximum=8192, error=InputError)
    heads = max(1, hidden // 64)
    if hidden % 4 or hidden % heads:
        raise InputError(f"hidden must be a multiple of 4 that splits into heads of about 64 (e.g. 32, 64, 128, "
                         f"256), got {hidden}")
    return hidden


def run_demo(steps: int = 20, interval: int = 2, hidden: int = 256, layers: int = 8, sample_size: int = 32,
             repeats: int = 2, progress: bool = True) -> DemoResult:
    check_count(steps, "steps", maximum=MAX_STEPS, error=InputError)
    check_count(interval, "interval", maximum=MAX_STEPS, error=InputError)
    check_hidden(hidden)
    check_count(layers, "layers", maximum=256, error=InputError)
    check_count(sample_size, "sample_size", minimum=2, maximum=1024, error=InputError)
    if sample_size % 2:
        raise InputError(f"sample_size must be even (patches of 2), got {sample_size}")
    check_count(repeats, "repeats", maximum=1000, error=InputError)
    model = random_dit(hidden, layers, sample_size)
    fast = optimize(model, presets.fora(interval=interval, steps=steps, level="block"))
    sample(fast, steps, sample_size=sample_size)  # capture and rewrite once, outside the timing
    sample(model, steps, sample_size=sample_size)  # and warm the unoptimised model alike
    full_times, fast_times = [], []
    for _ in tqdm(range(repeats), disable=not progress, desc="timing"):
        t0 = time.perf_counter()
        reference = sample(model, steps, sample_size=sample_size)
        full_times.append(time.perf_counter() - t0)
        reset(fast)
        t0 = time.perf_counter()
        result = sample(fast, steps, sample_size=sample_size)
        fast_times.append(time.perf_counter() - t0)
    return DemoResult(stats(fast).decisions, min(full_times), min(fast_times),
                      float((result - reference).abs().max()), _calls(fast))


@dataclass
class ZooDemoResult(DemoResult):
    psnr: float = 0.0
    accuracy_full: float = 0.0
    accuracy_fast: float = 0.0


def run_zoo_demo(name: str = "dit-digits", interval: int = 2, repeats: int = 3, progress: bool = True,
                 per_class: int = 2, seed: int = 0) -> ZooDemoResult:
    """FORA on a trained zoo model: reuse per step, time ratio, PSNR and class accuracy vs full."""
    from . import zoo

    check_count(interval, "interval", maximum=MAX_STEPS, error=InputError)
    check_count(repeats, "repeats", maximum=1000, error=InputError)
    check_count(per_class, "per_class", maximum=1000, error=InputError)
    check_count(seed, "seed", minimum=0, maximum=2**63 - 1, error=InputError)
    zm = zoo.load(name)
    fast = optimize(zm.model, presets.fora(interval=interval, steps=zm.steps, level="block"))
    labels = torch.arange(10).repeat_interleave(per_class)
    zm.sample(labels, seed, transformer=fast)  # capture and rewrite outside the timing
    zm.sample(labels, seed)  # warm the unoptimised model alike
    full_times, fast_times = [], []
    for _ in tqdm(range(repeats), disable=not progress, desc="timing"):
        t0 = time.perf_counter()
        reference = zm.sample(labels, seed)
        full_times.append(time.perf_counter() - t0)
        reset(fast)
        t0 = time.perf_counter()
        result = zm.sample(labels, seed, transformer=fast)
        fast_times.append(time.perf_counter() - t0)
    return ZooDemoResult(stats(fast).decisions, min(full_times), min(fast_times),
                         float((result - reference).abs().max()), _calls(fast),
                         psnr=psnr(result, reference, data_range=2.0),
                         accuracy_full=zm.accuracy(reference, labels), accuracy_fast=zm.accuracy(result, labels))


def _calls(fast) -> list[tuple[int, int]]:
    from .api import runtime_of

    return [(r.step, r.branch) for r in runtime_of(fast).records]


def format_table(result: DemoResult) -> str:
    blocks = [s for s in result.decisions if s.count(".") == 1 and s.split(".")[-1].isdigit()]
    calls = len(next(iter(result.decisions.values()))) if result.decisions else 0
    steps = result.calls if len(result.calls) == calls else [(i, 0) for i in range(calls)]
    branched = any(branch for _, branch in steps)  # CFG as two calls per step (wan-digits)
    head = f"{'step':>4}  {'CFG branch  ' if branched else ''}reused blocks"
    lines = [head, f"{'-' * 4}  {'-' * 10 + '  ' if branched else ''}{'-' * 13}"]
    for i, (step, branch) in enumerate(steps):
        reused = [b for b in blocks if result.decisions[b][i] != "compute"]
        lines.append(f"{step:>4}  {f'{branch:>10}  ' if branched else ''}{len(reused)}/{len(blocks)}")
    lines += [
        "",
        f"time full / FORA      {result.speedup:.2f}x  ({result.time_full:.2f} s vs {result.time_fast:.2f} s, "
        "same process)",
    ]
    if isinstance(result, ZooDemoResult):
        lines += [
            f"PSNR FORA vs full     {result.psnr:.1f} dB  (max abs diff {result.max_abs_diff:.3f})",
            f"class accuracy        full {result.accuracy_full:.2f}   FORA {result.accuracy_fast:.2f}",
        ]
    else:
        lines.append(f"max |FORA - full|     {result.max_abs_diff:.4f}  (final latents, random weights)")
    return "\n".join(lines)
