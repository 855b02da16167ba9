"""Coalesce runs of adjacent sites that share a schedule into one rewritten region.

Matches: consecutive sibling sites in ``GraphAnnotation.rewrites`` (blocks of the stack, in graph
order) with the same schedule (``DecisionTable.schedule``: action, ``when`` rule, forecast order and
method at every step) and cache slot, where each site's live-outs feed only the next site, as its
residual inputs.
Rewrite to: no new nodes. The run becomes one site named after its first member (the lead):
    before                                     after
    regions of blocks.1 nodes = (blocks.1,)     regions = (blocks.1,)  for the nodes of blocks.1..blocks.29
    regions of blocks.2 nodes = (blocks.2,)     ctx.sites["blocks.1"]: the run's nodes, blocks.1's residual
    ...                                         inputs, blocks.29's live-outs
    rewrites: blocks.1, blocks.2, ...           rewrites: blocks.1;  coalesced: {blocks.1: (blocks.1, ..., blocks.29)}
so the later passes give the run one decision, one cache load and store per live-out, and one
skip branch. This is exact: the residual of a run is the sum of its blocks' residuals, a reused
output is the run's last output, and a forecast of a sum is the sum of the forecasts (every
forecaster, taylor, hermite, foca or freq, is linear in the cached values). It divides the cache and the runtime ops by the run's length (FORA
block level on a 30-block model: one residual per CFG branch instead of 30).
Does not fire with ``ctx.coalesce`` off, nor on a site with rewritten sites inside it.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from ditopt.runtime.decisions import DecisionTable
from ditopt.sites import SiteTable

from .annotations import annotate, graph_annotation, node_annotation
from .pass_base import PassContext, PassResult


def coalesce_regions(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ga = graph_annotation(gm)
    if not ctx.coalesce or ga.coalesced or ga.skip_branches is not None:
        return PassResult(gm, False)
    runs = _runs(gm.graph, ctx.sites, ga)
    if not runs:
        return PassResult(gm, False)
    merged = {}
    for run in runs:
        lead, members = run[0], set(run)
        for node in gm.graph.nodes:
            regions = node_annotation(node).regions
            if members & set(regions):
                annotate(node, regions=[lead if r in members else r for r in regions])
        for site in run[1:]:
            del ga.rewrites[site]
        ga.coalesced[lead] = tuple(run)
        merged[lead] = _merged_site(ctx.sites, run)
    ctx.sites = SiteTable([merged.get(s.name, s) for s in ctx.sites], model=ctx.sites.model)
    return PassResult(gm, True)


def _runs(graph: fx.Graph, sites: SiteTable, ga) -> list[list[str]]:
    users = {n.name: {u.name for u in n.users} for n in graph.nodes}
    return find_runs(sites, {s: (r.schedule, r.slot) for s, r in ga.rewrites.items()}, users)


def find_runs(sites: SiteTable, schedules: dict[str, tuple], users: dict[str, set[str]]) -> list[list[str]]:
    """Maximal runs (two or more) of rewritten sites that can be one region, in graph order.

    ``schedules[site]`` is what must be equal along a run (the site's schedule and cache slot);
    ``users[node]`` the names of a node's users. The cost model calls this too."""
    inside = {a for s in schedules for a in sites.ancestors(s)}  # sites with a rewritten site inside
    candidates = [s.name for s in sites if s.name in schedules and s.name not in inside]
    runs: list[list[str]] = []
    for name in candidates:
        if runs and _continues(sites, schedules, users, runs[-1][-1], name):
            runs[-1].append(name)
        else:
            runs.append([name])
    return [run for run in runs if len(run) > 1]


def _continues(sites: SiteTable, schedules, users: dict[str, set[str]], prev: str, name: str) -> bool:
    a, b = sites[prev], sites[name]
    if a.parent != b.parent or schedules[prev] != schedules[name] or len(a.live_outs) != len(b.live_outs):
        return False
    if tuple(b.residual_inputs) != tuple(a.live_outs):  # b continues from exactly what a returns
        return False
    b_nodes = set(b.nodes)
    return all(users[out] <= b_nodes for out in a.live_outs)  # and nothing else reads it


def _merged_site(sites: SiteTable, run: list[str]):
    first, last = sites[run[0]], sites[run[-1]]
    nodes = tuple(n for s in run for n in sites[s].nodes)
    inner = set(nodes)
    inputs = tuple(dict.fromkeys(i for s in run for i in sites[s].inputs if i not in inner))
    return replace(first, nodes=nodes, inputs=inputs, live_outs=last.live_outs)


def table_runs(table: DecisionTable, sites: SiteTable, users: dict[str, set[str]]) -> dict[str, tuple[str, ...]]:
    """The runs this pass makes of ``table``'s sites (lead -> members): for the cost model, and for
    ``set_plan``, which may swap a table into a graph only if it coalesces alike."""
    windowed = table.windowed()  # window sites run at every step: annotate_decisions makes them no region
    windowed = {**windowed, **table.partials()}  # partial sites likewise (passes/insert_partial.py)
    windowed.update(dict.fromkeys(table.cfg_shared()))  # batched share_cfg sites likewise (insert_cfg_sharing.py)
    schedules = {s: (table.schedule(s), table.slots[s]) for s in table.actions if s not in windowed}
    return {run[0]: tuple(run) for run in find_runs(sites, schedules, users)}


__all__ = ["coalesce_regions", "find_runs", "table_runs"]
