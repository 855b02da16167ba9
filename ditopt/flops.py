"""FLOP counting in one place: the per-op formulas, a graph node's FLOPs, and what each named
module of a model costs when it runs (FLOPs or seconds, measured with hooks).

The formulas count what :class:`torch.utils.flop_counter.FlopCounterMode` counts (matmul-like
ops, attention and convolution; elementwise ops, norms and softmax count 0), written on shapes
whose sizes may be ints or sympy expressions, so one formula prices a concrete call
(:class:`ModuleCost`, ``ditopt.profile``) and a symbolic one (``ditopt.cost``):

- ``linear`` / ``mm`` / ``matmul`` / ``bmm`` / ``addmm`` / ``baddbmm``: ``2 * M * N * K``
  (``2 * numel(out) * K``; the bias add is not counted);
- ``scaled_dot_product_attention``: ``2*B*H*Sq*Sk*(Dqk + Dv)`` (QK and AV; causal masks not
  discounted); window attention (:func:`window_attention_flops`, the ``window`` action's kernel):
  ``2*B*H*ceil(S/block)*block*window*(Dqk + Dv)``, what its one batched SDPA call executes (per
  axis: ``2*B*H*(T*(volume + E) + E*S)*(Dqk + Dv)``, ``T`` grid tokens, ``E`` others);
- convolution: ``2 * B * prod(out spatial) * C_out * C_in/groups * prod(kernel)`` (transposed:
  input spatial instead of output).

:class:`ModuleCost`'s forward pre/post hooks read a running total (FlopCounterMode's FLOPs, or
the clock) when a module starts and ends, so nested modules and modules that run but skip their
work (a cache hook that returns early) are both counted right: a skipped module adds nothing.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cost = ModuleCost(net, ["0", "2"])
    >>> with cost.counting():
    ...     _ = net(torch.randn(3, 4))
    >>> cost.flops, cost.calls
    ({'0': 192, '2': 96}, {'0': 1, '2': 1})
    >>> B, S = sympy.symbols("B S")
    >>> attention_flops((B, 2, S, 8), (B, 2, S, 8), (B, 2, S, 8))
    64*B*S**2
"""

from __future__ import annotations

import contextlib
import math
import operator
import time
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
import torch.fx as fx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ModuleCost", "attention_flops", "conv_flops", "attention_calls", "linear_flops", "matmul_flops",
           "node_flops", "node_shape", "window_attention_flops"]

Shape = Sequence[Any]  # sizes: ints or sympy expressions


# -- the formulas ------------------------------------------------------------------------------

def matmul_flops(a: Shape, out: Shape):
    """A matmul-like op with first operand ``a`` ``[..., K]`` and output ``out``: ``2 * numel(out) * K``."""
    return 2 * math.prod(out) * a[-1]


def linear_flops(x: Shape, weight: Shape):
    """``linear(x, weight)``: ``x`` ``[..., K]`` times ``weight`` ``[N, K]`` (or ``[K]``)."""
    return 2 * math.prod(x[:-1]) * x[-1] * (weight[0] if len(weight) == 2 else 1)


