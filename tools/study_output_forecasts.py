"""What-if study of forecasting the model output (the guided velocity) between computed steps.

Runs outside the compiler, on the zoo models: a sampling loop that calls the model only at a
schedule's computed steps and, at the others, forecasts the guided velocity from the computed
ones (the polynomial through the last ``order + 1`` of them, in the step index, as an
output-level ``predict`` does). Four variations on it, each a question issue 16 asked of the
35% bar (docs/BENCHMARKS.md, "Output forecasts: four more variations"):

* ``abscissa``: the polynomial in another coordinate than the step index (i^p, sigma, log-SNR,
  log sigma);
* ``damping``: the forecast's order-1 and order-2 terms shrunk (``a``, ``b``) toward reuse;
* ``cfg``: a third kind of step, ``C``, where only the conditional branch is computed (half a
  step's compute with batched CFG) and the unconditional one is its output plus a forecast of the
  offset (uncond - cond), as ``share_cfg`` with a forecast offset would (``F`` computes both,
  ``S`` forecasts both);
* ``corrector``: at each computed step after a gap, the skipped steps' updates are redone with
  the interpolant through the new evaluation (a UniPC-like corrector) and the new evaluation is
  moved by ``gamma * delta / sigma`` for the state's move ``delta`` (the velocity's Jacobian of a
  flow-matching model taken as I / sigma); this changes the sampler's state, which a model-level
  plan cannot do.

Example (seconds on 2 CPU cores)::

    OMP_NUM_THREADS=1 python tools/study_output_forecasts.py --model dit-digits --study damping --seeds 1
"""

from __future__ import annotations

import argparse
import math

import torch

from ditopt import zoo
from ditopt.metrics import psnr

SCHEDULES = ("0,2,5,8,11,14,17", "0,2,4,7,10,13,16")  # 7 of 20 steps: 0.35 of the compute


def extrapolate(points: list[tuple[float, torch.Tensor]], x: float, order: int) -> torch.Tensor:
    """The polynomial through the last ``order + 1`` (abscissa, value) points, at ``x`` (Lagrange)."""
    points = points[-(max(order, 0) + 1):]
    out = torch.zeros_like(points[-1][1])
    for i, (xi, vi) in enumerate(points):
        w = 1.0
        for j, (xj, _) in enumerate(points):
            if j != i:
                w *= (x - xj) / (xi - xj)
        out = out + w * vi
    return out


class Sampler:
    """The zoo model's CFG sampling loop with the model called only where a schedule says."""

    def __init__(self, model: zoo.ZooModel, steps: int):
        self.m, self.steps = model, steps
        sched = model.new_scheduler()
        sched.set_timesteps(steps)
        self.sigmas = [float(s) for s in sched.sigmas]

    def branches(self, x, t, cond, uncond, which: str = "both"):
        m, b = self.m, x.shape[0]
        tt = t.to(torch.float32).expand(b)
        if which == "cond":
            return m.model(hidden_states=x, timestep=tt, **cond, return_dict=False)[0], None
        if m.cfg_mode == "batched":
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            return m.model(hidden_states=torch.cat([x, x]), timestep=torch.cat([tt, tt]), **both,
                           return_dict=False)[0].chunk(2)
        return (m.model(hidden_states=x, timestep=tt, **cond, return_dict=False)[0],
                m.model(hidden_states=x, timestep=tt, **uncond, return_dict=False)[0])

    @torch.no_grad()
    def run(self, seed: int, kinds: str, *, order: int = 1, coord=None, damping=(1.0, 1.0), offset_order: int = 1,
            gamma: float | None = None) -> torch.Tensor:
        """``kinds``: one letter per step, F (compute), C (conditional branch only) or S (forecast)."""
        m, gs, sig = self.m, self.m.guidance_scale, self.sigmas
        coord = coord or list(range(self.steps + 1))
        labels = torch.arange(10)
        sched = m.new_scheduler()
        sched.set_timesteps(self.steps)
        x = torch.randn(m.sample_shape(10), generator=torch.Generator().manual_seed(seed))
        cond, uncond = m.make_conditioning(labels), m.null_conditioning(10)
        guided, conds, offsets, states = [], [], [], {}
        for i, t in enumerate(sched.timesteps):
            if kinds[i] == "F":
                vc, vu = self.branches(x, t, cond, uncond)
                v = vu + gs * (vc - vu)
                if gamma is not None and guided and i - guided[-1][0] > 1:
                    x, v = self._correct(i, x, v, guided, states, gamma)
                guided.append((coord[i], v))
                conds.append((i, vc))
                offsets.append((i, vu - vc))
                states[coord[i]] = x
            elif kinds[i] == "C":
                vc, _ = self.branches(x, t, cond, uncond, "cond")
                conds.append((i, vc))
                vu = vc + extrapolate(offsets, i, min(offset_order, len(offsets) - 1))
                v = vu + gs * (vc - vu)
            elif "C" in kinds:  # both branches forecast, each from its own computed steps
                vc = extrapolate(conds, i, min(order, len(conds) - 1))
                vu = vc + extrapolate(offsets, i, min(offset_order, len(offsets) - 1))
                v = vu + gs * (vc - vu)
            else:
                v = self._forecast(guided, coord[i], order, damping)
            x = x + (sig[i + 1] - sig[i]) * v
        return x

    @staticmethod
    def _forecast(points, x, order, damping):
        last = points[-1][1]
        if len(points) == 1 or order == 0:
            return last
        a, b = damping
        v1 = extrapolate(points, x, 1)
        if order == 1 or len(points) == 2:
            return last + a * (v1 - last)
        return last + a * (v1 - last) + b * (extrapolate(points, x, 2) - v1)

    def _correct(self, i, x, v, guided, states, gamma):
        sig = self.sigmas
        start, x0 = guided[-1][0], states[guided[-1][0]]
        through = [guided[-1], (i, v)]
        y = x0
        for j in range(int(start), i):
            y = y + (sig[j + 1] - sig[j]) * extrapolate(through, j, 1)
        return y, v + gamma * (y - x) / max(sig[i], 1e-3)


