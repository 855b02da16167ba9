"""From a redundancy map to a plan: the least predicted error for a compute budget.

The planner chooses the steps at which the blocks of the stack compute (all together by default:
``granularity="stack"``; per block with ``"site"``); at the other steps each block reuses its
residual or forecasts it (``predict``, order 1: the line through its last two computed steps),
whichever the calibration run says is closer. The price of a choice is replayed
from the map's residual subsamples: at step t, after computed steps a < b, reuse costs
``|y_t - y_b|^2`` and a forecast ``|y_t - (y_b + (y_b - y_a) (t - b) / (b - a))|^2``, both
measured against what the site really produced at t. Errors therefore grow with the distance
to the last computed step, which is how consecutive reuses accumulate. Each step's error is
weighted by the step's share of the sampler's trajectory (the drop in timestep to the next step),
since an error in the velocity at a step moves the sample by that much. With the whole stack
planned together, a step's error is that of the stack's output: the blocks' misses summed
element by element (they partly cancel), not the sum of their sizes.

The replayed error ranks plans only roughly (it cannot see how a forecast error at one step
changes what the model sees at the next); :func:`ditopt.tune` uses this planner's schedules as
candidates among others and keeps the plan that measures best on the calibration run.

A dynamic program over (previous computed step, last computed step) finds the schedule
minimising ``error + lambda * FLOPs``, with the first step computed (the last too if asked) and
at most ``max_consecutive`` steps in a row not computed; a bisection on ``lambda`` meets the
budget (fraction of block FLOPs) or the error bound for the whole stack.

Example::

    >>> import ditopt
    >>> from ditopt import zoo
    >>> m = zoo.load("dit-digits")
    >>> rmap = ditopt.profile(m.model, lambda tr: m.sample(list(range(10)), seed=100, steps=8, transformer=tr),
    ...                       steps=8, progress=False)
    >>> plan = ditopt.plan_from_profile(rmap, budget=0.5)
    >>> plan.steps, plan.model
    (8, 'DiTTransformer2DModel')
    >>> schedule = ditopt.planner.schedule_from_profile(rmap, budget=0.5)
    >>> schedule.compute_fraction <= 0.5
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ditopt.runtime.decisions import Action

from .errors import MAX_STEPS, check_count, check_number, check_steps, short
from .plan import Plan, Rule
from .profile import ProfileError, RedundancyMap
from .replay import Forecast, GroupReplay, SiteReplay, forecasts, solve

COMPUTE, REUSE, REUSE_RESIDUAL, PREDICT = Action.COMPUTE, Action.REUSE, Action.REUSE_RESIDUAL, Action.PREDICT
REPLAYABLE = ("taylor", "hermite", "foca")  # forecasters the planner can replay on subsamples

__all__ = ["PlannerConfig", "Schedule", "schedule_from_profile", "plan_from_profile", "smoothcache"]


@dataclass(frozen=True)
class PlannerConfig:
    """The planner's knobs, one line each (what was measured for them: :func:`plan_from_profile`).

    Example:
        >>> PlannerConfig(budget=0.5).with_(steps=30).steps
        30
        >>> PlannerConfig(budget=2.0)
        Traceback (most recent call last):
        ...
        ditopt.profile.ProfileError: budget must be a fraction of full compute in (0, 1], got 2.0
    """

    budget: float | None = None  # fraction of full block compute in (0, 1] the plan may spend
    max_error: float | None = None  # instead of a budget: the least compute with at most this predicted error
    max_consecutive: int = 3  # most steps in a row a site may go without computing
    orders: tuple[int, ...] = (0, 1)  # 0 allows reuse, 1 order-1 forecasts (predict), 2 order-2 ones
    methods: tuple[str, ...] = ("taylor",)  # forecasters tried at order 2 (taylor, hermite, foca)
    sites: tuple[str, ...] | None = None  # the sites planned (default: the blocks of the stack)
    steps: int | None = None  # plan for this step count from a map profiled at another (warm-up kept)
    granularity: str = "stack"  # "stack": planned sites compute at the same steps; "site": each on its own
    compute_last: bool = False  # force the last step to compute
    accumulation: float = 1.0  # a skipped step's replayed error grows by (1 + this) per step since a compute
    warmup: int | None = None  # steps 0..warmup-1 compute; step warmup is the first that does not
    block_budget: float | None = None  # with attention actions: the blocks' own budget (>= budget), see plan_from_profile
    cfg: object = None  # attention share_cfg: the caller's CFG layout (runtime.cfg_sharing.CfgLayout; None: the map's)

    def __post_init__(self):
        if isinstance(self.sites, str):  # one site, not its letters
            object.__setattr__(self, "sites", (self.sites,))
        if self.sites is not None and not isinstance(self.sites, tuple):
            object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "orders", tuple(self.orders))
        object.__setattr__(self, "methods", tuple(self.methods) if not isinstance(self.methods, str) else
                           (self.methods,))
        if self.granularity not in ("stack", "site"):
            raise ProfileError(f"granularity must be 'stack' or 'site', got {self.granularity!r}")
        check_budget(self.budget)
        check_budget(self.block_budget)
        if self.max_error is not None:
            check_number(self.max_error, "max_error", minimum=0, error=ProfileError)
        check_count(self.max_consecutive, "max_consecutive", minimum=0, maximum=MAX_STEPS, error=ProfileError)
        if self.steps is not None:
            check_steps(self.steps, "steps", minimum=2, error=ProfileError)
        if self.warmup is not None:  # its upper bound depends on the map (schedule_from_profile)
            check_count(self.warmup, "warmup", maximum=MAX_STEPS, error=ProfileError)
        check_number(self.accumulation, "accumulation", minimum=0, error=ProfileError)
        if not self.orders or not set(self.orders) <= {0, 1, 2} or any(isinstance(o, bool) for o in self.orders):
            raise ProfileError(f"orders must be a non-empty subset of (0, 1, 2), got {short(self.orders)}")
        if not self.methods or not set(self.methods) <= set(REPLAYABLE):
            raise ProfileError(f"methods must be a non-empty subset of {REPLAYABLE}, got {short(self.methods)}")
        if self.sites is not None and not (self.sites and all(isinstance(x, str) for x in self.sites)):
            raise ProfileError(f"sites must be a non-empty list of site names, got {short(self.sites)}")
        if not isinstance(self.compute_last, bool):
            raise ProfileError(f"compute_last must be True or False, got {short(self.compute_last)}")

    def with_(self, **knobs) -> "PlannerConfig":
        """A copy with these knobs changed (unknown names raise ProfileError naming them)."""
        unknown = set(knobs) - set(self.__dataclass_fields__)
        if unknown:
            raise ProfileError(f"unknown planner knob(s) {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}")
        return replace(self, **knobs)


def check_budget(budget) -> None:
    """A compute budget: None, or a fraction of full block compute in (0, 1]."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget <= 1):
        raise ProfileError(f"budget must be a fraction of full compute in (0, 1], got {short(budget)}")


