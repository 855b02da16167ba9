"""Profiling cost and plan resampling on the zoo models.

    python tools/bench_planner.py --threads 1            # or --only profile|variants|resample|sites|...

1. Profiling time against one full-compute generation of the same sampling call (10 digits),
   in the same process: ``ditopt.profile`` (capture, observer pass, calibration run, site costs)
   / ``zoo.sample`` unoptimised. The generation is timed twice and the faster kept, after a
   warm-up call; symmetrically, torch.compile's one-time set-up in the process (imports, first
   frame conversion: what any first ``torch.compile`` pays) is paid once beforehand on a
   one-layer module, and its time printed. Each model is profiled twice and both are shown.
2. Planner variants at the budget: the default, the last step forced to compute, and a
   schedule per block instead of one for the stack (PSNR on seeds the calibration never saw).
3. Resampling: a map profiled at 20 steps planned for 30 (``plan_from_profile(map, steps=30)``:
   the map resampled, the 20-step plan's warm-up kept), the same without the warm-up kept
   (``plan_from_profile(map.resample(30))``), and a plan made at 20 resampled to 30
   (``Plan.resample``), against a plan profiled at 30, all at the same budget; the same for tuned
   plans (``ditopt.tune`` at 20, resampled, against ``ditopt.tune`` at 30). PSNR against full
   compute at 30 steps on seeds the calibration never saw.
4. Tuning (``--only tune``): ``ditopt.tune``'s time against one generation, its candidate
   count, and the chosen plan's PSNR on the calibration seed and on the scored seeds, per budget.
5. Per-sample spread (``--only samples --budget B``): every first-pass candidate of ``tune`` at
   the budget (``ditopt.tune.candidate_plans``), its PSNR on the calibration seed and on each
   scored seed, and the worst single sample's PSNR on each: whether one sample decides a
   seed's figure, and whether the calibration seed can see it.
6. Stand-ins (``--only stand-ins``): the planner at 35% and 50% of block compute with the
   stand-ins it may choose at a skipped step widened (``orders`` up to 2, ``methods``).
8. Planned sites (``--only sites``): the planner over the blocks against the planner over the
   attention and feed-forward sites inside them (the blocks' norms, modulation, gates and
   residual adds then run at every step on a forecast of what the sites return), at 35% and 50%;
   block compute counted from the profile's FLOPs per site.
7. Tuning with attention actions (``--only tune-attention``): ``ditopt.tune`` on a map profiled
   with attention samples, which adds candidates that split the budget between the blocks and
   attention actions; the plan it keeps against the best such candidate.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import ditopt
from ditopt import zoo
from ditopt.metrics import psnr

CALIBRATION_SEED = 1000


def generation_seconds(zm, labels, steps: int) -> float:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        zm.sample(labels, seed=0, steps=steps)
        best = min(best, time.perf_counter() - t0)
    return best


def warm_dynamo() -> float:
    """Seconds of torch.compile's first use in the process, on a one-layer module."""
    t0 = time.perf_counter()
    torch.compile(torch.nn.Linear(3, 3), backend=lambda gm, example_inputs: gm.forward, fullgraph=True)(torch.ones(2, 3))
    return time.perf_counter() - t0


