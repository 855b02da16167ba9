"""The dynamo backend, ``optimize()``, ``stats()`` and ``reset()``.

Both entry points run the same pass pipeline on the graph dynamo captures:

- ``ditopt.optimize(model, plan)`` compiles with ``DitoptBackend(inductor=False)``: the
  rewritten graph runs as Python, with skip branches lowered to plain ``if``;
- ``torch.compile(model, backend="ditopt", options={"plan": plan})`` runs the passes and hands
  the rewritten graph (conds and custom ops included) to inductor.

The model itself is never modified: dynamo wraps it, and the cache lives in a
:class:`~ditopt.runtime.Runtime` attached to the wrapper.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.eval_frame import OptimizedModule

from ditopt.passes import PassContext, run_pipeline
from ditopt.runtime import Runtime, find_runtime

from .capture import lean_tracing
from .errors import CaptureError, DitoptError, PlanError
from .plan import Plan
from .sites import OUTPUT, STACK, SiteTable, find_sites

PlanLike = Plan | str | Path | dict


def as_plan(plan: PlanLike) -> Plan:
    """A Plan from a Plan, a YAML file path, YAML text or a dict."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, Path) or (isinstance(plan, str) and "\n" not in plan and plan.endswith((".yaml", ".yml"))):
        return Plan.load(plan)
    if isinstance(plan, str):
        return Plan.from_yaml(plan)
    raise PlanError(f"expected a Plan, a YAML path or YAML text, got {type(plan).__name__}")


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy the passes may rewrite; dynamo keeps using the graph it handed us."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        new.meta = dict(old.meta)
    return fx.GraphModule(gm, graph)


class DitoptBackend:
    """A dynamo backend that rewrites each captured graph according to ``plan``.

    Example:
        >>> import torch, ditopt
        >>> backend = DitoptBackend(ditopt.presets.fora(interval=2, steps=4), inductor=False)
        >>> callable(backend)
        True
    """

    def __init__(self, plan: PlanLike, runtime: Runtime | None = None, *, inductor: bool = True,
                 timestep_arg: str = "timestep", observe: bool = False):
        self.plan = as_plan(plan)
        self.observe = observe
        self.runtime = runtime
        self.inductor = inductor
        self.timestep_arg = timestep_arg
        self.last: dict[str, Any] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        params = {id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)}
        runtime = self.runtime or find_runtime(params) or Runtime()
        runtime.param_ids |= params
        self.runtime = runtime
        original = gm
        gm = _copy_graph_module(gm)
        sites = find_sites(gm.graph)
        compiled_plan = self.plan.compile(sites)  # raises PlanError before anything is rewritten
        graph_id = len(runtime.graphs)
        ctx = PassContext(sites=sites, runtime_id=runtime.id, graph_id=graph_id, inductor=self.inductor,
                          timestep=self.timestep_arg, observe=self.observe)
        report = run_pipeline(gm, ctx, compiled_plan, inductor=self.inductor)
        runtime.set_graph(graph_id, gm.meta["ditopt"]["decisions"])
        self.last = {"original": original, "rewritten": gm, "sites": sites, "report": report,
                     "plan": compiled_plan}
        runtime.last_compile = self.last
        token = torch.zeros(1, dtype=torch.int64)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, [*example_inputs, token])
            return lambda *args: compiled(*args, token)
        return lambda *args: gm(*args, token)


def compile_graph(gm: fx.GraphModule, plan: PlanLike, example_inputs: list[Any], *, inductor: bool = False,
                  timestep_arg: str = "timestep", runtime: Runtime | None = None):
    """Rewrite an already captured graph (e.g. from ``torch.fx.symbolic_trace``) and return a
    callable taking the graph's positional inputs, plus the backend (``.runtime``, ``.last``).

    Shapes come from running ``example_inputs`` through the graph once (ShapeProp).

    Example:
        >>> import torch, torch.fx as fx, ditopt
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.qkv = torch.nn.Linear(4, 12)
        ...     def forward(self, x):
        ...         q, k, v = self.qkv(x).chunk(3, -1)
        ...         return x + torch.nn.functional.scaled_dot_product_attention(q, k, v)
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = torch.nn.ModuleList(Block() for _ in range(2))
        ...     def forward(self, x, timestep):
        ...         for b in self.blocks:
        ...             x = b(x)
        ...         return x
        >>> gm = fx.symbolic_trace(Net())
        >>> plan = ditopt.presets.fora(interval=2, steps=2, level="block")
        >>> run, backend = compile_graph(gm, plan, [torch.randn(3, 4), torch.tensor([1.0])])
        >>> run(torch.ones(3, 4), torch.tensor([1.0]))[0].shape
        torch.Size([3, 4])
    """
    from torch.fx.passes.shape_prop import ShapeProp

    if not any("example_value" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes):
        ShapeProp(gm).propagate(*example_inputs)
    backend = DitoptBackend(plan, runtime or Runtime(), inductor=inductor, timestep_arg=timestep_arg)
    compiled = backend(gm, list(example_inputs))

    def run(*args):
        out = compiled(*args)
        return out if isinstance(out, (tuple, list)) else (out,)

    return run, backend


