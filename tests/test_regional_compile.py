"""Regional compilation (``ditopt.mark_repeated_blocks``, ``ditopt.regional``): the repeated block is
traced once and called per block, and every caching action still works.

Fast (no inductor): marking is per instance and undone exactly; the sites are the same with and
without marks; the backend run as Python on a marked model keeps the blocks a block-level plan
treats as a whole as calls of one shared subgraph, inlines the ones a plan reaches into, and
matches the eager path (``ditopt.optimize`` of the unmarked model) exactly.
Slow (three inductor compiles): the same under inductor, allclose 1e-4 to the eager path over two
generations of four steps, no new graph in the second, the block's code generated once.
"""

from __future__ import annotations

import re

import pytest
import torch

import ditopt
from ditopt.errors import DitoptError
from ditopt.regional import INVOKE, block_calls, expand_block_calls, inline_calls, split_regions
from real_models import build

STEPS = 4


def mixed_plan() -> ditopt.Plan:
    """Attention-level reuse with nested block actions: reaches into every block."""
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "name": "every static action", "rules": [
        {"sites": "*", "kind": "attention", "steps": [1, 3], "action": "reuse"},
        {"sites": "stack[1:]", "kind": "block", "steps": [2], "action": "reuse_residual"},
        {"sites": "stack[0]", "kind": "block", "steps": [3], "action": "predict", "order": 1},
    ]})


PLANS = {
    "fora": lambda: ditopt.presets.fora(interval=2, steps=STEPS, level="block"),
    "taylorseer": lambda: ditopt.presets.taylorseer(steps=STEPS, interval=2, order=1),
    "fbcache": lambda: ditopt.presets.first_block_cache(2.0, steps=STEPS),
    "mixed": mixed_plan,
}


def _inputs(name):
    model, kwargs = build(name)
    kwargs = {k: v for k, v in kwargs.items() if k != "timestep"}
    like = torch.zeros(kwargs["hidden_states"].shape[0])
    return model, kwargs, [like + 1000 * f for f in (0.999, 0.7, 0.4, 0.1)]


def _generate(model, kwargs, timesteps):
    with torch.no_grad():
        return [model(**kwargs, timestep=t, return_dict=False)[0] for t in timesteps]


def _site_facts(table):
    return [(s.name, s.kind, s.attention, s.module_type, s.parent, s.skippable, s.residual_form, len(s.inputs),
             len(s.live_outs), s.residual_inputs.count(None), s.modulated_input is None) for s in table]


def _calls(gm):
    """The calls of a block's subgraph in a graph and its skip branches (``invoke_subgraph``, or on the
    eager path a plain call of the subgraph module), and how many subgraphs they call."""
    calls, subgraphs = 0, set()
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            for n in mod.graph.nodes:
                if n.target is INVOKE:
                    sub = getattr(mod, str(n.args[0].target))
                elif n.op == "call_module" and str(n.target).startswith("repeated_block"):
                    sub = getattr(mod, str(n.target))
                else:
                    continue
                calls += 1
                subgraphs.add(id(sub))
    return calls, len(subgraphs)


# -- marking ---------------------------------------------------------------------------------

def _state(model):
    return [(p, type(m), dict(m.__dict__), dict(m._parameters), dict(m._modules)) for p, m in model.named_modules()]


def test_marking_touches_only_the_instances_and_undo_restores_the_model_exactly():
    model, _ = build("dit")
    other, _ = build("dit")
    cls = type(model.transformer_blocks[0])
    forward, before = cls.forward, _state(model)
    marks = ditopt.mark_repeated_blocks(model)
    assert marks.paths == tuple(f"transformer_blocks.{i}" for i in range(3)) and marks.skipped == {}
    # each block is of a marked subclass of the same name; the class and the other model are untouched
    assert all(type(b) is not cls and isinstance(b, cls) and type(b).__name__ == cls.__name__
               for b in model.transformer_blocks)
    assert cls.forward is forward and not hasattr(forward, "__marked_compile_region_config__")
    assert all(type(b) is cls for b in other.transformer_blocks)
    again = ditopt.mark_repeated_blocks(model)  # already marked: nothing more
    assert again.paths == () and set(again.skipped) == set(marks.paths)
    marks.undo()
    assert _state(model) == before
    with ditopt.mark_repeated_blocks(model) as marks:
        assert len(marks.paths) == 3
    assert _state(model) == before


