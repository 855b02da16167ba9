"""The dataflow facts site finding rests on: what a graph node is, and what a region of nodes reads
and writes.

- **node classes**: parameters (:func:`is_param`), matmul-like ops (:func:`is_matmul`), attention
  ops (:func:`is_attention_op`: a kernel call, a softmax between two matmuls, or the second of two
  chained matmuls of activations: linear attention), and a node's
  shape and dtype (:func:`tensor_meta`);
- **regions**: the inputs (nodes outside used inside) and live-outs (nodes inside used outside)
  of a set of nodes (:func:`region_of`), whether each live-out is a residual update
  ``out = in + delta`` of an input (:func:`residual_inputs`), and whether the region can become
  one ``cond`` (:func:`extractable`).

:mod:`ditopt.sites` builds the sites from these and re-exports the public names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

from .capture import is_size_arithmetic, module_stack

# Ops a residual stream passes through unchanged in value (up to dtype).
_PASS_THROUGH = {"float", "to", "type_as", "contiguous", "type", "half", "bfloat16", "clone"}
_ADDS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_"}
_MATMULS = {
    torch._C._nn.linear, torch.nn.functional.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.mm,
    torch.addmm, operator.matmul, "matmul", "bmm", "mm", "linear",
}


# -- node classification -------------------------------------------------------------------

def target_name(node: fx.Node) -> str:
    """The op's name: a method name as is, a function by its ``__name__``."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def is_param(node: fx.Node) -> bool:
    """Parameters and buffers: dynamo lifts them to placeholders, symbolic_trace uses get_attr."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None) if grapharg is not None else None
    if isinstance(example, torch.nn.Parameter):
        return True
    return "_parameters_" in node.name or "_buffers_" in node.name


def is_attention_op(node: fx.Node) -> bool:
    """An attention kernel call, a softmax between two matmuls (hand-written attention), or the
    last matmul of a linear attention (:func:`_linear_attention_scores`)."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = target_name(node)
    if "scaled_dot_product_attention" in name or "flash_attn" in name or name.startswith("attention"):
        return True
    if name == "softmax":
        src = node.args[0] if node.args else None
        fed_by = isinstance(src, fx.Node) and _score_matmul(src) is not None
        return fed_by and _feeds_matmul(node)
    return _linear_attention_scores(node) is not None


# what may stand between a softmax and the matmul of its probabilities (a cast back from an
# upcast softmax, as diffusers' AttnProcessor does; dropout; a copy), or between the two matmuls
# of a linear attention
_BETWEEN_MATMULS = _PASS_THROUGH | {"dropout", "_to_copy"}


def _feeds_matmul(node: fx.Node, depth: int = 3) -> bool:
    for user in node.users:
        if user.target in _MATMULS or target_name(user) in _MATMULS:
            return True
        if depth > 0 and target_name(user) in _BETWEEN_MATMULS and user.args and user.args[0] is node \
                and _feeds_matmul(user, depth - 1):
            return True
    return False


def _score_matmul(node: fx.Node, depth: int = 4) -> fx.Node | None:
    """The matmul a softmax's scores come from (through a scale, a mask, a cast), if any."""
    for _ in range(depth):
        if node.target in _MATMULS or target_name(node) in _MATMULS:
            return node
        nxt = [a for a in node.all_input_nodes if not is_param(a)]
        if not nxt:
            return None
        node = nxt[0]
    return None


def _activation_matmul(node: fx.Node) -> bool:
    """A matmul of two activations (neither a weight)."""
    if node.op == "call_module" or not is_matmul(node):
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(operands) == 2 and not any(is_param(a) for a in operands)


def _linear_attention_scores(node: fx.Node) -> fx.Node | None:
    """For the last matmul of a linear attention (Sana's ``(v k^T) q``: two matmuls of
    activations, the first's product read by the second through casts only, no softmax), that
    first matmul; else None."""
    if not _activation_matmul(node):
        return None
    src = node.args[0]
    for _ in range(3):
        if _activation_matmul(src):
            return src
        if target_name(src) not in _BETWEEN_MATMULS or not src.args or not isinstance(src.args[0], fx.Node):
            return None
        src = src.args[0]
    return None


def attention_query_key(op: fx.Node) -> tuple:
    """The query and key arguments of an attention op: an attention kernel's first two, or the
    two operands of the matmul a hand-written attention's softmax scores come from
    (``baddbmm(bias, q, k^T)`` takes them second and third)."""
    scores = _linear_attention_scores(op)
    if scores is not None:  # (v k^T) q: the query is the last matmul's second operand, the keys the first's
        return op.args[1], scores
    if target_name(op) != "softmax":
        return (op.args[0] if op.args else op.kwargs.get("query"),
                op.args[1] if len(op.args) > 1 else op.kwargs.get("key"))
    mm = _score_matmul(op.args[0]) if op.args and isinstance(op.args[0], fx.Node) else None
    if mm is None:
        return None, None
    operands = [a for a in mm.args if isinstance(a, fx.Node)]
    if target_name(mm) in ("baddbmm", "addmm", "addbmm") and len(operands) >= 3:
        operands = operands[1:]
    return (operands[0], operands[1]) if len(operands) >= 2 else (None, None)


