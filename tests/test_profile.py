"""Profiling (observer pass, redundancy map) and the planner, on the trained zoo models."""

import math

import pytest
import torch

import ditopt
from ditopt import zoo
from ditopt.errors import PlanError
from ditopt.planner import schedule_from_profile, smoothcache
from ditopt.profile import ProfileError, RedundancyMap

STEPS = 8


@pytest.fixture(scope="module")
def dit():
    return zoo.load("dit-digits")


@pytest.fixture(scope="module")
def rmap(dit):
    labels = list(range(10))
    return ditopt.profile(dit.model, lambda tr: dit.sample(labels, seed=100, steps=STEPS, transformer=tr),
                          steps=STEPS, progress=False, cfg="batched")


def test_map_measures_every_site_and_step(rmap, dit):
    assert rmap.model == "DiTTransformer2DModel" and rmap.steps == STEPS and rmap.branches == 1
    assert rmap.stack == [f"transformer_blocks.{i}" for i in range(6)]
    change = rmap.metric("rel_l1_residual")
    assert change.shape == (STEPS, len(rmap.sites), 1)
    assert torch.isnan(change[0]).all() and not torch.isnan(change[1:]).any()
    assert ((change[1:] > 0) & (change[1:] < 2)).all()
    # the observed residual of a block really is out - in: replay one step eagerly
    assert rmap.residual_form["transformer_blocks.0"]
    assert rmap.flops["transformer_blocks.0"] > rmap.flops["transformer_blocks.0.attn1"] > 0
    assert rmap.timesteps[0] == pytest.approx(1000.0) and rmap.timesteps[-1] < rmap.timesteps[0]
    cfg = rmap.metric("cfg_diff")[:, rmap.index("transformer_blocks.5"), 0]  # [cond, uncond] halves
    assert ((cfg > 0) & (cfg < 2)).all()


def test_observing_changes_nothing(dit):
    labels = [3, 4]
    want = dit.sample(labels, seed=5, steps=4)
    got = {}

    def run(tr):
        got["x"] = dit.sample(labels, seed=5, steps=4, transformer=tr)

    ditopt.profile(dit.model, run, steps=4, progress=False)
    assert torch.equal(got["x"], want)


def test_save_load_and_heatmap(rmap, tmp_path):
    path = rmap.save(tmp_path / "dit-map.yaml")
    assert path.with_suffix(".safetensors").is_file()
    back = RedundancyMap.load(path)
    assert back.sites == rmap.sites and back.signature == rmap.signature
    assert torch.equal(back.samples["transformer_blocks.2"], rmap.samples["transformer_blocks.2"])
    assert torch.allclose(back.metric("cos"), rmap.metric("cos"), equal_nan=True)
    png = rmap.heatmap(tmp_path / "heat.png")
    assert png.stat().st_size > 2000


def test_two_branch_model_records_cfg_difference():
    wan = zoo.load("wan-digits")
    rmap = ditopt.profile(wan.model, lambda tr: wan.sample([1], seed=0, steps=3, transformer=tr), steps=3,
                          progress=False)
    assert rmap.branches == 2
    cfg = rmap.metric("cfg_diff")[:, rmap.index("blocks.0"), 0]
    assert (cfg > 0).all()


def test_planner_meets_the_budget_and_keeps_first_and_last_when_asked(rmap):
    for budget in (0.75, 0.5):
        sch = schedule_from_profile(rmap, budget=budget, compute_last=True)
        assert sch.compute_fraction <= budget + 1e-9
        for row in sch.actions.values():
            assert row[0] == "compute" and row[-1] == "compute"
            runs = "".join("c" if a == "compute" else "s" for a in row)
            assert "ssss" not in runs  # max_consecutive=3
    loose = schedule_from_profile(rmap, budget=0.75)
    tight = schedule_from_profile(rmap, budget=0.5)
    assert tight.predicted_error >= loose.predicted_error


def test_planned_plan_runs_with_the_planned_compute(rmap, dit):
    plan = ditopt.plan_from_profile(rmap, budget=0.5)
    text = plan.to_yaml()
    assert "predict" in text or "reuse_residual" in text
    again = ditopt.Plan.from_yaml(text)
    fast = ditopt.optimize(dit.model, again)
    dit.sample(list(range(4)), seed=1, steps=STEPS, transformer=fast)
    decisions = ditopt.stats(fast).decisions
    executed = sum(a == "compute" for b in rmap.stack for a in decisions[b])
    assert executed / (len(rmap.stack) * STEPS) <= 0.5


