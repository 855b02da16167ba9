"""Resampling to another step count: of a plan (:func:`resample_plan`) and of a redundancy map
(:func:`resample_map`), the two ways the planner carries a schedule to a sampler with more or
fewer steps. ``Plan.resample`` and ``RedundancyMap.resample`` call these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ditopt.runtime.decisions import Action

from .errors import PlanError, check_steps

if TYPE_CHECKING:
    from .plan import Plan
    from .profile import RedundancyMap


def resample_plan(plan: "Plan", steps: int) -> "Plan":
    """The same plan for ``steps`` denoising steps instead of ``plan.steps``.

    The static rules that skip a site (reuse, forecast) are resampled together, as one
    schedule of computed and skipped steps per site, which keeps the schedule's shape
    in steps rather than stretching it:

    - the warm-up (the computed steps before the first skipped one) keeps its length;
    - after it, the new schedule is walked from computed step to computed step, and each
      run of skipped steps is as long as the run the old plan had at the same relative
      position of the schedule. "Compute, forecast" stays an alternation, and the longest
      run of consecutive skips (the plan's bound on consecutive reuse) is kept.
      Stretching runs by ``steps / plan.steps`` instead measured 1.5-1.9 dB worse on
      wan-digits and the same on dit-digits (20 to 30 steps, ``docs/BENCHMARKS.md``);
    - the number of skipped steps is then brought to within one step of the old share of
      the schedule, by breaking the longest run or lengthening the shortest, latest first;
    - each new skipped step takes the rule (action, order) of the nearest old skipped step.

    Other rules with steps (compute rules) are spread as a density along the schedule;
    ``when`` rules without steps apply to every step, as before.

    A plan made by the planner from a redundancy map is better re-planned from that map:
    ``plan_from_profile(rmap, budget=..., steps=M)`` lays the skipped steps out for M steps
    where this walk keeps their positions (measured 20 to 30 steps on wan-digits: 48.00 dB
    against 45.22 for this method; ``docs/BENCHMARKS.md``).

    Example:
        >>> from ditopt.plan import Plan, Rule
        >>> plan = Plan(steps=4, rules=[Rule(sites=("*",), kind="block", steps=(1, 3), action="reuse_residual")])
        >>> resample_plan(plan, 8).rules[0].steps
        (1, 3, 5, 7)
        >>> Plan(steps=10, rules=[Rule(sites=("b",), steps=(3, 4, 6, 7, 9), action="predict")]).resample(15).rules[0].steps
        (3, 4, 6, 7, 9, 10, 12, 13)
    """
    from .plan import Plan, Rule

    if not isinstance(plan, Plan):
        raise PlanError(f"resample_plan needs a Plan, got {type(plan).__name__}")
    check_steps(steps, "the step count to resample to", error=PlanError)
    plan.check()
    assigned = _resample_skip_schedules(plan, steps)
    rules = []
    for index, rule in enumerate(plan.rules):
        if rule.steps is None:
            rules.append(rule)
            continue
        if index in assigned:
            new_steps = assigned[index]
        else:
            new_steps = _spread(set(rule.step_list(plan.steps)), plan.steps, steps)
            if rule.action != Action.COMPUTE and rule.when is None:
                new_steps = tuple(s for s in new_steps if s > 0)
        if new_steps:
            rules.append(Rule(sites=rule.sites, action=rule.action, steps=new_steps, kind=rule.kind,
                              when=rule.when, order=rule.order, attention=rule.attention, method=rule.method,
                              window=rule.window, cfg=rule.cfg, ratio=rule.ratio))
    new = Plan(steps=steps, rules=rules, version=plan.version, model=plan.model,
               name=f"{plan.name or 'plan'}@{steps}")
    new.check()
    return new


def _spread(covered: set[int], old: int, steps: int) -> tuple[int, ...]:
    """A rule's steps spread as a density along the new schedule (compute rules)."""
    scale = old / steps
    chosen, carry = [], 0.0
    for i in range(steps):
        centre = (i + 0.5) * scale  # the rule's local density: its share of 2 old steps around
        lo, hi = centre - 1.0, centre + 1.0
        share = sum(max(0.0, min(hi, s + 1) - max(lo, s)) for s in covered if s + 1 > lo and s < hi) / 2.0
        carry += share
        if carry >= 0.5:
            chosen.append(i)
            carry -= 1.0
    return tuple(chosen)


def _resample_skip_schedules(plan: "Plan", steps: int) -> dict[int, tuple[int, ...]]:
    """New steps of each static non-compute rule, by rule index.

    Such rules on the same sites are resampled together, as one schedule (so two rules that
    share it, e.g. forecasts of order 1 and 2, neither collide nor leave gaps), each new skipped
    step then taking the rule of the nearest old step."""
    old, scale = plan.steps, plan.steps / steps
    groups: dict[tuple, list[int]] = {}
    for index, rule in enumerate(plan.rules):
        if rule.action != Action.COMPUTE and rule.when is None and rule.steps is not None:
            groups.setdefault((rule.sites, rule.kind, rule.attention), []).append(index)
    assigned: dict[int, tuple[int, ...]] = {}
    for members in groups.values():
        owner: dict[int, int] = {}
        for index in members:  # a later rule overrides an earlier one on the same step
            for st in plan.rules[index].step_list(old):
                owner[st] = index
        picked: dict[int, list[int]] = {index: [] for index in members}
        for i in walk_schedule(set(owner), old, steps):
            position = (i + 0.5) * scale - 0.5
            nearest = min(owner, key=lambda st: (abs(st - position), -st))
            picked[owner[nearest]].append(i)
        assigned.update({index: tuple(v) for index, v in picked.items()})
    return assigned


def walk_schedule(skipped: set[int], old: int, steps: int) -> list[int]:
    """The skipped steps of a schedule of ``old`` steps resampled to ``steps`` (see
    :func:`resample_plan`): the warm-up kept, the runs of skips kept in length along the
    schedule, the share of skipped steps kept.

    Example:
        >>> walk_schedule({1, 3, 5, 7, 9}, 10, 15)
        [1, 3, 5, 7, 9, 11, 13]
        >>> walk_schedule({3, 5, 7, 9, 11, 13, 14, 16, 18, 19}, 20, 30)
        [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 22, 24, 26, 28, 29]
    """
    skipped = {s for s in skipped if 0 < s < old}
    if not skipped or steps < 2:
        return []
    computed = [s for s in range(old) if s not in skipped]
    warmup = min(skipped)  # steps 0 .. warmup-1 compute
    run_after = {a: b - a - 1 for a, b in zip(computed, computed[1:] + [old])}
    anchors = [c for c in computed if c >= warmup - 1]
    new_computed = list(range(min(warmup, steps - 1)))
    p = len(new_computed) - 1
    while True:
        q = p * (old - 1) / (steps - 1)
        anchor = max((c for c in anchors if c <= q + 1e-9), default=anchors[0])
        p += run_after[anchor] + 1
        if p > steps - 1:
            break
        new_computed.append(p)
    done = set(new_computed)
    out = [i for i in range(steps) if i not in done]
    exact = len(skipped) * steps / old  # the old share of skipped steps, kept to within one step
    most, least = min(steps - 1, math.ceil(exact - 1e-9)), max(1, math.floor(exact + 1e-9))

    def runs() -> list[tuple[int, int]]:  # (start, length) of each run of skips
        found, start = [], None
        for i in range(1, steps + 1):
            if i < steps and i not in done:
                start = i if start is None else start
            elif start is not None:
                found.append((start, i - start))
                start = None
        return found

    while len(out) > most:  # break the longest run (latest first) in its middle
        start, length = max(runs(), key=lambda r: (r[1], r[0]))
        done.add(start + length // 2)
        out = [i for i in range(steps) if i not in done]
    while len(out) < least:  # skip a computed step after the warm-up, where the run it makes is shortest
        def made(c: int) -> int:
            lo, hi = c - 1, c + 1
            while lo > 0 and lo not in done:
                lo -= 1
            while hi < steps and hi not in done:
                hi += 1
            return hi - lo - 1
        free = [c for c in done if c >= max(1, warmup)]
        if not free:
            break
        done.discard(min(free, key=lambda c: (made(c), -c)))
        out = [i for i in range(steps) if i not in done]
    return out


def resample_map(rmap: "RedundancyMap", steps: int) -> "RedundancyMap":
    """The map as if profiled at ``steps`` steps (see :meth:`RedundancyMap.resample`)."""
    from .profile import ProfileError

    check_steps(steps, "the step count to resample a map to", minimum=2, error=ProfileError)
    n = rmap.steps
    if not isinstance(n, int) or n < 2:
        raise ProfileError(f"a map of {n!r} step(s) has no schedule to resample; profile at least 2 steps")
    pos = torch.linspace(0, n - 1, steps, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.double())

    def interp(x: torch.Tensor) -> torch.Tensor:  # cubic (Catmull-Rom) along dim 0
        shape = (-1,) + (1,) * (x.dim() - 1)
        f = frac.reshape(shape).to(x.dtype)
        p0, p1 = x[(lo - 1).clamp(min=0)], x[lo]
        p2, p3 = x[hi], x[(hi + 1).clamp(max=n - 1)]
        # a linear blend would make order-1 forecasts inside an old step exact, and the
        # planner would crowd its skipped steps there
        return p1 + 0.5 * f * (p2 - p0 + f * (2 * p0 - 5 * p1 + 4 * p2 - p3 + f * (3 * (p1 - p2) + p3 - p0)))

    ratio = (n - 1) / (steps - 1)
    metrics = {}
    for name, t in rmap.metrics.items():
        v = interp(torch.nan_to_num(t, nan=0.0))
        if name.startswith("rel_l1") and name != "cfg_diff":
            v = v / ratio
            v[0] = math.nan
        metrics[name] = v
    timesteps = interp(torch.tensor(rmap.timesteps, dtype=torch.float64)).tolist()
    return type(rmap)(model=rmap.model, signature=rmap.signature, steps=steps, branches=rmap.branches,
                         sites=list(rmap.sites), kinds=list(rmap.kinds), parents=dict(rmap.parents),
                         residual_form=dict(rmap.residual_form), flops=dict(rmap.flops),
                         seconds=dict(rmap.seconds), timesteps=timesteps, metrics=metrics,
                         samples={k: interp(v) for k, v in rmap.samples.items()}, stack=list(rmap.stack),
                         profile_seconds=rmap.profile_seconds)
