"""annotate_decisions: the one pass that reads the plan; it adds annotations, never nodes.

    before                          after (FORA, block level)
    add_5 = x + ff(...)             add_5 = x + ff(...)        node_annotation(add_5).regions == ("blocks.0",)
                                    graph_annotation(gm).rewrites["blocks.0"].slot == "residual"
"""

from __future__ import annotations

import torch

import ditopt
from ditopt.passes.annotations import graph_annotation, node_annotation
from synthetic import eager, latents, make_stack, prepare, snapshot, timesteps


def regions(gm):
    return {n.name: list(node_annotation(n).regions) for n in gm.graph.nodes if node_annotation(n).regions}


def setup(plan, depth=2):
    model = make_stack(depth)
    x, t = latents(1)[0], timesteps(1)[0]
    return model, x, t, prepare(model, plan, [x, t])


def test_marks_exactly_the_nodes_of_each_reusing_site():
    _, _, _, p = setup(ditopt.presets.fora(interval=2, steps=4, level="block"))
    nodes_before = [n.name for n in p.gm.graph.nodes]

    assert p.annotate().modified

    assert [n.name for n in p.gm.graph.nodes] == nodes_before  # annotations only
    marked = regions(p.gm)
    for block in ("blocks.0", "blocks.1"):
        assert {n for n, r in marked.items() if block in r} == set(p.sites[block].nodes)
    assert all(len(r) == 1 for r in marked.values())  # attention/ff sites do not reuse here
    assert not any(n.startswith(("t_embed", "norm_out", "proj_out")) for n in marked)

    info = graph_annotation(p.gm).rewrites
    assert sorted(info) == ["blocks.0", "blocks.1"]
    assert (info["blocks.0"].slot, info["blocks.0"].depth) == ("residual", 0)
    assert info["blocks.0"].schedule == info["blocks.1"].schedule  # FORA: both blocks decide alike
    assert info["blocks.0"].schedule[0] == tuple(p.compiled.actions["blocks.0"])
    assert p.ctx.sites["blocks.0"].residual_inputs == ("x",)  # the site table is the one source of site facts
    assert p.ctx.sites["blocks.1"].residual_inputs == p.sites["blocks.0"].live_outs
    assert not any(isinstance(v, ditopt.DecisionTable) for v in vars(graph_annotation(p.gm)).values())
    decisions = p.compiled  # the table goes to the runtime; the graph keeps no copy of it
    assert decisions.actions["blocks.0"] == ["compute", "reuse_residual", "compute", "reuse_residual"]
    assert decisions.parents["blocks.0.attn"] == ["blocks.0", "stack", "output"]


def test_nested_sites_carry_both_regions_and_their_depth():
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [
        {"sites": "blocks.0", "kind": "block", "steps": [2], "action": "reuse_residual"},
        {"sites": "blocks.0.attn", "steps": [1, 3], "action": "reuse"},
    ]})
    _, _, _, p = setup(plan)
    p.annotate()

    marked = regions(p.gm)
    assert {n for n, r in marked.items() if r == ["blocks.0", "blocks.0.attn"]} == set(p.sites["blocks.0.attn"].nodes)
    info = graph_annotation(p.gm).rewrites
    assert (info["blocks.0"].depth, info["blocks.0.attn"].depth) == (0, 1)
    assert (info["blocks.0"].slot, info["blocks.0.attn"].slot) == ("residual", "output")


def test_watches_the_first_live_out_of_a_when_site():
    _, _, _, p = setup(ditopt.presets.first_block_cache(0.1, steps=4), depth=3)
    p.annotate()

    watched = [n for n in p.gm.graph.nodes if node_annotation(n).watch]
    assert [n.name for n in watched] == [p.sites["blocks.0"].live_outs[0]]
    assert node_annotation(watched[0]).watch == (0,)
    marked = regions(p.gm)
    assert not set(p.sites["blocks.0"].nodes) & set(marked)  # the watched block itself always computes
    assert sorted({r for rs in marked.values() for r in rs}) == ["blocks.1", "blocks.2"]
    assert p.compiled.when_rules == [("blocks.0", 0.1)]


def test_annotated_graph_computes_like_eager():
    model, x, t, p = setup(ditopt.presets.fora(interval=2, steps=4, level="block"))
    p.annotate()
    with torch.no_grad():
        assert torch.equal(p.gm(x, t), eager(model, x, t)[0])


def test_all_compute_plan_marks_nothing():
    _, _, _, p = setup(ditopt.presets.all_compute(steps=4))
    before = snapshot(p.gm)

    assert not p.annotate().modified

    assert regions(p.gm) == {}
    assert graph_annotation(p.gm).rewrites == {}
    assert p.compiled.actions == {}
    assert snapshot(p.gm) == before


def test_idempotent():
    _, _, _, p = setup(ditopt.presets.fora(interval=2, steps=4, level="layer"))
    assert p.annotate().modified
    before = (snapshot(p.gm), regions(p.gm), repr(graph_annotation(p.gm).rewrites))

    assert not p.annotate().modified

    assert (snapshot(p.gm), regions(p.gm), repr(graph_annotation(p.gm).rewrites)) == before