def test_repeated_blocks_come_from_repeated_blocks_or_the_outermost_list():
    wan, _ = build("wan")  # WanTransformer3DModel._repeated_blocks = ["WanTransformerBlock"]
    with ditopt.mark_repeated_blocks(wan) as marks:
        assert marks.paths == ("blocks.0", "blocks.1")
    hunyuan, _ = build("hunyuan")  # its _repeated_blocks names two single modules too, as diffusers marks them
    with ditopt.mark_repeated_blocks(hunyuan) as marks:
        assert marks.paths == ("x_embedder", "context_embedder", "transformer_blocks.0", "transformer_blocks.1",
                               "single_transformer_blocks.0", "single_transformer_blocks.1")
    hunyuan._repeated_blocks = []  # without it: the outermost lists of 2+ same-class modules (one refiner block is no list)
    with ditopt.mark_repeated_blocks(hunyuan) as marks:
        assert {p.rsplit(".", 1)[0] for p in marks.paths} == {"transformer_blocks", "single_transformer_blocks"}
    with ditopt.mark_repeated_blocks(hunyuan, blocks=["HunyuanVideoSingleTransformerBlock"]) as marks:
        assert marks.paths == ("single_transformer_blocks.0", "single_transformer_blocks.1")
    with pytest.raises(DitoptError, match="no repeated blocks"):
        ditopt.mark_repeated_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(DitoptError, match="before torch.compile"):
        ditopt.mark_repeated_blocks(torch.compile(wan))


@pytest.mark.parametrize("name", ["dit", "wan", "hunyuan"])
def test_sites_are_the_same_with_and_without_marks(name):
    model, kwargs = build(name)
    plain = ditopt.sites(model, **kwargs)
    with ditopt.mark_repeated_blocks(model):
        marked = ditopt.sites(model, **kwargs)
    assert _site_facts(marked) == _site_facts(plain)
    if name != "hunyuan":  # (whose single-stream blocks return their two slices cloned from a marked call)
        assert [len(s.nodes) for s in marked] == [len(s.nodes) for s in plain]


# -- the backend without inductor --------------------------------------------------------------

KEPT = {  # (model, plan) -> the blocks that stay calls
    # block 0 reads the patch embedding's transposed output: a contiguous copy of it shares the subgraph
    ("dit", "fora"): ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"),
    ("dit", "fbcache"): ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"),
    ("wan", "taylorseer"): ("blocks.0", "blocks.1"),
    ("wan", "fbcache"): ("blocks.0", "blocks.1"),  # the watched block too: the rule reads its output
    ("wan", "mixed"): (),  # attention-level reuse reaches into every block: all inlined
}


@pytest.mark.parametrize("name,plan_name", list(KEPT))
def test_marked_model_under_the_backend_matches_the_eager_path(name, plan_name):
    model, kwargs, timesteps = _inputs(name)
    plan = PLANS[plan_name]()
    eager = ditopt.optimize(model, plan)
    expected = _generate(eager, kwargs, timesteps)
    decisions = ditopt.stats(eager).decisions
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with ditopt.mark_repeated_blocks(model):
        fast = torch.compile(model, backend="ditopt", options={"plan": plan, "inductor": False}, fullgraph=True)
        runs = [_generate(fast, kwargs, timesteps)]
        graphs = counters["stats"]["unique_graphs"]  # the model's graph and one trace per kind of block
        runs.append(_generate(fast, kwargs, timesteps))
    assert counters["stats"]["unique_graphs"] == graphs and len(fast.__dict__["_ditopt_runtime"].graphs) == 1
    for got in runs:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ditopt.stats(fast).decisions == decisions
    compiled = ditopt.compiled_graph(fast)
    kept = KEPT[name, plan_name]
    assert compiled.rewritten.meta["ditopt_regions"] == kept
    assert _calls(compiled.rewritten) == ((len(kept), 1) if kept else (0, 0))  # one shared subgraph
    assert not any(n.target is INVOKE for n in compiled.original.graph.nodes)  # the sites' graph: inlined
    assert compiled.sites.names() == eager._ditopt_backend.last.sites.names()


def test_profiling_inlines_every_call():
    model, kwargs = build("wan")
    with ditopt.mark_repeated_blocks(model):
        gm = _dynamo_graph(model, kwargs)
    assert any(n.target is INVOKE for n in gm.graph.nodes)
    plan = PLANS["fora"]()
    kept = split_regions(_copy(gm), plan.compile).kept
    assert kept == ("blocks.0", "blocks.1")
    observed = split_regions(_copy(gm), plan.compile, observe=True)
    assert observed.kept == () and not any(n.target is INVOKE for n in observed.graph.graph.nodes)


