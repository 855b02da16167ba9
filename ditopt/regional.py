"""Regional capture and compilation: trace a model's repeated block once, call it for every block.

Dynamo traces a 40-block DiT block by block (about 0.2 s a block here), and inductor compiles the
40 copies of one block. A *marked* block (:func:`mark_repeated_blocks`; ``ditopt.optimize`` marks
by itself, :func:`hold_marks`) is instead one opaque node, ``block_call(key, *args)``, whenever a
ditopt backend's dynamo traces the model (other backends see it inline). The backend then

0. expands those nodes (:func:`expand_block_calls`): blocks alike (:func:`block_signature`: classes,
   plain attributes, weight shapes) called with inputs alike (shapes, strides, dtypes, constants)
   share one subgraph, which dynamo traces once with the first such block alone
   (:func:`_trace_template`); each block becomes an ``invoke_subgraph`` call of it with the block's
   own weights as extra graph inputs, read from the modules at every call (:class:`BlockInputs`);
   a subgraph called once is inlined. This is the graph dynamo itself gives for blocks marked as
   ``torch.compiler.nested_compile_region``, without dynamo tracing or matching each block;
1. inlines every call into a copy (:func:`inline_calls`), each inlined node's module path
   re-prefixed to the calling block's (the subgraph was traced in another block), so site
   finding and plan resolution see the graph an unmarked model gives: the same site names;
2. keeps a call a call when no site the plan rewrites lies partly inside it, and no ``when`` rule
   watches a tensor inside it (only its outputs): block-level plans (FORA block level,
   TaylorSeer, First-Block-Cache, coalesced runs) keep every block but the ones that must be
   inlined; a plan that reuses attention or feed-forwards inlines the blocks it reaches into
   (correct, only the compile-time gain is lost); profiling inlines all;
3. the passes rewrite the graph with the kept calls, whose block sites are the call and the
   getitems of its outputs (:func:`regional_sites`); a skip branch holds the calls of the blocks
   it skips. ``ditopt.compiled_graph(m)`` keeps the inlined graph as ``original`` (where its
   ``sites`` are) and names the blocks kept as calls in ``rewritten.meta["ditopt_regions"]``;
4. under inductor each called subgraph is traced with inductor's decompositions wherever it is
   (:func:`decompose_calls_for_inductor`), and inductor generates its code once.

Known limits: a block's outputs that alias its inputs or each other are returned cloned
(:func:`_fresh`: the two slices a single-stream block of Flux or HunyuanVideo returns), one copy
per block call; marked blocks need static shapes (``dynamic=False``). The rule the expansion rests
on is the one dynamo's nested compile regions assume: two blocks of one signature, given inputs of
one signature, trace to one graph up to their weights.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from .capture import module_path
from .errors import DitoptError
from .expand import _raw
from .expand import BlockInputs, expand_block_calls, has_block_calls  # noqa: F401 (the backend's entry points)
from .marks import (RegionalError, RepeatedBlocks, block_calls, hold_marks, mark_repeated_blocks,  # noqa: F401
                    refuse_marks, release_marks, repeated_blocks)
from .regions import region_of
from .sites import SiteTable, find_sites

INVOKE = torch.ops.higher_order.invoke_subgraph


# -- inlining the calls -----------------------------------------------------------------------

@dataclass
class Call:
    """One ``invoke_subgraph`` call of the regional graph: the calling module's ``path``, its
    nodes there (``group``: the subgraph's get_attr, the call, the getitems of its outputs), the
    names its inlined nodes get (``inner``), the inlined node each getitem stands for
    (``outputs``: inlined name -> getitem name), and why it cannot stay a call (``why``)."""

    name: str
    path: str
    group: tuple[str, ...]
    inner: tuple[str, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    why: str = ""


def has_calls(gm: fx.GraphModule) -> bool:
    return bool(gm.graph.find_nodes(op="call_function", target=INVOKE))


def _reprefixed(stack: dict, caller: dict, tag: str) -> dict:
    """A subgraph node's module stack as seen from another call site: the caller's stack, then
    the entries below the block the subgraph was traced in, moved under the calling block."""
    entries, k = list(stack.items()), len(caller)
    out = dict(caller)
    if not caller or len(entries) < k:
        return out
    traced = module_path(str(_raw(entries[k - 1][1])))
    here = module_path(str(_raw(list(caller.values())[-1])))
    for key, value in entries[k:]:
        raw, typ = value if isinstance(value, tuple) else (value, "")
        path = module_path(str(raw))
        if path == traced or path.startswith(traced + "."):
            path = here + path[len(traced):]
        out[f"{key}@{here}"] = (path, typ)
    return out


def _inline_one(gm: fx.GraphModule, node: fx.Node) -> Call:
    graph, getter = gm.graph, node.args[0]
    sub: fx.GraphModule = getattr(gm, str(getter.target))
    caller = dict(node.meta.get("nn_module_stack") or {})
    path = module_path(str(_raw(list(caller.values())[-1]))) if caller else ""
    users = list(node.users)
    call = Call(node.name, path, (getter.name, node.name, *(u.name for u in users)))
    env: dict[fx.Node, fx.Node] = dict(zip(sub.graph.find_nodes(op="placeholder"), node.args[2:]))
    inner = []
    with graph.inserting_before(node):
        for s in sub.graph.nodes:
            if s.op in ("placeholder", "output") or (s.target is getattr and not s.users):
                continue  # (_fresh's look at an output's ._base, used by nothing once traced)
            target = s.target
            if s.op == "get_attr":  # a nested region's subgraph: hoisted onto gm
                target = f"{node.name}_{s.target}"
                setattr(gm, target, getattr(sub, str(s.target)))
            new = graph.create_node(s.op, target, fx.map_arg(s.args, env.__getitem__),
                                    fx.map_arg(s.kwargs, env.__getitem__), name=f"{node.name}_{s.name}", type_expr=s.type)
            new.meta = {**s.meta, "nn_module_stack": _reprefixed(s.meta.get("nn_module_stack") or {}, caller, path)}
            env[s] = new
            inner.append(new.name)
    results = sub.graph.output_node().args[0]
    for user in users:
        if user.op != "call_function" or user.target is not operator.getitem:
            raise DitoptError(f"{node.name} ({path}): a use of a nested compile region's outputs that is not "
                              f"getitem ({user.format_node()})")
        value = results[user.args[1]]
        if value.op == "placeholder" or env[value].name in call.outputs:
            call.why = "the block returns one of its inputs, or one value twice"
        call.outputs[env[value].name] = user.name
        user.replace_all_uses_with(env[value])
        graph.erase_node(user)
    graph.erase_node(node)
    if not getter.users:
        graph.erase_node(getter)
    call.inner = tuple(inner)
    return call


def inline_calls(gm: fx.GraphModule, only: set[str] | None = None) -> dict[str, Call]:
    """Inline the ``invoke_subgraph`` calls of ``gm`` (those named in ``only``, else all, nested
    ones too) in place, each inlined node named ``<call>_<node>`` and given the calling block's
    module paths; return what each call was, by call name. Recompiles ``gm``."""
    calls: dict[str, Call] = {}
    while True:
        todo = [n for n in gm.graph.find_nodes(op="call_function", target=INVOKE)
                if only is None or n.name in only]
        if not todo:
            break
        for node in todo:
            calls[node.name] = _inline_one(gm, node)
        if only is not None:
            break
    existing = {n.name for n in gm.graph.nodes}
    for call in calls.values():  # a region nested in a call: its inlined nodes are the call's too
        if any(n in calls for n in call.inner):
            call.inner = tuple(n for n in _expanded(call.inner, calls) if n in existing)
            call.why = call.why or "a nested compile region inside it"
    gm.graph.lint()
    gm.recompile()
    return calls


def _expanded(names, calls: dict[str, Call]):
    for n in names:
        if n in calls:
            yield from _expanded(calls[n].inner, calls)
        else:
            yield n


# -- sites and plans on a graph with calls ---------------------------------------------------

def _keepable(call: Call, sites: SiteTable, table, observe: bool) -> bool:
    """May ``call`` stay a call under this decision table? (see the module docstring)"""
    if observe or call.why:
        return False
    inner = set(call.inner)
    if any(set(sites[name].nodes) & inner for name in table.cfg_shared()):
        return False  # batched share_cfg reruns the block's nodes on half the batch (passes/insert_cfg_sharing.py)
    if any(set(sites[name].nodes) & inner for name in table.partials()):
        return False  # partial reruns the block's nodes on some of the tokens (passes/insert_partial.py)
    for name in table.actions:
        nodes = set(sites[name].nodes)
        if nodes & inner and not nodes >= inner:
            return False
    return not any(i.node in inner and i.node not in call.outputs for i in table.indicators)


def regional_sites(sites: SiteTable, graph: fx.Graph, kept: list[Call]) -> SiteTable | None:
    """``sites`` (found in the inlined graph) for ``graph``, where the ``kept`` calls are calls: a
    site inside a kept call is left out; in the others, a kept call's nodes become its group and
    its outputs the getitems. None when a site's live-outs do not come out the same."""
    inner_of = {n: c for c in kept for n in c.inner}
    by_name = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}

    def name(n):
        if n is None or n not in inner_of:
            return n
        return inner_of[n].outputs.get(n, False)  # False: an inner value, not seen outside the call

    out = []
    for s in sites:
        nodes = set(s.nodes)
        if any(nodes & set(c.inner) and not nodes >= set(c.inner) for c in kept):
            continue  # inside a kept call (or across one: nothing rewrites such a site)
        members = {g for n in s.nodes for g in (inner_of[n].group if n in inner_of else (n,))}
        if not members <= set(by_name):
            return None
        region = region_of([by_name[n] for n in sorted(members, key=order.__getitem__)])
        live_outs = tuple(name(n) for n in s.live_outs)
        if set(live_outs) != {n.name for n in region.live_outs}:
            return None
        residual = tuple(name(n) for n in s.residual_inputs)
        if False in residual:
            return None
        out.append(replace(s, nodes=tuple(n.name for n in region.nodes), inputs=tuple(n.name for n in region.inputs),
                           live_outs=live_outs, residual_inputs=residual, modulated_input=name(s.modulated_input) or None))
    names = {s.name for s in out}
    if any(s.parent is not None and s.parent not in names for s in out):
        return None  # a site whose parent lies across a kept call: no such module tree is known
    return SiteTable(out, model=sites.model)


