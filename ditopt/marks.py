"""Marked blocks: a model's repeated blocks as one opaque call each under a ditopt backend.

:func:`mark_repeated_blocks` (by the user, before ``torch.compile``) and :func:`hold_marks` (by
``ditopt.optimize``) give each block instance a marked class (a subclass of its own class, of the
same name, whose forward is marked): while a ditopt backend's dynamo
traces the model the block is one node, :func:`block_call`, that the backend expands
(:mod:`ditopt.expand`); anywhere else it runs its class's forward. See :mod:`ditopt.regional`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from .errors import CaptureError, DitoptError

_MARKED: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()  # one marked subclass per class
_BLOCKS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()  # marked blocks by key
_KEYS = itertools.count()
_FORCED = threading.local()  # block_calls(): every compile sees the marked blocks as calls
_FAKE_OUTPUTS: dict = {}  # (block signature, input signature) -> the outputs' metadata (see block_call)

# -- marking the blocks of one model --------------------------------------------------------

def _marked_class(cls: type) -> type:
    """The class a marked block of class ``cls`` takes, one per class: a subclass of the same name
    whose forward is the class's forward, except while a ditopt backend's dynamo traces the model
    (:func:`_calls_wanted`), where the block becomes one opaque node, ``block_call(key, *args,
    **kwargs)``, that the backend expands (:func:`expand_block_calls`). A subclass rather than a
    forward in the instance's ``__dict__``: dynamo traces a call of a module whose forward is its
    class's several times faster (6 ms a block: at 40 blocks, a quarter of a second of the cold
    start). Its forward has a code object of its own per class, so the frames of two block classes
    never share dynamo's caches. A copy of a marked block (``copy``, ``deepcopy``, ``pickle``,
    ``torch.save``) is of the original class, unmarked: it runs as itself, never as the block its
    key names."""
    marked = _MARKED.get(cls)
    if marked is None:
        base = cls.forward

        def forward(self, *args, **kwargs):
            key = self._ditopt_block  # (an attribute read: dynamo would build the whole __dict__ for __dict__.get)
            if torch.compiler.is_compiling() and _calls_wanted():
                return block_call(key, *args, **kwargs)
            return base(self, *args, **kwargs)

        name = f"forward_of_{cls.__name__}_{id(cls):x}"
        code = forward.__code__.replace(co_name=name, co_qualname=name)
        marked_forward = types.FunctionType(code, forward.__globals__, "forward", None, forward.__closure__)
        marked_forward.__doc__, marked_forward.__wrapped__ = base.__doc__, base

        def __reduce_ex__(self, protocol):  # a copy is of the original class, without the key
            state = self.__getstate__()
            if isinstance(state, dict):
                state = {k: v for k, v in state.items() if k != "_ditopt_block"}
            return _unmarked_copy, (cls, state)

        marked = type(cls.__name__, (cls,), {"forward": marked_forward, "__reduce_ex__": __reduce_ex__,
                                             "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                             "_ditopt_base": cls})
        _MARKED[cls] = marked
    return marked


def _unmarked_copy(cls: type, state):
    """A copy of a marked block (pickle's and copy's reconstructor): an instance of its original class."""
    out = cls.__new__(cls)
    if hasattr(out, "__setstate__"):
        out.__setstate__(state)
    else:
        out.__dict__.update(state)
    return out


class RegionalError(CaptureError):
    """A marked block could not be traced once and called per block (:func:`expand_block_calls`).
    ``ditopt.optimize``, which marks blocks by itself, then captures the model unmarked."""


def _base_class(module: torch.nn.Module) -> type:
    """The class of ``module`` as it was before it was marked."""
    return type(module).__dict__.get("_ditopt_base", type(module))


def _why_not_markable(module: torch.nn.Module) -> str | None:
    forward = getattr(type(module), "forward", None)
    if _is_marked(module):
        return "already marked"
    if "forward" in module.__dict__:
        return "the instance already has its own forward (a hook?)"
    if not isinstance(forward, types.FunctionType):
        return "its class's forward is not a Python function"
    if hasattr(forward, "__marked_compile_region_fn__"):
        return "its class's forward is already a nested compile region"
    if "__slots__" in type(module).__dict__ or type(type(module)) is not type:
        return "its class cannot be swapped for a marked subclass (slots or a metaclass)"
    from .block_watch import held_tensor

    held = held_tensor(module)
    return None if held is None else f"it holds a tensor that is no parameter or buffer ({held})"


def _mark(module: torch.nn.Module) -> None:
    key = next(_KEYS)
    module.__dict__["_ditopt_block"] = key
    module.__class__ = _marked_class(type(module))
    _BLOCKS[key] = module
    from .block_watch import watch

    watch(module, module)


def _is_marked(module: torch.nn.Module) -> bool:
    return "_ditopt_base" in type(module).__dict__


def _unmark(module: torch.nn.Module) -> None:
    if _is_marked(module):
        module.__class__ = _base_class(module)
        key = module.__dict__.pop("_ditopt_block", None)
        if key is not None:
            _BLOCKS.pop(key, None)


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
            elif module in _REFUSED or _why_not_markable(module) is not None:
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


def _value_key(value, depth: int = 0):
    """What of an attribute (or a hook, or what a function closes over) can change a block's trace:
    a plain value itself; a tensor's metadata; a function by its code and what it closes over and
    defaults to (two per-block hooks with other scales differ); an object (an attention processor)
    by its class and its attributes, three levels down; anything else by identity."""
    if _plain(value):
        return _frozen(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if depth >= 3:
        return ("deep", type(value).__qualname__, id(value))
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__qualname__)
    if isinstance(value, functools.partial):
        return ("partial", _value_key(value.func, depth + 1), tuple(_value_key(a, depth + 1) for a in value.args),
                tuple(sorted((k, _value_key(v, depth + 1)) for k, v in value.keywords.items())))
    func = getattr(value, "__func__", value)  # a bound method: its function (its owner by class)
    code = getattr(func, "__code__", None)
    if code is not None:
        cells = tuple(_value_key(c.cell_contents, depth + 1) if c.cell_contents is not value else "self"
                      for c in (func.__closure__ or ()) if _filled(c))
        defaults = tuple(_value_key(d, depth + 1) for d in (func.__defaults__ or ()))
        owner = getattr(value, "__self__", None)
        return ("function", id(code), cells, defaults, None if owner is None else type(owner).__qualname__)
    if callable(value) and not hasattr(value, "__dict__"):  # a builtin (torch.tanh): itself
        return ("builtin", id(value))
    if isinstance(value, (dict, tuple, list, set, frozenset)):
        items = sorted(value.items(), key=lambda kv: repr(kv[0])) if isinstance(value, dict) else enumerate(value)
        return (type(value).__name__, tuple((repr(k), _value_key(v, depth + 1)) for k, v in items)[:64])
    inner = getattr(value, "__dict__", None)
    if inner is None:
        return ("object", type(value).__qualname__, id(value))
    return (type(value).__qualname__, tuple(sorted((k, _value_key(v, depth + 1)) for k, v in inner.items()
                                                   if not isinstance(v, torch.nn.Module))))


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def block_signature(block: torch.nn.Module) -> tuple:
    """What makes two blocks trace alike besides their inputs: every submodule's path and class,
    its attributes as :func:`_value_key` sees them (plain values; an attention processor by its
    class and what it holds, three levels down; a function by its code and what it closes over),
    its hooks likewise, and every parameter's and buffer's shape, dtype, device, layout and
    ``requires_grad``. Blocks of one signature given inputs of one signature trace to
    one graph up to their weights: the rule :func:`expand_block_calls` rests on."""
    out = []
    for path, mod in block.named_modules():
        attrs = []
        for name, value in sorted(vars(mod).items()):
            if name in ("_parameters", "_buffers", "_modules", "_ditopt_block") or name.startswith("_forward") \
                    or name.startswith("_backward") or name.startswith("_state_dict") or name.startswith("_load_state"):
                continue
            if isinstance(value, torch.nn.Module):  # a module held as a plain attribute: its class
                attrs.append((name, "module", type(value).__qualname__))
            else:
                attrs.append((name, _value_key(value)))
        hooks = tuple(tuple(_value_key(fn) for fn in (getattr(mod, h, None) or {}).values()) for h in
                      ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
        hooks += (tuple(sorted((getattr(mod, "_forward_hooks_with_kwargs", None) or {}).items())),)
        tensors = tuple((n, tuple(t.shape), t.dtype, t.device, t.layout, t.requires_grad)
                        for n, t in (*mod._parameters.items(), *mod._buffers.items()) if t is not None)
        out.append((path, type(mod), tuple(attrs), hooks, tensors))
    return tuple(out)


_SIGNATURES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_CAPTURED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # as last traced


def traced_signature(block: torch.nn.Module, fake) -> tuple:
    """:func:`block_signature` of ``block``, computed once per trace: ``fake`` is the trace's fake
    mode (dynamo's), the same object for the opaque calls of one capture and their expansion."""
    if fake is None:
        return block_signature(block)
    known = _SIGNATURES.get(block)
    if known is not None and known[0]() is fake:
        return known[1]
    signature = block_signature(block)
    _SIGNATURES[block] = (weakref.ref(fake), signature)
    _CAPTURED[block] = signature
    return signature


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
    base = _base_class(block).forward
    fake = detect_fake_mode((args, kwargs))
    if fake is None:
        return base(block, *args, **kwargs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = (traced_signature(block, fake), str(spec), tuple(_leaf_signature(v) for v in leaves))
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
    made = [fake_like(fake, *m) if isinstance(m, tuple) else m for m in flat]
    return pytree.tree_unflatten(made, out_spec)


def fake_like(fake, shape, stride, dtype, device, requires_grad: bool = False):
    """A fake tensor of the mode ``fake`` with this metadata, made directly on a meta tensor (six
    times faster than ``torch.empty_strided`` under the mode, which dispatches; it counts at a
    thousand weights)."""
    from torch._subclasses.fake_tensor import FakeTensor

    out = FakeTensor(fake, torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device="meta"),
                     torch.device(device))
    return out.requires_grad_(True) if requires_grad else out


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
    """Mark the repeated blocks of ``model`` so that a following ``torch.compile(model,
    backend="ditopt", ...)`` traces each kind of block once and inductor compiles it once
    (regional compilation; ``ditopt.optimize`` does the marking by itself).

    Each block instance is given a marked class, a subclass of its class of the same name (the class
    and the other instances are untouched; ``isinstance`` holds): under a ditopt backend the block
    is one opaque call that the backend expands (see the module docstring); anywhere else it runs
    its class's forward. ``blocks``
    names the block classes (default: the model's ``_repeated_blocks``, else the elements of its
    outermost lists of same-class modules; see :func:`repeated_blocks`). Keep the marks while the
    compiled model is in use; :meth:`RepeatedBlocks.undo` or a ``with`` block restores the model
    exactly (the next call then traces again). A copy of a marked block is not marked.

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
        ('transformer_blocks.0', 'transformer_blocks.1', 'transformer_blocks.2')
        >>> type(model.transformer_blocks[1]).__name__, "_ditopt_block" in model.transformer_blocks[1].__dict__
        ('BasicTransformerBlock', False)
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        raise DitoptError("mark_repeated_blocks() takes the model before torch.compile, not the compiled wrapper")
    if not isinstance(model, torch.nn.Module):
        raise DitoptError(f"mark_repeated_blocks() takes a torch.nn.Module, got {type(model).__name__}")
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


__all__ = ["RegionalError", "RepeatedBlocks", "block_call", "block_calls", "block_signature", "hold_marks",
           "mark_repeated_blocks", "refuse_marks", "release_marks", "repeated_blocks"]
