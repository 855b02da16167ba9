"""insert_window_branches with a per-axis window, on a synthetic DiT whose tokens come from a
conv2d patch embedding (the grid is read from the graph: conv -> flatten -> transpose -> stack).

    before                   after (window: [height, width])
    o = sdpa(q, k, v)        full = decide(...); keep = window_residual(...); r_old = cache_load(..., "window0")
                             a = cond(full, sdpa(q, k, v), grid_window_attention(q, k, v, (h, w), grid, 0) + r_old)[0]
                             r = cond(keep, a - grid_window_attention(q, k, v, (h, w), grid, 0), empty)[0]
                             cache_store(token, r, keep, ..., "window0")

The reference (:func:`hand_grid_window`) patches SDPA in the eager model and uses the dense mask
(``grid_window_mask``) with the grid written here from the model's shapes, not read from a graph.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import ditopt
from ditopt import PlanError
from ditopt.passes import insert_indicators, insert_skip_branches, insert_window_branches, verify_graph
from ditopt.runtime.window_attention import grid_window_attention, grid_window_mask, window_attention
from ditopt.passes.pass_base import PassContext
from ditopt.runtime import Runtime
from synthetic import COND, SDPA, Prepared, Stack, eager, snapshot, targets, timesteps

STEPS = 4
GRID = (6, 8)  # 12 x 16 pixels, patch 2
DIM = 8


class HeadsAttention(nn.Module):
    """Self-attention with two heads: queries, keys and values ``[batch, heads, tokens, dim]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (f(x).unflatten(-1, (2, -1)).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class PatchStack(Stack):
    """A DiT on an image: conv2d patch embedding, the synthetic blocks with two-head attention."""

    def __init__(self, depth: int = 2, dim: int = DIM):
        super().__init__(depth, dim)
        self.patch = nn.Conv2d(4, dim, 2, stride=2)
        for block in self.blocks:
            block.attn = HeadsAttention(dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = self.embed(timestep)
        h = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h)


def model_and_inputs():
    torch.manual_seed(0)
    model = PatchStack().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 4, 2 * GRID[0], 2 * GRID[1], generator=g) for _ in range(STEPS)]
    return model, xs, timesteps(STEPS)


def axes_plan(window, steps=(1, 2), sites="*") -> ditopt.Plan:
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [
        {"sites": sites, "kind": "attention", "attention": "self", "steps": list(steps), "action": "window",
         "window": window}]})


