"""Closed-loop planning: try candidate plans on the calibration run, keep the one that measures best.

:func:`ditopt.plan_from_profile` predicts a plan's error by replaying reuse and forecasts on
the calibration trajectory. That ranks plans only roughly: a forecast error at one step
changes what the model sees at the next, and how much that matters depends on where in the
network the error enters. :func:`tune` therefore treats the planner
as a source of candidates, as autotuners do: it runs each candidate through the same sampling
call the profile used, compares the result with that call at full compute, and returns the
candidate with the least error that fits the budget.

The candidates are every combination of

- **where** to skip: the blocks of the stack (each block reuses or forecasts its residual) or
  the model's ``output`` site (the stack, final norm and projection are skipped together and
  the model's output is forecast: what the sampler integrates);
- **when**: the profiled dynamic-programming schedules, evenly spread schedules with a
  warm-up of 1-3 computed steps, an optional gap after it and 0-2 trailing steps left out, and
  schedules spread from step 0 with gaps that grow (:func:`spread_schedules`);
- **how**: forecasts of order 1 or 2 (TaylorSeer's finite differences). Plain reuse is left
  out, which halves the tuning time: on the zoo models FORA-2 (reuse) scores about 8 dB below
  TaylorSeer (forecasts) at about the same compute (``docs/BENCHMARKS.md``).

The open-loop plan of :func:`ditopt.plan_from_profile` (per block, reuse or an order-1
forecast) is a candidate too, so tuning never measures worse than it on the calibration run.

Each candidate runs without recompiling: one graph per site choice is compiled and then given
each candidate's decision table (:func:`ditopt.set_plan`).

Example::

    >>> import torch, ditopt
    >>> from ditopt import zoo
    >>> m = zoo.load("dit-digits")
    >>> run = lambda tr: m.sample(list(range(4)), seed=100, steps=8, transformer=tr)
    >>> rmap = ditopt.profile(m.model, run, steps=8, cfg="batched", progress=False)
    >>> tuned = ditopt.tune(m.model, run, rmap, budget=0.5, progress=False)
    >>> tuned.plan.steps, tuned.best.compute_fraction <= 0.5
    (8, True)
    >>> tuned.best.psnr >= max(c.psnr for c in tuned.candidates)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ditopt.runtime.decisions import Action

from .api import compiled_graph, optimize, reset, runtime_of, set_plan
from .errors import PlanError, check_count, check_steps
from .plan import Plan, Rule
from .planner import PlannerConfig, block_flops, check_budget, plan_from_profile, schedule_from_profile
from .profile import ProfileError, RedundancyMap, call_with
from .sites import OUTPUT

__all__ = ["Candidate", "Tuned", "candidate_plans", "tune", "tune_pipeline"]


REFINE_ROUNDS = 4  # hill-climbing rounds of tune(refine=True) at most


@dataclass
class Candidate:
    """One plan tried on the calibration run."""

    label: str
    plan: Plan
    compute_fraction: float  # of block compute: computed steps / steps
    psnr: float = math.nan  # of the calibration run's output against full compute (dB, peak 1)
    recipe: tuple | None = field(default=None, repr=False)  # (where, sites, {step: order}) of a forecast plan


@dataclass
class Tuned:
    """What :func:`tune` found: the best plan and every candidate it measured."""

    plan: Plan
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)

    def table(self) -> str:
        """The candidates as a markdown table, best first."""
        rows = ["| candidate | compute | calibration PSNR (dB) |", "|---|---|---|"]
        for c in sorted(self.candidates, key=lambda c: -c.psnr):
            rows.append(f"| {c.label} | {c.compute_fraction:.3f} | {c.psnr:.2f} |")
        return "\n".join(rows)


def spread_schedules(steps: int, computed: int) -> list[tuple[int, ...]]:
    """Spread sets of ``computed`` steps out of ``steps``. Evenly spread: a warm-up of 1-3 steps,
    then the rest spread from just after it (or one step later) to the last step (or 1-2 before
    it). Spread from step 0 with gaps that stay or grow: the i-th of n at ``round(T (i / (n-1))**p)``
    for p 1, 1.25 or 1.5 and T the last step or 1-4 before it (late steps, where the velocity
    changes least, are the cheapest to forecast; the last ones may be left out).

    Example:
        >>> (0, 2, 4, 6, 8) in spread_schedules(10, 5), (0, 1, 2, 5, 8) in spread_schedules(10, 5)
        (True, True)
        >>> (0, 3, 7, 11, 16) in spread_schedules(20, 5)   # p 1.25, the last 3 steps forecast
        True
    """
    check_steps(steps, "steps", error=ProfileError)
    check_count(computed, "computed", minimum=0, maximum=steps, error=ProfileError)
    out: dict[tuple[int, ...], None] = {}
    for warmup in (1, 2, 3):
        rest = computed - warmup
        if rest < 0:
            continue
        for gap in (0, 1):
            for tail in (0, 1, 2):
                lo, hi = warmup + gap, steps - 1 - tail
                if rest == 0:
                    pts: list[int] = []
                elif rest == 1:
                    pts = [lo]
                else:
                    if hi - lo + 1 < rest:
                        continue
                    pts = [lo + round(i * (hi - lo) / (rest - 1)) for i in range(rest)]
                chosen = tuple(sorted(set(range(warmup)) | set(pts)))
                if len(chosen) == computed and chosen[-1] < steps:
                    out[chosen] = None
    for power in (1.0, 1.25, 1.5):
        for tail in range(5):
            last = steps - 1 - tail
            if computed >= 2 and last >= computed - 1:
                chosen = tuple(sorted({round(last * (i / (computed - 1)) ** power) for i in range(computed)}))
                if len(chosen) == computed:
                    out.setdefault(chosen, None)
    return list(out)


def _forecast_plan(steps: int, sites: tuple[str, ...], orders: dict[int, int], model: str | None,
                   name: str) -> Plan:
    """Every step not in ``orders`` computes; step t forecasts with Taylor order ``orders[t]``."""
    rules = [Rule(sites=sites, action=Action.PREDICT, order=order,
                  steps=tuple(sorted(t for t, o in orders.items() if o == order)))
             for order in sorted(set(orders.values()))]
    return Plan(steps=steps, rules=rules or [Rule(sites=sites, action=Action.COMPUTE)], model=model, name=name)


def _block_share(rmap: RedundancyMap, stack_share: float) -> float:
    """The share of all blocks' compute run when the stack runs ``stack_share`` of its own: blocks
    outside the stack (a text refiner's) run at every step (as :mod:`ditopt.planner` counts)."""
    stack = sum(float(rmap.flops.get(b, 0.0)) for b in rmap.stack)
    rest = max(block_flops(rmap) - stack, 0.0)
    return (stack_share * stack + rest) / (stack + rest) if stack + rest > 0 else stack_share


def _forecast_candidate(rmap: RedundancyMap, where: str, sites: tuple[str, ...], orders: dict[int, int],
                        label: str) -> Candidate:
    name = f"tuned: {where}, {label}"
    cand = Candidate(name, _forecast_plan(rmap.steps, sites, orders, rmap.model, name),
                     _block_share(rmap, (rmap.steps - len(orders)) / rmap.steps))
    cand.recipe = (where, sites, dict(orders))
    return cand


def candidate_plans(rmap: RedundancyMap, budget: float, config: PlannerConfig | None = None) -> list[Candidate]:
    """The plans :func:`tune` tries first for ``budget`` (see the module docstring); the
    planner's schedules among them are planned with ``config``'s other knobs."""
    _check_inputs(rmap, budget)
    config = (config or PlannerConfig()).with_(budget=budget, max_error=None)
    n = rmap.steps
    computed = max([1] + [k for k in range(1, n + 1) if _block_share(rmap, k / n) <= budget + 1e-9])
    blocks = tuple(rmap.stack)
    if not blocks:
        raise ProfileError("the redundancy map has no block stack to plan for")
    where: list[tuple[str, tuple[str, ...]]] = [("blocks", blocks)]
    if OUTPUT in rmap.sites:
        where.append(("output", (OUTPUT,)))
    out: list[Candidate] = []
    schedules: dict[tuple[int, ...], str] = {}
    try:
        sch = schedule_from_profile(rmap, config=config)
        schedules[tuple(i for i, a in enumerate(sch.actions[blocks[0]]) if a == Action.COMPUTE)] = "profiled schedule"
        plan = sch.to_plan(rmap.model, "tuned: blocks, profiled plan (reuse or order-1 forecast per block)")
        out.append(Candidate(plan.name, plan, sch.compute_fraction))
    except ProfileError:
        pass  # the budget is below what the planner's constraints allow; spread schedules remain
    if OUTPUT in rmap.sites:
        try:
            sch = schedule_from_profile(rmap, config=config.with_(sites=(OUTPUT,), granularity="site"))
            key = tuple(i for i, a in enumerate(sch.actions[OUTPUT]) if a == Action.COMPUTE)
            schedules.setdefault(key, "profiled output schedule")
        except ProfileError:
            pass
    if getattr(rmap, "attention", None) is not None:  # blocks at a higher budget, attention actions the rest
        for extra in (0.1, 0.2, 0.3):
            try:
                blocks = round(min(1.0, budget + extra), 6)
                plan = plan_from_profile(rmap, config=config.with_(block_budget=blocks))
            except ProfileError:
                continue
            out.append(Candidate(f"tuned: {plan.name}", plan, budget))
    for s in spread_schedules(n, computed):
        schedules.setdefault(s, "spread " + ",".join(map(str, s)))
    for label_where, sites in where:
        for comp, label in schedules.items():
            if _block_share(rmap, len(comp) / n) > budget + 1e-9:
                continue
            for order in (1, 2):
                orders = {t: order for t in range(n) if t not in set(comp)}
                out.append(_forecast_candidate(rmap, label_where, sites, orders, f"predict order {order}, {label}"))
    return out


def _neighbours(rmap: RedundancyMap, best: Candidate) -> list[Candidate]:
    """One-step changes of a forecast candidate: each forecast step's order flipped (1 <-> 2),
    each computed step but the first moved one step earlier or later."""
    where, sites, orders = best.recipe
    n = rmap.steps
    out = []
    for t in sorted(orders):
        flipped = dict(orders)
        flipped[t] = 3 - orders[t]
        out.append(_forecast_candidate(rmap, where, sites, flipped, f"refined, step {t} order {flipped[t]}"))
    computed = [t for t in range(n) if t not in orders]
    for c in computed[1:]:
        for d in (-1, 1):
            m = c + d
            if 0 < m < n and m in orders:
                moved = {t: o for t, o in orders.items() if t != m}
                moved[c] = orders[m]
                out.append(_forecast_candidate(rmap, where, sites, moved, f"refined, compute {m} not {c}"))
    return out


def _key(cand: Candidate) -> tuple:
    """What makes two forecast candidates the same plan: where, and each forecast step's order."""
    where, _, orders = cand.recipe
    return where, tuple(sorted(orders.items()))


def running(model: torch.nn.Module, plan: Plan, compiled: dict) -> torch.nn.Module:
    """``model`` optimised to run ``plan``, reusing ``compiled`` (a dict the caller keeps): one
    graph per set of sites the plans name, each later plan of that set given to it with
    :func:`ditopt.set_plan` instead of a new capture; a plan ``set_plan`` cannot take is compiled."""
    key = tuple(sorted({s for r in plan.rules for s in r.sites}))
    fast = compiled.get(key)
    if fast is not None:
        try:
            set_plan(fast, plan)
            return fast
        except PlanError:
            pass
    fast = compiled[key] = optimize(model, plan)
    return fast


def _psnr(out: Any, ref: Any) -> float:
    """PSNR (peak 1) of what the run returned under a plan against what it returned at full compute."""
    from .metrics import psnr

    try:
        return psnr(out, ref, data_range=1.0)
    except ValueError as exc:
        raise ProfileError(f"tune compares what the run returns under a plan with full compute: {exc}") from None


def _check_inputs(rmap: Any, budget: Any) -> None:
    """A map to tune from and a budget in (0, 1]."""
    if not isinstance(rmap, RedundancyMap):
        raise ProfileError(f"expected a RedundancyMap, got {type(rmap).__name__}")
    if budget is None:
        raise ProfileError("tune needs budget= (a fraction of full block compute in (0, 1])")
    check_budget(budget)


def _check_repeatable(first: Any, second: Any) -> None:
    """Two full-compute runs must agree: candidates ranked against a reference that moves (a run
    drawing its own noise) are ranked on that noise. (50 dB, peak 1, leaves room for a device's
    nondeterministic kernels; unseeded noise gives 10-20.)"""
    agreement = _psnr(second, first)
    if agreement < 50.0:
        raise ProfileError(f"run(model) gave other samples the second time at full compute ({agreement:.1f} dB apart): "
                           f"tune ranks plans against it, so it must repeat itself (seed its noise: a torch.Generator)")


def _check_same_blocks(rmap: RedundancyMap, fast) -> None:
    """The map's stack must be this model's: a map of a shallower model of the class plans only
    its blocks, and every candidate's compute would be counted on those alone."""
    blocks = compiled_graph(fast).sites.stack_blocks()
    if blocks != list(rmap.stack):
        raise ProfileError(f"the redundancy map's stack has {len(rmap.stack)} blocks, this {rmap.model} has "
                           f"{len(blocks)}: the map was profiled on another model of the class; profile this one")


def tune(model: torch.nn.Module, run: Callable[[Any], Any], rmap: RedundancyMap, *, budget: float,
         config: PlannerConfig | None = None, candidates: list[Candidate] | None = None, refine: bool = True,
         progress: bool = True) -> Tuned:
    """The plan that measures best within ``budget`` on the calibration run ``run``.

    ``run(transformer)`` is the same sampling call given to :func:`ditopt.profile` (it must
    return the samples as tensors); ``rmap`` the map that profile returned, which supplies the
    profiled schedule and the sites; ``config`` the planner's knobs for the profiled candidates
    (its budget is ``budget``). Each candidate (:func:`candidate_plans`, or ``candidates``)
    runs once; its PSNR against ``run(model)`` at full compute is measured with a peak of 1 (a
    relative figure, for ranking). With ``refine``, every one-step change of the best forecast
    candidate (a forecast's order flipped, a computed step moved by one) is measured too, then
    those of the best of them, up to :data:`REFINE_ROUNDS` rounds while one improves (a hill
    climb), and the best of all is returned. The model itself is not changed. Costs two full-compute
    runs (the second checks that ``run`` repeats itself), two graph captures and one run per candidate: at 20 steps and 25-35% of block compute
    on the zoo models, 180-230 runs in all (about 130 first, the rest climbing), 40-90 times
    the time of one generation (``docs/BENCHMARKS.md``).
    """
    _check_inputs(rmap, budget)
    if not callable(run):
        raise ProfileError(f"run must be a function of the transformer, got {type(run).__name__}")
    rmap.check_fits(model=type(model).__name__)
    cands = candidate_plans(rmap, budget, config) if candidates is None else list(candidates)
    if not cands:
        raise ProfileError(f"no candidate plan fits budget {budget}")
    over = [c.plan.name or f"#{i}" for i, c in enumerate(cands) if c.compute_fraction > budget + 1e-9]
    if over:
        raise ProfileError(f"{len(over)} of the candidates exceed budget {budget}: {'; '.join(over[:3])}")
    with torch.no_grad():
        reference = run(model)
        _check_repeatable(reference, run(model))
    compiled: dict[tuple, torch.nn.Module] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cands), desc="tune", unit="plan")

    def measure(cand: Candidate) -> float:
        fast = running(model, cand.plan, compiled)
        reset(fast)
        state = runtime_of(fast).state
        state.one_generation = True  # one run is one generation, whichever way its sampler counts
        try:
            with torch.no_grad():
                out = run(fast)
        finally:
            state.one_generation = False
        made = state.step + 1
        try:
            rmap.check_fits(steps=made)
        except ProfileError as exc:
            raise ProfileError(f"the run made {made} denoising steps, but {exc}") from None
        _check_same_blocks(rmap, fast)
        cand.psnr = _psnr(out, reference)
        if bar is not None:
            bar.update(1)
        return cand.psnr

    tried = []
    for cand in cands:
        measure(cand)
        tried.append(cand)
    forecasts = [c for c in tried if c.recipe is not None]
    seen = {_key(c) for c in forecasts}
    start = max(forecasts, key=lambda c: c.psnr) if refine and forecasts else None
    for _ in range(REFINE_ROUNDS if start is not None else 0):  # hill-climb from the best forecast
        best_before = start
        for cand in _neighbours(rmap, best_before):
            if cand.compute_fraction > budget + 1e-9 or _key(cand) in seen:
                continue
            seen.add(_key(cand))
            if bar is not None:
                bar.total += 1
            measure(cand)
            tried.append(cand)
            if cand.psnr > start.psnr:
                start = cand
        if start is best_before:
            break
    if bar is not None:
        bar.close()
    best = max(tried, key=lambda c: (c.psnr, -c.compute_fraction))
    return Tuned(best.plan, best, tried)