def _config(config: PlannerConfig | None, budget: float | None, knobs: dict) -> PlannerConfig:
    config = (config or PlannerConfig()).with_(**knobs)
    if budget is not None:
        config = config.with_(budget=budget)
    if (config.budget is None) == (config.max_error is None):
        raise ProfileError("give exactly one of budget= (fraction of full block compute) or max_error=")
    return config


@dataclass
class Schedule:
    """A planned action per (site, step), with what the planner predicts of it."""

    steps: int
    actions: dict[str, list[str]]  # site -> action per step (compute | reuse(_residual) | predict)
    compute_fraction: float  # of block FLOPs
    predicted_error: float  # relative RMS error of the blocks' residuals, weighted by step
    lam: float = 0.0
    forecasts: dict[str, list[tuple[str, int] | None]] = field(default_factory=dict)  # predict: (method, order)

    def to_plan(self, model: str | None, name: str) -> Plan:
        """Group sites with the same schedule into one rule per action (and forecaster): a short,
        readable YAML. Taylor order 1 is written as before (``order: 1``, no method)."""
        groups: dict[tuple, list[str]] = {}
        for site, row in self.actions.items():
            fc = self.forecasts.get(site) or [(("taylor", 1) if a == PREDICT else None) for a in row]
            groups.setdefault(tuple(zip(row, fc)), []).append(site)
        rules = []
        for row, sites in groups.items():
            kinds = sorted({(a, f or ("", 0)) for a, f in row if a != COMPUTE}, key=str)
            if not kinds and len(groups) > 1:  # named all the same: the plan says which sites it planned
                rules.append(Rule(sites=tuple(sites), action=COMPUTE))
            for action, (method, order) in kinds:
                steps = tuple(i for i, (a, f) in enumerate(row) if a == action and (f or ("", 0)) == (method, order))
                rules.append(Rule(sites=tuple(sites), action=action, steps=steps,
                                  order=order if action == PREDICT else None,
                                  method=method if action == PREDICT and method != "taylor" else None))
        if not rules:
            rules = [Rule(sites=tuple(self.actions) or ("*",), action=COMPUTE)]
        plan = Plan(steps=self.steps, rules=rules, model=model, name=name)
        plan.check()
        return plan


