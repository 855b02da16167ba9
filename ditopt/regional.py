"""Regional compilation: trace and compile a model's repeated block once, reuse it for every block.

Inductor compiles a 30-block DiT as one graph of 30 copies of the same block. Marking the
block's forward with ``torch.compiler.nested_compile_region`` makes dynamo trace the block once
and emit one call per block (``invoke_subgraph``) of one shared subgraph, which inductor then
compiles once. :func:`mark_repeated_blocks` marks the blocks of one model instance (never their
class); the ditopt backend keeps a marked block one shared call wherever the plan treats the
block as a whole, and inlines it where the plan reaches inside it.

What the backend does with a graph holding such calls (:func:`split_regions`):

1. every call is inlined into a copy (:func:`inline_calls`), each inlined node's module path
   re-prefixed to the calling block's (the subgraph was traced in another block), so site
   finding and plan resolution see the graph an unmarked model gives: the same site names;
2. a call stays a call when no site the plan rewrites lies partly inside it, and no ``when`` rule
   watches a tensor inside it (only its outputs): block-level plans (FORA block level,
   TaylorSeer, First-Block-Cache, coalesced runs) keep every block but the ones that must be
   inlined; a plan that reuses attention or feed-forwards inlines the blocks it reaches into
   (correct, only the compile-time gain is lost); profiling inlines all;
3. the passes rewrite the graph with the kept calls, whose block sites are the call and the
   getitems of its outputs (:func:`regional_sites`); a skip branch holds the calls of the blocks
   it skips. ``ditopt.compiled_graph(m)`` keeps the inlined graph as ``original`` (where its
   ``sites`` are) and names the blocks kept as calls in ``rewritten.meta["ditopt_regions"]``;
4. under inductor each called subgraph is traced with inductor's decompositions wherever it is
   (:func:`decompose_calls_for_inductor`), and inductor generates its code once.

Known limit: dynamo refuses a region whose outputs alias its inputs or each other; the marked
forward clones such outputs (:func:`_fresh`: the two slices a single-stream block of Flux or
HunyuanVideo returns), one copy per block call.

The eager path (``ditopt.optimize``) runs the same graph as Python; a model that is not marked
gives a graph without calls, on which none of this happens.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import re
import threading
import time
import types
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
import torch.utils._pytree as pytree

from .capture import module_path
from .errors import CaptureError, DitoptError
from .regions import region_of
from .sites import SiteTable, find_sites

INVOKE = torch.ops.higher_order.invoke_subgraph

_MARKED: "weakref.WeakKeyDictionary[type, Callable]" = weakref.WeakKeyDictionary()  # one marked forward per class
_BLOCKS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()  # marked blocks by key
_KEYS = itertools.count()
_FORCED = threading.local()  # block_calls(): every compile sees the marked blocks as calls
_FAKE_OUTPUTS: dict = {}  # (block signature, input signature) -> the outputs' metadata (see block_call)


# -- marking the blocks of one model --------------------------------------------------------

def _marked_forward(cls: type) -> Callable:
    """The block class's forward as a marked block runs it, one per class: the class's forward,
    except while a ditopt backend's dynamo traces the model (:func:`_calls_wanted`), where the
    block becomes one opaque node, ``block_call(key, *args, **kwargs)``, that the backend expands
    (:func:`expand_block_calls`). A code object of its own per class, so the frames of two block
    classes never share dynamo's caches."""
    marked = _MARKED.get(cls)
    if marked is None:
        base = cls.forward

        def forward(self, *args, **kwargs):
            mark = self.__dict__.get("_ditopt_block")
            if mark is not None and torch.compiler.is_compiling() and _calls_wanted():
                return block_call(mark.key, *args, **kwargs)
            return base(self, *args, **kwargs)

        name = f"forward_of_{cls.__name__}_{id(cls):x}"
        code = forward.__code__.replace(co_name=name, co_qualname=name)
        marked = types.FunctionType(code, forward.__globals__, name, None, forward.__closure__)
        marked.__doc__, marked.__wrapped__ = base.__doc__, base
        _MARKED[cls] = marked
    return marked


