"""The token-flow rules sequence parallelism (and the passes that find tokens) rewrite from.

**Token flow** (:class:`TokenFlow`, nothing read from a per-model table): from a tensor entering
the stack and one of its dimensions, the walker follows that dimension through each node.
Elementwise ops, linears, norms over other dimensions, views, transposes, slices and joins keep
each token on its rank; ``scaled_dot_product_attention`` whose queries, keys and values all carry
it is self-attention (made distributed); one whose keys and values do not (text) stays local.
Anything else that touches it (a convolution or a mean over it, a view merging it, an unknown op)
refuses, naming the node (:class:`TokenMixing`). Whole tensors combined with the tokens one entry
per token (rotary tables, per-token timestep embeddings, masks) are recorded to be sharded alike.
Replicated tokens (text) joined to the sharded ones, as joint attention does, give a layout of
segments (``runtime.distributed``); slices and splits at segment boundaries become local positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .regions import target_name, tensor_meta
from .runtime import distributed


Segs = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Tok:
    """Where a value's token dimension is (``dim``) and its layout (``segs``, global lengths)."""

    dim: int
    segs: Segs

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segs)

    def at(self, dim: int) -> "Tok":
        return Tok(dim, self.segs)


class TokenMixing(Exception):
    """A node that mixes tokens across shards (or that the analysis cannot follow)."""

    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"{node.name} ({target_name(node)}): {why}")
        self.node, self.why = node, why


@dataclass
class TokenFlow:
    """What :func:`find_token_flow` found: the token dimension of every value of the stack and
    what the pass must change (see ``passes/sequence_parallel.py``)."""

    start: fx.Node
    dim: int
    world: int
    tok: dict[fx.Node, Any] = field(default_factory=dict)  # node -> Tok, a tuple of Tok|None, or absent
    shards: list[tuple[fx.Node, fx.Node, int, Segs]] = field(default_factory=list)  # consumer, operand, dim, segs
    new_args: dict[fx.Node, tuple[tuple, dict]] = field(default_factory=dict)  # node -> rewritten (args, kwargs)
    attention: list[tuple[fx.Node, tuple, Segs, Segs]] = field(default_factory=list)  # node, (q,k,v,mask,scale), segs
    gathers: list[fx.Node] = field(default_factory=list)  # token values read outside the stack (and tail)
    tail: set[fx.Node] = field(default_factory=set)  # per-token nodes after the stack that run sharded too


def _shape(a) -> tuple[int, ...] | None:
    meta = tensor_meta(a) if isinstance(a, fx.Node) else None
    return tuple(meta[0]) if meta is not None else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _sharded(t):
    return t if isinstance(t, Tok) and any(kind == "s" for kind, _ in t.segs) else None


def _local(segs: Segs, world: int) -> list[int]:
    return [n // world if kind == "s" else n for kind, n in segs]


_UNARY = {"float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "detach", "neg",
          "exp", "sin", "cos", "rsqrt", "sqrt", "tanh", "sigmoid", "silu", "gelu", "relu", "dropout", "abs", "log",
          "erf", "square", "empty_like", "zeros_like", "ones_like", "full_like", "softplus", "mish", "leaky_relu",
          "clamp", "clamp_min", "clamp_max", "nan_to_num", "sign", "reciprocal", "logical_not", "hardtanh", "elu",
          "relu6", "hardswish", "hardsigmoid", "log1p", "expm1", "exp2", "sinh", "cosh", "sin_", "cos_"}
_ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "floordiv", "iadd", "isub", "imul", "itruediv", "add_",
                "sub_", "mul_", "div_", "where", "masked_fill", "lt", "gt", "le", "ge", "eq", "ne", "and_", "or_",
                "maximum", "minimum", "addcmul", "addcdiv", "lerp", "pow", "atan2", "fmod", "remainder", "rsub",
                "logical_and", "logical_or", "bitwise_and", "bitwise_or", "xor", "copysign", "expand_as", "mod"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "argmax",
               "argmin", "any", "all", "softmax", "log_softmax", "cumsum", "cumprod", "var_mean", "std_mean",
               "normalize", "vector_norm", "linalg_vector_norm", "sort", "argsort", "topk"}
