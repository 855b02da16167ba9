"""ditopt's own methods in the benchmark: every preset over a grid of its knobs, and the plans
the profiler and the tuner make from one calibration run.

The presets come from the one registry, :data:`ditopt.presets.REGISTRY`; this module only says
which knobs the benchmark tries and what its tables call each method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ditopt import optimize, presets, reset, stats

from .method import Applied, Context, Method, Setting


def _optimized(model, plan) -> Applied:
    fast = optimize(model, plan)
    return Applied(fast, before_generation=lambda: reset(fast), decisions=lambda: stats(fast).decisions)


@dataclass
class Grid:
    """A preset as the benchmark runs it: its key (``ditopt:<key>``), its name in the tables,
    the preset, and the settings tried, each a label and the preset's knobs (a function of the
    step count where a knob depends on it)."""

    key: str
    name: str
    preset: str  # a key of ditopt.presets.REGISTRY
    knobs: list[tuple[str, dict | Callable[[int], dict]]]
    overhead: bool = False  # the setting caches nothing

    def settings(self, steps: int) -> list[Setting]:
        return [self._setting(label, knobs) for label, knobs in self.knobs]

    def _setting(self, label: str, knobs) -> Setting:
        preset = presets.REGISTRY[self.preset]

        def apply(model, ctx: Context) -> Applied:
            fixed = knobs(ctx.steps) if callable(knobs) else knobs
            return _optimized(model, preset(steps=ctx.steps, **fixed))

        return Setting(label, apply, self.overhead)

    def method(self) -> Method:
        return Method(f"ditopt:{self.key}", "ditopt", self.name, self.settings)


GRIDS = [
    Grid("all-compute", "all-compute", "all-compute", [("-", {})], overhead=True),
    Grid("fora", "FORA", "fora", [(f"interval={k}", dict(interval=k, level="block")) for k in (2, 3, 4)]),
    Grid("fora-layer", "FORA (layer)", "fora", [(f"interval={k}", dict(interval=k, level="layer")) for k in (2, 3)]),
    Grid("fbcache", "First-Block-Cache", "first-block-cache",
         [(f"threshold={t}", dict(threshold=t)) for t in (0.05, 0.1, 0.2, 0.3)]),
    Grid("taylorseer", "TaylorSeer", "taylorseer",
         [(f"interval={k}, order={o}", dict(interval=k, order=o)) for k, o in ((2, 1), (3, 1), (3, 2), (4, 2))]),
    Grid("taylorseer-output", "TaylorSeer (output)", "taylorseer-output",
         [(f"output, interval={k}, order={o}", dict(interval=k, order=o))
          for k, o in ((2, 1), (2, 2), (3, 1), (3, 2), (4, 2))]),
    Grid("delta-dit", "Δ-DiT", "delta-dit",
         [(f"interval={i}, k={k}", dict(interval=i, k=k)) for i, k in ((2, 2), (2, 3), (3, 3), (4, 3))]),
    Grid("teacache", "TeaCache", "teacache", [(f"threshold={t}", dict(threshold=t)) for t in (0.1, 0.15, 0.2, 0.3)]),
    Grid("dbcache", "DBCache", "dbcache",
         [(f"F{f}B{b}, threshold={t}", dict(threshold=t, fn=f, bn=b))
          for f, b, t in ((1, 0, 0.08), (1, 0, 0.12), (1, 0, 0.2), (2, 1, 0.2))]),
    Grid("pab", "PAB", "pab",
         [(f"self={k}, cross={k + 2}, steps 20%-90%", dict(self_range=k, cross_range=k + 2, joint_range=k))
          for k in (2, 3)]
         + [("self=2, cross=4, all steps", lambda n: dict(self_range=2, cross_range=4, joint_range=2, window=(0, n)))]),
    Grid("ditfastattn", "DiTFastAttn (static)", "ditfastattn",
         [(f"window={w}, interval={k}", dict(window=w, interval=k)) for w, k in ((16, 2), (16, 4), (32, 4))]),
    Grid("duca", "DuCa", "duca",
         [(f"interval={k}, ratio={r}", dict(interval=k, ratio=r)) for k, r in ((3, 0.25), (4, 0.1), (5, 0.2))]),
]


# ----------------------------------------------------------------------------------------------
# Plans made from a calibration run

_MAPS: dict[tuple[str, int], Any] = {}
CALIBRATION_SEED = 1000  # not one of the benchmark's seeds (0..N-1)


def _calibration_run(ctx: Context):
    """The calibration call (10 digits, a seed the benchmark never scores) and its model."""
    from ditopt import zoo

    calib = zoo.load(ctx.zoo.name)
    labels = torch.arange(10)
    return calib, lambda tr: calib.sample(labels, seed=CALIBRATION_SEED, steps=ctx.steps, transformer=tr)


def _redundancy_map(ctx: Context):
    """One calibration run per zoo model and step count, with the attention samples that the
    attention actions are planned from (a window of :func:`attention_window` tokens)."""
    from ditopt import profile

    key = (ctx.zoo.name, ctx.steps)
    if key not in _MAPS:
        calib, run = _calibration_run(ctx)
        _MAPS[key] = profile(calib.model, run, steps=ctx.steps, progress=False,
                             cfg="batched" if calib.cfg_mode == "batched" else None,
                             attention_window=attention_window(calib))
    return _MAPS[key]


def attention_window(zm) -> int:
    """The benchmark's attention window: an eighth of the model's tokens (latent elements per
    channel over the patch volume), at least 16."""
    shape = zm.sample_shape(1)[2:]
    patch = zm.config["model_config"]["patch_size"]
    patch = [patch] * len(shape) if isinstance(patch, int) else list(patch)[-len(shape):]
    tokens = math.prod(n // p for n, p in zip(shape, patch))
    return max(16, tokens // 8)


def cfg_layout(zm):
    """How the zoo's sampling loop runs CFG: the conditional half (or call) first."""
    from ditopt.runtime.cfg_sharing import CfgLayout

    return CfgLayout("batched", "second") if zm.cfg_mode == "batched" else CfgLayout("calls", "second")


