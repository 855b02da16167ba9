"""Annotate the graph from the plan: the only pass that reads the plan.

Matches: the nodes of every site that some step does not compute, and the output of every
site a ``when`` rule watches.
Rewrite to: no new nodes. Annotations only:
    node.meta["ditopt"]["regions"]     the names of the reusing sites the node belongs to
    node.meta["ditopt"]["watch"]       on the node a when rule watches (its site's first live-out, or
                                       its modulated input for `on: input`): the when-rule indices
    gm.meta["ditopt"]["sites"]         {site: {"slot", "live_outs", "residual_inputs", "depth"}}
    gm.meta["ditopt"]["decisions"]     the runtime's GraphDecisions for this graph
"""

from __future__ import annotations

import torch.fx as fx

from ditopt.runtime import GraphDecisions

from .pass_base import PassContext, PassResult, annotation, graph_annotation


def annotate_decisions(gm: fx.GraphModule, ctx: PassContext, compiled) -> PassResult:
    ga = graph_annotation(gm)
    if ga.get("annotated"):
        return PassResult(gm, False)
    sites = ctx.sites
    by_name = {n.name: n for n in gm.graph.nodes}
    reusing = list(compiled.actions)
    site_info = {}
    for name in reusing:
        site = sites[name]
        for node_name in site.nodes:
            ann = annotation(by_name[node_name])
            ann["regions"] = sorted(set(ann.get("regions", ())) | {name})
        site_info[name] = {
            "slot": compiled.slots[name],
            "live_outs": list(site.live_outs),
            "residual_inputs": list(site.residual_inputs),
            "depth": sum(1 for a in sites.ancestors(name) if a in compiled.actions),
        }
    indicators = getattr(compiled, "indicators", None) or []
    for index, (of, _) in enumerate(compiled.when_rules):
        watched = indicators[index].node if indicators else sites[of].live_outs[0]
        ann = annotation(by_name[watched])
        ann["watch"] = sorted(set(ann.get("watch", ())) | {index})
    ga["sites"] = site_info
    ga["decisions"] = GraphDecisions(
        steps=compiled.steps,
        actions=compiled.actions,
        adaptive=compiled.adaptive,
        when_rules=list(compiled.when_rules),
        slots=dict(compiled.slots),
        parents={s.name: sites.ancestors(s.name) for s in sites},
        site_order=sites.names(),
        orders=dict(getattr(compiled, "orders", {})),
        rescale=[i.rescale for i in indicators],
    )
    ga["annotated"] = True
    return PassResult(gm, bool(reusing) or bool(compiled.when_rules))
