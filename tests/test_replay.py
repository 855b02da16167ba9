"""The planner's replay: every forecaster and order scored exactly as the runtime computes it, the
dynamic program's constraints, and plans with order-2 / other forecasters that run."""

from __future__ import annotations

import pytest
import torch

import ditopt
from ditopt import zoo
from ditopt.planner import PlannerConfig, schedule_from_profile
from ditopt.replay import Forecast, GroupReplay, SiteReplay, forecasts, solve
from ditopt.runtime.forecast import forecast_by

STEPS = 8


def _site(y, orders=(0, 1, 2), methods=("taylor",), gap=3, **kw):
    n = y.shape[0]
    return SiteReplay(y, torch.full((n,), 1.0 / n, dtype=torch.float64), forecasts(orders, methods), max_gap=gap, **kw)


def test_each_order_is_chosen_where_it_is_exact():
    t = torch.arange(8.0).reshape(8, 1, 1)
    assert _site(torch.ones(8, 1, 3)).miss(5, (2, 3, 4))[1] == Forecast("reuse")
    line = _site(2 * t + 1).miss(6, (3, 5))
    assert line[1] == Forecast("predict", "taylor", 1) and float(line[0].abs().max()) == 0.0
    para = _site(t ** 2 - t).miss(7, (1, 3, 4))
    assert para[1] == Forecast("predict", "taylor", 2) and float(para[0].abs().max()) < 1e-12


def test_the_replayed_miss_is_the_runtime_forecast():
    y = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(0)).cumsum(0)
    site = _site(y, orders=(2,), methods=("foca",))
    d, cand = site.miss(6, (2, 4, 5))
    want = y[6].double() - forecast_by("foca", [2, 4, 5], [y[2].double(), y[4].double(), y[5].double()], 6)
    assert cand == Forecast("predict", "foca", 2) and torch.allclose(d, want)
    # two points known: an order-2 forecast reads two (the runtime's early steps), i.e. a line
    d2, _ = site.miss(6, (3, 5))
    assert torch.allclose(d2, y[6].double() - (y[5].double() + (y[5].double() - y[3].double()) / 2))


def test_solve_respects_the_longest_gap_and_the_first_step():
    y = torch.randn(12, 1, 8, generator=torch.Generator().manual_seed(1)).cumsum(0)
    for gap in (1, 2, 3):
        row, _, computed = solve(_site(y, gap=gap), lam=1e12, cost=1.0, reuse="reuse")
        assert row[0] == "compute"
        runs, run = [], 0
        for a in row:
            run = 0 if a == "compute" else run + 1
            runs.append(run)
        assert max(runs) <= gap and computed == sum(a == "compute" for a in row)
    row, error, computed = solve(_site(y), lam=0.0, cost=1.0, reuse="reuse")
    assert computed == 12 and error == 0.0


def test_a_group_sums_what_its_members_miss():
    t = torch.arange(6.0).reshape(6, 1, 1)
    a, b = _site(t.clone()), _site(-t.clone())
    group = GroupReplay({"a": a, "b": b})
    e, choice = group.err(4, (2, 3))
    assert e == 0.0 and choice == {"a": Forecast("predict", "taylor", 1), "b": Forecast("predict", "taylor", 1)}
    # both reuse (orders=(0,)): the misses cancel in the sum
    ga = GroupReplay({"a": _site(t.clone(), orders=(0,)), "b": _site(-t.clone(), orders=(0,))})
    assert ga.err(4, (2, 3))[0] == 0.0
    gu = GroupReplay({"a": _site(t.clone(), orders=(0,)), "b": _site(-t[:, :, :1].repeat(1, 1, 2), orders=(0,))})
    assert gu.err(4, (2, 3))[0] > 0.0


@pytest.fixture(scope="module")
def dit():
    return zoo.load("dit-digits")


@pytest.fixture(scope="module")
def rmap(dit):
    return ditopt.profile(dit.model, lambda tr: dit.sample(list(range(10)), seed=100, steps=STEPS, transformer=tr),
                          steps=STEPS, progress=False, cfg="batched")


def test_more_stand_ins_never_raise_the_predicted_error(rmap):
    base = schedule_from_profile(rmap, budget=0.5)
    wide = schedule_from_profile(rmap, config=PlannerConfig(budget=0.5, orders=(0, 1, 2),
                                                            methods=("taylor", "hermite", "foca")))
    assert wide.compute_fraction <= 0.5 + 1e-9
    assert wide.predicted_error <= base.predicted_error * (1 + 1e-9)


def test_a_plan_with_order_two_forecasts_runs_as_planned(rmap, dit):
    plan = ditopt.plan_from_profile(rmap, budget=0.4, orders=(2,), methods=("hermite",))
    again = ditopt.Plan.from_yaml(plan.to_yaml())
    assert again == plan and any(r.action == "predict" for r in plan.rules)
    assert {r.order for r in plan.rules if r.action == "predict"} <= {2}
    assert {r.method for r in plan.rules if r.action == "predict" and r.order == 2} == {"hermite"}
    fast = ditopt.optimize(dit.model, again)
    dit.sample(list(range(4)), seed=1, steps=STEPS, transformer=fast)
    decisions = ditopt.stats(fast).decisions
    executed = sum(a == "compute" for b in rmap.stack for a in decisions[b])
    assert executed / (len(rmap.stack) * STEPS) <= 0.4 + 1e-9
    assert sum(a == "predict" for b in rmap.stack for a in decisions[b]) > 0