def _weights(rmap: RedundancyMap) -> torch.Tensor:
    t = torch.tensor(rmap.timesteps, dtype=torch.float64)
    n = rmap.steps
    if len(t) != n or torch.isnan(t).any() or n < 2:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    nxt = torch.cat([t[1:], torch.zeros(1, dtype=torch.float64)])
    w = (t - nxt).abs()
    return w / w.sum() if w.sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)


def schedule_from_profile(rmap: RedundancyMap, budget: float | None = None, config: PlannerConfig | None = None,
                          **knobs) -> Schedule:
    """The planned schedule; see :func:`plan_from_profile` for the arguments."""
    if not isinstance(rmap, RedundancyMap):
        raise ProfileError(f"expected a RedundancyMap, got {type(rmap).__name__}")
    config = _config(config, budget, knobs)
    warmup, kept_warmup = config.warmup, False
    if config.steps is not None and config.steps != rmap.steps:
        if warmup is None:  # kept in steps from the plan at the profiled step count
            warmup = _profiled_warmup(rmap, config)
            kept_warmup = warmup is not None
        rmap = rmap.resample(config.steps)
    if warmup is not None:
        top = rmap.steps - 1 - int(config.compute_last)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup <= top \
                or config.max_consecutive < 1:
            raise ProfileError(f"warmup (the first step not computed) must be an integer in [1, {top}] with "
                               f"max_consecutive >= 1, got warmup={warmup!r}")
    return _Problem(rmap, config, warmup).best(kept_warmup)


def least_compute(steps: int, max_consecutive: int | None = None) -> float:
    """The least compute fraction a plan of ``steps`` steps can have: step 0 computed and at most
    ``max_consecutive`` (default :class:`PlannerConfig`'s) steps in a row not.

    Example:
        >>> least_compute(20), least_compute(10), least_compute(1)
        (0.25, 0.3, 1.0)
    """
    run = (PlannerConfig.max_consecutive if max_consecutive is None else max_consecutive) + 1
    return math.ceil(steps / run) / steps


def _profiled_warmup(rmap: RedundancyMap, config: PlannerConfig) -> int | None:
    """The first step not computed by the plan made at the map's own step count, if it leaves room."""
    here = schedule_from_profile(rmap, config=config.with_(steps=None))
    skipped = [t for row in here.actions.values() for t, a in enumerate(row) if a != COMPUTE]
    if skipped and min(skipped) < config.steps - 1 - config.compute_last:
        return min(skipped)
    return None


def block_flops(rmap: RedundancyMap) -> float:
    """FLOPs of one step's blocks: every block site no other block holds (the stack's, a refiner's)."""
    blocks = [s for s, k in zip(rmap.sites, rmap.kinds) if k == "block"]
    outer = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]
    return sum(float(rmap.flops.get(b, 0.0)) for b in outer)


