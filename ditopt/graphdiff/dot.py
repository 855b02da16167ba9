"""The graph diff as a Graphviz digraph: one cluster per group, nodes filled by status."""

from __future__ import annotations

from .model import GraphDiff, Group, group_title

_GROUP_COLOUR = {"site": "#5b6b7f", "outside": "#bbbbbb", "branch": "#1f5fbf", "compute": "#1f5fbf",
                 "reuse": "#e07b00", "inputs": "#999999"}
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
                lines.append(f"{indent}  label={_dot_str(group_title(diff, child))}; style=\"rounded\"; "
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
