"""The rewrite the ``share_cfg`` and ``partial`` passes share: a region replaced by a
``torch.cond`` between two branch graphs that read cache slots, its live-outs taken from the cond,
and the values the region leaves for later steps stored.

Each pass finds its region and builds its two branches; this module does the rest the same way:
the ``decide`` node (true: the site computes in full at this call), one ``cache_load`` per slot,
the cond over the region's operands and the loads, the live-outs rewired to the cond's first
outputs, a ``cache_store`` of each slot's value, and the region's nodes erased.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .annotations import Role, annotate, regions_of, token_of
from .insert_skip_branches import _pinned_operands
from .pass_base import PassContext, copy_meta, replace_site_nodes

Shapes = list[tuple[list[int], torch.dtype]]


def insert_cached_cond(gm: fx.GraphModule, ctx: PassContext, site: str, *, members: list[fx.Node],
                       operands: list[fx.Node], live_outs: list[fx.Node], shapes: Shapes, slot: str, base: str,
                       build: Callable[[list[fx.Node], list[fx.Node]], tuple[tuple[str, fx.Graph], ...]],
                       extra: int) -> None:
    """Replace ``members`` (a region in graph order) by ``cond(decide, true, false, operands + loads)``.

    ``shapes``: the cache slots ``f"{slot}{i}"`` (shape, dtype), each loaded before the region.
    ``build(operands, loads)`` returns the (name, graph) of the true then the false branch; both
    return the live-outs, then ``extra`` more values. The last ``len(shapes)`` of the cond's outputs
    are stored in the slots, in order (the extra values' shapes are the last ``extra`` slots').
    """
    graph = gm.graph
    token = token_of(graph)
    first = members[0]
    outer = regions_of(first)
    with graph.inserting_before(first):
        full = graph.call_function(torch.ops.ditopt.decide.default,
                                   (token, ctx.runtime_id, ctx.graph_id, site, shapes[0][0], torch.device("cpu")))
        loads = [graph.call_function(torch.ops.ditopt.cache_load.default, (
            token, ctx.runtime_id, ctx.graph_id, site, f"{slot}{i}", shape, dtype, ctx.inductor))
            for i, (shape, dtype) in enumerate(shapes)]
    copy_meta(full, first, torch.zeros((), dtype=torch.bool))
    annotate(full, role=Role.DECIDE, site=site, regions=outer)
    for i, load in enumerate(loads):
        copy_meta(load, first, torch.zeros(shapes[i][0], dtype=shapes[i][1]))
        annotate(load, role=Role.LOAD, site=site, index=i, regions=outer)

    operands = [*operands, *loads]
    fns, previous = [], members[-1]
    for name, g in build(operands, loads):
        if ctx.inductor:
            densify(g)
        setattr(gm, f"{base}_{name}", fx.GraphModule(gm, g))
        with graph.inserting_after(previous):
            previous = graph.get_attr(f"{base}_{name}")
        annotate(previous, role=Role.BRANCH_FN, site=site, regions=outer)
        fns.append(previous)
    passed = _pinned_operands(graph, operands, fns[0], outer) if ctx.inductor else operands
    with graph.inserting_after(previous):
        cond = graph.call_function(torch.ops.higher_order.cond, (full, *fns, tuple(passed)))
    cond.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    annotate(cond, role=Role.SKIP_BRANCH, site=site, regions=outer, replaced=[n.name for n in members])
    previous, renames, items = cond, {}, []
    for i in range(len(live_outs) + extra):
        with graph.inserting_after(previous):
            item = graph.call_function(operator.getitem, (cond, i))
        if i < len(live_outs):
            out = live_outs[i]
            item.meta.update({k: v for k, v in out.meta.items() if k in ("example_value", "val", "tensor_meta",
                                                                           "nn_module_stack")})
            annotate(item, role=Role.BRANCH_OUTPUT, site=site, regions=regions_of(out) - {site})
        else:
            shape, dtype = shapes[len(shapes) - (len(live_outs) + extra) + i]
            copy_meta(item, first, torch.zeros(shape, dtype=dtype))
            annotate(item, role=Role.BRANCH_OUTPUT, site=site, regions=outer)
        items.append(item)
        previous = item
    inside = set(members)
    for i, out in enumerate(live_outs):
        out.replace_all_uses_with(items[i], delete_user_cb=lambda user: user not in inside)
        renames[out.name] = items[i].name
    for i, value in enumerate(items[len(items) - len(shapes):]):
        with graph.inserting_after(previous):
            store = graph.call_function(torch.ops.ditopt.cache_store.default, (
                token, value, full, ctx.runtime_id, ctx.graph_id, site, f"{slot}{i}", ctx.inductor))
        copy_meta(store, live_outs[min(i, len(live_outs) - 1)])
        annotate(store, role=Role.STORE, site=site, index=i, regions=outer)
        previous = store
    for n in reversed(members):
        graph.erase_node(n)
    ctx.sites = replace_site_nodes(ctx.sites, renames)


def densify(g: fx.Graph) -> None:
    """Under inductor: every branch output a fresh contiguous tensor (torch.cond's rule)."""
    out = next(iter(g.find_nodes(op="output")))
    with g.inserting_before(out):
        dense = [g.call_function(torch.ops.ditopt.dense_copy.default, (v,)) for v in out.args[0]]
    out.args = (tuple(dense),)
