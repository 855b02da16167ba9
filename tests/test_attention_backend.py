"""The attention-backend pass (``passes/attention_backend.py``): SDPA calls moved to flash-attn,
SageAttention or flex_attention, or kept.

flash-attn and SageAttention cannot be installed here: stand-in modules in ``sys.modules`` record
their calls and compute attention from the packages' documented calling conventions (flash:
``(batch, tokens, heads, head dim)``, ``softmax_scale``; sage: ``tensor_layout="HND"``,
``sm_scale``), written with einsum, sharing nothing with SDPA. Both packages need float16 or
bfloat16 on CUDA; the stand-ins compute in float32 on the CPU, so the structure and numerics
tests relax those requirements (``KERNELS`` is data: the relaxed copy differs in ``dtypes`` and
``devices`` only) and keep 1e-5 tolerances; the requirements themselves are tested with the
real ``KERNELS`` (an explicit name raises, ``auto`` keeps SDPA and says so once).
"""

from __future__ import annotations

import copy
import doctest
import importlib.machinery
import sys
import types
import warnings
from dataclasses import replace

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import diffusers  # noqa: F401 - imported before the stand-ins: it probes which attention packages exist
import ditopt
from ditopt.errors import InputError
from ditopt.passes import PassContext, attention_backend
from ditopt.runtime import attention_backends
from real_models import MODELS, timesteps
from synthetic import make_stack, snapshot, trace

pass_module = sys.modules["ditopt.passes.attention_backend"]  # the module, not the function of that name
FLASH = torch.ops.ditopt.flash_attention.default
SAGE = torch.ops.ditopt.sage_attention.default
FLEX = attention_backends.flex_attention
SDPA = F.scaled_dot_product_attention
REAL_FLASH = pass_module.KERNELS["flash"]  # flash-attn's requirements, before a test relaxes them


# -- stand-ins for the packages ------------------------------------------------------------------

def attention_bshd(q, k, v, scale):
    """Attention of (batch, tokens, heads, head dim) tensors, by einsum."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = (torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)


def fake_flash_module(calls: list) -> types.ModuleType:
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape), scale=softmax_scale,
                          dropout_p=dropout_p, causal=causal, extra=kwargs))
        return attention_bshd(q, k, v, softmax_scale)

    module.flash_attn_func = flash_attn_func
    return module


def fake_sage_module(calls: list) -> types.ModuleType:
    module = types.ModuleType("sageattention")
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
        calls.append(dict(q=tuple(q.shape), layout=tensor_layout, causal=is_causal, scale=sm_scale))
        to_bshd = (lambda t: t.transpose(1, 2)) if tensor_layout == "HND" else (lambda t: t)
        return to_bshd(attention_bshd(to_bshd(q), to_bshd(k), to_bshd(v), sm_scale))

    module.sageattn = sageattn
    return module


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(pass_module, "_SAID", set())  # every test sees its own first fallback
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # missing unless a test installs a stand-in
    monkeypatch.setitem(sys.modules, "sageattention", None)


@pytest.fixture
def flash_calls(monkeypatch):
    """A recording flash_attn stand-in, and flash-attn allowed on float32 CPU tensors."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module(calls))
    monkeypatch.setitem(pass_module.KERNELS, "flash", replace(pass_module.KERNELS["flash"], dtypes=None, devices=None))
    return calls


@pytest.fixture
def sage_calls(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "sageattention", fake_sage_module(calls))
    monkeypatch.setitem(pass_module.KERNELS, "sage", replace(pass_module.KERNELS["sage"], dtypes=None, devices=None))
    return calls


# -- a synthetic DiT with multi-head attention ---------------------------------------------------

class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, **sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        if sdpa.pop("masked", False):
            self.register_buffer("mask", torch.tril(torch.ones(6, 6, dtype=torch.bool)))

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, context=None):
        context = x if context is None else context
        extra = {"attn_mask": self.mask} if hasattr(self, "mask") else {}
        o = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(context)),
                                           self.split(self.v(context)), **extra, **self.sdpa)
        return self.out(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, **sdpa):
        super().__init__()
        self.attn1 = MultiHeadAttention(dim, heads, **sdpa)
        self.attn2 = MultiHeadAttention(dim, heads, scale=0.3)  # cross-attention, its own scale
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, context, temb):
        x = x + self.attn1(x + temb[:, None])
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class AttentionStack(nn.Module):
    """Blocks of self-attention (options ``sdpa``), cross-attention (scale 0.3) and a feed-forward."""

    def __init__(self, depth: int = 2, dim: int = 16, heads: int = 2, **sdpa):
        super().__init__()
        self.t_embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, **dict(sdpa)) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, context, timestep):
        temb = self.t_embed(timestep[:, None].float() / 1000)
        for block in self.blocks:
            x = block(x, context, temb)
        return self.proj_out(x)


