"""What-if study of block stand-ins that ditopt does not (yet) plan, on the zoo models.

Runs outside the compiler: each block of the zoo model is wrapped so that, at a step not in a
schedule of computed steps, it returns its input plus an order-1 forecast of its residual (what
a profiled stack plan's ``predict`` does), and optionally overwrites the ``ratio`` of tokens whose
input changed most since the last computed step with the block's real output on them (token-wise
recompute on top of a forecast, ToCa/FoCa-like; the block is run on every token here and the
chosen tokens taken, which equals a gathered run whose keys and values are this step's, as
``partial`` computes them). Compute is counted as (computed steps + ratio * other steps) / steps.

Two questions it answers (docs/BENCHMARKS.md, "Stand-ins the planner leaves out"):

* does recomputing a few tokens at the forecast steps buy more fidelity than spending the same
  compute on one more computed step? (``--ratios 0,0.05,0.1,0.15``)
* with a shifted flow-matching schedule (uneven sigma steps, as Wan, SD3 and Flux sample), is a
  forecast better made in the step index (TaylorSeer's, ditopt's) or in sigma? (``--shift 3
  --coords index,sigma``)

Example (a minute on 2 CPU cores)::

    OMP_NUM_THREADS=1 python tools/study_stand_ins.py --model dit-digits --seeds 1 --schedules 0,1,4,9,14
"""

from __future__ import annotations

import argparse
import math

import torch

from ditopt import zoo
from ditopt.metrics import psnr


class Stack:
    """The wrapped blocks' state for one generation."""

    def __init__(self, model: zoo.ZooModel):
        self.zoo, self.history, self.calls = model, {}, 0
        self.computed, self.ratio, self.coord = set(), 0.0, []
        blocks = getattr(model.model, "transformer_blocks", None) or model.model.blocks
        for k, block in enumerate(blocks):
            block.forward = self._wrapped(k, block.forward)

    def step_and_branch(self) -> tuple[int, int]:
        per_step = 1 if self.zoo.cfg_mode == "batched" else 2
        return self.calls // per_step, self.calls % per_step

    def _wrapped(self, k: int, forward):
        def run(hidden_states, *args, **kwargs):
            out = forward(hidden_states, *args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            step, branch = self.step_and_branch()
            hist = self.history.setdefault((k, branch), [])
            if step in self.computed:
                hist.append((step, hidden_states.clone(), (y - hidden_states).clone()))
                return out
            y = self._stand_in(hidden_states, y, hist, step)
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
        return run

    def _stand_in(self, x: torch.Tensor, y: torch.Tensor, hist: list, step: int) -> torch.Tensor:
        s1, x1, r1 = hist[-1]
        r = r1
        if len(hist) >= 2:
            s0, _, r0 = hist[-2]
            c = self.coord
            r = r1 + (c[step] - c[s1]) / (c[s1] - c[s0]) * (r1 - r0)
        guess = x + r
        if self.ratio > 0:  # the tokens whose input changed most since the last computed step
            k = max(1, math.ceil(self.ratio * x.shape[1]))
            score = (x - x1).norm(dim=-1) / (x1.norm(dim=-1) + 1e-12)
            idx = score.topk(k, dim=1).indices[..., None].expand(-1, -1, y.shape[-1])
            guess = guess.scatter(1, idx, y.gather(1, idx))
        return guess

    def __call__(self, **kwargs):  # the blocks read the call count while the model runs
        try:
            return self.zoo.model(**kwargs)
        finally:
            self.calls += 1

    def sample(self, labels, seed: int, steps: int, computed, ratio: float, coord: list[float]):
        self.history, self.calls = {}, 0
        self.computed, self.ratio, self.coord = set(computed), ratio, coord
        return self.zoo.sample(labels, seed=seed, steps=steps, transformer=self)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dit-digits", choices=zoo.list())
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--schedules", nargs="+", default=["0,1,3,6,9,12,16", "0,1,3,7,11,15", "0,1,4,9,14"],
                    help="computed steps, comma-separated, one schedule per argument")
    ap.add_argument("--ratios", default="0", help="token ratios recomputed at the other steps")
    ap.add_argument("--coords", default="index", help="index and/or sigma: the forecasts' coordinate")
    ap.add_argument("--shift", type=float, default=None, help="the flow-matching scheduler's shift (default: trained)")
    args = ap.parse_args(argv)
    model = zoo.load(args.model)
    if args.shift is not None:
        model.scheduler = type(model.scheduler).from_config(model.scheduler.config, shift=args.shift)
    sched = model.new_scheduler()
    sched.set_timesteps(args.steps)
    coords = {"index": [float(i) for i in range(args.steps + 1)], "sigma": [float(s) for s in sched.sigmas]}
    labels = list(range(10))
    stack = Stack(model)
    refs = [stack.sample(labels, s, args.steps, range(args.steps), 0.0, coords["index"]) for s in range(args.seeds)]
    print(f"{args.model}, {args.steps} steps, shift {model.scheduler.config.shift}, {args.seeds} seeds, labels 0-9")
    print("| computed steps | coordinate | ratio | compute | PSNR (dB) |\n|---|---|---|---|---|")
    for spelled in args.schedules:
        computed = [int(s) for s in spelled.split(",")]
        for coord in args.coords.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                frac = (len(computed) + ratio * (args.steps - len(computed))) / args.steps
                p = [psnr(stack.sample(labels, s, args.steps, computed, ratio, coords[coord]), refs[s])
                     for s in range(args.seeds)]
                print(f"| {spelled} | {coord} | {ratio:g} | {frac:.3f} | {sum(p) / len(p):.2f} |", flush=True)


if __name__ == "__main__":
    main()
