"""Give each self-attention site planned ``window`` a choice of kernel at its SDPA calls: full
attention, or window attention plus the residual cached at its last full step (DiTFastAttn's
WA-RS, "window attention with residual sharing").

Matches: every ``scaled_dot_product_attention`` call in a site of ``GraphAnnotation.windows``
(the site's projections, head reshapes and output projection are left as they are: the site
runs at every step).
Rewrite to (one SDPA call, window ``W``, slot ``window0``):
    before                         after
                                   full = ditopt.decide(token, rid, graph, "blocks.3.attn1", shape)
                                   keep = ditopt.window_residual(token, rid, graph, "blocks.3.attn1")
                                   r_old = ditopt.cache_load(token, ..., "blocks.3.attn1", "window0", ...)
    o = sdpa(q, k, v)              a = cond(full, full_fn, window_fn, (q, k, v, r_old))[0]
                                   r = cond(keep, residual_fn, no_residual_fn, (q, k, v, a))[0]
                                   ditopt.cache_store(token, r, keep, ..., "blocks.3.attn1", "window0")
    out = to_out(o)                out = to_out(a)
where ``full_fn = sdpa(q, k, v)``, ``window_fn = window_attention(q, k, v, W) + r_old``,
``residual_fn = a - window_attention(q, k, v, W)`` and ``no_residual_fn`` returns an empty tensor.

Why at the SDPA output: DiTFastAttn's form. The output projection is linear, so a residual cached
before it is the exact residual of the attention itself, and the full step needs no second run
of the projection. Why two conds: a full step computes the window part only where a later window
step reads the residual (``keep``, :meth:`DecisionTable.residual_needed`); the other full steps
cost what the model costs. ``decide`` says False only when a residual of this shape is cached,
so a window step with nothing cached computes full attention instead (and says so in the stats).

A per-axis window (:class:`GridWindow`, ``window: [frames, height, width]``) calls
:func:`grid_window_attention` instead, with the token grid :func:`passes.window_grid.find_token_grids`
reads from the graph (patch embedding, then the token flow to the call): its sizes and its offset
in the call's sequence. Tokens outside the grid (the text of joint attention: CogVideoX joins it in
front, HunyuanVideo behind) attend and are attended in full, and a key-padding mask
(``[..., 1, tokens]``, HunyuanVideo's text mask) is kept; a site whose grid is not found is refused
(``PlanError`` naming the site and what is missing), before anything is rewritten.

Does not fire on a graph without window sites. Refuses (``PlanError`` naming the site and node)
an SDPA call with causal masking, dropout or GQA, and a mask unless per axis and one row per key:
the window kernels have none of them.
Keeps: the SDPA output's users (now reading ``a``), ``nn_module_stack`` and example values; the
new nodes join the regions the SDPA call was in (an enclosing block that reuses takes them into
its skip branch, and hoists the store).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditopt.errors import PlanError
from ditopt.runtime.decisions import SLOTS, Action
from ditopt.runtime.window_attention import GridWindow, grid_window_attention, window_attention

from .annotations import Role, annotate, graph_annotation, regions_of, token_of
from .insert_skip_branches import _dense, _example, _pinned_operands
from .pass_base import PassContext, PassResult, copy_meta
from .window_grid import TokenGrid, find_token_grids

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default)
_OPERANDS = ("query", "key", "value")
_UNSUPPORTED = {"attn_mask": (3, None), "dropout_p": (4, 0.0), "is_causal": (5, False), "enable_gqa": (7, False)}
SLOT = SLOTS[Action.WINDOW]


def insert_window_branches(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ga = graph_annotation(gm)
    done = set(ga.window_branches or ())
    todo = [site for site in ga.windows if site not in done]
    calls = {site: _checked_calls(gm.graph, ctx, site, ga.windows[site]) for site in todo}  # refusals first
    per_axis = {site: cs for site, cs in calls.items() if isinstance(ga.windows[site], GridWindow)}
    grids = find_token_grids(gm.graph, ctx.sites, per_axis) if per_axis else {}
    for site, cs in per_axis.items():
        _check_axes(site, ga.windows[site], [grids[c] for c in cs])
    for site in todo:
        _rewrite(gm, ctx, site, ga.windows[site], calls[site], grids)
        done.add(site)
    ga.window_branches = done
    if todo:
        gm.graph.lint()
    return PassResult(gm, bool(todo))


def sdpa_calls(graph: fx.Graph, nodes) -> list[fx.Node]:
    """The SDPA calls among ``nodes`` (names), in graph order."""
    names = set(nodes)
    return [n for n in graph.nodes if n.name in names and n.op == "call_function" and n.target in _SDPA]


def _checked_calls(graph: fx.Graph, ctx: PassContext, site: str, window: int) -> list[fx.Node]:
    calls = sdpa_calls(graph, ctx.sites[site].nodes)
    if not calls:
        raise PlanError(f"window needs the site's attention as a scaled_dot_product_attention call; {site!r} has "
                        f"none (the model computes attention by hand, or another attention backend or sequence "
                        f"parallelism replaced it)", site=site)
    for call in calls:
        _check_call(call, site, window)
    return calls


def _rewrite(gm: fx.GraphModule, ctx: PassContext, site: str, window: int, calls: list[fx.Node],
             grids: dict[fx.Node, TokenGrid]) -> None:
    graph = gm.graph
    token = token_of(graph)
    first = calls[0]
    regions = regions_of(first)
    shape = list(_example(first).shape)
    with graph.inserting_before(first):
        full = graph.call_function(torch.ops.ditopt.decide.default,
                                   (token, ctx.runtime_id, ctx.graph_id, site, shape, torch.device("cpu")))
        keep = graph.call_function(torch.ops.ditopt.window_residual.default,
                                   (token, ctx.runtime_id, ctx.graph_id, site))
    for pred in (full, keep):
        copy_meta(pred, first, torch.zeros((), dtype=torch.bool))
    annotate(full, role=Role.DECIDE, site=site, regions=regions)
    annotate(keep, role=Role.DECIDE, site=site, regions=regions)
    for index, call in enumerate(calls):
        _rewrite_call(gm, ctx, site, window, index, call, token, full, keep, grids.get(call))


def _rewrite_call(gm, ctx, site, window, index, call, token, full, keep, grid) -> None:
    graph = gm.graph
    q, k, v, mask, scale = _check_call(call, site, window)
    example = _example(call)
    regions = regions_of(call)
    slot = f"{SLOT}{index}"
    with graph.inserting_before(call):
        r_old = graph.call_function(torch.ops.ditopt.cache_load.default, (
            token, ctx.runtime_id, ctx.graph_id, site, slot, list(example.shape), example.dtype, ctx.inductor))
    copy_meta(r_old, call, torch.zeros(example.shape, dtype=example.dtype, device=example.device))
    annotate(r_old, role=Role.LOAD, site=site, index=index, regions=regions)

    base = f"ditopt_{site.replace('.', '_')}_window{index}"
    kernel = dict(window=window, scale=scale, grid=grid)
    operands = [q, k, v] + ([mask] if isinstance(mask, fx.Node) else [])
    names = ("q", "k", "v", "mask")[:len(operands)]
    branches = {
        "full": _branch((*names, "r_old"), lambda g, a: _sdpa(g, call, a), example, ctx.inductor),
        "window": _branch((*names, "r_old"), lambda g, a: g.call_function(
            torch.add, (_window(g, a, kernel), a["r_old"])), example, ctx.inductor),
        "residual": _branch((*names, "a"), lambda g, a: g.call_function(
            operator.sub, (a["a"], _window(g, a, kernel))), example, ctx.inductor),
        "no_residual": _branch((*names, "a"), lambda g, a: g.call_function(
            torch.empty, (tuple(example.shape),), {"dtype": example.dtype, "device": example.device}),
            example, ctx.inductor),
    }
    for name, branch in branches.items():
        setattr(gm, f"{base}_{name}", fx.GraphModule(gm, branch))

    attention = _cond(gm, ctx, call, full, base, ("full", "window"), [*operands, r_old], regions, site, example)
    residual = _cond(gm, ctx, attention, keep, base, ("residual", "no_residual"), [*operands, attention], regions,
                     site, example)
    with graph.inserting_after(residual):
        store = graph.call_function(torch.ops.ditopt.cache_store.default, (
            token, residual, keep, ctx.runtime_id, ctx.graph_id, site, slot, ctx.inductor))
    copy_meta(store, call)
    annotate(store, role=Role.STORE, site=site, index=index, regions=regions)
    call.replace_all_uses_with(attention)
    graph.erase_node(call)


def _check_call(call: fx.Node, site: str, window: int):
    """q, k, v, mask and scale of an SDPA call the window kernel can stand in for."""
    def arg(i: int, name: str, default=None):
        return call.args[i] if len(call.args) > i else call.kwargs.get(name, default)

    q, k, v = (arg(i, name) for i, name in enumerate(_OPERANDS))
    mask = arg(3, "attn_mask")
    for name, (i, default) in _UNSUPPORTED.items():
        value = arg(i, name, default)
        if name == "attn_mask" and isinstance(window, GridWindow) and _key_mask(value):
            continue
        if value is not default and value != default:
            kept = " (a per-axis window keeps a key mask [..., 1, tokens])" if name == "attn_mask" else ""
            raise PlanError(f"window attention has no {name}{kept}; this SDPA call has {name}={value!r}: "
                            f"{call.format_node()}", site=site)
    shapes = [_example(x).shape if isinstance(x, fx.Node) and _example(x) is not None else None for x in (q, k, v)]
    if None in shapes or not (shapes[0][:-1] == shapes[1][:-1] == shapes[2][:-1]):
        raise PlanError(f"window attention needs queries, keys and values of one sequence and one head count; got "
                        f"shapes {[tuple(s) if s is not None else None for s in shapes]}: {call.format_node()}",
                        site=site)
    return q, k, v, mask, arg(6, "scale")


def _check_axes(site: str, window: GridWindow, grids: list[TokenGrid]) -> None:
    for grid in grids:
        if len(window.sizes) != len(grid.sizes):
            axes = ", ".join(GridWindow(grid.sizes).named())
            raise PlanError(f"the window {list(window.sizes)} has {len(window.sizes)} axes; the token grid of this "
                            f"attention (from {grid.source}) has {len(grid.sizes)}: {list(grid.sizes)} ({axes})",
                            site=site)


def _key_mask(mask) -> bool:
    """Whether ``mask`` masks keys only: one row broadcast over the queries."""
    shape = _example(mask).shape if isinstance(mask, fx.Node) and _example(mask) is not None else None
    return shape is not None and len(shape) >= 2 and shape[-2] == 1


def _branch(inputs, body, example: torch.Tensor, contiguous: bool) -> fx.Graph:
    """A one-output branch graph over placeholders ``inputs``."""
    g = fx.Graph()
    env = {name: g.placeholder(name) for name in inputs}
    value = body(g, env)
    g.output((_dense(g, value, example) if contiguous else value,))
    return g


def _sdpa(g: fx.Graph, call: fx.Node, env) -> fx.Node:
    """The captured SDPA call on the branch's q, k, v (and mask)."""
    names = dict(zip(("q", "k", "v"), _OPERANDS))
    args = list(call.args)
    kwargs = dict(call.kwargs)
    for short, name in names.items():
        i = _OPERANDS.index(name)
        if len(args) > i:
            args[i] = env[short]
        else:
            kwargs[name] = env[short]
    if "mask" in env:
        if len(args) > 3:
            args[3] = env["mask"]
        else:
            kwargs["attn_mask"] = env["mask"]
    return g.call_function(call.target, tuple(args), kwargs)