def attention_flops(q: Shape, k: Shape, v: Shape):
    """SDPA with q ``[..., H, Sq, Dqk]``, k ``[..., Hk, Sk, Dqk]``, v ``[..., Hk, Sk, Dv]`` (GQA
    repeats k/v over H)."""
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def window_attention_flops(q: Sequence[int], v: Sequence[int], window: int, block: int | None = None, *,
                           grid: Sequence[int] | None = None, tile: Sequence[int] | None = None) -> int:
    """:func:`ditopt.runtime.window_attention.window_attention` on q ``[..., S, Dqk]`` and v
    ``[..., S, Dv]`` (ints): each query block of ``block`` tokens (the kernel's default for the
    window) against ``window`` keys, padded queries included; full attention where the window
    covers the sequence.

    A per-axis window (:class:`~ditopt.runtime.window_attention.GridWindow`) counts
    :func:`~ditopt.runtime.window_attention.grid_window_attention`: with the token ``grid`` (wherever
    it sits in the sequence), its ``T`` tokens against the window box (clamped to the grid) and the ``E`` tokens
    outside it, the ``E`` others against all ``S``; without ``grid`` (the cost model, which does not
    look for it) the sequence is taken for the grid, ``S x min(volume, S)``.

    >>> q = (1, 2, 1024, 64)
    >>> window_attention_flops(q, q, 128) / attention_flops(q, q, q)
    0.125
    >>> window_attention_flops((1, 2, 1000, 64), (1, 2, 1000, 64), 128)   # 1000 queries padded to 63 blocks of 16
    66060288
    >>> from ditopt.runtime.window_attention import GridWindow
    >>> q = (1, 2, 16 * 32 * 32, 64)
    >>> attention_flops(q, q, q) / window_attention_flops(q, q, GridWindow((4, 8, 8)), grid=(16, 32, 32))
    64.0
    >>> window_attention_flops((1, 1, 10 + 48, 8), (1, 1, 58, 8), GridWindow((2, 2, 2)), grid=(3, 4, 4))
    46208
    """
    from ditopt.runtime.window_attention import GridWindow, grid_tiles, window_block

    tokens = int(q[-2])
    if isinstance(window, GridWindow):
        if grid is None:
            return 2 * math.prod(q[:-1]) * min(int(window), tokens) * (q[-1] + v[-1])
        box, _ = grid_tiles(grid, window.sizes, tile)  # the tile changes no FLOPs; it is checked
        if tuple(box) == tuple(grid):
            return attention_flops(q, q, v)
        count = math.prod(grid)
        extra = tokens - count
        return 2 * math.prod(q[:-2]) * (count * (math.prod(box) + extra) + extra * tokens) * (q[-1] + v[-1])
    if window >= tokens:
        return attention_flops(q, q, v)
    block = block or window_block(window)
    return 2 * math.prod(q[:-2]) * math.ceil(tokens / block) * block * window * (q[-1] + v[-1])


def attention_calls(nodes: Iterable[fx.Node], expr_of: Callable = int) -> tuple[tuple[tuple, tuple], ...]:
    """``(q shape, v shape)`` of each ``scaled_dot_product_attention`` call among ``nodes`` (what the
    ``window`` action rewrites), sizes through ``expr_of``."""
    return tuple((node_shape(_operand(n, 0, "query"), expr_of), node_shape(_operand(n, 2, "value"), expr_of))
                 for n in nodes if n.op == "call_function" and n.target is _F.scaled_dot_product_attention)


def conv_flops(x: Shape, weight: Shape, out: Shape, transposed: bool = False):
    """Convolution of ``x`` ``[B, C_in, ...]`` with ``weight`` ``[C_out, C_in/groups, *kernel]``
    (transposed: ``[C_in, C_out/groups, *kernel]``) giving ``out``."""
    c_out, c_in, *kernel = (weight[1], weight[0], *weight[2:]) if transposed else weight
    spatial = (x if transposed else out)[2:]
    return 2 * x[0] * math.prod(spatial) * c_out * c_in * math.prod(kernel)


def _conv_transpose_flops(x: Shape, weight: Shape, out: Shape):
    return conv_flops(x, weight, out, transposed=True)


# -- a graph node's FLOPs ----------------------------------------------------------------------

_F = torch.nn.functional
_OUT = None  # an operand that is the node's own value
# (targets: functions by identity, methods by name; formula; its operands as (position, keyword))
_NODE_RULES: list[tuple[tuple[Any, ...], Callable, tuple[tuple[int, str] | None, ...]]] = [
    ((torch._C._nn.linear, _F.linear, "linear"), linear_flops, ((0, "input"), (1, "weight"))),
    ((torch.matmul, torch.bmm, torch.mm, operator.matmul, "matmul", "bmm", "mm", "__matmul__"), matmul_flops,
     ((0, "input"), _OUT)),
    ((torch.addmm, "addmm"), matmul_flops, ((1, "mat1"), _OUT)),  # the added input is not counted
    ((torch.baddbmm, "baddbmm"), matmul_flops, ((1, "batch1"), _OUT)),
    ((_F.scaled_dot_product_attention,), attention_flops, ((0, "query"), (1, "key"), (2, "value"))),
    ((torch.conv1d, torch.conv2d, torch.conv3d, _F.conv1d, _F.conv2d, _F.conv3d), conv_flops,
     ((0, "input"), (1, "weight"), _OUT)),
    ((torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
      _F.conv_transpose1d, _F.conv_transpose2d, _F.conv_transpose3d), _conv_transpose_flops,
     ((0, "input"), (1, "weight"), _OUT)),
]


