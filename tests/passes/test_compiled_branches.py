"""What torch.cond demands of the skip branches once they are compiled, one cause per test, each on
a synthetic graph that reproduces it. The rewritten graph is traced by dynamo and AOT autograd
(``backend="aot_eager"``: the checks torch.cond makes, without inductor's code generation).

1. Both branches must return outputs of one stride order: a block whose input is a transposed
   view (a patch embedding's ``flatten(2).transpose(1, 2)``) returns ``main + residual`` in that
   layout when it reuses, and a contiguous tensor when it computes.
2. A branch must not return (a view of) its input: a block that passes a stream through.
3. A custom op's fake kernel must promise the strides the real op returns: ``cache_load`` of a
   residual that was cached in a transposed layout.
4. Operands inductor could lay out anew are pinned to the strides the branches were traced with.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

import ditopt
from ditopt.runtime import Runtime
from synthetic import Attention, FeedForward, latents, make_stack, prepare, timesteps

STEPS = 4
FORCE_STRIDE = "inductor_force_stride_order"
skip_branches = sys.modules["ditopt.passes.insert_skip_branches"]


class TransposedInput(nn.Module):
    """A stack whose blocks start from a transposed view, as after a patch embedding."""

    def __init__(self):
        super().__init__()
        self.stack = make_stack(2)

    def forward(self, x, timestep):
        temb = self.stack.embed(timestep)
        h = x.transpose(1, 2)
        for block in self.stack.blocks:
            h = block(h, temb)
        return self.stack.head(h)


class PassThroughBlock(nn.Module):
    """Updates ``x``; returns ``context`` as a view of what it was given."""

    def __init__(self, dim=8):
        super().__init__()
        self.attn = Attention(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn(x)
        return x + self.ff(x), context.view(context.shape)


class PassThrough(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(PassThroughBlock() for _ in range(2))

    def forward(self, x, context, timestep):
        for block in self.blocks:
            x, context = block(x, context)
        return x + context.mean(1, keepdim=True)


def run_compiled(p, inputs_per_step):
    """The rewritten graph through dynamo + AOT autograd, one call per step."""
    p.runtime.set_graph(0, p.compiled)
    p.gm.recompile()  # the passes edit graphs; run_pipeline regenerates the code once, as here
    fn = torch.compile(p.gm, backend="aot_eager", fullgraph=True, dynamic=False)
    token = torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        return [fn(*inputs, token) for inputs in inputs_per_step]


def run_eager_path(model, plan, inputs_per_step):
    p = prepare(model, plan, list(inputs_per_step[0]))
    p.run_up_to()
    return [p(*inputs)[0] for inputs in inputs_per_step]


def test_a_block_on_a_transposed_input_compiles_and_matches_the_eager_path():
    model = TransposedInput()
    inputs = [(torch.randn(1, 8, 5), t) for t in timesteps(STEPS)]
    plan = ditopt.presets.fora(2, STEPS, level="block")
    p = prepare(model, plan, list(inputs[0]), inductor=True)
    p.run_up_to(eager=False)

    got = run_compiled(p, inputs)

    for a, b in zip(got, run_eager_path(model, plan, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert p.runtime.decisions()["stack.blocks.1"] == ["compute", "reuse_residual"] * 2
    reuse = p.gm.ditopt_stack_blocks_0_reuse
    returned = list(reuse.graph.find_nodes(op="output"))[0].args[0]
    assert all(n.target == "contiguous" for n in returned if n.op == "call_method")  # one layout for both


def test_without_the_layout_match_the_same_graph_is_refused(monkeypatch):
    """The test above fails for the reason it names when the reuse branch keeps its input's layout."""
    original = skip_branches._reuse_graph
    monkeypatch.setattr(skip_branches, "_reuse_graph", lambda *a, contiguous: original(*a, contiguous=False))
    model = TransposedInput()
    inputs = [(torch.randn(1, 8, 5), t) for t in timesteps(STEPS)]
    p = prepare(model, ditopt.presets.fora(2, STEPS, level="block"), list(inputs[0]), inductor=True)
    p.run_up_to(eager=False)
    with pytest.raises(Exception, match="stride"):
        run_compiled(p, inputs)


def test_a_branch_never_returns_its_own_input():
    model = PassThrough()
    xs, cs = latents(STEPS), latents(STEPS, seq=3, seed=7)
    inputs = list(zip(xs, cs, timesteps(STEPS)))
    plan = ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [
        {"sites": "blocks.*", "kind": "block", "steps": [1, 3], "action": "reuse"}]})
    p = prepare(model, plan, list(inputs[0]), inductor=True)
    p.run_up_to(eager=False)

    got = run_compiled(p, inputs)

    for a, b in zip(got, run_eager_path(model, plan, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compute = p.gm.ditopt_blocks_0_compute
    returned = list(compute.graph.find_nodes(op="output"))[0].args[0]
    dense_copy = torch.ops.ditopt.dense_copy.default  # under inductor a view is copied by an op it keeps
    assert returned[1].target is dense_copy and returned[1].args[0].target == "view"


def test_cache_load_returns_the_layout_its_fake_kernel_promises():
    rt = Runtime()
    rt.set_graph(0, ditopt.DecisionTable(steps=2, actions={}, adaptive={}, slots={}))
    rt.begin(999.0, 0)
    transposed = torch.randn(1, 8, 5).transpose(1, 2)  # cached as computed: not contiguous
    rt.store.put(rt.key(0, "blocks.0", "residual0"), 0, transposed)
    token = torch.zeros(1, dtype=torch.int64)
    for copy in (False, True):
        args = (token, rt.id, 0, "blocks.0", "residual0", [1, 5, 8], torch.float32, copy)
        out = torch.ops.ditopt.cache_load.default(*args)
        assert out.is_contiguous() and torch.equal(out, transposed)
        torch.library.opcheck(torch.ops.ditopt.cache_load.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_computed_operands_are_pinned_to_their_traced_strides_only_under_inductor():
    model = TransposedInput()
    inputs = [torch.randn(1, 8, 5), timesteps(1)[0]]
    plan = ditopt.presets.fora(2, STEPS, level="block")
    for inductor in (True, False):
        p = prepare(model, plan, inputs, inductor=inductor)
        p.run_up_to(eager=False)
        operands = [op for n in p.gm.graph.nodes if n.target is torch.ops.higher_order.cond for op in n.args[3]]
        pinned = [op for op in operands if FORCE_STRIDE in str(op.target)]
        if inductor:
            computed = [op for op in operands if op.op != "placeholder"]
            assert pinned and pinned == computed  # every tensor the graph computes, none of its inputs
            for op in pinned:
                assert tuple(op.args[1]) == tuple(skip_branches._example(op.args[0]).stride())
            assert any(tuple(op.args[1]) == (40, 1, 5) for op in pinned)  # the transposed view keeps its strides
        else:
            assert pinned == []
