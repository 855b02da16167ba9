"""Every action under ``torch.compile(backend="ditopt")``, on every class: the five small configs
the project names and the two classes no issue names (SD3, Flux). Slow: one inductor compile per
(model, plan), kept to two plans that between them take every action.

- ``mixed``: a static plan with every static action at once: the attention sites ``reuse`` their
  output at steps 1 and 3, the blocks after the first ``reuse_residual`` at step 2 (nested: their
  attention is skipped there), the first block forecasts (``predict``, order 1) at step 3;
- ``adaptive``: First-Block-Cache, a ``when`` rule decided in the graph.

Each runs two generations of four steps, compiled with ``fullgraph=True``, and must match the
eager path (``ditopt.optimize`` with the same plan) within 1e-4, decide the same, and add no
graph in the second generation.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ditopt
from ditopt.small_models import MODELS
from test_unseen_classes import _flux, _sd3

pytestmark = pytest.mark.slow

STEPS = 4


def mixed_plan() -> ditopt.Plan:
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "name": "every static action", "rules": [
        {"sites": "*", "kind": "attention", "steps": [1, 3], "action": "reuse"},
        {"sites": "stack[1:]", "kind": "block", "steps": [2], "action": "reuse_residual"},
        {"sites": "stack[0]", "kind": "block", "steps": [3], "action": "predict", "order": 1},
    ]})


PLANS = {"mixed": mixed_plan, "adaptive": lambda: ditopt.presets.first_block_cache(2.0, steps=STEPS)}


def _build(name):
    if name == "sd3":
        model, kwargs, tmax, _ = _sd3()
    elif name == "flux":
        model, kwargs, tmax, _ = _flux()
    else:
        model, kwargs = MODELS[name]()
        tmax = 1000.0
        kwargs = {k: v for k, v in kwargs.items() if k != "timestep"}
    like = torch.zeros(kwargs["hidden_states"].shape[0])
    timesteps = [like + tmax * f for f in (0.999, 0.7, 0.4, 0.1)]
    return model, kwargs, timesteps


def _generate(model, kwargs, timesteps):
    with torch.no_grad():
        return [model(**kwargs, timestep=t, return_dict=False)[0] for t in timesteps]


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("name", [*MODELS, "sd3", "flux"])
def test_every_action_compiles_matches_the_eager_path_and_never_recompiles(name, plan_name):
    model, kwargs, timesteps = _build(name)
    plan = PLANS[plan_name]()
    eager = ditopt.optimize(model, plan)
    expected = _generate(eager, kwargs, timesteps)
    expected_decisions = ditopt.stats(eager).decisions

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
    first = _generate(compiled, kwargs, timesteps)
    graphs = counters["stats"]["unique_graphs"]
    second = _generate(compiled, kwargs, timesteps)

    assert counters["stats"]["unique_graphs"] == graphs == 1  # no new graph in the second generation
    assert sum(counters["graph_break"].values()) == 0
    for got in (first, second):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    decisions = ditopt.stats(compiled).decisions
    assert decisions == expected_decisions
    taken = {d for row in decisions.values() for d in row}
    if plan_name == "mixed":  # every static action really ran, compiled
        assert {"reuse", "reuse_residual", "predict", "skipped"} <= taken
    else:
        assert "reuse_residual" in taken or "reuse" in taken


def test_a_second_shape_under_automatic_dynamic_shapes_is_refused_clearly_and_dynamic_false_serves_it():
    """dynamo's automatic dynamic shapes recompile a second batch size with symbolic sizes, which
    crashed the passes with 'SymIntArrayRef expected to contain only concrete integers'."""
    model, kwargs = MODELS["dit"]()
    plan = ditopt.presets.fora(interval=2, steps=4, level="block")

    def run(compiled, batch):
        inputs = {k: (v[:1].expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        with torch.no_grad():
            return compiled(**inputs).sample

    loose = torch.compile(model, backend="ditopt", options={"plan": plan, "inductor": False}, fullgraph=True)
    run(loose, 1)
    with pytest.raises(Exception, match="symbolic sizes.*dynamic=False"):
        run(loose, 3)
    static = torch.compile(model, backend="ditopt", options={"plan": plan, "inductor": False}, fullgraph=True,
                           dynamic=False)
    run(static, 1)
    assert run(static, 3).shape[0] == 3 and ditopt.stats(static).graphs == 2


def test_a_graph_refused_at_a_new_shape_ends_the_generation():
    """Under torch.compile, a call whose new graph the backend refuses raised before the runtime saw
    it: the generation went on, and a retried CFG step was taken for branches 1 and 2."""
    model, kwargs = MODELS["dit"]()
    plan = ditopt.presets.fora(interval=2, steps=4, level="block")
    one = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ts = [torch.tensor([t]) for t in (999, 749, 499, 249)]

    def call(compiled, t, batch=1):
        inputs = {k: (v.expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in one.items()}
        with torch.no_grad():
            return compiled(**{**inputs, "timestep": t.expand(batch)}).sample

    fast = torch.compile(model, backend="ditopt", options={"plan": plan, "inductor": False}, fullgraph=True)
    call(fast, ts[0]), call(fast, ts[0]), call(fast, ts[1])  # step 0's two branches, step 1's first
    with pytest.raises(Exception, match="symbolic sizes"):
        call(fast, ts[1], batch=3)  # a second shape under automatic dynamic shapes: refused
    assert ditopt.stats(fast).cache_bytes == 0
    retried = [call(fast, t) for t in (ts[1], ts[1], ts[2], ts[2])]  # a new generation from step 1
    fresh = torch.compile(copy.deepcopy(model), backend="ditopt", options={"plan": plan, "inductor": False},
                          fullgraph=True)
    assert all(torch.equal(a, call(fresh, t)) for a, t in zip(retried, (ts[1], ts[1], ts[2], ts[2])))