def stack_and_inputs(**sdpa):
    torch.manual_seed(0)
    model = AttentionStack(**sdpa).eval().requires_grad_(False)
    return model, (torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.tensor([500.0, 500.0]))


def run_pass(gm, backend: str, device: str = "cpu"):
    ctx = PassContext(sites=ditopt.find_sites(gm.graph), runtime_id=0, graph_id=0, attention_backend=backend,
                      device=torch.device(device))
    return attention_backend(gm, ctx)


def calls_of(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and n.target is target]


def fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if "attention_backend" in str(w.message)]


def bshd(shape):
    b, h, s, d = shape
    return (b, s, h, d)


# -- structure and numerics on the synthetic graph -------------------------------------------------

def test_flash_replaces_every_sdpa_call_with_flash_layout_and_scale(flash_calls):
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    sdpa_nodes = calls_of(gm, SDPA)
    names = [n.name for n in sdpa_nodes]
    shapes = [bshd(n.args[0].meta["tensor_meta"].shape) for n in sdpa_nodes]

    assert run_pass(gm, "flash").modified
    gm.recompile()
    assert calls_of(gm, SDPA) == [] and [n.name for n in calls_of(gm, FLASH)] == names  # same nodes, in place
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert [c["q"] for c in flash_calls] == shapes  # (batch, tokens, heads, head dim), heads 2 != tokens 6
    assert [c["k"][1] for c in flash_calls] == [6, 3, 6, 3]  # self, cross, self, cross
    assert [c["scale"] for c in flash_calls] == [None, 0.3, None, 0.3]
    assert all(c["dropout_p"] == 0.0 and c["causal"] is False and not c["extra"] for c in flash_calls)


def test_sage_takes_sdpa_layout_and_scale(sage_calls):
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    assert run_pass(gm, "sage").modified
    gm.recompile()
    assert calls_of(gm, SDPA) == [] and len(calls_of(gm, SAGE)) == 4
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert [(c["q"], c["layout"], c["causal"], c["scale"]) for c in sage_calls] == \
        [((2, 2, 6, 8), "HND", False, s) for s in (None, 0.3, None, 0.3)]


def test_flex_equals_sdpa_on_the_cpu():
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    assert run_pass(gm, "flex").modified
    gm.recompile()
    assert calls_of(gm, SDPA) == [] and len(calls_of(gm, FLEX)) == 4
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


def test_the_runtime_ops_fake_kernels_match_the_real_ones(flash_calls, sage_calls):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    for op in (FLASH, SAGE):
        for scale in (None, 0.5):
            torch.library.opcheck(op, (q, k, v, scale))
            torch.testing.assert_close(op(q, k, v, scale), SDPA(q, k, v, scale=scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_running_the_pass_twice_changes_nothing_the_second_time(backend, flash_calls):
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    assert run_pass(gm, backend).modified
    once = snapshot(gm)
    assert not run_pass(gm, backend).modified
    assert snapshot(gm) == once


# -- must not fire ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sdpa, why", [
    (dict(masked=True), "an attn_mask"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(is_causal=True), "is_causal"),
    (dict(enable_gqa=True), "enable_gqa"),
], ids=["mask", "dropout", "causal", "gqa"])
@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_calls_no_kernel_can_express_stay_sdpa(backend, sdpa, why, flash_calls):
    model, inputs = stack_and_inputs(**sdpa)
    gm = trace(model, *inputs)
    kept = [n.name for n in calls_of(gm, SDPA)][::2]  # each block's self-attention: attn1, then attn2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_pass(gm, backend).modified  # the cross-attention calls still move
        run_pass(gm, backend)
    assert [n.name for n in calls_of(gm, SDPA)] == kept and len(kept) == 2
    said = fallbacks(caught)
    assert len(said) == 1 and f"keeps SDPA for 2 of 4 attention calls ({why}:" in said[0], said