class _Problem:
    """One planning problem: the sites' replayed costs, solved for a multiplier ``lam`` on FLOPs."""

    def __init__(self, rmap: RedundancyMap, config: PlannerConfig, warmup: int | None):
        self.rmap, self.config, self.warmup = rmap, config, warmup
        self.names = list(config.sites) if config.sites is not None else list(rmap.stack)
        if not self.names:
            raise ProfileError("the redundancy map has no block stack to plan for; pass sites=")
        for s in self.names:
            rmap.index(s)  # KeyError naming the site if it is not in the map
        weights = _weights(rmap)
        cands = forecasts(config.orders, config.methods)
        self.per = {s: SiteReplay(rmap.samples[s], weights, cands, max_gap=config.max_consecutive,
                                  accumulation=config.accumulation, compute_last=config.compute_last, warmup=warmup)
                    for s in self.names}
        self.cost = {s: max(float(rmap.flops.get(s, 0.0)), 1.0) for s in self.names}
        # the budget is a share of every block's compute: blocks outside the planned sites (a text
        # refiner's; a block's other parts, when attention sites are planned) run at every step
        planned = sum(self.cost.values())
        self.fixed = max(block_flops(rmap) - planned, 0.0) * rmap.steps
        self.total_cost = planned * rmap.steps + self.fixed
        self.energy = sum(p.energy for p in self.per.values()) or 1.0
        self.reuse_action = {s: REUSE_RESIDUAL if rmap.residual_form.get(s, False) else REUSE for s in self.names}
        self.group = GroupReplay(self.per) if config.granularity == "stack" else None

    def _named(self, site: str, row: list) -> tuple[list[str], list[tuple[str, int] | None]]:
        """A solved row as plan actions and forecasters (reuse becomes the site's reuse action)."""
        actions, fcs = [], []
        for choice in row:
            if isinstance(choice, dict):
                choice = choice[site]
            if not isinstance(choice, Forecast):
                actions.append(COMPUTE)
                fcs.append(None)
            elif choice.action == PREDICT:
                actions.append(PREDICT)
                fcs.append((choice.method, choice.order))
            else:
                actions.append(self.reuse_action[site])
                fcs.append(None)
        return actions, fcs

    def solve(self, lam: float) -> Schedule:
        actions, fcs, error, flops = {}, {}, 0.0, 0.0
        if self.group is not None:
            row, error, n_computed = solve(self.group, lam, sum(self.cost.values()), "")
            for s in self.names:
                actions[s], fcs[s] = self._named(s, row)
            flops = n_computed * sum(self.cost.values())
        else:
            for s in self.names:
                row, e, n_computed = solve(self.per[s], lam, self.cost[s], self.reuse_action[s])
                actions[s], fcs[s] = self._named(s, row)
                error += e
                flops += n_computed * self.cost[s]
        return Schedule(self.rmap.steps, actions, (flops + self.fixed) / self.total_cost,
                        math.sqrt(error / self.energy), lam, forecasts=fcs)

    def fits(self, sch: Schedule) -> bool:
        budget, max_error = self.config.budget, self.config.max_error
        return sch.compute_fraction <= budget + 1e-9 if budget is not None else sch.predicted_error <= max_error

    def best(self, kept_warmup: bool) -> Schedule:
        """lam = 0 computes everything; a huge lam the fewest steps the constraints allow. Bisect
        lam (log scale): for a budget, the smallest lam that fits spends the most of it; for an
        error bound, the largest lam that fits spends the least compute."""
        config = self.config
        scale = self.energy / max(self.cost.values())
        hi = scale
        fewest = self.solve(hi)
        while hi < scale * 1e12:
            more = self.solve(hi * 10)
            if more.compute_fraction >= fewest.compute_fraction - 1e-12:
                break
            hi, fewest = hi * 10, more
        if config.budget is not None and not self.fits(fewest):
            first = "first step computed" if self.warmup is None else \
                f"steps 0-{self.warmup - 1} computed (warm-up{' kept from the profiled plan' if kept_warmup else ''})"
            raise ProfileError(f"budget {config.budget} is below the least compute these constraints allow "
                               f"({fewest.compute_fraction:.3f}: {first}, at most "
                               f"{config.max_consecutive} steps in a row not computed)")
        if config.max_error is not None and self.fits(fewest):
            return fewest
        fit_lowers_hi = config.budget is not None
        lo, best = 0.0, fewest if fit_lowers_hi else self.solve(0.0)
        for _ in range(60):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e9
            sch = self.solve(mid)
            if self.fits(sch):
                best = sch
            if self.fits(sch) == fit_lowers_hi:
                hi = mid
            else:
                lo = mid
            if lo > 0 and hi / lo < 1 + 1e-6:
                break
        return best