def test_inlined_nodes_take_the_calling_blocks_module_paths():
    model, kwargs = build("wan")
    with ditopt.mark_repeated_blocks(model):
        gm = _dynamo_graph(model, kwargs)
    calls = inline_calls(gm)
    from ditopt.capture import module_stack

    by_name = {n.name: n for n in gm.graph.nodes}
    for call in calls.values():
        paths = {module_stack(by_name[n])[-1][0] for n in call.inner}
        assert all(p == call.path or p.startswith(call.path + ".") for p in paths), (call.path, paths)
    assert {c.path for c in calls.values()} == {"blocks.0", "blocks.1"}


def test_a_kept_calls_outputs_leave_a_skip_branch_without_a_copy():
    from ditopt.passes import PassContext, run_pipeline

    model, kwargs = build("wan")
    with ditopt.mark_repeated_blocks(model):
        gm = _dynamo_graph(model, kwargs)
    split = split_regions(_copy(gm), PLANS["fora"]().compile)
    ctx = PassContext(sites=split.graph_sites, runtime_id=0, graph_id=0, inductor=True)
    run_pipeline(split.graph, ctx, split.graph_table, inductor=True)  # the passes as under inductor
    branch = split.graph.ditopt_blocks_0_compute  # the coalesced run of both blocks
    assert sum(n.target is INVOKE for n in branch.graph.nodes) == 2
    assert not any(n.target is torch.ops.ditopt.dense_copy.default for n in branch.graph.nodes)