def test_max_error_mode(rmap):
    exact = schedule_from_profile(rmap, max_error=0.0)
    assert exact.compute_fraction == 1.0
    loose = schedule_from_profile(rmap, max_error=10.0)
    assert loose.compute_fraction < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=0.0), "budget must be a fraction"),
    (dict(budget=1.5), "budget must be a fraction"),
    (dict(), "exactly one of"),
    (dict(budget=0.5, steps=1), r"steps must be an integer in \[2, 10000\]"),
    (dict(budget=0.5, warmup=0), "warmup"),
    (dict(budget=0.5, warmup=STEPS), "warmup"),  # no step left to skip
    (dict(budget=0.5, warmup=STEPS - 1, compute_last=True), "warmup"),
    (dict(budget=0.5, warmup=2, max_consecutive=0), "warmup"),
    (dict(budget=0.1, warmup=2), r"steps 0-1 computed \(warm-up\)"),
    (dict(budget=0.5, sites=["nope.3"]), "nope.3"),
])
def test_bad_planner_input(rmap, kwargs, message):
    with pytest.raises((ProfileError, KeyError), match=message):
        ditopt.plan_from_profile(rmap, **kwargs)


def _first_skipped(plan):
    return min(s for r in plan.rules if r.action != "compute" for s in r.step_list(plan.steps))


def test_warmup_is_the_first_step_not_computed(rmap):
    for w in (1, 2, 3):
        plan = ditopt.plan_from_profile(rmap, budget=0.5, warmup=w)
        assert _first_skipped(plan) == w


def test_planning_for_another_step_count_keeps_the_warmup(rmap):
    here = ditopt.plan_from_profile(rmap, budget=0.5)
    more = ditopt.plan_from_profile(rmap, budget=0.5, steps=2 * STEPS)
    assert more.steps == 2 * STEPS and more.model == here.model
    assert _first_skipped(more) == _first_skipped(here)
    computed = [s for s in range(more.steps) if not any(s in r.step_list(more.steps) for r in more.rules
                                                         if r.action != "compute")]
    assert len(computed) / more.steps <= 0.5
    assert ditopt.plan_from_profile(rmap, budget=0.5, steps=STEPS).to_dict() == here.to_dict()


def test_a_map_from_another_model_is_refused(rmap):
    with pytest.raises(ProfileError, match="profiled on DiTTransformer2DModel, not WanTransformer3DModel"):
        rmap.check_fits(model="WanTransformer3DModel")
    wan = zoo.load("wan-digits")
    with pytest.raises(PlanError, match="plan was made for DiTTransformer2DModel, not WanTransformer3DModel"):
        ditopt.optimize(wan.model, ditopt.plan_from_profile(rmap, budget=0.5))


