"""Replace each reusing site's region by a skip branch, so reused work is really not run.

Matches: the nodes of each site in ``GraphAnnotation.rewrites`` (after insert_cache_ops),
innermost sites first.
Rewrite to (``reuse_residual``, one live-out):
    before                                   after
    pred = decide(...)                       pred = decide(...)
    r_old = cache_load(...)                  r_old = cache_load(...)
    h1 = <region>(h0, temb, W...)            out = cond(pred, compute, reuse, (h0, temb, W..., r_old))
    r = h1 - h0                              h1, r = out[0], out[1]
    cache_store(token, r, pred, ...)         cache_store(token, r, pred, ...)
where ``compute(h0, temb, W..., r_old) = (<region>(h0, ...), <region> - h0)`` and
``reuse(h0, temb, W..., r_old) = (h0 + r_old, empty_like(r_old))``; a ``reuse`` site's reuse
branch returns ``r_old.clone()`` (cond branches may not return their inputs).

Effects inside a region (the cache stores of sites nested in it) are hoisted after the cond:
their tensor arguments become extra outputs, which the reuse branch fills with an empty
tensor and a False predicate, so nothing is stored for a site that did not run.
Keeps: the live-outs' users (now reading ``out[i]``), ``nn_module_stack`` and example values;
``ctx.sites`` is replaced by a table that names the cond's outputs where it named the live-outs.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ditopt.sites import tensor_meta

from .annotations import Role, annotate, enclosing, graph_annotation, nodes_with_role, regions_of, role_of
from .pass_base import PassContext, PassResult, replace_site_nodes


def _example(node: fx.Node) -> torch.Tensor | None:
    """The node's example value, or an empty tensor with its recorded shape, strides and dtype."""
    v = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(v, torch.Tensor):
        return v
    recorded = node.meta.get("tensor_meta")
    if recorded is not None and hasattr(recorded, "stride"):
        return torch.empty_strided(tuple(recorded.shape), tuple(recorded.stride), dtype=recorded.dtype)
    meta = tensor_meta(node)
    return torch.empty(meta[0], dtype=meta[1]) if meta else None