def plan_from_profile(rmap: RedundancyMap, budget: float | None = None, config: PlannerConfig | None = None,
                      **knobs) -> Plan:
    """The plan with the least predicted error for a compute ``budget`` (fraction of full block
    compute, in (0, 1]) or the least compute whose predicted error is at most ``max_error``.

    The knobs are the fields of :class:`PlannerConfig`, given as a ``config`` or as keywords
    (keywords override the config's fields). ``orders``: 0 allows reuse, 1 allows order-1
    forecasts (``predict``), 2 order-2 ones by each forecaster in ``methods`` (taylor, hermite,
    foca); at a skipped step each site takes the stand-in whose replayed miss is least
    (:mod:`ditopt.replay` calls the runtime's own forecasters on the map's subsamples). Measured
    (``tools/bench_planner.py --only stand-ins --seeds 4``), the wider choice moves PSNR by at most
    0.7 dB either way at 35% and 50% of block compute on the zoo models, so the default stays (0, 1). ``sites`` defaults to the blocks of the stack. The result is an
    ordinary plan for the profiled model (``plan.model``); edit its YAML as any other.

    ``steps`` plans for another step count than the profiled one, without profiling again: the
    map is resampled (:meth:`RedundancyMap.resample`) and planned there, with the warm-up (the
    first step not computed) of the plan made at the profiled count kept in steps. The warm-up
    is kept because an interpolated map cannot show how fast the first steps change (they are
    sampled on the coarser grid) and the planner then starts skipping a step too early.
    Measured from 20 to 30 steps at 50% of block compute, against a plan profiled at 30
    (``tools/bench_planner.py --only resample``): dit-digits 50.72 vs 51.05 dB, wan-digits
    48.00 vs 47.93 dB; planning on the resampled map alone, 48.49 and 45.29.
    ``warmup=w`` makes steps ``0..w-1`` compute and step ``w`` the first that does not.

    ``block_budget`` (with a map profiled with ``attention_window=W``) plans the blocks at that
    budget and lets attention actions (DiTFastAttn's AST = reuse, WA-RS = window, ASC = share_cfg
    at attention sites, at the steps where the blocks compute) bring the plan down to ``budget``,
    least replayed error per FLOP saved first (:mod:`ditopt.attention_plan`). The two replays
    measure different things (a block stack's residual, one attention output), so the split is a
    knob that :func:`ditopt.tune` searches on the calibration run rather than a planner choice.

    ``granularity="stack"`` (default) makes all planned sites compute at the same steps and lets
    each choose reuse or forecast at the others; ``"site"`` plans each site's steps on its own.
    Measured on the zoo models, per-site schedules predict less error but do worse: a site that
    computes while an upstream site forecasts caches a residual made from a forecast input, and
    the next forecast extrapolates that error (at 50%: dit-digits 36.7 dB per site vs 45.1 dB for
    the stack schedule, wan-digits 30.9 vs 41.5; ``tools/bench_planner.py --only variants``).

    The first step always computes. ``compute_last=True`` also forces the last; measured, that
    costs more than it gives (the compute is better spent earlier): at 50% of block compute,
    wan-digits 38.7 dB with the last step forced vs 41.5 dB without, dit-digits 41.3 vs 45.1.
    ``accumulation`` multiplies a skipped step's replayed error by ``(1 + accumulation)`` per
    step since the last computed one: forecasts made from forecast-fed states drift further than
    the clean calibration trajectory shows.
    """
    if "comm_budget" in knobs:  # a K/V change map: where to elide exchanges (ditopt/stale_plan.py)
        from .stale_plan import KVChangeMap, plan_stale

        if not isinstance(rmap, KVChangeMap):
            raise ProfileError(f"comm_budget plans from a K/V change map (ditopt.stale_plan.profile_kv), got a "
                               f"{type(rmap).__name__}; a redundancy map takes budget=")

        return plan_stale(rmap, **knobs)
    config = _config(config, budget, knobs)
    if config.block_budget is not None:
        return _with_attention(rmap, config)
    sch = schedule_from_profile(rmap, config=config)
    label = f"budget={config.budget}" if config.budget is not None else f"max_error={config.max_error}"
    if sch.steps != rmap.steps:
        label += f", from a map of {rmap.steps} steps"
    return sch.to_plan(rmap.model, f"profiled {label}")


