"""Closed-loop tuning (ditopt.tune), plan swapping without recompiling (ditopt.set_plan) and the
``output`` site, on the trained dit-digits model."""

import math

import pytest
import torch

import ditopt
from ditopt import zoo
from ditopt.errors import DitoptError, PlanError
from ditopt.plan import Plan, Rule
from ditopt.profile import ProfileError
from ditopt.tune import candidate_plans, spread_schedules

STEPS = 6
LABELS = [1, 7]


@pytest.fixture(scope="module")
def dit():
    return zoo.load("dit-digits")


def run_of(dit, seed=100):
    return lambda tr: dit.sample(LABELS, seed=seed, steps=STEPS, transformer=tr)


@pytest.fixture(scope="module")
def rmap(dit):
    return ditopt.profile(dit.model, run_of(dit), steps=STEPS, progress=False, cfg="batched")


def output_plan(skipped, order=1):
    return Plan(steps=STEPS, rules=[Rule(sites=("output",), action="predict", steps=tuple(skipped), order=order)])


def test_output_site_holds_the_stack_and_what_follows(dit):
    x = torch.zeros(dit.sample_shape(1))
    table = ditopt.sites(dit.model, hidden_states=x, timestep=torch.tensor([500.0]), class_labels=torch.tensor([3]))
    out, stack = table["output"], table["stack"]
    assert out.kind == "output" and out.parent is None and stack.parent == "output"
    assert set(stack.nodes) < set(out.nodes) and len(out.live_outs) == 1


def test_forecasting_the_output_skips_every_block(dit):
    fast = ditopt.optimize(dit.model, output_plan([2, 4], order=1))
    ref = dit.sample(LABELS, seed=3, steps=STEPS)
    out = dit.sample(LABELS, seed=3, steps=STEPS, transformer=fast)
    decisions = ditopt.stats(fast).decisions
    assert decisions["output"] == ["compute", "compute", "predict", "compute", "predict", "compute"]
    assert decisions["transformer_blocks.3"][2] == "skipped" and decisions["transformer_blocks.3"][3] == "compute"
    mse = float(((out - ref) ** 2).mean())
    assert 0 < mse < 0.1  # a forecast (two of six steps): near full compute, not equal (unrelated samples: ~0.3)


def test_set_plan_equals_a_fresh_compile(dit):
    a, b = output_plan([2, 4], order=1), output_plan([3], order=2)
    fast = ditopt.optimize(dit.model, a)
    dit.sample(LABELS, seed=3, steps=STEPS, transformer=fast)
    graphs = ditopt.stats(fast).graphs
    ditopt.set_plan(fast, b)
    swapped = dit.sample(LABELS, seed=3, steps=STEPS, transformer=fast)
    assert ditopt.stats(fast).decisions["output"][3] == "predict"
    assert ditopt.stats(fast).graphs == graphs  # no recompile
    fresh = dit.sample(LABELS, seed=3, steps=STEPS, transformer=ditopt.optimize(dit.model, b))
    assert torch.equal(swapped, fresh)


def test_set_plan_refuses_another_shape_of_plan(dit):
    fast = ditopt.optimize(dit.model, output_plan([2, 4]))
    with pytest.raises(DitoptError, match="not been called"):
        ditopt.set_plan(fast, output_plan([3]))
    dit.sample(LABELS, seed=3, steps=STEPS, transformer=fast)
    before = ditopt.stats(fast).decisions["output"]
    with pytest.raises(PlanError, match="other sites"):
        ditopt.set_plan(fast, ditopt.presets.fora(interval=2, steps=STEPS))
    with pytest.raises(DitoptError, match="ditopt.optimize"):
        ditopt.set_plan(dit.model, output_plan([3]))
    dit.sample(LABELS, seed=3, steps=STEPS, transformer=fast)
    assert ditopt.stats(fast).decisions["output"] == before  # left as it was


