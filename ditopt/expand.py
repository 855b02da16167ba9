"""Expanding marked blocks' calls: each kind of block traced once, called per block.

:func:`expand_block_calls` (the backend's first step) replaces every :func:`~ditopt.marks.block_call`
node of a captured graph by an ``invoke_subgraph`` call of its kind's subgraph, traced once by
dynamo with the first such block alone (:func:`_trace_template`), with the block's own weights as
extra graph inputs (:class:`BlockInputs`). See :mod:`ditopt.regional`.
"""

from __future__ import annotations

import operator
import re
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._lazy_graph_module import _LazyGraphModule

from .capture import module_path
from .errors import DitoptError
from .marks import (_BLOCKS, _FORCED, RegionalError, _base_class, _fresh, _leaf_signature, block_call, fake_like,
                    traced_signature)

INVOKE = torch.ops.higher_order.invoke_subgraph


def _raw(value):
    return value[0] if isinstance(value, tuple) else value


# -- expanding the block calls -----------------------------------------------------------------

_SOURCE_PART = re.compile(r"\['([^']+)'\]|\[(\d+)\]|\.(\w+)")


def _attribute_chain(source: str) -> list[str]:
    """``L['self']._modules['block']._modules['attn']._parameters['weight']`` -> ``['attn', 'weight']``:
    the attributes reaching a tensor from the template's block (dynamo's source of a lifted input)."""
    rest = source[len("L['self']"):]
    parts = [next(g for g in m.groups() if g is not None) for m in _SOURCE_PART.finditer(rest)]
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers", "__dict__")]
    if not parts or parts[0] != "block":
        raise RegionalError(f"a marked block reads a tensor that is not its own ({source})")
    return parts[1:]


@dataclass
class _Template:
    """One block traced once by dynamo, as a subgraph: placeholders are the tensor leaves of the
    block's inputs (``leaf_index``: which leaf each is), then the tensors it reads from the block
    (``weights``: the attribute chain from the block to each); outputs are the tensor leaves of
    what the block returns (``out``: per leaf of ``out_spec``, its output index, or the constant)."""

    gm: fx.GraphModule
    leaf_index: list[int]
    weights: list[list[str]]
    out_spec: object
    out: list
    uses: list = field(default_factory=list)
    name: str = ""
    strides: list = field(default_factory=list)  # per placeholder of ``leaf_index``: the strides it was traced on


def _source_name(node: fx.Node) -> str:
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else str(name)


class _Traced(Exception):
    """Raised by the template's capturing backend once it holds the graph (ends dynamo's work there)."""


def _capture_alone(block: torch.nn.Module, leaves: list, spec, grad: bool) -> fx.GraphModule:
    """Dynamo's graph of ``block`` called alone on real tensors shaped like the fake ``leaves``
    (the other leaves are constants): capture only (no guards, no run). Its inputs are
    ``L['inputs'][i]`` (the tensor leaves in order) and the block's own tensors (``L['self'].block...``);
    it returns the tensor leaves of the block's outputs, in order. ``grad``: the grad mode of the
    model's trace (whether the call's outputs require grad)."""
    base = _base_class(block).forward
    values = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device)
            values.append(t.normal_() if t.is_floating_point() else t.zero_())
        else:
            values.append(v)
    positions = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]

    def forward(self, *inputs):
        vals = list(values)
        for i, t in zip(positions, inputs):
            vals[i] = t
        args, kwargs = pytree.tree_unflatten(vals, spec)
        out = _fresh(base(self.block, *args, **kwargs), args, kwargs)
        return tuple(o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))

    code = forward.__code__.replace(co_name=f"template_of_{type(block).__name__}")  # a fresh code object: its own dynamo cache
    root = torch.nn.Module()
    root.block = block
    root.forward = types.MethodType(types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__), root)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        raise _Traced  # the graph is all we want: no guards, no run

    before = getattr(_FORCED, "on", False)
    _FORCED.on = False  # the block itself, traced inline
    try:
        with torch.set_grad_enabled(grad):
            torch._dynamo.optimize(record, nopython=True, dynamic=False)(root.forward)(*(values[i] for i in positions))
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        if not isinstance(getattr(exc, "inner_exception", None), _Traced):
            raise
    finally:
        _FORCED.on = before
    if len(graphs) != 1:
        raise RegionalError(f"the marked block {type(block).__name__} was traced as {len(graphs)} graphs, expected 1")
    return graphs[0]


