"""ditopt's graph passes, in pipeline order. See README.md here for the invariants.

The pipeline reads top to bottom; each pass is ``(gm, ctx) -> PassResult``.
"""

from __future__ import annotations

import os

import torch.fx as fx

from ditopt.runtime.decisions import DecisionTable

from . import annotations
from .annotate_decisions import annotate_decisions
from .attention_backend import attention_backend
from .coalesce_regions import coalesce_regions
from .insert_cache_ops import insert_cache_ops
from .insert_cfg_sharing import insert_cfg_sharing
from .insert_indicators import insert_indicators
from .insert_observers import insert_observers
from .insert_partial import insert_partial
from .insert_skip_branches import insert_skip_branches
from .insert_step_tracking import insert_step_tracking
from .insert_window_branches import insert_window_branches
from .lower_skip_branches import lower_skip_branches
from .pass_base import PassContext, PassResult
from .sequence_parallel import sequence_parallel
from .verify_graph import GraphInvariantError, verify_graph

# Before everything, each pass here when the context asks for it (the report names those that ran):
FIRST = {
    # ctx.parallel: it changes shapes (every rank holds a slice of the tokens) and inserts nodes
    # into sites, and every later pass must see that.
    sequence_parallel: lambda ctx: ctx.parallel is not None,
    # ctx.attention_backend: SDPA calls move to another kernel in place (same nodes: sites hold);
    # after sequence_parallel, whose distributed attention replaces self-attention's SDPA.
    attention_backend: lambda ctx: ctx.attention_backend != "sdpa",
}
# annotate_decisions runs next and alone reads the plan (it takes the decision table).
PIPELINE = [
    coalesce_regions,       # before any node is inserted: a run of sites that decide alike is one region
    insert_step_tracking,   # token + begin_step: every later runtime op reads the token
    insert_observers,       # profiling graphs only (ctx.observe): observe each site's output
    insert_indicators,      # before cache ops, so a watched site's indicator sits outside the regions
    insert_window_branches, # window sites' SDPA calls: before cache ops, so an enclosing region takes them in
    insert_cfg_sharing,     # batched share_cfg sites (cond half only): likewise before cache ops, and before the
                            # skip branches, which must find its store to hoist where an enclosing site reuses
    insert_partial,         # partial sites (some tokens): before cache ops, so an enclosing region takes in its
                            # cond, and before the skip branches, which hoist its stores where that region reuses
    insert_cache_ops,       # decide / load / store around each region; graph still computes all
    insert_skip_branches,   # needs the loads and stores in place: regions become torch.cond
]
EAGER_ONLY = [
    lower_skip_branches,    # the eager path runs conds as Python branches (no dynamo re-entry)
]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, table: DecisionTable, *,
                 inductor: bool) -> list[tuple[str, bool]]:
    """Run every pass, then regenerate the code of the graph and its branches once; return
    ``[(pass name, modified)]``. ``DITOPT_DEBUG=1`` verifies after each pass."""
    debug = os.environ.get("DITOPT_DEBUG") == "1"
    report = [(p.__name__, p(gm, ctx).modified) for p, wanted in FIRST.items() if wanted(ctx)]
    report.append(("annotate_decisions", annotate_decisions(gm, ctx, table).modified))
    passes = PIPELINE + ([] if inductor else EAGER_ONLY)
    for p in passes:
        result = p(gm, ctx)
        report.append((p.__name__, result.modified))
        if debug:
            verify_graph(gm, ctx)
    verify_graph(gm, ctx)
    gm.recompile()  # once: the passes edit graphs, and regenerating code after each cost seconds at 40 blocks
    return report


__all__ = [
    "annotations", "EAGER_ONLY", "FIRST", "PIPELINE", "GraphInvariantError", "PassContext", "PassResult", "annotate_decisions",
    "attention_backend",
    "coalesce_regions", "insert_cache_ops", "insert_cfg_sharing", "insert_indicators", "insert_observers", "insert_partial", "insert_skip_branches", "insert_step_tracking",
    "insert_window_branches", "lower_skip_branches", "run_pipeline", "sequence_parallel", "verify_graph",
]
