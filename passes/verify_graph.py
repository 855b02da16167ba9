"""Check the invariants of a rewritten graph (passes/README.md); raise naming the node.

Runs after the last pass, and after every pass in debug mode (``DITOPT_DEBUG=1``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .annotations import Role, graph_annotation, role_of
from .pass_base import PassContext, PassResult

_EFFECTS = {"begin_step", "cache_store", "update_indicator"}


class GraphInvariantError(AssertionError):
    pass


def _fail(node: fx.Node, message: str):
    raise GraphInvariantError(f"{message}: {node.format_node()}")


def verify_graph(gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    graph = gm.graph
    graph.lint()
    ga = graph_annotation(gm)
    tokens = [n for n in graph.find_nodes(op="placeholder") if role_of(n) is Role.TOKEN]
    if len(tokens) > 1:
        _fail(tokens[1], "more than one runtime token")
    token = tokens
    for node in graph.nodes:
        target = node.target
        name = getattr(target, "_opname", None) if node.op == "call_function" else None
        if name in _EFFECTS and (not token or node.args[0] is not token[0]):
            _fail(node, "a runtime effect must mutate the graph's token")
        if node.op == "call_function" and target is torch.ops.higher_order.cond:
            for operand in node.args[3]:
                if isinstance(operand, fx.Node) and operand.op == "get_attr" and \
                        isinstance(getattr(gm, operand.target, None), fx.GraphModule):
                    _fail(node, f"a cond operand is a graph module ({operand.name}), not a tensor")
            true_gm = getattr(gm, node.args[1].target)
            false_gm = getattr(gm, node.args[2].target)
            n_true = len(next(iter(true_gm.graph.find_nodes(op="output"))).args[0])
            n_false = len(next(iter(false_gm.graph.find_nodes(op="output"))).args[0])
            if n_true != n_false:
                _fail(node, f"skip branch outputs differ in number ({n_true} vs {n_false})")
            for sub in (true_gm, false_gm):
                for inner in sub.graph.nodes:
                    if getattr(inner.target, "_opname", None) in _EFFECTS:
                        _fail(inner, "a runtime effect inside a skip branch (it must be hoisted)")
    missing = set(ga.rewrites) - set(ga.skip_branches or ())
    if ga.skip_branches is not None and missing:
        raise GraphInvariantError(f"sites annotated for reuse but never given a skip branch: {sorted(missing)}")
    unwindowed = set(ga.windows) - set(ga.window_branches or ())
    if ga.window_branches is not None and unwindowed:
        raise GraphInvariantError(f"sites planned `window` but never given window branches: {sorted(unwindowed)}")
    unshared = set(ga.cfg_shared) - set(ga.cfg_branches or ())
    if ga.cfg_branches is not None and unshared:
        raise GraphInvariantError(f"sites planned `share_cfg` but never given their branches: {sorted(unshared)}")
    unpartial = set(ga.partials) - set(ga.partial_branches or ())
    if ga.partial_branches is not None and unpartial:
        raise GraphInvariantError(f"sites planned `partial` but never given their branches: {sorted(unpartial)}")
    return PassResult(gm, False)
