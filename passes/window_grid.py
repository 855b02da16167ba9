"""Where a window site's attention sees the token grid (frames x height x width, or height x
width), read from the graph: what a per-axis ``window`` (:class:`GridWindow`) needs.

Two walks, each over the part of the graph it can follow:

1. **Patch embedding to the stack.** The grid is the output of a convolution before the block
   stack, ``[B, C, F', H', W']`` (conv3d) or ``[B, C, H', W']`` (conv2d; frames folded into the
   batch, as CogVideoX does, become the frames axis). Its positions are numbered row-major and
   that index is replayed through the nodes between the convolution and the stack: layout ops
   (flatten, transpose, view, cat with the text, slices, ...) run on the index itself, ops that
   act on each token alone (linear, norms, elementwise with a positional table) keep it. The
   :class:`~ditopt.token_flow.TokenFlow` walker cannot do this part: it follows one dimension and
   refuses the flatten that merges the spatial ones into the tokens.
2. **Stack to the attention.** From the stack input that carries the whole grid in row-major
   order along one dimension, :class:`~ditopt.token_flow.TokenFlow` (the rules sequence parallelism
   shards by) follows the token dimension to each SDPA call of the site: its query and key layout
   gives the grid's offset in the attention's sequence, after text tokens joined in front (joint
   attention) or before the text joined behind.

Nothing is read from a per-model table; sizes come from the traced shapes. A site whose grid
cannot be found raises a ``PlanError`` naming the site and what is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditopt.errors import PlanError
from ditopt.token_flow import Tok, TokenFlow, TokenMixing, walker
from ditopt.regions import target_name, tensor_meta
from ditopt.sites import SiteTable

from .annotations import role_of

_CONVS = {"conv2d", "conv3d", "convolution", "_convolution"}
_SAME = {"to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach", "dropout"}
_LAYOUT = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "unsqueeze", "squeeze", "expand",
           "movedim", "swapaxes", "narrow", "getitem", "cat", "concat", "split", "chunk", "unbind"}
_PER_TOKEN = {"linear", "layer_norm", "rms_norm", "add", "sub", "mul", "truediv", "iadd", "silu", "gelu", "neg"}


@dataclass(frozen=True)
class TokenGrid:
    """The grid one SDPA call attends over: ``sizes`` (frames, height, width or height, width),
    its first token's position in the call's sequence of ``tokens``, and the patch embedding node."""

    sizes: tuple[int, ...]
    offset: int
    tokens: int
    source: str


def find_token_grids(graph: fx.Graph, sites: SiteTable, calls: dict[str, list[fx.Node]]) -> dict[fx.Node, TokenGrid]:
    """The :class:`TokenGrid` of every SDPA call in ``calls`` (``{site: its calls}``); PlanError
    naming the first site whose grid is missing, and what is.

    Example (Wan: conv3d ``[1, 32, 3, 4, 4]`` -> flatten -> transpose -> stack; CogVideoX joins
    its 6 text tokens in front of the 3 x 4 x 4 video tokens):
        >>> import ditopt
        >>> from ditopt.capture import capture
        >>> from ditopt.small_models import build
        >>> from ditopt.passes.insert_window_branches import sdpa_calls
        >>> for name, site in [("wan", "blocks.0.attn1"), ("cogvideox", "transformer_blocks.0.attn1")]:
        ...     graph = capture(*build(name)[:1], **build(name)[1]).gm.graph
        ...     sites = ditopt.find_sites(graph)
        ...     grids = find_token_grids(graph, sites, {site: sdpa_calls(graph, sites[site].nodes)})
        ...     print([(g.sizes, g.offset, g.tokens) for g in grids.values()])
        [((3, 4, 4), 0, 48)]
        [((3, 4, 4), 6, 54)]
    """
    first = next(iter(calls))
    if "stack" not in sites:
        raise PlanError("a per-axis window needs the token grid, which starts at the patch embedding before the "
                        "block stack; this graph has no block stack", site=first)
    stack = set(sites["stack"].nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    convs = [n for n in graph.nodes if n.name not in stack and _is_conv(n)]
    if not convs:
        raise PlanError("a per-axis window needs the token grid, read from the patch embedding: no conv2d/conv3d "
                        "before the block stack (patchified some other way); give the window in tokens", site=first)
    for site, cs in calls.items():
        if any(c.name not in stack for c in cs):
            raise PlanError("a per-axis window needs the token grid, which the patch embedding makes for the block "
                            "stack; this attention is outside the stack (text or other tokens)", site=site)
    last = max(order[c] for cs in calls.values() for c in cs)
    region = {n for n in graph.nodes if n.name in stack and order[n] <= last}
    found: dict[fx.Node, TokenGrid] = {}
    why: list[str] = []
    for conv in convs:
        starts = list(_grid_starts(graph, conv, region))
        if not starts:
            why.append(f"the output of {conv.name} ({target_name(conv)}) does not enter the stack as tokens in "
                       f"row-major order")
        for start, dim, sizes in starts:
            try:
                flow = _follow(graph, region, start, dim)
            except TokenMixing as e:
                why.append(f"its tokens ({start.name}, dimension {dim}) cannot be followed past node {e}")
                continue
            layouts = {node: (qs, ks) for node, _, qs, ks in flow.attention}
            for cs in calls.values():
                for call in cs:
                    if call not in found and call in layouts and _grid_of(*layouts[call], sizes) is not None:
                        found[call] = TokenGrid(sizes, *_grid_of(*layouts[call], sizes), source=conv.name)
            why.append(f"its tokens enter the stack at {start.name}, but this attention's queries and keys are not "
                       f"them (cross attention, or a sequence of other tokens)")
    for site, cs in calls.items():
        missing = [c.name for c in cs if c not in found]
        if missing:
            raise PlanError(f"a per-axis window needs the token grid at each attention call; none found for "
                            f"{', '.join(missing)} (patch embedding {', '.join(c.name for c in convs)}: "
                            f"{'; '.join(dict.fromkeys(why))})", site=site)
    return found


def _is_conv(node: fx.Node) -> bool:
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d))
    return node.op == "call_function" and target_name(node) in _CONVS and len(_shape(node) or ()) in (4, 5)


def _shape(node) -> tuple[int, ...] | None:
    meta = tensor_meta(node) if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in meta[0]) if meta is not None else None


def _grid_starts(graph: fx.Graph, conv: fx.Node, region: set[fx.Node]):
    """``(stack input, token dimension, grid sizes)`` for each value entering ``region`` that holds
    all of ``conv``'s positions, row-major along one dimension (batch by batch)."""
    batch, _, *spatial = _shape(conv)
    index = {conv: torch.arange(batch * math.prod(spatial)).reshape(batch, 1, *spatial).expand(_shape(conv))}
    entering = {a for n in region for a in n.all_input_nodes if a not in region}
    for node in graph.nodes:
        if node in region or node is conv or not any(a in index for a in node.all_input_nodes):
            continue
        value = _replay(node, index)
        if value is not None:
            index[node] = value
        if node in entering and isinstance(index.get(node), torch.Tensor):
            found = _token_dimension(index[node], batch, spatial)
            if found is not None:
                yield node, *found