def insert_skip_branches(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ga = graph_annotation(gm)
    done = set(ga.skip_branches or ())
    todo = sorted((s for s in ga.rewrites if s not in done), key=lambda s: -ga.rewrites[s].depth)
    for site in todo:
        renames = _extract(gm, ctx, site, ga.rewrites[site].slot == "residual")
        ctx.sites = replace_site_nodes(ctx.sites, renames)  # sites still to extract may name a replaced node
        done.add(site)
    ga.skip_branches = done
    if todo:
        gm.graph.lint()
    return PassResult(gm, bool(todo))


def _extract(gm: fx.GraphModule, ctx: PassContext, site: str, residual: bool) -> dict[str, str]:
    """Make ``site``'s region a cond; return the renames of its live-outs (old -> cond output)."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    members_all = [n for n in graph.nodes if site in regions_of(n)]
    hoisted = [n for n in members_all if role_of(n) in (Role.STORE, Role.INDICATOR)]
    members = [n for n in members_all if n not in hoisted]
    member_set = set(members)
    by_name = {n.name: n for n in graph.nodes}
    decide = nodes_with_role(graph, Role.DECIDE, site)[0]
    loads = nodes_with_role(graph, Role.LOAD, site)
    stores = nodes_with_role(graph, Role.STORE, site)
    info = ctx.sites[site]
    live_outs = [by_name[n] for n in info.live_outs]
    mains = [by_name[n] if n else None for n in info.residual_inputs] if residual else [None] * len(live_outs)
    values = [s.args[1] for s in stores]  # the tensors this site stores: residuals, or the live-outs
    # Arguments of effects nested in the region that the region computes: extra outputs.
    hoisted_args = []
    for h in hoisted:
        for a in h.args:
            if isinstance(a, fx.Node) and a in member_set and a not in hoisted_args:
                hoisted_args.append(a)

    # Operands: everything the region reads from outside, plus the loads and residual inputs.
    operands: list[fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and a not in operands:
                operands.append(a)
    for extra in [*loads, *[m for m in mains if m is not None]]:
        if extra not in operands:
            operands.append(extra)
    outputs = list(dict.fromkeys([*live_outs, *values, *hoisted_args]))  # a reused output is also its value
    # submodules the region reads (flex_attention's score_mod and mask_fn graphs): read in the
    # branch itself, for a cond's operands are tensors
    modules = [a for a in operands if a.op == "get_attr" and isinstance(_attr(gm, a.target), torch.nn.Module)]
    operands = [a for a in operands if a not in modules]

    compute = _branch_graph(members, operands, outputs, contiguous=ctx.inductor, modules=modules)
    reuse = _reuse_graph(operands, outputs, live_outs, loads, mains, contiguous=ctx.inductor)
    compute_gm = fx.GraphModule(gm, compute)
    reuse_gm = fx.GraphModule(gm, reuse)
    base = "ditopt_" + site.replace(".", "_")
    setattr(gm, base + "_compute", compute_gm)
    setattr(gm, base + "_reuse", reuse_gm)

    anchor = max(members, key=order.__getitem__)
    with graph.inserting_after(anchor):
        true_fn = graph.get_attr(base + "_compute")
    with graph.inserting_after(true_fn):
        false_fn = graph.get_attr(base + "_reuse")
    outer = enclosing(members, site)
    passed = _pinned_operands(graph, operands, true_fn, outer) if ctx.inductor else operands
    with graph.inserting_after(false_fn):
        cond = graph.call_function(torch.ops.higher_order.cond, (decide, true_fn, false_fn, tuple(passed)))
    annotate(cond, role=Role.SKIP_BRANCH, site=site, regions=outer, replaced=[n.name for n in members])
    for fn in (true_fn, false_fn):  # an enclosing site must take the branches along, not as operands
        annotate(fn, role=Role.BRANCH_FN, site=site, regions=outer)
    cond.meta["nn_module_stack"] = members[0].meta.get("nn_module_stack", {})
    results = {}
    previous = cond
    for i, out in enumerate(outputs):
        with graph.inserting_after(previous):
            item = graph.call_function(operator.getitem, (cond, i))
        item.meta.update({k: v for k, v in out.meta.items() if k in ("example_value", "val", "tensor_meta",
                                                                       "nn_module_stack")})
        annotate(item, role=Role.BRANCH_OUTPUT, site=site, regions=regions_of(out) - {site})
        results[out] = item
        previous = item
    for out, item in results.items():
        out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in member_set)
    # Hoisted effects run after the cond, reading its outputs.
    for h in hoisted:
        previous.append(h)
        previous = h
    for n in reversed(members):
        graph.erase_node(n)
    return {out.name: item.name for out, item in results.items()}


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _branch_graph(members: list[fx.Node], operands: list[fx.Node], outputs: list[fx.Node], *,
                  contiguous: bool, modules: list[fx.Node] = ()) -> fx.Graph:
    """The compute branch: the region's nodes, returning ``outputs``. An output that is (a view
    of) an operand, or of an earlier output, is cloned: ``torch.cond`` refuses branches whose
    outputs alias their inputs or each other (a dual-stream block passing a stream through).
    With ``contiguous`` (under inductor) every output gets the contiguous strides of its shape
    (free when it has them)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for op in operands:
        env[op] = g.placeholder(op.name)
        env[op].meta = dict(op.meta)
    for op in modules:
        env[op] = g.get_attr(op.target)
        env[op].meta = dict(op.meta)
    for n in members:
        env[n] = g.node_copy(n, lambda a: env[a])
    seen = {_storage(op) for op in operands} - {None}
    roots = set(operands)
    results = []
    for o in outputs:
        value, storage, root = env[o], _storage(o), _view_root(o, roots)
        aliases = root in roots or (storage is not None and storage in seen)
        seen.add(storage)
        roots.add(root)
        if contiguous and (aliases or _view_root(o, set()) is not o):
            # under inductor every view is copied with an op it cannot elide: it removes a clone of a
            # slice, then refuses branch outputs that view one buffer (a joint attention's streams)
            results.append(g.call_function(torch.ops.ditopt.dense_copy.default, (value,)))
        elif contiguous:
            results.append(_dense(g, value, _example(o)))
        else:
            results.append(g.call_method("clone", (value,)) if aliases else value)
    g.output(tuple(results))
    return g