def _greedy_settings(steps: int) -> list[Setting]:
    """DiTFastAttn's greedy calibration (:func:`ditopt.presets.ditfastattn` with ``threshold``)."""
    return [_profiled_setting(f"threshold={t}", lambda m, t=t: presets.ditfastattn(
        m.steps, threshold=t, rmap=m, cfg=_CFG.get(m.model))) for t in (0.05, 0.1)]


def _split_settings(steps: int) -> list[Setting]:
    """Blocks at a higher budget, attention actions the rest (``plan_from_profile(block_budget=)``)."""
    from ditopt import plan_from_profile

    return [_profiled_setting(f"budget={b}, blocks {bb}", lambda m, b=b, bb=bb: plan_from_profile(
        m, budget=b, block_budget=bb, warmup=2, cfg=_CFG.get(m.model))) for b, bb in ((0.5, 0.6), (0.35, 0.45))]


_CFG: dict[str, Any] = {}  # model class -> the zoo's CFG layout, filled when a map is made


def _profiled_setting(label: str, make_plan: Callable[[Any], Any]) -> Setting:
    def apply(model, ctx: Context) -> Applied:
        _CFG[type(model).__name__] = cfg_layout(ctx.zoo)
        return _optimized(model, make_plan(_redundancy_map(ctx)))

    return Setting(label, apply)


def _profiled_settings(steps: int) -> list[Setting]:
    from ditopt import plan_from_profile

    return [_profiled_setting(f"budget={b}", lambda m, b=b: plan_from_profile(m, budget=b))
            for b in _reachable((0.5, 0.4, 0.35, 0.25), steps)]


def _reachable(budgets: tuple[float, ...], steps: int) -> list[float]:
    """The budgets a plan of ``steps`` steps can meet (0.25 needs a step count divisible by 4)."""
    from ditopt.planner import least_compute

    return [b for b in budgets if b >= least_compute(steps) - 1e-9]


def _tuned_settings(steps: int) -> list[Setting]:
    """Closed-loop plans (:func:`ditopt.tune`) on the same calibration seed as the profile."""
    from ditopt import PlannerConfig, tune

    def setting(budget: float) -> Setting:
        def apply(model, ctx: Context) -> Applied:
            calib, run = _calibration_run(ctx)
            config = PlannerConfig(cfg=cfg_layout(calib))  # attention share_cfg: the zoo's CFG order
            tuned = tune(calib.model, run, _redundancy_map(ctx), budget=budget, progress=False, config=config)
            return _optimized(model, tuned.plan)

        return Setting(f"budget={budget}", apply)

    return [setting(b) for b in _reachable((0.5, 0.4, 0.35, 0.25), steps)]


def _smoothcache_settings(steps: int) -> list[Setting]:
    from ditopt.planner import smoothcache

    return [_profiled_setting(f"alpha={a}", lambda m, a=a: smoothcache(m, a)) for a in (0.1, 0.2, 0.4)]


OURS: list[Method] = [grid.method() for grid in GRIDS] + [
    Method("ditopt:profiled", "ditopt", "profiled plan", _profiled_settings),
    Method("ditopt:smoothcache", "ditopt", "SmoothCache (profiled)", _smoothcache_settings),
    Method("ditopt:tuned", "ditopt", "tuned plan (closed loop)", _tuned_settings),
    Method("ditopt:ditfastattn-greedy", "ditopt", "DiTFastAttn (greedy calibration)", _greedy_settings),
    Method("ditopt:profiled-attention", "ditopt", "profiled plan, blocks + attention", _split_settings),
]
