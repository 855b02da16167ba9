"""lower_skip_branches: on the eager path each torch.cond becomes a plain Python branch.

    before                                        after
    cond = cond(pred, compute, reuse, ops)        cond = run_branch(pred, compute, reuse, ops)
Also inside branch subgraphs (nested sites).
"""

from __future__ import annotations

import torch

import ditopt
from ditopt.passes import insert_skip_branches, lower_skip_branches
from ditopt.runtime.ops import run_branch
from synthetic import (
    COND, COUNTS, NESTED_STEPS, HandCache, actions_of, block_plan, eager, hand_nested, latents, make_stack, nested_plan,
    prepare, snapshot, targets, timesteps,
)

STEPS = 4


def setup(plan, model=None):
    model = model or make_stack(2)
    p = prepare(model, plan, [latents(1)[0], timesteps(1)[0]])
    p.run_up_to(insert_skip_branches)
    return model, p


def test_every_cond_becomes_run_branch_also_nested():
    _, p = setup(nested_plan())
    conds = targets(p.gm, nested=True)[COND]
    assert conds == 2

    assert lower_skip_branches(p.gm, p.ctx).modified

    found = targets(p.gm, nested=True)
    assert found[COND] == 0
    assert found[run_branch] == conds
    assert targets(p.gm.ditopt_blocks_0_compute)[run_branch] == 1
    p.gm.recompile()  # passes edit graphs; run_pipeline regenerates the code once
    assert "run_branch" in p.gm.code and "higher_order.cond" not in p.gm.code


@torch.no_grad()
def test_lowered_graph_matches_the_hand_written_plan_and_skips_work():
    table = {0: ("reuse_residual", [1, 3]), 1: ("reuse", [1, 2])}
    model = make_stack(2, counting=True)
    _, p = setup(block_plan(STEPS, table), model)
    lower_skip_branches(p.gm, p.ctx)
    reference = HandCache(model, actions_of(table))

    ran = []
    for step, (x, t) in enumerate(zip(latents(STEPS), timesteps(STEPS))):
        expected = reference(step, 0, x, timestep=t)[0]
        COUNTS.clear()
        torch.testing.assert_close(p(x, t)[0], expected, rtol=0, atol=1e-6)
        ran.append(sorted(COUNTS.elements()))
    assert ran == [[0, 1], [], [0], [1]]


def test_lowered_nested_sites_match_the_hand_written_plan():
    model, p = setup(nested_plan("reuse"))
    lower_skip_branches(p.gm, p.ctx)
    xs, ts = latents(NESTED_STEPS), timesteps(NESTED_STEPS)

    for x, t, want in zip(xs, ts, hand_nested(model, xs, ts, "reuse")):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-6)

    decisions = p.runtime.decisions()
    assert decisions["blocks.0"] == ["compute", "compute", "reuse_residual", "compute"]
    assert decisions["blocks.0.attn"] == ["compute", "reuse", "skipped", "reuse"]
    assert decisions["blocks.0.ff"] == ["compute", "compute", "skipped", "compute"]


def test_nested_sites_match_whatever_order_the_plan_names_them_in():
    """The inner site's rule first: the passes still rewrite the outer region around it."""
    plan = nested_plan("reuse")
    inner_first = ditopt.Plan(steps=plan.steps, rules=list(reversed(plan.rules)))
    model, p = setup(inner_first)
    lower_skip_branches(p.gm, p.ctx)
    xs, ts = latents(NESTED_STEPS), timesteps(NESTED_STEPS)
    for x, t, want in zip(xs, ts, hand_nested(model, xs, ts, "reuse")):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-6)
    assert p.runtime.decisions()["blocks.0.attn"] == ["compute", "reuse", "skipped", "reuse"]


def test_graph_without_cond_is_left_alone():
    model, p = setup(ditopt.presets.all_compute(steps=STEPS))
    before = snapshot(p.gm)

    assert not lower_skip_branches(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    x, t = latents(1)[0], timesteps(1)[0]
    assert torch.equal(p(x, t)[0], eager(model, x, t)[0])


def test_idempotent():
    _, p = setup(ditopt.presets.fora(interval=2, steps=STEPS, level="layer"))
    assert lower_skip_branches(p.gm, p.ctx).modified
    before = snapshot(p.gm)

    assert not lower_skip_branches(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
