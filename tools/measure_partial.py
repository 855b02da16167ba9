"""Measure token-wise partial recompute (``partial``, ``presets.duca``) against FORA and TaylorSeer
on a zoo model: executed FLOPs (FlopCounterMode around the rewritten graph, as a fraction of the
all-compute plan measured the same way) and PSNR against full-compute sampling.

    python tools/measure_partial.py dit-digits            # presets and partial-only plans
    python tools/measure_partial.py wan-digits
    python tools/measure_partial.py dit-digits layers     # partial on attention / feed-forward sites

Labels 0, 3, 5, 8, seeds 0 and 1, 20 steps, each model's CFG (ditopt/zoo). One CPU thread.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from ditopt import zoo
from ditopt.metrics import psnr

LABELS, SEEDS, STEPS = [0, 3, 5, 8], [0, 1], 20


def sample_counting(m, model, seed: int):
    """(samples, FLOPs the model's graph executed) for one sampling run."""
    last = getattr(getattr(model, "_ditopt_backend", None), "last", None)
    target = last.rewritten if last is not None else model
    total, active = [0], []

    def enter(module, args):
        active.append(FlopCounterMode(display=False))
        active[-1].__enter__()

    def leave(module, args, out):
        counter = active.pop()
        counter.__exit__(None, None, None)
        total[0] += counter.get_total_flops()

    hooks = [target.register_forward_pre_hook(enter), target.register_forward_hook(leave)]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out = m.sample(LABELS, seed=seed, transformer=model)
    finally:
        for h in hooks:
            h.remove()
    return out, total[0]


def partial_plan(interval: int, ratio: float, kinds=("block",)) -> ditopt.Plan:
    """``partial`` at every step between full steps (every ``interval``-th after step 0)."""
    steps = [s for s in range(1, STEPS) if (s - 1) % interval]
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [
        {"sites": "*", "kind": kind, "steps": steps, "action": "partial", "ratio": ratio} for kind in kinds]})


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    name = argv[0] if argv else "dit-digits"
    m = zoo.load(name)
    reference = [m.sample(LABELS, seed=s) for s in SEEDS]
    base = None

    def run(plan: ditopt.Plan, label: str) -> None:
        nonlocal base
        fast = ditopt.optimize(copy.deepcopy(m.model), plan)
        m.sample(LABELS[:1], seed=99, transformer=fast)  # capture once
        outs, flops = [], 0
        for s in SEEDS:
            ditopt.reset(fast)
            out, f = sample_counting(m, fast, s)
            outs.append(out)
            flops += f
        base = base or flops
        print(f"{name} {label:28s} FLOPs {flops / base:.3f}  PSNR {psnr(torch.cat(outs), torch.cat(reference)):.1f} dB",
              flush=True)

    presets = ditopt.presets
    run(presets.all_compute(STEPS), "all-compute")
    if len(argv) > 1 and argv[1] == "layers":
        for i, r in [(2, 0.1), (2, 0.2), (3, 0.1), (4, 0.1)]:
            run(partial_plan(i, r, ("attention", "feedforward")), f"partial-layers-{i}-{r}")
        return
    for i, r in [(2, 0.2), (3, 0.2), (3, 0.1), (4, 0.1)]:
        run(partial_plan(i, r), f"partial-blocks-{i}-{r}")
    for i in (2, 3):
        run(presets.fora(interval=i, steps=STEPS), f"fora-{i}")
    for i in (2, 3, 4):
        run(presets.taylorseer(steps=STEPS, interval=i), f"taylorseer-{i}")
    for i, r in [(3, 0.25), (4, 0.25), (4, 0.1), (5, 0.2), (4, 0.4)]:
        run(presets.duca(steps=STEPS, interval=i, ratio=r), f"duca-{i}-{r}")


if __name__ == "__main__":
    main(sys.argv[1:])
