"""insert_step_tracking: a runtime token input and one begin_step at the top of the graph.

    before                          after
    x = placeholder                 x = placeholder
    timestep = placeholder          timestep = placeholder
                                    ditopt_token = placeholder
                                    begin_step(ditopt_token, timestep, rid, 0)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ditopt
from ditopt.errors import CaptureError
from ditopt.passes import insert_step_tracking
from ditopt.passes.annotations import Role, node_annotation
from synthetic import BEGIN_STEP, Block, eager, latents, make_stack, prepare, snapshot, targets, timesteps

FORA = ditopt.presets.fora(interval=2, steps=4, level="block")


def setup(plan=FORA, model=None):
    model = model or make_stack(2)
    x, t = latents(1)[0], timesteps(1)[0]
    p = prepare(model, plan, [x, t])
    p.annotate()
    return model, x, p


def test_appends_a_token_and_begins_the_step_before_any_work():
    _, _, p = setup()

    assert insert_step_tracking(p.gm, p.ctx).modified

    placeholders = list(p.gm.graph.find_nodes(op="placeholder"))
    assert [n.name for n in placeholders] == ["x", "timestep", "ditopt_token"]
    token = placeholders[-1]
    assert node_annotation(token).role is Role.TOKEN
    assert targets(p.gm)[BEGIN_STEP] == 1
    begin = token.next
    assert begin.target is BEGIN_STEP
    assert begin.args == (token, placeholders[1], p.runtime.id, 0)


def test_graph_computes_like_eager_and_the_runtime_counts_steps_and_branches():
    model, _, p = setup()
    insert_step_tracking(p.gm, p.ctx)
    ts = timesteps(3)
    xs = latents(7)
    calls = [ts[0], ts[0], ts[1], ts[1], ts[2], ts[0], ts[1]]  # 2 CFG branches, then a new generation

    for x, t in zip(xs, calls):
        assert torch.equal(p(x, t)[0], eager(model, x, t)[0])

    state = p.runtime.state
    assert (state.step, state.branch, state.generation) == (1, 0, 1)
    assert [(r.step, r.branch) for r in p.runtime.records] == [(0, 0), (1, 0)]  # the last generation


def test_all_compute_plan_still_tracks_steps():
    _, x, p = setup(ditopt.presets.all_compute(steps=4))
    assert insert_step_tracking(p.gm, p.ctx).modified
    for t in timesteps(3):
        p(x, t)
    assert p.runtime.state.step == 2


def test_does_not_fire_before_annotation():
    model = make_stack(2)
    x, t = latents(1)[0], timesteps(1)[0]
    p = prepare(model, FORA, [x, t])
    before = snapshot(p.gm)

    assert not insert_step_tracking(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
    assert targets(p.gm)[BEGIN_STEP] == 0


def test_a_graph_without_the_timestep_input_is_refused():
    class NoTimestep(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(8)])

        def forward(self, x, temb):
            return self.blocks[0](x, temb)

    model = NoTimestep().eval()
    x, temb = latents(1)[0], torch.randn(1, 8)
    p = prepare(model, FORA, [x, temb])
    p.annotate()

    with pytest.raises(CaptureError, match="'timestep'"):
        insert_step_tracking(p.gm, p.ctx)

    p.ctx.timestep = "temb"  # named explicitly, any tensor input can carry the timestep
    assert insert_step_tracking(p.gm, p.ctx).modified


def test_idempotent():
    _, _, p = setup()
    assert insert_step_tracking(p.gm, p.ctx).modified
    before = snapshot(p.gm)

    assert not insert_step_tracking(p.gm, p.ctx).modified

    assert snapshot(p.gm) == before
