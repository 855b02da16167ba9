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

from .annotations import Role, annotate, graph_annotation, nodes_with_role, regions_of, role_of
from .pass_base import PassContext, PassResult, replace_site_nodes


def _example(node: fx.Node):
    v = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(v, torch.Tensor):
        return v
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
        gm.recompile()
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

    compute = _branch_graph(members, operands, outputs)
    reuse = _reuse_graph(operands, live_outs, values, hoisted_args, loads, mains, residual)
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
    with graph.inserting_after(false_fn):
        cond = graph.call_function(torch.ops.higher_order.cond, (decide, true_fn, false_fn, tuple(operands)))
    outer = regions_of(members[0]) - {site}
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


def _branch_graph(members: list[fx.Node], operands: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for op in operands:
        env[op] = g.placeholder(op.name)
        env[op].meta = dict(op.meta)
    for n in members:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    return g


def _reuse_graph(operands, live_outs, values, hoisted_args, loads, mains, residual) -> fx.Graph:
    g = fx.Graph()
    env = {op: g.placeholder(op.name) for op in operands}
    for op in operands:
        env[op].meta = dict(op.meta)
    outs = []
    for i, _ in enumerate(live_outs):
        cached = env[loads[i]]
        if residual:
            outs.append(g.call_function(torch.add, (env[mains[i]], cached)))
        else:
            outs.append(g.call_method("clone", (cached,)))
    for i, value in enumerate(values):
        if value not in live_outs:
            outs.append(g.call_function(torch.empty_like, (env[loads[i]],)))
    for a in hoisted_args:
        if a in live_outs or a in values:
            continue
        ex = _example(a)
        if ex is not None and ex.dtype == torch.bool and ex.dim() == 0:
            outs.append(g.call_function(torch.zeros, ((),), {"dtype": torch.bool}))
        else:
            outs.append(g.call_function(torch.empty, (tuple(ex.shape),), {"dtype": ex.dtype}))
    g.output(tuple(outs))
    return g
