"""What every ditopt pass takes and returns.

A pass is ``(gm, ctx) -> PassResult``. ``ctx`` carries what passes share that is not in the
graph: the site table (the one source of site information) and the runtime and graph ids.
Everything a pass decides from is in typed node and graph annotations (:mod:`.annotations`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ditopt.sites import SiteTable


@dataclass
class PassContext:
    """Shared inputs of the pass pipeline for one graph.

    ``sites`` describes the graph being rewritten: a pass that replaces a site's live-outs
    (``insert_skip_branches``) replaces the table with one naming the new nodes.
    ``runtime_id``/``graph_id`` are baked into the runtime ops; ``inductor`` says whether
    inductor compiles the result (cache tensors are then copied, since inductor may reuse an
    output buffer); ``timestep`` names the forward argument that carries the timestep;
    ``observe`` asks for the profiler's observer nodes; ``device`` is where the model's tensors
    live (the runtime token and everything the rewritten graph creates go there); ``parallel``
    is a :class:`ditopt.parallel.SequenceParallel` (or None): ``sequence_parallel`` shards the
    tokens over its ranks before any other pass runs; ``attention_backend`` is the kernel
    ``attention_backend`` moves SDPA calls to (auto | sdpa | flash | sage | flex; "sdpa" keeps them).
    """

    sites: SiteTable
    runtime_id: int
    graph_id: int
    inductor: bool = False
    timestep: str = "timestep"
    timestep_position: int | None = None  # its position among forward's arguments (a (*args, **kwargs) forward)
    observe: bool = False
    device: torch.device = torch.device("cpu")
    coalesce: bool = True  # coalesce_regions: one region for each run of sites that decide alike
    parallel: Any = None  # a SequenceParallel: shard the token dimension over its ranks
    attention_backend: str = "sdpa"  # the attention kernel: auto | sdpa | flash | sage | flex


def replace_site_nodes(sites: SiteTable, renames: dict[str, str]) -> SiteTable:
    """``sites`` with every live-out and residual input in ``renames`` renamed (a new table)."""
    from dataclasses import replace

    def rename(names):
        return tuple(renames.get(n, n) if n else n for n in names)

    return SiteTable([replace(s, live_outs=rename(s.live_outs), residual_inputs=rename(s.residual_inputs))
                      for s in sites], model=sites.model)


def copy_meta(new: fx.Node, like: fx.Node, example=None) -> None:
    """Give an inserted node the provenance of the node it stands for (and an example value)."""
    new.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
    if example is not None and "tensor_meta" in like.meta:
        new.meta["tensor_meta"] = like.meta["tensor_meta"]
    if example is not None:
        new.meta["example_value"] = example


__all__ = ["PassContext", "PassResult", "copy_meta", "replace_site_nodes"]
