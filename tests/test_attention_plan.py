"""Attention actions from a redundancy map (issue 15 item 6): the attention samples of
``ditopt.profile(..., attention_window=W)``, their save/load, DiTFastAttn's greedy calibration
(``presets.ditfastattn(threshold=, rmap=)``) and the budget planner (``ditopt.attention_plan``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import ditopt
from ditopt import ProfileError, zoo
from ditopt.attention_plan import (AttentionReplay, attention_for_schedule, greedy_calibration, plan_attention,
                                   schedule_attention, synthetic_map)
from ditopt.runtime.cfg_sharing import CfgLayout
from ditopt.small_models import build, timesteps

STEPS = 6


def drifting(steps=STEPS, lanes=2, keep=32, seed=0):
    """Outputs and window residuals that drift at random from step to step."""
    g = torch.Generator().manual_seed(seed)
    walk = lambda: torch.randn(1, lanes, keep, generator=g) + 0.3 * torch.randn(steps, lanes, keep, generator=g).cumsum(0)
    return walk(), walk()


# -- the greedy calibration ------------------------------------------------------------------------

def test_greedy_is_deterministic_and_threshold_zero_computes_everything():
    rmap = synthetic_map(STEPS, *drifting())
    first, again = greedy_calibration(rmap, 0.5), greedy_calibration(rmap, 0.5)
    assert first.actions == again.actions and first.compute_fraction == again.compute_fraction
    # a step's reuse error here is ~0.22-0.30 after a compute and grows with the cache's age
    assert first.actions["b0.attn1"] == ["compute", "reuse", "reuse", "reuse", "compute", "reuse"]
    none = greedy_calibration(rmap, 0.0)
    assert none.actions["b0.attn1"] == ["compute"] * STEPS and none.compute_fraction == 1.0
    assert [r.action for r in none.to_plan("Synthetic", "x").rules] == ["compute"]


def test_huge_threshold_takes_the_most_compressive_action_after_the_warmup():
    rmap = synthetic_map(STEPS, *drifting())
    replay = AttentionReplay(rmap)
    # most FLOPs saved first: the site costs 2A (A: its SDPA call), reuse saves 2A, share_cfg A, window 3A/4
    assert list(replay.saving["b0.attn1"]) == ["reuse", "share_cfg", "window"]
    for warmup in (1, 3):
        sch = greedy_calibration(rmap, 1e9, warmup=warmup)
        assert sch.actions["b0.attn1"] == ["compute"] * warmup + ["reuse"] * (STEPS - warmup)
    # without the window's samples and CFG lanes, reuse is the only candidate; with a window as
    # long as the sequence, window saves nothing and is not offered
    assert list(AttentionReplay(synthetic_map(STEPS, drifting(lanes=1)[0])).saving["b0.attn1"]) == ["reuse"]
    assert "window" not in AttentionReplay(synthetic_map(STEPS, *drifting(), window=64)).saving["b0.attn1"]


def test_greedy_keeps_one_kind_per_site_and_respects_the_warmup():
    out, res = drifting()
    res[:] = res[0]  # the window residual never changes: window is free; reuse is not
    sch = greedy_calibration(synthetic_map(STEPS, out, res), 1e-3, warmup=2)
    assert sch.actions["b0.attn1"] == ["compute"] * 2 + ["window"] * (STEPS - 2)


def test_ditfastattn_preset_calibrates_from_a_map():
    rmap = synthetic_map(STEPS, *drifting())
    plan = ditopt.presets.ditfastattn(STEPS, threshold=1e9, rmap=rmap, warmup=2)
    assert [(r.sites, r.action, r.step_list(STEPS)) for r in plan.rules] == [(("b0.attn1",), "reuse", [2, 3, 4, 5])]
    assert ditopt.presets.ditfastattn(STEPS, window=8, warmup=2).rules[0].window == 8  # the static form
    with pytest.raises(ProfileError, match="needs both threshold= and rmap="):
        ditopt.presets.ditfastattn(STEPS, threshold=0.1)
    with pytest.raises(ProfileError, match="attention_window=8"):
        ditopt.presets.ditfastattn(STEPS, threshold=0.1, rmap=rmap, window=8)
    with pytest.raises(ProfileError, match="profiled at 6 steps, not 8"):
        ditopt.presets.ditfastattn(8, threshold=0.1, rmap=rmap)
    with pytest.raises(ProfileError, match="attention_window"):
        greedy_calibration(dataclasses.replace(rmap, attention=None), 0.1)


# -- the budget planner ----------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.95, 0.8, 0.6])
def test_planner_meets_its_budget_by_its_cost_model(budget):
    rmap = synthetic_map(STEPS, *drifting())
    sch = schedule_attention(rmap, budget)
    replay = AttentionReplay(rmap)
    row = sch.actions["b0.attn1"]
    block = rmap.flops["b0"] * STEPS
    # the block computes at every step: it executes its FLOPs less what the attention site saves
    executed = block - (replay.full["b0.attn1"] * STEPS - replay.row_cost("b0.attn1", row))
    assert sch.compute_fraction == pytest.approx(executed / block) and sch.compute_fraction <= budget + 1e-9
    assert row[0] == "compute"
    assert plan_attention(rmap, budget).rules == sch.rules()
    with pytest.raises(ProfileError, match="below the least"):
        schedule_attention(rmap, 0.3)


@pytest.mark.parametrize("frozen,chosen", [("residuals", "window"), ("outputs", "reuse"), ("offset", "share_cfg")])
def test_planner_prefers_the_action_with_the_lower_replayed_error(frozen, chosen):
    out, res = drifting()
    if frozen == "residuals":  # window misses nothing, reuse and share_cfg miss a change
        res[:] = res[0]
    elif frozen == "outputs":  # reuse misses nothing
        out[:] = out[0]
    else:  # the uncond - cond offset is constant, the outputs move
        out[:, 1] = out[:, 0] + 1.0
    rmap = synthetic_map(STEPS, out, res)
    sch = schedule_attention(rmap, 0.92)  # a budget each of the three actions alone can meet
    assert set(sch.actions["b0.attn1"][1:]) <= {chosen, "compute"} and chosen in sch.actions["b0.attn1"]
    assert sch.predicted_error == pytest.approx(0.0, abs=1e-6)


def test_attention_for_a_block_schedule_skips_where_the_block_does_not_compute():
    rmap = synthetic_map(STEPS, *drifting())
    block = ditopt.planner.Schedule(STEPS, {"b0": ["compute", "compute", "reuse_residual", "compute", "compute",
                                                   "reuse_residual"]}, 4 / 6, 0.0)
    sch = attention_for_schedule(rmap, block, budget=0.6)
    row = sch.actions["b0.attn1"]
    assert row[2] == row[5] == "skipped" and sch.compute_fraction <= 0.6 + 1e-9
    assert any(a not in ("compute", "skipped") for a in row)
    assert all(r.step_list(STEPS) and 2 not in r.step_list(STEPS) for r in sch.rules())
    enough = attention_for_schedule(rmap, block, budget=0.7)  # the block schedule alone meets it
    assert set(enough.actions["b0.attn1"]) == {"compute", "skipped"}


# -- the map's files --------------------------------------------------------------------------------

def test_attention_samples_save_and_load(tmp_path):
    rmap = synthetic_map(STEPS, *drifting(), layout="calls")
    path = rmap.save(tmp_path / "m")
    back = ditopt.RedundancyMap.load(path)
    a, b = rmap.attention, back.attention
    assert (b.window, b.layout, b.kinds, b.calls) == (a.window, a.layout, a.kinds, a.calls)
    assert torch.equal(b.outputs["b0.attn1"], a.outputs["b0.attn1"])
    assert torch.equal(b.residuals["b0.attn1"], a.residuals["b0.attn1"])
    assert schedule_attention(back, 0.8).actions == schedule_attention(rmap, 0.8).actions
    rmap.attention = None  # a map without attention samples (as every map saved before them)
    assert ditopt.RedundancyMap.load(rmap.save(tmp_path / "old")).attention is None


def test_a_map_with_broken_attention_samples_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = synthetic_map(STEPS, *drifting()).save(tmp_path / "m")
    tensors = load_file(str(path.with_suffix(".safetensors")))
    tensors["attention/out/b0.attn1"] = tensors["attention/out/b0.attn1"][:3]
    save_file(tensors, str(path.with_suffix(".safetensors")))
    with pytest.raises(ProfileError, match=r"attention/out/b0.attn1.*\[steps=6"):
        ditopt.RedundancyMap.load(path)
    del tensors["attention/out/b0.attn1"]
    tensors["attention/out/b9.attn1"] = torch.zeros(STEPS, 2, 4)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    with pytest.raises(ProfileError, match="names no attention site"):
        ditopt.RedundancyMap.load(path)


# -- real models: profile, plan, run -----------------------------------------------------------------

def expected_decisions(row: list[str], calls: int) -> list[str]:
    """What the runtime records per call for a site's planned row (CFG as two calls, cond first:
    the cond call of a share_cfg step computes)."""
    if calls == 1:
        return list(row)
    return [x for a in row for x in ("compute" if a == "share_cfg" else a, a)]


@pytest.mark.parametrize("name", ["dit", "pixart", "wan"])
def test_plans_from_small_models_run_as_planned(name):
    model, kwargs = build(name)
    other = {k: (v + 1 if k == "class_labels" else v.flip(0) + 0.5 if k == "encoder_hidden_states" else v)
             for k, v in kwargs.items()}  # an "unconditional" call: other conditioning
    ts = timesteps(STEPS, kwargs["timestep"])

    def run(tr):
        for t in ts:
            tr(**{**kwargs, "timestep": t})
            tr(**{**other, "timestep": t})

    rmap = ditopt.profile(model, run, steps=STEPS, progress=False, attention_window=8)
    assert rmap.attention.layout == "calls" and rmap.attention.lanes == 2
    replay = AttentionReplay(rmap)
    median = float(replay.step_errors("reuse").nanmedian())
    for sch in (greedy_calibration(rmap, median, warmup=2), schedule_attention(rmap, 0.85, warmup=2)):
        plan = sch.to_plan(rmap.model, "t")
        fast = ditopt.optimize(model, plan)
        with torch.no_grad():
            run(fast)
        decisions = ditopt.stats(fast).decisions
        assert any(a != "compute" for row in sch.actions.values() for a in row)
        for site, row in sch.actions.items():
            assert decisions.get(site, ["compute"] * 2 * STEPS) == expected_decisions(row, 2), site


@pytest.fixture(scope="module")
def dit_digits():
    m = zoo.load("dit-digits")
    rmap = ditopt.profile(m.model, lambda tr: m.sample([1, 7], seed=0, steps=STEPS, transformer=tr), steps=STEPS,
                          progress=False, cfg="batched", attention_window=16)
    example = dict(hidden_states=torch.zeros(m.sample_shape(1)), timestep=torch.ones(1) * 500,
                   **m.make_conditioning(torch.tensor([0])))
    return m, rmap, ditopt.cost_model(m.model, **example)


def run_plan(m, plan):
    fast = ditopt.optimize(m.model, plan)
    out = m.sample([1, 7], seed=0, steps=STEPS, transformer=fast)
    assert torch.isfinite(out).all()
    return ditopt.stats(fast).decisions


def test_zoo_dit_batched_cfg_plan_runs_and_costs_what_was_planned(dit_digits):
    m, rmap, cost = dit_digits
    cfg = CfgLayout("batched", "second")  # dit-digits batches [cond, uncond]
    sch = schedule_attention(rmap, 0.85, warmup=2, cfg=cfg)
    assert sch.compute_fraction <= 0.85 and not math.isnan(sch.predicted_error)
    plan = sch.to_plan(rmap.model, "b")
    decisions = run_plan(m, plan)
    for site, row in sch.actions.items():
        assert decisions.get(site, ["compute"] * STEPS) == row, site
    predicted = cost.predict(plan, decisions=decisions).compute_fraction
    assert predicted == pytest.approx(sch.compute_fraction, rel=1e-6)


def test_zoo_dit_block_schedule_with_attention_actions_runs_as_one_plan(dit_digits):
    m, rmap, cost = dit_digits
    block = ditopt.planner.schedule_from_profile(rmap, budget=0.7)
    att = attention_for_schedule(rmap, block, budget=0.6, warmup=2, cfg=CfgLayout("batched", "second"))
    plan = block.to_plan(rmap.model, "blocks")
    plan = ditopt.Plan(steps=plan.steps, rules=plan.rules + att.rules(), model=plan.model, name="blocks+attention")
    decisions = run_plan(m, plan)
    for site, row in att.actions.items():
        assert decisions[site] == row, site  # "skipped" where the enclosing block reuses or forecasts
    assert any(a not in ("compute", "skipped") for row in att.actions.values() for a in row)
    predicted = cost.predict(plan, decisions=decisions).compute_fraction
    assert predicted == pytest.approx(att.compute_fraction, rel=1e-6) and predicted <= 0.6 + 1e-9


def test_plan_from_profile_splits_the_budget_between_blocks_and_attention(dit_digits):
    m, rmap, cost = dit_digits
    cfg = CfgLayout("batched", "second")
    plan = ditopt.plan_from_profile(rmap, budget=0.6, block_budget=0.7, warmup=2, cfg=cfg)
    block = ditopt.planner.schedule_from_profile(rmap, budget=0.7, warmup=2)
    att = attention_for_schedule(rmap, block, budget=0.6, warmup=2, cfg=cfg)
    assert [r for r in plan.rules if r.kind == "attention"] == att.rules()
    assert ditopt.Plan.from_yaml(plan.to_yaml()) == plan
    decisions = run_plan(m, plan)
    assert cost.predict(plan, decisions=decisions).compute_fraction <= 0.6 + 1e-9
    assert any(a in ("window", "reuse", "share_cfg") for site, row in decisions.items() if "attn" in site for a in row)
    with pytest.raises(ProfileError, match="block_budget"):
        ditopt.plan_from_profile(rmap, budget=0.8, block_budget=0.7)
    plain = ditopt.profile(m.model, lambda tr: m.sample([1], seed=0, steps=STEPS, transformer=tr), steps=STEPS,
                           progress=False, cfg="batched")
    with pytest.raises(ProfileError, match="attention_window"):
        ditopt.plan_from_profile(plain, budget=0.6, block_budget=0.7)
