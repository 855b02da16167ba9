"""Resolve a plan against a model's sites: the one place a :class:`DecisionTable` is built.

:meth:`ditopt.Plan.compile` calls :func:`compile_plan`. Rules apply in order (a later rule
overrides an earlier one on the same site and step); every misuse found here (a pattern that
matches nothing, an action a site cannot take, a ``when`` rule watching a site that reuses)
raises :class:`~ditopt.PlanError` naming the rule, its YAML line and the site, before any
graph is rewritten.

Example:
    >>> from ditopt import Plan
    >>> from ditopt.sites import Site, SiteTable
    >>> sites = SiteTable([Site("stack", "stack"), Site("blocks.0", "block", parent="stack", live_outs=("h1",),
    ...                    residual_inputs=("h0",)), Site("blocks.1", "block", parent="stack",
    ...                    live_outs=("h2",), residual_inputs=("h1",))])
    >>> plan = Plan.from_yaml("version: 1\\nsteps: 3\\nrules: [{sites: 'blocks.1', steps: [2], action: reuse_residual}]")
    >>> table = compile_plan(plan, sites)
    >>> table.actions["blocks.1"], table.slots
    (['compute', 'compute', 'reuse_residual'], {'blocks.1': 'residual'})
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

from ditopt.runtime.cfg_sharing import CfgLayout
from ditopt.runtime.decisions import SLOTS, Action, DecisionTable, Indicator
from ditopt.runtime.window_attention import GridWindow

from .errors import PlanError
from .sites import STACK, SiteTable, is_positional

if TYPE_CHECKING:
    from .plan import Plan, Rule


def compile_plan(plan: "Plan", sites: SiteTable) -> DecisionTable:
    """Resolve ``plan``'s rules against ``sites`` into the graph's decision table (the plan's own
    checks, :meth:`Plan.check`, first: a plan built in Python is typed and bounded here too)."""
    plan.check()
    if plan.model and sites.sites and sites.model not in (None, plan.model):
        raise PlanError(f"plan was made for {plan.model}, not {sites.model}")
    table = DecisionTable(steps=plan.steps, actions={}, adaptive={}, slots={}, indicators=[], orders={}, methods={},
                          windows={}, parents={s.name: sites.ancestors(s.name) for s in sites}, site_order=sites.names())
    origin: dict[tuple[str, int], int] = {}  # (site, step) -> the rule that set it
    rule_of_indicator: list[int] = []
    for i, rule in enumerate(plan.rules):
        matched = _matched_sites(rule, i, sites)
        when_index = None
        if rule.when is not None:
            when_index = len(table.indicators)
            table.indicators.append(_indicator(rule, i, sites))
            rule_of_indicator.append(i)
            of = table.indicators[-1].of  # a site is never decided by its own output, nor one inside or around it
            matched = [s for s in matched if s.name != of and of not in sites.ancestors(s.name)
                       and s.name not in sites.ancestors(of)]
        for site in matched:
            taken = _residual_or_output(rule, site)
            _check_can_take(taken, i, site)
            _apply(table, taken, i, site.name, when_index, origin)
        if rule.action == Action.SHARE_CFG and matched:  # one CFG layout per plan: the caller's
            layout = rule.cfg or CfgLayout()
            if table.cfg is not None and table.cfg != layout:
                raise PlanError(f"share_cfg rules disagree on the CFG layout: {table.cfg} and {layout}",
                                rule=i, line=rule.line, site=",".join(rule.sites))
            table.cfg = layout
    _assign_slots(plan, table, sites, origin)
    _check_when(plan, table, sites, rule_of_indicator)
    _check_no_adaptive_forecast(plan, table, origin)
    _warn_unplanned_tail(plan, table, sites)
    if not table.actions and any(rule.action != Action.COMPUTE for rule in plan.rules):
        kinds = sorted({f"{s.attention} attention" if s.kind == "attention" else s.kind for s in sites})
        name = f" {plan.name!r}" if plan.name else ""
        warnings.warn(f"ditopt: plan{name} decides nothing but compute on this model: its rules reach "
                      f"no site they apply to (this model's sites: {', '.join(kinds)}); it runs as the bare model",
                      RuntimeWarning, stacklevel=2)
    return table


def _warn_unplanned_tail(plan: "Plan", table: DecisionTable, sites: SiteTable) -> None:
    """A plan that names its sites one by one (what the planner and ``tune`` write) and covers only
    the first blocks of a list of them, the rest of which this model has: made on a smaller model
    of the same class. The rest compute at every step: correct, but not what was planned."""
    if not plan.model or any(any(c in p for c in "*?[!") or is_positional(p) for rule in plan.rules
                             for p in rule.sites):
        return
    planned = {a for name in table.actions for a in (name, *sites.ancestors(name))}
    lists: dict[str, list[tuple[int, bool]]] = {}
    for name in sites.stack_blocks():
        head, _, index = name.rpartition(".")
        if index.isdigit():
            lists.setdefault(head, []).append((int(index), name in planned))
    for head, blocks in lists.items():
        covered = [i for i, p in sorted(blocks) if p]
        if covered and covered == list(range(len(covered))) and len(covered) < len(blocks):
            warnings.warn(f"ditopt: the plan names {head}.0-{len(covered) - 1} of this model's {len(blocks)} "
                          f"{head} ({head}.{len(covered)} on compute at every step): a plan made on a smaller "
                          f"model of this class? profile this one (ditopt.profile) for a plan of all its blocks",
                          RuntimeWarning, stacklevel=2)


def _matched_sites(rule: "Rule", i: int, sites: SiteTable) -> list:
    where = dict(rule=i, line=rule.line)
    for pattern in rule.sites:
        if pattern.startswith("!"):
            continue
        if is_positional(pattern) and not sites.match([pattern]):
            raise PlanError(f"pattern {pattern!r} selects none of the stack's {len(sites.stack_blocks())} "
                            f"blocks", site=pattern, **where)
        if not sites.match([pattern]):
            raise PlanError(f"pattern {pattern!r} matches no site; sites are e.g. {sites.names()[:6]}",
                            site=pattern, **where)
    matched = sites.match(list(rule.sites), kind=rule.kind)
    if not matched and rule.kind is not None and all(p == "*" for p in rule.sites):
        return []  # a kind this model lacks (PRX's blocks hold their MLP inline): as for `attention`, no effect
    if not matched:
        raise PlanError(f"no site of kind {rule.kind!r} matches {list(rule.sites)}", site=",".join(rule.sites),
                        **where)
    if rule.attention is not None:
        # A model without attention of this kind (DiT has no cross attention) leaves the rule
        # without effect: PAB's per-kind ranges apply to the kinds it has.
        matched = [s for s in matched if s.attention == rule.attention]
    return matched


def _indicator(rule: "Rule", i: int, sites: SiteTable) -> Indicator:
    where = dict(rule=i, line=rule.line)
    of = resolve_of(rule.when.of, rule.kind, sites)
    if of is None:
        raise PlanError(f"'when.of' names no site: {rule.when.of!r}", site=rule.when.of, **where)
    watched = sites[of].live_outs[0] if rule.when.on == "output" else sites[of].modulated_input
    if watched is None:
        raise PlanError(f"'when.on: {rule.when.on}': site {of!r} has none that ditopt can find (use on: output)",
                        site=of, **where)
    return Indicator(of=of, below=rule.when.below, node=watched, rescale=rule.when.rescale)


def _residual_or_output(rule: "Rule", site) -> "Rule":
    """``rule`` as it applies to ``site``: a ``reuse_residual`` that reaches by a pattern a site with
    no input shaped like its output (a block whose input broadcasts against the batch: Kandinsky 5's
    text blocks at two videos a prompt) reuses the site's output there, said once per site; a
    rule naming the site itself is refused by :func:`_check_can_take`."""
    if rule.action != Action.REUSE_RESIDUAL or site.name in rule.sites or any(site.residual_inputs) \
            or not site.skippable:
        return rule
    warnings.warn(f"ditopt: site {site.name!r} has no input shaped like its output, so reuse_residual cannot add "
                  f"a fresh input to its cached residual there: it reuses the site's output", RuntimeWarning,
                  stacklevel=4)
    return replace(rule, action=Action.REUSE)


def _check_can_take(rule: "Rule", i: int, site) -> None:
    where = dict(rule=i, line=rule.line, site=site.name)
    if rule.action == Action.WINDOW:  # the site still runs: only its self-attention kernel changes
        per_axis = isinstance(rule.window, GridWindow)  # joint attention: the grid's tokens windowed, the rest full
        if site.kind != "attention" or site.attention not in (("self", "joint") if per_axis else ("self",)):
            what = f"{site.attention} attention" if site.kind == "attention" else f"a {site.kind}"
            raise PlanError(f"window applies to self-attention sites only; {site.name!r} is {what} (narrow the rule "
                            f"with kind: attention, attention: self; joint attention takes a per-axis window)", **where)
        return
    if rule.action == Action.STALE_KV:  # the site still runs: only its K/V exchange is skipped (runtime/stale_kv.py)
        if site.kind != "attention" or site.attention not in ("self", "joint"):  # joint: its text K/V stay fresh
            what = f"{site.attention} attention" if site.kind == "attention" else f"a {site.kind}"
            raise PlanError(f"stale_kv applies to self- and joint attention sites only; {site.name!r} is {what} "
                            f"(narrow the rule with kind: attention, attention: self)", **where)
        return
    if rule.action == Action.SHARE_CFG and site.kind not in ("attention", "block"):
        raise PlanError(f"share_cfg applies to attention and block sites; {site.name!r} is a {site.kind}", **where)
    if rule.action != Action.COMPUTE and not site.skippable:
        raise PlanError(f"site cannot be skipped: {site.why_not_skippable}", **where)
    if rule.action == Action.REUSE_RESIDUAL and all(r is None for r in site.residual_inputs):
        raise PlanError("reuse_residual needs an input shaped like an output; this site has none (use 'reuse')",
                        **where)


def _apply(table: DecisionTable, rule: "Rule", i: int, site: str, when_index: int | None,
           origin: dict[tuple[str, int], int]) -> None:
    action = Action(rule.action)
    row = table.actions.setdefault(site, [Action.COMPUTE] * table.steps)
    arow = table.adaptive.setdefault(site, [None] * table.steps)
    orow = table.orders.setdefault(site, [0] * table.steps)
    mrow = table.methods.setdefault(site, [""] * table.steps)
    wrow = table.windows.setdefault(site, [0] * table.steps)
    for s in rule.step_list(table.steps):
        row[s] = action
        arow[s] = when_index if action != Action.COMPUTE else None
        orow[s] = (1 if rule.order is None else rule.order) if action == Action.PREDICT else 0
        mrow[s] = (rule.method or "taylor") if action == Action.PREDICT else ""
        wrow[s] = rule.window if action == Action.WINDOW else 0
        if action == Action.PARTIAL or site in table.ratios:  # partial: share of tokens recomputed (0 elsewhere)
            table.ratios.setdefault(site, [0.0] * table.steps)[s] = rule.ratio if action == Action.PARTIAL else 0.0
        origin[(site, s)] = i


def _assign_slots(plan: "Plan", table: DecisionTable, sites: SiteTable, origin) -> None:
    """Drop sites that always compute; give each other site the cache slot its reuse reads."""
    for name, row in list(table.actions.items()):
        used = {a for a in row if a != Action.COMPUTE}
        if not used:
            del table.actions[name], table.adaptive[name], table.orders[name], table.methods[name], table.windows[name]
            continue
        if Action.WINDOW in used:
            _check_window_row(plan, table, name, used, origin)
        if Action.PARTIAL in used:
            _check_partial_row(plan, table, name, used, origin)
        if not any(table.ratios.get(name, ())):
            table.ratios.pop(name, None)
        if Action.SHARE_CFG in used and len(used) > 1:
            i = origin[(name, row.index(Action.SHARE_CFG))]
            raise PlanError(f"a share_cfg site takes no other reuse in the same plan, got "
                            f"{sorted(a.value for a in used)}", rule=i, line=plan.rules[i].line, site=name)
        if not any(table.windows[name]):
            del table.windows[name]
        kinds = used - {Action.PREDICT}
        if len(kinds) > 1:
            raise PlanError(f"a site takes one kind of reuse per plan, got {sorted(a.value for a in used)}", site=name)
        if kinds:
            table.slots[name] = SLOTS[kinds.pop()]
        else:  # predict alone forecasts the residual where the site has one, else its output
            residual = sites[name].residual_form and all(r is not None for r in sites[name].residual_inputs)
            table.slots[name] = "residual" if residual else "output"
        static = [s for s, a in enumerate(row) if a != Action.COMPUTE and table.adaptive[name][s] is None]
        first = static[0] if static else None  # adaptive steps compute by themselves while nothing is cached
        if first is not None and Action.COMPUTE not in row[:first]:
            i = origin[(name, first)]
            raise PlanError(f"{row[first]} at step {first} before the site computed at any step",
                            rule=i, line=plan.rules[i].line, site=name)


def _check_partial_row(plan: "Plan", table: DecisionTable, name: str, used: set, origin) -> None:
    """A partial site takes no other reuse (its graph holds one cond: all tokens or some; an
    enclosing site may reuse), and one ratio: the graph gathers a fixed number of tokens."""
    steps = [s for s, r in enumerate(table.ratios[name]) if r]
    i = origin[(name, steps[-1])]
    where = dict(rule=i, line=plan.rules[i].line, site=name)
    if len(used) > 1:
        raise PlanError(f"a partial site takes no other reuse in the same plan, got {sorted(a.value for a in used)} "
                        f"(let an enclosing site reuse instead, as presets.duca does)", **where)
    ratios = sorted({table.ratios[name][s] for s in steps})
    if len(ratios) > 1:
        raise PlanError(f"a site takes one partial ratio per plan (the graph gathers a fixed number of tokens), "
                        f"got {ratios}", **where)


def _check_window_row(plan: "Plan", table: DecisionTable, name: str, used: set, origin) -> None:
    """A window site takes no other reuse (its graph keeps the site and swaps the attention
    kernel), and one window: the graph computes one window size per site."""
    steps = [s for s, w in enumerate(table.windows[name]) if w]
    i = origin[(name, steps[-1])]
    where = dict(rule=i, line=plan.rules[i].line, site=name)
    if len(used) > 1:
        raise PlanError(f"a window site takes no other reuse in the same plan, got {sorted(a.value for a in used)}",
                        **where)
    sizes = sorted({table.windows[name][s] for s in steps})
    if len(sizes) > 1:
        raise PlanError(f"a site takes one window size per plan (the graph computes one), got {sizes}", **where)


def _check_when(plan: "Plan", table: DecisionTable, sites: SiteTable, rule_of_indicator: list[int]) -> None:
    order = {n: i for i, n in enumerate(sites.names())}
    for index, indicator in enumerate(table.indicators):
        of = indicator.of
        governed = [s for s, row in table.adaptive.items() if index in row]
        rule_i = rule_of_indicator[index]
        where = dict(rule=rule_i, line=plan.rules[rule_i].line)
        for s in governed:
            if s == of or of in sites.ancestors(s) or s in sites.ancestors(of):
                raise PlanError(f"'when.of' site {of!r} cannot be {s!r}, inside it or contain it", site=s, **where)
            if order[s] <= order[of]:
                raise PlanError(f"site {s!r} runs before its 'when.of' site {of!r}", site=s, **where)
        steps = {st for s in governed for st, r in enumerate(table.adaptive[s]) if r == index}
        for anc in [of, *sites.ancestors(of)]:
            row = table.actions.get(anc)
            if row and any(row[st] != Action.COMPUTE for st in steps):
                raise PlanError(f"the 'when.of' site must compute at every step the rule decides, but "
                                f"{anc!r} reuses", site=of, **where)


def _check_no_adaptive_forecast(plan: "Plan", table: DecisionTable, origin) -> None:
    for name, row in table.actions.items():
        for st, a in enumerate(row):
            if a == Action.PREDICT and table.adaptive[name][st] is not None:
                i = origin[(name, st)]
                raise PlanError("predict cannot be adaptive ('when'): a forecast needs a fixed step table",
                                rule=i, line=plan.rules[i].line, site=name)


def resolve_of(pattern: str, kind: str | None, sites: SiteTable) -> str | None:
    """The site a ``when.of`` names: the site itself, for ``stack[...]`` the first block it
    selects, or for a glob the first match in graph order (of the rule's kind), preferring the
    blocks of the stack."""
    if pattern in sites:
        return pattern
    if is_positional(pattern):
        blocks = sites.match([pattern], kind="block")
        return blocks[0].name if blocks else None
    found = sites.match([pattern], kind=kind)
    pick = [s for s in found if s.parent == STACK] or found
    return pick[0].name if pick else None


__all__ = ["compile_plan", "resolve_of"]