def _dynamo_graph(model, kwargs):
    """The graph the ditopt backend starts from: dynamo's, the marked blocks' calls expanded."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), block_calls():
        torch.compile(model, backend=record, fullgraph=True)(**kwargs)
    gm = _copy(graphs[0][0])
    expand_block_calls(gm, graphs[0][1])
    return gm


def _copy(gm):
    from ditopt.backend import _copy_graph_module

    return _copy_graph_module(gm)


# -- under inductor (slow: three compiles) -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,plan_name", [("dit", "fora"), ("wan", "fbcache"), ("wan", "taylorseer")])
def test_regional_inductor_compile_matches_the_eager_path_and_compiles_the_block_once(name, plan_name):
    from torch._inductor.utils import run_and_get_code

    model, kwargs, timesteps = _inputs(name)
    plan = PLANS[plan_name]()
    eager = ditopt.optimize(model, plan)
    expected = _generate(eager, kwargs, timesteps)
    decisions = ditopt.stats(eager).decisions
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with ditopt.mark_repeated_blocks(model):
        fast = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
        first, codes = run_and_get_code(_generate, fast, kwargs, timesteps)
        graphs = counters["stats"]["unique_graphs"]
        second = _generate(fast, kwargs, timesteps)
    assert counters["stats"]["unique_graphs"] == graphs == 1  # no new graph in the second generation
    for got in (first, second):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert ditopt.stats(fast).decisions == decisions
    kept = ditopt.compiled_graph(fast).rewritten.meta["ditopt_regions"]
    assert kept == KEPT.get((name, plan_name), kept) and len(kept) >= 2
    code = "\n".join(codes)
    defined = re.findall(r"^def (\w*repeated_subgraph\d+)\(", code, flags=re.M)
    assert len(defined) == len(set(defined)) >= 1  # the block's code, generated once
    called = sum(len(re.findall(rf"= {fn}\(", code)) for fn in set(defined))
    assert called == len(kept)  # and called per block


# -- regional capture: ditopt.optimize marks the repeated blocks itself -------------------------

def _wan(layers: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 2, 4, 4), encoder_hidden_states=torch.randn(1, 3, 16))
    return model, kwargs, [torch.tensor([1000 * f]) for f in (0.999, 0.7, 0.4, 0.1)]


def _marked(model):
    return [p for p, m in model.named_modules() if "_ditopt_block" in m.__dict__]


@pytest.fixture
def block_traces(monkeypatch):
    """How many blocks dynamo traced alone (one per kind of block)."""
    import ditopt.expand as expand

    traced = []
    original = expand._trace_template

    def counting(block, *args, **kwargs):
        traced.append(block)
        return original(block, *args, **kwargs)

    monkeypatch.setattr(expand, "_trace_template", counting)
    return traced


def test_optimize_traces_each_kind_of_block_once_and_matches_the_whole_capture(block_traces):
    model, kwargs, timesteps = _wan(6)
    plan = PLANS["fora"]()
    whole = ditopt.optimize(model, plan, regional=False)
    expected = _generate(whole, kwargs, timesteps)
    assert _marked(model) == []
    fast = ditopt.optimize(model, plan)
    got = _generate(fast, kwargs, timesteps)
    assert block_traces == [model.blocks[0]]  # one block traced alone, not one per block
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ditopt.stats(fast).decisions == ditopt.stats(whole).decisions
    compiled = ditopt.compiled_graph(fast)
    assert "expand_blocks" in compiled.seconds
    assert compiled.sites.names() == ditopt.compiled_graph(whole).sites.names()
    assert compiled.rewritten.meta["ditopt_regions"] == tuple(f"blocks.{i}" for i in range(6))
    assert _calls(compiled.rewritten) == (6, 1)  # six calls (in the coalesced run's branch) of one subgraph
    assert _marked(model) == [f"blocks.{i}" for i in range(6)]  # while the optimised model lives
    del fast
    import gc

    gc.collect()
    assert _marked(model) == [] and all("_ditopt_base" not in type(b).__dict__ for b in model.blocks)


def test_blocks_that_differ_in_an_attribute_get_their_own_subgraph(block_traces):
    model, kwargs, timesteps = _wan(4)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "action": "compute"}]})
    before = _generate(model, kwargs, timesteps[:1])[0]
    model.blocks[2].norm2.eps = 0.5  # read by layer_norm as a constant: block 2 traces differently
    reference = _generate(model, kwargs, timesteps[:1])[0]
    assert not torch.allclose(before, reference)  # (the change shows in the output)
    fast = ditopt.optimize(model, plan)
    torch.testing.assert_close(_generate(fast, kwargs, timesteps[:1])[0], reference, rtol=0, atol=0)
    assert block_traces == [model.blocks[0], model.blocks[2]]  # blocks 0, 1 and 3 alike; block 2 apart


def test_block_weights_are_read_at_every_call():
    model, kwargs, timesteps = _wan(3)
    fast = ditopt.optimize(model, ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "action": "compute"}]}))
    _generate(fast, kwargs, timesteps[:1])
    with torch.no_grad():
        model.blocks[1].ffn.net[2].weight.mul_(3)  # in place
        model.blocks[2].attn1.to_q.weight = torch.nn.Parameter(torch.randn_like(model.blocks[2].attn1.to_q.weight))
    torch.testing.assert_close(_generate(fast, kwargs, timesteps[:1])[0], _generate(model, kwargs, timesteps[:1])[0],
                               rtol=0, atol=0)


def test_a_copy_of_a_marked_model_runs_as_itself():
    import copy

    model, kwargs, timesteps = _wan(3)
    with ditopt.mark_repeated_blocks(model):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            clone.blocks[1].ffn.net[2].weight.mul_(3)
        assert _marked(clone) == [] and all(type(b) is type(model.blocks[0]).__mro__[1] for b in clone.blocks)
        fast = torch.compile(clone, backend="ditopt", options={"plan": PLANS["fora"](), "inductor": False})
        got = _generate(fast, kwargs, timesteps[:1])[0]
        torch.testing.assert_close(got, _generate(clone, kwargs, timesteps[:1])[0], rtol=0, atol=0)
        assert not torch.allclose(got, _generate(model, kwargs, timesteps[:1])[0])


def test_other_backends_see_marked_blocks_inline():
    model, kwargs, _ = _wan(3)
    with ditopt.mark_repeated_blocks(model):
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=record, fullgraph=True)(**kwargs, timestep=torch.tensor([500]))
    targets = {str(n.target) for n in graphs[0].graph.nodes}
    assert not any("block_call" in t or "invoke_subgraph" in t for t in targets)


_SHARED = torch.ones(8)


class _ReadsAGlobal(torch.nn.Module):
    """A block reading a tensor that is neither its input nor its own: it cannot be traced alone."""

    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, x, temb):
        return self.inner(x, temb) + _SHARED


def test_a_block_that_cannot_be_traced_alone_is_captured_whole():
    from synthetic import latents, make_stack, timesteps

    model = make_stack(depth=3)
    model.blocks = torch.nn.ModuleList(_ReadsAGlobal(b) for b in model.blocks)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [
        {"sites": "blocks.*", "kind": "block", "steps": [1, 3], "action": "reuse_residual"}]})
    xs, ts = latents(4), timesteps(4)
    whole = ditopt.optimize(model, plan, regional=False)
    expected = [whole(x, t) for x, t in zip(xs, ts)]
    fast = ditopt.optimize(model, plan)
    got = [fast(x, t) for x, t in zip(xs, ts)]
    assert "Please convert all Tensors to FakeTensors" in fast.__dict__["_ditopt_regional_failure"]  # the global
    assert _marked(model) == []  # unmarked for good
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ditopt.stats(fast).decisions == ditopt.stats(whole).decisions


@pytest.mark.parametrize("name", ["dit", "pixart", "cogvideox", "wan", "hunyuan"])
def test_regional_capture_finds_the_sites_the_whole_capture_finds(name):
    """Same names, kinds, attention kinds (self | cross | joint), parents, live-outs: the weights the
    expansion lifts read as weights (a weight taken for data makes self-attention look cross)."""
    model, kwargs = build(name)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "action": "compute"}]})
    found = []
    for regional in (False, True):
        fast = ditopt.optimize(model, plan, regional=regional)
        with torch.no_grad():
            fast(**kwargs)
        compiled = ditopt.compiled_graph(fast)
        assert ("expand_blocks" in compiled.seconds) == regional
        found.append(_site_facts(compiled.sites))
    assert found[0] == found[1]


class _Scale:
    def __init__(self, s):
        self.s = s


def _nested_processors(model):  # processors that differ only in an object they hold
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Nested(AttnProcessor2_0):
        def __init__(self, s):
            super().__init__()
            self.cfg = _Scale(s)

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return super().__call__(attn, hidden_states, *args, **kwargs) * self.cfg.s

    for i, block in enumerate(model.transformer_blocks):
        block.attn1.set_processor(Nested(1.0 + i))


def _function_processors(model):  # processors that differ only in the function they hold
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Applying(AttnProcessor2_0):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return self.fn(super().__call__(attn, hidden_states, *args, **kwargs))

    for i, block in enumerate(model.transformer_blocks):
        block.attn1.set_processor(Applying(torch.tanh if i else torch.sigmoid))


def _scaling_hooks(model):  # per-block forward hooks that differ only in what they close over
    for i, block in enumerate(model.transformer_blocks):
        block.ff.register_forward_hook(lambda module, inputs, out, s=1.0 + i: out * s)


@pytest.mark.parametrize("differ", [_nested_processors, _function_processors, _scaling_hooks],
                         ids=lambda f: f.__name__[1:])
def test_blocks_that_differ_beyond_plain_attributes_are_traced_apart(differ):
    """Blocks of one class whose processors held other objects or functions, or whose hooks closed
    over other values, had one signature: every block ran block 0's trace, silently."""
    from ditopt.small_models import build

    model, kwargs = build("dit")
    differ(model)
    with torch.no_grad():
        reference = model(**kwargs).sample
        out = ditopt.optimize(model, ditopt.presets.all_compute(steps=2))(**kwargs).sample
    assert torch.equal(out, reference)