def _replay(node: fx.Node, index: dict):
    """The conv positions ``node``'s value holds (-1: none), or None where it cannot tell."""
    name = target_name(node)
    paths = [a for a in node.all_input_nodes if a in index]
    if len(paths) != 1:
        return None
    x, out = paths[0], _shape(node)
    if not isinstance(index[x], torch.Tensor) and name != "getitem":  # a tuple (split) is only indexed
        return None
    if name in _SAME:
        return index[x] if out == tuple(index[x].shape) else None
    if name in _PER_TOKEN:
        src = index[x] if out and out[-1] == index[x].shape[-1] else index[x][..., :1]
        try:
            return src.expand(out) if out is not None else None
        except RuntimeError:
            return None
    if name not in _LAYOUT:
        return None

    def value(a):
        if a in index:
            return index[a]
        shape = _shape(a)
        if shape is None:
            raise LookupError(a.name)
        return torch.full(shape, -1, dtype=torch.long)

    try:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        return fn(*args, **kwargs)
    except (LookupError, RuntimeError, TypeError, ValueError, IndexError):
        return None


def _token_dimension(index: torch.Tensor, batch: int, spatial: list[int]):
    """``(dimension, grid sizes)`` if one dimension of ``index`` (not the first, the batch) runs over
    every position of each sample's grid in row-major order, -1 around it. A conv2d's samples
    folded from frames (CogVideoX: ``[B * F, C, H, W]``) give the frames axis."""
    per_frame = math.prod(spatial)
    for dim in range(1, index.ndim):
        moved = index.movedim(dim, -1)
        rows = moved.reshape(moved.shape[0], -1, moved.shape[-1])[:, 0]  # [samples, positions along dim]
        inside = (rows[0] >= 0).nonzero().flatten()
        if not len(inside) or len(inside) % per_frame:
            continue
        count, offset = len(inside), int(inside[0])
        frames = count // per_frame
        expected = torch.arange(count)[None] + count * torch.arange(rows.shape[0])[:, None]
        if (frames * rows.shape[0] != batch or (frames > 1 and len(spatial) == 3)
                or offset + count > rows.shape[1] or not torch.equal(rows[:, offset:offset + count], expected)
                or (rows[:, :offset] >= 0).any() or (rows[:, offset + count:] >= 0).any()):
            continue
        return dim, (frames, *spatial) if frames > 1 else tuple(spatial)
    return None


