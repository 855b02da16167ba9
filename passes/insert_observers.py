"""Observe every site's output (and residual) for profiling; no effect on what is computed.

Matches: every block, attention, feed-forward and output site, when ``ctx.observe`` is set (the
profiler's all-compute graphs); otherwise nothing.
Rewrite to (a site with live-out ``h1`` and residual input ``h0``):
    before                          after
    h1 = <region>(h0)               h1 = <region>(h0)
                                    ditopt.observe(token, h1, h0, rid, graph, "blocks.3")
A site without residual form (no add chain from an input to each output: an attention or
feed-forward inside a block) passes its output twice: its output is what is replayed and forecast. The runtime's recorder measures, per
step and CFG branch, the change of the output and residual against the previous step.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ditopt.regions import tensor_meta

from .annotations import Role, annotate, node_annotation, token_of
from .pass_base import PassContext, PassResult

OBSERVED_KINDS = ("block", "attention", "feedforward", "output")


def insert_observers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.observe:
        return PassResult(gm, False)
    graph = gm.graph
    token = token_of(graph)
    if token is None:
        return PassResult(gm, False)
    done = {n.args[5] for n in graph.nodes if n.target is torch.ops.ditopt.observe.default}
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    inserted = 0
    for site in ctx.sites:
        if site.kind not in OBSERVED_KINDS or site.name in done or not site.live_outs:
            continue
        first = next((i for i, o in enumerate(site.live_outs) if tensor_meta(by_name[o]) is not None), None)
        if first is None:  # only sizes leave it (shape arithmetic dynamo placed in the module)
            continue
        out = by_name[site.live_outs[first]]
        inp = site.residual_inputs[first] if site.residual_form and len(site.residual_inputs) > first else None
        inp = by_name[inp] if inp else out
        anchor = max((out, inp), key=order.__getitem__)
        with graph.inserting_after(anchor):
            node = graph.call_function(torch.ops.ditopt.observe.default,
                                       (token, out, inp, ctx.runtime_id, ctx.graph_id, site.name))
        annotate(node, role=Role.OBSERVE, site=site.name, regions=node_annotation(out).regions)
        node.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
        inserted += 1
    if inserted:
        graph.lint()
    return PassResult(gm, bool(inserted))