def _trace_template(block: torch.nn.Module, leaves: list, spec, caller: dict, returned, fake=None) -> _Template:
    """Trace ``block`` alone with dynamo on real tensors shaped like ``leaves`` (the fake input
    leaves of its call; the other leaves are constants; ``returned``: the call's fake outputs), and make the subgraph of it, its module
    stacks those of a subgraph traced inside ``caller`` (the calling node's module stack)."""
    grad = any(t.requires_grad for t in pytree.tree_leaves(returned) if isinstance(t, torch.Tensor))
    traced = _capture_alone(block, leaves, spec, grad)
    graph, env = fx.Graph(), {}
    weights: list[list[str]] = []
    inputs, lifted = [], []
    index = re.compile(r"^L\['inputs'\]\[(\d+)\]$")
    for ph in traced.graph.find_nodes(op="placeholder"):
        name = _source_name(ph)
        m = index.match(name)
        if m:
            inputs.append((int(m.group(1)), ph))
        elif name.startswith("L['self']"):
            lifted.append((_attribute_chain(name), ph))
        else:
            raise RegionalError(f"the marked block {type(block).__name__} reads an input that is neither its argument "
                              f"nor its own tensor ({name}): leave it unmarked")
    inputs.sort(key=lambda p: p[0])
    caller_raw = _raw(list(caller.values())[-1]) if caller else ""

    def rerooted(stack: dict) -> dict:
        new = dict(caller)
        for key, value in (stack or {}).items():
            raw, typ = value if isinstance(value, tuple) else (value, "")
            path = module_path(str(raw))
            rel = path[len("block"):].lstrip(".") if path == "block" or path.startswith("block.") else path
            new[key] = (f"{caller_raw}.{rel}" if rel else caller_raw, typ)
        return new

    for _, ph in inputs + lifted:
        new = graph.placeholder(ph.name, type_expr=ph.type)
        new.meta = {**ph.meta, "nn_module_stack": dict(caller)}
        _refake(new, fake)
        env[ph] = new
    weights = [chain for chain, _ in lifted]
    results = traced.graph.output_node().args[0]
    results = results if isinstance(results, (tuple, list)) else (results,)
    for n in traced.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        new = graph.node_copy(n, env.__getitem__)
        new.meta = {**n.meta, "nn_module_stack": rerooted(n.meta.get("nn_module_stack"))}
        _refake(new, fake)
        env[n] = new
    leaves_out, out_spec = pytree.tree_flatten(returned)
    if len(results) != sum(isinstance(o, torch.Tensor) for o in leaves_out):
        raise RegionalError(f"the marked block {type(block).__name__} returns one tensor twice: leave it unmarked")
    outputs, out, k = [env[r] for r in results], [], 0
    for o in leaves_out:  # per output leaf: its index among the subgraph's outputs, or the constant
        out.append(k if isinstance(o, torch.Tensor) else ("const", o))
        k += isinstance(o, torch.Tensor)
    graph.output(tuple(outputs))
    positions = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    index = [positions[i] for i, _ in inputs]
    return _Template(_LazyGraphModule(traced, graph), index, weights, out_spec, out,
                     strides=[tuple(leaves[i].stride()) for i in index])


def _refake(node: fx.Node, fake) -> None:
    """``node``'s example value (tensors in it) remade in the fake mode ``fake``, same metadata."""
    value = node.meta.get("example_value")
    if fake is None or value is None:
        return

    def remake(v):
        if not isinstance(v, torch.Tensor):
            return v
        grad = v.requires_grad and v.is_floating_point()
        return fake_like(fake, v.shape, v.stride(), v.dtype, v.device, grad)

    node.meta["example_value"] = pytree.tree_map(remake, value)


@dataclass
class BlockInputs:
    """The tensors the expanded block calls read from the blocks (their weights): placeholders the
    expansion added after the graph's own inputs, read from the modules at every call (held
    weakly: the model owns them)."""

    owners: list = field(default_factory=list)
    names: list = field(default_factory=list)
    fakes: list = field(default_factory=list)

    def values(self) -> list:
        out = []
        for ref, name in zip(self.owners, self.names):
            owner = ref()
            if owner is None:
                raise DitoptError("the model whose blocks this graph calls was freed")
            out.append(getattr(owner, name))
        return out

    def __len__(self) -> int:
        return len(self.names)


