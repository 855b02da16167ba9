"""Which ``predict`` forecaster wins where: PSNR against full compute of TaylorSeer-style block
plans (``ditopt.presets.taylorseer``: warm-up, then every ``interval``-th step computes and the
others forecast every block's residual) with each ``method``, on the zoo models.

    python tools/bench_forecasters.py --models dit-digits wan-digits --seeds 2 --markdown out.md

Same steps, seeds and labels for every row. ``compute`` is the share of (block, call) pairs that
computed, from ``ditopt.stats(model).decisions``: the blocks of a zoo model are identical, so it is
the fraction of block FLOPs executed (as ``ditopt bench`` counts it). ``psnr`` is averaged over the
seeds (data range 2, as ``ditopt bench``). Rows that are the same computation as another are not
run: at order 1, foca and hermite at its default scale (1/sqrt 2) are taylor exactly
(``ditopt/runtime/forecast.py``); their cells say ``= taylor``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import time

import torch

import ditopt
from ditopt import presets, zoo
from ditopt.metrics import psnr
from ditopt.runtime import forecast

GRID = ((2, 1), (3, 1), (3, 2), (4, 2))  # (interval, order)
# column -> (plan method, module constants to set while it runs)
VARIANTS = {
    "taylor": ("taylor", {}),
    "hermite s=0.71": ("hermite", {"HERMITE_SCALE": 1 / math.sqrt(2)}),
    "hermite s=0.5": ("hermite", {"HERMITE_SCALE": 0.5}),
    "foca": ("foca", {}),
    "freq c=0.25": ("freq", {"FREQ_CUTOFF": 0.25}),
    "freq c=0.5": ("freq", {"FREQ_CUTOFF": 0.5}),
}
EXTRA = {  # run only when named with --variants
    "freq c=0.1": ("freq", {"FREQ_CUTOFF": 0.1}),
    "freq c=0": ("freq", {"FREQ_CUTOFF": 0.0}),
    "hermite s=0.6": ("hermite", {"HERMITE_SCALE": 0.6}),
}
SAME_AS_TAYLOR = {("hermite s=0.71", 1), ("foca", 1)}


def run_variant(name: str, steps: int, interval: int, order: int, method: str, constants: dict, labels, references):
    saved = {k: getattr(forecast, k) for k in constants}
    for k, v in constants.items():
        setattr(forecast, k, v)
    try:
        fresh = zoo.load(name)
        fast = ditopt.optimize(fresh.model, presets.taylorseer(steps=steps, interval=interval, order=order, method=method))
        psnrs, computed, total = [], 0, 0
        for seed, ref in enumerate(references):
            ditopt.reset(fast)
            out = fresh.sample(labels, seed=seed, steps=steps, transformer=fast)
            psnrs.append(psnr(out, ref, data_range=2.0))
            decisions = ditopt.stats(fast).decisions
            blocks = [s for s in decisions if s.count(".") == 1 and s.split(".")[1].isdigit()]
            computed += sum(d == "compute" for b in blocks for d in decisions[b])
            total += sum(len(decisions[b]) for b in blocks)
        torch._dynamo.reset()
        return computed / total, sum(psnrs) / len(psnrs)
    finally:
        for k, v in saved.items():
            setattr(forecast, k, v)


def bench_model(name: str, seeds: int, n_labels: int, log, variants: dict | None = None) -> list[str]:
    ref_zoo = zoo.load(name)
    steps = ref_zoo.steps
    labels = torch.arange(n_labels) % 10
    references = [ref_zoo.sample(labels, seed=seed, steps=steps) for seed in range(seeds)]
    variants = VARIANTS if variants is None else variants
    head = "| interval, order | compute | " + " | ".join(variants) + " |"
    lines = [f"**{name}** ({steps} steps, {seeds} seeds, {n_labels} samples a seed; PSNR in dB)", "", head,
             "|" + "---|" * (len(variants) + 2)]
    for interval, order in GRID:
        cells, compute = [], None
        for column, (method, constants) in variants.items():
            if (column, order) in SAME_AS_TAYLOR:
                cells.append("= taylor")
                continue
            t0 = time.perf_counter()
            compute, value = run_variant(name, steps, interval, order, method, constants, labels, references)
            cells.append(f"{value:.2f}")
            log(f"{name} i={interval} o={order} {column}: compute {compute:.3f} psnr {value:.2f} "
                f"({time.perf_counter() - t0:.0f} s)")
        lines.append(f"| {interval}, {order} | {compute:.3f} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(zoo.NAMES), choices=list(zoo.NAMES))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--labels", type=int, default=10, help="samples per seed (digits 0..9, cycled)")
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *EXTRA], default=list(VARIANTS),
                        help=f"columns to run (default: all but the extras {', '.join(EXTRA)})")
    parser.add_argument("--markdown", help="write the tables to this file as well")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out = [f"Command: `python tools/bench_forecasters.py {shlex.join(argv)}` "
           f"({datetime.date.today().isoformat()}, {'GPU' if torch.cuda.is_available() else 'CPU'})", ""]
    for name in args.models:
        variants = {k: {**VARIANTS, **EXTRA}[k] for k in args.variants}
        out += bench_model(name, args.seeds, args.labels, log, variants) + [""]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
