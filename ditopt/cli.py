"""The ``ditopt`` command line.

    ditopt demo                       FORA on a diffusers DiT: reuse per step, speed, difference
    ditopt sites dit                  the sites ditopt finds in a model
    ditopt plan validate PLAN         check a plan file (and against --model)
    ditopt diff wan --preset fora-2   the graph before and after the passes, as an HTML page

MODEL is a small config of a diffusers class (dit, pixart, cogvideox, wan, hunyuan, or the class
name, e.g. WanTransformer3DModel) or a trained zoo model (dit-digits, wan-digits).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import ditopt

from . import presets, zoo
from .errors import MAX_STEPS, DitoptError, PlanError
from .small_models import MODELS, build_model

# The subcommands import their harnesses (demo, graph diff, benchmark) when they run, so that
# `ditopt sites` loads neither matplotlib nor scikit-image nor those harnesses.

MODEL_HELP = (f"a small config ({', '.join(MODELS)}, or the diffusers class name), a zoo model "
              f"({', '.join(zoo.NAMES)}), or your own: module:function or file.py:function, called with no "
              f"arguments, returning (model, dict of forward keyword inputs)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: ``ditopt profile: error: argument --steps: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(minimum: int, maximum: int):
    """An argparse ``type``: an integer in [minimum, maximum]."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an integer in [{minimum}, {maximum}], got {text!r}")
        return value

    return integer


def fraction(text: str) -> float:
    """An argparse ``type``: a finite number in (0, 1] (a share of full compute)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a fraction of full compute in (0, 1], got {text!r}")
    return value


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written as a new or replaced file, or None if it can."""
    if not path:
        return "an empty path"
    p = Path(path)
    parent = p.parent
    try:
        if p.is_dir():
            return f"{path} is a directory"
        if not parent.exists():
            return f"cannot write {path}: directory {parent} does not exist"
        if not parent.is_dir():
            return f"cannot write {path}: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
            return f"cannot write {path}: permission denied"
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    return None


