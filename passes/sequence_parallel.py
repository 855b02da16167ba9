"""Shard the token dimension over the ranks: sequence parallelism as a graph rewrite.

Matches (``ctx.parallel`` set): the token flow of the stack (:func:`find_token_flow`), i.e. the
tensor entering the first block whose token dimension the blocks' self-attention attends over.
Rewrite to (rank ``r`` of 2, Ulysses):
    before                              after
    h = <patch embedding>(x)            h = <patch embedding>(x)
                                        h_r = shard(h, 1, (("s", N),), r, 2)     tokens r N/2 .. (r+1) N/2
    cos = <rotary table>                cos_r = shard(cos, 0, (("s", N),), r, 2)  per-token tensors alike
    <blocks>(h, cos)                    <blocks>(h_r, cos_r)     (a view's N becomes N/2; a slice at a
                                                                  text boundary moves to local positions)
    o = sdpa(q, k, v)                   o = sp_attention(q, k, v, mask, scale, segs, segs, "ulysses", group, r, 2, rid)
    y = <output head>(h_L)              y = <output head>(gather(h_L, 1, (("s", N),), group, r, 2, rid))
Attention whose keys and values are not sharded (cross-attention to text) stays as it was.
Example values are propagated again (local shapes: the cache ops that follow size their caches
from them), and ``ctx.sites`` is replaced by a table whose sites also hold the nodes inserted
inside them. Runs before ``annotate_decisions`` (``run_pipeline``). Refuses with CaptureError,
naming the node, a stack where anything but self-attention mixes tokens; PlanError when the
token count does not divide the world size, or for Ulysses when the head count does not.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.fx as fx

from ditopt.capture import module_stack
from ditopt.errors import CaptureError, PlanError
from ditopt.parallel import Tok, TokenFlow, TokenMixing, walker
from ditopt.regions import is_param, region_of, tensor_meta
from ditopt.runtime import distributed
from ditopt.sites import SiteTable

from .pass_base import PassContext, PassResult, copy_meta


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = tensor_meta(node) if isinstance(node, fx.Node) else None
    return tuple(meta[0]) if meta is not None else None


def token_flow(graph: fx.Graph, region: set[fx.Node], start: fx.Node, dim: int, world: int,
               tail: bool = False) -> TokenFlow:
    """Follow dimension ``dim`` of ``start`` through the nodes of ``region`` (the stack);
    :class:`TokenMixing` at the first node that mixes tokens or that the rules cannot follow.
    ``tail``: also run sharded the per-token nodes after the stack (:func:`_extend_tail`)."""
    flow = TokenFlow(start, dim, world)
    flow.tok[start] = Tok(dim, (("s", _shape(start)[dim]),))
    walk = walker(flow)
    for node in graph.nodes:
        if node not in region or node.op in ("placeholder", "output", "get_attr"):
            continue
        if any(a in flow.tok for a in node.all_input_nodes):
            out = walk.visit(node)
            if out is not None:
                flow.tok[node] = out
    flow.gathers = _cut(flow, region)
    if tail and flow.gathers:
        _extend_tail(graph, region, flow, walk)
    return flow


def _cut(flow: TokenFlow, region: set[fx.Node]) -> list[fx.Node]:
    """The token values read outside ``region``: what is gathered."""
    cut = []
    for node, t in flow.tok.items():
        if node is not flow.start and any(u not in region for u in node.users):
            if not isinstance(t, Tok):
                raise TokenMixing(node, "a list of token values read after the block stack")
            cut.append(node)
    return cut


def _extend_tail(graph: fx.Graph, region: set[fx.Node], flow: TokenFlow, walk) -> None:
    """Follow the tokens past the stack through the nodes that keep each token on its rank
    without sharding anything else or rewriting a shape (the output head's norm, modulation
    and projection), and gather where they stop when that moves fewer elements (a head that
    projects the hidden size down to patch channels: the gather shrinks by that ratio)."""
    before = dict(flow.tok)
    tail: set[fx.Node] = set()
    nodes = list(graph.nodes)
    last = max(i for i, n in enumerate(nodes) if n in region)
    for node in nodes[last + 1:]:  # after the stack: nothing sharded here flows back into it
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = [a for a in node.all_input_nodes if a in flow.tok]
        if not inputs or not all(isinstance(flow.tok[a], Tok) for a in inputs):
            continue
        sizes = len(flow.shards), len(flow.new_args), len(flow.attention)
        try:
            out = walk.visit(node)
        except TokenMixing:
            out = None
        if (len(flow.shards), len(flow.new_args), len(flow.attention)) != sizes or not isinstance(out, Tok):
            del flow.shards[sizes[0]:], flow.attention[sizes[2]:]
            for extra in list(flow.new_args)[sizes[1]:]:
                del flow.new_args[extra]
            continue
        flow.tok[node] = out
        tail.add(node)
    cut = _cut(flow, region | tail)

    def moved(values):
        return sum(math.prod(_shape(v) or (0,)) for v in values)

    if tail and cut and moved(cut) < moved(flow.gathers):
        flow.gathers, flow.tail = cut, tail
    else:
        flow.tok = before


def find_token_flow(graph: fx.Graph, sites: SiteTable, world: int) -> TokenFlow:
    """The token flow of the tensor entering the stack's first block whose token dimension its
    self-attention attends over: the first (input, dimension) whose flow reaches self-attention
    over it and leaves the stack sharded (inputs tried in the order: the first block's residual
    inputs, then its other inputs). CaptureError naming the node that mixes tokens otherwise."""
    if "stack" not in sites or not sites.stack_blocks():
        raise CaptureError("sequence parallelism: no block stack found in the graph")
    by_name = {n.name: n for n in graph.nodes}
    region = {by_name[n] for n in sites["stack"].nodes}
    first = sites[sites.stack_blocks()[0]]
    names = dict.fromkeys([*(r for r in first.residual_inputs if r), *first.inputs])
    candidates = [by_name[n] for n in names if not is_param(by_name[n]) and len(_shape(by_name[n]) or ()) >= 3]
    failures: list[tuple[TokenMixing, str, bool]] = []  # why, what was followed, whether the residual stream
    for start in candidates:
        for d, size in enumerate(_shape(start)[:-1]):
            if size < 2:
                continue
            try:
                flow = token_flow(graph, region, start, d, world, tail=True)
            except TokenMixing as e:
                failures.append((e, f"dimension {d} of {start.name} ({size} entries)", start.name in first.residual_inputs))
                continue
            if flow.attention and flow.gathers:
                return flow
    order = {n: i for i, n in enumerate(graph.nodes)}
    # a wrong dimension (batch, channels) fails where it reaches attention's other dimensions
    telling = [f for f in failures if "sequence dimension" not in f[0].why] or failures
    if telling:
        # the residual stream's failure first (the hidden states the blocks carry), the farthest first
        telling.sort(key=lambda f: (not f[2], -order.get(f[0].node, -1)))
        others = "; ".join(f"{where}: stops at {e}" for e, where, _ in telling[1:3])
        raise CaptureError(f"sequence parallelism cannot shard the tokens: node {telling[0][0]} (following "
                           f"{telling[0][1]}); only self-attention may mix tokens across ranks"
                           + (f". Other dimensions tried: {others}" if others else ""))
    raise CaptureError("sequence parallelism: no self-attention over the tokens entering the block stack")


def sequence_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    spec = ctx.parallel
    graph = gm.graph
    if spec is None or any(n.target is distributed.sp_attention for n in graph.nodes):
        return PassResult(gm, False)
    rank, world, group = spec.resolve()
    flow = find_token_flow(graph, ctx.sites, world)
    _check(flow, spec.mode, world)
    by_name = {n.name: n for n in graph.nodes}
    region = {by_name[n] for n in ctx.sites["stack"].nodes} | flow.tail  # what runs on this rank's tokens
    added: list[tuple[fx.Node, fx.Node]] = []  # (new node, the node it stands next to)
    renames: dict[str, str] = {}
    changed: set[fx.Node] = set()

    def shard(value: fx.Node, dim: int, segs, where: fx.Node | None) -> fx.Node:
        point = where if where is not None else _after(graph, value)
        with graph.inserting_before(point):
            node = graph.call_function(distributed.shard, (value, dim, segs, rank, world))
        copy_meta(node, value)
        added.append((node, where if where is not None else value))
        if where is None:
            renames[value.name] = node.name
        changed.add(node)
        return node

    for node, (args, kwargs) in flow.new_args.items():  # before any input is replaced by its shard
        node.args, node.kwargs = args, kwargs
        changed.add(node)
    attention_sites = [site for site in ctx.sites if site.kind == "attention"]
    for node, (q, k, v, mask, scale), q_segs, kv_segs in flow.attention:
        # the innermost attention site holding the call: a plan's stale_kv steps are looked up by it
        site = next((s.name for s in reversed(attention_sites) if node.name in s.nodes), "")
        node.target = distributed.sp_attention
        refresh = -1.0 if spec.ring_refresh is None else float(spec.ring_refresh)
        node.args = (q, k, v, mask, scale, q_segs, kv_segs, spec.mode, group, rank, world, ctx.runtime_id,
                     ctx.graph_id, site, node.name, refresh, spec.stale_forecast, spec.stale_residual)
        node.kwargs = {}
        changed.add(node)
    start = flow.start
    first = shard(start, flow.dim, flow.tok[start].segs, None)
    start.replace_all_uses_with(first, delete_user_cb=lambda user: user in region)
    outside: dict[tuple, fx.Node] = {}
    for consumer, operand, dim, segs in flow.shards:  # per-token tensors: once if whole before the stack
        if operand in region:
            sharded = shard(operand, dim, segs, consumer)
        else:
            key = (operand, dim, segs)
            sharded = outside[key] = outside.get(key) or shard(operand, dim, segs, None)
        consumer.replace_input_with(operand, sharded)
    for value in flow.gathers:
        users = [u for u in value.users if u not in region]
        point = min(users, key=list(graph.nodes).index)
        t = flow.tok[value]
        with graph.inserting_before(point):
            gathered = graph.call_function(distributed.gather, (value, t.dim, t.segs, group, rank, world,
                                                                ctx.runtime_id))
        copy_meta(gathered, value)
        value.replace_all_uses_with(gathered, delete_user_cb=lambda user: user not in region and user is not gathered)
        added.append((gathered, value))
        changed.add(gathered)
    graph.lint()
    _propagate(gm, changed)
    ctx.sites = _resite(ctx.sites, graph, added, renames)
    return PassResult(gm, True)


def check_stale_kv(gm: fx.GraphModule, table, ctx: PassContext) -> set[str]:
    """The sites a plan gives ``stale_kv`` steps (they keep their nodes and run at every step:
    ``runtime.distributed.sp_attention`` reads the table); PlanError, naming the site, without
    sequence parallelism, under inductor (the decision is taken on the host, in the eager path),
    or when none of them holds attention the token flow made distributed (one that stays local,
    as a text refiner's, has nothing to elide: it computes)."""
    from ditopt.runtime.decisions import Action

    stale = {name for name, row in table.actions.items() if Action.STALE_KV in row}
    if not stale:
        return stale
    name = sorted(stale)[0]
    if ctx.parallel is None:
        raise PlanError("stale_kv needs sequence parallelism (it skips the K/V exchange between ranks): "
                        "optimize(model, plan, parallel=ditopt.SequenceParallel(...)), or drop the stale_kv rule",
                        site=name)
    if ctx.inductor:
        raise PlanError("stale_kv runs on the eager path only (ditopt.optimize, or the backend with inductor=False): "
                        "its per-step choice of collective is taken on the host", site=name)
    held = {n.args[13] for n in gm.graph.nodes if n.target is distributed.sp_attention and len(n.args) > 13}
    if not stale & held:  # a local self-attention (a text refiner) sends nothing: it computes, as a pattern allows
        raise PlanError("stale_kv: no site the plan gives it holds distributed attention (their keys and values do "
                        "not carry the sharded tokens: nothing to elide)", site=name)
    return stale


def _check(flow: TokenFlow, mode: str, world: int) -> None:
    tokens = flow.tok[flow.start].length
    if tokens % world:
        raise PlanError(f"sequence parallelism: {flow.start.name} has {tokens} tokens (dimension {flow.dim}), which "
                        f"do not divide among {world} ranks; choose a resolution or world size that divides them")
    if mode == "ulysses":
        for node, (q, *_), _, _ in flow.attention:
            heads = _shape(q)[1]
            if heads % world:
                where = next((p for p, _, _ in reversed(module_stack(node)) if p), node.name)
                raise PlanError(f"sequence parallelism: Ulysses attention in {where} has {heads} heads, which do not "
                                f"divide among {world} ranks; use SequenceParallel(mode='ring')", site=where)


def _after(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """The node to insert before so that the new node follows ``node`` (and every placeholder)."""
    if node.op in ("placeholder", "get_attr"):
        return next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    return node.next


def _propagate(gm: fx.GraphModule, changed: set[fx.Node]) -> None:
    """Recompute the example value of every node downstream of ``changed`` on fake tensors (the
    distributed calls by their ``fake`` shape functions: no collective runs)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    values = (n.meta.get("example_value") for n in gm.graph.nodes)
    mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None) or FakeTensorMode()

    def fake(v):
        return mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v

    env: dict[fx.Node, object] = {}
    dirty: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "get_attr":
            env[node] = fake(getattr(gm, node.target))
            continue
        if node not in changed and not any(a in dirty for a in node.all_input_nodes):
            env[node] = node.meta.get("example_value", node.meta.get("val"))
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: fake(env[a]))
        with mode:
            if node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = getattr(node.target, "fake", node.target)(*args, **kwargs)
        node.meta["example_value"] = value
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
        env[node] = value
        dirty.add(node)


def _resite(sites: SiteTable, graph: fx.Graph, added: list[tuple[fx.Node, fx.Node]],
            renames: dict[str, str]) -> SiteTable:
    """The site table of the rewritten graph: each inserted node joins the sites that hold the
    node it stands next to and all its users; inputs are recomputed; a residual input that was
    sharded is named by its shard."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    out = []
    for site in sites:
        names = set(site.nodes)
        extra = {new.name for new, anchor in added
                 if anchor.name in names and all(u.name in names for u in new.users)}
        if not extra and not any(name in renames for name in site.inputs):
            out.append(site)
            continue
        nodes = sorted((by_name[n] for n in names | extra), key=order.__getitem__)
        region = region_of(nodes)
        inputs = tuple(n.name for n in region.inputs)
        residual = tuple(renames[r] if r in renames and renames[r] in inputs else r for r in site.residual_inputs)
        out.append(replace(site, nodes=tuple(n.name for n in nodes), inputs=inputs, residual_inputs=residual))
    return SiteTable(out, model=sites.model)


__all__ = ["check_stale_kv", "find_token_flow", "sequence_parallel", "token_flow"]