def test_a_plan_made_on_a_smaller_model_of_the_class_is_said_to_plan_only_its_blocks(rmap, dit):
    """A profiled plan names its blocks one by one: on a deeper model of the same class it planned
    the first blocks only, and the rest computed at every step, silently. Now it is said."""
    import warnings

    from diffusers import DiTTransformer2DModel

    plan = ditopt.plan_from_profile(rmap, budget=0.5)
    deeper = DiTTransformer2DModel(**{**dit.model.config, "num_layers": 8}).eval()
    x = dict(hidden_states=torch.randn(2, 1, 16, 16), timestep=torch.tensor([999, 999]),
             class_labels=torch.tensor([1, 10]))
    with pytest.warns(RuntimeWarning, match=r"names transformer_blocks\.0-5 of this model's 8 transformer_blocks"):
        with torch.no_grad():
            ditopt.optimize(deeper, plan)(**x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the model it was made for: nothing to say
        with torch.no_grad():
            ditopt.optimize(dit.model, plan)(**x)


def test_smoothcache_thresholds_the_map(rmap):
    none = smoothcache(rmap, 1e-6)
    assert all(r.action == "compute" for r in none.rules)
    some = smoothcache(rmap, 0.3)
    compiled_steps = {s for r in some.rules if r.action != "compute" for s in r.steps}
    assert compiled_steps and 0 not in compiled_steps and STEPS - 1 not in compiled_steps
    with pytest.raises(ProfileError, match="alpha"):
        smoothcache(rmap, 0)


def test_resample_keeps_shape():
    plan = ditopt.Plan(steps=20, rules=[ditopt.Rule(sites=("*",), kind="block", action="predict",
                                                     steps=tuple(range(1, 20, 2)))])
    p30 = plan.resample(30)
    steps = p30.rules[0].steps
    assert p30.steps == 30 and 0 not in steps and math.isclose(len(steps) / 30, 0.5, abs_tol=0.1)
    with pytest.raises(PlanError, match=r"step count to resample to must be an integer in \[1, 10000\]"):
        plan.resample(0)


def test_resample_keeps_warmup_and_runs_of_skips_in_steps():
    """A plan is a warm-up, then runs of skipped steps between computed ones: resampling keeps
    both lengths (in steps) and the share of skipped steps, instead of stretching runs."""
    skipped = (3, 5, 7, 9, 11, 13, 14, 16, 18, 19)  # warm-up 0-2, alternation, two runs of two
    plan = ditopt.Plan(steps=20, rules=[ditopt.Rule(sites=("*",), kind="block", action="predict", steps=skipped)])
    for steps in (30, 40, 13):
        new = plan.resample(steps).rules[0].steps
        assert min(new) == 3  # the warm-up keeps its three computed steps
        runs, run = [], 0
        for i in range(steps):
            run = run + 1 if i in new else 0
            runs.append(run)
        assert max(runs) == 2  # no run longer than the old plan's longest
        assert abs(len(new) - len(skipped) * steps / 20) <= 1
    # a regular alternation stays one at any step count
    alternation = ditopt.Plan(steps=20, rules=[ditopt.Rule(sites=("b",), action="predict", steps=tuple(range(1, 20, 2)))])
    assert alternation.resample(30).rules[0].steps == tuple(range(1, 30, 2))
    assert alternation.resample(12).rules[0].steps == tuple(range(1, 12, 2))


def test_resample_treats_rules_on_the_same_sites_as_one_schedule():
    """Forecasts of two orders sharing one schedule (what tune's refinement writes) keep the
    schedule's density when resampled: no step claimed twice, none dropped."""
    skipped = (2, 4, 6, 8, 10, 12, 13, 15, 17, 19)
    plan = ditopt.Plan(steps=20, rules=[
        ditopt.Rule(sites=("output",), action="predict", steps=(13,), order=1),
        ditopt.Rule(sites=("output",), action="predict", steps=tuple(s for s in skipped if s != 13), order=2)])
    first, second = plan.resample(30).rules
    assert not set(first.steps) & set(second.steps)
    assert len(first.steps) + len(second.steps) == 15 and 0 not in second.steps
    assert first.order == 1 and all(18 <= s <= 21 for s in first.steps)  # around old step 13 (x1.5)
    # rules on other sites keep their own schedules
    other = ditopt.Plan(steps=4, rules=[ditopt.Rule(sites=("a",), action="reuse", steps=(1, 3)),
                                        ditopt.Rule(sites=("b",), action="reuse", steps=(2,))]).resample(8)
    alone = ditopt.Plan(steps=4, rules=[ditopt.Rule(sites=("b",), action="reuse", steps=(2,))]).resample(8)
    assert other.rules[0].steps == (1, 3, 5, 7) and other.rules[1].steps == alone.rules[0].steps


def test_map_resample_interpolates_and_plans_at_the_new_count(rmap):
    r12 = rmap.resample(12)
    assert r12.steps == 12 and r12.samples[rmap.stack[0]].shape[0] == 12
    assert torch.equal(r12.samples[rmap.stack[0]][0], rmap.samples[rmap.stack[0]][0])
    assert torch.equal(r12.samples[rmap.stack[0]][-1], rmap.samples[rmap.stack[0]][-1])
    assert r12.timesteps[0] == pytest.approx(rmap.timesteps[0]) and r12.timesteps[-1] == pytest.approx(rmap.timesteps[-1])
    plan = ditopt.plan_from_profile(r12, budget=0.5)
    assert plan.steps == 12
    with pytest.raises(ProfileError, match=r"step count to resample a map to must be an integer in \[2, 10000\], got 1"):
        rmap.resample(1)


def _toy_loop(model, kw, steps):
    def run(tr):
        x = kw["hidden_states"].clone()
        for t in torch.linspace(999, 100, steps):
            args = dict(kw, hidden_states=x, timestep=torch.full((x.shape[0],), float(t)).to(kw["timestep"].dtype))
            out = tr(**args, return_dict=False)[0]
            x = x + 0.01 * out[:, : x.shape[1]]
        return x
    return run


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan"])
def test_profile_and_plan_on_other_classes(name):
    """Dual-stream blocks (CogVideoX) and blocks outside the stack (HunyuanVideo's refiner)."""
    from ditopt.small_models import build

    model, kw = build(name)
    run = _toy_loop(model, kw, 5)
    with torch.no_grad():
        ref = run(model)
    rmap = ditopt.profile(model, run, steps=5, progress=False)
    assert rmap.stack and all(s in rmap.sites for s in rmap.stack)
    fast = ditopt.optimize(model, ditopt.plan_from_profile(rmap, budget=0.6))
    with torch.no_grad():
        got = run(fast)
    decisions = ditopt.stats(fast).decisions
    executed = sum(a == "compute" for s in rmap.stack for a in decisions[s]) / (5 * len(rmap.stack))
    assert executed <= 0.6 and torch.allclose(got, ref, atol=0.05)


def test_first_block_cache_leaves_blocks_outside_the_stack_alone():
    from ditopt.small_models import build

    model, kw = build("hunyuan")
    fast = ditopt.optimize(model, ditopt.presets.first_block_cache(10.0, steps=4))
    with torch.no_grad():
        _toy_loop(model, kw, 4)(fast)
    d = ditopt.stats(fast).decisions
    assert set(d["context_embedder.token_refiner.refiner_blocks.0"]) == {"compute"}
    assert d["transformer_blocks.0"] == ["compute"] * 4
    assert "reuse_residual" in d["transformer_blocks.1"]


def test_a_timestep_given_by_position_is_recorded_as_by_keyword():
    """The map's timesteps were read from the keyword alone: given by position, all NaN, and the
    planner then weighed every step alike (another plan than the same run by keyword)."""
    from ditopt.small_models import MODELS, timesteps

    model, kwargs = MODELS["dit"]()
    ts = timesteps(4, kwargs["timestep"])

    def run(tr, positional):
        for t in ts:
            if positional:
                tr(kwargs["hidden_states"], t, kwargs["class_labels"])
            else:
                tr(**{**kwargs, "timestep": t})

    maps = [ditopt.profile(model, lambda tr, p=p: run(tr, p), steps=4, progress=False) for p in (False, True)]
    assert maps[0].timesteps == maps[1].timesteps == [float(t.max()) for t in ts]


def test_the_budget_is_a_share_of_every_blocks_compute_refiner_included():
    """HunyuanVideo's text refiner has blocks outside the stack, which no plan skips: the planner
    and tune counted the budget over the stack alone, so a plan for 0.75 ran 0.76 of the blocks'
    compute (as ditopt.cost_model measures it) and said 0.75. They now count every block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0,
                                           patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                           rope_axes_dim=(4, 6, 6)).eval()
    kw = dict(encoder_hidden_states=torch.randn(1, 6, 32), encoder_attention_mask=torch.ones(1, 6),
              pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3000.0]))
    x0 = torch.randn(1, 4, 3, 8, 8)

    def run(tr, steps=8):
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(steps)
        x = x0.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                out = tr(hidden_states=x, timestep=t.reshape(1), **kw, return_dict=False)[0]
                x = sched.step(out, t, x, return_dict=False)[0]
        return x

    rmap = ditopt.profile(model, run, steps=8, progress=False)
    assert len(rmap.stack) == 4 and "context_embedder.token_refiner.refiner_blocks.0" in rmap.sites
    cost = ditopt.cost_model(model, hidden_states=x0, timestep=torch.tensor([1000.0]), **kw)
    for budget in (0.75, 0.5):
        assert cost.predict(ditopt.plan_from_profile(rmap, budget=budget)).compute_fraction <= budget + 1e-6
    tuned = ditopt.tune(model, run, rmap, budget=0.5, progress=False, refine=False)
    assert tuned.best.compute_fraction == pytest.approx(cost.predict(tuned.plan).compute_fraction, abs=1e-3)
    assert tuned.best.compute_fraction <= 0.5 + 1e-6