def ditopt_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None):
    """The registered backend: ``torch.compile(model, backend="ditopt", options={"plan": plan})``.

    Options: ``plan`` (required: a Plan, a YAML path or text), ``timestep_arg`` (default
    ``"timestep"``), ``inductor`` (default True; False runs the rewritten graph as Python).
    """
    options = dict(options or {})
    if "plan" not in options:
        raise PlanError("backend 'ditopt' needs options={'plan': ...}")
    backend = DitoptBackend(options.pop("plan"), inductor=options.pop("inductor", True),
                            timestep_arg=options.pop("timestep_arg", "timestep"))
    if options:
        raise PlanError(f"unknown ditopt backend option(s): {sorted(options)}")
    return backend(gm, example_inputs)


def _register_backend() -> None:
    from torch._dynamo.backends import registry

    has_entry_point = bool(importlib.metadata.entry_points(group="torch_dynamo_backends", name="ditopt"))
    if not has_entry_point and "ditopt" not in registry._COMPILER_FNS:
        registry.register_backend(ditopt_backend, name="ditopt")


_register_backend()


class DitoptModule(OptimizedModule):
    """What ``optimize()`` returns: dynamo's wrapper (so a pipeline sees the original module's
    attributes, ``config``, ``dtype`` and ``device``) that reports plan errors unwrapped."""

    def __call__(self, *args, **kwargs):
        try:
            if self._ditopt_runtime.graphs:
                return super().__call__(*args, **kwargs)
            with lean_tracing():  # the first call captures the model
                return super().__call__(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, DitoptError):
                raise inner from None
            raise
        except torch._dynamo.exc.TorchDynamoException as exc:  # dynamo could not trace the model
            name = type(self._orig_mod).__name__
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"could not capture {name} as one graph: dynamo raised {type(exc).__name__}: "
                               f"{first}") from exc


def candidate_site_names(model: torch.nn.Module) -> list[str]:
    """Module paths a plan may name, known before capture (the graph decides the rest)."""
    return [STACK, OUTPUT, *(name for name, _ in model.named_modules() if name)]


def optimize(model: torch.nn.Module, plan: PlanLike, *, timestep_arg: str = "timestep",
             observe: bool = False) -> torch.nn.Module:
    """Make ``model`` reuse features as ``plan`` says; a drop-in replacement for the model.

    The plan is checked at once against the model's module paths (a plan for another model,
    unknown sites, bad steps fail here, naming rule and site); the graph is captured on the
    first call, where the plan is resolved against the sites found in it. ``observe`` adds the
    profiler's observer nodes (see :func:`ditopt.profile`).

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
        >>> x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
        >>> with torch.no_grad():
        ...     for t in (999, 700, 400, 100):
        ...         _ = fast(x, timestep=torch.tensor([t]), class_labels=y)
        >>> ditopt.stats(fast).decisions["transformer_blocks.1.attn1"]
        ['compute', 'reuse', 'compute', 'reuse']
    """
    if isinstance(model, OptimizedModule):
        raise DitoptError("optimize() takes the original model, not a torch.compile'd one")
    plan = as_plan(plan)
    if plan.model and plan.model != type(model).__name__:
        raise PlanError(f"plan was made for {plan.model}, not {type(model).__name__}")
    plan.check_patterns(candidate_site_names(model))
    runtime = Runtime()
    runtime.param_ids = {id(p) for p in model.parameters()}
    backend = DitoptBackend(plan, runtime, inductor=False, timestep_arg=timestep_arg, observe=observe)
    _make_room_for_another_model()
    wrapped = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    wrapped.__class__ = DitoptModule
    object.__setattr__(wrapped, "_ditopt_runtime", runtime)
    object.__setattr__(wrapped, "_ditopt_backend", backend)
    return wrapped