def tune_pipeline(pipe, rmap: RedundancyMap, *, budget: float, seed: int = 0, progress: bool = True,
                  refine: bool = True, **call_kwargs) -> Tuned:
    """:func:`tune` ``pipe.transformer`` over real calls of a diffusers pipeline:
    ``pipe(num_inference_steps=rmap.steps, generator=torch.Generator().manual_seed(seed),
    **call_kwargs)``, the same noise for every candidate. ``rmap`` is the map of
    :func:`ditopt.profile_pipeline` on that pipeline. The pipeline's transformer is restored.

    Example::

        >>> import torch, ditopt
        >>> from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
        >>> net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        ...     num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
        >>> vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=8).eval()
        >>> pipe = DiTPipeline(transformer=net, vae=vae, scheduler=DDIMScheduler())
        >>> pipe.set_progress_bar_config(disable=True)
        >>> call = dict(class_labels=[1, 2], output_type="np")
        >>> rmap = ditopt.profile_pipeline(pipe, steps=6, cfg="batched", progress=False, **call)
        >>> tuned = ditopt.tune_pipeline(pipe, rmap, budget=0.5, progress=False, **call)
        >>> tuned.plan.steps, pipe.transformer is net
        (6, True)
    """
    if "generator" in call_kwargs or "num_inference_steps" in call_kwargs:
        raise ProfileError("tune_pipeline sets generator (from seed=) and num_inference_steps (from the map)")
    _check_inputs(rmap, budget)
    check_count(seed, "seed", minimum=0, maximum=2**63 - 1, error=ProfileError)

    def run(transformer):
        return call_with(pipe, transformer, num_inference_steps=rmap.steps,
                         generator=torch.Generator().manual_seed(seed), **call_kwargs)

    return tune(pipe.transformer, run, rmap, budget=budget, progress=progress, refine=refine)