class FunctionalTracer(fx.Tracer):
    """Traces through every module (linears, norms, the conv become functions), as dynamo's graph
    has them: the token flow follows functions, not module calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False


def prepare(model: nn.Module, plan: ditopt.Plan, inputs) -> Prepared:
    """``synthetic.prepare`` with the functional trace."""
    tracer = FunctionalTracer()
    gm = fx.GraphModule(model, tracer.trace(model))
    ShapeProp(gm).propagate(*inputs)
    sites = ditopt.find_sites(gm.graph)
    runtime = Runtime()
    ctx = PassContext(sites=sites, runtime_id=runtime.id, graph_id=0, coalesce=False)
    return Prepared(gm, sites, plan.compile(sites), ctx, runtime)


def rewritten(plan, last=insert_skip_branches):
    model, xs, ts = model_and_inputs()
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to(last)
    return p


@contextlib.contextmanager
def hand_grid_window(window, step: int, window_steps, residuals: dict):
    """Every self-attention SDPA call of the eager model windowed by hand at ``window_steps``: the
    dense masked window over ``GRID`` plus the residual of the last full step, by call index."""
    real = F.scaled_dot_product_attention
    calls = itertools.count()

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        full = real(q, k, v, scale=scale)
        i = next(calls)
        dense = real(q, k, v, attn_mask=grid_window_mask(q.shape[-2], window, GRID), scale=scale)
        if step in window_steps:
            return dense + residuals[i]
        residuals[i] = full - dense
        return full

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def test_each_sdpa_call_gets_the_grid_kernel_with_the_grid_read_from_the_graph():
    p = rewritten(axes_plan({"height": 2, "width": 4}, sites="blocks.0.attn"))
    found = targets(p.gm)
    assert found[COND] == 2 and found[SDPA] == 1  # blocks.1's attention is untouched
    attention, residual = (n for n in p.gm.graph.nodes if n.target is COND)
    full, window = (getattr(p.gm, fn.target) for fn in attention.args[1:3])
    keep = getattr(p.gm, residual.args[1].target)
    assert targets(full)[SDPA] == 1 and targets(full)[grid_window_attention] == 0
    for branch in (window, keep):
        call = next(n for n in branch.graph.nodes if n.target is grid_window_attention)
        assert call.args[3:] == ((2, 4), GRID, 0)  # window, grid (height, width), offset
        assert targets(branch)[window_attention] == 0 and targets(branch)[SDPA] == 0
    assert not verify_graph(p.gm, p.ctx).modified


def test_a_window_in_tokens_keeps_the_sequence_kernel():
    p = rewritten(axes_plan(8, sites="blocks.0.attn"))
    attention = next(n for n in p.gm.graph.nodes if n.target is COND)
    window = getattr(p.gm, attention.args[2].target)
    assert targets(window)[window_attention] == 1 and targets(window)[grid_window_attention] == 0


def test_a_plan_without_window_rules_leaves_the_graph_alone():
    p = rewritten(ditopt.presets.fora(interval=2, steps=STEPS, level="layer"), last=insert_indicators)
    before = snapshot(p.gm)
    assert not insert_window_branches(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before


def test_running_the_pass_twice_changes_nothing():
    p = rewritten(axes_plan([2, 4]), last=insert_window_branches)
    before = snapshot(p.gm)
    assert not insert_window_branches(p.gm, p.ctx).modified
    assert snapshot(p.gm) == before


def test_a_window_with_the_wrong_number_of_axes_is_refused_before_any_rewrite():
    model, xs, ts = model_and_inputs()
    p = prepare(model, axes_plan([1, 2, 4]), [xs[0], ts[0]])
    with pytest.raises(PlanError, match=r"window \[1, 2, 4\] has 3 axes; the token grid .* has 2: \[6, 8\]") as err:
        p.run_up_to(insert_window_branches)
    assert err.value.site == "blocks.0.attn"
    assert targets(p.gm)[COND] == 0


def test_a_graph_without_a_patch_embedding_is_refused_naming_the_site():
    from synthetic import latents, make_stack

    p = prepare(make_stack(2), axes_plan([2, 4], sites="blocks.1.attn"), [latents(1, seq=12)[0], timesteps(1)[0]])
    with pytest.raises(PlanError, match="no conv2d/conv3d before the block stack") as err:
        p.run_up_to(insert_window_branches)
    assert err.value.site == "blocks.1.attn"


def run(plan):
    model, xs, ts = model_and_inputs()
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to()
    return model, xs, ts, [p(x, t)[0] for x, t in zip(xs, ts)], p


@pytest.mark.parametrize("window", [[2, 4], [3, 3], [1, 8]])
def test_a_small_window_equals_the_hand_written_residual_sharing(window):
    window_steps = (1, 2)
    model, xs, ts, outs, p = run(axes_plan(window, window_steps))
    residuals = {}
    for step, (out, x, t) in enumerate(zip(outs, xs, ts)):
        with hand_grid_window(window, step, window_steps, residuals):
            ref = eager(model, x, t)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        if step in window_steps:  # and it is not full attention
            assert (out - eager(model, x, t)[0]).abs().max() > 1e-4
    assert p.runtime.decisions()["blocks.1.attn"] == ["compute", "window", "window", "compute"]


def test_a_window_covering_the_grid_equals_the_model():
    model, xs, ts, outs, _ = run(axes_plan(list(GRID)))
    for out, x, t in zip(outs, xs, ts):
        assert torch.equal(out, eager(model, x, t)[0])


class ChunkAttention(HeadsAttention):
    """Queries, keys and values cut from one projection: under ShapeProp the cut (a tuple) has no
    traced value, so the token flow cannot follow it."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_a_node_the_token_flow_cannot_follow_is_a_plan_error_naming_it():
    model, xs, ts = model_and_inputs()
    model.blocks[0].attn = ChunkAttention(DIM)
    p = prepare(model, axes_plan([2, 4], sites="blocks.0.attn"), [xs[0], ts[0]])
    with pytest.raises(PlanError, match=r"cannot be followed past node chunk.*cannot follow it \(TypeError") as err:
        p.run_up_to(insert_window_branches)
    assert err.value.site == "blocks.0.attn"
