"""insert_cache_ops: a decision, cache loads and cache stores around each reusing site.

    before                          after (reuse_residual)
                                    pred = decide(token, rid, 0, "blocks.0", [1, 5, 8])
                                    r_old = cache_load(token, rid, 0, "blocks.0", "residual0", ...)
    add_5 = <blocks.0>(x)           add_5 = <blocks.0>(x)
                                    r = add_5 - x
                                    cache_store(token, r, pred, rid, 0, "blocks.0", "residual0", ...)
The graph still computes everything: outputs are unchanged until the skip-branch pass.
"""

from __future__ import annotations

import operator

import torch

import ditopt
from ditopt.passes import insert_cache_ops, insert_indicators
from ditopt.passes.annotations import node_annotation
from ditopt.sites import tensor_meta
from synthetic import (
    CACHE_LOAD, CACHE_STORE, COND, DECIDE, block_plan, eager, latents, make_dual_stack, make_stack, prepare, snapshot,
    targets, timesteps,
)

FORA = ditopt.presets.fora(interval=2, steps=4, level="block")


def setup(plan=FORA, model=None, inputs=None):
    model = model or make_stack(2)
    inputs = inputs or [latents(1)[0], timesteps(1)[0]]
    p = prepare(model, plan, inputs)
    p.run_up_to(insert_indicators)
    return model, p


def by_role(gm, role, site):
    return [n for n in gm.graph.nodes if node_annotation(n).role == role and node_annotation(n).site == site]


def test_each_site_gets_a_decision_a_load_and_a_store_around_its_region():
    _, p = setup()

    assert insert_cache_ops(p.gm, p.ctx).modified

    found = targets(p.gm)
    assert (found[DECIDE], found[CACHE_LOAD], found[CACHE_STORE], found[COND]) == (2, 2, 2, 0)
    order = {n.name: i for i, n in enumerate(p.gm.graph.nodes)}
    token = next(n for n in p.gm.graph.find_nodes(op="placeholder") if n.name == "ditopt_token")
    for site in ("blocks.0", "blocks.1"):
        [decide], [load], [residual], [store] = (by_role(p.gm, role, site)
                                                 for role in ("decide", "load", "residual", "store"))
        nodes = p.sites[site].nodes
        assert order[decide.name] < order[load.name] < min(order[n] for n in nodes)
        assert decide.args == (token, p.runtime.id, 0, site, [1, 5, 8], torch.device("cpu"))
        assert load.args[3:6] == (site, "residual0", [1, 5, 8])
        live_out, residual_input = p.sites[site].live_outs[0], p.sites[site].residual_inputs[0]
        assert residual.target is operator.sub
        assert [a.name for a in residual.args] == [live_out, residual_input]
        assert store.args[:3] == (token, residual, decide)
        assert store.args[5:7] == (site, "residual0")
        assert order[store.name] > max(order[n] for n in nodes)
        assert store.meta["nn_module_stack"]  # new nodes say where they came from
        assert node_annotation(residual).regions == (site,)  # computed only when the site is


def test_residual_nodes_carry_the_shape_of_their_live_out():
    """New nodes keep their value's metadata (STYLE.md, rule 5). On a ShapeProp'd graph
    (``compile_graph``) a node's shape is in ``tensor_meta``, not dynamo's ``example_value``."""
    _, p = setup()
    insert_cache_ops(p.gm, p.ctx)

    for site in ("blocks.0", "blocks.1"):
        [residual] = by_role(p.gm, "residual", site)
        assert tensor_meta(residual) == tensor_meta(residual.args[0]) == ((1, 5, 8), torch.float32)


def test_reuse_stores_the_output_itself():
    _, p = setup(block_plan(4, {1: ("reuse", [2])}))
    insert_cache_ops(p.gm, p.ctx)

    [store] = by_role(p.gm, "store", "blocks.1")
    assert store.args[1].name == p.sites["blocks.1"].live_outs[0]
    assert store.args[6] == "output0"
    assert by_role(p.gm, "residual", "blocks.1") == []
    assert targets(p.gm)[DECIDE] == 1  # blocks.0 computes at every step: nothing around it


def test_dual_stream_block_gets_one_load_and_store_per_live_out():
    model = make_dual_stack(1)
    x, c, t = latents(1)[0], latents(1, seq=3, seed=2)[0], timesteps(1)[0]
    _, p = setup(FORA, model, [x, c, t])
    insert_cache_ops(p.gm, p.ctx)

    assert [n.args[4] for n in by_role(p.gm, "load", "blocks.0")] == ["residual0", "residual1"]
    stores = by_role(p.gm, "store", "blocks.0")
    assert [n.args[6] for n in stores] == ["residual0", "residual1"]
    assert [[a.name for a in s.args[1].args] for s in stores] == [
        [out, inp] for out, inp in zip(p.sites["blocks.0"].live_outs, ["x", "context"])]


@torch.no_grad()
def test_graph_still_computes_everything_and_stores_the_true_residuals():
    model, p = setup()
    insert_cache_ops(p.gm, p.ctx)
    xs, ts = latents(4), timesteps(4)

    for step, (x, t) in enumerate(zip(xs, ts)):
        assert torch.equal(p(x, t)[0], eager(model, x, t)[0])  # even at the reuse steps
        temb = model.embed(t)
        h1 = model.blocks[0](x, temb)
        h2 = model.blocks[1](h1, temb)
        computed_at = step - step % 2  # FORA 2: the residuals of the last even step
        for site, residual in (("blocks.0", h1 - x), ("blocks.1", h2 - h1)):
            entry = p.runtime.store.latest((0, site, "residual0", 0))
            assert entry.step == computed_at
            if computed_at == step:
                assert torch.equal(entry.value, residual)
    assert p.runtime.decisions()["blocks.1"] == ["compute", "reuse_residual", "compute", "reuse_residual"]


def test_all_compute_plan_inserts_nothing():
    _, p = setup(ditopt.presets.all_compute(steps=4))
    before = snapshot(p.gm)

    assert not insert_cache_ops(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    found = targets(p.gm)
    assert (found[DECIDE], found[CACHE_LOAD], found[CACHE_STORE]) == (0, 0, 0)


def test_idempotent():
    _, p = setup(ditopt.presets.fora(interval=2, steps=4, level="layer"))
    assert insert_cache_ops(p.gm, p.ctx).modified
    before = snapshot(p.gm)

    assert not insert_cache_ops(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    assert targets(p.gm)[DECIDE] == 4  # attention and ff of both blocks


def test_a_static_predicate_lives_on_the_host_and_an_adaptive_one_on_the_models_device():
    """The branch is taken on the host: a static decision made on the GPU would cost a sync per
    site and call. Only a `when` rule's predicate, computed from device tensors, stays there."""
    for plan, expected in ((ditopt.presets.fora(2, 4, level="block"), torch.device("cpu")),
                           (ditopt.presets.first_block_cache(0.1, steps=4), torch.device("meta"))):
        p = prepare(make_stack(3), plan, [latents(1)[0], timesteps(1)[0]])
        p.ctx.device = torch.device("meta")  # stands for the model's accelerator; nothing runs
        p.run_up_to(insert_cache_ops)
        decides = [n for n in p.gm.graph.nodes if n.target is DECIDE]
        assert decides and {n.args[-1] for n in decides} == {expected}
        assert {n.meta["example_value"].device for n in decides} == {expected}
