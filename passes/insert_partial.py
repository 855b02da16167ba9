"""Give each site planned ``partial`` a branch that recomputes only some of its tokens (ToCa,
DuCa: token-wise caching): gather -> compute on the selected tokens -> scatter into the cached output.

Matches: each site of ``GraphAnnotation.partials`` (``{site: ratio}``).
Rewrite to (one live-out ``y``, token-carrying input ``x`` with ``N`` tokens along ``d``,
``k = ceil(ratio * N)``, slots ``partial0`` = output, ``partial1`` = input):
    before                          after
                                    full = ditopt.decide(token, rid, graph, "blocks.3.ff", y.shape)
                                    y_old = ditopt.cache_load(token, ..., "blocks.3.ff", "partial0", ...)
                                    x_old = ditopt.cache_load(token, ..., "blocks.3.ff", "partial1", ...)
    y = <region of blocks.3.ff>(x)  y, x_c = cond(full, all_fn, some_fn, (x, ..., y_old, x_old))
                                    ditopt.cache_store(token, y, full, ..., "blocks.3.ff", "partial0")
                                    ditopt.cache_store(token, x_c, full, ..., "blocks.3.ff", "partial1")
where ``all_fn`` is the region on every token (and ``x_c = x``), and ``some_fn`` picks
``idx = select_per_sample(x, x_old, d, k)`` (per sample, ``[batch, k]``: the ``k`` tokens whose input
changed most relative to the input their cached output was computed from; ``select_tokens``, one
``[k]`` for the batch, where dimension 0 is not a batch every per-token value carries,
:mod:`ditopt.runtime.partial`), runs the region on ``gather_tokens(x, d, idx)`` (every per-token
operand gathered alike; a view, reshape or expand whose size list spells ``N`` at the token's
place gets ``k``), and returns ``scatter_tokens(y_old, d_y, idx, y_k)`` and
``x_c = scatter_tokens(x_old, d, idx, x_k)``: the caches
change for the recomputed tokens only. It really executes ~``ratio`` of a token-wise site's work.
Why a block keeps its tokens' outputs and not their residuals (output - input, re-added to this
step's input): measured on dit-digits (20 steps, partial blocks between full steps), the residual
form was 0.3-1.2 dB worse at every interval and ratio tried.

Self-attention inside the site (a whole block): the selected tokens' queries attend to the keys
and values of ALL tokens, and those are recomputed from this step's input (the K/V projections
of every token, ``2 N d^2`` multiply-adds per projection, exact), rather than cached: measured
with FlopCounterMode on the small DiT block at ratio 0.25 (tests/test_partial.py reports it).
Cross-attention (keys/values from text) is token-wise: its queries are gathered, K/V untouched.

How the tokens are found, from the graph alone: :class:`ditopt.parallel.TokenFlow` (the rules
sequence parallelism shards by) follows each (input, dimension) of the site that is not a
weight; the token dimension is the largest one whose flow reaches every live-out. Refused with
a PlanError naming the site and the node: a site where anything but self-attention's key side
mixes tokens (a reduction or a view over them, a slice or split of them, joint or masked
self-attention, an op the flow cannot follow), one holding another planned site, marked block
calls or nodes another pass inserted. Under inductor (``torch.compile(backend="ditopt")``) the
branches return dense copies and take operands pinned to their traced strides, as skip branches
do, and the caches are stored and loaded as copies (topk, gather and scatter trace as they are).

Keeps: the live-outs' users (now reading the cond's outputs), ``nn_module_stack`` and example
values; the new nodes join the regions the site was in (an enclosing site that reuses takes
them into its skip branch and hoists the stores). Does not fire without partial sites;
idempotent (a site is rewritten once).
"""

from __future__ import annotations


import torch
import torch.fx as fx

from ditopt.errors import PlanError
from ditopt.parallel import Tok, TokenMixing
from ditopt.regions import is_param
from ditopt.runtime.partial import SLOT, gather_tokens, scatter_tokens, select_per_sample, select_tokens, tokens_of

from .annotations import graph_annotation, role_of
from .cached_branches import insert_cached_cond
from .insert_skip_branches import _example
from .pass_base import PassContext, PassResult
from .sequence_parallel import token_flow

_RESIZED = {"view", "reshape", "expand"}
PER_SAMPLE = True  # each sample picks its own tokens (False: one selection for the whole batch)  # nodes whose size list the flow rewrites (the token count -> k)


