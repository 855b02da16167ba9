"""The ``window`` action (DiTFastAttn's WA-RS): window attention plus the residual full - window
cached at the site's last full step, at each SDPA call of a self-attention site.

    before                   after (insert_window_branches)
    o = sdpa(q, k, v)        full = decide(...); keep = window_residual(...); r_old = cache_load(..., "window0")
                             a = cond(full, sdpa(q, k, v), window_attention(q, k, v, W) + r_old)[0]
                             r = cond(keep, a - window_attention(q, k, v, W), empty)[0]
                             cache_store(token, r, keep, ..., "window0")
    out = to_out(o)          out = to_out(a)

The reference (:func:`hand_window`) shares no code with the rewrite: it patches
``F.scaled_dot_product_attention`` in the eager model and computes the window part with the dense
mask (``window_mask``), not the kernel.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import ditopt
from ditopt import PlanError
from ditopt.passes import insert_indicators, insert_skip_branches, insert_window_branches, verify_graph
from ditopt.passes.annotations import Role, node_annotation
from ditopt.runtime.window_attention import window_attention, window_mask
from ditopt.small_models import build, timesteps as model_timesteps
from synthetic import (CACHE_LOAD, CACHE_STORE, COND, DECIDE, SDPA, eager, latents, make_stack, prepare, snapshot,
                       targets, timesteps)

STEPS = 4
SEQ = 40
WINDOW_RESIDUAL = torch.ops.ditopt.window_residual.default


def window_plan(window: int, steps=(1, 2), total: int = STEPS, sites: str = "*", **extra) -> ditopt.Plan:
    return ditopt.Plan.from_dict({"version": 1, "steps": total, "rules": [
        {"sites": sites, "kind": "attention", "attention": "self", "steps": list(steps), "action": "window",
         "window": window, **extra}]})


@contextlib.contextmanager
def hand_window(window: int, step: int, window_steps, residuals: dict):
    """Run the eager model with every maskless self-attention SDPA call (keys as many as queries)
    windowed by hand at ``window_steps``: the dense masked window plus the residual of the last
    full step, kept in ``residuals`` by call index."""
    real = F.scaled_dot_product_attention
    calls = itertools.count()

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        full = real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
        if attn_mask is not None or q.shape != k.shape:
            return full
        i = next(calls)
        dense = real(q, k, v, attn_mask=window_mask(q.shape[-2], window, device=q.device), scale=scale)
        if step in window_steps:
            return dense + residuals[i]
        residuals[i] = full - dense
        return full

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


# -- the plan ---------------------------------------------------------------------------------------

def test_window_rules_read_write_and_resample():
    plan = ditopt.Plan.from_yaml("""
version: 1
steps: 8
rules:
  - sites: "*"
    kind: attention
    attention: self
    steps: "2:8:2"
    action: window
    window: 64