def node_shape(x: Any, expr_of: Callable = int) -> tuple | None:
    """The shape of a node's tensor value (``meta["example_value"]``), each size through
    ``expr_of``; None when ``x`` is not a node with a tensor value."""
    v = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(expr_of(d) for d in v.shape)


def _is_target(node: fx.Node, targets: tuple[Any, ...]) -> bool:
    if node.op == "call_method":
        return node.target in targets
    return any(node.target is t for t in targets if not isinstance(t, str))


def node_flops(node: fx.Node, expr_of: Callable = int) -> sympy.Expr:
    """FLOPs of one call of ``node`` as FlopCounterMode counts them; 0 for ops it does not count.

    ``expr_of`` turns a size (int or SymInt) into an int or a sympy expression.
    """
    if node.op not in ("call_function", "call_method"):
        return sympy.Integer(0)
    for targets, formula, operands in _NODE_RULES:
        if _is_target(node, targets):
            shapes = [node_shape(node if o is _OUT else _operand(node, *o), expr_of) for o in operands]
            return sympy.sympify(formula(*shapes)) if all(shapes) else sympy.Integer(0)
    return sympy.Integer(0)


def _operand(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


# -- what modules cost when they run -------------------------------------------------------------

# FlopCounterMode has formulas for SDPA's CUDA kernels only; on CPU the default (flash) kernel
# would count as 0 FLOPs and attention's QK/AV matmuls would be missing from every total.
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


CPU_KERNELS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


class ModuleCost:
    """FLOPs (under :meth:`counting`) and seconds (under :meth:`timing`) spent inside each of
    ``names`` (module paths of ``model``), summed over calls; ``calls`` counts the calls."""

    def __init__(self, model, names: Iterable[str]):
        self.modules = {n: model.get_submodule(n) for n in names}
        self.flops = {n: 0 for n in self.modules}
        self.seconds = {n: 0.0 for n in self.modules}
        self.calls = {n: 0 for n in self.modules}

    @contextlib.contextmanager
    def _hooked(self, read: Callable[[], float], into: dict):
        starts: dict[str, list[float]] = {n: [] for n in self.modules}

        def post(n):
            into[n] += read() - starts[n].pop()
            self.calls[n] += 1

        handles = []
        for n, m in self.modules.items():
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: starts[n].append(read())))
            handles.append(m.register_forward_hook(lambda mod, a, o, n=n: post(n)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def counting(self):
        """Count FLOPs (matmul-like ops, attention, convolution: FlopCounterMode's set, plus
        SDPA's CPU flash kernel, which FlopCounterMode leaves out)."""
        counter = FlopCounterMode(display=False, custom_mapping=CPU_KERNELS)
        with counter, self._hooked(counter.get_total_flops, self.flops):
            yield self
        self.total_flops = counter.get_total_flops()  # everything counted, inside the modules or not

    @contextlib.contextmanager
    def timing(self):
        """Measure wall time inside each module."""
        with self._hooked(time.perf_counter, self.seconds):
            yield self

    def per_call(self, what: dict) -> dict:
        return {n: what[n] / max(self.calls[n], 1) for n in what}

    def total(self) -> int:
        return sum(self.flops.values())


@contextlib.contextmanager
def graph_flops(gm: torch.nn.Module, *, math_sdpa: bool = False):
    """Yields a list that gets the FLOPs of each call of ``gm`` (a rewritten graph module), counted
    by FlopCounterMode entered around the call itself, so that dynamo's frame outside never sees a
    dispatch mode. ``math_sdpa`` runs SDPA's math kernel, which the counter sees through."""
    per_call, active = [], []

    def enter(module, args):
        active[:] = ([sdpa_kernel(SDPBackend.MATH)] if math_sdpa else []) + [
            FlopCounterMode(display=False, custom_mapping=CPU_KERNELS)]
        for mode in active:
            mode.__enter__()

    def leave(module, args, out):
        for mode in reversed(active):
            mode.__exit__(None, None, None)
        per_call.append(active[-1].get_total_flops())

    hooks = [gm.register_forward_pre_hook(enter), gm.register_forward_hook(leave)]
    try:
        yield per_call
    finally:
        for h in hooks:
            h.remove()