def _window(g: fx.Graph, env, kernel) -> fx.Node:
    window, grid = kernel["window"], kernel["grid"]
    if not isinstance(window, GridWindow):
        return g.call_function(window_attention, (env["q"], env["k"], env["v"], int(window)),
                               {"scale": kernel["scale"]})
    return g.call_function(grid_window_attention, (env["q"], env["k"], env["v"], window.sizes, grid.sizes,
                                                   grid.offset), {"attn_mask": env.get("mask"), "scale": kernel["scale"]})


def _cond(gm, ctx, after, pred, base, names, operands, regions, site, example) -> fx.Node:
    """``cond(pred, base_<names[0]>, base_<names[1]>, operands)[0]`` inserted after ``after``."""
    graph = gm.graph
    with graph.inserting_after(after):
        true_fn = graph.get_attr(f"{base}_{names[0]}")
    with graph.inserting_after(true_fn):
        false_fn = graph.get_attr(f"{base}_{names[1]}")
    for fn in (true_fn, false_fn):
        annotate(fn, role=Role.BRANCH_FN, site=site, regions=regions)
    passed = _pinned_operands(graph, operands, true_fn, regions) if ctx.inductor else operands
    with graph.inserting_after(false_fn):
        cond = graph.call_function(torch.ops.higher_order.cond, (pred, true_fn, false_fn, tuple(passed)))
    copy_meta(cond, after)
    annotate(cond, role=Role.SKIP_BRANCH, site=site, regions=regions)
    with graph.inserting_after(cond):
        item = graph.call_function(operator.getitem, (cond, 0))
    copy_meta(item, after, example)
    if "val" in after.meta:
        item.meta["val"] = after.meta["val"]
    annotate(item, role=Role.BRANCH_OUTPUT, site=site, regions=regions)
    return item


__all__ = ["insert_window_branches", "sdpa_calls"]