def capture_seconds(zm, labels) -> float:
    """One call of a freshly optimised all-compute model minus one warm call: dynamo's capture
    plus ditopt's passes."""
    fast = ditopt.optimize(zm.model, ditopt.presets.all_compute(zm.steps))
    x = torch.zeros(zm.sample_shape(len(labels)))
    kwargs = dict(hidden_states=x, timestep=torch.full((len(labels),), 500.0), **zm.make_conditioning(labels),
                  return_dict=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        fast(**kwargs)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast(**kwargs)
    return first - (time.perf_counter() - t0)


def profile_of(zm, labels, steps: int):
    return ditopt.profile(zm.model, lambda tr: zm.sample(labels, seed=CALIBRATION_SEED, steps=steps, transformer=tr),
                          steps=steps, progress=False)


def tune_of(zm, labels, steps: int, budget: float, rmap=None):
    run = lambda tr: zm.sample(labels, seed=CALIBRATION_SEED, steps=steps, transformer=tr)  # noqa: E731
    rmap = rmap if rmap is not None else profile_of(zm, labels, steps)
    return ditopt.tune(zm.model, run, rmap, budget=budget, progress=False)


def mean_psnr(zm, plan, labels, steps: int, seeds, blocks: list[str], weights: dict | None = None
              ) -> tuple[float, float]:
    """Mean PSNR over ``seeds`` and the share of ``blocks``' calls that computed (each block
    weighted by ``weights``, e.g. its FLOPs; equally by default)."""
    fast = ditopt.optimize(zm.model, plan)
    weights = weights or dict.fromkeys(blocks, 1.0)
    values, executed = [], 0.0
    for seed in seeds:
        ref = zm.sample(labels, seed=seed, steps=steps)
        ditopt.reset(fast)
        values.append(psnr(zm.sample(labels, seed=seed, steps=steps, transformer=fast), ref, data_range=2.0))
        decisions = ditopt.stats(fast).decisions
        executed += sum(weights[b] * sum(a == "compute" for a in decisions[b]) / len(decisions[b]) for b in blocks)
    return sum(values) / len(values), executed / (len(seeds) * sum(weights[b] for b in blocks))


def per_sample_spread(rows, labels, seeds, budget: float) -> None:
    from ditopt.tune import candidate_plans, running

    all_seeds = [CALIBRATION_SEED, *seeds]
    head = " | ".join(f"seed {s}: batch / worst sample" for s in all_seeds)
    print(f"| model | candidate (budget {budget}) | {head} |")
    print("|---|---|" + "---|" * len(all_seeds))
    for name, zm in rows:
        rmap = profile_of(zm, labels, zm.steps)
        refs = {s: zm.sample(labels, seed=s, steps=zm.steps) for s in all_seeds}
        compiled: dict[tuple, torch.nn.Module] = {}
        for cand in candidate_plans(rmap, budget):
            fast = running(zm.model, cand.plan, compiled)
            cells = []
            for s in all_seeds:
                ditopt.reset(fast)
                out = zm.sample(labels, seed=s, steps=zm.steps, transformer=fast)
                worst = min(psnr(o, r, data_range=2.0) for o, r in zip(out, refs[s]))
                cells.append(f"{psnr(out, refs[s], data_range=2.0):.2f} / {worst:.1f}")
            print(f"| {name} | {cand.label.removeprefix('tuned: ')} | " + " | ".join(cells) + " |", flush=True)
    print()


STAND_INS = [("reuse, order 1 (default)", {}),
             ("reuse, taylor order 1-2", {"orders": (0, 1, 2)}),
             ("reuse, order 1, order 2 by taylor/hermite/foca", {"orders": (0, 1, 2),
                                                                  "methods": ("taylor", "hermite", "foca")}),
             ("order 1, order 2 by taylor/hermite/foca (no reuse)", {"orders": (1, 2),
                                                                     "methods": ("taylor", "hermite", "foca")})]


def stand_ins(rows, labels, seeds) -> None:
    """6. The stand-ins the planner may choose at a skipped step (``orders``, ``methods``)."""
    print("| model | budget | stand-ins allowed | block compute | PSNR vs full (dB) |")
    print("|---|---|---|---|---|")
    for name, zm in rows:
        rmap = profile_of(zm, labels, zm.steps)
        for budget in (0.35, 0.5):
            for label, knobs in STAND_INS:
                plan = ditopt.plan_from_profile(rmap, budget=budget, **knobs)
                value, frac = mean_psnr(zm, plan, labels, zm.steps, seeds, rmap.stack)
                print(f"| {name} | {budget} | {label} | {frac:.3f} | {value:.2f} |", flush=True)


def planned_sites(rows, labels, seeds) -> None:
    """8. The blocks or the attention and feed-forward sites inside them, planned."""
    print("| model | budget | planned sites | block compute (FLOPs) | PSNR vs full (dB) |")
    print("|---|---|---|---|---|")
    for name, zm in rows:
        rmap = profile_of(zm, labels, zm.steps)
        inner = [s for s, k in zip(rmap.sites, rmap.kinds)
                 if k in ("attention", "feedforward") and rmap.parents.get(s) in rmap.stack]
        block_flops = sum(rmap.flops[b] for b in rmap.stack)
        always = block_flops - sum(rmap.flops[s] for s in inner)  # what the blocks run around them
        for budget in (0.35, 0.5):
            for label, sites in (("blocks", list(rmap.stack)), ("attention + feed-forward", inner)):
                plan = ditopt.plan_from_profile(rmap, budget=budget, sites=sites)
                value, share = mean_psnr(zm, plan, labels, zm.steps, seeds, sites, weights=rmap.flops)
                planned = sum(rmap.flops[s] for s in sites)
                frac = (share * planned + (always if sites is inner else 0.0)) / block_flops
                print(f"| {name} | {budget} | {label} | {frac:.3f} | {value:.2f} |", flush=True)


def tune_attention(rows, labels) -> None:
    """7. ``tune`` on a map with attention samples: the plan it keeps, against the best of the
    candidates that split the budget between blocks and attention actions (calibration seed)."""
    from ditopt.bench.ours import attention_window, cfg_layout

    print("| model | budget | chosen (PSNR, calibration seed) | best blocks + attention candidate (PSNR) |")
    print("|---|---|---|---|")
    for name, zm in rows:
        run = lambda tr, zm=zm: zm.sample(labels, seed=CALIBRATION_SEED, steps=zm.steps, transformer=tr)  # noqa: E731
        rmap = ditopt.profile(zm.model, run, steps=zm.steps, progress=False, attention_window=attention_window(zm),
                              cfg="batched" if zm.cfg_mode == "batched" else None)
        for budget in (0.5, 0.35):
            tuned = ditopt.tune(zm.model, run, rmap, budget=budget, progress=False,
                                config=ditopt.PlannerConfig(cfg=cfg_layout(zm)))
            split = max((c for c in tuned.candidates if "attention" in c.label), key=lambda c: c.psnr, default=None)
            other = f"{split.label.removeprefix('tuned: ')} ({split.psnr:.2f})" if split else "none fits"
            print(f"| {name} | {budget} | {tuned.best.label.removeprefix('tuned: ')} ({tuned.best.psnr:.2f}) | "
                  f"{other} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=zoo.list())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--budgets", default="0.5,0.4,0.35", help="--only tune: comma-separated budgets")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", choices=("profile", "resample", "variants", "tune", "samples", "stand-ins",
                                                   "tune-attention", "sites"),
                        default=None,
                        help="run one part only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = torch.arange(10)
    seeds = list(range(args.seeds))
    rows = [(name, zoo.load(name)) for name in args.model or zoo.list()]
    if args.only in (None, "profile"):
        print(f"torch.compile's one-time set-up in this process: {warm_dynamo():.2f} s\n")
        print("| model | full generation (s) | capture + passes (s) | profile (s), 1st / 2nd | "
              "profile / generation, 1st / 2nd |")
        print("|---|---|---|---|---|")
        for name, zm in rows:
            zm.sample(labels[:2], seed=0, steps=2)  # warm the eager model
            gen = generation_seconds(zm, labels, zm.steps)
            times = [profile_of(zm, labels, zm.steps).profile_seconds for _ in range(2)]
            print(f"| {name} | {gen:.2f} | {capture_seconds(zm, labels):.2f} | {times[0]:.2f} / {times[1]:.2f} | "
                  f"{times[0] / gen:.2f}x / {times[1] / gen:.2f}x |", flush=True)
        print()
    if args.only in (None, "variants"):
        print(f"| model | planner variant (budget {args.budget}) | block compute | PSNR vs full (dB) |")
        print("|---|---|---|---|")
        for name, zm in rows:
            rmap = profile_of(zm, labels, zm.steps)
            variants = [("default (stack schedule, last step free)", {}),
                        ("last step forced to compute", {"compute_last": True}),
                        ("each block its own schedule", {"granularity": "site"})]
            for label, kwargs in variants:
                plan = ditopt.plan_from_profile(rmap, budget=args.budget, **kwargs)
                value, frac = mean_psnr(zm, plan, labels, zm.steps, seeds, rmap.stack)
                print(f"| {name} | {label} | {frac:.3f} | {value:.2f} |", flush=True)
        print()
    if args.only in (None, "tune"):
        print("| model | budget | tune / generation | candidates | chosen | block compute | "
              "PSNR calibration seed (peak 1) | PSNR scored seeds (dB) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, zm in rows:
            zm.sample(labels[:2], seed=0, steps=2)
            gen = generation_seconds(zm, labels, zm.steps)
            rmap = profile_of(zm, labels, zm.steps)
            for budget in (float(b) for b in args.budgets.split(",")):
                t0 = time.perf_counter()
                tuned = tune_of(zm, labels, zm.steps, budget, rmap)
                spent = time.perf_counter() - t0
                value, frac = mean_psnr(zm, tuned.plan, labels, zm.steps, seeds, rmap.stack)
                print(f"| {name} | {budget} | {spent / gen:.0f}x | {len(tuned.candidates)} | "
                      f"{tuned.best.label.removeprefix('tuned: ')} | {frac:.3f} | {tuned.best.psnr:.2f} | "
                      f"{value:.2f} |", flush=True)
        print()
    if args.only == "samples":
        per_sample_spread(rows, labels, seeds, args.budget)
    if args.only == "stand-ins":
        stand_ins(rows, labels, seeds)
    if args.only == "tune-attention":
        tune_attention(rows, labels)
    if args.only == "sites":
        planned_sites(rows, labels, seeds)
    if args.only not in (None, "resample"):
        return 0
    print(f"| model | plan at 30 steps (budget {args.budget}) | block compute | PSNR vs full (dB) |")
    print("|---|---|---|---|")
    for name, zm in rows:
        map20 = profile_of(zm, labels, 20)
        resampled = ditopt.plan_from_profile(map20, budget=args.budget).resample(30)
        replanned = ditopt.plan_from_profile(map20.resample(30), budget=args.budget)
        planned30 = ditopt.plan_from_profile(map20, budget=args.budget, steps=30)
        at30 = ditopt.plan_from_profile(profile_of(zm, labels, 30), budget=args.budget)
        tuned_resampled = tune_of(zm, labels, 20, args.budget, map20).plan.resample(30)
        tuned30 = tune_of(zm, labels, 30, args.budget).plan
        for label, plan in (("profiled at 20, planned for 30 (`plan_from_profile(map, steps=30)`)", planned30),
                            ("profiled at 20, map resampled to 30, planned at 30", replanned),
                            ("profiled at 20, plan resampled to 30 (Plan.resample)", resampled),
                            ("profiled at 30", at30),
                            ("tuned at 20, plan resampled to 30 (Plan.resample)", tuned_resampled),
                            ("tuned at 30", tuned30)):
            value, frac = mean_psnr(zm, plan, labels, 30, seeds, map20.stack)
            print(f"| {name} | {label} | {frac:.3f} | {value:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
