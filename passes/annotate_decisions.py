"""Annotate the graph from the decision table: the only pass that reads the plan.

Matches: the nodes of every site that some step does not compute, and the node every ``when``
rule watches.
Rewrite to: no new nodes. Annotations only (:mod:`.annotations`):
    NodeAnnotation.regions      the names of the rewritten sites the node belongs to
    NodeAnnotation.watch        on the node a when rule watches (its site's first live-out, or
                                its modulated input for `on: input`): the when-rule indices
    GraphAnnotation.rewrites    {site: SiteRewrite(slot, depth, schedule)} for every site that reuses
    GraphAnnotation.windows     {site: window} for every self-attention site planned `window` (it runs
                                at every step, so its nodes join no region and it gets no skip branch)
    GraphAnnotation.cfg_shared  {site: CfgLayout} for every site planned `share_cfg` with batched CFG
                                (it runs at every step, on half the batch at share_cfg steps: likewise)
The table itself goes to the runtime from the backend; no copy of it is kept in the graph.
"""

from __future__ import annotations

import torch.fx as fx

from ditopt.runtime.decisions import DecisionTable

from .annotations import SiteRewrite, annotate, graph_annotation, node_annotation
from .sequence_parallel import check_stale_kv
from .pass_base import PassContext, PassResult


def annotate_decisions(gm: fx.GraphModule, ctx: PassContext, table: DecisionTable) -> PassResult:
    ga = graph_annotation(gm)
    if ga.annotated:
        return PassResult(gm, False)
    sites = ctx.sites
    by_name = {n.name: n for n in gm.graph.nodes}
    ga.windows = table.windowed()
    ga.cfg_shared = {name: table.cfg for name in table.cfg_shared()}  # insert_cfg_sharing rewrites these
    stale = check_stale_kv(gm, table, ctx)  # stale_kv sites run at every step: sp_attention reads the table
    ga.partials = table.partials()  # insert_partial rewrites these (they run at every step, on some tokens)
    for name in table.actions:
        if name in ga.windows or name in ga.cfg_shared or name in stale or name in ga.partials:
            continue
        for node_name in sites[name].nodes:
            node = by_name[node_name]
            annotate(node, regions=(*node_annotation(node).regions, name))
        depth = sum(1 for a in sites.ancestors(name) if a in table.actions and a not in ga.windows)
        schedule = table.schedule(name)  # action, when rule, order and forecaster per step
        ga.rewrites[name] = SiteRewrite(slot=table.slots[name], depth=depth, schedule=schedule)
    for index, indicator in enumerate(table.indicators):
        node = by_name[indicator.node]
        annotate(node, watch=(*node_annotation(node).watch, index))
    ga.annotated = True
    return PassResult(gm, bool(table.actions) or bool(table.indicators))