class RegionalError(CaptureError):
    """A marked block could not be traced once and called per block (:func:`expand_block_calls`).
    ``ditopt.optimize``, which marks blocks by itself, then captures the model unmarked."""


class _Mark:
    """A marked block's key into the registry of marked blocks. A copy of the block (deepcopy,
    pickle) gets no mark: it runs unmarked rather than as the block the key names."""

    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key

    def __copy__(self):
        return None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


def _why_not_markable(module: torch.nn.Module) -> str | None:
    forward = getattr(type(module), "forward", None)
    if "forward" in module.__dict__:
        return "the instance already has its own forward (a hook?)"
    if not isinstance(forward, types.FunctionType):
        return "its class's forward is not a Python function"
    if hasattr(forward, "__marked_compile_region_fn__"):
        return "its class's forward is already a nested compile region"
    return None


def _mark(module: torch.nn.Module) -> None:
    module.__dict__["forward"] = types.MethodType(_marked_forward(type(module)), module)
    module.__dict__["_ditopt_block"] = mark = _Mark(next(_KEYS))
    _BLOCKS[mark.key] = module


def _is_marked(module: torch.nn.Module) -> bool:
    bound = module.__dict__.get("forward")
    return isinstance(bound, types.MethodType) and bound.__func__ is _MARKED.get(type(module))


def _unmark(module: torch.nn.Module) -> None:
    if _is_marked(module):
        del module.__dict__["forward"]
        mark = module.__dict__.pop("_ditopt_block", None)
        if mark is not None:
            _BLOCKS.pop(mark.key, None)


_HELD: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()  # optimize()'s marks, counted
_REFUSED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # blocks whose expansion failed: never held again
_HELD_LOCK = threading.Lock()


def hold_marks(model: torch.nn.Module) -> list:
    """Mark ``model``'s repeated blocks for an optimised wrapper (``ditopt.optimize``): counted,
    so that wrappers of one model share the marks and the last one released unmarks. Blocks the
    user marked are left to the user. Returns what :func:`release_marks` takes."""
    try:
        found = repeated_blocks(model)
    except Exception:  # a model whose modules cannot be walked: no marks
        return []
    held = []
    with _HELD_LOCK:
        for _, module in found:
            if module in _HELD:
                _HELD[module] += 1
            elif module in _REFUSED or _is_marked(module) or _why_not_markable(module) is not None:
                continue
            else:
                _mark(module)
                _HELD[module] = 1
            held.append(weakref.ref(module))
    return held


def refuse_marks(held: list) -> None:
    """The blocks of ``held`` could not be expanded: unmark them for every wrapper, and never hold
    them again (the next call of each wrapper captures them inline)."""
    with _HELD_LOCK:
        for ref in held:
            module = ref()
            if module is not None and module in _HELD:
                del _HELD[module]
                _unmark(module)
                _REFUSED.add(module)
        held.clear()


def release_marks(held: list) -> None:
    """Undo :func:`hold_marks` (idempotent per list: it is emptied)."""
    with _HELD_LOCK:
        while held:
            module = held.pop()()
            if module is None or module not in _HELD:
                continue
            _HELD[module] -= 1
            if _HELD[module] <= 0:
                del _HELD[module]
                _unmark(module)


@torch._dynamo.assume_constant_result
def _calls_wanted() -> bool:
    """Is the graph dynamo traces now for a ditopt backend (or inside :func:`block_calls`)?
    Evaluated once per trace as a constant: other backends (inductor alone, a user's) see the
    blocks traced inline, as if unmarked."""
    if getattr(_FORCED, "on", False):
        return True
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        fn = InstructionTranslator.current_tx().output.compiler_fn
    except Exception:  # not under dynamo, or a torch without this structure: inline
        return False
    from .backend import DitoptBackend, ditopt_backend

    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if isinstance(fn, DitoptBackend) or fn is ditopt_backend:
            return True
        fn = getattr(fn, "compiler_fn", None) or getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
    return False


@contextlib.contextmanager
def block_calls():
    """Within: a marked block is one ``block_call`` node for any backend (tests and tools that
    capture with their own backend, then :func:`expand_block_calls`)."""
    before = getattr(_FORCED, "on", False)
    _FORCED.on = True
    try:
        yield
    finally:
        _FORCED.on = before


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.Size)) or (
        isinstance(value, (tuple, list)) and all(_plain(v) for v in value))