_KEEP_SHAPE = {"softmax", "log_softmax", "cumsum", "cumprod", "normalize", "sort", "argsort"}
_LAYOUT = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "unsqueeze", "squeeze", "flatten",
           "unflatten", "narrow", "select", "pad", "repeat", "t"}
_NO_VALUE = {"size", "dim", "numel", "stride", "ndimension", "element_size", "is_contiguous", "get_device"}


class _Flow:
    def __init__(self, flow: TokenFlow):
        self.f, self.world = flow, flow.world

    def tok(self, a) -> Tok | None:
        t = self.f.tok.get(a) if isinstance(a, fx.Node) else None
        return t if isinstance(t, Tok) else None

    def refuse(self, node: fx.Node, why: str):
        raise TokenMixing(node, why)

    def align(self, node: fx.Node, a: fx.Node, out_ndim: int, p: int, segs: Segs) -> None:
        """A whole value combined with the tokens at output position ``p``: one per token is sharded."""
        s = _shape(a)
        if s is None:
            return
        d = len(s) - (out_ndim - p)
        if d < 0 or s[d] == 1:
            return
        if s[d] == sum(n for _, n in segs):
            self.f.shards.append((node, a, d, segs))
            return
        self.refuse(node, f"combines the tokens with {a.name}, whose dimension {d} has {s[d]} entries")

    def visit(self, node: fx.Node):
        """The node's Tok (a tuple for a tuple of values); a value whose tokens are all replicated has none."""
        out = self._visit(node)
        if isinstance(out, tuple):
            return tuple(_sharded(t) for t in out)
        return _sharded(out)

    def _visit(self, node: fx.Node):
        name = target_name(node)
        if node.op not in ("call_function", "call_method"):
            self.refuse(node, "a module call or other op the token-flow check cannot look into")
        if name in _NO_VALUE:
            return None
        if "scaled_dot_product_attention" in name:
            return self.attention(node)
        if name in _UNARY:
            return self.elementwise(node, node.args[:1], inplace=False)
        if name in _ELEMENTWISE:
            operands = [a for a in [*node.args, *node.kwargs.values()] if isinstance(a, fx.Node)]
            return self.elementwise(node, operands, inplace=name.endswith("_") or name.startswith("i"))
        if name in _GENERAL:
            return _GENERAL[name](self, node)
        if name not in _HANDLERS:
            self.refuse(node, "an op the token-flow check does not know; it may mix tokens")
        x = node.args[0] if node.args else None
        t = self.tok(x)
        if t is None:  # the tokens enter through another argument
            if any(self.tok(a) is not None for a in node.all_input_nodes):
                self.refuse(node, "takes the tokens in an argument the token-flow check cannot follow")
            return None
        return _HANDLERS[name](self, node, x, t)

    def elementwise(self, node: fx.Node, operands: list, inplace: bool):
        out = _shape(node)
        toks = [(a, self.tok(a)) for a in operands if self.tok(a) is not None]
        if not toks:
            return None
        if out is None:
            self.refuse(node, "a value of unknown shape")
        places = {(len(out) - (len(_shape(a)) - t.dim), t.segs) for a, t in toks}
        if len(places) != 1:
            self.refuse(node, "combines token values whose token dimensions do not line up")
        p, segs = places.pop()
        if inplace and self.tok(operands[0]) is None:
            self.refuse(node, "writes token values into a whole tensor in place")
        for a in operands:
            if self.tok(a) is None:
                self.align(node, a, len(out), p, segs)
        return Tok(p, segs)

    def attention(self, node: fx.Node):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        defaults = (None, None, None, None, 0.0, False, None, False)
        q, k, v, mask, dropout, causal, scale, gqa = (_arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults)))
        tq, tk, tv = self.tok(q), self.tok(k), self.tok(v)
        if self.tok(mask) is not None:
            self.refuse(node, "its attention mask is computed from the sharded tokens")
        if tq is not None and tq.dim != len(_shape(q)) - 2:
            self.refuse(node, f"the token dimension is dimension {tq.dim} of the queries, not their sequence dimension")
        if tk is None and tv is None:
            if tq is None:
                return None
            if mask is not None and len(_shape(mask)) >= 2 and _shape(mask)[-2] == tq.length:
                self.f.shards.append((node, mask, len(_shape(mask)) - 2, tq.segs))
            return tq.at(len(_shape(node)) - 2)
        if tq is None or tk is None or tv is None or tk.segs != tv.segs:
            self.refuse(node, "attention whose keys or values carry the tokens but whose queries do not")
        if tk.dim != len(_shape(k)) - 2 or tv.dim != len(_shape(v)) - 2 or len(_shape(q)) != 4:
            self.refuse(node, "attention over the tokens with keys/values not shaped [batch, heads, tokens, dim]")
        if causal or dropout or gqa:
            self.refuse(node, "causal, dropout or grouped-query attention over the tokens is not supported")
        self.f.attention.append((node, (q, k, v, mask, scale), tq.segs, tk.segs))
        return tq.at(len(_shape(node)) - 2)