def _with_attention(rmap: RedundancyMap, config: PlannerConfig) -> Plan:
    """Blocks planned at ``block_budget``; attention actions (reuse, window, share_cfg at the steps
    where the blocks compute; :func:`ditopt.attention_plan.attention_for_schedule`) bring the plan
    to ``budget``."""
    from .attention_plan import attention_for_schedule

    if config.budget is None or config.block_budget < config.budget - 1e-12:
        raise ProfileError(f"block_budget ({config.block_budget}) needs a budget at most that large, "
                           f"got budget={config.budget}")
    if getattr(rmap, "attention", None) is None or config.steps not in (None, rmap.steps):
        raise ProfileError("block_budget plans attention actions, which need a map profiled with "
                           "ditopt.profile(..., attention_window=W) at the plan's step count")
    sch = schedule_from_profile(rmap, config=config.with_(budget=config.block_budget))
    att = attention_for_schedule(rmap, sch, config.budget, warmup=config.warmup or 1, cfg=config.cfg)
    name = f"profiled budget={config.budget} (blocks {config.block_budget}, attention the rest)"
    blocks = sch.to_plan(rmap.model, name)
    rules = [r for r in blocks.rules if r.action != COMPUTE] + att.rules()
    plan = Plan(steps=blocks.steps, rules=rules or blocks.rules, model=rmap.model, name=name)
    plan.check()
    return plan


def smoothcache(rmap: RedundancyMap, alpha: float, *, metric: str = "rel_l1_residual", max_consecutive: int = 3,
                sites: list[str] | None = None) -> Plan:
    """SmoothCache / DiTango-style thresholding of a redundancy map: a site reuses its residual at a
    step while the change it accumulated since its last computed step (``metric`` from the
    calibration run, mean over CFG branches) stays below ``alpha``.

    Follows Liu et al., "SmoothCache: A Universal Inference Acceleration Technique for Diffusion
    Transformers" (2024), which calibrates per-layer representation errors over steps and caches
    a layer where the error is below a threshold; DiTango's profiled schedules threshold the same
    kind of map. The first and last steps compute; at most ``max_consecutive`` steps in a row reuse.
    """
    check_number(alpha, "alpha", positive=True, error=ProfileError)
    check_count(max_consecutive, "max_consecutive", minimum=0, maximum=MAX_STEPS, error=ProfileError)
    if metric not in rmap.metrics:
        raise ProfileError(f"unknown metric {short(metric)}; known: {sorted(rmap.metrics)}")
    names = list(sites) if sites is not None else list(rmap.stack)
    values = rmap.metric(metric).nanmean(dim=-1)  # [steps, sites]
    actions = {}
    for s in names:
        col = values[:, rmap.index(s)]
        row, acc, run = [COMPUTE] * rmap.steps, 0.0, 0
        reuse_action = REUSE_RESIDUAL if rmap.residual_form.get(s, False) else REUSE
        for t in range(1, rmap.steps - 1):
            acc += float(col[t]) if not math.isnan(float(col[t])) else math.inf
            if acc < alpha and run < max_consecutive:
                row[t], run = reuse_action, run + 1
            else:
                acc, run = 0.0, 0
        actions[s] = row
    sch = Schedule(rmap.steps, actions, 0.0, float("nan"))
    return sch.to_plan(rmap.model, f"smoothcache alpha={alpha}")
