"""See what the compiler did: a model's graph before and after the passes, as HTML, text or DOT.

:func:`graph_diff` captures a model, runs the pass pipeline as ``ditopt.optimize`` does (the
eager path: skip branches lowered to ``run_branch``), and lines the two graphs up node by node:

- **kept** nodes are in both graphs and run at every step;
- **inserted** nodes are the passes' own: every node carrying ``meta["ditopt"]["role"]``
  (step tracking, decisions, cache loads and stores, indicators, skip branches, residuals),
  and every node of a skip branch's reuse side;
- **skipped** nodes are original nodes a skip branch moved into its compute side: they run
  only at the steps where their site computes.

Nothing is re-derived from the plan: the skip regions are read from the rewritten graph (each
branch node's compute and reuse submodules). The plan only feeds the step tables.

Nodes are grouped by site (nested: stack > block > attention), in graph order; a skip branch
is a group inside its site with a *compute* and a *reuse* side. A site that is not contiguous
in graph order shows as several groups (the later ones marked "continued").
:meth:`GraphDiff.to_html` renders one self-contained page (inline SVG and script, no network,
sites collapsed so a 900-node graph stays usable), :meth:`GraphDiff.to_text` a unified diff of
the generated code with site headers, :meth:`GraphDiff.to_dot` a Graphviz graph with one
cluster per group.
"""

from __future__ import annotations

import difflib
import html
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .capture import Captured, capture, module_stack
from .plan import COMPUTE, CompiledPlan, Plan
from .sites import SiteTable, is_param, tensor_meta

ROLE = "role"
INPUTS = "inputs"
OUTSIDE = "outside"  # top-level nodes in no site (embeddings, output projection)
_BRANCH_ROLE = "skip_branch"
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
    only when all of them compute. ``role`` is the pass annotation of an inserted node (``decide``,
    ``load``, ``store``, ``skip_branch``, ...) or ``reuse`` on a reuse side. ``groups`` are the
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
    plan: CompiledPlan
    nodes: list[DiffNode]
    root: Group

    def inserted(self) -> list[DiffNode]:
        return [n for n in self.nodes if n.inserted]

    def skipped_regions(self) -> dict[str, list[str]]:
        """For each site with a skip branch, the original nodes its compute side holds (a node
        of a nested branch counts for the innermost one)."""
        regions: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.role == _BRANCH_ROLE:
                regions.setdefault(n.site, [])
        for n in self.nodes:
            if not n.inserted and n.skipped_by:
                regions[n.skipped_by[-1]].append(n.name)
        return regions

    def decisions(self) -> dict[str, list[str]]:
        """Per site and step: compute, reuse, reuse_residual, adaptive, or skipped (an enclosing
        site reuses). Only sites with some step that is not compute."""
        return site_decisions(self.sites, self.plan)

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
        return (f"{self.model}, plan {self.plan_name} ({self.plan.steps} steps): {c['before']} nodes before, "
                f"{c['after']} after (+{c['in_branches']} inside skip branches); {c['inserted']} inserted, "
                f"{c['skipped']} moved into {c['skip_branches']} skip branches")

    def to_html(self) -> str:
        return render_html(self)

    def to_text(self) -> str:
        return render_text(self)

    def to_dot(self) -> str:
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
    before, after, sites, compiled = rewrite(captured, plan)
    return diff_graphs(before, after, sites, compiled, model=type(model).__name__, plan_name=_plan_name(plan))


def rewrite(captured: Captured, plan) -> tuple[fx.GraphModule, fx.GraphModule, SiteTable, CompiledPlan]:
    """Run the pass pipeline on a captured graph as ``ditopt.optimize`` does.

    Returns the graph before, the graph after, the sites and the compiled plan; raises
    ``PlanError`` when the plan does not fit the model.
    """
    from .backend import DitoptBackend
    from .runtime import Runtime

    backend = DitoptBackend(plan, Runtime(), inductor=False)
    backend(captured.gm, captured.example_inputs)
    last = backend.last
    return last["original"], last["rewritten"], last["sites"], last["plan"]


