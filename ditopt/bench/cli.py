"""``ditopt bench`` and ``tools/bench_fidelity.py``: the options, and running them."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ditopt import zoo
from .measure import BenchResult, run_bench
from .methods import METHODS
from .report import format_table, plot_pareto, write_report


def add_arguments(parser) -> None:
    """The options of ``ditopt bench`` and ``tools/bench_fidelity.py``."""
    parser.add_argument("--model", action="append", choices=zoo.list(),
                        help="zoo model (repeatable; default: all zoo models)")
    from ditopt.cli import count, output_path
    from ditopt.errors import MAX_STEPS

    parser.add_argument("--seeds", type=count(1, 1000), default=4, help="fixed seeds, 10 digits each (default 4)")
    parser.add_argument("--steps", type=count(1, MAX_STEPS), default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated method keys (default all): {', '.join(METHODS)}")
    parser.add_argument("--markdown", type=output_path, default=None,
                        help="write the table into this markdown file")
    parser.add_argument("--png", type=output_path, default=None,
                        help="write the Pareto plot (block compute vs PSNR) here")
    parser.add_argument("--threads", type=count(1, 1024), default=1, help="torch threads (default 1: stabler ratios)")


def run_from_args(args, command: str) -> list[BenchResult]:
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    results = []
    for name in args.model or zoo.list():
        res = run_bench(name, seeds=args.seeds, steps=args.steps, methods=methods,
                        log=lambda s: tqdm.write(s))
        res.command = command
        print(f"\n{name}\n" + format_table(res))
        results.append(res)
    if args.markdown:
        write_report(results, args.markdown, args.png, command)
        print(f"\nwrote {args.markdown}" + (f" and {args.png}" if args.png else ""))
    elif args.png:
        plot_pareto(results, args.png)
        print(f"\nwrote {args.png}")
    return results