@dataclass
class SplitGraph:
    """What the backend rewrites, for a captured graph: ``flat`` (the calls inlined; None when
    there were none) with its ``sites`` and the plan's ``table``; ``graph``, the graph the passes
    rewrite (the kept calls still calls), with its ``graph_sites`` and ``graph_table``; the paths
    of the ``kept`` calls; and the seconds each stage took."""

    flat: fx.GraphModule | None
    sites: SiteTable
    table: object
    graph: fx.GraphModule
    graph_sites: SiteTable
    graph_table: object
    kept: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)


def split_regions(gm: fx.GraphModule, compile_plan: Callable, *, observe: bool = False,
                  copy: Callable[[fx.GraphModule], fx.GraphModule] | None = None) -> SplitGraph:
    """Find the sites of ``gm`` and resolve the plan (``compile_plan(sites)``) as if no block were
    marked, then choose the calls that stay calls (see the module docstring). ``gm`` is the
    backend's copy; ``copy`` makes another (the flat graph is kept untouched)."""
    clock = time.perf_counter()
    if not has_calls(gm):
        sites = find_sites(gm.graph)
        found = time.perf_counter()
        table = compile_plan(sites)
        gm.meta["ditopt_regions"] = ()
        return SplitGraph(None, sites, table, gm, sites, table,
                          seconds={"find_sites": found - clock, "compile_plan": time.perf_counter() - found})
    copy = copy or _copy
    flat = copy(gm)
    calls = inline_calls(flat)
    inlined = time.perf_counter()
    sites = find_sites(flat.graph)
    found = time.perf_counter()
    table = compile_plan(sites)
    seconds = {"inline_regions": inlined - clock, "find_sites": found - inlined, "compile_plan": time.perf_counter() - found}
    top = {n.name for n in gm.graph.find_nodes(op="call_function", target=INVOKE)}
    kept = [c for name, c in calls.items() if name in top and _keepable(c, sites, table, observe)]
    graph_sites = None
    if kept:
        inline_calls(gm, only=top - {c.name for c in kept})
        graph_sites = regional_sites(sites, gm.graph, kept)
    if graph_sites is None:  # nothing kept, or the regional sites do not check out: every call inlined
        gm, graph_sites, kept = copy(flat), sites, []
    outputs = {n: g for c in kept for n, g in c.outputs.items()}
    graph_table = replace(table, indicators=[replace(i, node=outputs.get(i.node, i.node)) for i in table.indicators])
    gm.meta["ditopt_regions"] = tuple(c.path for c in kept)
    seconds["split_regions"] = time.perf_counter() - clock - sum(seconds.values())
    return SplitGraph(flat, sites, table, gm, graph_sites, graph_table, tuple(c.path for c in kept), seconds)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        new.meta = dict(old.meta)
    out = _LazyGraphModule(gm, graph)  # its code is generated when first run or read
    out.meta.update(gm.meta)
    return out





