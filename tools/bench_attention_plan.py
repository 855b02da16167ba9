"""DiTFastAttn on the zoo models: the static preset, its greedy calibration at a few thresholds,
and the attention planner at two budgets, against full compute (issue 15 item 6).

Per model: one calibration run (seed 100, labels 0..9) with ``attention_window=W``; each plan
then samples labels 0..9 at seeds 0 and 1 through ``ditopt.optimize``; PSNR is against the
full-compute sample of the same seed (data range 2). ``compute`` is the block FLOPs the plan
executes over a generation, as a fraction of all-compute, from the cost model given the
runtime's decisions of the run (``ditopt.cost_model(...).predict(plan, decisions=...)``, which
counts window attention and CFG sharing; from the plan alone it counts a ``share_cfg`` step of
CFG as two calls as saved at both calls, while the conditional call computes);
``planned`` is what the replay predicted. ``actions`` counts the runtime's decisions at the
attention sites (what really ran, over both seeds).

    OMP_NUM_THREADS=1 python tools/bench_attention_plan.py            # both models, 20 steps
    OMP_NUM_THREADS=1 python tools/bench_attention_plan.py --models dit-digits --steps 8
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import ditopt
from ditopt import zoo
from ditopt.attention_plan import AttentionReplay, greedy_calibration, schedule_attention
from ditopt.metrics import psnr
from ditopt.runtime.cfg_sharing import CfgLayout

# per model: window (tokens), the caller's CFG layout (dit-digits batches [cond, uncond])
SETUP = {"dit-digits": (16, CfgLayout("batched", "second")), "wan-digits": (64, CfgLayout("calls"))}
THRESHOLDS = (0.05, 0.15, 0.3)
BUDGETS = {"dit-digits": (0.9, 0.8), "wan-digits": (0.8, 0.6)}


def bench(name: str, steps: int, seeds: int, out) -> None:
    m = zoo.load(name)
    window, cfg = SETUP[name]
    labels = list(range(10))
    refs = [m.sample(labels, seed=s, steps=steps) for s in range(seeds)]
    t0 = time.perf_counter()
    rmap = ditopt.profile(m.model, lambda tr: m.sample(labels, seed=100, steps=steps, transformer=tr), steps=steps,
                          progress=False, cfg="batched" if cfg.layout == "batched" else None,
                          attention_window=window)
    replay = AttentionReplay(rmap, cfg=cfg)
    a = rmap.attention
    block = sum(rmap.flops[b] for b in rmap.stack)
    sdpa = sum(a.sdpa_flops(s) for s in replay.sites)
    sites = sum(rmap.flops[s] for s in replay.sites)
    out(f"\n## {name}: {steps} steps, seeds 0..{seeds - 1}, window {window} of {a.calls[replay.sites[0]][0][0][-2]} "
        f"tokens; profile {time.perf_counter() - t0:.1f} s")
    out(f"attention sites (projections included): {sites / block:.1%} of block FLOPs; their SDPA calls: "
        f"{sdpa / block:.1%}")
    example = dict(hidden_states=torch.zeros(m.sample_shape(1)), timestep=torch.ones(1) * 500,
                   **m.make_conditioning(torch.tensor([0])))
    cost = ditopt.cost_model(m.model, **example)
    calls = 2 if cfg.layout == "calls" else 1
    plans = [("ditfastattn static (interval 4, warmup 2)", ditopt.presets.ditfastattn(steps, window=window), None)]
    for th in THRESHOLDS:
        sch = greedy_calibration(rmap, th, warmup=2, cfg=cfg)
        plans.append((f"ditfastattn greedy threshold={th}", sch.to_plan(rmap.model, f"greedy {th}"), sch))
    for budget in BUDGETS[name]:
        sch = schedule_attention(rmap, budget, warmup=2, cfg=cfg)
        plans.append((f"attention planner budget={budget}", sch.to_plan(rmap.model, f"budget {budget}"), sch))
    out("| plan | compute | planned | PSNR dB | actions at attention sites |")
    out("|---|---|---|---|---|")
    for label, plan, sch in plans:
        fast = ditopt.optimize(m.model, plan)
        scores, counts, fractions = [], collections.Counter(), []
        for seed in range(seeds):
            ditopt.reset(fast)
            x = m.sample(labels, seed=seed, steps=steps, transformer=fast)
            scores.append(psnr(x, refs[seed]))
            decisions = ditopt.stats(fast).decisions
            fractions.append(cost.predict(plan, steps_calls=calls, decisions=decisions).compute_fraction)
            for site, row in decisions.items():
                if site in a.outputs:
                    counts.update(row)
        fraction = sum(fractions) / seeds
        planned = f"{sch.compute_fraction:.3f}" if sch is not None else "-"
        out(f"| {label} | {fraction:.3f} | {planned} | {sum(scores) / seeds:.2f} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} |")
        torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUP), choices=list(SETUP))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    for name in args.models:
        bench(name, args.steps, args.seeds, lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
