"""The graph diff's model: the rewritten graph walked node by node, each node marked kept,
inserted or skipped and placed in its group (site, skip branch, compute or reuse side).

The passes' annotations are read here, through :mod:`ditopt.passes.annotations` only; the
renderers (:mod:`.text`, :mod:`.dot`, :mod:`.html`) read this model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ditopt import Action, DecisionTable, DitoptBackend, Plan, SiteTable
from ditopt.capture import Captured, capture, module_stack
from ditopt.passes.annotations import Role, node_annotation, role_of
from ditopt.runtime import Runtime
from ditopt.sites import is_param, tensor_meta

INPUTS = "inputs"
OUTSIDE = "outside"  # top-level nodes in no site (embeddings, output projection)
# Per-step decision of a site as the page shows it: (short label, colour).
DECISION_STYLE = {
    "compute": ("C", "#d9d9d9"),
    "reuse": ("R", "#4caf50"),
    "reuse_residual": ("r", "#1b7f3b"),
    "predict": ("P", "#8e44ad"),
    "adaptive": ("A", "#f0a500"),
    "skipped": ("S", "#8fa7bd"),
}


def decision_style(decision: str) -> tuple[str, str]:
    """(label, colour) of a decision; an action this page does not know yet gets its initial."""
    return DECISION_STYLE.get(decision, (decision[:1].upper(), "#b0b0b0"))


@dataclass
class DiffNode:
    """One node of the rewritten graph (or of one of its branches), with where it came from.

    ``id`` is unique in the diff: the node name, prefixed by the branch submodule it lives in.
    ``skipped_by`` names the sites whose skip branches hold the node (outermost first): it runs
    only when all of them compute. ``role`` is the role a pass annotated an inserted node with
    (a :class:`~ditopt.passes.annotations.Role` value: ``decide``, ``load``, ``store``,
    ``skip_branch``, ...) or ``reuse`` on a reuse side. ``groups`` are the
    keys of the groups holding it, outermost first.
    """

    id: str
    name: str
    op: str
    target: str
    shape: str
    module: str
    inserted: bool
    skipped_by: tuple[str, ...]
    role: str | None
    site: str | None
    groups: tuple[str, ...]
    inputs: tuple[str, ...]
    param: bool = False

    @property
    def status(self) -> str:
        """``inserted``, ``skipped`` or ``kept`` (an inserted node inside a skip branch is inserted)."""
        if self.inserted:
            return "inserted"
        return "skipped" if self.skipped_by else "kept"


@dataclass
class Group:
    """A box of the page: a site, a skip branch, its compute or reuse side, or the inputs.

    ``key`` is ``site:<name>``, ``branch:<name>``, ``compute:<name>``, ``reuse:<name>``,
    ``inputs`` or ``outside`` (top-level nodes in no site); ``part`` counts the groups opened
    with that key so far (2 and up: a continued group).
    """

    key: str
    part: int = 1
    children: list[Any] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]

    @property
    def site(self) -> str | None:
        return self.key.split(":", 1)[1] if ":" in self.key else None

    def nodes(self) -> list[DiffNode]:
        out = []
        for c in self.children:
            out.extend(c.nodes() if isinstance(c, Group) else [c])
        return out

    def groups(self) -> list["Group"]:
        out = []
        for c in self.children:
            if isinstance(c, Group):
                out.append(c)
                out.extend(c.groups())
        return out


@dataclass
class GraphDiff:
    """The graph before and after the passes, lined up; render with ``to_html``/``to_text``/``to_dot``."""

    model: str
    plan_name: str
    before: fx.GraphModule
    after: fx.GraphModule
    sites: SiteTable
    table: DecisionTable  # the plan compiled against the sites
    nodes: list[DiffNode]
    root: Group

    def inserted(self) -> list[DiffNode]:
        return [n for n in self.nodes if n.inserted]

    def skipped_regions(self) -> dict[str, list[str]]:
        """For each site with a skip branch, the original nodes its compute side holds (a node
        of a nested branch counts for the innermost one)."""
        regions: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.role == Role.SKIP_BRANCH:
                regions.setdefault(n.site, [])
        for n in self.nodes:
            if not n.inserted and n.skipped_by:
                regions[n.skipped_by[-1]].append(n.name)
        return regions

    def decisions(self) -> dict[str, list[str]]:
        """Per site and step: compute, reuse, reuse_residual, adaptive, or skipped (an enclosing
        site reuses). Only sites with some step that is not compute."""
        return site_decisions(self.sites, self.table)

    def counts(self) -> dict[str, int]:
        branch_nodes = sum(1 for n in self.nodes if "." in n.id)
        return {
            "before": len(self.before.graph.nodes),
            "after": len(self.after.graph.nodes),
            "in_branches": branch_nodes,
            "inserted": len(self.inserted()),
            "skipped": sum(1 for n in self.nodes if n.status == "skipped"),
            "skip_branches": len(self.skipped_regions()),
            "sites": len(self.sites),
        }

    def summary(self) -> str:
        c = self.counts()
        return (f"{self.model}, plan {self.plan_name} ({self.table.steps} steps): {c['before']} nodes before, "
                f"{c['after']} after (+{c['in_branches']} inside skip branches); {c['inserted']} inserted, "
                f"{c['skipped']} moved into {c['skip_branches']} skip branches")

    def to_html(self) -> str:
        from .html import render_html

        return render_html(self)

    def to_text(self) -> str:
        from .text import render_text

        return render_text(self)

    def to_dot(self) -> str:
        from .dot import render_dot

        return render_dot(self)


# -- building the diff -----------------------------------------------------------------------

def graph_diff(model: torch.nn.Module, plan, *args, **example_inputs) -> GraphDiff:
    """Capture ``model`` on these inputs, rewrite it with ``plan``, and line the graphs up.

    ``plan`` is a Plan, a YAML path or YAML text (as for ``ditopt.optimize``).

    Example:
        >>> import ditopt
        >>> from ditopt.small_models import build
        >>> model, inputs = build("dit")
        >>> diff = graph_diff(model, ditopt.presets.fora(interval=2, steps=4), **inputs)
        >>> sorted(diff.skipped_regions())[:2]
        ['transformer_blocks.0.attn1', 'transformer_blocks.0.ff']
        >>> sorted({n.role for n in diff.inserted() if n.role})
        ['begin_step', 'branch_fn', 'branch_output', 'decide', 'load', 'reuse', 'skip_branch', 'store', 'token']
        >>> diff.to_html().startswith("<!DOCTYPE html>")
        True
    """
    captured = capture(model, *args, **example_inputs)
    before, after, sites, table = rewrite(captured, plan, model_name=type(model).__name__)
    return diff_graphs(before, after, sites, table, model=type(model).__name__, plan_name=_plan_name(plan))


def rewrite(captured: Captured, plan, model_name: str | None = None, timestep_arg: str = "timestep"
            ) -> tuple[fx.GraphModule, fx.GraphModule, SiteTable, DecisionTable]:
    """Run the pass pipeline on a captured graph as ``ditopt.optimize`` does.

    Returns the graph before, the graph after, the sites and the decision table; raises
    ``PlanError`` when the plan does not fit the model (``model_name``: its class, which a plan
    made for another class names). ``timestep_arg``: the forward argument that is the timestep.
    """
    backend = DitoptBackend(plan, Runtime(), inductor=False, model_name=model_name, timestep_arg=timestep_arg)
    backend(captured.gm, captured.example_inputs)
    graph = backend.last
    return graph.original, graph.rewritten, graph.sites, graph.table


def diff_graphs(before: fx.GraphModule, after: fx.GraphModule, sites: SiteTable, table: DecisionTable, *,
                model: str = "", plan_name: str = "") -> GraphDiff:
    """Line up a graph and its rewrite by the passes (see the module docstring)."""
    nodes = Walker(sites).walk(after)
    return GraphDiff(model=model or "model", plan_name=plan_name or "plan", before=before, after=after,
                     sites=sites, table=table, nodes=nodes, root=_group_tree(nodes))


def _plan_name(plan) -> str:
    if isinstance(plan, Plan):
        return plan.name or "plan"
    return os.path.basename(str(plan)) if isinstance(plan, (str, os.PathLike)) and "\n" not in str(plan) else "plan"


def is_branch(node: fx.Node) -> bool:
    """A skip branch: ``torch.cond`` under inductor, ``run_branch`` on the eager path."""
    return node.op == "call_function" and role_of(node) is Role.SKIP_BRANCH


def target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f".{t}"
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    try:
        return torch.fx.node._get_qualified_name(t)
    except Exception:  # some callables (higher-order ops) have no importable name
        return getattr(t, "__name__", str(t))


def _shape(node: fx.Node) -> str:
    meta = tensor_meta(node)
    if meta is not None:
        shape, dtype = meta
        return f"{str(dtype).replace('torch.', '')}[{', '.join(str(s) for s in shape)}]"
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, (tuple, list)):
        return f"tuple of {len(value)}"
    return ""


class Walker:
    """Walks the rewritten graph in order, descending into each skip branch where it stands."""

    def __init__(self, sites: SiteTable):
        self.sites = sites
        self.site_of: dict[str, str] = {}  # node name -> innermost site holding it
        for site in sorted(sites, key=lambda s: -len(s.nodes)):
            for name in site.nodes:
                self.site_of[name] = site.name
        self.out: list[DiffNode] = []

    def chain(self, site: str | None) -> list[str]:
        if site is None or site not in self.sites:
            return []
        return [*reversed(self.sites.ancestors(site)), site]

    def keys(self, site: str | None, skip_stack: tuple[str, ...]) -> list[str]:
        keys = []
        chain = self.chain(site)
        for s in chain:
            keys.append(f"site:{s}")
            if s in skip_stack:
                keys += [f"branch:{s}", f"compute:{s}"]
        for s in skip_stack:  # a branch node outside its site's chain (never expected)
            if s not in chain:
                keys += [f"branch:{s}", f"compute:{s}"]
        return keys

    def walk(self, gm: fx.GraphModule, prefix: str = "", outer: dict[fx.Node, str] | None = None,
             skip_stack: tuple[str, ...] = (), reuse_of: str | None = None) -> list[DiffNode]:
        ids: dict[fx.Node, str] = dict(outer or {})
        for node in gm.graph.nodes:
            if prefix and node.op in ("placeholder", "output"):
                continue  # a branch's inputs are the branch node's operands; its outputs, the branch node
            node_id = prefix + node.name
            ids[node] = node_id
            ann = node_annotation(node)
            role = ann.role.value if ann.role is not None else None
            site = self.site_of_node(node, reuse_of)
            if node.op == "placeholder":
                keys = [INPUTS]
            elif not prefix and site is None and node.op != "output":
                keys = [OUTSIDE]
            elif reuse_of is not None:
                keys = self.keys(site, skip_stack) + [f"branch:{reuse_of}", f"reuse:{reuse_of}"]
            elif ann.role in (Role.SKIP_BRANCH, Role.BRANCH_FN):
                keys = self.keys(site, skip_stack) + [f"branch:{site}"]
            else:
                keys = self.keys(site, skip_stack)
            self.out.append(DiffNode(
                id=node_id, name=node.name, op=node.op, target=target_name(node), shape=_shape(node),
                module=_module_path(node), inserted=role is not None or reuse_of is not None,
                skipped_by=skip_stack, role=role or ("reuse" if reuse_of else None), site=site,
                groups=tuple(keys), inputs=tuple(ids[a] for a in node.all_input_nodes if a in ids),
                param=node.op == "placeholder" and is_param(node),
            ))
            if is_branch(node):
                self._descend(gm, node, ids, prefix, skip_stack, site)
        return self.out

    def _descend(self, gm, node, ids, prefix, skip_stack, site) -> None:
        _, compute_fn, reuse_fn, operands = node.args[:4]
        for fn, stack, reuse_of in ((compute_fn, (*skip_stack, site), None), (reuse_fn, skip_stack, site)):
            sub = gm.get_submodule(fn.target)
            placeholders = [p for p in sub.graph.nodes if p.op == "placeholder"]
            outer = {p: ids[o] for p, o in zip(placeholders, operands)}
            self.walk(sub, f"{prefix}{fn.target}.", outer, stack, reuse_of)

    def site_of_node(self, node: fx.Node, reuse_of: str | None) -> str | None:
        """The innermost site a node belongs to: the one a pass annotated it with, the site of
        the reuse side it is on, the site of the output an indicator watches, or its own."""
        ann = node_annotation(node)
        if ann.site:
            return ann.site
        if reuse_of is not None:
            return reuse_of
        if ann.role is Role.INDICATOR:  # sits after the output it watches
            watched = node.args[1]
            return self.site_of.get(watched.name, node_annotation(watched).site)
        return self.site_of.get(node.name)


def _module_path(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def _group_tree(nodes: list[DiffNode]) -> Group:
    """Nest the nodes into groups by their keys, in order; a key met again after it closed
    opens a continued group."""
    root = Group("")
    open_groups = [root]
    parts: dict[str, int] = {}
    for n in nodes:
        depth = 0
        while depth < len(n.groups) and depth + 1 < len(open_groups) and open_groups[depth + 1].key == n.groups[depth]:
            depth += 1
        del open_groups[depth + 1:]
        for key in n.groups[depth:]:
            parts[key] = parts.get(key, 0) + 1
            group = Group(key, parts[key])
            open_groups[-1].children.append(group)
            open_groups.append(group)
        open_groups[-1].children.append(n)
    return root


def site_decisions(sites: SiteTable, table: DecisionTable) -> dict[str, list[str]]:
    """Per site and step, the decision the page shows (see :meth:`GraphDiff.decisions`)."""
    out = {}
    for site in sites:
        row = []
        for step in range(table.steps):
            own = table.action(site.name, step)
            reusing = [a for a in sites.ancestors(site.name) if table.action(a, step) != Action.COMPUTE]
            if any(table.adaptive[a][step] is None for a in reusing):
                row.append("skipped")
            elif own != Action.COMPUTE:
                row.append("adaptive" if table.adaptive[site.name][step] is not None else str(own))
            elif reusing:
                row.append("adaptive")  # skipped whenever the enclosing site's adaptive rule reuses
            else:
                row.append(Action.COMPUTE.value)
        if any(d != Action.COMPUTE.value for d in row):
            out[site.name] = row
    return out


def group_title(diff: GraphDiff, group: Group) -> str:
    """What a group is, as the page's summaries and the DOT clusters' labels say it."""
    nodes = group.nodes()
    site = group.site
    more = " (continued)" if group.part > 1 else ""
    if group.kind == INPUTS:
        params = sum(1 for n in nodes if n.param)
        return f"inputs: {len(nodes)} placeholders ({params} parameters and buffers){more}"
    if group.kind == OUTSIDE:
        return f"outside any site{more}"
    if group.kind == "site":
        s = diff.sites[site]
        kind = s.kind + (f", {s.attention}" if s.attention else "")
        return f"{site} ({kind}){more}"
    if group.kind == "branch":
        return f"skip branch of {site}{more}"
    if group.kind == "compute":
        return f"compute side: not run at steps where {site} reuses{more}"
    return f"reuse side: runs instead{more}"
