"""The cost model (``ditopt.cost``) against FLOPs that torch measures, on real diffusers classes.

What is measured, exactly:

- **Per-site FLOPs.** ``torch.utils.flop_counter.FlopCounterMode`` runs the *unoptimised* model
  once and reports FLOPs per module path (``get_flop_counts()``); a site's measured FLOPs are
  its module's. SDPA runs on the math backend while counting: FlopCounterMode has no formula for
  the CPU flash-attention kernel (it would count attention as 0); on the math backend attention
  is two ``bmm`` it counts. The cost model's expression, evaluated at the capture dims and at a
  second size and batch (never captured), is compared with these.
- **Compute fraction of a plan.** The optimised model (``ditopt.optimize``) runs a generation;
  FlopCounterMode is entered in hooks around the *rewritten graph module* the backend built, so
  it counts what the rewritten graph really executes at each call (a skipped branch executes
  nothing) without touching dynamo's guards. Executed block FLOPs = executed FLOPs of the call
  minus the model's non-block FLOPs (FlopCounterMode total minus its outermost block modules, on
  the unoptimised model); the measured fraction divides their sum by calls x all block FLOPs.
  The prediction comes from the plan alone (``predict(plan, **dims)``), and also from the run's
  ``ditopt.stats(model).decisions``.
"""

from __future__ import annotations

import pytest
import sympy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from flop_counting import flops_per_call
from ditopt.cost import B, S
from ditopt.small_models import build, timesteps

STEPS = 6


# -- measuring ---------------------------------------------------------------------------------

def module_flops(model, kwargs) -> dict[str, int]:
    """FLOPs of one call per module path (``Global`` = the whole call), from FlopCounterMode."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    root = type(model).__name__ + "."
    return {k.removeprefix(root): sum(v.values()) for k, v in counter.get_flop_counts().items()}


def resized(kwargs, *, batch=3, frames=5, height=16, width=12, text=9):
    """The same inputs at another batch, size (and frame count, text length). Images are kept
    square (DiT and PixArt unpatchify a square); videos get ``height x width``."""
    out = {}
    for k, v in kwargs.items():
        if k == "hidden_states":
            shape = (v.shape[1], frames, height, width) if v.dim() == 5 else (v.shape[1], height, height)
            out[k] = torch.randn(batch, *shape)
        elif k == "encoder_hidden_states":
            out[k] = torch.randn(batch, text, v.shape[-1])
        elif k == "encoder_attention_mask":
            out[k] = torch.ones(batch, text)
        elif k == "class_labels":
            out[k] = torch.arange(batch)
        elif isinstance(v, torch.Tensor) and v.dim():
            out[k] = v[:1].repeat(batch, *[1] * (v.dim() - 1))
        else:
            out[k] = v
    return out


def run_generation(opt, kwargs, steps=STEPS, branches=None):
    """One generation: ``steps`` decreasing timesteps, one call per CFG branch at each."""
    branches = branches or [kwargs]
    with torch.no_grad():
        for t in timesteps(steps, kwargs["timestep"]):
            for branch in branches:
                opt(**{**branch, "timestep": t})


def executed_flops_per_call(opt, kwargs, steps=STEPS, branches=None) -> list[int]:
    """FLOPs the rewritten graph executes at each call of a second generation."""
    with flops_per_call(opt._ditopt_backend.last.rewritten) as per_call:
        ditopt.reset(opt)
        run_generation(opt, kwargs, steps, branches)
    return per_call


def measured_fraction(model, cost, plan, kwargs, branches=None):
    """(measured fraction of block FLOPs executed, stats after the run) for ``plan`` at ``kwargs``."""
    torch._dynamo.reset()
    opt = ditopt.optimize(model, plan)
    run_generation(opt, kwargs, branches=branches)
    calls = executed_flops_per_call(opt, kwargs, branches=branches)
    ref = module_flops(model, kwargs)
    blocks = sum(ref[b] for b in cost.block_sites())
    non_block = ref["Global"] - blocks
    assert calls[0] == ref["Global"], "step 0 computes everything: the rewritten graph must count as the model"
    return (sum(calls) - len(calls) * non_block) / (len(calls) * blocks), ditopt.stats(opt)


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit():
    model, kwargs = build("dit")
    return model, kwargs, ditopt.cost_model(model, **kwargs)


@pytest.fixture(scope="module")
def wan():
    model, kwargs = build("wan")
    return model, kwargs, ditopt.cost_model(model, **kwargs)


# -- per-site FLOPs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dit", "wan", "pixart", "hunyuan", "cogvideox"])
def test_site_flops_equal_flop_counter_at_capture_and_at_another_size(name):
    model, kwargs = build(name)
    cost = ditopt.cost_model(model, **kwargs)
    assert set(cost.costs) == set(ditopt.sites(model, **kwargs).names())

    measured = module_flops(model, kwargs)
    for site in cost.costs:
        if site not in ("stack", "output"):  # not modules: no hook measures them
            assert cost.flops(site) == measured[site], site
    stack_blocks = [s.name for s in cost.sites if s.parent == "stack" and s.kind == "block"]
    assert cost.flops("stack") == sum(measured[b] for b in stack_blocks)
    assert cost.flops("output") >= cost.flops("stack")

    if name == "cogvideox":  # its positional embedding fixes frames, height and width at capture
        assert set(cost.dims) == {"B"}
        other = resized(kwargs, batch=3, frames=kwargs["hidden_states"].shape[1], height=8, width=8, text=6)
        other["hidden_states"] = torch.randn(3, *kwargs["hidden_states"].shape[1:])
    else:
        other = resized(kwargs)
    dims = cost.dims_for(**other)
    assert dims["B"] == 3 and dims != cost.dims
    measured = module_flops(model, other)
    for site in cost.costs:
        if site not in ("stack", "output"):
            assert cost.flops(site, **dims) == pytest.approx(measured[site], rel=0.02), site


class _EveryCountedOp(torch.nn.Module):
    """One of each op the cost model counts, on a [B, C, H, W] input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.lin = torch.nn.Linear(8, 6)
        self.w = torch.nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        h = self.conv(x)                                          # [B, 8, H, W]
        u = self.up(h)                                            # [B, 4, 2H, 2W]
        t = h.flatten(2).transpose(1, 2)                          # [B, HW, 8]
        y = self.lin(t)                                           # [B, HW, 6]
        z = torch.matmul(y, self.w) + torch.bmm(y, y.transpose(1, 2)).sum()
        q = y.unsqueeze(1)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        m = torch.addmm(self.w[0], y[0], self.w) + torch.baddbmm(z, y, self.w.expand(y.shape[0], 6, 5))
        return u.sum() + a.sum() + m.sum()


