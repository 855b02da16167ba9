"""Small hand-written DiT-like models for the pass and stack tests, and what they need.

The models are traced with ``torch.fx.symbolic_trace`` (they have no data-dependent control
flow), so ditopt must find their sites from the graph exactly as it does for real models:

    Stack(depth, dim)           forward(x, timestep)
        t_embed                 sinusoidal timestep embedding -> Linear -> SiLU -> Linear
        blocks.i                Block: adaLN modulation from temb,
                                       x = x + attn(modulate(norm1(x)))     (SDPA)
                                       x = x + ff(modulate(norm2(x)))       (Linear-GELU-Linear)
        norm_out, proj_out      the head, after the stack

    DualStack(depth, dim)       forward(x, context, timestep): blocks with two live-outs, a joint
                                attention over the concatenated streams and one ff per stream

``Stack(..., counting=True)`` calls the custom op ``ditopt_test::count`` inside each block's
work; ``COUNTS[i]`` is how many times block ``i``'s work really ran, so a test can see that a
reused block was skipped and not merely overwritten.

:class:`HandCache` is the reference: the meaning of a per-block plan written out by hand
(run the blocks one by one; compute, or reuse the output or residual of the last step that
computed), sharing no code with ditopt.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import ditopt
from ditopt.passes import EAGER_ONLY, PIPELINE, PassContext, annotate_decisions
from ditopt.passes.annotations import graph_annotation
from ditopt.runtime import Runtime

COUNTS: Counter[int] = Counter()


@torch.library.custom_op("ditopt_test::count", mutates_args=())
def count(x: torch.Tensor, index: int) -> torch.Tensor:
    """Count one execution of block ``index``'s work; returns a copy of ``x``."""
    COUNTS[index] += 1
    return x.clone()


@count.register_fake
def _(x, index):
    return torch.empty_like(x)


# -- models -----------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = timestep[:, None].float() * freqs[None]
        return self.linear_2(F.silu(self.linear_1(torch.cat([torch.cos(angles), torch.sin(angles)], -1))))


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """adaLN-modulated self-attention and feed-forward, each added to the residual stream."""

    def __init__(self, dim: int, index: int | None = None):
        super().__init__()
        self.index = index  # set: count this block's work with ditopt_test::count
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 4 * dim)
        self.attn = Attention(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.ada(F.silu(temb)).chunk(4, -1)
        x = x + self.attn(modulate(self.norm1(x), shift1, scale1))
        h = modulate(self.norm2(x), shift2, scale2)
        if self.index is not None:
            h = count(h, self.index)
        return x + self.ff(h)


class Stack(nn.Module):
    """A DiT: timestep embedding, ``depth`` blocks in ``self.blocks``, a head."""

    def __init__(self, depth: int, dim: int, *, counting: bool = False):
        super().__init__()
        self.t_embed = TimestepEmbedding(dim)
        self.blocks = nn.ModuleList(Block(dim, i if counting else None) for i in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, dim)

    def embed(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.t_embed(timestep)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.norm_out(x))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = self.embed(timestep)
        for block in self.blocks:
            x = block(x, temb)
        return self.head(x)


class JointAttention(nn.Module):
    """One attention over the concatenation of two token streams (MM-DiT style)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv_x = nn.Linear(dim, 3 * dim)
        self.qkv_context = nn.Linear(dim, 3 * dim)
        self.out_x = nn.Linear(dim, dim)
        self.out_context = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qx, kx, vx = self.qkv_x(x).chunk(3, -1)
        qc, kc, vc = self.qkv_context(context).chunk(3, -1)
        q, k, v = torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1)
        o = F.scaled_dot_product_attention(q, k, v)
        n = context.shape[1]
        return self.out_x(o[:, n:]), self.out_context(o[:, :n])


class DualBlock(nn.Module):
    """A dual-stream block: two live-outs, ``x`` and ``context``, each in residual form."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 4 * dim)
        self.attn = JointAttention(dim)
        self.ff_x = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, x, context, temb):
        shift_x, scale_x, shift_c, scale_c = self.ada(F.silu(temb)).chunk(4, -1)
        ax, ac = self.attn(modulate(self.norm(x), shift_x, scale_x), modulate(self.norm(context), shift_c, scale_c))
        x = x + ax
        context = context + ac
        return x + self.ff_x(self.norm(x)), context + self.ff_context(self.norm(context))