def _frozen(value):
    """A plain value as a hashable one (lists as tuples)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (tuple, list)) else value


def block_signature(block: torch.nn.Module) -> tuple:
    """What makes two blocks trace alike besides their inputs: every submodule's path and class,
    its plain attributes (numbers, strings, flags, dtypes: ``heads``, ``context_pre_only``,
    ``eps``...), the class and plain attributes of its other attributes one level down (an
    attention processor), its hooks, and every parameter's and buffer's shape, dtype, device,
    layout and ``requires_grad``. Blocks of one signature given inputs of one signature trace to
    one graph up to their weights: the rule :func:`expand_block_calls` rests on."""
    out = []
    for path, mod in block.named_modules():
        attrs = []
        for name, value in sorted(vars(mod).items()):
            if name in ("_parameters", "_buffers", "_modules", "_ditopt_block") or name.startswith("_forward") \
                    or name.startswith("_backward") or name.startswith("_state_dict") or name.startswith("_load_state"):
                continue
            if _plain(value):
                attrs.append((name, _frozen(value)))
            elif isinstance(value, torch.Tensor):
                attrs.append((name, "tensor", tuple(value.shape), value.dtype, value.device))
            elif not callable(value) or hasattr(value, "__dict__"):
                inner = tuple(sorted((k, _frozen(v)) for k, v in getattr(value, "__dict__", {}).items() if _plain(v)))
                attrs.append((name, type(value).__qualname__, inner))
        hooks = tuple(len(getattr(mod, h, None) or ()) for h in
                      ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs"))
        tensors = tuple((n, tuple(t.shape), t.dtype, t.device, t.layout, t.requires_grad)
                        for n, t in (*mod._parameters.items(), *mod._buffers.items()) if t is not None)
        out.append((path, type(mod), tuple(attrs), hooks, tensors))
    return tuple(out)


def _leaf_signature(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device, value.requires_grad)
    return ("value", type(value), _frozen(value) if _plain(value) else id(value))


@torch._dynamo.allow_in_graph
def block_call(key: int, *args, **kwargs):
    """One marked block's forward, as one node of a dynamo graph (dynamo does not trace into it).

    Dynamo runs it on fake tensors for the outputs' metadata: the block's forward on fake copies
    of its weights, once per (block signature, input signature); a block alike to one run before
    gets fake outputs of the same metadata at once. On real tensors (a graph that was not
    expanded) it runs the block."""
    from torch._guards import detect_fake_mode

    block = _BLOCKS[key]
    base = getattr(type(block).forward, "__wrapped__", type(block).forward)
    fake = detect_fake_mode((args, kwargs))
    if fake is None:
        return base(block, *args, **kwargs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = (block_signature(block), str(spec), tuple(_leaf_signature(v) for v in leaves))
    known = _FAKE_OUTPUTS.get(sig)
    if known is None:
        from torch.nn.utils.stateless import _reparametrize_module

        weights = {n: fake.from_tensor(t, static_shapes=True)
                   for n, t in (*block.named_parameters(), *block.named_buffers())}
        with _reparametrize_module(block, weights):
            out = _fresh(base(block, *args, **kwargs), args, kwargs)
        flat, out_spec = pytree.tree_flatten(out)
        if len(_FAKE_OUTPUTS) > 512:
            _FAKE_OUTPUTS.clear()
        _FAKE_OUTPUTS[sig] = ([(tuple(o.shape), tuple(o.stride()), o.dtype, o.device) if isinstance(o, torch.Tensor)
                               else o for o in flat], out_spec)
        return out
    flat, out_spec = known
    with fake:
        made = [torch.empty_strided(m[0], m[1], dtype=m[2], device=m[3]) if isinstance(m, tuple) else m for m in flat]
    return pytree.tree_unflatten(made, out_spec)


def _fresh(out, args, kwargs):
    """A block's outputs as a nested compile region may return them: an output that is one of the
    block's inputs is cloned, and so is every view among two or more outputs (dynamo refuses a
    region whose outputs alias its inputs or each other: the single-stream blocks of Flux and
    HunyuanVideo return two slices of one tensor). Other outputs pass as they are."""
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if isinstance(out, torch.Tensor):
        return out.clone() if any(out is a for a in inputs) else out
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return type(out)(o.clone() if isinstance(o, torch.Tensor) and (o._base is not None or any(o is a for a in inputs))
                         else o for o in out)
    return out


def repeated_blocks(model: torch.nn.Module, blocks=None) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of the blocks to mark, outermost only: the modules whose class is in
    ``blocks`` (class names or classes), else in the model's ``_repeated_blocks`` (diffusers'
    list for ``compile_repeated_blocks``), else the elements of every ``ModuleList`` of two or
    more modules of one class with submodules (the outermost such lists).

    Example:
        >>> import torch
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(3))
        >>> [p for p, _ in repeated_blocks(Net())]
        ['blocks.0', 'blocks.1', 'blocks.2']
    """
    named = [(p, m) for p, m in model.named_modules() if p]
    wanted = blocks if blocks is not None else getattr(model, "_repeated_blocks", None)
    if wanted:
        names = {w if isinstance(w, str) else w.__name__ for w in ([wanted] if isinstance(wanted, (str, type)) else wanted)}
        found = [(p, m) for p, m in named if type(m).__name__ in names]
    else:
        lists = [p for p, m in named if isinstance(m, torch.nn.ModuleList) and len(m) >= 2
                 and len({type(c) for c in m}) == 1 and any(True for _ in m[0].children())]
        lists = [p for p in lists if not any(p.startswith(q + ".") for q in lists)]
        found = [(p, m) for p, m in named if any(p.startswith(q + ".") and "." not in p[len(q) + 1:] for q in lists)]
    paths = [p for p, _ in found]
    return [(p, m) for p, m in found if not any(p.startswith(q + ".") for q in paths)]