def test_node_flops_equal_flop_counter_for_every_counted_op():
    model = _EveryCountedOp()
    cap = ditopt.cost.capture_symbolic(model, x=torch.randn(2, 4, 6, 6))
    total = sum((ditopt.cost.node_flops(n, cap.expr) for n in cap.gm.graph.nodes), sympy.Integer(0))
    for shape in [(2, 4, 6, 6), (3, 4, 10, 7)]:
        x = torch.randn(*shape)
        raw = {cap.sizes[("x", i)]: shape[i] for i in (0, 2, 3)}
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        assert int(total.xreplace(raw)) == counter.get_total_flops(), shape


def test_expressions_are_polynomials_of_batch_and_tokens(dit):
    _, _, cost = dit
    assert cost.dims == {"B": 2, "S": 16} and cost.hidden == 32
    attention = cost.expr("transformer_blocks.0.attn1")
    assert attention.free_symbols == {B, S}
    assert sympy.Poly(attention, S).degree() == 2  # q k^T and attn v
    assert sympy.Poly(cost.expr("transformer_blocks.0.ff"), S).degree() == 1
    block = cost.expr("transformer_blocks.0")
    assert sympy.expand(block - attention - cost.expr("transformer_blocks.0.ff")).free_symbols == {B}  # adaLN
    assert cost.expr("transformer_blocks.0", "residual_bytes") == 4 * B * S * cost.hidden  # float32
    assert cost.cache_bytes("transformer_blocks.0", "residual", B=1, S=256) == 4 * 256 * 32
    at_32 = cost.at(S=256)
    assert at_32.flops("transformer_blocks.0") == cost.flops("transformer_blocks.0", S=256)
    assert cost.dims_for(hidden_states=(2, 4, 32, 32)) == {"B": 2, "S": 256}


def test_wan_tokens_are_frames_times_patches(wan):
    _, kwargs, cost = wan
    assert cost.dims == {"B": 1, "S": 3 * 4 * 4, "L": 6}
    assert cost.dims_for(hidden_states=(2, 4, 7, 16, 12), encoder_hidden_states=(2, 9, 32)) == \
        {"B": 2, "S": 7 * 8 * 6, "L": 9}
    assert cost.expr("blocks.0.attn2").free_symbols == {B, S, sympy.Symbol("L", integer=True, positive=True)}


# -- plans --------------------------------------------------------------------------------------

WAN_ATTN1 = f"""
version: 1
steps: {STEPS}
rules:
  - sites: "blocks.*.attn1"
    steps: "1:{STEPS}:2"
    action: reuse
"""