""")
    assert plan.rules[0].window == 64
    assert ditopt.Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.resample(16).rules[0].window == 64


@pytest.mark.parametrize("rule,message", [
    ({"action": "window"}, "action window needs 'window: <tokens>'"),
    ({"action": "window", "window": 0}, "'window' must be a number of tokens"),
    ({"action": "window", "window": True}, "'window' must be a number of tokens"),
    ({"action": "window", "window": [2, 4, 4, 4]}, "per-axis 'window' list is .frames, height, width."),
    ({"action": "reuse", "window": 8}, "'window' applies to action window, not 'reuse'"),
    ({"action": "window", "window": 8, "when": {"of": "blocks.0", "below": 0.1}}, "'window' cannot be adaptive"),
])
def test_malformed_window_rules_are_named(rule, message):
    with pytest.raises(PlanError, match=message):
        ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "steps": [1], **rule}]})


def stack_sites():
    p = prepare(make_stack(2), window_plan(8), [latents(1, seq=SEQ)[0], timesteps(1)[0]])
    return p.sites


@pytest.mark.parametrize("rules,message", [
    ([{"sites": "blocks.0", "steps": [1], "action": "window", "window": 8}],
     "window applies to self-attention sites only; 'blocks.0' is a block"),
    ([{"sites": "blocks.0.attn", "steps": [1], "action": "window", "window": 8},
      {"sites": "blocks.0.attn", "steps": [2], "action": "window", "window": 16}], "one window size per plan"),
    ([{"sites": "blocks.0.attn", "steps": [1], "action": "window", "window": 8},
      {"sites": "blocks.0.attn", "steps": [2], "action": "reuse"}], "a window site takes no other reuse"),
])
def test_window_on_a_site_that_cannot_take_it_is_a_plan_error(rules, message):
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": rules})
    with pytest.raises(PlanError, match=message):
        plan.compile(stack_sites())


@pytest.mark.parametrize("name,kind", [("pixart", "cross"), ("wan", "cross"), ("hunyuan", "joint")])
def test_cross_and_joint_attention_refuse_window(name, kind):
    model, kwargs = build(name)
    sites = ditopt.sites(model, **kwargs)
    site = next(s for s in sites if s.kind == "attention" and s.attention == kind)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [
        {"sites": site.name, "steps": [1], "action": "window", "window": 8}]})
    with pytest.raises(PlanError, match=f"{site.name}.*{kind} attention") as err:
        plan.compile(sites)
    assert err.value.site == site.name


def test_a_masked_self_attention_is_refused_naming_the_site():
    """HunyuanVideo's only self-attention is the text refiner's, with the text mask: the window kernel
    has no mask, so the rewrite refuses it (its stack attention is joint: refused above)."""
    model, kwargs = build("hunyuan")
    fast = ditopt.optimize(model, window_plan(4))
    with pytest.raises(PlanError, match="refiner_blocks.0.attn.*attn_mask"), torch.no_grad():
        fast(**kwargs)


# -- the rewrite on the synthetic stack ---------------------------------------------------------------

def rewritten(plan, last=insert_skip_branches):
    p = prepare(make_stack(2), plan, [latents(1, seq=SEQ)[0], timesteps(1)[0]])
    p.run_up_to(last)
    return p


def test_each_sdpa_call_of_a_window_site_gets_two_conds_a_load_and_a_store():
    p = rewritten(window_plan(8, sites="blocks.0.attn"))
    found = targets(p.gm)
    assert found[COND] == 2 and found[SDPA] == 1  # blocks.1's attention is untouched
    assert (found[DECIDE], found[WINDOW_RESIDUAL], found[CACHE_LOAD], found[CACHE_STORE]) == (1, 1, 1, 1)
    store = next(n for n in p.gm.graph.nodes if n.target is CACHE_STORE)
    assert store.args[5:7] == ("blocks.0.attn", "window0")
    attention, residual = (n for n in p.gm.graph.nodes if n.target is COND)
    assert attention.args[0].target is DECIDE and residual.args[0].target is WINDOW_RESIDUAL
    assert store.args[1].args[0] is residual and store.args[2] is residual.args[0]
    full, window = (getattr(p.gm, fn.target) for fn in attention.args[1:3])
    keep, skip = (getattr(p.gm, fn.target) for fn in residual.args[1:3])
    assert targets(full)[SDPA] == 1 and targets(full)[window_attention] == 0
    assert targets(window)[window_attention] == 1 and targets(window)[SDPA] == 0
    assert targets(keep)[window_attention] == 1 and targets(skip)[window_attention] == 0
    out_proj = next(n for n in p.gm.graph.nodes if n.op == "call_module" and n.target == "blocks.0.attn.out")
    assert out_proj.args[0].args[0] is attention  # the output projection reads the chosen attention
    assert node_annotation(attention).role is Role.SKIP_BRANCH and attention.meta["nn_module_stack"]
    assert not verify_graph(p.gm, p.ctx).modified


def test_a_plan_without_window_rules_leaves_the_graph_alone():
    plan = ditopt.presets.fora(interval=2, steps=STEPS, level="layer")
    p = rewritten(plan, last=insert_indicators)
    before = snapshot(p.gm)
    assert not insert_window_branches(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before


def test_running_the_pass_twice_changes_nothing():
    p = rewritten(window_plan(8), last=insert_window_branches)
    before = snapshot(p.gm)
    assert not insert_window_branches(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before


def run_prepared(plan, model, xs, ts):
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to()
    return [p(x, t)[0] for x, t in zip(xs, ts)], p


def test_a_window_covering_the_sequence_equals_all_compute():
    model, xs, ts = make_stack(2), latents(STEPS, seq=SEQ), timesteps(STEPS)
    outs, p = run_prepared(window_plan(SEQ), model, xs, ts)
    for out, x, t in zip(outs, xs, ts):
        torch.testing.assert_close(out, eager(model, x, t)[0], atol=1e-5, rtol=1e-5)
    assert p.runtime.decisions()["blocks.1.attn"] == ["compute", "window", "window", "compute"]


@pytest.mark.parametrize("window_steps", [(1, 2), (1, 3)])
def test_a_small_window_equals_the_hand_written_residual_sharing(window_steps):
    model, xs, ts = make_stack(2), latents(STEPS, seq=SEQ), timesteps(STEPS)
    outs, p = run_prepared(window_plan(8, window_steps), model, xs, ts)
    residuals = {}
    for step, (out, x, t) in enumerate(zip(outs, xs, ts)):
        with hand_window(8, step, window_steps, residuals):
            ref = eager(model, x, t)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        if step in window_steps:  # and it is not full attention
            assert (out - eager(model, x, t)[0]).abs().max() > 1e-4
    assert p.runtime.decisions()["blocks.0.attn"] == ["window" if s in window_steps else "compute"
                                                     for s in range(STEPS)]


def test_the_kernel_equals_the_dense_masked_reference_at_the_site_shapes():
    q, k, v = (torch.randn(1, SEQ, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(SEQ, 8))
    torch.testing.assert_close(window_attention(q, k, v, 8), dense, atol=1e-6, rtol=1e-6)


def test_full_steps_compute_the_residual_only_where_a_later_window_step_reads_it():
    """Window at step 1 only: steps 0 keeps the residual; steps 2 and 3 run full attention alone
    (the cached residual stays the one of step 0)."""
    model, xs, ts = make_stack(2), latents(STEPS, seq=SEQ), timesteps(STEPS)
    plan = window_plan(8, (1,), sites="blocks.0.attn")
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to()
    kept = []
    for x, t in zip(xs, ts):
        p(x, t)
        kept.append(p.runtime.store.latest((0, "blocks.0.attn", "window0", 0)).step)
    assert kept == [0, 0, 0, 0]
    assert [p.compiled.residual_needed("blocks.0.attn", s) for s in range(STEPS)] == [True, False, False, False]


def test_an_enclosing_block_that_reuses_takes_the_window_branches_along():
    model, xs, ts = make_stack(2), latents(STEPS, seq=SEQ), timesteps(STEPS)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [
        {"sites": "blocks.0", "kind": "block", "steps": [2], "action": "reuse_residual"},
        {"sites": "blocks.0.attn", "steps": [1, 3], "action": "window", "window": 8}]})
    outs, p = run_prepared(plan, model, xs, ts)
    assert targets(p.gm)[COND] == 0  # eager: every cond lowered, the window conds inside the block's branch
    assert p.runtime.decisions()["blocks.0.attn"] == ["compute", "window", "skipped", "window"]
    # step 3 adds the residual of step 0 (step 2 did not run the block)
    residuals, block_residual = {}, None
    for step, (out, x, t) in enumerate(zip(outs, xs, ts)):
        with torch.no_grad():
            temb = model.embed(t)
            if step == 2:
                h = x + block_residual
            else:
                with hand_window(8, step, (1, 3), residuals):
                    h = model.blocks[0](x, temb)
                block_residual = h - x
            ref = model.head(model.blocks[1](h, temb))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# -- real models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dit", "pixart", "wan"])
def test_small_models_equal_the_hand_written_residual_sharing(name):
    model, kwargs = build(name)
    tokens = {"dit": 16, "pixart": 16, "wan": 48}[name]
    window = tokens // 4
    window_steps = (1, 2)
    fast = ditopt.optimize(model, window_plan(window, window_steps))
    residuals = {}
    with torch.no_grad():
        for step, t in enumerate(model_timesteps(STEPS, kwargs["timestep"])):
            inputs = {**kwargs, "timestep": t}
            out = fast(**inputs, return_dict=False)[0]
            with hand_window(window, step, window_steps, residuals):
                ref = model(**inputs, return_dict=False)[0]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            if step in window_steps:
                assert (out - model(**inputs, return_dict=False)[0]).abs().max() > 1e-5
    decisions = ditopt.stats(fast).decisions
    selfs = [s for s in ditopt.sites(model, **kwargs) if s.kind == "attention"]
    for site in selfs:
        expected = ["compute", "window", "window", "compute"] if site.attention == "self" else ["compute"] * STEPS
        assert decisions[site.name] == expected
    assert len(residuals) == sum(s.attention == "self" for s in selfs)


@pytest.mark.parametrize("name", ["dit", "wan"])
def test_small_models_with_a_covering_window_equal_the_model(name):
    model, kwargs = build(name)
    fast = ditopt.optimize(model, window_plan(10_000))
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            inputs = {**kwargs, "timestep": t}
            torch.testing.assert_close(fast(**inputs, return_dict=False)[0], model(**inputs, return_dict=False)[0],
                                       atol=1e-5, rtol=1e-5)


def test_set_plan_keeps_the_window_and_refuses_another():
    model, kwargs = build("dit")
    fast = ditopt.optimize(model, window_plan(8, (1, 2)))
    with torch.no_grad():
        fast(**kwargs)
    ditopt.set_plan(fast, window_plan(8, (1, 3)))
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            fast(**{**kwargs, "timestep": t})
    assert ditopt.stats(fast).decisions["transformer_blocks.0.attn1"] == ["compute", "window", "compute", "window"]
    with pytest.raises(PlanError, match="window"):
        ditopt.set_plan(fast, window_plan(4, (1, 3)))


def test_ditfastattn_preset_runs_on_pixart():
    model, kwargs = build("pixart")
    plan = ditopt.presets.ditfastattn(steps=8, window=8, interval=3, warmup=2)
    fast = ditopt.optimize(model, plan)
    with torch.no_grad():
        for t in model_timesteps(8, kwargs["timestep"]):
            fast(**{**kwargs, "timestep": t})
    decisions = ditopt.stats(fast).decisions
    assert decisions["transformer_blocks.0.attn1"] == ["compute", "compute", "compute", "window", "window",
                                                       "compute", "window", "window"]
    assert decisions["transformer_blocks.0.attn2"][3:5] == ["reuse", "reuse"]
    with pytest.raises(ditopt.ProfileError, match="threshold= and rmap="):  # the greedy calibration reads a map
        ditopt.presets.ditfastattn(steps=8, threshold=0.05)


@pytest.mark.slow
def test_window_plan_compiles_under_inductor_like_eager():
    model, kwargs = build("dit")
    plan = window_plan(8, (1, 2))
    compiled = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
    fast = ditopt.optimize(model, plan)
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            inputs = {**kwargs, "timestep": t}
            torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], fast(**inputs, return_dict=False)[0],
                                       atol=1e-4, rtol=1e-4)
    assert ditopt.stats(compiled).decisions == ditopt.stats(fast).decisions
    assert ditopt.stats(compiled).decisions["transformer_blocks.0.attn1"] == ["compute", "window", "window", "compute"]
