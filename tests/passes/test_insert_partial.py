"""insert_partial on the synthetic stack captured by dynamo (as the backend sees it): structure,
numerics against eager and a hand gather/compute/scatter, must-not-fire, idempotence, refusals.

    before                          after
    y = <blocks.0.ff>(x)            full = decide(...); y_old = cache_load(.., "partial0"); x_old = cache_load(.., "partial1")
                                    y, x_c = cond(full, all_fn, some_fn, (x, .., y_old, x_old))
                                    cache_store(token, y, full, .., "partial0"); cache_store(token, x_c, full, .., "partial1")
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

import ditopt
from ditopt import PlanError
from ditopt.capture import capture
from ditopt.passes import EAGER_ONLY, PIPELINE, PassContext, annotate_decisions, insert_partial, verify_graph
from ditopt.passes.annotations import Role, node_annotation
from ditopt.runtime import Runtime
from ditopt.runtime.partial import gather_tokens, scatter_tokens, select_tokens
from synthetic import CACHE_LOAD, CACHE_STORE, COND, DECIDE, eager, latents, make_stack, snapshot, targets, timesteps

SEQ = 12
STEPS = 4


def plan_of(*rules, steps: int = STEPS) -> ditopt.Plan:
    return ditopt.Plan.from_dict({"version": 1, "steps": steps, "rules": list(rules)})


PARTIAL_FF = {"sites": "blocks.0.ff", "steps": [1, 2, 3], "action": "partial", "ratio": 0.25}


class Captured:
    """The dynamo graph of the synthetic stack, with a runtime and pass context as the backend builds them."""

    def __init__(self, plan: ditopt.Plan, model=None):
        self.model = model or make_stack(2)
        x, t = latents(1, seq=SEQ)[0], timesteps(1)[0]
        cap = capture(self.model, x, t)
        self.gm, self.inputs = cap.gm, list(cap.example_inputs)
        self.names = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.sites = ditopt.find_sites(self.gm.graph)
        self.table = plan.compile(self.sites)
        self.runtime = Runtime()
        self.ctx = PassContext(sites=self.sites, runtime_id=self.runtime.id, graph_id=0)

    def run_up_to(self, last=None, *, eager_only: bool = True):
        annotate_decisions(self.gm, self.ctx, self.table)
        for p in PIPELINE + (EAGER_ONLY if eager_only else []):
            p(self.gm, self.ctx)
            if p is last:
                break
        return self

    def __call__(self, x, t):
        self.runtime.set_graph(0, self.table)
        args = [x if "x" in name.split("_") else t if "timestep" in name else v
                for name, v in zip(self.names, self.inputs)]
        with torch.no_grad():
            self.gm.recompile()
            out = self.gm(*args, torch.zeros(1, dtype=torch.int64))
        return out[0] if isinstance(out, (tuple, list)) else out


def test_a_partial_site_becomes_one_cond_with_two_loads_and_two_stores():
    c = Captured(plan_of(PARTIAL_FF)).run_up_to(insert_partial)
    found = targets(c.gm)
    assert (found[COND], found[DECIDE], found[CACHE_LOAD], found[CACHE_STORE]) == (1, 1, 2, 2)
    stores = [n for n in c.gm.graph.nodes if n.target is CACHE_STORE]
    assert [s.args[5:7] for s in stores] == [("blocks.0.ff", "partial0"), ("blocks.0.ff", "partial1")]
    cond = next(n for n in c.gm.graph.nodes if n.target is COND)
    assert cond.args[0].target is DECIDE and node_annotation(cond).role is Role.SKIP_BRANCH
    every, some = (getattr(c.gm, fn.target) for fn in cond.args[1:3])
    assert targets(every)[select_tokens] == 0
    assert targets(some)[select_tokens] == 1
    found_some = targets(some)
    assert found_some[gather_tokens] == 1 and found_some[scatter_tokens] == 2  # gather, scatter output and input
    linears = [n for n in some.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 2 and all(n.meta["nn_module_stack"] for n in linears)
    # the stores take the cond's outputs; the block's residual add reads the chosen output
    assert all(s.args[1].args[0] is cond and s.args[2] is cond.args[0] for s in stores)
    assert not any(n.name in c.sites["blocks.0.ff"].nodes for n in c.gm.graph.nodes)
    assert not verify_graph(c.gm, c.ctx).modified


def test_a_plan_without_partial_rules_leaves_the_graph_alone():
    c = Captured(ditopt.presets.fora(interval=2, steps=STEPS, level="layer")).run_up_to(insert_partial)
    before = snapshot(c.gm)
    assert not insert_partial(c.gm, c.ctx).modified
    assert snapshot(c.gm) == before


def test_running_the_pass_twice_changes_nothing():
    c = Captured(plan_of(PARTIAL_FF)).run_up_to(insert_partial)
    before = snapshot(c.gm)
    assert not insert_partial(c.gm, c.ctx).modified
    assert snapshot(c.gm) == before


def test_numerics_against_eager_and_a_hand_gather_compute_scatter():
    c = Captured(plan_of(PARTIAL_FF)).run_up_to()
    model = c.model
    g = torch.Generator().manual_seed(3)
    x0 = latents(1, seq=SEQ)[0]
    xs = [x0 + 0.3 * i * torch.randn(x0.shape, generator=g) for i in range(STEPS)]
    ts = timesteps(STEPS)
    seen = {}
    hook = model.blocks[0].ff.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    x_old = y_old = None
    with torch.no_grad():
        for step, (x, t) in enumerate(zip(xs, ts)):
            got = c(x, t)
            full = eager(model, x, t)[0]  # the hook sees this step's ff input
            if step == 0:
                torch.testing.assert_close(got, full)
                x_old, y_old = seen["x"].clone(), seen["y"].clone()
                continue
            x_ff = seen["x"]
            change = (x_ff - x_old).norm(dim=(0, 2)) / x_old.norm(dim=(0, 2))
            k = math.ceil(0.25 * SEQ)
            picked = change.argsort(descending=True)[:k]
            y_ff = y_old.clone()
            y_ff[:, picked] = model.blocks[0].ff(x_ff[:, picked])
            x_old[:, picked] = x_ff[:, picked]
            y_old = y_ff
            # the rest of the stack after blocks.0.ff, by hand: x + ff(...) then blocks.1 and the head
            hook.remove()
            patch = model.blocks[0].ff.register_forward_hook(lambda m, a, out: y_ff)
            try:
                want = eager(model, x, t)[0]
            finally:
                patch.remove()
                hook = model.blocks[0].ff.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert (got - full).abs().max() > 1e-4
    hook.remove()
    assert c.runtime.decisions()["blocks.0.ff"] == ["compute", "partial", "partial", "partial"]


def test_partial_inside_a_reusing_block_has_its_stores_hoisted():
    """DuCa's shape: blocks.0 reuses at step 1, its ff recomputes some tokens at step 2."""
    c = Captured(plan_of({"sites": "blocks.0", "steps": [1], "action": "reuse"},
                         {"sites": "blocks.0.ff", "steps": [2, 3], "action": "partial", "ratio": 0.5})).run_up_to()
    xs, ts = [latents(1, seq=SEQ, seed=s)[0] for s in range(STEPS)], timesteps(STEPS)
    for x, t in zip(xs, ts):
        c(x, t)
    assert c.runtime.decisions()["blocks.0"] == ["compute", "reuse", "compute", "compute"]
    assert c.runtime.decisions()["blocks.0.ff"] == ["compute", "skipped", "partial", "partial"]
    stores = [n for n in c.gm.graph.nodes if n.target is CACHE_STORE and n.args[5] == "blocks.0.ff"]
    assert len(stores) == 2  # hoisted out of blocks.0's skip branch, into the main graph


def test_under_inductor_the_branches_return_dense_copies_and_the_caches_are_copied():
    c = Captured(plan_of(PARTIAL_FF))
    c.ctx.inductor = True
    c.run_up_to(insert_partial, eager_only=False)
    cond = next(n for n in c.gm.graph.nodes if n.target is COND)
    for fn in cond.args[1:3]:
        out = next(iter(getattr(c.gm, fn.target).graph.find_nodes(op="output")))
        assert all(v.target is torch.ops.ditopt.dense_copy.default for v in out.args[0])
    copies = [n.args[-1] for n in c.gm.graph.nodes if n.target in (CACHE_LOAD, CACHE_STORE)]
    assert copies == [True] * 4


def test_a_site_holding_another_planned_site_is_refused():
    plan = plan_of({"sites": "blocks.0", "steps": [1], "action": "partial", "ratio": 0.5},
                   {"sites": "blocks.0.ff", "steps": [2], "action": "reuse"})
    with pytest.raises(PlanError, match=r"blocks\.0.*holds other planned sites"):
        Captured(plan).run_up_to(insert_partial)
