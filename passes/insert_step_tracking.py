"""Give the graph a runtime token and advance the step state at the start of every call.

Matches: the placeholder carrying the timestep (the forward argument named ``ctx.timestep``).
Rewrite to:
    before                          after
    timestep = placeholder          timestep = placeholder
                                    ditopt_token = placeholder          (appended last)
                                    ditopt.begin_step(ditopt_token, timestep, rid, graph)
(with the latents as a fifth argument where the timestep is half precision: see ``_latents``.)
The token is a one-element tensor the backend passes on every call; runtime ops that have an
effect declare they mutate it, which keeps inductor from deleting or reordering them.
Fires once on an annotated graph, even when every site computes: the stats still count calls.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ditopt.errors import TimestepNotFound

from .annotations import Role, annotate, graph_annotation, token_of
from .pass_base import PassContext, PassResult

TOKEN = "ditopt_token"


def find_timestep(graph: fx.Graph, name: str, position: int | None = None) -> fx.Node | None:
    """The placeholder of forward argument ``name`` (also when it arrives through ``**kwargs``, or
    as positional argument ``position`` of a forward wrapped in a ``(*args, **kwargs)`` decorator)."""
    spellings = {name, f"l_{name}_", f"l_kwargs_{name}_"}
    sources = {f"L['{name}']", f"L['kwargs']['{name}']"} | ({f"L['args'][{position}]"} if position is not None else set())
    for node in graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        source_name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
        if node.name in spellings or node.target in spellings or source_name in sources:
            return node
    return None


def forward_inputs(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    """The graph's inputs that come from the forward's arguments (``x``, ``kwargs['t']`` as ``t``,
    a tuple's item as ``x[1]``), with their names; weights left out."""
    found = []
    for node in graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        text = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", "") or "")
        named = re.fullmatch(r"L\['(?:kwargs'\]\[')?(\w+)'\](?:\[(\d+)\])?", text)
        if source is None:  # a graph without dynamo's records (a copy): its placeholder's name
            named = re.fullmatch(r"l_(?:kwargs_)?(\w+?)_(?:(\d+)_)?", node.name)
        if named and named.group(1) != "self" and not named.group(1).startswith("self_"):
            found.append((named.group(1) + (f"[{named.group(2)}]" if named.group(2) else ""), node))
    return found


def _input_names(graph: fx.Graph) -> list[str]:
    """The forward arguments the graph's tensor inputs come from, weights left out."""
    return list(dict.fromkeys(name for name, _ in forward_inputs(graph)))


LATENT_NAMES = ("hidden_states", "sample", "latents", "latent", "x", "img", "video")


def _latents(graph: fx.Graph, timestep: fx.Node) -> fx.Node | None:
    """The latents input, where the timestep is half precision (Flux, HunyuanVideo, Qwen-Image cast
    it to the latents' bfloat16, in which two steps' timesteps can round to one value): the
    runtime tells those steps apart by the latents. None for a float32 timestep (no read)."""
    value = timestep.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float16, torch.bfloat16):
        return None
    found = {}
    for node in graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        text = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", "") or "")
        named = re.fullmatch(r"L\['(?:kwargs'\]\[')?(\w+)'\]", text)
        example = node.meta.get("example_value")
        if named and node is not timestep and isinstance(example, torch.Tensor) and example.is_floating_point() \
                and example.dim() >= 2:
            found.setdefault(named.group(1), node)
    named = [found[n] for n in LATENT_NAMES if n in found]
    return (named or list(found.values()) or [None])[0]


def insert_step_tracking(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not graph_annotation(gm).annotated or token_of(gm.graph) is not None:
        return PassResult(gm, False)
    graph = gm.graph
    timestep = find_timestep(graph, ctx.timestep, ctx.timestep_position)
    if timestep is None:
        given = ", ".join(_input_names(graph)) or "none"
        raise TimestepNotFound(f"no '{ctx.timestep}' tensor input found (the model's tensor inputs: {given}): ditopt "
                               f"needs the timestep as a tensor to track steps (a Python number is not one: pass "
                               f"torch.tensor([t]); another name: timestep_arg=, on the command line "
                               f"--timestep-arg; a piece of a model torch.compile split at a graph break has none "
                               f"either: fullgraph=True names the break)")
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        token = graph.placeholder(TOKEN)
    token._dynamo_source = None
    token.meta["example_value"] = torch.zeros(1, dtype=torch.int64, device=ctx.device)
    annotate(token, role=Role.TOKEN)
    sample = _latents(graph, timestep)
    with graph.inserting_after(token):
        begin = graph.call_function(torch.ops.ditopt.begin_step.default,
                                    (token, timestep, ctx.runtime_id, ctx.graph_id, *([sample] if sample else [])))
    annotate(begin, role=Role.BEGIN_STEP)
    graph.lint()
    return PassResult(gm, True)
