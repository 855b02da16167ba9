"""insert_indicators: feed a watched site's output to its ``when`` rule.

    before                          after (First-Block-Cache watching blocks.0)
    add_5 = <blocks.0>              add_5 = <blocks.0>
                                    update_indicator(token, add_5, rid, 0, 0)
"""

from __future__ import annotations

import pytest
import torch

import ditopt
from ditopt.passes import (
    insert_cache_ops, insert_indicators, insert_skip_branches, insert_step_tracking, lower_skip_branches,
)
from ditopt.passes.annotations import Role, node_annotation
from synthetic import UPDATE_INDICATOR, eager, make_stack, prepare, snapshot, targets, timesteps

STEPS = 6


def slowly_changing_inputs(n=STEPS, seed=1, rate=0.01):
    g = torch.Generator().manual_seed(seed)
    base, drift = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    return [base + rate * i * drift for i in range(n)]


def setup(plan, depth=3):
    model = make_stack(depth)
    xs, ts = slowly_changing_inputs(), timesteps(STEPS)
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to(insert_step_tracking)
    return model, xs, ts, p


@torch.no_grad()
def hand_first_block_cache(model, calls, threshold):
    """blocks.0 always runs; the rest reuse their residuals while the relative L1 change of
    blocks.0's output, summed since the last computing step, stays below ``threshold``.
    ``calls`` are ``(x, timestep, CFG branch)``; each branch keeps its own history."""
    state, outs, reused = {}, [], []
    for x, t, branch in calls:
        previous, accumulated, residuals = state.get(branch, (None, 0.0, {}))
        temb = model.embed(t)
        h = model.blocks[0](x, temb)
        reuse = False
        if previous is not None:
            accumulated += ((h - previous).abs().mean() / previous.abs().mean()).item()
            reuse = accumulated < threshold
            accumulated = accumulated if reuse else 0.0
        previous = h
        for i, block in enumerate(model.blocks[1:], start=1):
            if reuse:
                h = h + residuals[i]
            else:
                out = block(h, temb)
                residuals[i], h = out - h, out
        state[branch] = (previous, accumulated, residuals)
        reused.append(reuse)
        outs.append(model.head(h))
    return outs, reused


def run_all_passes(p):
    for later in (insert_indicators, insert_cache_ops, insert_skip_branches, lower_skip_branches):
        later(p.gm, p.ctx)


def test_inserts_one_update_right_after_the_watched_output():
    _, _, _, p = setup(ditopt.presets.first_block_cache(0.1, steps=STEPS))

    assert insert_indicators(p.gm, p.ctx).modified

    assert targets(p.gm)[UPDATE_INDICATOR] == 1
    watched = next(n for n in p.gm.graph.nodes if n.name == p.sites["blocks.0"].live_outs[0])
    update = watched.next
    token = next(n for n in p.gm.graph.find_nodes(op="placeholder") if n.name == "ditopt_token")
    assert update.target is UPDATE_INDICATOR
    assert update.args == (token, watched, p.runtime.id, 0, 0)
    assert node_annotation(update).role is Role.INDICATOR
    assert update.meta["nn_module_stack"] == watched.meta["nn_module_stack"]


def test_graph_still_computes_like_eager():
    model, xs, ts, p = setup(ditopt.presets.first_block_cache(0.1, steps=STEPS))
    insert_indicators(p.gm, p.ctx)
    for x, t in zip(xs, ts):
        assert torch.equal(p(x, t)[0], eager(model, x, t)[0])


@pytest.mark.parametrize("threshold", [1e-9, 0.03, 0.2])
def test_full_pipeline_reuses_exactly_where_the_indicator_says(threshold):
    model, xs, ts, p = setup(ditopt.presets.first_block_cache(threshold, steps=STEPS))
    run_all_passes(p)
    expected, reused = hand_first_block_cache(model, [(x, t, 0) for x, t in zip(xs, ts)], threshold)

    for x, t, want in zip(xs, ts, expected):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-6)

    assert p.runtime.decisions()["blocks.2"] == ["reuse_residual" if r else "compute" for r in reused]
    assert p.runtime.decisions()["blocks.0"] == ["compute"] * STEPS
    if threshold == 0.03:
        assert 0 < sum(reused) < STEPS - 1  # both decisions happen: the threshold matters


def test_cfg_branches_keep_separate_indicators():
    model, xs, ts, p = setup(ditopt.presets.first_block_cache(0.05, steps=STEPS))
    run_all_passes(p)
    uncond = slowly_changing_inputs(seed=2, rate=0.1)  # changes faster: reuses less
    calls = [(x, t, branch) for x_cond, x_uncond, t in zip(xs, uncond, ts)
             for branch, x in enumerate((x_cond, x_uncond))]
    expected, reused = hand_first_block_cache(model, calls, 0.05)

    for (x, t, _), want in zip(calls, expected):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-6)

    assert reused[0::2] != reused[1::2]  # the branches decide differently: their indicators are apart
    assert p.runtime.decisions()["blocks.1"] == ["reuse_residual" if r else "compute" for r in reused]


def test_static_plan_has_no_indicator():
    _, _, _, p = setup(ditopt.presets.fora(interval=2, steps=STEPS, level="block"))
    before = snapshot(p.gm)

    assert not insert_indicators(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    assert targets(p.gm)[UPDATE_INDICATOR] == 0


def test_idempotent():
    _, _, _, p = setup(ditopt.presets.first_block_cache(0.1, steps=STEPS))
    assert insert_indicators(p.gm, p.ctx).modified
    before = snapshot(p.gm)

    assert not insert_indicators(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