def output_path(text: str) -> str:
    """An argparse ``type``: a file path that can be written (``-``, stdout, where a command allows it)."""
    problem = None if text == "-" else unwritable(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def check_writable(*paths: str | Path) -> None:
    """DitoptError for the first of ``paths`` that cannot be written (default outputs, before work)."""
    for path in paths:
        problem = unwritable(str(path))
        if problem:
            raise DitoptError(problem)


class _Stages:
    """A progress bar over the named stages of long work, on stderr, shown only on a terminal.

        with _Stages(2) as stage:
            stage("capturing"); ...
            stage("rewriting"); ...
    """

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=None, leave=False, file=sys.stderr, bar_format="{desc} {bar} {n}/{total}")
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_description(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def cmd_demo(args) -> int:
    from .demo import format_table, run_demo, run_zoo_demo

    if args.model == "random-dit":
        result = run_demo(steps=args.steps, interval=args.interval, hidden=args.hidden, layers=args.layers,
                          repeats=args.repeats)
    else:
        if args.model not in zoo.list():
            raise DitoptError(f"unknown demo model {args.model!r}; known: {', '.join([*zoo.list(), 'random-dit'])}")
        result = run_zoo_demo(args.model, interval=args.interval, repeats=args.repeats)
    print(format_table(result))
    return 0


def cmd_sites(args) -> int:
    with _Stages(2) as stage:
        stage(f"building {args.model}")
        model, kwargs = build_model(args.model)
        stage("capturing the graph")
        table = ditopt.sites(model.eval(), **kwargs)
    print(f"{'site':50s} {'kind':12s} {'attn':6s} {'live-outs':>9s} {'residual':>8s}")
    for s in table:
        print(f"{s.name:50s} {s.kind:12s} {s.attention or '':6s} {len(s.live_outs):>9d} "
              f"{'yes' if s.residual_form else 'no':>8s}")
    return 0


def cmd_plan(args) -> int:
    plan = ditopt.Plan.load(args.plan)
    if args.action == "show":
        print(plan.to_yaml(), end="")
    if args.model:
        with _Stages(2) as stage:
            stage(f"building {args.model}")
            model, kwargs = build_model(args.model)
            stage("capturing the graph")
            found = ditopt.sites(model.eval(), **kwargs)
        try:
            compiled = plan.compile(found)
        except PlanError as exc:  # name the file, as its load errors do
            raise PlanError(f"{args.plan}: {exc}") from None
        counts = compiled.action_counts()
        print(f"valid for {args.model}: {len(compiled.actions)} sites reuse at some step; "
              f"(site, step) actions: {counts}")
    elif args.action == "validate":
        print(f"valid: {len(plan.rules)} rules for {plan.steps} steps")
    return 0


def _check_budget_reachable(budget: float | None, steps: int, tune: bool) -> None:
    """Before profiling: no plan of ``steps`` steps spends less than :func:`least_compute`."""
    from .planner import PlannerConfig, least_compute

    if budget is None or tune:
        return
    floor = least_compute(steps)
    if budget < floor - 1e-9:
        raise DitoptError(f"--budget {budget} is below the least compute a plan of {steps} steps can spend ({floor:.3f}: "
                          f"step 0 computed, at most {PlannerConfig.max_consecutive} steps in a row not): raise it, "
                          f"or plan for more steps")


def cmd_profile(args) -> int:
    import torch

    if args.model not in zoo.list():
        raise DitoptError(f"profile needs a zoo model (it runs the model's sampling loop); got {args.model!r}, "
                          f"known: {', '.join(zoo.list())}")
    if args.tune and args.budget is None:
        raise DitoptError("--tune needs --budget")
    if args.plan_steps is not None and (args.budget is None or args.tune):
        raise DitoptError("--plan-steps needs --budget, and not --tune (tune measures plans at the profiled count)")
    if args.plan is not None and args.budget is None:
        raise DitoptError("--plan needs --budget (the plan is made for that compute fraction)")
    zm = zoo.load(args.model)
    steps = zm.steps if args.steps is None else args.steps
    _check_budget_reachable(args.budget, args.plan_steps or steps, args.tune)
    out = Path(args.output or f"{args.model}-map.yaml")
    out = out if out.suffix in (".yaml", ".yml") else out.with_suffix(".yaml")  # as RedundancyMap.save names it
    png = args.png or str(out.with_suffix(".png"))
    plan_path = args.plan or f"{args.model}-plan-{args.budget}.yaml"
    outputs = [out, out.with_suffix(".safetensors"), Path(png), *([Path(plan_path)] if args.budget is not None else [])]
    clash = next((p for i, p in enumerate(outputs) if p.resolve() in {q.resolve() for q in outputs[:i]}), None)
    if clash is not None:
        raise DitoptError(f"two outputs would be written to {clash}: give the map (-o), --png and --plan different names")
    from .profile import HEATMAP_SUFFIXES

    if Path(png).suffix.lower() not in HEATMAP_SUFFIXES:
        raise DitoptError(f"--png {png}: a heatmap is written as .png, .svg or .pdf")
    check_writable(*outputs)
    torch.set_num_threads(args.threads)
    labels = torch.arange(10)

    def run(tr):
        return zm.sample(labels, seed=args.seed, steps=steps, transformer=tr)

    rmap = ditopt.profile(zm.model, run, steps=steps, cfg="batched" if zm.cfg_mode == "batched" else None)
    out = rmap.save(out)
    png = rmap.heatmap(png)
    print(f"profiled {args.model}: {steps} steps, {rmap.branches} CFG branch(es), {len(rmap.sites)} sites in "
          f"{rmap.profile_seconds:.1f} s")
    print(f"wrote {out}, {out.with_suffix('.safetensors')} and {png}")
    if args.budget is not None:
        if args.tune:
            tuned = ditopt.tune(zm.model, run, rmap, budget=args.budget)
            plan = tuned.plan
            print(f"tuned: {tuned.best.label} ({tuned.best.psnr:.2f} dB on the calibration run, "
                  f"best of {len(tuned.candidates)})")
        else:
            plan = ditopt.plan_from_profile(rmap, budget=args.budget, steps=args.plan_steps)
        plan.save(plan_path)
        print(f"wrote {plan_path} (plan for {plan.steps} steps at {args.budget:.0%} of block compute)")
    return 0


def cmd_bench(args) -> int:
    import shlex

    from .bench import run_from_args

    run_from_args(args, "ditopt bench " + shlex.join(args.argv))
    return 0


PRESET_HELP = presets.SPELLINGS


def preset_plan(name: str, steps: int):
    """The plan a preset name stands for, e.g. ``fora-2`` or ``fbcache-0.08`` (see ``presets.REGISTRY``)."""
    try:
        preset, knobs = presets.lookup(name)
    except KeyError:
        raise DitoptError(f"unknown preset {name!r}; known: {PRESET_HELP}") from None
    try:
        return preset(steps=steps, **knobs)
    except ValueError as exc:
        raise DitoptError(f"preset {name!r}: {exc}") from None


def cmd_diff(args) -> int:
    from .capture import capture
    from .graphdiff import diff_graphs, rewrite

    plan = ditopt.Plan.load(args.plan) if args.plan else preset_plan(args.preset, args.steps or 20)
    if args.plan and args.steps is not None and args.steps != plan.steps:
        plan = plan.resample(args.steps)  # as the plan would run on a sampler of that many steps
    suffix = {"html": "html", "text": "txt", "dot": "dot"}[args.format]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(args.model.replace(":", "-"))).strip("-.") or "model"
    out = args.output or f"ditopt-diff-{slug}.{suffix}"
    if out != "-":
        check_writable(out)
    with _Stages(4) as stage:
        stage(f"building {args.model}")
        model, kwargs = build_model(args.model)
        stage("capturing the graph")
        captured = capture(model, **kwargs)
        stage("running the passes")
        before, after, table, compiled = rewrite(captured, plan, model_name=type(model).__name__,
                                                 timestep_arg=args.timestep_arg)
        stage(f"rendering {args.format}")
        diff = diff_graphs(before, after, table, compiled, model=type(model).__name__,
                           plan_name=args.preset or plan.name or os.path.basename(args.plan))
        document = {"html": diff.to_html, "text": diff.to_text, "dot": diff.to_dot}[args.format]()
    if out == "-":
        sys.stdout.write(document)
        return 0
    with open(out, "w", encoding="utf-8") as f:
        f.write(document)
    print(diff.summary())
    print(f"wrote {out} ({len(document.encode()) / 1024:.0f} KiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and any(a == "--device" or a.startswith("--device=") for a in argv):
        from .bench.gpu import main as speed_main  # speed on one device: ditopt/bench/gpu.py

        try:
            speed_main(argv[1:])
        except DitoptError as exc:  # e.g. an unknown --variants name
            print(f"ditopt: error: {exc}", file=sys.stderr)
            return 2
        return 0
    parser = _Parser(prog="ditopt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FORA on a diffusers DiT: reuse per step, speed-up and difference")
    demo.add_argument("--model", default="dit-digits",
                      help="a zoo model (dit-digits, wan-digits) or random-dit (a larger DiT, random weights)")
    demo.add_argument("--steps", type=count(1, MAX_STEPS), default=20, help="sampling steps (random-dit only)")
    demo.add_argument("--interval", type=count(1, MAX_STEPS), default=2, help="FORA: compute every N-th step")
    demo.add_argument("--hidden", type=count(4, 8192), default=256, help="random-dit only: width, a multiple of 4 "
                                                                     "that splits into heads of about 64")
    demo.add_argument("--layers", type=count(1, 256), default=8, help="random-dit only")
    demo.add_argument("--repeats", type=count(1, 1000), default=3, help="timed runs (the best is reported)")
    demo.set_defaults(func=cmd_demo)
    s = sub.add_parser("sites", help="list the sites ditopt finds in a model")
    s.add_argument("model", help=MODEL_HELP)
    s.set_defaults(func=cmd_sites)
    p = sub.add_parser("plan", help="show or validate a plan file")
    p.add_argument("action", choices=("show", "validate"))
    p.add_argument("plan", help="a plan YAML file")
    p.add_argument("--model", help="also check it against this model's sites: " + MODEL_HELP)
    p.set_defaults(func=cmd_plan)
    d = sub.add_parser("diff", help="the graph before and after the passes: HTML page, text diff or DOT",
                       description="Capture MODEL, rewrite it with a plan, and write the graph before and after "
                                   "the passes: sites as collapsible groups, inserted nodes highlighted, nodes a "
                                   "skip branch no longer runs marked, and the plan's decisions per step.")
    d.add_argument("model", help=MODEL_HELP)
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", help="a plan YAML file")
    which.add_argument("--preset", help=f"a preset by name: {PRESET_HELP}")
    d.add_argument("--steps", type=count(1, MAX_STEPS), default=None,
                   help="denoising steps of the preset (default 20), or those a --plan is resampled to")
    d.add_argument("--timestep-arg", default="timestep", help="the forward argument that is the timestep")
    d.add_argument("--format", choices=("html", "text", "dot"), default="html")
    d.add_argument("-o", "--output", type=output_path,
                   help="where to write ('-' for stdout; default ditopt-diff-MODEL.html/.txt/.dot)")
    d.set_defaults(func=cmd_diff)
    pr = sub.add_parser("profile", help="calibration run: a redundancy map (+ heatmap), optionally a plan")
    pr.add_argument("model", help="a zoo model: dit-digits or wan-digits")
    pr.add_argument("--steps", type=count(1, MAX_STEPS), default=None, help="denoising steps (default: the model's)")
    pr.add_argument("--seed", type=count(0, 2**63 - 1), default=1000, help="calibration seed (10 digits, one each)")
    pr.add_argument("-o", "--output", type=output_path, default=None,
                    help="map file (YAML; tensors beside it as .safetensors)")
    pr.add_argument("--png", type=output_path, default=None, help="heatmap PNG (default: next to the map)")
    pr.add_argument("--budget", type=fraction, default=None,
                    help="also write a plan for this compute fraction, in (0, 1]")
    pr.add_argument("--plan", type=output_path, default=None, help="where to write that plan (needs --budget)")
    pr.add_argument("--plan-steps", type=count(2, MAX_STEPS), default=None,
                    help="make that plan for this many steps instead of the profiled count "
                         "(plan_from_profile(..., steps=N); not with --tune)")
    pr.add_argument("--tune", action="store_true",
                    help="choose the plan by measuring candidates on the calibration run (ditopt.tune; slower)")
    pr.add_argument("--threads", type=count(1, 1024), default=1, help="CPU threads for torch")
    pr.set_defaults(func=cmd_profile)
    b = sub.add_parser("bench", help="fidelity and compute of ditopt presets and peers on the zoo models; "
                                     "with --device DEV, speed on that device (see ditopt/bench/gpu.py)")
    if argv[:1] == ["bench"]:  # its options come from the harness, imported only for this command
        from .bench import add_arguments

        add_arguments(b)
    b.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    try:
        return args.func(args)
    except DitoptError as exc:
        print(f"ditopt: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output file that cannot be written
        print(f"ditopt: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _users_model_failed(args, exc)


def _users_model_failed(args, exc: Exception) -> int:
    """The user's own model (``module:function``) refusing the inputs it gave: one line, status 2.
    Anything else is ours, a bug, and shown whole."""
    spec = str(getattr(args, "model", None) or "")
    if ":" not in spec or _raised_in_ditopt(exc):
        raise exc
    from .capture import first_line

    print(f"ditopt: error: {spec}: the model raised {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
    return 2


def _raised_in_ditopt(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback (where it was raised, under dynamo's
    re-raise: the cause's) is ditopt's own code: then it is ours, not the user's model's."""
    import traceback

    seen = exc
    while isinstance(seen.__cause__, BaseException):
        seen = seen.__cause__
    frames = traceback.extract_tb(seen.__traceback__)
    root = Path(__file__).resolve().parent
    packages = {root, root.parent / "passes", root.parent / "runtime"}
    return bool(frames) and any(Path(frames[-1].filename).resolve().is_relative_to(p) for p in packages)


if __name__ == "__main__":
    sys.exit(main())
