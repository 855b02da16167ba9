"""Insert the decision, the cache loads and the cache stores around every reusing site.

Matches: each site in ``GraphAnnotation.rewrites`` (its nodes carry the site in ``regions``).
Rewrite to (a ``reuse_residual`` site with one live-out ``h1`` and residual input ``h0``):
    before                          after
                                    pred = ditopt.decide(token, rid, graph, "blocks.3", shape)
                                    r_old = ditopt.cache_load(token, ..., "blocks.3", "residual0", ...)
    h1 = <region of blocks.3>(h0)   h1 = <region of blocks.3>(h0)
                                    r = h1 - h0                          (in the region)
                                    ditopt.cache_store(token, r, pred, ..., "blocks.3", "residual0")
The graph still computes everything and stays numerically identical; the skip-branch pass
then turns the region into a ``torch.cond`` that reads ``r_old`` when ``pred`` is False.
A ``reuse`` site stores and loads its outputs (slot ``output<i>``) instead.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ditopt.sites import tensor_meta

from .annotations import (Role, annotate, enclosing, graph_annotation, node_annotation, nodes_with_role, regions_of,
                          token_of)
from .pass_base import PassContext, PassResult, copy_meta


def insert_cache_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    rewrites = graph_annotation(gm).rewrites
    token = token_of(graph)
    have = {node_annotation(n).site for n in nodes_with_role(graph, Role.DECIDE)}
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    changed = False
    # Outermost first: an inner site's decision and loads join the enclosing region, which must
    # then already have its own (and ``order`` knows only the nodes there were at the start).
    for site, rewrite in sorted(rewrites.items(), key=lambda item: item[1].depth):
        if site in have:
            continue
        members = [n for n in graph.nodes if site in regions_of(n)]
        outer = enclosing(members, site)
        live_outs = [by_name[n] for n in ctx.sites[site].live_outs]
        residual = rewrite.slot == "residual"
        shapes = [tensor_meta(o) for o in live_outs]

        with graph.inserting_before(members[0]):
            # a static site's predicate lives on the host (no sync to branch on it); an adaptive one
            # is computed on the model's device
            device = ctx.device if rewrite.adaptive else torch.device("cpu")
            pred = graph.call_function(torch.ops.ditopt.decide.default,
                                       (token, ctx.runtime_id, ctx.graph_id, site, list(shapes[0][0]), device))
            loads = []
            for i, (shape, dtype) in enumerate(shapes):
                load = graph.call_function(torch.ops.ditopt.cache_load.default, (
                    token, ctx.runtime_id, ctx.graph_id, site, f"{rewrite.slot}{i}", list(shape), dtype, ctx.inductor))
                loads.append(load)
        copy_meta(pred, members[0], torch.zeros((), dtype=torch.bool, device=device))
        annotate(pred, role=Role.DECIDE, site=site, regions=outer)
        for i, load in enumerate(loads):
            copy_meta(load, members[0], torch.zeros(shapes[i][0], dtype=shapes[i][1]))
            annotate(load, role=Role.LOAD, site=site, index=i, regions=outer)

        anchor = max(members, key=order.__getitem__)
        values = []
        mains = [by_name[n] if n else None for n in ctx.sites[site].residual_inputs] if residual else [None] * len(live_outs)
        for i, out in enumerate(live_outs):
            main = mains[i]  # None: no input is shaped like this live-out (a broadcast), so its output is cached
            if main is not None:
                with graph.inserting_after(anchor):
                    value = graph.call_function(operator.sub, (out, main))
                copy_meta(value, out, _residual_example(out, main))
                annotate(value, role=Role.RESIDUAL, site=site, regions=outer | {site})
                anchor = value
            else:
                value = out
            values.append(value)
        for i, value in enumerate(values):
            with graph.inserting_after(anchor):
                store = graph.call_function(torch.ops.ditopt.cache_store.default, (
                    token, value, pred, ctx.runtime_id, ctx.graph_id, site, f"{rewrite.slot}{i}",
                    ctx.inductor or mains[i] is None))
            copy_meta(store, live_outs[i])
            annotate(store, role=Role.STORE, site=site, index=i, regions=outer)
            anchor = store
        changed = True
    if changed:
        graph.lint()
    return PassResult(gm, changed)


def _residual_example(out: fx.Node, main: fx.Node):
    """The example value of ``out - main``: computed on the two example values where both are
    tensors (fake or real, so it has the strides the subtraction really gives), else ``out``'s."""
    a, b = (n.meta.get("example_value", n.meta.get("val")) for n in (out, main))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        try:
            return a - b
        except RuntimeError:
            pass
    return out.meta.get("example_value", out.meta.get("tensor_meta"))