def insert_partial(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ga = graph_annotation(gm)
    done = set(ga.partial_branches or ())
    todo = [site for site in ga.partials if site not in done]
    for site in todo:  # every refusal before any rewrite
        _follow_tokens(gm, ctx, site, ga.partials[site])
    for site in todo:  # followed again: a site rewritten before may have replaced this one's inputs
        _rewrite(gm, ctx, site, _follow_tokens(gm, ctx, site, ga.partials[site]))
        done.add(site)
    ga.partial_branches = done
    if todo:
        gm.graph.lint()
    return PassResult(gm, bool(todo))


class _Tokens:
    """What following the tokens through a site found."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _shape(node) -> tuple[int, ...] | None:
    ex = _example(node) if isinstance(node, fx.Node) else None
    return tuple(ex.shape) if isinstance(ex, torch.Tensor) else None


def _why_not_followed(ctx: PassContext, worst: TokenMixing) -> str:
    """The refusal for the token mixing met on the most tokens (the latents', not the text's)."""
    other = [f"attention_backend={ctx.attention_backend!r}"] if ctx.attention_backend != "sdpa" else []
    other += ["sequence parallelism"] if ctx.parallel is not None else []
    if other:  # the attention is then another op than SDPA, which partial does not follow
        return (f"partial follows tokens through SDPA self-attention only, and cannot be combined with "
                f"{' or '.join(other)} (node {worst.node.name})")
    return (f"the tokens cannot be followed through the site: node {worst}; only self-attention may mix tokens "
            f"in a partial site")


def _follow_tokens(gm: fx.GraphModule, ctx: PassContext, site: str, ratio: float) -> _Tokens:
    graph = gm.graph
    ga = graph_annotation(gm)
    info = ctx.sites[site]
    names = set(info.nodes)
    members = [n for n in graph.nodes if n.name in names]
    member_set = set(members)
    by_name = {n.name: n for n in graph.nodes}
    live_outs = [by_name[n] for n in info.live_outs]

    def refuse(message: str, node: fx.Node | None = None):
        where = f": {node.format_node()}" if node is not None else ""
        raise PlanError(f"partial: {message}{where}", site=site)

    planned = [*ga.rewrites, *ga.windows, *ga.cfg_shared, *ga.partials]
    inner = [s for s in planned if site in ctx.sites.ancestors(s)]
    if inner:
        refuse(f"the site holds other planned sites ({sorted(inner)}); plan one of them only")
    for n in members:
        if role_of(n) is not None or n.target is torch.ops.higher_order.invoke_subgraph:
            refuse("the site holds nodes another pass inserted or a marked block call", n)
        outside = [u for u in n.users if u not in member_set]
        if outside and n not in live_outs:
            refuse(f"a value inside the site is read outside it ({outside[0].name})", n)
    if not live_outs or any(_shape(o) is None for o in live_outs):
        refuse("the site's outputs are not tensors")
    operands: list[fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and a not in operands:
                operands.append(a)

    found, failures = [], []
    for op in operands:
        shape = _shape(op)
        if shape is None or len(shape) < 2 or is_param(op) or op.op == "get_attr":
            continue
        for d, size in enumerate(shape[:-1]):
            if size < 2:
                continue
            try:  # world = size + 1: a rewritten size list says 0 where it spelled the token count
                flow = token_flow(graph, member_set, op, d, size + 1)
            except TokenMixing as e:
                failures.append((size, e))
                continue
            toks = [flow.tok.get(o) for o in live_outs]
            if all(isinstance(t, Tok) and t.length == size for t in toks):
                found.append((size, -len(found), op, d, flow))
    if not found:
        order = {n: i for i, n in enumerate(graph.nodes)}
        telling = [f for f in failures if "sequence dimension" not in f[1].why] or failures
        if telling:  # the failure on the most tokens (the latents', not the text's), the latest in the graph
            refuse(_why_not_followed(ctx, max(telling, key=lambda f: (f[0], order.get(f[1].node, -1)))[1]))
        refuse("no input of the site carries tokens to every output")
    size, _, start, dim, flow = max(found, key=lambda f: f[:2])
    k = tokens_of(ratio, size)
    for node, (q, key, value, mask, scale), q_segs, kv_segs in flow.attention:
        if any(kind != "s" for kind, _ in (*q_segs, *kv_segs)):
            refuse("joint self-attention (text and image tokens in one sequence) is not supported", node)
        if mask is not None:
            refuse("masked self-attention is not supported", node)
    sizes: dict[fx.Node, tuple] = {}
    for node, (args, kwargs) in flow.new_args.items():
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name not in _RESIZED:
            refuse("slices or splits the token dimension", node)
        sizes[node] = (_resized(node.args, args, size, k), _resized(node.kwargs, kwargs, size, k))
    shards: dict[fx.Node, dict[fx.Node, int]] = {}
    for consumer, operand, d, _ in flow.shards:
        shards.setdefault(consumer, {})[operand] = d
    # per sample (ToCa) where dimension 0 is a batch every per-token value and output carries or broadcasts
    batch = _shape(start)[0]
    per_sample = PER_SAMPLE and dim >= 1 and batch > 1 and all(
        d >= 1 and _shape(o)[0] in (1, batch) for _, o, d, _ in flow.shards) and all(
        flow.tok[o].dim >= 1 and _shape(o)[0] == batch for o in live_outs)
    return _Tokens(members=members, operands=operands, live_outs=live_outs, start=start, dim=dim, size=size, k=k,
                   per_sample=per_sample,
                   out_dims=[flow.tok[o].dim for o in live_outs], sizes=sizes, shards=shards,
                   attention={node: (key, value) for node, (q, key, value, *_), *_ in flow.attention})


def _resized(old, new, size: int, k: int):
    """``new`` (the flow's rewrite, 0 where the token count was) with ``k`` there instead."""
    if isinstance(old, dict):
        return {key: _resized(old.get(key), v, size, k) for key, v in new.items()}
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(old) == len(new):
        return type(new)(_resized(o, n, size, k) for o, n in zip(old, new))
    if isinstance(new, int) and new == 0 and old == size:
        return k
    return new


def _rewrite(gm: fx.GraphModule, ctx: PassContext, site: str, found: _Tokens) -> None:
    cached = [*found.live_outs, found.start]  # partial0..: the outputs, then the input they were computed from
    insert_cached_cond(gm, ctx, site, members=found.members, operands=found.operands, live_outs=found.live_outs,
                       shapes=[(list(_example(n).shape), _example(n).dtype) for n in cached], slot=SLOT,
                       base=f"ditopt_{site.replace('.', '_')}_partial",
                       build=lambda operands, loads: (("all", _all_graph(found, operands)),
                                                      ("some", _some_graph(found, operands, loads))),
                       extra=1)


def _placeholders(g: fx.Graph, operands) -> dict:
    env = {}
    for op in operands:
        env[op] = g.placeholder(op.name)
        env[op].meta = dict(op.meta)
    return env


def _all_graph(found: _Tokens, operands) -> fx.Graph:
    """The region on every token; also returns its token input (as the input cache)."""
    g = fx.Graph()
    env = _placeholders(g, operands)
    for n in found.members:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output((*(env[o] for o in found.live_outs), g.call_method("clone", (env[found.start],))))
    return g


def _some_graph(found: _Tokens, operands, loads) -> fx.Graph:
    """The region on the ``k`` selected tokens, scattered into the cached outputs. Self-attention
    reads the keys and values of every token from a copy of the region on all tokens (only the
    nodes they need survive dead-code elimination)."""
    g = fx.Graph()
    whole = _placeholders(g, operands)
    x, x_old = whole[found.start], whole[loads[-1]]
    select = select_per_sample if found.per_sample else select_tokens
    idx = g.call_function(select, (x, x_old, found.dim, found.k))
    picked = g.call_function(gather_tokens, (x, found.dim, idx))
    if found.attention:
        for n in found.members:
            whole[n] = g.node_copy(n, lambda a: whole[a])
    env = dict(whole)
    env[found.start] = picked
    gathered: dict[tuple[fx.Node, int], fx.Node] = {}
    carried = {found.start}  # values computed from the tokens; the others are shared with the copy on all tokens
    for n in found.members:
        if found.attention and not any(a in carried for a in n.all_input_nodes):
            env[n] = whole[n]
            continue
        carried.add(n)
        swap = {}
        for operand, d in found.shards.get(n, {}).items():  # per-token tables: gathered alike
            if (operand, d) not in gathered:
                gathered[(operand, d)] = g.call_function(gather_tokens, (env[operand], d, idx))
            swap[operand] = gathered[(operand, d)]
        if n in found.attention:  # queries of the selected tokens against the keys/values of all
            for kv in found.attention[n]:
                swap[kv] = whole[kv]

        def look(a, swap=swap):
            return swap[a] if a in swap else env[a]

        new = g.node_copy(n, look)
        if n in found.sizes:
            new.args, new.kwargs = fx.node.map_arg(found.sizes[n], look)
        env[n] = new
    outs = [g.call_function(scatter_tokens, (whole[load], d, idx, env[o]))
            for o, load, d in zip(found.live_outs, loads, found.out_dims)]
    kept = g.call_function(scatter_tokens, (x_old, found.dim, idx, picked))
    g.output((*outs, kept))
    g.eliminate_dead_code()
    return g


__all__ = ["insert_partial"]