def spell(computed: str, steps: int) -> str:
    chosen = {int(s) for s in computed.split(",")}
    return "".join("F" if i in chosen else "S" for i in range(steps))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dit-digits", choices=zoo.list())
    ap.add_argument("--study", required=True, choices=("abscissa", "damping", "cfg", "corrector"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    sampler = Sampler(zoo.load(args.model), args.steps)
    seeds = range(args.seeds)
    refs = {s: sampler.run(s, "F" * args.steps) for s in seeds}

    def score(kinds, **kw) -> float:
        return sum(psnr(sampler.run(s, kinds, **kw), refs[s]) for s in seeds) / len(seeds)

    print(f"{args.model}, {args.steps} steps, seeds 0-{args.seeds - 1} x digits 0-9, PSNR (dB) against full compute")
    sig = sampler.sigmas
    if args.study == "abscissa":
        coords = {f"i^{p}": [i ** p for i in range(args.steps + 1)] for p in (0.7, 1.0, 1.5)}
        coords["sigma"] = sig
        coords["log-SNR"] = [math.log(max(1 - s, 1e-4) / max(s, 1e-4)) for s in sig]
        coords["log sigma"] = [math.log(max(s, 1e-3)) for s in sig]
        print("| computed steps | order | " + " | ".join(coords) + " |\n|---|---|" + "---|" * len(coords))
        for computed in SCHEDULES:
            for order in (1, 2):
                row = [f"{score(spell(computed, args.steps), order=order, coord=c):.2f}" for c in coords.values()]
                print(f"| {computed} | {order} | " + " | ".join(row) + " |", flush=True)
    elif args.study == "damping":
        bs = (0.0, 0.5, 0.75, 1.0)
        print("| computed steps | a | " + " | ".join(f"b={b}" for b in bs) + " |\n|---|---|" + "---|" * len(bs))
        for computed in SCHEDULES:
            for a in (0.8, 1.0, 1.2):
                row = [f"{score(spell(computed, args.steps), order=2, damping=(a, b)):.2f}" for b in bs]
                print(f"| {computed} | {a} | " + " | ".join(row) + " |", flush=True)
    elif args.study == "cfg":
        rows = [("FCFCFCFCFCFCFCFCFCFC", 1), ("FSFSFSFSFSFSFSFSFSFS", 1), ("FFFFFFFFFFFFFFFCCCCC", 1),
                ("FCCFCCFCCFSCSSCSSSCS", 1), ("FCCCFCCCFCCCSSCSSSCS", 1), (spell(SCHEDULES[0], args.steps), 1)]
        print("| steps (F both, C cond only, S forecast) | compute | PSNR |\n|---|---|---|")
        for kinds, order in rows:
            frac = sum({"F": 1.0, "C": 0.5, "S": 0.0}[k] for k in kinds) / len(kinds)
            print(f"| `{kinds}` | {frac:.3f} | {score(kinds, order=order):.2f} |", flush=True)
    else:
        gammas = (None, 0.0, 0.5, 1.0, 1.5)
        print("| computed steps | " + " | ".join("no corrector" if g is None else f"gamma={g}" for g in gammas)
              + " |\n|---|" + "---|" * len(gammas))
        for computed in SCHEDULES:
            row = [f"{score(spell(computed, args.steps), order=1, gamma=g):.2f}" for g in gammas]
            print(f"| {computed} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
