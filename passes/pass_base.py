"""What every ditopt pass takes and returns.

A pass is ``(gm, ctx) -> PassResult``. ``ctx`` carries what passes share that is not in the
graph (the site table, the runtime and graph ids); everything a pass decides from is in node
annotations: ``node.meta["ditopt"]`` on nodes, ``gm.meta["ditopt"]`` on the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

ANNOTATION = "ditopt"


@dataclass
class PassContext:
    """Shared inputs of the pass pipeline for one graph.

    ``runtime_id``/``graph_id`` are baked into the runtime ops; ``inductor`` says whether
    inductor compiles the result (cache tensors are then copied, since inductor may reuse an
    output buffer); ``timestep`` names the forward argument that carries the timestep;
    ``observe`` asks for the profiler's observer nodes.
    """

    sites: Any
    runtime_id: int
    graph_id: int
    inductor: bool = False
    timestep: str = "timestep"
    observe: bool = False  # profiling: insert_observers records every site's output


def annotation(node: fx.Node) -> dict[str, Any]:
    """The node's ditopt annotation, created empty on first use."""
    return node.meta.setdefault(ANNOTATION, {})


def regions_of(node: fx.Node) -> frozenset[str]:
    return frozenset(node.meta.get(ANNOTATION, {}).get("regions", ()))


def graph_annotation(gm: fx.GraphModule) -> dict[str, Any]:
    return gm.meta.setdefault(ANNOTATION, {})


__all__ = ["ANNOTATION", "PassContext", "PassResult", "annotation", "graph_annotation", "regions_of"]