def test_spread_schedules_fit_the_count():
    for steps, computed in ((20, 10), (20, 7), (6, 3)):
        scheds = spread_schedules(steps, computed)
        assert scheds and all(len(s) == computed and s[0] == 0 and s[-1] < steps for s in scheds)
        assert len(set(scheds)) == len(scheds)


def test_tune_keeps_the_best_measured_candidate(dit, rmap):
    tuned = ditopt.tune(dit.model, run_of(dit), rmap, budget=0.5, progress=False)
    labels = [c.label for c in tuned.candidates]
    assert any("output" in l for l in labels) and any("blocks" in l for l in labels)
    assert all(c.compute_fraction <= 0.5 and not math.isnan(c.psnr) for c in tuned.candidates)
    assert tuned.best.psnr == max(c.psnr for c in tuned.candidates)
    assert tuned.plan is tuned.best.plan and tuned.plan.model == "DiTTransformer2DModel"
    # the figure it reports is what the plan does on the calibration run
    fast = ditopt.optimize(dit.model, Plan.from_yaml(tuned.plan.to_yaml()))
    out, ref = run_of(dit)(fast), run_of(dit)(dit.model)
    assert 10 * math.log10(1 / float(((out - ref) ** 2).mean())) == pytest.approx(tuned.best.psnr, abs=1e-6)
    assert "| candidate |" in tuned.table()


def test_tune_bad_input(dit, rmap):
    with pytest.raises(ProfileError, match="budget"):
        candidate_plans(rmap, 1.5)
    with pytest.raises(ProfileError, match="tensors"):
        ditopt.tune(dit.model, lambda tr: (run_of(dit)(tr), None)[1], rmap, budget=0.5, progress=False)
    other = zoo.load("wan-digits")
    with pytest.raises(ProfileError):
        ditopt.tune(other.model, run_of(dit), rmap, budget=0.5, progress=False)
    longer = lambda tr: dit.sample(LABELS, seed=100, steps=STEPS + 2, transformer=tr)  # noqa: E731
    with pytest.raises(ProfileError, match=f"the run made {STEPS + 2} denoising steps, but the redundancy map "
                                           f"was profiled at {STEPS}"), \
            pytest.warns(RuntimeWarning, match=f"step {STEPS} is past the plan's {STEPS} steps"):
        ditopt.tune(dit.model, longer, rmap, budget=0.5, candidates=candidate_plans(rmap, 0.5)[:1], progress=False)


def test_tune_refuses_candidates_over_budget_and_a_map_of_a_shallower_model(dit, rmap):
    """Given candidates above the budget, tune returned one of them, within budget as far as its
    caller knew; and a map profiled on a shallower model of the class planned and counted only
    those blocks (the rest computed at every step): the tuned plan's compute was not what it said."""
    from diffusers import DiTTransformer2DModel

    over = candidate_plans(rmap, 0.8)
    over = [c for c in over if c.compute_fraction > 0.5][:2]
    with pytest.raises(ProfileError, match="2 of the candidates exceed budget 0.5"):
        ditopt.tune(dit.model, run_of(dit), rmap, budget=0.5, candidates=over, progress=False)
    deeper = DiTTransformer2DModel(**{**dit.model.config, "num_layers": 8}).eval()
    run = lambda tr: dit.sample(LABELS, seed=100, steps=STEPS, transformer=tr)  # noqa: E731
    with pytest.raises(ProfileError, match="stack has 6 blocks, this DiTTransformer2DModel has 8"), \
            pytest.warns(RuntimeWarning):
        ditopt.tune(deeper, run, rmap, budget=0.5,
                    candidates=candidate_plans(rmap, 0.5)[:1], progress=False)