def walker(flow: TokenFlow) -> _Flow:
    """The walker that fills ``flow``: ``visit(node)`` returns the node's Tok (or a tuple, or None)."""
    return _Flow(flow)


def _linear(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    if any(fl.tok(a) is not None for a in node.all_input_nodes if a is not x):
        fl.refuse(node, "a matmul that contracts over the tokens")
    if t.dim >= len(_shape(x)) - 1:
        fl.refuse(node, "a matmul over the token dimension")
    return t.at(len(_shape(node)) - (len(_shape(x)) - t.dim))


def _layer_norm(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    k = len(tuple(_arg(node, 1, "normalized_shape")))
    if t.dim >= len(_shape(x)) - k:
        fl.refuse(node, "normalises over the token dimension")
    return t


def _reduction(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    name, ndim = target_name(node), len(_shape(x))
    default = 1 if name == "normalize" else None
    dim = _arg(node, 2 if name == "normalize" else 1, "dim", default)
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        fl.refuse(node, "reduces over every dimension, the tokens included")
    dims = {_norm(d, ndim) for d in (dim if isinstance(dim, (tuple, list)) else [dim]) if isinstance(d, int)}
    if t.dim in dims:
        fl.refuse(node, "reduces over the token dimension")
    value = node.meta.get("example_value", node.meta.get("val"))
    first = value[0] if isinstance(value, (tuple, list)) else value
    keep = name in _KEEP_SHAPE or (isinstance(first, torch.Tensor) and first.dim() == ndim)
    out = t if keep else t.at(t.dim - sum(1 for d in dims if d < t.dim))
    return tuple(out for _ in value) if isinstance(value, (tuple, list)) else out


def _layout(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    """A pure layout op (transpose, permute, squeeze, flatten, narrow, pad, ...): where the token
    dimension lands, found by running the op on a meta tensor whose token dimension has a size no
    other has; refused unless exactly one dimension of the result has that size."""
    shape = list(_shape(x))
    size = shape[t.dim] = 2 * max(shape) + 1
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        fl.refuse(node, "a layout op with computed arguments")
    fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    try:
        out = fn(torch.empty(shape, device="meta"), *node.args[1:], **node.kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError):
        out = None
    hits = [i for i, n in enumerate(getattr(out, "shape", ())) if n == size]
    if len(hits) != 1:
        fl.refuse(node, "merges, splits, cuts or repeats the token dimension")
    return t.at(hits[0])


def _sizes_of(node: fx.Node, key: str) -> tuple[list, bool]:
    """The size list of a view / reshape / expand call, and whether it was passed as one sequence."""
    rest = node.args[1:]
    if not rest:
        return list(node.kwargs.get(key, node.kwargs.get("size", ()))), True
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    return list(rest), False


def _with_sizes(fl: _Flow, node: fx.Node, p: int, t: Tok, key: str) -> None:
    sizes, packed = _sizes_of(node, key)
    if p < len(sizes) and sizes[p] == t.length:
        sizes[p] = sum(_local(t.segs, fl.world))
        x = node.args[0]
        args = (x, tuple(sizes)) if packed and len(node.args) > 1 else (x, *sizes)
        kwargs = {k: v for k, v in node.kwargs.items() if k not in (key, "size")}
        fl.f.new_args[node] = (args, kwargs)


def _view(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    src, out = _shape(x), _shape(node)
    before = math.prod(src[: t.dim])
    hits = [j for j in range(len(out)) if out[j] == src[t.dim] and math.prod(out[:j]) == before]
    if not hits:
        fl.refuse(node, "a view that merges or splits the token dimension")
    _with_sizes(fl, node, hits[0], t, "shape")
    return t.at(hits[0])


def _expand(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    p = t.dim + len(_shape(node)) - len(_shape(x))
    _with_sizes(fl, node, p, t, "size")
    return t.at(p)


def _slice_segs(fl: _Flow, node: fx.Node, segs: Segs, s: slice) -> tuple[Segs, slice]:
    """The segments a slice of the token dimension keeps, and the slice in local positions."""
    if s.step not in (None, 1) or not all(isinstance(b, (int, type(None))) for b in (s.start, s.stop)):
        fl.refuse(node, "slices the token dimension with a step or computed bounds")
    cut = distributed.slice_layout(segs, s, fl.world)
    if cut is None:
        fl.refuse(node, "slices the token dimension inside a run of sharded tokens")
    return cut


def _index(fl: _Flow, node: fx.Node, shape: tuple, t: Tok, idx) -> tuple[int, Segs, Any, int]:
    """Where the token dimension lands under ``x[idx]``: (position, layout, index in local
    positions, number of dimensions of the result)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(e, (fx.Node, torch.Tensor, list)) for e in items):
        fl.refuse(node, "indexes a token value with a tensor")
    fill = len(shape) - sum(1 for e in items if e is not None and e is not Ellipsis)
    in_d = out_d = 0
    pos, segs, changed = None, t.segs, False
    for i, e in enumerate(items):
        if e is None:
            out_d += 1
            continue
        if e is Ellipsis:
            if in_d <= t.dim < in_d + fill:
                pos = out_d + t.dim - in_d
            in_d, out_d = in_d + fill, out_d + fill
            continue
        if in_d == t.dim:
            if not isinstance(e, slice):
                fl.refuse(node, "picks single tokens")
            if e != slice(None):
                segs, items[i] = _slice_segs(fl, node, t.segs, e)
                changed = True
            pos = out_d
        in_d += 1
        out_d += 0 if isinstance(e, int) else 1
    ndim = out_d + len(shape) - in_d
    if pos is None:
        pos = out_d + (t.dim - in_d)
    new = (tuple(items) if isinstance(idx, tuple) else items[0]) if changed else idx
    return pos, segs, new, ndim


def _getitem(fl: _Flow, node: fx.Node):
    x, idx = node.args[0], node.args[1]
    held = fl.f.tok.get(x)
    if isinstance(held, tuple):
        return held[idx] if isinstance(idx, int) else fl.refuse(node, "slices a list of token values")
    t = fl.tok(x)
    if t is None:
        return None if not isinstance(idx, fx.Node) else fl.refuse(node, "indexes with token values")
    pos, segs, new, _ = _index(fl, node, _shape(x), t, idx)
    if new is not idx:
        fl.f.new_args[node] = ((x, new), {})
    return Tok(pos, segs)


def _setitem(fl: _Flow, node: fx.Node):
    x, idx, value = node.args
    t, tv = fl.tok(x), fl.tok(value)
    if t is None:
        return None if tv is None else fl.refuse(node, "writes token values into a whole tensor")
    pos, segs, _, ndim = _index(fl, node, _shape(x), t, idx)
    if segs != t.segs:
        fl.refuse(node, "writes into part of the token dimension")
    if tv is not None:
        if len(_shape(value)) - tv.dim != ndim - pos or tv.segs != segs:
            fl.refuse(node, "writes token values at another position of the token dimension")
    elif isinstance(value, fx.Node):
        fl.align(node, value, ndim, pos, segs)
    return None


def _split(fl: _Flow, node: fx.Node, x: fx.Node, t: Tok):
    name, ndim = target_name(node), len(_shape(x))
    count = len(node.meta.get("example_value", node.meta.get("val")))
    if name == "unbind":
        d = _norm(_arg(node, 1, "dim", 0), ndim)
        if d == t.dim:
            fl.refuse(node, "unbinds the token dimension")
        return tuple(t.at(t.dim - (1 if d < t.dim else 0)) for _ in range(count))
    if _norm(_arg(node, 2, "dim", 0), ndim) != t.dim:
        return tuple(t for _ in range(count))
    if name != "split" and name != "split_with_sizes":
        fl.refuse(node, "chunks the token dimension")
    keys = ("split_size_or_sections", "split_size", "split_sizes")
    sizes = node.args[1] if len(node.args) > 1 else next(node.kwargs[k] for k in keys if k in node.kwargs)
    if isinstance(sizes, int):
        sizes = [sizes] * (t.length // sizes) + ([t.length % sizes] if t.length % sizes else [])
    pieces, local, start = [], [], 0
    for s in sizes:
        segs, _ = _slice_segs(fl, node, t.segs, slice(start, start + s))
        pieces.append(Tok(t.dim, segs))
        local.append(sum(_local(segs, fl.world)))
        start += s
    kwargs = {k: v for k, v in node.kwargs.items() if k not in keys}
    if len(node.args) < 3 and "dim" not in kwargs:
        kwargs["dim"] = t.dim
    fl.f.new_args[node] = ((x, local, *node.args[2:]), kwargs)
    return tuple(pieces)


def _cat(fl: _Flow, node: fx.Node):
    tensors = list(_arg(node, 0, "tensors"))
    toks = [fl.tok(a) for a in tensors]
    if not any(toks):
        return None
    out = _shape(node)
    d = _norm(_arg(node, 1, "dim", 0), len(out))
    if any(t is not None and t.dim == d for t in toks):  # joining runs of tokens: a layout
        segs: list = []
        for a, t in zip(tensors, toks):
            if t is not None and t.dim != d:
                fl.refuse(node, "joins token values along different dimensions")
            segs.extend(t.segs if t is not None else [("r", _shape(a)[d])])
        return Tok(d, tuple(segs))
    p, segs = _aligned(fl, node, tensors, toks, len(out), "joins")
    return Tok(p, segs)


def _aligned(fl: _Flow, node: fx.Node, tensors, toks, rank: int, verb: str):
    """The one token place of the token operands of a cat/stack; the others aligned to it."""
    places = {(t.dim, t.segs) for t in toks if t is not None}
    if len(places) != 1:
        fl.refuse(node, f"{verb} token values whose token dimensions do not line up")
    p, segs = places.pop()
    for a, t in zip(tensors, toks):
        if t is None:
            fl.align(node, a, rank, p, segs)
    return p, segs


def _stack(fl: _Flow, node: fx.Node):
    tensors = list(_arg(node, 0, "tensors"))
    toks = [fl.tok(a) for a in tensors]
    if not any(toks):
        return None
    out = _shape(node)
    p, segs = _aligned(fl, node, tensors, toks, len(out) - 1, "stacks")
    d = _norm(_arg(node, 1, "dim", 0), len(out))
    return Tok(p + (1 if d <= p else 0), segs)


_GENERAL = {"getitem": _getitem, "setitem": _setitem, "cat": _cat, "concat": _cat, "concatenate": _cat,
            "stack": _stack}
_HANDLERS = {  # (walker, node, x = args[0], x's Tok)
    "linear": _linear, "matmul": _linear, "layer_norm": _layer_norm, "rms_norm": _layer_norm,
    **{name: _reduction for name in _REDUCTIONS},
    **{name: _layout for name in _LAYOUT}, "view": _view, "reshape": _view, "expand": _expand,
    "split": _split, "split_with_sizes": _split, "chunk": _split, "unbind": _split,
}


__all__ = ["Segs", "Tok", "TokenFlow", "TokenMixing", "walker"]