def test_sdpa_and_three_dimensional_attention_change_nothing(flash_calls):
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    before = snapshot(gm)
    assert not run_pass(gm, "sdpa").modified and snapshot(gm) == before
    stack = make_stack()  # SDPA over (batch, tokens, dim): no heads dimension
    gm = trace(stack, torch.randn(1, 5, 8), torch.tensor([1.0]))
    before = snapshot(gm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not run_pass(gm, "flash").modified
    assert snapshot(gm) == before
    assert "not 4-D" in fallbacks(caught)[0]


# -- requirements: explicit names raise, auto falls back and says so once -------------------------

def test_an_unknown_backend_name_lists_the_names():
    model, _ = stack_and_inputs()
    with pytest.raises(InputError, match="one of auto, sdpa, flash, sage, flex; got 'flsh'"):
        ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4), attention_backend="flsh")


@pytest.mark.parametrize("backend, hint", [("flash", "pip install flash-attn"), ("sage", "pip install sageattention")])
def test_a_named_backend_that_is_not_installed_raises_and_leaves_the_model_alone(backend, hint):
    model, inputs = stack_and_inputs()
    with torch.no_grad():
        before = model(*inputs)
    with pytest.raises(InputError, match=f"attention_backend='{backend}' needs .*{hint}"):
        ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4), attention_backend=backend)
    assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad():
        assert torch.equal(model(*inputs), before)


def test_flash_by_name_refuses_float32_naming_the_node(monkeypatch, flash_calls):
    monkeypatch.setitem(pass_module.KERNELS, "flash", replace(REAL_FLASH, devices=None))
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    before = snapshot(gm)
    first = calls_of(gm, SDPA)[0].name
    with pytest.raises(InputError, match=f"cannot run attention {first} .*float32 tensors .*float16 or bfloat16"):
        run_pass(gm, "flash")
    assert snapshot(gm) == before  # refused before any node changed
    monkeypatch.setitem(pass_module.KERNELS, "flash", replace(REAL_FLASH, dtypes=None))
    with pytest.raises(InputError, match="tensors on cpu .*runs on cuda"):
        run_pass(gm, "flash")


