"""coalesce_regions: a run of adjacent blocks that decide alike becomes one region.

    before (FORA-2, block level)                after
    regions: blocks.0 | blocks.1 | blocks.2      regions: blocks.0 for all three blocks' nodes
    rewrites: blocks.0, blocks.1, blocks.2       rewrites: blocks.0; coalesced {blocks.0: (blocks.0, .1, .2)}
then one decision, one cache load/store and one cond for the run, one cached residual per branch.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import ditopt
from ditopt.backend import compile_graph
from ditopt.passes import coalesce_regions, insert_skip_branches
from ditopt.passes.annotations import graph_annotation, node_annotation
from synthetic import (CACHE_STORE, COND, DECIDE, HandCache, actions_of, block_plan, latents, make_dual_stack,
                       make_stack, prepare, snapshot, targets, timesteps)

FORA_BLOCK = ditopt.presets.fora(2, 4, level="block")


def annotated(plan, model=None, *, coalesce=True):
    model = model or make_stack(3)
    p = prepare(model, plan, [latents(1)[0], timesteps(1)[0]], coalesce=coalesce)
    p.annotate()
    return p


def test_a_run_of_blocks_with_one_schedule_becomes_one_region():
    p = annotated(FORA_BLOCK)

    assert coalesce_regions(p.gm, p.ctx).modified

    ga = graph_annotation(p.gm)
    assert ga.coalesced == {"blocks.0": ("blocks.0", "blocks.1", "blocks.2")}
    assert sorted(ga.rewrites) == ["blocks.0"]
    run_nodes = {n for b in ("blocks.0", "blocks.1", "blocks.2") for n in p.sites[b].nodes}
    assert {n.name for n in p.gm.graph.nodes if "blocks.0" in node_annotation(n).regions} == run_nodes
    assert not any({"blocks.1", "blocks.2"} & set(node_annotation(n).regions) for n in p.gm.graph.nodes)
    merged = p.ctx.sites["blocks.0"]
    assert merged.residual_inputs == p.sites["blocks.0"].residual_inputs
    assert merged.live_outs == p.sites["blocks.2"].live_outs


def test_the_rewritten_run_has_one_decision_one_store_and_one_cond():
    p = annotated(FORA_BLOCK)
    p.run_up_to(insert_skip_branches, eager=False)
    found = targets(p.gm)
    assert (found[DECIDE], found[CACHE_STORE], found[COND]) == (1, 1, 1)


def test_outputs_match_the_uncoalesced_plan_and_the_hand_written_one_with_a_third_of_the_cache():
    model = make_stack(3)
    steps = 6
    xs, ts = latents(2 * steps), timesteps(steps)
    plan = ditopt.presets.fora(2, steps, level="block")
    run, backend = compile_graph(fx.symbolic_trace(model), plan, [xs[0], ts[0]])
    run_apart, apart = compile_graph(fx.symbolic_trace(model), plan, [xs[0], ts[0]], coalesce=False)
    reference = HandCache(model, actions_of({i: ("reuse_residual", [1, 3, 5]) for i in range(3)}))
    for step, t in enumerate(ts):
        for branch in range(2):
            x = xs[2 * step + branch]
            got = run(x, t)[0]
            torch.testing.assert_close(got, run_apart(x, t)[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got, reference(step, branch, x, timestep=t)[0], rtol=1e-5, atol=1e-6)
    assert backend.runtime.store.nbytes * 3 == apart.runtime.store.nbytes == 3 * 2 * xs[0].numel() * 4
    assert backend.runtime.decisions() == apart.runtime.decisions()  # each block still reported


def test_an_adaptive_rule_coalesces_the_blocks_after_the_watched_one():
    p = annotated(ditopt.presets.first_block_cache(0.1, steps=4), make_stack(4))
    coalesce_regions(p.gm, p.ctx)
    assert graph_annotation(p.gm).coalesced == {"blocks.1": ("blocks.1", "blocks.2", "blocks.3")}


def test_dual_stream_blocks_coalesce_both_streams():
    model = make_dual_stack(3)
    p = prepare(model, FORA_BLOCK, [latents(1)[0], latents(1, seq=3, seed=5)[0], timesteps(1)[0]], coalesce=True)
    p.annotate()
    assert coalesce_regions(p.gm, p.ctx).modified
    assert p.ctx.sites["blocks.0"].live_outs == p.sites["blocks.2"].live_outs
    assert len(p.ctx.sites["blocks.0"].live_outs) == 2


def test_does_not_fire_across_different_schedules_nor_when_turned_off():
    different = block_plan(4, {0: ("reuse_residual", [1]), 1: ("reuse_residual", [2]), 2: ("reuse_residual", [1])})
    p = annotated(different)
    before = snapshot(p.gm)
    assert not coalesce_regions(p.gm, p.ctx).modified
    assert graph_annotation(p.gm).coalesced == {} and snapshot(p.gm) == before

    off = annotated(FORA_BLOCK, coalesce=False)
    assert not coalesce_regions(off.gm, off.ctx).modified
    assert sorted(graph_annotation(off.gm).rewrites) == ["blocks.0", "blocks.1", "blocks.2"]


def test_does_not_fire_on_a_block_with_a_rewritten_site_inside():
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [
        {"sites": "blocks.*", "kind": "block", "steps": [2], "action": "reuse_residual"},
        {"sites": "blocks.1.attn", "steps": [1, 3], "action": "reuse"}]})
    p = annotated(plan)
    coalesce_regions(p.gm, p.ctx)
    assert graph_annotation(p.gm).coalesced == {}  # blocks.1 holds a rewritten site: the run breaks there


def test_idempotent():
    p = annotated(FORA_BLOCK)
    assert coalesce_regions(p.gm, p.ctx).modified
    state = (snapshot(p.gm), dict(graph_annotation(p.gm).coalesced), sorted(graph_annotation(p.gm).rewrites))
    assert not coalesce_regions(p.gm, p.ctx).modified
    assert (snapshot(p.gm), dict(graph_annotation(p.gm).coalesced), sorted(graph_annotation(p.gm).rewrites)) == state