def test_blocks_whose_processor_holds_a_tensor_are_not_marked_and_compile_inline():
    """A processor holding a plain tensor (no parameter or buffer; here another per block) made
    ``mark_repeated_blocks`` + ``torch.compile(backend="ditopt")`` fail inside dynamo (a real
    tensor met while running the block on fake ones), and a block traced once would have baked
    block 0's tensor in as a constant. Such blocks are not marked (the reason names the
    attribute) and are captured inline, as the rest of the model."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ditopt.small_models import build

    class Held(AttnProcessor2_0):
        def __init__(self, w):
            super().__init__()
            self.w = w

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return super().__call__(attn, hidden_states, *args, **kwargs) * self.w

    model, kwargs = build("dit")
    for i, block in enumerate(model.transformer_blocks):
        block.attn1.set_processor(Held(torch.full((block.attn1.inner_dim,), 1.0 + i)))
    with torch.no_grad():
        reference = model(**kwargs).sample
    with ditopt.mark_repeated_blocks(model) as marked:
        assert marked.paths == () and all("(attn1.processor.w)" in why for why in marked.skipped.values())
        compiled = torch.compile(model, backend="ditopt", options={"plan": ditopt.presets.all_compute(steps=2),
                                                                   "inductor": False}, dynamic=False)
        with torch.no_grad():
            assert torch.equal(compiled(**kwargs).sample, reference)
    with torch.no_grad():
        assert torch.equal(ditopt.optimize(model, ditopt.presets.all_compute(steps=2))(**kwargs).sample, reference)
