"""insert_skip_branches: each reusing site's region becomes a torch.cond, so reuse skips work.

    before                                   after
    pred = decide(...)                       pred = decide(...)
    r_old = cache_load(...)                  r_old = cache_load(...)
    add_5 = <blocks.0>(x, temb)              cond = cond(pred, ditopt_blocks_0_compute,
    r = add_5 - x                                        ditopt_blocks_0_reuse, (temb, x, r_old))
    cache_store(token, r, pred, ...)         add_5, r = cond[0], cond[1]
                                             cache_store(token, r, pred, ...)
Here the graph runs with the conds in it, as inductor receives it (not lowered).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import ditopt
from ditopt.passes import insert_cache_ops, insert_skip_branches, lower_skip_branches, verify_graph
from ditopt.passes.annotations import Role, node_annotation
from synthetic import (
    CACHE_STORE, COND, COUNTS, DECIDE, NESTED_STEPS, SDPA, HandCache, actions_of, block_plan, eager, hand_nested,
    latents, make_dual_stack, make_stack, nested_plan, prepare, snapshot, targets, timesteps,
)

STEPS = 4
FORA = ditopt.presets.fora(interval=2, steps=STEPS, level="block")


def setup(plan=FORA, model=None, inputs=None, inductor=False):
    model = model or make_stack(2)
    inputs = inputs or [latents(1)[0], timesteps(1)[0]]
    p = prepare(model, plan, inputs, inductor=inductor)
    p.run_up_to(insert_cache_ops)
    return model, p


def called_modules(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_each_reusing_site_becomes_one_cond_over_its_region():
    _, p = setup()

    assert insert_skip_branches(p.gm, p.ctx).modified

    found = targets(p.gm)
    assert found[COND] == 2
    assert found[SDPA] == 0  # the attention runs only inside the compute branches
    assert not [m for m in called_modules(p.gm) if m.startswith("blocks.")]
    assert (found[DECIDE], found[CACHE_STORE]) == (2, 2)  # effects stay outside the branches
    for site in ("blocks.0", "blocks.1"):
        cond = next(n for n in p.gm.graph.nodes if n.target is COND and node_annotation(n).site == site)
        pred, true_fn, false_fn, operands = cond.args
        assert pred.target is DECIDE and pred.args[3] == site
        assert (true_fn.op, true_fn.target) == ("get_attr", f"ditopt_{site.replace('.', '_')}_compute")
        assert (false_fn.op, false_fn.target) == ("get_attr", f"ditopt_{site.replace('.', '_')}_reuse")
        load = next(n for n in p.gm.graph.nodes if node_annotation(n).role is Role.LOAD
                    and node_annotation(n).site == site)
        residual_input = p.ctx.sites[site].residual_inputs[0]  # renamed once blocks.0 is a cond
        assert load in operands and residual_input in [o.name for o in operands]
        compute, reuse = getattr(p.gm, true_fn.target), getattr(p.gm, false_fn.target)
        assert targets(compute)[SDPA] == 1
        assert any(m.endswith(".attn.qkv") for m in called_modules(compute))
        assert targets(reuse)[SDPA] == 0 and called_modules(reuse) == []
        assert targets(reuse)[torch.add] == 1  # fresh input + cached residual
        store = next(n for n in p.gm.graph.nodes if n.target is CACHE_STORE and n.args[5] == site)
        assert store.args[1].target is operator.getitem and store.args[1].args[0] is cond
        assert cond.meta["nn_module_stack"]
    assert not verify_graph(p.gm, p.ctx).modified


@pytest.mark.parametrize("inductor", [False, True], ids=["eager-ctx", "inductor-ctx"])
def test_outputs_match_the_hand_written_plan_under_torch_cond(inductor):
    """``inductor`` only changes how the cache ops copy; inductor itself is not run here."""
    table = {0: ("reuse", [1, 2]), 1: ("reuse_residual", [2, 3])}
    model = make_stack(2, counting=True)
    _, p = setup(block_plan(STEPS, table), model, inductor=inductor)
    insert_skip_branches(p.gm, p.ctx)
    reference = HandCache(model, actions_of(table))
    xs, ts = latents(STEPS), timesteps(STEPS)

    ran = []
    for step, (x, t) in enumerate(zip(xs, ts)):
        expected = reference(step, 0, x, timestep=t)[0]
        COUNTS.clear()
        torch.testing.assert_close(p(x, t)[0], expected, rtol=0, atol=1e-6)
        ran.append(sorted(COUNTS.elements()))

    assert ran == [[0, 1], [1], [], [0]]  # a reused block's work did not run
    decisions = p.runtime.decisions()
    assert decisions["blocks.0"] == ["compute", "reuse", "reuse", "compute"]
    assert decisions["blocks.1"] == ["compute", "compute", "reuse_residual", "reuse_residual"]


@pytest.mark.parametrize("action", ["reuse", "reuse_residual"])
def test_dual_stream_blocks_reuse_both_live_outs(action):
    model = make_dual_stack(2)
    xs, cs, ts = latents(STEPS), latents(STEPS, seq=3, seed=2), timesteps(STEPS)
    table = {0: (action, [1, 3]), 1: (action, [2, 3])}
    _, p = setup(block_plan(STEPS, table), model, [xs[0], cs[0], ts[0]])
    insert_skip_branches(p.gm, p.ctx)
    reference = HandCache(model, actions_of(table))

    assert targets(p.gm)[COND] == 2
    for step in range(STEPS):
        got = p(xs[step], cs[step], ts[step])
        want = reference(step, 0, xs[step], cs[step], timestep=ts[step])
        assert len(got) == 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_the_stack_site_reuses_as_one_region():
    model = make_stack(2)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 3, "rules": [
        {"sites": "stack", "steps": [1, 2], "action": "reuse_residual"}]})
    _, p = setup(plan, model)
    insert_skip_branches(p.gm, p.ctx)
    xs, ts = latents(3), timesteps(3)

    assert targets(p.gm)[COND] == 1 and targets(p.gm)[SDPA] == 0
    with torch.no_grad():
        temb = model.embed(ts[0])
        h = xs[0]
        for block in model.blocks:
            h = block(h, temb)
        residual = h - xs[0]
    assert torch.equal(p(xs[0], ts[0])[0], eager(model, xs[0], ts[0])[0])
    for step in (1, 2):
        with torch.no_grad():
            expected = model.head(xs[step] + residual)
        torch.testing.assert_close(p(xs[step], ts[step])[0], expected, rtol=0, atol=1e-6)


def test_nested_sites_extract_inner_first():
    _, p = setup(nested_plan())
    insert_skip_branches(p.gm, p.ctx)

    assert targets(p.gm)[COND] == 1  # blocks.0's cond; the attention's cond is inside it
    compute = p.gm.ditopt_blocks_0_compute
    assert targets(compute)[COND] == 1 and targets(compute)[SDPA] == 0
    assert targets(compute)[CACHE_STORE] == 0  # the attention's store is hoisted out of both
    stores = [n for n in p.gm.graph.nodes if n.target is CACHE_STORE]
    assert sorted(n.args[5] for n in stores) == ["blocks.0", "blocks.0.attn"]
    assert not verify_graph(p.gm, p.ctx).modified


def test_nested_sites_run_under_torch_cond():
    """The graph inductor receives: every cond operand must be a tensor.

    The inner cond's get_attr nodes (its branch GraphModules) carry no region annotation, so
    extracting the outer site passes them to the outer cond as operands; torch.cond refuses.
    """
    model = make_stack(2)
    _, p = setup(nested_plan("reuse"), model)
    insert_skip_branches(p.gm, p.ctx)
    xs, ts = latents(NESTED_STEPS), timesteps(NESTED_STEPS)

    outer = next(n for n in p.gm.graph.nodes if n.target is COND)
    assert [o.name for o in outer.args[3] if o.op == "get_attr"] == []
    for x, t, want in zip(xs, ts, hand_nested(model, xs, ts, "reuse")):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-6)


def test_a_residual_reusing_site_nested_in_a_reusing_block():
    """The attention's residual is hoisted out of the block's cond, so the block's reuse branch
    must make an empty tensor of its shape: the residual node needs shape metadata (see
    test_insert_cache_ops.py::test_residual_nodes_carry_the_shape_of_their_live_out)."""
    model = make_stack(2)
    _, p = setup(nested_plan("reuse_residual"), model)

    assert insert_skip_branches(p.gm, p.ctx).modified

    lower_skip_branches(p.gm, p.ctx)  # run eagerly: this case is about the extraction only
    xs, ts = latents(NESTED_STEPS), timesteps(NESTED_STEPS)
    for x, t, want in zip(xs, ts, hand_nested(model, xs, ts, "reuse_residual")):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-6)


def test_all_compute_plan_leaves_no_cond():
    _, p = setup(ditopt.presets.all_compute(steps=STEPS))
    before = snapshot(p.gm)

    assert not insert_skip_branches(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    assert targets(p.gm)[COND] == 0 and targets(p.gm)[SDPA] == 2


def test_idempotent():
    _, p = setup(ditopt.presets.fora(interval=2, steps=STEPS, level="layer"))
    assert insert_skip_branches(p.gm, p.ctx).modified
    before = snapshot(p.gm)

    assert not insert_skip_branches(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    assert targets(p.gm)[COND] == 4
