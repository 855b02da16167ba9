"""Time ratio of full compute against ditopt plans on a DiT whose blocks dominate.

Runs, in one process and interleaved (so machine noise hits every variant alike):
the unoptimised model, ditopt with an all-compute plan (overhead), and FORA at block level.
Reports the best of ``--repeats`` rounds and the spread of the ratio across rounds.

    python tools/bench_speed.py --steps 20 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import ditopt
from ditopt.demo import sample
from ditopt.small_models import random_dit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sample", type=int, default=32, help="latent size; tokens = (sample/2)^2")
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = random_dit(args.hidden, args.layers, args.sample)
    variants = {"full": model, "ditopt all-compute": ditopt.optimize(model, ditopt.presets.all_compute(args.steps))}
    for k in args.intervals:
        variants[f"ditopt FORA-{k} (block)"] = ditopt.optimize(
            model, ditopt.presets.fora(interval=k, steps=args.steps, level="block"))
    reference = sample(model, args.steps, sample_size=args.sample)
    diffs = {}
    for name, m in variants.items():  # capture + rewrite outside the timing
        diffs[name] = float((sample(m, args.steps, sample_size=args.sample) - reference).abs().max())
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, m in variants.items():
            t0 = time.perf_counter()
            sample(m, args.steps, sample_size=args.sample)
            times[name].append(time.perf_counter() - t0)
    full = times["full"]
    print(f"# {datetime.date.today()}  torch {torch.__version__}  threads={args.threads}  steps={args.steps}  "
          f"DiT hidden={args.hidden} layers={args.layers} tokens={(args.sample // 2) ** 2} batch=4 (CFG)")
    print("| variant | best time (s) | full / variant (best) | ratio min..max over rounds | max abs diff vs full |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        ratios = [f / t for f, t in zip(full, ts)]
        print(f"| {name} | {min(ts):.3f} | {min(full) / min(ts):.2f} | {min(ratios):.2f}..{max(ratios):.2f} "
              f"| {diffs[name]:.2e} |")
    print(f"(median full time {statistics.median(full):.3f} s)")


if __name__ == "__main__":
    main()