def diff_graphs(before: fx.GraphModule, after: fx.GraphModule, sites: SiteTable, plan: CompiledPlan, *,
                model: str = "", plan_name: str = "") -> GraphDiff:
    """Line up a graph and its rewrite by the passes (see the module docstring)."""
    nodes = _Walker(sites).walk(after)
    return GraphDiff(model=model or "model", plan_name=plan_name or "plan", before=before, after=after,
                     sites=sites, plan=plan, nodes=nodes, root=_group_tree(nodes))


def _plan_name(plan) -> str:
    if isinstance(plan, Plan):
        return plan.name or "plan"
    return os.path.basename(str(plan)) if isinstance(plan, (str, os.PathLike)) and "\n" not in str(plan) else "plan"


def is_branch(node: fx.Node) -> bool:
    """A skip branch: ``torch.cond`` under inductor, ``run_branch`` on the eager path."""
    return node.op == "call_function" and node.meta.get("ditopt", {}).get(ROLE) == _BRANCH_ROLE


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


class _Walker:
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
            ann = node.meta.get("ditopt", {})
            role = ann.get(ROLE)
            site = self.site_of_node(node, ann, reuse_of)
            if node.op == "placeholder":
                keys = [INPUTS]
            elif not prefix and site is None and node.op != "output":
                keys = [OUTSIDE]
            elif reuse_of is not None:
                keys = self.keys(site, skip_stack) + [f"branch:{reuse_of}", f"reuse:{reuse_of}"]
            elif role in (_BRANCH_ROLE, "branch_fn"):
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

    def site_of_node(self, node: fx.Node, ann: dict, reuse_of: str | None) -> str | None:
        """The innermost site a node belongs to: the one a pass annotated it with, the site of
        the reuse side it is on, the site of the output an indicator watches, or its own."""
        if ann.get("site"):
            return ann["site"]
        if reuse_of is not None:
            return reuse_of
        if ann.get(ROLE) == "indicator":  # sits after the output it watches
            watched = node.args[1]
            return self.site_of.get(watched.name, watched.meta.get("ditopt", {}).get("site"))
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


def site_decisions(sites: SiteTable, plan: CompiledPlan) -> dict[str, list[str]]:
    """Per site and step, the decision the page shows (see :meth:`GraphDiff.decisions`)."""
    out = {}
    for site in sites:
        row = []
        for step in range(plan.steps):
            own = plan.actions.get(site.name, [COMPUTE] * plan.steps)[step]
            reusing = [a for a in sites.ancestors(site.name) if a in plan.actions and plan.actions[a][step] != COMPUTE]
            if any(plan.adaptive[a][step] is None for a in reusing):
                row.append("skipped")
            elif own != COMPUTE:
                row.append("adaptive" if plan.adaptive[site.name][step] is not None else own)
            elif reusing:
                row.append("adaptive")  # skipped whenever the enclosing site's adaptive rule reuses
            else:
                row.append(COMPUTE)
        if any(d != COMPUTE for d in row):
            out[site.name] = row
    return out


# -- text --------------------------------------------------------------------------------------

_ASSIGN = re.compile(r"^\s+([A-Za-z_][A-Za-z0-9_]*)\s*=")
_LIFETIME = re.compile(r";\s+[A-Za-z0-9_ =]+ = None$")  # fx frees dead values; branches free them elsewhere