def _follow(graph: fx.Graph, region: set[fx.Node], start: fx.Node, dim: int) -> TokenFlow:
    """:class:`TokenFlow` of ``start``'s dimension ``dim`` through ``region`` on one rank, past the
    nodes the passes inserted (they read values, never change their layout)."""
    flow = TokenFlow(start, dim, 1)
    flow.tok[start] = Tok(dim, (("s", _shape(start)[dim]),))
    walk = walker(flow)
    for node in graph.nodes:
        if node not in region or node.op in ("placeholder", "output", "get_attr") or role_of(node) is not None:
            continue
        if any(a in flow.tok for a in node.all_input_nodes):
            try:
                block = node.target is torch.ops.higher_order.invoke_subgraph
                out = _block_call(node, flow) if block else walk.visit(node)
            except (TypeError, KeyError, IndexError) as e:  # a rule that met a node it has no metadata for
                raise TokenMixing(node, f"the token-flow rules cannot follow it ({type(e).__name__}: {e})") from e
            if out is not None:
                flow.tok[node] = out
    return flow


def _block_call(node: fx.Node, flow: TokenFlow) -> tuple:
    """The tokens of a kept block call's outputs (``invoke_subgraph``, :mod:`ditopt.regional`): a
    block adds to its residual streams, so each output holds the tokens of the one input shaped
    like it (what ``sites`` takes a residual input to be); TokenMixing where that is ambiguous."""
    held = {a: flow.tok[a] for a in node.args[2:] if isinstance(flow.tok.get(a), Tok)}
    outs = node.meta.get("example_value", node.meta.get("val"))
    toks = []
    for out in outs if isinstance(outs, (tuple, list)) else ():
        like = {t for a, t in held.items() if isinstance(out, torch.Tensor) and _shape(a) == tuple(out.shape)}
        if len(like) > 1:
            raise TokenMixing(node, "a block call with two token inputs shaped like one of its outputs")
        toks.append(like.pop() if like else None)
    if not toks:
        raise TokenMixing(node, "a block call whose outputs have no traced shapes")
    return tuple(toks)


def _grid_of(q_segs, k_segs, sizes) -> tuple[int, int] | None:
    """``(offset, tokens)`` of the grid in an attention whose queries and keys share one layout
    with one run of the grid's tokens."""
    runs = [i for i, (kind, _) in enumerate(q_segs) if kind == "s"]
    if q_segs != k_segs or len(runs) != 1 or q_segs[runs[0]][1] != math.prod(sizes):
        return None
    return sum(n for _, n in q_segs[:runs[0]]), sum(n for _, n in q_segs)


__all__ = ["TokenGrid", "find_token_grids"]