class DualStack(nn.Module):
    def __init__(self, depth: int, dim: int):
        super().__init__()
        self.t_embed = TimestepEmbedding(dim)
        self.blocks = nn.ModuleList(DualBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def embed(self, timestep):
        return self.t_embed(timestep)

    def head(self, x, context):
        return self.proj_out(x), context

    def forward(self, x, context, timestep):
        temb = self.embed(timestep)
        for block in self.blocks:
            x, context = block(x, context, temb)
        return self.head(x, context)


def make_stack(depth: int = 2, dim: int = 8, *, counting: bool = False, seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack(depth, dim, counting=counting).eval().requires_grad_(False)


def make_dual_stack(depth: int = 2, dim: int = 8, *, seed: int = 0) -> DualStack:
    torch.manual_seed(seed)
    return DualStack(depth, dim).eval().requires_grad_(False)


def timesteps(n: int) -> list[torch.Tensor]:
    """``n`` decreasing timesteps, as a sampler would pass them (a float tensor per step)."""
    return [torch.tensor([1000.0 - i * 1000.0 / n]) for i in range(n)]


def latents(n: int, *, batch: int = 1, seq: int = 5, dim: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """``n`` random hidden-state tensors: a different input per call, as in a denoising loop."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, dim, generator=g) for _ in range(n)]


# -- plans --------------------------------------------------------------------------------------

def block_plan(steps: int, table: dict[int, tuple[str, list[int]]]) -> ditopt.Plan:
    """A plan from ``{block index: (action, reuse steps)}``: one rule per block."""
    rules = [{"sites": f"blocks.{i}", "kind": "block", "steps": list(reuse_steps), "action": action}
             for i, (action, reuse_steps) in sorted(table.items()) if reuse_steps]
    rules = rules or [{"sites": "*", "action": "compute"}]
    return ditopt.Plan.from_dict({"version": 1, "steps": steps, "rules": rules})


# -- the reference -------------------------------------------------------------------------------

class HandCache:
    """What a per-block plan means, by hand: ``actions[i][step]`` is block i's action.

    A computing block runs and remembers its outputs and residuals (outputs minus inputs) per
    CFG branch; ``reuse`` returns the remembered outputs, ``reuse_residual`` the fresh inputs
    plus the remembered residuals. Works for blocks with one or two streams.
    """

    def __init__(self, model: nn.Module, actions: dict[int, dict[int, str]]):
        self.model = model
        self.actions = actions
        self.cache: dict[tuple[int, int], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}

    @torch.no_grad()
    def __call__(self, step: int, branch: int, *streams: torch.Tensor, timestep: torch.Tensor):
        temb = self.model.embed(timestep)
        for i, block in enumerate(self.model.blocks):
            action = self.actions.get(i, {}).get(step, "compute")
            if action == "compute":
                out = block(*streams, temb)
                out = out if isinstance(out, tuple) else (out,)
                self.cache[branch, i] = (out, tuple(o - s for o, s in zip(out, streams)))
            elif action == "reuse":
                out = self.cache[branch, i][0]
            elif action == "reuse_residual":
                out = tuple(s + r for s, r in zip(streams, self.cache[branch, i][1]))
            else:
                raise ValueError(action)
            streams = out
        out = self.model.head(*streams)
        return out if isinstance(out, tuple) else (out,)


def actions_of(table: dict[int, tuple[str, list[int]]]) -> dict[int, dict[int, str]]:
    """``block_plan``'s table as ``{block: {step: action}}`` for :class:`HandCache`."""
    return {i: {s: action for s in reuse_steps} for i, (action, reuse_steps) in table.items()}


# -- running passes by hand -----------------------------------------------------------------------

def trace(model: nn.Module, *example_inputs) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*example_inputs)
    return gm


@dataclass
class Prepared:
    """A traced model with everything a pass needs, set up as ``DitoptBackend`` does."""

    gm: fx.GraphModule
    sites: Any
    compiled: Any
    ctx: PassContext
    runtime: Runtime

    def annotate(self):
        return annotate_decisions(self.gm, self.ctx, self.compiled)

    def run_up_to(self, last=None, *, eager: bool = True) -> list:
        """Annotate, then run the pipeline in order up to and including pass ``last`` (or all of
        it, with the eager-only passes when ``eager``)."""
        results = [self.annotate()]
        for p in PIPELINE + (EAGER_ONLY if eager else []):
            results.append(p(self.gm, self.ctx))
            if p is last:
                break
        return results

    def __call__(self, *args) -> tuple[torch.Tensor, ...]:
        """Run the rewritten graph, registering its decisions and passing the token."""
        self.compiled.runs = dict(graph_annotation(self.gm).coalesced)  # as the backend does
        self.runtime.set_graph(0, self.compiled)
        with torch.no_grad():
            self.gm.recompile()  # passes edit the graph; run_pipeline regenerates the code once, as here
            out = self.gm(*args, torch.zeros(1, dtype=torch.int64))
        return out if isinstance(out, tuple) else (out,)


def prepare(model: nn.Module, plan: ditopt.Plan, example_inputs, *, inductor: bool = False,
            coalesce: bool = False) -> Prepared:
    """``coalesce`` is off by default: the pass tests look at one site's rewrite at a time."""
    gm = trace(model, *example_inputs)
    sites = ditopt.find_sites(gm.graph)
    compiled = plan.compile(sites)
    runtime = Runtime()
    ctx = PassContext(sites=sites, runtime_id=runtime.id, graph_id=0, inductor=inductor, coalesce=coalesce)
    return Prepared(gm, sites, compiled, ctx, runtime)


# -- reading graphs --------------------------------------------------------------------------------

def targets(gm: fx.GraphModule, *, nested: bool = False) -> Counter:
    """How many call_function nodes call each target (in branch subgraphs too if ``nested``)."""
    modules = [m for m in gm.modules() if isinstance(m, fx.GraphModule)] if nested else [gm]
    return Counter(n.target for m in modules for n in m.graph.nodes if n.op == "call_function")


def snapshot(gm: fx.GraphModule) -> str:
    """The graph and every subgraph as text, to check that a pass changed nothing."""
    return "\n".join(f"{name}:\n{m.graph}" for name, m in gm.named_modules() if isinstance(m, fx.GraphModule))


def eager(model: nn.Module, *args) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(*args)
    return out if isinstance(out, tuple) else (out,)


DECIDE = torch.ops.ditopt.decide.default
CACHE_LOAD = torch.ops.ditopt.cache_load.default
CACHE_STORE = torch.ops.ditopt.cache_store.default
BEGIN_STEP = torch.ops.ditopt.begin_step.default
UPDATE_INDICATOR = torch.ops.ditopt.update_indicator.default
COND = torch.ops.higher_order.cond
SDPA = F.scaled_dot_product_attention


# -- a plan with nested sites ----------------------------------------------------------------------

NESTED_STEPS = 4


def nested_plan(attn_action: str = "reuse") -> ditopt.Plan:
    """blocks.0 reuses its residual at step 2; its attention takes ``attn_action`` at 1 and 3."""
    return ditopt.Plan.from_dict({"version": 1, "steps": NESTED_STEPS, "rules": [
        {"sites": "blocks.0", "kind": "block", "steps": [2], "action": "reuse_residual"},
        {"sites": "blocks.0.attn", "steps": [1, 3], "action": attn_action},
    ]})


@torch.no_grad()
def hand_nested(model: Stack, xs, ts, attn_action: str = "reuse") -> list[torch.Tensor]:
    """``nested_plan`` by hand. The attention reuses what it computed at the last step it ran:
    step 0, since at step 2 the whole block was skipped."""
    block, block_residual, outs = model.blocks[0], None, []
    attn_cache = {}

    def remember(module, args, out):
        attn_cache.update(out=out, residual=out - args[0])

    def reuse(module, args, out):
        return attn_cache["out"] if attn_action == "reuse" else args[0] + attn_cache["residual"]

    for step, (x, t) in enumerate(zip(xs, ts)):
        temb = model.embed(t)
        if step == 2:
            h = x + block_residual
        else:
            hook = block.attn.register_forward_hook(reuse if step in (1, 3) else remember)
            h = block(x, temb)
            hook.remove()
            block_residual = h - x
        outs.append(model.head(model.blocks[1](h, temb)))
    return outs
