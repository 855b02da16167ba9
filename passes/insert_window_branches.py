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

Does not fire on a graph without window sites. Refuses (``PlanError`` naming the site and node)
an SDPA call with a mask, causal masking, dropout or GQA: the window kernel has none of them.
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
from ditopt.runtime.window_attention import window_attention

from .annotations import Role, annotate, graph_annotation, regions_of, token_of
from .insert_skip_branches import _dense, _example, _pinned_operands
from .pass_base import PassContext, PassResult, copy_meta

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default)
_OPERANDS = ("query", "key", "value")
_UNSUPPORTED = {"attn_mask": (3, None), "dropout_p": (4, 0.0), "is_causal": (5, False), "enable_gqa": (7, False)}
SLOT = SLOTS[Action.WINDOW]


def insert_window_branches(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ga = graph_annotation(gm)
    done = set(ga.window_branches or ())
    todo = [site for site in ga.windows if site not in done]
    calls = {site: _checked_calls(gm.graph, ctx, site) for site in todo}  # every refusal before any rewrite
    for site in todo:
        _rewrite(gm, ctx, site, ga.windows[site], calls[site])
        done.add(site)
    ga.window_branches = done
    if todo:
        gm.graph.lint()
    return PassResult(gm, bool(todo))


def sdpa_calls(graph: fx.Graph, nodes) -> list[fx.Node]:
    """The SDPA calls among ``nodes`` (names), in graph order."""
    names = set(nodes)
    return [n for n in graph.nodes if n.name in names and n.op == "call_function" and n.target in _SDPA]


def _checked_calls(graph: fx.Graph, ctx: PassContext, site: str) -> list[fx.Node]:
    calls = sdpa_calls(graph, ctx.sites[site].nodes)
    if not calls:
        raise PlanError(f"window needs the site's attention as a scaled_dot_product_attention call; {site!r} has "
                        f"none (another attention backend, or sequence parallelism, replaced it)", site=site)
    for call in calls:
        _check_call(call, site)
    return calls


def _rewrite(gm: fx.GraphModule, ctx: PassContext, site: str, window: int, calls: list[fx.Node]) -> None:
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
        _rewrite_call(gm, ctx, site, window, index, call, token, full, keep)


def _rewrite_call(gm, ctx, site, window, index, call, token, full, keep) -> None:
    graph = gm.graph
    q, k, v, scale = _check_call(call, site)
    example = _example(call)
    regions = regions_of(call)
    slot = f"{SLOT}{index}"
    with graph.inserting_before(call):
        r_old = graph.call_function(torch.ops.ditopt.cache_load.default, (
            token, ctx.runtime_id, ctx.graph_id, site, slot, list(example.shape), example.dtype, ctx.inductor))
    copy_meta(r_old, call, torch.zeros(example.shape, dtype=example.dtype, device=example.device))
    annotate(r_old, role=Role.LOAD, site=site, index=index, regions=regions)

    base = f"ditopt_{site.replace('.', '_')}_window{index}"
    kernel = dict(window=window, scale=scale)
    branches = {
        "full": _branch(("q", "k", "v", "r_old"), lambda g, a: _sdpa(g, call, a), example, ctx.inductor),
        "window": _branch(("q", "k", "v", "r_old"), lambda g, a: g.call_function(
            torch.add, (_window(g, a, kernel), a["r_old"])), example, ctx.inductor),
        "residual": _branch(("q", "k", "v", "a"), lambda g, a: g.call_function(
            operator.sub, (a["a"], _window(g, a, kernel))), example, ctx.inductor),
        "no_residual": _branch(("q", "k", "v", "a"), lambda g, a: g.call_function(
            torch.empty, (tuple(example.shape),), {"dtype": example.dtype, "device": example.device}),
            example, ctx.inductor),
    }
    for name, branch in branches.items():
        setattr(gm, f"{base}_{name}", fx.GraphModule(gm, branch))

    attention = _cond(gm, ctx, call, full, base, ("full", "window"), [q, k, v, r_old], regions, site, example)
    residual = _cond(gm, ctx, attention, keep, base, ("residual", "no_residual"), [q, k, v, attention], regions,
                     site, example)
    with graph.inserting_after(residual):
        store = graph.call_function(torch.ops.ditopt.cache_store.default, (
            token, residual, keep, ctx.runtime_id, ctx.graph_id, site, slot, ctx.inductor))
    copy_meta(store, call)
    annotate(store, role=Role.STORE, site=site, index=index, regions=regions)
    call.replace_all_uses_with(attention)
    graph.erase_node(call)


def _check_call(call: fx.Node, site: str):
    """q, k, v and scale of an SDPA call the window kernel can stand in for."""
    def arg(i: int, name: str, default=None):
        return call.args[i] if len(call.args) > i else call.kwargs.get(name, default)

    q, k, v = (arg(i, name) for i, name in enumerate(_OPERANDS))
    for name, (i, default) in _UNSUPPORTED.items():
        value = arg(i, name, default)
        if value is not default and value != default:
            raise PlanError(f"window attention has no {name}; this SDPA call has {name}={value!r}: "
                            f"{call.format_node()}", site=site)
    shapes = [_example(x).shape if isinstance(x, fx.Node) and _example(x) is not None else None for x in (q, k, v)]
    if None in shapes or not (shapes[0][:-1] == shapes[1][:-1] == shapes[2][:-1]):
        raise PlanError(f"window attention needs queries, keys and values of one sequence and one head count; got "
                        f"shapes {[tuple(s) if s is not None else None for s in shapes]}: {call.format_node()}",
                        site=site)
    return q, k, v, arg(6, "scale")


def _branch(inputs, body, example: torch.Tensor, contiguous: bool) -> fx.Graph:
    """A one-output branch graph over placeholders ``inputs``."""
    g = fx.Graph()
    env = {name: g.placeholder(name) for name in inputs}
    value = body(g, env)
    g.output((_dense(g, value, example) if contiguous else value,))
    return g


def _sdpa(g: fx.Graph, call: fx.Node, env) -> fx.Node:
    """The captured SDPA call on the branch's q, k, v."""
    names = dict(zip(("q", "k", "v"), _OPERANDS))
    args = list(call.args)
    kwargs = dict(call.kwargs)
    for short, name in names.items():
        i = _OPERANDS.index(name)
        if len(args) > i:
            args[i] = env[short]
        else:
            kwargs[name] = env[short]
    return g.call_function(call.target, tuple(args), kwargs)


def _window(g: fx.Graph, env, kernel) -> fx.Node:
    return g.call_function(window_attention, (env["q"], env["k"], env["v"], kernel["window"]),
                           {"scale": kernel["scale"]})


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