def lower_calls_for_eager(gm: fx.GraphModule) -> int:
    """On the eager path: each ``invoke_subgraph`` call of ``gm`` and of its branch modules becomes
    a plain call of the subgraph module (no higher-order op to dispatch: cheaper, and a torch
    dispatch mode a user runs the model under, ``FlopCounterMode``, sees the block's ops).
    Returns how many calls. Leaves the code to be regenerated by the caller."""
    lowered = 0
    for mod in list(gm.modules()):
        if not isinstance(mod, fx.GraphModule):
            continue
        here = 0
        for node in list(mod.graph.find_nodes(op="call_function", target=INVOKE)):
            getter = node.args[0]
            with mod.graph.inserting_before(node):
                call = mod.graph.call_module(str(getter.target), tuple(node.args[2:]))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            mod.graph.erase_node(node)
            if not getter.users:
                mod.graph.erase_node(getter)
            here += 1
        if here:
            mod.recompile()
        lowered += here
    return lowered


def decompose_calls_for_inductor(gm: fx.GraphModule) -> int:
    """Under inductor: have each called subgraph traced with inductor's decompositions wherever
    AOT traces it; returns how many subgraphs. (Each gets a copy carrying
    ``meta["nested_region_config"]`` with only ``decompositions`` set; every call, in ``gm`` and
    in its skip branches, then calls the copy, so the subgraph stays shared.)

    Needed for a call inside a skip branch: torch 2.13's functionalisation of ``cond``
    materialises its branches for their schema without decompositions, ``invoke_subgraph``
    caches that trace by subgraph and the real trace reuses it, and inductor then fails on the
    undecomposed block (``both a fallback and a decomp for same op: aten.native_layer_norm``).
    A subgraph whose config names decompositions is traced with them by every trace."""
    from torch._higher_order_ops.invoke_subgraph import NestedCompileRegionOptions
    from torch._inductor.decomposition import select_decomp_table

    copies: dict[int, fx.GraphModule] = {}
    for mod in list(gm.modules()):
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in mod.graph.find_nodes(op="call_function", target=INVOKE):
            target = str(node.args[0].target)
            sub = getattr(mod, target)
            if sub.meta.get("nested_region_config") is not None and id(sub) not in copies:
                continue  # the user's own config
            if id(sub) not in copies:
                copies[id(sub)] = _copy(sub)
                copies[id(sub)].meta["nested_region_config"] = NestedCompileRegionOptions(
                    decompositions=select_decomp_table())
            setattr(mod, target, copies[id(sub)])
    return len(copies)


__all__ = ["BlockInputs", "Call", "lower_calls_for_eager", "RegionalError", "RepeatedBlocks", "SplitGraph", "block_calls", "decompose_calls_for_inductor",
           "expand_block_calls", "has_block_calls", "has_calls", "hold_marks", "inline_calls", "mark_repeated_blocks",
           "refuse_marks", "regional_sites", "release_marks", "repeated_blocks", "split_regions"]
