"""The ``ditopt`` command line.

    ditopt demo                       FORA on a diffusers DiT: reuse per step, speed, difference
    ditopt sites dit                  the sites ditopt finds in a model
    ditopt plan validate PLAN         check a plan file (and against --model)
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import DitoptError

MODELS = ("dit", "pixart", "cogvideox", "wan", "hunyuan")


def _build(name: str):
    from .small_models import build

    return build(name)


def cmd_demo(args) -> int:
    from .demo import format_table, run_demo, run_zoo_demo

    if args.model == "random-dit":
        result = run_demo(steps=args.steps, interval=args.interval, hidden=args.hidden, layers=args.layers,
                          repeats=args.repeats)
    else:
        from . import zoo

        if args.model not in zoo.list():
            raise DitoptError(f"unknown demo model {args.model!r}; known: {', '.join([*zoo.list(), 'random-dit'])}")
        result = run_zoo_demo(args.model, interval=args.interval, repeats=args.repeats)
    print(format_table(result))
    return 0


def cmd_sites(args) -> int:
    from .backend import sites

    model, kwargs = _build(args.model)
    table = sites(model.eval(), **kwargs)
    print(f"{'site':50s} {'kind':12s} {'attn':6s} {'live-outs':>9s} {'residual':>8s}")
    for s in table:
        print(f"{s.name:50s} {s.kind:12s} {s.attention or '':6s} {len(s.live_outs):>9d} "
              f"{'yes' if s.residual_form else 'no':>8s}")
    return 0


def cmd_plan(args) -> int:
    from .backend import sites
    from .plan import Plan

    plan = Plan.load(args.plan)
    if args.action == "show":
        print(plan.to_yaml(), end="")
    if args.model:
        model, kwargs = _build(args.model)
        compiled = plan.compile(sites(model.eval(), **kwargs))
        counts = compiled.action_counts()
        print(f"valid for {args.model}: {len(compiled.actions)} sites reuse at some step; "
              f"(site, step) actions: {counts}")
    elif args.action == "validate":
        print(f"valid: {len(plan.rules)} rules for {plan.steps} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditopt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FORA on a diffusers DiT: reuse per step, speed-up and difference")
    demo.add_argument("--model", default="dit-digits",
                      help="a zoo model (dit-digits, wan-digits) or random-dit (a larger DiT, random weights)")
    demo.add_argument("--steps", type=int, default=20, help="sampling steps (random-dit only)")
    demo.add_argument("--interval", type=int, default=2)
    demo.add_argument("--hidden", type=int, default=256, help="random-dit only")
    demo.add_argument("--layers", type=int, default=8, help="random-dit only")
    demo.add_argument("--repeats", type=int, default=3)
    demo.set_defaults(func=cmd_demo)
    s = sub.add_parser("sites", help="list the sites ditopt finds in a model")
    s.add_argument("model", help=f"one of {', '.join(MODELS)} (small config)")
    s.set_defaults(func=cmd_sites)
    p = sub.add_parser("plan", help="show or validate a plan file")
    p.add_argument("action", choices=("show", "validate"))
    p.add_argument("plan", help="a plan YAML file")
    p.add_argument("--model", help="also check it against this model's sites")
    p.set_defaults(func=cmd_plan)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DitoptError as exc:
        print(f"ditopt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