@dataclass
class RepeatedBlocks:
    """The blocks :func:`mark_repeated_blocks` marked; :meth:`undo` (or leaving the ``with``
    block) restores every one exactly. ``skipped``: ``{path: why}`` of blocks left unmarked."""

    paths: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    _modules: list = field(default_factory=list, repr=False)

    def undo(self) -> None:
        for module in self._modules:
            _unmark(module)
        self._modules = []

    def __enter__(self) -> "RepeatedBlocks":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def mark_repeated_blocks(model: torch.nn.Module, blocks=None) -> RepeatedBlocks:
    """Mark the repeated blocks of ``model`` so that a following ``torch.compile`` traces and
    compiles the block once and calls it for every block (regional compilation).

    Each block instance gets its class's forward, marked with
    ``torch.compiler.nested_compile_region``, as an instance attribute: the class and the other
    instances of it are untouched. ``blocks`` names the block classes (default: the model's
    ``_repeated_blocks``, else the elements of its outermost lists of same-class modules; see
    :func:`repeated_blocks`). Keep the marks while the compiled model is in use (dynamo guards
    on them: undone, the next call traces again); :meth:`RepeatedBlocks.undo` or a ``with``
    block restores the model exactly. Outside ``torch.compile`` a marked block runs as before.

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> plan = ditopt.presets.fora(interval=2, steps=4, level="block")
        >>> with ditopt.mark_repeated_blocks(model) as marked:
        ...     fast = torch.compile(model, backend="ditopt", options={"plan": plan, "inductor": False})
        ...     with torch.no_grad():
        ...         out = fast(torch.randn(1, 4, 8, 8), timestep=torch.tensor([999]), class_labels=torch.tensor([3]))
        >>> marked.paths
        ('transformer_blocks.0', 'transformer_blocks.1', 'transformer_blocks.2')
        >>> ditopt.compiled_graph(fast).rewritten.meta["ditopt_regions"]  # one shared subgraph for these
        ('transformer_blocks.1', 'transformer_blocks.2')
        >>> "forward" in model.transformer_blocks[1].__dict__
        False
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        raise DitoptError("mark_repeated_blocks() takes the model before torch.compile, not the compiled wrapper")
    found = repeated_blocks(model, blocks)
    if not found:
        raise DitoptError(f"no repeated blocks found in {type(model).__name__}: name their class with blocks=")
    marks = RepeatedBlocks(paths=())
    paths = []
    for path, module in found:
        why = _why_not_markable(module)
        if why is not None:
            marks.skipped[path] = why
        else:
            _mark(module)
            marks._modules.append(module)
            paths.append(path)
    marks.paths = tuple(paths)
    return marks


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


def _source_name(node: fx.Node) -> str:
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else str(name)


class _Traced(Exception):
    """Raised by the template's capturing backend once it holds the graph (ends dynamo's work there)."""


def _trace_template(block: torch.nn.Module, leaves: list, spec, caller: dict, returned, fake=None) -> _Template:
    """Trace ``block`` alone with dynamo on real tensors shaped like ``leaves`` (the fake input
    leaves of its call; the other leaves are constants; ``returned``: the call's fake outputs), and make the subgraph of it, its module
    stacks those of a subgraph traced inside ``caller`` (the calling node's module stack)."""
    base = getattr(type(block).forward, "__wrapped__", type(block).forward)
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
        torch._dynamo.optimize(record, nopython=True, dynamic=False)(root.forward)(*(values[i] for i in positions))
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        if not isinstance(getattr(exc, "inner_exception", None), _Traced):
            raise
    finally:
        _FORCED.on = before
    if len(graphs) != 1:
        raise RegionalError(f"the marked block {type(block).__name__} was traced as {len(graphs)} graphs, expected 1")
    traced = graphs[0]
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
    outputs, out = [env[r] for r in results], []
    for o in leaves_out:
        out.append(len(out) - sum(isinstance(x, tuple) for x in out) if isinstance(o, torch.Tensor) else ("const", o))
    graph.output(tuple(outputs))
    sub = _LazyGraphModule(traced, graph)
    return _Template(sub, [positions[i] for i, _ in inputs], weights, out_spec, out)


def _refake(node: fx.Node, fake) -> None:
    """``node``'s example value (tensors in it) remade in the fake mode ``fake``, same metadata."""
    value = node.meta.get("example_value")
    if fake is None or value is None:
        return

    def remake(v):
        if not isinstance(v, torch.Tensor):
            return v
        with fake:
            t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device)
        return t.requires_grad_(v.requires_grad) if v.requires_grad and t.is_floating_point() else t

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
    last = graph.find_nodes(op="placeholder")[-1]
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
        sig = (block_signature(block), str(spec), tuple(_leaf_signature(m) for m in metas))
        template = templates.get(sig)
        if template is None:
            template = templates[sig] = _trace_template(block, metas, spec, caller, node.meta["example_value"], fake)
            template.name = f"repeated_block{len(templates) - 1}"
            setattr(gm, template.name, template.gm)
        weights = []
        for chain in template.weights:
            owner = block
            for part in chain[:-1]:
                owner = getattr(owner, part)
            tensor = getattr(owner, chain[-1])
            with graph.inserting_after(last):
                last = graph.placeholder(f"{node.name}_{'_'.join(chain)}")
            last.meta["example_value"] = _like(tensor, fake)
            found.owners.append(weakref.ref(owner))
            found.names.append(chain[-1])
            found.fakes.append(last.meta["example_value"])
            weights.append(last)
        outputs = [n.meta.get("example_value") for n in template.gm.graph.output_node().args[0]]
        with graph.inserting_before(node):
            getter = graph.get_attr(template.name)
            getter.meta["nn_module_stack"] = caller
            call = graph.call_function(INVOKE, (getter, template.name, *(leaves[i] for i in template.leaf_index), *weights))
        call.meta = {k: v for k, v in node.meta.items() if k != "example_value"}
        with fake if fake is not None else contextlib.nullcontext():
            call.meta["example_value"] = tuple(torch.empty_strided(tuple(o.shape), tuple(o.stride()), dtype=o.dtype,
                                                                   device=o.device) for o in outputs)
        template.uses.append(call)
        _reroute_outputs(node, call, template)
        graph.erase_node(node)
    once = {t.uses[0].name for t in templates.values() if len(t.uses) == 1}
    gm.recompile()
    if once:
        inline_calls(gm, only=once)
        for t in templates.values():
            if len(t.uses) == 1:
                delattr(gm, t.name)
    return found


def _like(tensor: torch.Tensor, fake):
    """A fake tensor of ``fake`` with ``tensor``'s metadata (a new one: faster than
    ``fake.from_tensor``, which memoises every tensor it sees), or ``tensor`` without a fake mode."""
    if fake is None:
        return tensor
    with fake:
        out = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device=tensor.device)
    return out.requires_grad_(tensor.requires_grad) if tensor.requires_grad else out


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