def _reuse_graph(operands, outputs, live_outs, loads, mains, *, contiguous: bool) -> fx.Graph:
    """The reuse branch: each live-out from its cache (``main + residual`` where ``mains`` has its
    residual input, else a clone of the cached output), every other output an empty tensor of the compute branch's shape.

    With ``contiguous`` (under inductor) every output is contiguous, as the compute branch's are
    made: ``torch.cond`` requires the two branches' outputs to agree in stride order, and a block
    whose input is not contiguous (the patch embedding's transposed output) returns a
    contiguous tensor when it computes but ``main + residual`` in its input's layout."""
    g = fx.Graph()
    env = {op: g.placeholder(op.name) for op in operands}
    for op in operands:
        env[op].meta = dict(op.meta)
    results = []
    for out in outputs:
        ex = _example(out)
        if out in live_outs:
            i = live_outs.index(out)
            cached = env[loads[i]]
            value = g.call_function(torch.add, (env[mains[i]], cached)) if mains[i] is not None else \
                g.call_method("clone", (cached,))
            results.append(_dense(g, value, ex) if contiguous else value)
        elif ex.dtype == torch.bool and ex.dim() == 0:  # a nested store's predicate: nothing stored
            results.append(g.call_function(torch.zeros, ((),), {"dtype": torch.bool, "device": ex.device}))
        else:
            results.append(g.call_function(torch.empty, (tuple(ex.shape),), {"dtype": ex.dtype, "device": ex.device}))
    g.output(tuple(results))
    return g


def _pinned_operands(graph: fx.Graph, operands: list[fx.Node], before: fx.Node,
                     regions: frozenset[str]) -> list[fx.Node]:
    """Operands the graph computes, pinned to the strides the branches are traced with (under
    inductor).

    Inductor may lay out an intermediate buffer differently from its example value (it stored
    Wan's normed hidden states, contiguous in the example, in the buffer of the patch
    embedding's transposed output; DiT's transposed patch embedding contiguously), and the cond
    passes the buffer to branches compiled for the example's strides: their stride assertion
    failed at run time. ``prims.inductor_force_stride_order`` freezes the layout inductor picks
    (free when it had not fixed one; a copy otherwise). Graph inputs have guarded strides."""
    out = []
    for op in operands:
        ex = _example(op)
        if op.op != "placeholder" and isinstance(ex, torch.Tensor) and ex.dim() > 0:
            with graph.inserting_before(before):
                pinned = graph.call_function(_force_stride_order(), (op, list(ex.stride())))
            pinned.meta.update({k: v for k, v in op.meta.items() if k in ("nn_module_stack", "example_value", "val")})
            annotate(pinned, regions=regions)  # inside the sites that enclose the cond, as the cond is
            op = pinned
        out.append(op)
    return out


def _dense(g: fx.Graph, value: fx.Node, ex: torch.Tensor | None) -> fx.Node:
    """``value`` with the canonical contiguous strides of its shape. ``contiguous()`` is not
    enough: a slice of a joint stream with a batch of one *is* contiguous by PyTorch's rule while
    its batch stride is the whole sequence's, and ``torch.cond`` wants the two branches' strides
    to be a plain product of sizes. Free where the value already has them."""
    if ex is None:
        return g.call_method("contiguous", (value,))
    return g.call_function(_force_stride_order(), (value, list(_contiguous_strides(tuple(ex.shape)))))


def _force_stride_order():
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    return torch.ops.prims.inductor_force_stride_order.default


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "expand", "expand_as", "view_as", "squeeze", "unsqueeze",
                 "flatten", "unflatten", "narrow", "select", "t", "contiguous", "chunk", "split", "unbind",
                 "__getitem__", "detach", "as_strided"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.chunk, torch.split, torch.unbind,
                   torch.detach}


def _view_root(node: fx.Node, stop: set[fx.Node]) -> fx.Node:
    """The node whose memory ``node`` may share: followed back through view-like ops up to one in
    ``stop`` (for graphs without example values, whose storages would say it). An output of a
    marked block's call (``invoke_subgraph``, :mod:`ditopt.regional`) is no view: the call returns
    fresh tensors."""
    while node not in stop and node.args and isinstance(node.args[0], fx.Node) and not _call_output(node) and (
            (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)):
        node = node.args[0]
    return node


def _call_output(node: fx.Node) -> bool:
    return node.target is operator.getitem and node.args[0].target is torch.ops.higher_order.invoke_subgraph


def _storage(node: fx.Node):
    """The storage of the node's example value (views share it), or None without one."""
    from torch.multiprocessing.reductions import StorageWeakRef

    v = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return StorageWeakRef(v.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None