_MATMUL_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "LoRACompatibleLinear")


def is_matmul(node: fx.Node) -> bool:
    if node.op == "call_module":  # symbolic_trace keeps leaf modules as calls
        stack = module_stack(node)
        typ = stack[-1][2] if stack else ""
        return getattr(typ, "__name__", str(typ)) in _MATMUL_MODULES
    return node.op in ("call_function", "call_method") and (node.target in _MATMULS or target_name(node) in _MATMULS)


def tensor_meta(node: fx.Node):
    """Shape and dtype of a node's value, from dynamo's example value or ShapeProp."""
    for key in ("example_value", "val"):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            return tuple(v.shape), v.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape), tm.dtype
    return None


def same_shape(a, b) -> bool:
    """Whether two shapes are known equal without a guard: a size known only at run time (a
    mask's count, HunyuanVideo-Framepack's text tokens) equals only itself."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def same_meta(a, b) -> bool:
    """Whether two :func:`tensor_meta` results are known equal (shape, dtype) without a guard."""
    return a is not None and b is not None and a[1] == b[1] and same_shape(a[0], b[0])


# -- region analysis -------------------------------------------------------------------------

@dataclass
class Region:
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    live_outs: list[fx.Node]


def region_of(nodes: list[fx.Node]) -> Region:
    """Inputs (nodes outside used inside) and live-outs (nodes inside used outside). Size
    arithmetic that reads only sizes of what enters (:func:`ditopt.capture.is_size_arithmetic`)
    is left outside: the region takes it as an input and does not hand it on."""
    members = set(nodes)
    free: set[fx.Node] = set()
    for n in nodes:
        if is_size_arithmetic(n) and all(a not in members or a in free for a in n.all_input_nodes):
            free.add(n)
    nodes = [n for n in nodes if n not in free]
    members -= free
    inputs: dict[fx.Node, None] = {}
    live_outs: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members:
                inputs[a] = None
        if any(u not in members for u in n.users):
            live_outs[n] = None
    return Region(list(nodes), list(inputs), list(live_outs))


def _on_residual_chain(out: fx.Node, candidate: fx.Node, members: set[fx.Node], depth: int = 16) -> bool:
    """Is ``out`` = ``candidate`` + something, through adds and dtype casts inside the region?"""
    frontier = [out]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n is candidate:
                return True
            if n not in members:
                continue
            name = target_name(n)
            if n.target in _ADDS or name in _ADDS:
                nxt.extend(a for a in n.args if isinstance(a, fx.Node))
            elif name in _PASS_THROUGH and n.args and isinstance(n.args[0], fx.Node):
                nxt.append(n.args[0])
        if not nxt:
            return False
        frontier = nxt
    return False


def residual_inputs(region: Region, order: dict[fx.Node, int] | None = None) -> tuple[list[fx.Node | None], bool]:
    """For each live-out, the region input it is a residual update of (or None).

    Candidates are the data inputs with the live-out's shape and dtype; one on an add chain
    to the live-out wins. A region with one live-out, none on a chain and several candidates
    takes, given the graph's ``order``, the one produced last: the stream the previous block
    handed on, not a long skip from an earlier block (HunyuanDiT's later blocks mix both through
    a linear before their adds). Several live-outs alike stay unpaired: order cannot pair them.
    Returns the inputs and whether every live-out is in residual form.
    """
    members = set(region.nodes)
    data_inputs = [i for i in region.inputs if not is_param(i) and tensor_meta(i) is not None]
    chosen: list[fx.Node | None] = []
    all_residual = True
    taken: set[fx.Node] = set()
    for out in region.live_outs:
        meta = tensor_meta(out)
        candidates = [i for i in data_inputs if same_meta(tensor_meta(i), meta) and i not in taken]
        on_chain = [c for c in candidates if _on_residual_chain(out, c, members)]
        if on_chain:
            pick = on_chain[0]
        else:
            all_residual = False
            pick = candidates[0] if len(candidates) == 1 else None
            if len(candidates) > 1 and len(region.live_outs) == 1 and order is not None:
                pick = max(candidates, key=order.__getitem__)
        if pick is not None:
            taken.add(pick)
        chosen.append(pick)
    return chosen, all_residual and bool(region.live_outs)


def extractable(region: Region, order: dict[fx.Node, int]) -> tuple[bool, str]:
    """Can the region become one cond placed at its last node? (a check, not a rewrite)"""
    last = max(order[n] for n in region.nodes)
    for out in region.live_outs:
        if tensor_meta(out) is None:
            return False, f"live-out {out.name} is not a tensor"
        unknown = [d for d in tensor_meta(out)[0] if free_unbacked_symbols(d)]
        if unknown:  # its cache could not be sized (a count read from a mask: HunyuanVideo-Framepack's text)
            return False, f"live-out {out.name} has a size known only at run time ({unknown[0]})"
        for user in out.users:
            if user not in region.nodes and order[user] < last:
                return False, f"live-out {out.name} is used by {user.name} before the region ends"
    for i in region.inputs:
        if not is_param(i) and tensor_meta(i) is None and i.op != "placeholder" and not is_size_arithmetic(i):
            return False, f"input {i.name} is not a tensor"
    return True, ""
