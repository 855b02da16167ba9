"""The dynamo backend: rewrite each graph dynamo captures according to a plan.

Both entry points run the same pass pipeline on the graph dynamo captures:

- ``ditopt.optimize(model, plan)`` (:mod:`ditopt.api`) compiles with
  ``DitoptBackend(inductor=False)``: the rewritten graph runs as Python, with skip branches
  lowered to plain ``if``;
- ``torch.compile(model, backend="ditopt", options={"plan": plan})`` runs the passes and hands
  the rewritten graph (conds and custom ops included) to inductor.

Per captured graph: find the sites, ``Plan.compile`` them into the one
:class:`~ditopt.runtime.DecisionTable`, run the passes (which read only node annotations),
and hand the table straight to :meth:`Runtime.set_graph`. What was compiled is kept as a
:class:`CompiledGraph`. The model itself is never modified.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from ditopt.passes import PassContext, run_pipeline
from ditopt.passes.attention_backend import check_attention_backend
from ditopt.passes.annotations import graph_annotation
from ditopt.runtime import DecisionTable, Runtime

from .errors import CaptureError, PlanError
from .plan import Plan
from .regional import (RegionalError, decompose_calls_for_inductor, expand_block_calls, has_block_calls,
                       lower_calls_for_eager, split_regions)
from .sites import SiteTable

PlanLike = Plan | str | Path | dict


def as_plan(plan: PlanLike) -> Plan:
    """A checked Plan from a Plan, a plan file path, YAML text or a dict (:meth:`Plan.coerce`)."""
    return Plan.coerce(plan)


@dataclass
class CompiledGraph:
    """One graph the backend rewrote: the graph dynamo captured (``original``, untouched), the
    rewritten one, the sites found in the original, the decision table the runtime indexes
    under ``graph_id``, ``[(pass, modified)]`` from the pipeline, and the seconds each stage took."""

    graph_id: int
    original: fx.GraphModule
    rewritten: fx.GraphModule
    sites: SiteTable
    table: DecisionTable
    report: list[tuple[str, bool]]
    seconds: dict[str, float] = field(default_factory=dict)  # find_sites, compile_plan, passes, inductor


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy the passes may rewrite; dynamo keeps using the graph it handed us."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        new.meta = dict(old.meta)
    return _LazyGraphModule(gm, graph)  # its code is generated when first run or read


class DitoptBackend:
    """A dynamo backend that rewrites each captured graph according to ``plan``.

    ``observe`` inserts the profiler's observer nodes (:func:`ditopt.profile` sets it);
    ``coalesce=False`` keeps one region per site (``coalesce_regions`` off); ``parallel`` (a
    :class:`ditopt.SequenceParallel`) shards the token dimension over the ranks of a process group;
    ``attention_backend`` (auto | sdpa | flash | sage | flex) is the kernel SDPA calls move to
    (``passes/attention_backend.py``; checked here, with the package a named kernel needs).
    ``last`` is the :class:`CompiledGraph` of the latest graph compiled.

    Example:
        >>> import torch, ditopt
        >>> backend = DitoptBackend(ditopt.presets.fora(interval=2, steps=4), inductor=False)
        >>> callable(backend), backend.last
        (True, None)
    """

    def __init__(self, plan: PlanLike, runtime: Runtime | None = None, *, inductor: bool = True,
                 timestep_arg: str = "timestep", observe: bool = False, coalesce: bool = True,
                 parallel: Any = None, attention_backend: str = "sdpa", model_name: str | None = None):
        self.plan = as_plan(plan)
        self.model_name = model_name  # the model's class: a plan made for another class is refused
        self.attention_backend = check_attention_backend(attention_backend)
        self.parallel = parallel  # a ditopt.SequenceParallel: shard the tokens over its ranks
        self.observe = observe
        self.coalesce = coalesce
        self._runtime = None if runtime is None else weakref.ref(runtime)
        self.inductor = inductor
        self.timestep_arg = timestep_arg
        self.timestep_position: int | None = None  # its position in forward's arguments, where known
        self.last: CompiledGraph | None = None

    def _compile_plan(self, sites: SiteTable) -> DecisionTable:
        if not sites.sites:  # no block, no attention: a piece of a model dynamo split, or no DiT at all
            raise CaptureError("this graph has no site (no list of blocks that hold attention): if torch.compile "
                               "split the model at graph breaks, each piece reaches ditopt alone; ditopt needs the "
                               "model as one graph: torch.compile(..., fullgraph=True) names the break")
        if self.model_name and sites.model is None:
            sites.model = self.model_name
        return self.plan.compile(sites)

    @property
    def runtime(self) -> Runtime | None:
        """The runtime this backend compiles for (held weakly: its wrapper owns it)."""
        return None if self._runtime is None else self._runtime()

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        try:
            return self._compile(gm, example_inputs)
        except BaseException:  # a graph refused for a new shape: the call raises, and ends the generation
            if self.runtime is not None:
                self.runtime.end_generation()
            raise

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]):
        _refuse_symbolic_shapes(gm)
        runtime = self.runtime
        if runtime is None:  # a backend made without one owns its runtime
            runtime = self._owned = Runtime()
            self._runtime = weakref.ref(runtime)
        runtime.backend = self
        original = gm
        clock = [time.perf_counter()]

        def lap() -> float:
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        # marked blocks: one subgraph per kind of block, called per block with its weights (ditopt.regional)
        if has_block_calls(gm):  # on a copy: dynamo keeps reading the graph it handed us
            gm = original = _copy_graph_module(gm)
        try:
            weights = expand_block_calls(gm, example_inputs)
        except RegionalError:
            raise
        except Exception as exc:  # dynamo's or torch's, tracing a block alone
            raise RegionalError(f"a marked block could not be traced alone: {type(exc).__name__}: {exc}") from exc
        expanded = lap()
        # the sites as if no block were marked; the plan raises PlanError before anything is rewritten;
        # the calls of marked blocks the plan treats as a whole stay calls (ditopt.regional)
        # (profiling and sequence parallelism keep no call: they rewrite inside every block)
        split = split_regions(_copy_graph_module(gm), self._compile_plan, observe=self.observe or self.parallel is not None,
                              copy=_copy_graph_module)
        gm, sites, table, seconds = split.graph, split.graph_sites, split.graph_table, dict(split.seconds)
        lap()
        if weights:
            seconds = {"expand_blocks": expanded, **seconds}
        signature = _input_signature(example_inputs)
        graph_id = _graph_like(runtime, table, signature)
        device = _model_device(example_inputs)
        ctx = PassContext(sites=sites, runtime_id=runtime.id, graph_id=graph_id, inductor=self.inductor,
                          timestep=self.timestep_arg, timestep_position=self.timestep_position,
                          observe=self.observe, device=device,
                          coalesce=self.coalesce, parallel=self.parallel,
                          attention_backend=self.attention_backend)
        report = run_pipeline(gm, ctx, table, inductor=self.inductor)
        seconds["passes"] = lap()
        table.runs = dict(graph_annotation(gm).coalesced)  # the runs coalesce_regions made one region
        runtime.set_graph(graph_id, table)
        runtime.signatures[graph_id] = signature
        captured = original if split.flat is None else split.flat  # where split.sites' nodes are
        self.last = CompiledGraph(graph_id, captured, gm, split.sites, table, report, seconds)
        token = torch.zeros(1, dtype=torch.int64, device=device)  # where the graph's tensors are: no transfers
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            decompose_calls_for_inductor(gm)  # the calls of marked blocks (ditopt.regional)
            compiled = compile_fx(gm, [*example_inputs, *weights.fakes, token])
            seconds["inductor"] = lap()
            if weights:
                return runtime.guarded(lambda *args: compiled(*args, *weights.values(), token))
            return runtime.guarded(lambda *args: compiled(*args, token))
        lower_calls_for_eager(gm)  # the kept calls of marked blocks: plain calls of their subgraph
        if weights:
            return runtime.guarded(lambda *args: gm(*args, *weights.values(), token))
        return runtime.guarded(lambda *args: gm(*args, token))


def _refuse_symbolic_shapes(gm: fx.GraphModule) -> None:
    """A graph whose inputs have symbolic sizes (dynamo's automatic dynamic shapes, after a second
    batch size or resolution, or ``dynamic=True``): its caches and skip branches need static ones.
    (A symbolic stride alone, WanPipeline's at one frame, is no size: that graph is compiled.)"""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and not all(isinstance(d, int) for d in value.shape):
            raise CaptureError(f"graph input {node.target!r} has symbolic sizes {tuple(value.shape)}: ditopt compiles "
                               f"one graph per input shape; pass dynamic=False to torch.compile(..., backend=\"ditopt\")")


def _input_signature(example_inputs: list[Any]) -> tuple:
    """What a graph's cached tensors depend on in its inputs: each tensor's shape, dtype and
    device (not its strides), each other input's type and value. A symbolic scalar (a stride
    dynamo made dynamic) is left out: a symbolic size shows in its tensor's shape."""
    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    return tuple((tuple(map(str, t.shape)), t.dtype, t.device) if isinstance(t, torch.Tensor)
                 else (type(t).__name__, repr(t)) for t in example_inputs if not isinstance(t, symbolic))


def _graph_like(runtime: Runtime, table: DecisionTable, signature: tuple) -> int:
    """The graph id for a new graph: that of a graph compiled before for inputs of the same shapes
    and the same decisions, else the next one.

    Dynamo compiles a graph again when only an input's strides changed (WanPipeline's latents at
    one frame, after the scheduler's first step, differ from the first call's in the stride of a
    size-1 dimension). The two graphs compute the same tensors: sharing one id, the second reads
    the caches the first stored, and the step the plan reuses is not computed again."""
    for graph, old in runtime.graphs.items():
        if runtime.signatures.get(graph) == signature and replace(old, runs={}) == replace(table, runs={}):
            return graph
    return len(runtime.graphs)


def _model_device(example_inputs: list[Any]) -> torch.device:
    """The device of the model's parameters (else of its first tensor input, else the CPU)."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    params = [t for t in tensors if isinstance(t, torch.nn.Parameter)]
    return (params or tensors or [torch.empty(0)])[0].device


def backend_of(runtime: Runtime) -> DitoptBackend | None:
    """The backend that last compiled a graph for ``runtime`` (also through ``torch.compile``)."""
    return runtime.backend


def compile_graph(gm: fx.GraphModule, plan: PlanLike, example_inputs: list[Any], *, inductor: bool = False,
                  timestep_arg: str = "timestep", runtime: Runtime | None = None, coalesce: bool = True):
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
    backend = DitoptBackend(plan, runtime, inductor=inductor, timestep_arg=timestep_arg,
                            coalesce=coalesce)
    compiled = backend(gm, list(example_inputs))

    def run(*args):
        out = compiled(*args)
        return out if isinstance(out, (tuple, list)) else (out,)

    return run, backend


def ditopt_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None):
    """The registered backend: ``torch.compile(model, backend="ditopt", options={"plan": plan})``.

    Options: ``plan`` (required: a Plan, a YAML path or text), ``timestep_arg`` (default
    ``"timestep"``), ``inductor`` (default True; False runs the rewritten graph as Python),
    ``coalesce`` (default True: runs of adjacent sites that decide alike share one region and cache),
    ``parallel`` (a :class:`ditopt.SequenceParallel`: shard the tokens over the ranks of a process group),
    ``attention_backend`` (default ``"sdpa"``; auto | flash | sage | flex: the kernel SDPA calls move to).
    """
    options = dict(options or {})
    if "plan" not in options:
        raise PlanError("backend 'ditopt' needs options={'plan': ...}")
    wrapper = _calling_wrapper()
    _own_cache_entries(wrapper)
    runtime = runtime_of_compile_call(wrapper)
    backend = DitoptBackend(options.pop("plan"), runtime, inductor=options.pop("inductor", True),
                            timestep_arg=options.pop("timestep_arg", "timestep"),
                            coalesce=options.pop("coalesce", True), parallel=options.pop("parallel", None),
                            attention_backend=options.pop("attention_backend", "sdpa"))
    module = _compiled_module_on_stack(_calling_wrapper())
    if module is not None:
        backend.model_name = type(module._orig_mod).__name__
    if module is not None:  # a timestep given by position to a (*args, **kwargs) forward is found by it
        backend.timestep_position = (arguments_from(module._orig_mod.forward, backend.timestep_arg) or (None,))[0]
    if options:
        raise PlanError(f"unknown ditopt backend option(s): {sorted(options)}")
    return backend(gm, example_inputs)


class _OwnBackend:
    """The registered backend, as one ``torch.compile`` call's own: equal to no other.

    dynamo keeps compiled graphs on the code object (one ``forward`` for every instance of a
    class) and reuses one for a call whose backend compares equal to the graph's; two
    ``torch.compile(..., backend="ditopt")`` calls with equal options compare equal
    (``_TorchCompileWrapper.__eq__``: the same function and options). Their graphs are bound to
    the runtime of the call that compiled them, so a second model of the class (or a second compile
    of one model) ran the first one's graphs with the first one's caches and steps."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _own_cache_entries(wrapper: Any) -> None:
    """Make ``wrapper`` (a ``torch.compile`` call's) compare equal only to itself, so that dynamo
    compiles each such call's graphs for it (see :class:`_OwnBackend`)."""
    if wrapper is not None and not isinstance(wrapper.compiler_fn, _OwnBackend):
        wrapper.compiler_fn = _OwnBackend(wrapper.compiler_fn)


def _calling_wrapper() -> Any:
    """The ``torch.compile`` call whose graph the backend is compiling now: dynamo calls the
    backend through the ``_TorchCompileWrapper`` that ``torch.compile`` made (one per call of
    ``torch.compile``), a few frames up."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, torch._TorchCompileWrapper):
            return candidate
        frame = frame.f_back
    return None


def compile_wrapper_of(compiled: torch.nn.Module) -> Any:
    """The ``_TorchCompileWrapper`` behind a ``torch.compile``'d module (None if there is none)."""
    link = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if link is None or isinstance(link, torch._TorchCompileWrapper):
            return link
        link = getattr(link, "_torchdynamo_orig_backend", None) or getattr(link, "__wrapped__", None)
    return None


def runtime_of_compile_call(wrapper: Any, module: torch.nn.Module | None = None) -> Runtime | None:
    """The runtime of one ``torch.compile(..., backend="ditopt")`` call, made on first use.

    The compiled module (found on the stack when the backend runs, or given) owns it, so that it
    and its caches go with the module and are never shared with another wrapper of the same model;
    the ``torch.compile`` call's wrapper (which dynamo keeps) only points to it weakly. Compiling
    a function rather than a module, the wrapper keeps it.
    """
    if wrapper is None:  # the backend called by hand, not through torch.compile: it owns one
        return None
    ref = wrapper.__dict__.get("_ditopt_runtime")
    runtime = ref() if isinstance(ref, weakref.ref) else ref
    if runtime is None:
        runtime = Runtime()
        wrapper._ditopt_runtime = weakref.ref(runtime)
    if module is None:
        module = _compiled_module_on_stack(wrapper)
    if module is not None:
        module.__dict__["_ditopt_runtime"] = runtime
    else:
        wrapper._ditopt_runtime = runtime
    return runtime


def _compiled_module_on_stack(wrapper: Any) -> torch.nn.Module | None:
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, OptimizedModule) and compile_wrapper_of(candidate) is wrapper:
            return candidate
        frame = frame.f_back
    return None


def arguments_from(forward: Callable, name: str) -> tuple[int, list[str]] | None:
    """The position of argument ``name`` of ``forward`` and the names from there on, when each of
    them may be given by keyword (else None)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    at = next((i for i, p in enumerate(params) if p.name == name), None)
    if at is None:
        return None
    rest = []
    for p in params[at:]:
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        rest.append(p.name)
    return at, rest


def _register_backend() -> None:
    from torch._dynamo.backends import registry

    has_entry_point = bool(importlib.metadata.entry_points(group="torch_dynamo_backends", name="ditopt"))
    if not has_entry_point and "ditopt" not in registry._COMPILER_FNS:
        registry.register_backend(ditopt_backend, name="ditopt")


_register_backend()


__all__ = ["CompiledGraph", "DitoptBackend", "PlanLike", "as_plan", "backend_of", "compile_graph", "ditopt_backend"]
