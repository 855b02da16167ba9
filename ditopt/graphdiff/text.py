"""The graph diff as text: the plan's decisions, the skip regions, the inserted nodes, and a
unified diff of the generated code with a header for each site."""

from __future__ import annotations

import difflib
import re

import torch.fx as fx

from .model import DECISION_STYLE, GraphDiff, Walker, decision_style, is_branch


_ASSIGN = re.compile(r"^\s+([A-Za-z_][A-Za-z0-9_]*)\s*=")
_LIFETIME = re.compile(r";\s+[A-Za-z0-9_ =]+ = None$")  # fx frees dead values; branches free them elsewhere


def _code_lines(gm: fx.GraphModule, walker: Walker, describe, state: dict, reuse_of: str | None = None,
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
            site = walker.site_of_node(node, reuse_of)
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
    walker = Walker(diff.sites)

    def describe(site):
        if site is None:
            return "outside any site"
        s = diff.sites[site]
        return f"site {site} ({s.kind}{', ' + s.attention if s.attention else ''})"

    out = [f"ditopt diff: {diff.summary()}", ""]
    decisions = diff.decisions()
    out.append("plan decisions per step (" + ", ".join(f"{v[0]} {k}" for k, v in DECISION_STYLE.items()) + "):")
    width = max([len(s) for s in decisions] + [4])
    out.append(f"  {'step':{width}s} " + "".join(f"{t % 10}" for t in range(diff.table.steps)))
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