def test_refinement_moves_keep_the_compute(rmap):
    from ditopt.tune import _forecast_candidate, _neighbours

    blocks = tuple(rmap.stack)
    start = _forecast_candidate(rmap, "blocks", blocks, {1: 1, 3: 2, 5: 1}, "start")
    moves = _neighbours(rmap, start)
    flips = [m for m in moves if "order" in m.label]
    shifts = [m for m in moves if "compute" in m.label]
    assert len(flips) == 3 and {tuple(sorted(m.recipe[2].items())) for m in flips} == {
        ((1, 2), (3, 2), (5, 1)), ((1, 1), (3, 1), (5, 1)), ((1, 1), (3, 2), (5, 2))}
    # computed steps 0, 2, 4: 2 may move to 1 or 3, 4 to 3 or 5; step 0 never moves
    assert len(shifts) == 4 and all(m.compute_fraction == start.compute_fraction for m in moves)
    assert {tuple(sorted(m.recipe[2])) for m in shifts} == {(2, 3, 5), (1, 2, 5), (1, 4, 5), (1, 3, 4)}


def test_refinement_climbs_to_a_candidate_no_move_improves(dit, rmap, monkeypatch):
    """From a poor start the hill climb keeps moving to the best one-step change until none is
    better; no plan is measured twice."""
    import sys

    from ditopt.tune import _forecast_candidate, _key, _neighbours

    monkeypatch.setattr(sys.modules["ditopt.tune"], "REFINE_ROUNDS", 100)  # climb until it stops by itself
    start = _forecast_candidate(rmap, "output", ("output",), {1: 2, 2: 2, 4: 2}, "start: 0, 3, 5 computed")
    tuned = ditopt.tune(dit.model, run_of(dit), rmap, budget=0.5, candidates=[start], progress=False)
    measured = {_key(c): c.psnr for c in tuned.candidates}
    assert len(measured) == len(tuned.candidates)
    assert tuned.best is not start and tuned.best.psnr > start.psnr
    around = [_key(c) for c in _neighbours(rmap, tuned.best)]
    assert around and all(k in measured and measured[k] <= tuned.best.psnr for k in around)
    assert all(c.compute_fraction <= 0.5 for c in tuned.candidates)


def test_the_output_forecast_at_some_steps_and_the_blocks_at_others(dit):
    """The output site nested over block sites that act at other steps: the output's decision was
    placed inside the first block's region (the output's first node is that block's) and the graph
    failed to build."""
    from ditopt.runtime.forecast import taylor_forecast

    blocks = tuple(f"transformer_blocks.{i}" for i in range(dit.model.config.num_layers))
    plan = Plan(steps=STEPS, rules=[Rule(sites=("output",), action="predict", order=1, steps=(2,)),
                                    Rule(sites=blocks, action="predict", order=1, steps=(4,))])
    fast = ditopt.optimize(dit.model, plan)
    calls = []

    def recording(**kwargs):
        out = fast(**kwargs)
        with torch.no_grad():
            plain = dit.model(**kwargs)
        calls.append((out[0], plain[0]))
        return out

    dit.sample(LABELS, seed=3, steps=STEPS, transformer=recording)
    decisions = ditopt.stats(fast).decisions
    assert decisions["output"][2] == "predict" and decisions[blocks[0]][4] == "predict"
    assert decisions[blocks[0]][2] == "skipped"  # inside the forecast output
    outs = [c[0] for c in calls]
    assert torch.allclose(outs[2], taylor_forecast([0, 1], outs[:2], 2), atol=1e-5)
    for step in (0, 1, 3, 5):  # computed steps are the model's own output on what the sampler gave
        assert torch.equal(calls[step][0], calls[step][1])
    assert not torch.allclose(calls[4][0], calls[4][1], atol=1e-4)  # the blocks forecast at step 4


def test_tune_refuses_a_run_that_does_not_repeat_itself(dit, rmap):
    """A run drawing its own noise moved the reference: plans were ranked on the noise, silently."""
    draws = iter(range(100))

    def unseeded(tr):
        return dit.sample(LABELS, seed=next(draws), steps=STEPS, transformer=tr)

    with pytest.raises(ProfileError, match="gave other samples the second time at full compute"):
        ditopt.tune(dit.model, unseeded, rmap, budget=0.5, progress=False)