# -- inlining the calls -----------------------------------------------------------------------

@dataclass
class Call:
    """One ``invoke_subgraph`` call of the regional graph: the calling module's ``path``, its
    nodes there (``group``: the subgraph's get_attr, the call, the getitems of its outputs), the
    names its inlined nodes get (``inner``), the inlined node each getitem stands for
    (``outputs``: inlined name -> getitem name), and why it cannot stay a call (``why``)."""

    name: str
    path: str
    group: tuple[str, ...]
    inner: tuple[str, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    why: str = ""


def has_block_calls(gm: fx.GraphModule) -> bool:
    """Does ``gm`` hold opaque calls of marked blocks (:func:`block_call`) to expand?"""
    return bool(gm.graph.find_nodes(op="call_function", target=block_call))


def has_calls(gm: fx.GraphModule) -> bool:
    return bool(gm.graph.find_nodes(op="call_function", target=INVOKE))


def _reprefixed(stack: dict, caller: dict, tag: str) -> dict:
    """A subgraph node's module stack as seen from another call site: the caller's stack, then
    the entries below the block the subgraph was traced in, moved under the calling block."""
    entries, k = list(stack.items()), len(caller)
    out = dict(caller)
    if not caller or len(entries) < k:
        return out
    traced = module_path(str(_raw(entries[k - 1][1])))
    here = module_path(str(_raw(list(caller.values())[-1])))
    for key, value in entries[k:]:
        raw, typ = value if isinstance(value, tuple) else (value, "")
        path = module_path(str(raw))
        if path == traced or path.startswith(traced + "."):
            path = here + path[len(traced):]
        out[f"{key}@{here}"] = (path, typ)
    return out


def _raw(value):
    return value[0] if isinstance(value, tuple) else value


def _inline_one(gm: fx.GraphModule, node: fx.Node) -> Call:
    graph, getter = gm.graph, node.args[0]
    sub: fx.GraphModule = getattr(gm, str(getter.target))
    caller = dict(node.meta.get("nn_module_stack") or {})
    path = module_path(str(_raw(list(caller.values())[-1]))) if caller else ""
    users = list(node.users)
    call = Call(node.name, path, (getter.name, node.name, *(u.name for u in users)))
    env: dict[fx.Node, fx.Node] = dict(zip(sub.graph.find_nodes(op="placeholder"), node.args[2:]))
    inner = []
    with graph.inserting_before(node):
        for s in sub.graph.nodes:
            if s.op in ("placeholder", "output") or (s.target is getattr and not s.users):
                continue  # (_fresh's look at an output's ._base, used by nothing once traced)
            target = s.target
            if s.op == "get_attr":  # a nested region's subgraph: hoisted onto gm
                target = f"{node.name}_{s.target}"
                setattr(gm, target, getattr(sub, str(s.target)))
            new = graph.create_node(s.op, target, fx.map_arg(s.args, env.__getitem__),
                                    fx.map_arg(s.kwargs, env.__getitem__), name=f"{node.name}_{s.name}", type_expr=s.type)
            new.meta = {**s.meta, "nn_module_stack": _reprefixed(s.meta.get("nn_module_stack") or {}, caller, path)}
            env[s] = new
            inner.append(new.name)
    results = sub.graph.output_node().args[0]
    for user in users:
        if user.op != "call_function" or user.target is not operator.getitem:
            raise DitoptError(f"{node.name} ({path}): a use of a nested compile region's outputs that is not "
                              f"getitem ({user.format_node()})")
        value = results[user.args[1]]
        if value.op == "placeholder" or env[value].name in call.outputs:
            call.why = "the block returns one of its inputs, or one value twice"
        call.outputs[env[value].name] = user.name
        user.replace_all_uses_with(env[value])
        graph.erase_node(user)
    graph.erase_node(node)
    if not getter.users:
        graph.erase_node(getter)
    call.inner = tuple(inner)
    return call


def inline_calls(gm: fx.GraphModule, only: set[str] | None = None) -> dict[str, Call]:
    """Inline the ``invoke_subgraph`` calls of ``gm`` (those named in ``only``, else all, nested
    ones too) in place, each inlined node named ``<call>_<node>`` and given the calling block's
    module paths; return what each call was, by call name. Recompiles ``gm``."""
    calls: dict[str, Call] = {}
    while True:
        todo = [n for n in gm.graph.find_nodes(op="call_function", target=INVOKE)
                if only is None or n.name in only]
        if not todo:
            break
        for node in todo:
            calls[node.name] = _inline_one(gm, node)
        if only is not None:
            break
    existing = {n.name for n in gm.graph.nodes}
    for call in calls.values():  # a region nested in a call: its inlined nodes are the call's too
        if any(n in calls for n in call.inner):
            call.inner = tuple(n for n in _expanded(call.inner, calls) if n in existing)
            call.why = call.why or "a nested compile region inside it"
    gm.graph.lint()
    gm.recompile()
    return calls


def _expanded(names, calls: dict[str, Call]):
    for n in names:
        if n in calls:
            yield from _expanded(calls[n].inner, calls)
        else:
            yield n


# -- sites and plans on a graph with calls ---------------------------------------------------

def _keepable(call: Call, sites: SiteTable, table, observe: bool) -> bool:
    """May ``call`` stay a call under this decision table? (see the module docstring)"""
    if observe or call.why:
        return False
    inner = set(call.inner)
    for name in table.actions:
        nodes = set(sites[name].nodes)
        if nodes & inner and not nodes >= inner:
            return False
    return not any(i.node in inner and i.node not in call.outputs for i in table.indicators)


def regional_sites(sites: SiteTable, graph: fx.Graph, kept: list[Call]) -> SiteTable | None:
    """``sites`` (found in the inlined graph) for ``graph``, where the ``kept`` calls are calls: a
    site inside a kept call is left out; in the others, a kept call's nodes become its group and
    its outputs the getitems. None when a site's live-outs do not come out the same."""
    inner_of = {n: c for c in kept for n in c.inner}
    by_name = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}

    def name(n):
        if n is None or n not in inner_of:
            return n
        return inner_of[n].outputs.get(n, False)  # False: an inner value, not seen outside the call

    out = []
    for s in sites:
        nodes = set(s.nodes)
        if any(nodes & set(c.inner) and not nodes >= set(c.inner) for c in kept):
            continue  # inside a kept call (or across one: nothing rewrites such a site)
        members = {g for n in s.nodes for g in (inner_of[n].group if n in inner_of else (n,))}
        if not members <= set(by_name):
            return None
        region = region_of([by_name[n] for n in sorted(members, key=order.__getitem__)])
        live_outs = tuple(name(n) for n in s.live_outs)
        if set(live_outs) != {n.name for n in region.live_outs}:
            return None
        residual = tuple(name(n) for n in s.residual_inputs)
        if False in residual:
            return None
        out.append(replace(s, nodes=tuple(n.name for n in region.nodes), inputs=tuple(n.name for n in region.inputs),
                           live_outs=live_outs, residual_inputs=residual, modulated_input=name(s.modulated_input) or None))
    names = {s.name for s in out}
    if any(s.parent is not None and s.parent not in names for s in out):
        return None  # a site whose parent lies across a kept call: no such module tree is known
    return SiteTable(out, model=sites.model)


