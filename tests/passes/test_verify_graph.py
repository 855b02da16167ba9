"""verify_graph: checks a rewritten graph's invariants, raises naming the node, changes nothing.

Invariants checked: one runtime token; every runtime effect (begin_step, cache_store,
update_indicator) takes the token; a cond's branches return as many outputs; no effect
inside a branch; every site annotated for reuse got its skip branch.
"""

from __future__ import annotations

import pytest

import ditopt
from ditopt.passes import GraphInvariantError, run_pipeline, verify_graph
from ditopt.passes.annotations import Role, annotate, graph_annotation
from synthetic import CACHE_STORE, COND, latents, make_dual_stack, make_stack, nested_plan, prepare, snapshot, timesteps

PLANS = {
    "fora-block": ditopt.presets.fora(interval=2, steps=4, level="block"),
    "fora-layer": ditopt.presets.fora(interval=2, steps=4, level="layer"),
    "first-block-cache": ditopt.presets.first_block_cache(0.1, steps=4),
    "nested": nested_plan(),
    "all-compute": ditopt.presets.all_compute(steps=4),
}


def rewritten(plan=PLANS["fora-block"], *, lower=False, model=None, inputs=None):
    model = model or make_stack(3)
    p = prepare(model, plan, inputs or [latents(1)[0], timesteps(1)[0]])
    p.run_up_to(eager=lower)
    return p


def first(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("lower", [False, True])
def test_rewritten_graphs_pass_and_are_not_changed(name, lower):
    p = rewritten(PLANS[name], lower=lower)
    before = snapshot(p.gm)

    assert not verify_graph(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before


def test_a_dual_stream_graph_passes():
    model = make_dual_stack(2)
    p = rewritten(model=model, inputs=[latents(1)[0], latents(1, seq=3)[0], timesteps(1)[0]])
    assert not verify_graph(p.gm, p.ctx).modified


@pytest.mark.parametrize("name", PLANS)
def test_debug_mode_verifies_after_every_pass(name, monkeypatch):
    monkeypatch.setenv("DITOPT_DEBUG", "1")
    p = prepare(make_stack(3), PLANS[name], [latents(1)[0], timesteps(1)[0]])
    report = run_pipeline(p.gm, p.ctx, p.compiled, inductor=False)
    assert [step for step, _ in report] == ["annotate_decisions", "coalesce_regions", "insert_step_tracking",
                                            "insert_observers",
                                            "insert_indicators", "insert_window_branches", "insert_cfg_sharing", "insert_partial",
                                            "insert_cache_ops", "insert_skip_branches", "lower_skip_branches"]


def test_an_effect_without_the_token_is_named():
    p = rewritten()
    store = first(p.gm, CACHE_STORE)
    timestep = next(n for n in p.gm.graph.find_nodes(op="placeholder") if n.name == "timestep")
    store.args = (timestep, *store.args[1:])

    with pytest.raises(GraphInvariantError, match="must mutate the graph's token") as err:
        verify_graph(p.gm, p.ctx)
    assert store.name in str(err.value)


def test_a_second_token_is_refused():
    p = rewritten()
    placeholders = list(p.gm.graph.find_nodes(op="placeholder"))
    with p.gm.graph.inserting_after(placeholders[-1]):
        extra = p.gm.graph.placeholder("another_token")
    annotate(extra, role=Role.TOKEN)

    with pytest.raises(GraphInvariantError, match="more than one runtime token"):
        verify_graph(p.gm, p.ctx)


def test_branches_returning_different_numbers_of_outputs_are_refused():
    p = rewritten()
    cond = first(p.gm, COND)
    reuse = getattr(p.gm, cond.args[2].target)
    output = next(iter(reuse.graph.find_nodes(op="output")))
    output.args = (output.args[0][:-1],)

    with pytest.raises(GraphInvariantError, match="outputs differ in number") as err:
        verify_graph(p.gm, p.ctx)
    assert cond.name in str(err.value)


def test_an_effect_inside_a_branch_is_refused():
    p = rewritten()
    compute = getattr(p.gm, first(p.gm, COND).args[1].target)
    some_input = next(iter(compute.graph.find_nodes(op="placeholder")))
    output = next(iter(compute.graph.find_nodes(op="output")))
    with compute.graph.inserting_before(output):
        compute.graph.call_function(CACHE_STORE, (some_input, some_input, some_input, 0, 0, "blocks.0", "x", False))

    with pytest.raises(GraphInvariantError, match="inside a skip branch"):
        verify_graph(p.gm, p.ctx)


def test_a_site_left_without_skip_branch_is_named():
    p = rewritten()
    graph_annotation(p.gm).skip_branches = {"blocks.1"}

    with pytest.raises(GraphInvariantError, match="blocks.2"):
        verify_graph(p.gm, p.ctx)


def test_idempotent():
    p = rewritten(PLANS["nested"], lower=True)
    before = snapshot(p.gm)
    assert not verify_graph(p.gm, p.ctx).modified
    assert not verify_graph(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before
