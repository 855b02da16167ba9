"""insert_cfg_sharing: a site planned ``share_cfg`` under batched CFG computes the conditional half.

    before                         after (unconditional half first: u = 0, c = 1, b = B / 2)
                                   full = decide(token, rid, 0, "blocks.0.attn", [b, ...])
                                   off = cache_load(token, ..., "blocks.0.attn", "share_cfg0", [b, ...])
    o = <blocks.0.attn>(h, ...)    o, d = cond(full, both(h, ..., off), cond_half(h, ..., off))
                                   cache_store(token, d, full, ..., "blocks.0.attn", "share_cfg0")
``both`` runs the site on the batch and returns d = o[u] - o[c]; ``cond_half`` runs it on
``h.narrow(0, c*b, b)`` and returns ``cat([o_c + off, o_c])``.

The reference (:func:`hand_shared`) shares no code with the pass: it replaces the modules'
forwards in the eager model (the conditional half of every batch argument, plus the offset it
kept from the last full step).
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from ditopt import PlanError
from ditopt.passes import insert_cfg_sharing, insert_indicators, insert_window_branches, verify_graph
from ditopt.passes.annotations import Role, graph_annotation, node_annotation
from synthetic import (CACHE_LOAD, CACHE_STORE, COND, DECIDE, SDPA, eager, latents, make_dual_stack, make_stack,
                       prepare, snapshot, targets, timesteps)

STEPS = 4
RUN_BRANCH = "run_branch"


def share_plan(kind: str = "attention", steps=(1, 2), sites: str = "*", cfg=None) -> ditopt.Plan:
    rule = {"sites": sites, "kind": kind, "steps": list(steps), "action": "share_cfg"}
    if cfg is not None:
        rule["cfg"] = cfg
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [rule]})


def batch2(n: int = STEPS):
    """CFG batches: ``n`` latents of batch 2 and timesteps [t, t]."""
    return latents(n, batch=2), [t.expand(2).clone() for t in timesteps(n)]


def rewritten(plan, model=None, last=insert_cfg_sharing):
    xs, ts = batch2(1)
    p = prepare(model or make_stack(2), plan, [xs[0], ts[0]])
    p.run_up_to(last)
    return p


def run_all(plan, model, xs, ts):
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to()
    return [p(x, t)[0] for x, t in zip(xs, ts)], p


def halves(value, index: int):
    return tree_map(lambda v: v.narrow(0, index, 1) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2
                    else v, value)


@torch.no_grad()
def hand_shared(model, modules, xs, ts, share_steps, uncond: int = 0):
    """The model run step by step with each module in ``modules`` shared across the batch's CFG
    halves at ``share_steps``: its forward on the conditional half only, the unconditional half
    = conditional output + (uncond - cond) of its last full step."""
    cond = 1 - uncond
    offsets, outs = {}, []
    for step, (x, t) in enumerate(zip(xs, ts)):
        saved = {}
        for i, m in enumerate(modules):
            real = type(m).forward

            def forward(*args, _m=m, _i=i, _real=real, **kwargs):
                if step in share_steps:
                    out_c = _real(_m, *halves(args, cond), **halves(kwargs, cond))
                    flat, spec = tree_flatten(out_c)
                    joined = [torch.cat([o + d, o] if uncond == 0 else [o, o + d]) for o, d in zip(flat, offsets[_i])]
                    return tree_unflatten(joined, spec)
                out = _real(_m, *args, **kwargs)
                offsets[_i] = [o[uncond:uncond + 1] - o[cond:cond + 1] for o in tree_flatten(out)[0]]
                return out

            saved[m] = forward
            m.forward = forward
        try:
            outs.append(eager(model, x, t)[0])
        finally:
            for m in saved:
                del m.forward
    return outs


# -- structure -----------------------------------------------------------------------------------------

def test_each_shared_site_gets_a_decision_a_load_a_cond_and_a_store():
    p = rewritten(share_plan(sites="blocks.0.attn"))
    found = targets(p.gm)
    assert (found[DECIDE], found[CACHE_LOAD], found[CACHE_STORE], found[COND]) == (1, 1, 1, 1)
    assert found[SDPA] == 1  # blocks.1's attention is untouched
    cond = next(n for n in p.gm.graph.nodes if n.target is COND)
    decide, load, store = (next(n for n in p.gm.graph.nodes if n.target is t) for t in (DECIDE, CACHE_LOAD, CACHE_STORE))
    assert cond.args[0] is decide and load in cond.args[3]
    assert decide.args[3:5] == ("blocks.0.attn", [1, 5, 8])  # the offset: half the batch
    assert store.args[5:7] == ("blocks.0.attn", "share_cfg0") and store.args[2] is decide
    assert store.args[1].target is operator.getitem and store.args[1].args == (cond, 1)
    both, half = (getattr(p.gm, fn.target) for fn in cond.args[1:3])
    assert targets(both)[SDPA] == 1 and targets(half)[SDPA] == 1
    narrows = [n for n in half.graph.nodes if n.op == "call_method" and n.target == "narrow"]
    assert [n.args[1:] for n in narrows] == [(0, 1, 1)]  # the conditional half of the one batch input
    assert targets(half)[torch.cat] == 1
    out_proj = next(n for n in p.gm.graph.nodes if n.op == "call_module" and n.target == "blocks.1.attn.out")
    assert out_proj is not None
    assert node_annotation(cond).role is Role.SKIP_BRANCH and cond.meta["nn_module_stack"]
    assert graph_annotation(p.gm).cfg_branches == {"blocks.0.attn"}
    assert not verify_graph(p.gm, p.ctx).modified


def test_the_conditional_half_executes_half_the_site_flops():
    p = rewritten(share_plan(sites="blocks.0.attn"))
    cond = next(n for n in p.gm.graph.nodes if n.target is COND)
    both, half = (getattr(p.gm, fn.target) for fn in cond.args[1:3])
    xs, _ = batch2(1)
    operands = [torch.randn(tuple(n.meta["tensor_meta"].shape)) if n.op != "call_function" or n.target is not CACHE_LOAD
                else torch.zeros(1, 5, 8) for n in cond.args[3]]
    counts = []
    for branch in (both, half):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            branch(*operands)
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] * 2 == counts[0]


def test_a_plan_without_share_cfg_leaves_the_graph_alone():
    p = rewritten(ditopt.presets.fora(interval=2, steps=STEPS, level="layer"), last=insert_window_branches)
    before = snapshot(p.gm)
    assert not insert_cfg_sharing(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before


def test_cfg_as_two_calls_needs_no_branch_here():
    p = rewritten(share_plan(cfg={"layout": "calls"}), last=insert_window_branches)
    before = snapshot(p.gm)
    assert not insert_cfg_sharing(p.gm, p.ctx).modified and snapshot(p.gm) == before
    assert set(graph_annotation(p.gm).rewrites) == {"blocks.0.attn", "blocks.1.attn"}  # reuse-like sites


def test_running_the_pass_twice_changes_nothing():
    p = rewritten(share_plan(kind="block"))
    before = snapshot(p.gm)
    assert not insert_cfg_sharing(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before


def test_a_batch_of_one_is_refused_naming_the_site():
    p = prepare(make_stack(2), share_plan(sites="blocks.1.attn"), [latents(1)[0], timesteps(1)[0]])
    p.annotate()
    with pytest.raises(PlanError, match=r"blocks\.1\.attn.*even batch.*layout: calls") as err:
        p.run_up_to(insert_cfg_sharing)
    assert err.value.site == "blocks.1.attn"


def test_a_site_that_mixes_the_samples_is_refused_naming_the_node():
    class Mixing(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, 0)

    model = make_stack(2)
    model.blocks[0].attn.out = torch.nn.Sequential(model.blocks[0].attn.out, Mixing())
    p = prepare(model, share_plan(sites="blocks.0.attn"), [batch2(1)[0][0], batch2(1)[1][0]])
    with pytest.raises(PlanError, match=r"blocks\.0\.attn.*mixes the samples"):
        p.run_up_to(insert_cfg_sharing)


def test_a_site_with_a_planned_site_inside_is_refused():
    plan = ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [
        {"sites": "blocks.0", "kind": "block", "steps": [1], "action": "share_cfg"},
        {"sites": "blocks.0.ff", "steps": [2], "action": "reuse"}]})
    with pytest.raises(PlanError, match=r"blocks\.0.*other planned sites.*blocks\.0\.ff"):
        rewritten(plan)


# -- numerics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["attention", "block"])
def test_steps_that_compute_both_halves_equal_eager_exactly(kind):
    model, (xs, ts) = make_stack(2), batch2()
    outs, p = run_all(share_plan(kind, steps=(3,)), model, xs, ts)
    for out, x, t in zip(outs[:3], xs, ts):
        assert torch.equal(out, eager(model, x, t)[0])
    assert not torch.equal(outs[3], eager(model, xs[3], ts[3])[0])


@pytest.mark.parametrize("kind,uncond", [("attention", "first"), ("block", "first"), ("block", "second")])
def test_shared_steps_equal_the_hand_written_sharing(kind, uncond):
    model, (xs, ts) = make_stack(2), batch2()
    outs, p = run_all(share_plan(kind, steps=(1, 2), cfg={"uncond": uncond}), model, xs, ts)
    modules = [b.attn if kind == "attention" else b for b in model.blocks]
    refs = hand_shared(model, modules, xs, ts, (1, 2), uncond=0 if uncond == "first" else 1)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    name = "blocks.0.attn" if kind == "attention" else "blocks.0"
    assert p.runtime.decisions()[name] == ["compute", "share_cfg", "share_cfg", "compute"]
    kept = p.runtime.store.latest((0, name, "share_cfg0", 0))
    assert kept.step == 0 and kept.value.shape == (1, 5, 8)  # steps 3 keeps none: no share_cfg follows


def test_a_dual_stream_block_shares_both_streams():
    model = make_dual_stack(2)
    g = torch.Generator().manual_seed(3)
    xs, cs = latents(STEPS, batch=2), [torch.randn(2, 3, 8, generator=g) for _ in range(STEPS)]
    ts = [t.expand(2).clone() for t in timesteps(STEPS)]
    plan = share_plan("block", steps=(2,))
    p = prepare(model, plan, [xs[0], cs[0], ts[0]])
    p.run_up_to()
    outs = [p(x, c, t) for x, c, t in zip(xs, cs, ts)]
    assert targets(p.gm)[CACHE_STORE] == 4  # two blocks, two streams
    offsets, refs = {}, []
    with torch.no_grad():
        for step, (x, c, t) in enumerate(zip(xs, cs, ts)):
            temb = model.embed(t)
            for i, block in enumerate(model.blocks):
                if step == 2:
                    xc, cc = block(x[1:], c[1:], temb[1:])
                    x, c = torch.cat([xc + offsets[i][0], xc]), torch.cat([cc + offsets[i][1], cc])
                else:
                    x, c = block(x, c, temb)
                    offsets[i] = (x[:1] - x[1:], c[:1] - c[1:])
            refs.append(model.head(x, c))
    for out, ref in zip(outs, refs):
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
