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
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .annotations import Role, annotate, node_annotation, token_of
from .pass_base import PassContext, PassResult


def insert_indicators(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    token = token_of(graph)
    done = {n.args[4] for n in graph.nodes if n.target is torch.ops.ditopt.update_indicator.default}
    inserted = 0
    for node in list(graph.nodes):
        for rule in node_annotation(node).watch:
            if rule in done:
                continue
            with graph.inserting_after(node):
                upd = graph.call_function(torch.ops.ditopt.update_indicator.default,
                                          (token, node, ctx.runtime_id, ctx.graph_id, rule))
            annotate(upd, role=Role.INDICATOR, regions=node_annotation(node).regions)
            upd.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            inserted += 1
    if inserted:
        graph.lint()
    return PassResult(gm, bool(inserted))