@pytest.mark.parametrize("model_name,plan_name", [
    ("dit", "fora-block"), ("dit", "fora-layer"), ("wan", "fora-block"), ("wan", "attn1"),
])
def test_predicted_fraction_matches_executed_flops_at_two_sizes(model_name, plan_name, dit, wan, record_property):
    model, kwargs, cost = {"dit": dit, "wan": wan}[model_name]
    plan = {"fora-block": ditopt.presets.fora(interval=2, steps=STEPS, level="block"),
            "fora-layer": ditopt.presets.fora(interval=2, steps=STEPS, level="layer"),
            "attn1": ditopt.Plan.from_yaml(WAN_ATTN1)}[plan_name]
    sizes = [kwargs, resized(kwargs, batch=kwargs["hidden_states"].shape[0], text=6)]
    fractions = []
    for size in sizes:
        # Wan runs CFG as two calls per step (cond, then uncond), as the zoo's wan-digits does.
        branches = None
        if model_name == "wan":
            uncond = {**size, "encoder_hidden_states": torch.zeros_like(size["encoder_hidden_states"])}
            branches = [size, uncond]
        measured, stats = measured_fraction(model, cost, plan, size, branches)
        dims = cost.dims_for(**size)
        calls_per_step = len(branches or [size])
        predicted = cost.predict(plan, steps_calls=calls_per_step, **dims)
        from_decisions = cost.predict(plan, decisions=stats.decisions, steps_calls=calls_per_step, **dims)
        assert predicted.compute_fraction == pytest.approx(measured, abs=0.02)
        assert from_decisions.compute_fraction == pytest.approx(measured, abs=0.02)
        assert predicted.cache_bytes_peak == stats.cache_bytes
        fractions.append((dims["S"], predicted.compute_fraction, measured))
        dims_text = ", ".join(f"{k}={v}" for k, v in dims.items())  # the row docs/BENCHMARKS.md quotes
        print(f"\n| {model_name} | {plan_name} | {dims_text} | {predicted.compute_fraction:.4f} | {measured:.4f} |")
    record_property("fractions", fractions)
    if plan_name in ("fora-layer", "attn1"):  # attention grows as S^2: reusing it saves more at larger S
        assert fractions[1][1] < fractions[0][1]


def test_predict_action_runs_nothing_and_caches_order_plus_one_steps(dit):
    model, kwargs, cost = dit
    plan = ditopt.Plan.from_yaml(f"""
version: 1
steps: {STEPS}
rules:
  - sites: "*"
    kind: block
    steps: [3, 5]
    action: predict
    order: 2
  - sites: "*"
    kind: attention
    steps: [4]
    action: reuse
""")
    for size in [kwargs, resized(kwargs, batch=2)]:
        measured, stats = measured_fraction(model, cost, plan, size)
        predicted = cost.predict(plan, **cost.dims_for(**size))
        assert predicted.compute_fraction == pytest.approx(measured, abs=0.02)
        assert predicted.cache_bytes_peak == stats.cache_bytes  # 3 steps of each block's residual


def test_adaptive_plan_is_predicted_from_the_decisions_taken(dit):
    model, kwargs, cost = dit
    plan = ditopt.presets.first_block_cache(threshold=10.0, steps=STEPS)
    with pytest.raises(ValueError, match="decisions"):
        cost.predict(plan)
    measured, stats = measured_fraction(model, cost, plan, kwargs)
    assert "reuse_residual" in stats.decisions["transformer_blocks.1"]
    predicted = cost.predict(plan, decisions=stats.decisions)
    assert predicted.compute_fraction == pytest.approx(measured, abs=0.02)
    assert predicted.cache_bytes_peak == stats.cache_bytes  # residuals + the indicator's previous output


def test_nested_reuse_counts_once(dit):
    _, _, cost = dit
    table = ditopt.Plan.from_yaml(f"""
version: 1
steps: {STEPS}
rules:
  - sites: "transformer_blocks.0"
    steps: [1]
    action: reuse_residual
  - sites: "transformer_blocks.0.attn1"
    steps: [1, 2]
    action: reuse
""")
    block, attention = cost.flops("transformer_blocks.0"), cost.flops("transformer_blocks.0.attn1")
    total = STEPS * sum(cost.flops(b) for b in cost.block_sites())
    predicted = cost.predict(table)
    assert predicted.block_flops == total - block - attention  # step 1: the block; step 2: its attention
    assert predicted.total_block_flops == total