def _make_room_for_another_model(limit: int = 256) -> None:
    """Dynamo keys compiled code by the code object of ``forward``, which every instance of a
    class shares, and each optimised model adds its own entry (its backend and parameters
    differ). Past dynamo's default of 8 entries, the ninth model of one class in a process
    (trying plans, a benchmark) would fail with a recompile-limit error under fullgraph=True."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


def runtime_of(model: torch.nn.Module) -> Runtime:
    rt = model.__dict__.get("_ditopt_runtime")
    if rt is not None:
        return rt
    inner = model._orig_mod if isinstance(model, OptimizedModule) else model
    rt = find_runtime({id(p) for p in inner.parameters()})
    if rt is None:
        raise DitoptError(f"{type(inner).__name__} has not been optimised by ditopt (or not yet called)")
    return rt


@dataclass
class Stats:
    """What the runtime did in the last generation.

    ``decisions[site]`` has one entry per call: compute, reuse, reuse_residual or skipped.
    """

    decisions: dict[str, list[str]]
    cache_bytes: int
    step: int
    generation: int
    calls: int
    graphs: int


def stats(model: torch.nn.Module) -> Stats:
    rt = runtime_of(model)
    return Stats(decisions=rt.decisions(), cache_bytes=rt.store.nbytes, step=rt.state.step,
                 generation=rt.state.generation, calls=len(rt.records), graphs=len(rt.graphs))


def set_plan(model: torch.nn.Module, plan: PlanLike) -> None:
    """Give an optimised model another static plan without recompiling.

    The rewritten graph holds a skip branch and cache nodes for every site its plan addresses;
    which way each branch goes at each step is a table in the runtime. A plan that addresses the
    same sites, with the same cache slots and no ``when`` rules, needs only a new table: this
    swaps it and resets the caches. Anything else raises :class:`PlanError` and leaves the model
    as it was (optimise again for a plan of another shape).

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
        >>> x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
        >>> def generate():
        ...     ditopt.reset(fast)
        ...     with torch.no_grad():
        ...         for t in (999, 700, 400, 100):
        ...             _ = fast(x, timestep=torch.tensor([t]), class_labels=y)
        >>> generate()
        >>> ditopt.set_plan(fast, ditopt.presets.fora(interval=3, steps=4))
        >>> generate(); ditopt.stats(fast).decisions["transformer_blocks.1.attn1"]
        ['compute', 'reuse', 'reuse', 'compute']
    """
    backend = model.__dict__.get("_ditopt_backend")
    if backend is None:
        raise DitoptError("set_plan() takes a model returned by ditopt.optimize()")
    plan = as_plan(plan)
    rt = runtime_of(model)
    if not rt.graphs or not backend.last:
        raise DitoptError("the model has not been called yet: there is no compiled graph to re-plan")
    compiled = plan.compile(backend.last["sites"])
    tables = {}
    for graph, old in rt.graphs.items():
        if compiled.when_rules or old.when_rules:
            raise PlanError("set_plan() swaps static plans only; this plan or the model's has `when` rules")
        if set(compiled.actions) != set(old.actions) or dict(compiled.slots) != dict(old.slots):
            raise PlanError(f"plan {plan.name or ''!r} addresses other sites than the compiled graph "
                            f"({sorted(compiled.actions)} vs {sorted(old.actions)}); optimise again instead")
        if compiled.steps != old.steps:
            raise PlanError(f"plan has {compiled.steps} steps, the compiled graph {old.steps}")
        tables[graph] = replace(old, actions=compiled.actions, adaptive=compiled.adaptive,
                                orders=dict(getattr(compiled, "orders", {})))
    for graph, table in tables.items():
        rt.set_graph(graph, table)
    backend.plan = plan
    rt.reset()


def reset(model: torch.nn.Module) -> None:
    """Forget caches and step state: the next call starts a new generation."""
    runtime_of(model).reset()


def set_step(model: torch.nn.Module, step: int, branch: int = 0) -> None:
    """Tell the runtime which step (and CFG branch) the next call is, overriding detection."""
    runtime_of(model).state.set(step, branch)


def sites(model: torch.nn.Module, *args, **example_inputs) -> SiteTable:
    """The sites of ``model``, found in the graph captured from one call with these inputs.

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> table = ditopt.sites(model, hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([1]),
        ...                      class_labels=torch.tensor([1]))
        >>> [(s.name, s.kind) for s in table][:3]
        [('output', 'output'), ('stack', 'stack'), ('transformer_blocks.0', 'block')]
    """
    from .capture import capture

    if isinstance(model, OptimizedModule):
        model = model._orig_mod
    cap = capture(model, *args, **example_inputs)
    table = find_sites(cap.gm.graph)
    table.model = type(model).__name__
    return table


__all__ = ["DitoptBackend", "DitoptModule", "Stats", "as_plan", "ditopt_backend", "optimize", "reset",
           "runtime_of", "set_step", "sites", "stats", "CaptureError"]