@dataclass
class SplitGraph:
    """What the backend rewrites, for a captured graph: ``flat`` (the calls inlined; None when
    there were none) with its ``sites`` and the plan's ``table``; ``graph``, the graph the passes
    rewrite (the kept calls still calls), with its ``graph_sites`` and ``graph_table``; the paths
    of the ``kept`` calls; and the seconds each stage took."""

    flat: fx.GraphModule | None
    sites: SiteTable
    table: object
    graph: fx.GraphModule
    graph_sites: SiteTable
    graph_table: object
    kept: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)


def split_regions(gm: fx.GraphModule, compile_plan: Callable, *, observe: bool = False,
                  copy: Callable[[fx.GraphModule], fx.GraphModule] | None = None) -> SplitGraph:
    """Find the sites of ``gm`` and resolve the plan (``compile_plan(sites)``) as if no block were
    marked, then choose the calls that stay calls (see the module docstring). ``gm`` is the
    backend's copy; ``copy`` makes another (the flat graph is kept untouched)."""
    clock = time.perf_counter()
    if not has_calls(gm):
        sites = find_sites(gm.graph)
        found = time.perf_counter()
        table = compile_plan(sites)
        gm.meta["ditopt_regions"] = ()
        return SplitGraph(None, sites, table, gm, sites, table,
                          seconds={"find_sites": found - clock, "compile_plan": time.perf_counter() - found})
    copy = copy or _copy
    flat = copy(gm)
    calls = inline_calls(flat)
    inlined = time.perf_counter()
    sites = find_sites(flat.graph)
    found = time.perf_counter()
    table = compile_plan(sites)
    seconds = {"inline_regions": inlined - clock, "find_sites": found - inlined, "compile_plan": time.perf_counter() - found}
    top = {n.name for n in gm.graph.find_nodes(op="call_function", target=INVOKE)}
    kept = [c for name, c in calls.items() if name in top and _keepable(c, sites, table, observe)]
    graph_sites = None
    if kept:
        inline_calls(gm, only=top - {c.name for c in kept})
        graph_sites = regional_sites(sites, gm.graph, kept)
    if graph_sites is None:  # nothing kept, or the regional sites do not check out: every call inlined
        gm, graph_sites, kept = copy(flat), sites, []
    outputs = {n: g for c in kept for n, g in c.outputs.items()}
    graph_table = replace(table, indicators=[replace(i, node=outputs.get(i.node, i.node)) for i in table.indicators])
    gm.meta["ditopt_regions"] = tuple(c.path for c in kept)
    seconds["split_regions"] = time.perf_counter() - clock - sum(seconds.values())
    return SplitGraph(flat, sites, table, gm, graph_sites, graph_table, tuple(c.path for c in kept), seconds)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        new.meta = dict(old.meta)
    out = _LazyGraphModule(gm, graph)  # its code is generated when first run or read
    out.meta.update(gm.meta)
    return out