def test_window_steps_execute_window_attention_flops_not_full_attention(dit, record_property):
    """DiT at 64 tokens, window 16 (query blocks of 16): a window step's attention executes
    4*B*H*64*16*D FLOPs instead of 4*B*H*64*64*D (a quarter); a full step that keeps the residual
    for a later window step executes both; the last full step, which no window step follows, only
    the full attention. FlopCounterMode counts the window kernel's one batched SDPA call."""
    model, kwargs, cost = dit
    plan = ditopt.Plan.from_yaml(f"""
version: 1
steps: {STEPS}
rules:
  - sites: "*"
    kind: attention
    attention: self
    steps: [1, 2, 4]
    action: window
    window: 16
""")
    size = resized(kwargs, batch=2, height=16)
    torch._dynamo.reset()
    opt = ditopt.optimize(model, plan)
    run_generation(opt, size)
    calls = executed_flops_per_call(opt, size)
    stats = ditopt.stats(opt)
    ref = module_flops(model, size)
    sites = [s.name for s in cost.sites if s.kind == "attention" and s.attention == "self"]
    batch, heads, tokens, dim = 2, 2, 64, 16
    full, window = 4 * batch * heads * tokens * tokens * dim, 4 * batch * heads * tokens * 16 * dim
    n = len(sites)
    assert stats.decisions[sites[0]] == ["compute", "window", "window", "compute", "window", "compute"]
    keeps, windowed = ref["Global"] + n * window, ref["Global"] - n * (full - window)
    assert calls == [keeps, windowed, windowed, keeps, windowed, ref["Global"]]
    blocks = sum(ref[b] for b in cost.block_sites())
    measured = (sum(calls) - len(calls) * (ref["Global"] - blocks)) / (len(calls) * blocks)
    predicted = cost.predict(plan, **cost.dims_for(**size))
    assert predicted.compute_fraction == pytest.approx(measured, rel=1e-9)
    assert predicted.cache_bytes_peak == stats.cache_bytes == n * batch * heads * tokens * dim * 4
    from_decisions = cost.predict(plan, decisions=stats.decisions, **cost.dims_for(**size))
    assert from_decisions.compute_fraction == pytest.approx(measured, rel=1e-9)
    with pytest.raises(ValueError, match="window sizes"):
        cost.predict(decisions=stats.decisions)
    record_property("window_step_fraction", calls[1] / ref["Global"])
    print(f"\nwindow step: attention {window / full:.3f} of full; the call {calls[1] / ref['Global']:.4f} of full")


# -- bad input ----------------------------------------------------------------------------------

def test_bad_input_names_what_is_wrong(dit, wan):
    _, _, cost = dit
    with pytest.raises(KeyError, match="transformer_blocks.9"):
        cost.flops("transformer_blocks.9")
    with pytest.raises(ValueError, match="unknown dim"):
        cost.flops("transformer_blocks.0", T=3)
    with pytest.raises(ValueError, match="positive int"):
        cost.flops("transformer_blocks.0", S=0)
    with pytest.raises(ValueError, match="slot"):
        cost.cache_bytes("transformer_blocks.0", "keys")
    with pytest.raises(ValueError, match="what must be"):
        cost.expr("transformer_blocks.0.attn1", "latency")
    with pytest.raises(KeyError, match="blocks.7"):
        cost.predict(decisions={"blocks.7": ["compute"]})
    with pytest.raises(ValueError, match="plan or decisions"):
        cost.predict()
    _, _, wan_cost = wan
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        wan_cost.dims_for(hidden_states=(1, 4, 3, 8, 8))  # L cannot be known


def test_fixed_size_is_an_error_not_a_wrong_number():
    model, kwargs = build("cogvideox")
    cost = ditopt.cost_model(model, **kwargs)
    with pytest.raises(ValueError, match="fixed"):
        cost.flops("transformer_blocks.0", S=96)
    with pytest.raises(ValueError, match="fixed"):
        cost.dims_for(**{**kwargs, "hidden_states": torch.randn(1, 3, 4, 16, 16)})


def test_module_cost_counts_attention_on_the_cpu_default_kernel():
    """FlopCounterMode alone counts SDPA's CPU flash kernel as 0; ModuleCost must not."""
    from ditopt.flops import ModuleCost

    class Attend(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    net = torch.nn.Sequential(Attend())
    q = torch.randn(2, 3, 16, 8)
    default = ModuleCost(net, ["0"])
    with default.counting():
        out_default = net(q)
    with sdpa_kernel(SDPBackend.MATH):
        math_kernel = ModuleCost(net, ["0"])
        with math_kernel.counting():
            net(q)
    assert default.flops["0"] == math_kernel.flops["0"] == 4 * 2 * 3 * 16 * 16 * 8
    assert torch.equal(out_default, net(q))  # counting does not change the kernel that runs