def expand_block_calls(gm: fx.GraphModule, example_inputs: list) -> BlockInputs:
    """Replace each ``block_call`` node of ``gm`` by a call of its block's subgraph (in place).

    Blocks alike (:func:`block_signature`) called with inputs alike (shapes, strides, dtypes,
    devices, the same constants) share one subgraph, traced once by dynamo on the first of them
    (:func:`_trace_template`); each call is an ``invoke_subgraph`` of it with the block's own
    weights, read through placeholders added after the graph's inputs (returned: the caller passes
    ``BlockInputs.values()`` after the graph's own arguments). A subgraph called once is inlined.
    The result is the graph dynamo gives for blocks marked as nested compile regions, without
    dynamo tracing or matching each block."""
    from torch._guards import detect_fake_mode

    found = BlockInputs()
    nodes = list(gm.graph.find_nodes(op="call_function", target=block_call))
    if not nodes:
        return found
    fake = _graph_fake_mode(gm) or detect_fake_mode(example_inputs)
    graph = gm.graph
    placeholders = graph.find_nodes(op="placeholder")
    last = placeholders[-1]
    known = {}  # id(tensor) -> the placeholder that carries it (dynamo's, then ours)
    for ph in placeholders:
        example = getattr(ph.meta.get("grapharg"), "example", None)
        if isinstance(example, torch.Tensor):
            known[id(example)] = ph
    templates: dict[tuple, _Template] = {}
    for node in nodes:
        block = _BLOCKS.get(node.args[0])
        if block is None:
            raise RegionalError(f"{node.name}: the marked block it calls was unmarked or freed")
        leaves, spec = pytree.tree_flatten((node.args[1:], dict(node.kwargs)))
        metas = [v.meta["example_value"] if isinstance(v, fx.Node) else v for v in leaves]
        if any(isinstance(m, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in (*m.shape, *m.stride()))
               for m in metas):
            raise RegionalError(f"{node.name}: a marked block called with dynamic shapes; compile with dynamic=False "
                              f"(or leave the blocks unmarked)")
        caller = dict(node.meta.get("nn_module_stack") or {})
        template = _template_for(templates, block, metas, spec, caller, node.meta["example_value"], fake)
        if not template.name:
            template.name = f"repeated_block{len({id(t) for t in templates.values()}) - 1}"
            setattr(gm, template.name, template.gm)
        weights = []
        for chain in template.weights:
            owner = block
            for part in chain[:-1]:
                owner = getattr(owner, part)
            tensor = getattr(owner, chain[-1])
            if id(tensor) in known:  # the graph reads it already (a block's weight the model uses outside it too)
                weights.append(known[id(tensor)])
                continue
            kind = ("parameters" if chain[-1] in owner._parameters else "buffers" if chain[-1] in owner._buffers
                    else "attribute")  # named as dynamo names a lifted weight (what regions.is_param reads)
            with graph.inserting_after(last):
                last = graph.placeholder(f"{node.name}_{'_'.join(chain[:-1])}_{kind}_{chain[-1]}")
            last.meta["example_value"] = _like(tensor, fake)
            found.owners.append(weakref.ref(owner))
            found.names.append(chain[-1])
            found.fakes.append(last.meta["example_value"])
            weights.append(last)
            known[id(tensor)] = last
        with graph.inserting_before(node):
            args = [_as_traced(graph, leaves[i], metas[i], stride, caller, fake)
                    for i, stride in zip(template.leaf_index, template.strides)]
            getter = graph.get_attr(template.name)
            getter.meta["nn_module_stack"] = caller
            call = graph.call_function(INVOKE, (getter, template.name, *args, *weights))
        call.meta = {k: v for k, v in node.meta.items() if k != "example_value"}
        # the call's outputs are the opaque node's (made in the model's trace, with its grad mode)
        call.meta["example_value"] = tuple(o for o in pytree.tree_leaves(node.meta["example_value"])
                                           if isinstance(o, torch.Tensor))
        template.uses.append(call)
        _reroute_outputs(node, call, template)
        graph.erase_node(node)
    kinds = list({id(t): t for t in templates.values()}.values())
    once = {t.uses[0].name for t in kinds if len(t.uses) == 1}
    gm.recompile()
    if once:
        from .regional import inline_calls

        inline_calls(gm, only=once)
        for t in kinds:
            if len(t.uses) == 1:
                delattr(gm, t.name)
    return found


def _template_for(templates: dict, block, metas: list, spec, caller: dict, returned, fake) -> "_Template":
    """The subgraph a call of ``block`` with input leaves ``metas`` uses, traced on first need.

    A kind of block is traced on contiguous inputs: a call whose input tensors have other strides
    (the first block of a DiT reads the patch embedding's transposed output) then takes contiguous
    copies of them and shares that subgraph, provided the block returns the same shapes and strides
    either way; else it gets a subgraph of its own, traced on its strides as they are."""
    signature = traced_signature(block, fake)
    exact = (signature, str(spec), tuple(_leaf_signature(m) for m in metas))
    if exact in templates:
        return templates[exact]
    dense = [_contiguous_like(m, fake) for m in metas]
    key = (signature, str(spec), tuple(_leaf_signature(m) for m in dense))
    template = templates.get(key)
    if template is None:
        template = templates[key] = _trace_template(block, dense, spec, caller, returned, fake)
    if key != exact and not _returns_alike(template, returned):
        template = _trace_template(block, metas, spec, caller, returned, fake)
    templates[exact] = template
    return template


