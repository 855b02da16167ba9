"""The graph diff as one self-contained HTML page: inline SVG, styles and script, no network.

The styles and the script are package data (``static/graphdiff.css``, ``static/graphdiff.js``,
``static/glyphs.svg``), read with :mod:`importlib.resources` and inlined into the page.
"""

from __future__ import annotations

import functools
import html
import json
from importlib import resources

from .model import DECISION_STYLE, INPUTS, OUTSIDE, DiffNode, GraphDiff, Group, decision_style, group_title


@functools.cache
def _static(name: str) -> str:
    """A file of ``ditopt/graphdiff/static``."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _css() -> str:
    """The page's styles: the static file, then one rule per decision colour."""
    return _static("graphdiff.css") + "".join(
        f"td.d-{k}{{background:{v[1]};color:{'#fff' if k in ('reuse', 'reuse_residual') else '#222'}}}"
        for k, v in DECISION_STYLE.items())


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
            title = html.escape(group_title(diff, child))
            if child.kind == "site":
                title = f"<b>{html.escape(child.site)}</b> {html.escape(group_title(diff, child)[len(child.site):])}"
            icon = '<svg width="12" height="12"><use href="#s-branch"/></svg> ' if child.kind == "branch" else ""
            strip = _step_strip(decisions[child.site]) if child.kind == "site" and child.site in decisions else ""
            out.append(f'<details class="grp {child.kind}" id="{gid}" data-group="{html.escape(child.key)}"'
                       f'{site_attr}{opened}><summary>{icon}{title}<span class="cnt">{_counts(nodes)}</span>'
                       f"{strip}</summary>")
            if child.kind == "site" and child.site in decisions and child.part == 1:
                out.append(_step_table({child.site: decisions[child.site]}, diff.table.steps, "steps"))
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
    plan_table = (_step_table(decisions, diff.table.steps, "steps") if decisions
                  else "<p>Every site computes at every step.</p>")
    title = f"ditopt diff: {diff.model} with {diff.plan_name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script>window.__ditoptErrors=0;window.addEventListener('error',function(){{
document.documentElement.dataset.errors=String(++window.__ditoptErrors);}});</script>
<style>
{_css()}</style></head>
<body>{_static("glyphs.svg").rstrip()}
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
<script>
{_static("graphdiff.js")}</script>
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