def _code_lines(gm: fx.GraphModule, walker: _Walker, describe, state: dict, reuse_of: str | None = None,
                body_only: bool = False) -> list[str]:
    """The body of ``gm.code`` with site headers, each skip branch's code inlined before its
    branch node, lifetime suffixes (``;  x = None``) dropped and the signature one argument a line."""
    by_name = {n.name: n for n in gm.graph.nodes}
    lines = []
    for line in gm.code.strip("\n").splitlines():
        line = _LIFETIME.sub("", line.rstrip())
        if not line.strip():
            continue
        if line.startswith("def forward("):
            if body_only:
                continue
            args = line[len("def forward("):-2].split(", ")
            lines += ["def forward(", *(f"    {a}," for a in args), "):"]
            continue
        m = _ASSIGN.match(line)
        node = by_name.get(m.group(1)) if m else None
        if node is not None and node.op != "placeholder":
            ann = node.meta.get("ditopt", {})
            site = walker.site_of_node(node, ann, reuse_of)
            if site != state.get("site"):
                lines.append(f"    # ---- {describe(site)} ----")
                state["site"] = site
            if is_branch(node):
                _, compute_fn, reuse_fn, _ = node.args[:4]
                for side, fn, inner_reuse in (("compute", compute_fn, None), ("reuse", reuse_fn, site)):
                    lines.append(f"    # ---- skip branch of {site}: {side} side"
                                 f"{' (not run at steps where it reuses)' if side == 'compute' else ''} ----")
                    state["site"] = site
                    body = _code_lines(gm.get_submodule(fn.target), walker, describe, state, inner_reuse, True)
                    lines += [b for b in body if not b.startswith("    return ")]
                lines.append(f"    # ---- end of skip branch of {site} ----")
                state["site"] = site
        lines.append(line)
    return lines


def render_text(diff: GraphDiff) -> str:
    """The plan's decisions, the skip regions, the inserted nodes, and a unified diff of the
    generated code.

    Each run of lines from one site is headed ``# ---- site <name> (<kind>) ----``; each skip
    branch's code (compute side, then reuse side) is inlined just before its branch node, so the
    original lines it moved read as unchanged context.
    """
    walker = _Walker(diff.sites)

    def describe(site):
        if site is None:
            return "outside any site"
        s = diff.sites[site]
        return f"site {site} ({s.kind}{', ' + s.attention if s.attention else ''})"

    out = [f"ditopt diff: {diff.summary()}", ""]
    decisions = diff.decisions()
    out.append("plan decisions per step (" + ", ".join(f"{v[0]} {k}" for k, v in DECISION_STYLE.items()) + "):")
    width = max([len(s) for s in decisions] + [4])
    out.append(f"  {'step':{width}s} " + "".join(f"{t % 10}" for t in range(diff.plan.steps)))
    for site, row in decisions.items():
        out.append(f"  {site:{width}s} " + "".join(decision_style(d)[0] for d in row))
    if not decisions:
        out.append("  (every site computes at every step)")
    out.append("")
    out.append("skip branches (nodes that run only at the steps where the site computes):")
    for site, names in diff.skipped_regions().items():
        out.append(f"  {site}: {len(names)} nodes: {' '.join(names)}")
    out.append("")
    out.append("inserted nodes:")
    for n in diff.inserted():
        where = f" [{n.site}]" if n.site else ""
        out.append(f"  {n.id} = {n.target} ({n.role}){where}")
    out.append("")
    before = _code_lines(diff.before, walker, describe, {})
    after = _code_lines(diff.after, walker, describe, {})
    out.extend(difflib.unified_diff(before, after, "before passes", "after passes", lineterm="", n=2))
    return "\n".join(out) + "\n"


# -- DOT ---------------------------------------------------------------------------------------

_DOT_FILL = {"kept": "#eeeeee", "inserted": "#ffd699", "skipped": "#cfe0ff"}


