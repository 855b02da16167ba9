"""Lower every ``torch.cond`` to a plain Python branch, for the eager path.

``torch.cond`` called outside a compiled region re-enters dynamo on every call (about 0.9 ms
here, as much as eight 256x256 linears), so the eager path runs each skip branch as an
ordinary call instead. The predicate of a static plan is known on the host, so ``if pred``
costs nothing; under inductor this pass does not run and the cond stays in the graph.

Matches: ``torch.ops.higher_order.cond(pred, compute, reuse, operands)``, also inside branches.
Rewrite to:
    before                                        after
    out = cond(pred, compute, reuse, ops)         out = run_branch(pred, compute, reuse, ops)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ditopt.runtime.ops import run_branch

from .pass_base import PassContext, PassResult


def lower_skip_branches(gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
    changed = False
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        lowered = False
        for node in list(module.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
                node.target = run_branch
                lowered = True
        changed = changed or lowered
    return PassResult(gm, changed)