def decompose_calls_for_inductor(gm: fx.GraphModule) -> int:
    """Under inductor: have each called subgraph traced with inductor's decompositions wherever
    AOT traces it; returns how many subgraphs. (Each gets a copy carrying
    ``meta["nested_region_config"]`` with only ``decompositions`` set; every call, in ``gm`` and
    in its skip branches, then calls the copy, so the subgraph stays shared.)

    Needed for a call inside a skip branch: torch 2.13's functionalisation of ``cond``
    materialises its branches for their schema without decompositions, ``invoke_subgraph``
    caches that trace by subgraph and the real trace reuses it, and inductor then fails on the
    undecomposed block (``both a fallback and a decomp for same op: aten.native_layer_norm``).
    A subgraph whose config names decompositions is traced with them by every trace."""
    from torch._higher_order_ops.invoke_subgraph import NestedCompileRegionOptions
    from torch._inductor.decomposition import select_decomp_table

    copies: dict[int, fx.GraphModule] = {}
    for mod in list(gm.modules()):
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in mod.graph.find_nodes(op="call_function", target=INVOKE):
            target = str(node.args[0].target)
            sub = getattr(mod, target)
            if sub.meta.get("nested_region_config") is not None and id(sub) not in copies:
                continue  # the user's own config
            if id(sub) not in copies:
                copies[id(sub)] = _copy(sub)
                copies[id(sub)].meta["nested_region_config"] = NestedCompileRegionOptions(
                    decompositions=select_decomp_table())
            setattr(mod, target, copies[id(sub)])
    return len(copies)


__all__ = ["Call", "RepeatedBlocks", "SplitGraph", "decompose_calls_for_inductor", "has_calls", "inline_calls",
           "mark_repeated_blocks", "regional_sites", "repeated_blocks", "split_regions"]