def render_dot(diff: GraphDiff) -> str:
    """A Graphviz digraph: one cluster per group, nodes filled by status, data edges.

    Parameters are left out (hundreds of them would hide the structure).
    """
    params = {n.id for n in diff.nodes if n.param}
    ids = {n.id: f"n{i}" for i, n in enumerate(diff.nodes)}
    lines = ["digraph ditopt_diff {", '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", '
             'fontsize=10]; edge [color="#888888"];',
             f'  label={_dot_str(diff.summary())}; labelloc=t;']

    def emit(group: Group, indent: str) -> None:
        for child in group.children:
            if isinstance(child, Group):
                lines.append(f"{indent}subgraph cluster_{len(lines)} {{")
                lines.append(f"{indent}  label={_dot_str(_group_title(diff, child))}; style=\"rounded\"; "
                             f"color=\"{_GROUP_COLOUR[child.kind]}\";")
                emit(child, indent + "  ")
                lines.append(f"{indent}}}")
            elif child.id not in params:
                colour = "#1f5fbf" if child.skipped_by else "#666666"
                label = f"{child.name}\\n{child.target}" + (f"\\n{child.shape}" if child.shape else "")
                lines.append(f'{indent}{ids[child.id]} [label={_dot_str(label, raw=True)}, '
                             f'fillcolor="{_DOT_FILL[child.status]}", color="{colour}"];')

    emit(diff.root, "  ")
    for n in diff.nodes:
        for src in n.inputs:
            if src not in params and n.id not in params:
                lines.append(f"  {ids[src]} -> {ids[n.id]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_str(text: str, raw: bool = False) -> str:
    text = text.replace("\\", "\\\\") if not raw else text
    return '"' + text.replace('"', '\\"') + '"'


# -- HTML --------------------------------------------------------------------------------------

_GROUP_COLOUR = {"site": "#5b6b7f", "outside": "#bbbbbb", "branch": "#1f5fbf", "compute": "#1f5fbf",
                 "reuse": "#e07b00", "inputs": "#999999"}


def _group_title(diff: GraphDiff, group: Group) -> str:
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


def _counts(nodes: list[DiffNode]) -> str:
    ins = sum(1 for n in nodes if n.inserted)
    skip = sum(1 for n in nodes if n.status == "skipped")
    parts = [f"{len(nodes)} nodes"]
    if ins:
        parts.append(f'<span class="c-ins">+{ins} inserted</span>')
    if skip:
        parts.append(f'<span class="c-skip">{skip} skippable</span>')
    return " · ".join(parts)


def _step_strip(row: list[str]) -> str:
    """A small inline SVG: one square per step, coloured by decision."""
    cells = "".join(f'<rect x="{i * 7}" width="6" height="10" fill="{decision_style(d)[1]}"><title>step {i}: {d}'
                    f"</title></rect>" for i, d in enumerate(row))
    return f'<svg class="strip" width="{7 * len(row)}" height="10" role="img">{cells}</svg>'


def _step_table(rows: dict[str, list[str]], steps: int, cls: str) -> str:
    head = "".join(f"<th>{t}</th>" for t in range(steps))
    body = []
    for site, row in rows.items():
        cells = "".join(f'<td class="d-{d}" title="step {t}: {d}">{decision_style(d)[0]}</td>' for t, d in enumerate(row))
        body.append(f'<tr><th class="sn">{html.escape(site)}</th>{cells}</tr>')
    return f'<table class="{cls}"><tr><th class="sn">step</th>{head}</tr>{"".join(body)}</table>'


_GLYPHS = """<svg width="0" height="0" style="position:absolute"><defs>
<symbol id="s-kept" viewBox="0 0 12 12"><rect x="1" y="1" width="10" height="10" rx="3" fill="#eee" stroke="#888"/></symbol>
<symbol id="s-inserted" viewBox="0 0 12 12"><rect x="1" y="1" width="10" height="10" rx="3" fill="#ffb84d" stroke="#c46a00"/>
<path d="M6 3v6M3 6h6" stroke="#7a3f00" stroke-width="1.5"/></symbol>
<symbol id="s-skipped" viewBox="0 0 12 12"><rect x="1" y="1" width="10" height="10" rx="3" fill="#cfe0ff" stroke="#1f5fbf"
stroke-dasharray="2 1"/><path d="M3 9L9 3" stroke="#1f5fbf"/></symbol>
<symbol id="s-branch" viewBox="0 0 12 12"><path d="M6 1v4M6 5L2 11M6 5l4 6" stroke="#1f5fbf" stroke-width="1.5" fill="none"/>
</symbol></defs></svg>"""

_CSS = """
*{box-sizing:border-box}body{font:13px/1.35 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222}
header{padding:10px 16px;border-bottom:1px solid #ddd;background:#fafafa}h1{font-size:18px;margin:0 0 4px}
.sum{color:#444}.legend span{margin-right:14px;white-space:nowrap}.legend svg{width:12px;height:12px;vertical-align:-2px}
#main{margin-right:380px;padding:8px 16px 80px}#panel{position:fixed;right:0;top:0;bottom:0;width:370px;overflow:auto;
border-left:1px solid #ddd;background:#fcfcfc;padding:12px;font-size:12px}#panel h2{font-size:14px;margin:0 0 8px}
#panel dt{color:#777;margin-top:6px}#panel dd{margin:0 0 0 8px;word-break:break-all;font-family:ui-monospace,monospace}
#panel a{color:#1f5fbf;cursor:pointer;text-decoration:none;margin-right:6px}
.tools{margin:8px 0}.tools label{margin-right:12px}.tools input[type=search]{width:220px}
#overview{display:block;margin:6px 0 10px;border:1px solid #e3e3e3;background:#fff}#overview .band{cursor:pointer}
#overview .band:hover{opacity:.7}
details.grp{margin:2px 0 2px 0;border-left:3px solid #5b6b7f;padding-left:8px}details.grp>summary{cursor:pointer;padding:2px 0}
details.site>summary b{font-family:ui-monospace,monospace}details.branch{border-left-color:#1f5fbf;background:#f4f8ff}
details.compute{border-left:3px dashed #1f5fbf;background:#eaf1ff}details.reuse{border-left-color:#e07b00;background:#fff4e5}
details.inputs,details.outside{border-left-color:#bbb;color:#555}.cnt{color:#666;font-size:12px;margin-left:6px}.c-ins{color:#b35900}
.c-skip{color:#1f5fbf}.strip{vertical-align:middle;margin-left:8px}
.n{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;padding:1px 4px;cursor:pointer;white-space:nowrap;
overflow:hidden;text-overflow:ellipsis;border-radius:3px}.n:hover{background:#f0f0f0}.n.sel{outline:2px solid #222}
.n svg{width:12px;height:12px;vertical-align:-2px;margin-right:4px}.n i{color:#666;font-style:normal;margin-left:8px}
.n .sh{color:#888;margin-left:8px}.n .role{margin-left:8px;padding:0 4px;border-radius:3px;background:#ffd699;color:#6b3500}
.n.inserted{background:#fff0d9}.n.skipped{color:#1f4f9f;text-decoration:line-through;text-decoration-color:#9bb7e6}
.n.skipped b{text-decoration:line-through}
body.hide-kept .n.kept,body.hide-inserted .n.inserted,body.hide-skipped .n.skipped{display:none}.n.nomatch{display:none}
table.steps{border-collapse:collapse;margin:4px 0 8px;font-size:11px}table.steps td,table.steps th{border:1px solid #e3e3e3;
padding:0 3px;text-align:center;min-width:16px}table.steps th.sn{text-align:left;font-family:ui-monospace,monospace;
font-weight:normal;white-space:nowrap}
""" + "".join(f"td.d-{k}{{background:{v[1]};color:{'#fff' if k in ('reuse', 'reuse_residual') else '#222'}}}"
              for k, v in DECISION_STYLE.items())

_SCRIPT = r"""
(function () {
  var data = JSON.parse(document.getElementById('ditopt-nodes').textContent);
  var panel = document.getElementById('panel'), graph = document.getElementById('graph');
  var users = data.map(function () { return []; });
  data.forEach(function (d, i) { d.inputs.forEach(function (j) { users[j].push(i); }); });
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function links(list) {
    if (!list.length) return '<i>none</i>';
    return list.map(function (j) { return '<a data-n="' + j + '">' + esc(data[j].name) + '</a>'; }).join(' ');
  }
  function reveal(el) {
    for (var p = el.parentElement; p; p = p.parentElement) if (p.tagName === 'DETAILS') p.open = true;
  }
  var selected = null;
  function show(i) {
    var d = data[i], el = document.getElementById('N' + i);
    if (selected) selected.classList.remove('sel');
    selected = el; if (el) el.classList.add('sel');
    document.body.dataset.selected = d.id;
    var status = d.status + (d.skipped_by.length ? ' (runs only when ' + d.skipped_by.join(', ') + ' computes)' : '');
    panel.innerHTML = '<h2>' + esc(d.name) + '</h2><dl>' +
      '<dt>status</dt><dd>' + esc(status) + '</dd>' +
      (d.role ? '<dt>inserted as</dt><dd>' + esc(d.role) + '</dd>' : '') +
      '<dt>op</dt><dd>' + esc(d.op) + '</dd><dt>target</dt><dd>' + esc(d.target) + '</dd>' +
      '<dt>shape</dt><dd>' + esc(d.shape || '-') + '</dd><dt>module path</dt><dd>' + esc(d.module || '-') + '</dd>' +
      '<dt>site</dt><dd>' + esc(d.site || '-') + '</dd><dt>id</dt><dd>' + esc(d.id) + '</dd>' +
      '<dt>inputs</dt><dd>' + links(d.inputs) + '</dd><dt>users</dt><dd>' + links(users[i]) + '</dd></dl>';
  }
  function jump(i) {
    var el = document.getElementById('N' + i);
    if (el) { reveal(el); el.scrollIntoView({block: 'center'}); }
    show(i);
  }
  graph.addEventListener('click', function (e) {
    var row = e.target.closest('.n');
    if (row) show(+row.id.slice(1));
  });
  panel.addEventListener('click', function (e) {
    var a = e.target.closest('[data-n]');
    if (a) { e.preventDefault(); jump(+a.dataset.n); }
  });
  document.getElementById('overview').addEventListener('click', function (e) {
    var band = e.target.closest('[data-group]');
    if (!band) return;
    var g = document.getElementById(band.dataset.group);
    reveal(g); g.open = true; g.scrollIntoView({block: 'start'});
  });
  document.getElementById('expand').onclick = function () {
    graph.querySelectorAll('details').forEach(function (d) { d.open = true; });
  };
  document.getElementById('collapse').onclick = function () {
    graph.querySelectorAll('details.site, details.inputs, details.outside').forEach(function (d) { d.open = false; });
  };
  document.querySelectorAll('.tools input[type=checkbox]').forEach(function (box) {
    box.onchange = function () { document.body.classList.toggle('hide-' + box.value, !box.checked); };
  });
  var search = document.getElementById('search');
  search.oninput = function () {
    var q = search.value.trim().toLowerCase(), hits = 0;
    graph.querySelectorAll('.n').forEach(function (row) {
      var d = data[+row.id.slice(1)];
      var hit = !q || (d.name + ' ' + d.target + ' ' + d.module).toLowerCase().indexOf(q) >= 0;
      row.classList.toggle('nomatch', !hit);
      if (hit && q && hits++ < 200) reveal(row);
    });
  };
  if (location.hash.indexOf('#node=') === 0) {  // a link to one node: #node=<id>
    var wanted = decodeURIComponent(location.hash.slice(6));
    var k = data.findIndex(function (d) { return d.id === wanted; });
    if (k >= 0) jump(k);
  }
  var sites = {};
  graph.querySelectorAll('details.site').forEach(function (d) { sites[d.dataset.site] = true; });
  document.body.dataset.nodes = String(graph.querySelectorAll('.n').length);
  document.body.dataset.rendered = String(Object.keys(sites).length);
})();
"""


def _node_row(diff_index: int, n: DiffNode) -> str:
    classes = f"n {n.status}" + (" inbranch" if n.skipped_by else "")
    tip = " · ".join(x for x in (n.op, n.target, n.shape, n.module) if x)
    role = f'<span class="role">{html.escape(n.role)}</span>' if n.inserted and n.role else ""
    shape = f'<span class="sh">{html.escape(n.shape)}</span>' if n.shape else ""
    return (f'<div class="{classes}" id="N{diff_index}" data-id="{html.escape(n.id)}" data-status="{n.status}" '
            f'title="{html.escape(tip)}"><svg><use href="#s-{n.status}"/></svg><b>{html.escape(n.name)}</b>'
            f'<i>{html.escape(n.target)}</i>{shape}{role}</div>')


def _overview(diff: GraphDiff, group_ids: dict[int, str], width: int = 1100) -> str:
    """An SVG map of the whole graph: one tick per node, coloured by status, over bands for the
    outer two levels of site groups (click a band to open it)."""
    shown = [n for n in diff.nodes if INPUTS not in n.groups]
    if not shown:
        return '<svg id="overview" width="10" height="10"></svg>'
    scale = width / len(shown)
    pos = {n.id: i for i, n in enumerate(shown)}
    parts = []
    colours = {"kept": "#c8c8c8", "inserted": "#f08c00", "skipped": "#3b78d8"}
    run_start, run_status = 0, shown[0].status
    for i, n in enumerate([*shown, None]):
        status = n.status if n is not None else None
        if status != run_status:
            parts.append(f'<rect x="{run_start * scale:.2f}" y="0" width="{max((i - run_start) * scale, 0.8):.2f}" '
                         f'height="18" fill="{colours[run_status]}"/>')
            run_start, run_status = i, status

    def bands(group: Group, level: int) -> None:
        for child in group.children:
            if not isinstance(child, Group) or child.kind in (INPUTS, OUTSIDE):
                continue
            if child.kind == "site":
                nodes = [n for n in child.nodes() if n.id in pos]
                if nodes:
                    x0, x1 = pos[nodes[0].id] * scale, (pos[nodes[-1].id] + 1) * scale
                    y = 22 + 14 * level
                    parts.append(f'<g class="band" data-group="{group_ids[id(child)]}"><rect x="{x0:.2f}" y="{y}" '
                                 f'width="{max(x1 - x0 - 1, 1):.2f}" height="12" rx="2" fill="#5b6b7f" '
                                 f'fill-opacity="{0.35 + 0.25 * level}"/><title>{html.escape(child.site)}</title></g>')
                if level < 1:
                    bands(child, level + 1)
    bands(diff.root, 0)
    return (f'<svg id="overview" width="100%" height="52" viewBox="0 0 {width} 52" preserveAspectRatio="none" '
            f'role="img" aria-label="graph overview">'
            f'{"".join(parts)}</svg>')


def render_html(diff: GraphDiff) -> str:
    """One self-contained page: summary, plan table, overview map, and the grouped node list.

    Site groups are collapsed; a skip branch's boxes open with their site. Clicking a node
    shows its op, target, shape, module path, inputs and users; hovering shows a summary;
    ``page.html#node=<id>`` opens on one node. The script marks the body when it has run:
    ``data-rendered`` (the number of sites drawn), ``data-nodes``; a script error sets
    ``data-errors`` on the root element.
    """
    index = {n.id: i for i, n in enumerate(diff.nodes)}
    group_ids = _group_dom_ids(diff.root)
    decisions = diff.decisions()
    out: list[str] = []

    def emit(group: Group) -> None:
        for child in group.children:
            if not isinstance(child, Group):
                out.append(_node_row(index[child.id], child))
                continue
            gid = group_ids[id(child)]
            nodes = child.nodes()
            opened = " open" if child.kind in ("branch", "compute", "reuse") else ""
            site_attr = f' data-site="{html.escape(child.site)}"' if child.site else ""
            title = html.escape(_group_title(diff, child))
            if child.kind == "site":
                title = f"<b>{html.escape(child.site)}</b> {html.escape(_group_title(diff, child)[len(child.site):])}"
            icon = '<svg width="12" height="12"><use href="#s-branch"/></svg> ' if child.kind == "branch" else ""
            strip = _step_strip(decisions[child.site]) if child.kind == "site" and child.site in decisions else ""
            out.append(f'<details class="grp {child.kind}" id="{gid}" data-group="{html.escape(child.key)}"'
                       f'{site_attr}{opened}><summary>{icon}{title}<span class="cnt">{_counts(nodes)}</span>'
                       f"{strip}</summary>")
            if child.kind == "site" and child.site in decisions and child.part == 1:
                out.append(_step_table({child.site: decisions[child.site]}, diff.plan.steps, "steps"))
            emit(child)
            out.append("</details>")

    emit(diff.root)
    body = "".join(out)
    c = diff.counts()
    data = [{"id": n.id, "name": n.name, "op": n.op, "target": n.target, "shape": n.shape, "module": n.module,
             "status": n.status, "role": n.role, "site": n.site, "skipped_by": list(n.skipped_by),
             "inputs": [index[i] for i in n.inputs]} for n in diff.nodes]
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    legend = ('<div class="legend">'
              '<span><svg><use href="#s-kept"/></svg> unchanged</span>'
              '<span><svg><use href="#s-inserted"/></svg> inserted by the passes</span>'
              '<span><svg><use href="#s-skipped"/></svg> moved into a skip branch: not run when its site reuses</span>'
              + "".join(f'<span><svg width="12" height="10"><rect width="10" height="10" fill="{colour}"/></svg> '
                        f"{label} {name}</span>" for name, (label, colour) in DECISION_STYLE.items())
              + "</div>")
    plan_table = (_step_table(decisions, diff.plan.steps, "steps") if decisions
                  else "<p>Every site computes at every step.</p>")
    title = f"ditopt diff: {diff.model} with {diff.plan_name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script>window.__ditoptErrors=0;window.addEventListener('error',function(){{
document.documentElement.dataset.errors=String(++window.__ditoptErrors);}});</script>
<style>{_CSS}</style></head>
<body>{_GLYPHS}
<aside id="panel"><h2>Node details</h2><p>Click a node to see its op, target, shape, module path, inputs and users.
Hover for a summary.</p></aside>
<div id="main">
<header><h1>{html.escape(title)}</h1>
<div class="sum">{html.escape(diff.summary())}. Sites: {c['sites']}.</div>{legend}</header>
<details class="plan" open><summary><b>Plan decisions per step</b> (sites with some step that is not compute)</summary>
{plan_table}</details>
{_overview(diff, group_ids)}
<div class="tools"><button id="expand">expand all</button> <button id="collapse">collapse sites</button>
<label><input type="checkbox" value="kept" checked> unchanged</label>
<label><input type="checkbox" value="inserted" checked> inserted</label>
<label><input type="checkbox" value="skipped" checked> skipped</label>
<input type="search" id="search" placeholder="find a node (name, target, module)"></div>
<div id="graph">{body}</div></div>
<script type="application/json" id="ditopt-nodes">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def _group_dom_ids(root: Group) -> dict[int, str]:
    """DOM ids of the groups, depth-first: ``G0``, ``G1``, ..."""
    ids: dict[int, str] = {}

    def visit(group: Group) -> None:
        for child in group.children:
            if isinstance(child, Group):
                ids[id(child)] = f"G{len(ids)}"
                visit(child)

    visit(root)
    return ids


__all__ = ["DiffNode", "GraphDiff", "Group", "diff_graphs", "graph_diff", "render_dot", "render_html",
           "render_text", "rewrite", "site_decisions"]
