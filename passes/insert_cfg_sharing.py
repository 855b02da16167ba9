"""Give each site planned ``share_cfg`` under batched CFG a branch that computes the conditional
half of the batch only (DiTFastAttn's ASC at attention sites, FasterCache's CFG reuse at block
level; :mod:`ditopt.runtime.cfg_sharing` has the runtime side and the two-call layout, which
needs no pass: its sites are rewritten like ``reuse`` sites).

Matches: each site of ``GraphAnnotation.cfg_shared`` (batch ``B = 2b`` = two CFG halves, the
unconditional half ``u`` and the conditional half ``c``, from the plan's ``cfg``).
Rewrite to (one live-out ``h1``, unconditional half first: ``u = 0``, ``c = 1``):
    before                            after
                                      full = ditopt.decide(token, rid, graph, "blocks.3", [b, ...])
                                      off = ditopt.cache_load(token, ..., "blocks.3", "share_cfg0", [b, ...])
    h1 = <region of blocks.3>(h0, e)  h1, d = cond(full, both_fn, cond_fn, (h0, e, ..., off))
                                      ditopt.cache_store(token, d, full, ..., "blocks.3", "share_cfg0")
where ``both_fn`` is the region on the whole batch and ``d = h1[u half] - h1[c half]`` (kept by the
runtime where a later share_cfg step reads it), and ``cond_fn`` runs the region's nodes on the
conditional half of every input that carries the batch (``x.narrow(0, c*b, b)``) and returns
``cat([h1c + off, h1c])`` in the caller's order (and an empty ``d``): it really executes half the
site's work.

How the batch is found, from the graph alone: an input of the site (not a weight) whose first
dimension has ``B`` entries carries the batch. The region's nodes are replayed on fake tensors in
which that dimension has a size no other dimension has; every value computed from the batch must
carry it in exactly one dimension, and a view, reshape or expand whose size list spells ``B`` at the
batch's place is given ``b`` there (graphs captured with static shapes bake the batch size in).
A site whose batch cannot be followed that way (merged into another dimension, sliced, reduced,
mixed across samples, combined with a value made with the batch size baked in, a batch of one or
an odd batch) is refused with a PlanError naming the site and the node.

Keeps: the live-outs' users (now reading the cond's outputs), ``nn_module_stack`` and example
values; the new nodes join the regions the site was in (an enclosing block that reuses takes them
into its skip branch and hoists the store). Under inductor (``torch.compile(backend="ditopt")``)
the branches return dense copies and take operands pinned to their traced strides, as skip
branches do, and the offset is stored and loaded as a copy.
Does not fire without such sites; refuses one with another planned site inside it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ditopt.errors import PlanError
from ditopt.regions import is_param
from ditopt.runtime.cfg_sharing import SLOT

from .annotations import graph_annotation, role_of
from .cached_branches import insert_cached_cond
from .insert_skip_branches import _example
from .pass_base import PassContext, PassResult

_VIEWS = {"view", "reshape"}
_EXPANDS = {"expand", "broadcast_to"}
# shape-keeping ops that mix the values along a dimension they are given: refused along the batch
_ALONG = {"softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "flip", "roll", "sort",
          "argsort", "normalize", "_softmax", "_log_softmax"}


def insert_cfg_sharing(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ga = graph_annotation(gm)
    done = set(ga.cfg_branches or ())
    todo = [site for site in ga.cfg_shared if site not in done]
    for site in todo:  # every refusal before any rewrite
        _follow_batch(gm, ctx, site)
    for site in todo:  # followed again: a site rewritten before may have replaced this one's inputs
        _rewrite(gm, ctx, site, ga.cfg_shared[site], _follow_batch(gm, ctx, site))
        done.add(site)
    ga.cfg_branches = done
    if todo:
        gm.graph.lint()
    return PassResult(gm, bool(todo))


class _Batch:
    """What following the batch through a site found: the batch size, the nodes of the region, its
    operands (which carry the batch), the batch's dimension in each live-out, and the size lists
    to halve (node -> (args, kwargs) with the batch size at the batch's place replaced)."""

    def __init__(self, size, members, operands, batched, live_outs, dims, sizes):
        self.size, self.members, self.operands, self.batched = size, members, operands, batched
        self.live_outs, self.dims, self.sizes = live_outs, dims, sizes


def _follow_batch(gm: fx.GraphModule, ctx: PassContext, site: str) -> _Batch:
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
        raise PlanError(f"share_cfg with batched CFG: {message}{where}", site=site)

    inner = [s for s in [*ga.rewrites, *ga.windows, *ga.cfg_shared] if site in ctx.sites.ancestors(s)]
    if inner:
        refuse(f"the site holds other planned sites ({sorted(inner)}); plan one of them only")
    for n in members:
        if role_of(n) is not None or n.target is torch.ops.higher_order.invoke_subgraph:
            refuse("the site holds nodes another pass inserted or a marked block call", n)
        outside = [u for u in n.users if u not in member_set]
        if outside and n not in live_outs:
            refuse(f"a value inside the site is read outside it ({outside[0].name})", n)
    examples = [_example(o) for o in live_outs]
    if not live_outs or any(not isinstance(e, torch.Tensor) or e.dim() == 0 for e in examples):
        refuse("the site's outputs have no batch dimension")
    size = examples[0].shape[0]
    if size < 2 or size % 2 or any(e.shape[0] != size for e in examples):
        refuse(f"the site's outputs have batch {[e.shape[0] for e in examples]}; batched CFG needs an even batch "
               f"of two halves (CFG as two calls? say cfg: {{layout: calls}})")
    operands: list[fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and a not in operands:
                operands.append(a)
    batched = set()
    for op in operands:
        ex = _example(op)
        if isinstance(ex, torch.Tensor) and ex.dim() > 0 and ex.shape[0] == size and not is_param(op) \
                and op.op != "get_attr":
            batched.add(op)
    if not batched:
        refuse("no input of the site carries the batch in its first dimension")
    dims, sizes = _replay(gm, members, operands, batched, size, refuse)
    out_dims = []
    for o in live_outs:
        if not isinstance(dims.get(o), int):
            refuse(f"the site's output {o.name} does not carry the batch")
        out_dims.append(dims[o])
    return _Batch(size, members, operands, batched, live_outs, out_dims, sizes)


def _replay(gm: fx.GraphModule, members, operands, batched, size: int, refuse):
    """Run the region's nodes on fake tensors whose batch dimension has a size no other has;
    return the batch's dimension in each value and the size lists to halve."""
    shapes = [tuple(e.shape) for n in [*members, *operands] for e in _tensors(_example(n))]
    unique = 2 * max((d for s in shapes for d in s), default=size) + 1
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values: dict[fx.Node, object] = {}
    dims: dict[fx.Node, object] = {}  # node -> the batch's dimension (an int, a tuple for a tuple, None)
    sizes: dict[fx.Node, tuple] = {}
    with mode:
        for op in operands:
            ex = _example(op)
            if isinstance(ex, torch.Tensor):
                shape = list(ex.shape)
                if op in batched:
                    shape[0] = unique
                values[op] = torch.empty(shape, dtype=ex.dtype, device=ex.device)
                dims[op] = 0 if op in batched else None
            elif isinstance(ex, (int, float, bool)) or ex is None and op.op == "placeholder":
                values[op] = ex
                dims[op] = None
            else:
                refuse(f"an input of the site has no example value to follow the batch through ({op.name})")
        for n in members:
            carried = [a for a in n.all_input_nodes if dims.get(a) is not None]
            args, kwargs = n.args, n.kwargs
            if carried:
                _check_along(n, dims, refuse)
                halved = _halved_sizes(n, dims, size, refuse)
                if halved is not None:
                    sizes[n] = halved
                    args, kwargs = _with(n, halved, unique)
            try:
                values[n] = _run(gm, n, fx.node.map_arg(args, values.__getitem__),
                                 fx.node.map_arg(kwargs, values.__getitem__))
            except Exception as exc:  # noqa: BLE001 - any failure to replay means the batch cannot be followed
                refuse(f"the batch cannot be followed through this node ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})", n)
            dims[n] = _batch_dims(values[n], unique, bool(carried), n, refuse)
    return dims, sizes


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _run(gm: fx.GraphModule, n: fx.Node, args, kwargs):
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    if n.op == "get_attr":
        value = gm
        for part in n.target.split("."):
            value = getattr(value, part)
        return value
    raise TypeError(f"cannot replay a {n.op} node")


def _batch_dims(value, unique: int, carried: bool, n: fx.Node, refuse):
    """Where the batch is in ``value`` (a replayed output): one dimension of each tensor computed
    from the batch, none in a value that is not."""
    if isinstance(value, (tuple, list)):
        return tuple(_batch_dims(v, unique, carried, n, refuse) for v in value)
    if not isinstance(value, torch.Tensor):
        return None
    hits = [i for i, d in enumerate(value.shape) if d == unique]
    if not carried:
        return None
    if len(hits) != 1:
        refuse("the batch is reduced, cut, merged into another dimension or repeated here" if not hits else
               "the batch ends up in two dimensions here", n)
    return hits[0]


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _check_along(n: fx.Node, dims, refuse) -> None:
    """Refuse a shape-keeping op that mixes samples along the batch (softmax over it, a flip, ...)."""
    name = _name(n)
    if name not in _ALONG or not n.args:
        return
    x = n.args[0]
    d = dims.get(x) if isinstance(x, fx.Node) else None
    if not isinstance(d, int):
        return
    given = n.kwargs.get("dim", n.kwargs.get("dims", n.args[1] if len(n.args) > 1 else None))
    rank = len(_example(x).shape) if isinstance(_example(x), torch.Tensor) else None
    for g in (given if isinstance(given, (tuple, list)) else [given]):
        if isinstance(g, int) and rank and (g % rank) == d:
            refuse("mixes the samples of the batch", n)


def _sizes_of(n: fx.Node):
    rest = n.args[1:]
    if not rest:
        key = "size" if "size" in n.kwargs else "shape"
        return list(n.kwargs.get(key, ())), "kw", key
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), "packed", None
    return list(rest), "spread", None


def _halved_sizes(n: fx.Node, dims, size: int, refuse):
    """For a view / reshape / expand of a batch value whose size list spells the batch size at the
    batch's place: that list as ``(sizes, position, form, key)``, else None."""
    name = _name(n)
    if name not in _VIEWS | _EXPANDS or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    x = n.args[0]
    d = dims.get(x)
    src, out = _example(x), _example(n)
    if not isinstance(d, int) or not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    listed, form, key = _sizes_of(n)
    if name in _VIEWS:
        before = math.prod(src.shape[:d])
        hits = [j for j in range(out.dim()) if out.shape[j] == src.shape[d] and math.prod(out.shape[:j]) == before]
        if not hits:
            refuse("a view that merges or splits the batch", n)
        j = hits[0]
    else:
        j = d + out.dim() - src.dim()
    if j < len(listed) and isinstance(listed[j], int) and listed[j] == size:
        return listed, j, form, key
    return None


def _with(n: fx.Node, halved, new: int):
    """The node's ``(args, kwargs)`` with the batch size at the batch's place replaced by ``new``."""
    listed, j, form, key = halved
    listed = list(listed)
    listed[j] = new
    x = n.args[0]
    if form == "kw":
        return (x,), {**n.kwargs, key: tuple(listed)}
    if form == "packed":
        return (x, tuple(listed), *n.args[2:]), dict(n.kwargs)
    return (x, *listed), dict(n.kwargs)


def _rewrite(gm: fx.GraphModule, ctx: PassContext, site: str, layout, found: _Batch) -> None:
    half = found.size // 2
    shapes = []  # the offsets: each live-out's shape with half the batch
    for o, d in zip(found.live_outs, found.dims):
        shape = list(_example(o).shape)
        shape[d] = half
        shapes.append((shape, _example(o).dtype, _example(o).device))
    insert_cached_cond(gm, ctx, site, members=found.members, operands=found.operands, live_outs=found.live_outs,
                       shapes=[(shape, dtype) for shape, dtype, _ in shapes], slot=SLOT,
                       base=f"ditopt_{site.replace('.', '_')}_cfg",
                       build=lambda operands, loads: (("both", _both_graph(found, operands, layout)),
                                                      ("cond", _cond_graph(found, operands, loads, layout, shapes))),
                       extra=len(shapes))


def _copy_members(g: fx.Graph, found: _Batch, env: dict, halve: bool) -> None:
    for n in found.members:
        new = g.node_copy(n, lambda a: env[a])
        if halve and n in found.sizes:
            args, kwargs = _with(n, found.sizes[n], found.size // 2)
            new.args = fx.node.map_arg(args, env.__getitem__)
            new.kwargs = fx.node.map_arg(kwargs, env.__getitem__)
        env[n] = new


def _both_graph(found: _Batch, operands, layout) -> fx.Graph:
    """The region on the whole batch; also returns each output's offset (uncond half - cond half)."""
    g = fx.Graph()
    env = {}
    for op in operands:
        env[op] = g.placeholder(op.name)
        env[op].meta = dict(op.meta)
    _copy_members(g, found, env, halve=False)
    half = found.size // 2
    results, offsets = [], []
    for o, d in zip(found.live_outs, found.dims):
        results.append(env[o])
        parts = [g.call_method("narrow", (env[o], d, k * half, half)) for k in (layout.uncond_half, layout.cond_half)]
        offsets.append(g.call_function(operator.sub, tuple(parts)))
    g.output((*results, *offsets))
    return g


def _cond_graph(found: _Batch, operands, loads, layout, shapes) -> fx.Graph:
    """The region on the conditional half of every batch input; the unconditional half is the
    conditional output plus the loaded offset, joined in the caller's order."""
    g = fx.Graph()
    env = {}
    half = found.size // 2
    for op in operands:
        ph = g.placeholder(op.name)
        ph.meta = dict(op.meta)
        env[op] = g.call_method("narrow", (ph, 0, layout.cond_half * half, half)) if op in found.batched else ph
    _copy_members(g, found, env, halve=True)
    results = []
    for i, (o, d) in enumerate(zip(found.live_outs, found.dims)):
        cond = env[o]
        uncond = g.call_function(torch.add, (cond, env[loads[i]]))
        ordered = (uncond, cond) if layout.uncond_half == 0 else (cond, uncond)
        results.append(g.call_function(torch.cat, (list(ordered),), {"dim": d}))
    empties = [g.call_function(torch.empty, (tuple(shape),), {"dtype": dtype, "device": device})
               for shape, dtype, device in shapes]
    g.output((*results, *empties))
    return g


__all__ = ["insert_cfg_sharing"]
