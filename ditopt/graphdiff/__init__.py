"""See what the compiler did: a model's graph before and after the passes, as HTML, text or DOT.

:func:`graph_diff` captures a model, runs the pass pipeline as ``ditopt.optimize`` does (the
eager path: skip branches lowered to ``run_branch``), and lines the two graphs up node by node:

- **kept** nodes are in both graphs and run at every step;
- **inserted** nodes are the passes' own: every node annotated with a role
  (:func:`ditopt.passes.annotations.role_of`: step tracking, decisions, cache loads and stores,
  indicators, skip branches, residuals), and every node of a skip branch's reuse side;
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

The package: :mod:`.model` builds the diff (the walk, the groups, the decisions per step);
:mod:`.text`, :mod:`.dot` and :mod:`.html` render it, the page's styles and script being
package data under ``static/``. The compiler never imports this package.
"""

from .dot import render_dot
from .html import render_html
from .model import (DECISION_STYLE, DiffNode, GraphDiff, Group, decision_style, diff_graphs, graph_diff, is_branch,
                    rewrite, site_decisions, target_name)
from .text import render_text

__all__ = ["DECISION_STYLE", "DiffNode", "GraphDiff", "Group", "decision_style", "diff_graphs", "graph_diff",
           "is_branch", "render_dot", "render_html", "render_text", "rewrite", "site_decisions", "target_name"]