def _contiguous_like(value, fake):
    """A tensor leaf as a contiguous tensor of its shape, dtype and device (itself if it is one)."""
    if not isinstance(value, torch.Tensor) or value.is_contiguous():
        return value
    grad = value.requires_grad and value.is_floating_point()
    if fake is None:
        return torch.empty(value.shape, dtype=value.dtype, device=value.device).requires_grad_(grad)
    return fake_like(fake, value.shape, torch.empty(value.shape, device="meta").stride(), value.dtype, value.device, grad)


def _returns_alike(template: "_Template", returned) -> bool:
    """Does the template's subgraph return tensors of the shapes and strides of ``returned`` (the
    fake outputs of the block's call on its inputs as they are)?"""
    outputs = template.gm.graph.output_node().args[0]
    got = [o.meta.get("example_value") for o in outputs]
    want = [o for o in pytree.tree_leaves(returned) if isinstance(o, torch.Tensor)]
    return len(got) == len(want) and all(
        isinstance(g, torch.Tensor) and g.shape == w.shape and g.stride() == w.stride() for g, w in zip(got, want))


def _as_traced(graph: fx.Graph, leaf, meta, stride, caller: dict, fake):
    """The argument ``leaf`` (a node with example value ``meta``) as the subgraph was traced on it:
    a contiguous copy where the subgraph was traced on contiguous strides and ``meta`` has others."""
    if not isinstance(meta, torch.Tensor) or tuple(meta.stride()) == tuple(stride):
        return leaf
    copy = graph.call_method("contiguous", (leaf,))
    copy.meta = {"nn_module_stack": dict(caller), "example_value": _contiguous_like(meta, fake)}
    return copy


def _like(tensor: torch.Tensor, fake):
    """A fake tensor of ``fake`` with ``tensor``'s metadata (a new one: faster than
    ``fake.from_tensor``, which memoises every tensor it sees), or ``tensor`` without a fake mode."""
    if fake is None:
        return tensor
    return fake_like(fake, tensor.shape, tensor.stride(), tensor.dtype, tensor.device,
                     tensor.requires_grad and tensor.is_floating_point())


def _graph_fake_mode(gm: fx.GraphModule):
    """The fake mode of the example values in ``gm`` (dynamo's tracing mode), or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    for n in gm.graph.nodes:
        value = n.meta.get("example_value")
        if isinstance(value, FakeTensor):
            return value.fake_mode
    return None


def _reroute_outputs(node: fx.Node, call: fx.Node, template: _Template) -> None:
    """Give the uses of the opaque ``node``'s outputs the call's (a getitem per tensor output)."""
    graph = call.graph

    def leaf(i: int):
        where = template.out[i]
        if isinstance(where, tuple):
            return where[1]
        with graph.inserting_after(call):
            item = graph.call_function(operator.getitem, (call, where))
        item.meta = {**call.meta, "example_value": call.meta["example_value"][where]}
        return item

    spec = template.out_spec
    if spec.num_children == 0 or spec.is_leaf():
        node.replace_all_uses_with(leaf(0))
        return
    if any(not child.is_leaf() for child in spec.children()):
        raise DitoptError(f"{node.name}: a marked block that returns a nested structure ({spec}); leave it unmarked")
    for user in list(node.users):
        if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise DitoptError(f"{node.name}: a use of a marked block's outputs that is not an index ({user.format_node()})")
        value = leaf(user.args[1])
        if isinstance(value, fx.Node):
            user.replace_all_uses_with(value)
        else:  # a constant output (None): its uses take the constant
            for consumer in list(user.users):
                consumer.args = fx.map_arg(consumer.args, lambda n: value if n is user else n)
                consumer.kwargs = fx.map_arg(consumer.kwargs, lambda n: value if n is user else n)
        graph.erase_node(user)


def has_block_calls(gm: fx.GraphModule) -> bool:
    """Does ``gm`` hold opaque calls of marked blocks (:func:`block_call`) to expand?"""
    return bool(gm.graph.find_nodes(op="call_function", target=block_call))


__all__ = ["BlockInputs", "expand_block_calls", "has_block_calls"]