def test_auto_keeps_sdpa_without_cuda_and_says_so_once_across_two_models():
    model, inputs = stack_and_inputs()
    plan = ditopt.presets.fora(interval=2, steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch._dynamo.reset()
            fast = ditopt.optimize(model, plan, attention_backend="auto")
            with torch.no_grad():
                out = fast(*inputs)
            assert calls_of(ditopt.compiled_graph(fast).rewritten, FLASH) == []
            assert dict(ditopt.compiled_graph(fast).report)["attention_backend"] is False
    with torch.no_grad():
        torch.testing.assert_close(out, model(*inputs), rtol=0, atol=0)
    assert fallbacks(caught) == ["ditopt: attention_backend='auto' keeps SDPA: the model is on cpu (flash-attn runs "
                                 "on cuda)"]


def test_auto_without_the_package_keeps_sdpa_and_says_so_once(monkeypatch):
    monkeypatch.setitem(pass_module.KERNELS, "flash", replace(REAL_FLASH, devices=None))
    model, inputs = stack_and_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            gm = trace(model, *inputs)
            assert not run_pass(gm, "auto").modified
    said = fallbacks(caught)
    assert len(said) == 1 and "keeps SDPA: the flash_attn package, which does not import" in said[0]
    assert "pip install flash-attn" in said[0]


def test_auto_takes_flash_where_it_applies_and_keeps_float32_on_sdpa(monkeypatch, flash_calls):
    model, inputs = stack_and_inputs()
    gm = trace(model, *inputs)
    assert run_pass(gm, "auto").modified and len(calls_of(gm, FLASH)) == 4  # relaxed: float32 on the CPU
    monkeypatch.setitem(pass_module.KERNELS, "flash", replace(REAL_FLASH, devices=None))
    gm = trace(model, *inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not run_pass(gm, "auto").modified
    assert "keeps SDPA for 4 of 4 attention calls (float32 tensors (flash-attn takes float16 or bfloat16)" in \
        fallbacks(caught)[0]


# -- the small diffusers models --------------------------------------------------------------------

class SdpaCalls(TorchFunctionMode):
    """Records (query shape, scale) of each SDPA call without mask that runs under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA and kwargs.get("attn_mask", args[3] if len(args) > 3 else None) is None:
            self.calls.append((tuple((args[0] if args else kwargs["query"]).shape), kwargs.get("scale")))
        return func(*args, **kwargs)


def sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("name", ["dit", "pixart", "wan", "hunyuan"])
def test_real_models_flash_and_flex(name, flash_calls):
    model, kwargs = MODELS[name]()
    with torch.no_grad(), SdpaCalls() as eager_calls:
        expected = sample(model(**kwargs))
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "action": "compute"}]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = ditopt.optimize(copy.deepcopy(model), plan, attention_backend="flash")
        with torch.no_grad():
            out = sample(fast(**kwargs))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert [(c["q"], c["scale"]) for c in flash_calls] == [(bshd(s), scale) for s, scale in eager_calls.calls]
    compiled = ditopt.compiled_graph(fast)
    left = calls_of(compiled.rewritten, SDPA)
    assert all(pass_module.sdpa_arguments(n)["attn_mask"] is not None for n in left)
    assert dict(compiled.report)["attention_backend"] is bool(eager_calls.calls)
    if name == "hunyuan":  # every attention there is masked (text padding): nothing moves, and it says so
        assert not eager_calls.calls and left
        assert len(fallbacks(caught)) == 1 and "an attn_mask" in fallbacks(caught)[0]
    else:
        assert eager_calls.calls and not left and calls_of(compiled.rewritten, FLASH)
    before = snapshot(compiled.rewritten)  # idempotence on the whole rewritten graph (branches too)
    ctx = PassContext(sites=compiled.sites, runtime_id=0, graph_id=0, attention_backend="flash")
    assert not attention_backend(compiled.rewritten, ctx).modified and snapshot(compiled.rewritten) == before

    torch._dynamo.reset()
    fast = ditopt.optimize(copy.deepcopy(model), plan, attention_backend="flex")
    with torch.no_grad():
        torch.testing.assert_close(sample(fast(**kwargs)), expected, atol=1e-5, rtol=1e-5)
    rewritten = ditopt.compiled_graph(fast).rewritten
    assert bool(calls_of(rewritten, FLEX)) is bool(eager_calls.calls)


# -- end to end --------------------------------------------------------------------------------------

def test_fora_with_flex_through_optimize_and_torch_compile():
    model, kwargs = MODELS["dit"]()
    plan = ditopt.presets.fora(interval=2, steps=4)
    base = ditopt.optimize(copy.deepcopy(model), plan)
    flex = ditopt.optimize(copy.deepcopy(model), plan, attention_backend="flex")
    compiled = torch.compile(copy.deepcopy(model), backend="ditopt",
                             options={"plan": plan, "attention_backend": "flex", "inductor": False})
    with torch.no_grad():
        for t in timesteps(4, kwargs["timestep"]):
            want = sample(base(**{**kwargs, "timestep": t}))
            torch.testing.assert_close(sample(flex(**{**kwargs, "timestep": t})), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sample(compiled(**{**kwargs, "timestep": t})), want, atol=1e-5, rtol=1e-5)
    assert ditopt.stats(flex).decisions == ditopt.stats(base).decisions == ditopt.stats(compiled).decisions
    assert "reuse" in ditopt.stats(flex).decisions["transformer_blocks.1.attn1"]
    assert calls_of(ditopt.compiled_graph(flex).rewritten, FLEX)
    assert calls_of(ditopt.compiled_graph(compiled).rewritten, FLEX)
    assert copy.deepcopy(flex)._ditopt_backend.attention_backend == "flex"


def test_the_pass_docstring_example_runs():
    result = doctest.testmod(pass_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.slow
def test_flex_under_inductor_with_fora_equals_sdpa():
    """Inductor compiles flex_attention (its CPU kernel needs dense operands: the runtime copies
    diffusers' transposed views) inside the skip branches of a FORA plan."""
    model, kwargs = MODELS["dit"]()
    plan = ditopt.presets.fora(interval=2, steps=4)
    base = ditopt.optimize(copy.deepcopy(model), plan)
    compiled = torch.compile(copy.deepcopy(model), backend="ditopt", fullgraph=True, dynamic=False,
                             options={"plan": plan, "attention_backend": "flex"})
    with torch.no_grad():
        for t in timesteps(4, kwargs["timestep"]):
            torch.testing.assert_close(sample(compiled(**{**kwargs, "timestep": t})),
                                       sample(base(**{**kwargs, "timestep": t})), atol=1e-5, rtol=1e-5)
    assert ditopt.stats(compiled).decisions == ditopt.stats(base).decisions
    assert calls_of(ditopt.compiled_graph(compiled).rewritten, FLEX)
