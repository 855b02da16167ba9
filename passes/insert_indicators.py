"""Feed every watched tensor to its ``when`` rules' indicator.

Matches: nodes annotated ``watch``: the first live-out of a ``when.of`` site, or with
``on: input`` its modulated input (TeaCache: the normed, modulated hidden states that enter the
site's first attention; the plan resolves which node, ``annotate_decisions`` marks it).
Rewrite to:
    before                          after
    h = <watched tensor>            h = <watched tensor>
                                    ditopt.update_indicator(token, h, rid, graph, rule)
The runtime accumulates the relative L1 change of ``h`` (through the rule's ``rescale``
polynomial, if any) since the last computing step on the device; the decisions of the rule's
sites read it as a tensor (no host read). An update inside a region that reuses is hoisted
after its skip branch by ``insert_skip_branches``, like every effect.

Sequence-parallel graphs (``ctx.parallel``): each rank holds a slice of ``h``, so the update is
``ditopt.update_indicator_across(token, h, rid, graph, rule, group, world)``: the change is
averaged over the ranks (an all-reduce) before any decision reads it, and every rank decides
alike. With ``SequenceParallel(check=True)``, ``ditopt.check_decisions(token, inputs, names, rid,
graph, group, world)`` follows ``begin_step``: before any decision, it compares the ranks' schedules
and their inputs (the forward's tensor arguments, by checksum).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ditopt.runtime import distributed  # noqa: F401 - registers the ops across ranks

from .annotations import Role, annotate, node_annotation, token_of
from .insert_step_tracking import forward_inputs
from .pass_base import PassContext, PassResult


def insert_indicators(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    token = token_of(graph)
    across = ctx.parallel.resolve() if ctx.parallel is not None else None  # (rank, world, group)
    updates = (torch.ops.ditopt.update_indicator.default, torch.ops.ditopt.update_indicator_across.default)
    done = {n.args[4] for n in graph.nodes if n.target in updates}
    inserted = 0
    for node in list(graph.nodes):
        for rule in node_annotation(node).watch:
            if rule in done:
                continue
            args = (token, node, ctx.runtime_id, ctx.graph_id, rule)
            with graph.inserting_after(node):
                if across is None:
                    upd = graph.call_function(updates[0], args)
                else:
                    upd = graph.call_function(updates[1], (*args, across[2], across[1]))
            annotate(upd, role=Role.INDICATOR, regions=node_annotation(node).regions)
            upd.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            inserted += 1
    check = torch.ops.ditopt.check_decisions.default
    if across is not None and ctx.parallel.check and token is not None and not any(n.target is check
                                                                                   for n in graph.nodes):
        begin = next(n for n in graph.nodes if n.target is torch.ops.ditopt.begin_step.default)
        inputs = [(name, n) for name, n in forward_inputs(graph) if isinstance(n.meta.get("example_value"),
                                                                             torch.Tensor)]
        with graph.inserting_after(begin):
            graph.call_function(check, (token, [n for _, n in inputs], ",".join(name for name, _ in inputs),
                                        ctx.runtime_id, ctx.graph_id, across[2], across[1]))
        inserted += 1
    if inserted:
        graph.lint()
    return PassResult(gm, bool(inserted))
