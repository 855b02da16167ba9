"""Capture a model as one torch.fx graph through dynamo.

``torch.fx.symbolic_trace`` fails on every diffusers DiT (data-dependent Python control flow);
dynamo captures each of them whole. Its graphs name modules by the Python expression that
reached them (``L['self'].__dict__['_modules']['blocks'].0.attn1``); :func:`module_path`
turns that into the module path a user writes (``blocks.0.attn1``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config

from .errors import CaptureError, DitoptError

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

_PATH_RULES = [  # applied in order; each strips one spelling of attribute access
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"^L\[\"self\"\]\.?"), ""),
    (re.compile(r"^self\.?"), ""),
    (re.compile(r"__dict__\['_modules'\]\['([^']+)'\]"), r"\1"),
    (re.compile(r"_modules\['([^']+)'\]"), r"\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
    (re.compile(r"\.forward\.__self__(?=\.|$)"), ""),  # a module reached through a bound forward (a marked block)
    (re.compile(r"\.{2,}"), "."),
]


@functools.lru_cache(maxsize=65536)
def module_path(raw: str) -> str:
    """Normalise a dynamo module path.

    Example:
        >>> module_path("L['self'].__dict__['_modules']['blocks'].0.attn1")
        'blocks.0.attn1'
        >>> module_path("L['self'].transformer_blocks[2].ff")
        'transformer_blocks.2.ff'
        >>> module_path("L['self'].__dict__['_modules']['blocks'].0.forward.__self__.attn1")
        'blocks.0.attn1'
    """
    path = raw
    for pattern, repl in _PATH_RULES:
        path = pattern.sub(repl, path)
    return path.strip(".")


def is_size_arithmetic(node: fx.Node) -> bool:
    """A node computing an integer from sizes only (``x.size(1)``, its negation, a sum of sizes):
    pure and cheap. A region does not hold one that reads only sizes of what enters the region
    (dynamo computes it once where a module first needs it, and every later block reads it)."""
    if node.op != "call_function" or isinstance(node.meta.get("example_value"), bool) \
            or not isinstance(node.meta.get("example_value"), (int, torch.SymInt)):
        return False
    return node.target is torch.ops.aten.sym_size.int or all(is_size_arithmetic(a) for a in node.all_input_nodes)


def module_stack(node: fx.Node) -> list[tuple[str, str, type | str]]:
    """The modules active when ``node`` ran, outermost first, as ``(path, call key, type)``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        raw, typ = value if isinstance(value, tuple) else (value, "")
        out.append((module_path(str(raw)), str(key), typ))
    return out


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the duration (it is put back as it was).

    Dynamo's tracing allocates many short-lived containers, and each generational collection
    walks every tracked object of the process (torch's, the model's). Measured on dit-digits,
    the first ``ditopt.profile`` in a process took 0.1-0.15 s less of about 2.2 s
    (``docs/BENCHMARKS.md``). Nothing is lost: cycles made meanwhile are collected by the
    next collection after.

    Example:
        >>> import gc
        >>> with gc_paused():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _no_funcname(filename: str, lineno: int) -> None:
    return None


@contextlib.contextmanager
def source_names_skipped():
    """Dynamo's lookup of the enclosing function's name for each traced call, skipped.

    For every call it records, dynamo builds a log header naming the function at that source
    line; the first lookup in a file tokenizes the whole file (``torch._dynamo.funcname_cache``),
    and a diffusers model's code spans a dozen large files. The header is only read by dynamo's
    ``trace_call`` and ``trace_source`` logs, so while neither is enabled the lookup answers
    ``None`` (the header then names the code object without its qualified name). Measured on
    dit-digits with ``tools/bench_planner.py --only profile``: the first profile in a process
    took 1.86-1.97 s, 2.08-2.10 s before (``docs/BENCHMARKS.md``). Nothing is patched when
    those logs are on, or when this torch has no such lookup.

    Example:
        >>> with source_names_skipped():
        ...     pass
    """
    try:
        from torch._dynamo import symbolic_convert
        from torch._logging._internal import log_state
        logged = any(log_state.is_artifact_enabled(a) for a in ("trace_call", "trace_source"))
        symbolic_convert.get_funcname  # noqa: B018 (this torch has the lookup)
    except (ImportError, AttributeError):
        logged = True
    if logged:
        yield
        return
    with _FUNCNAME_LOCK:  # concurrent captures (threads): the first in patches, the last out restores
        if _FUNCNAME["depth"] == 0:
            _FUNCNAME["original"] = symbolic_convert.get_funcname
            symbolic_convert.get_funcname = _no_funcname
        _FUNCNAME["depth"] += 1
    try:
        yield
    finally:
        with _FUNCNAME_LOCK:
            _FUNCNAME["depth"] -= 1
            if _FUNCNAME["depth"] == 0:
                symbolic_convert.get_funcname = _FUNCNAME.pop("original")


_FUNCNAME_LOCK = threading.Lock()
_FUNCNAME: dict[str, Any] = {"depth": 0}


@contextlib.contextmanager
def lean_tracing():
    """What dynamo's capture spends and nothing uses, turned off for the duration:
    :func:`gc_paused` and :func:`source_names_skipped`."""
    with gc_paused(), source_names_skipped():
        yield


def first_line(exc: BaseException) -> str:
    """The line of ``exc``'s message that says what went wrong: the first that is not advice to the
    model's author (dynamo's data-dependent errors begin with "Consider annotating your code ...").

    Example:
        >>> first_line(RuntimeError("Consider annotating your code using torch._check*(). Could not "
        ...                         "extract specialized integer\\nmore detail"))
        'Could not extract specialized integer'
    """
    advice = ("consider ", "to fix", "set torchdynamo", "for more", "you can ")
    lines = []
    for line in (line.strip() for line in str(exc).strip().splitlines()):
        while line.lower().startswith(advice) and ". " in line:  # an advice sentence before the news
            line = line.split(". ", 1)[1].strip()
        if line:
            lines.append(line)
    telling = [line for line in lines if not line.lower().startswith(advice)]
    return (telling or lines or [type(exc).__name__])[0]


def where_in_model(exc: BaseException) -> str:
    """Where in the model's own code dynamo stopped: ``" (at file.py:391 in moe_infer: `line`)"``,
    the innermost frame of the exception's user stack outside torch (dynamo's polyfills and
    decorators are not what a user can change), or "" when dynamo gave no stack."""
    frames = [f for f in getattr(exc, "real_stack", None) or () if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    hint = ""
    if f.name == "deprecate" and "diffusers" in f.filename:  # PixArt-Alpha's, Stable Audio's output classes
        caller = frames[-2] if len(frames) > 1 else f
        hint = (f"; diffusers warns of a deprecation there ({os.path.basename(caller.filename)}:{caller.lineno}), "
                f"which dynamo cannot trace: call the model with return_dict=False, as diffusers' pipelines do")
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`){hint}"


def make_room_for_another_model(limit: int = 256) -> None:
    """Dynamo keys compiled code by the code object of ``forward``, which every instance of a
    class shares (and by shared wrappers of it: diffusers decorates many classes' forward with one
    LoRA-scale wrapper), and each capture or optimised model adds its own entry (its backend
    differs). Past dynamo's default of 8 entries, the ninth in a process (trying plans, a
    benchmark, listing the sites of several models) would fail with a recompile-limit error
    under fullgraph=True. Dynamo's config is per thread: called before every capture."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list[Any]


_AGAIN = threading.local()  # capture() is trying a second time, after one eager call


def capture(model: torch.nn.Module, *args, symbolic_shapes: bool = False, **kwargs) -> Captured:
    """Run ``model(*args, **kwargs)`` once under dynamo and return its single graph (the calls
    of blocks marked by :func:`ditopt.mark_repeated_blocks` inlined).

    ``symbolic_shapes``: capture with dynamic shapes and duck shaping off, so every tensor in
    ``node.meta["example_value"]`` has SymInt sizes, one symbol per input size that the model's
    code does not fix (equal sizes stay apart symbols; dynamo fixes sizes 0 and 1).

    Example:
        >>> import torch
        >>> cap = capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4))
        >>> any(n.op == "call_function" for n in cap.gm.graph.nodes)
        True
        >>> cap = capture(torch.nn.Linear(4, 3), torch.randn(5, 4), symbolic_shapes=True)
        >>> linear = next(n for n in cap.gm.graph.nodes if n.op == "call_function")
        >>> [type(d).__name__ for d in linear.meta["example_value"].shape]   # batch stays a symbol
        ['SymInt', 'int']
    """
    graphs: list[Captured] = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(Captured(gm, list(example_inputs)))
        return gm.forward

    make_room_for_another_model()
    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=symbolic_shapes)
    shapes = fx_config.patch(use_duck_shape=False) if symbolic_shapes else contextlib.nullcontext()
    try:
        with shapes, torch.no_grad(), lean_tracing():
            compiled(*args, **kwargs)
    except Exception as exc:  # dynamo raises many types; the cause is what matters to a user
        try:  # inputs the model itself refuses (a Python-number timestep, a shape) raise its own error
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as own:
            raise own from None
        if not graphs and not getattr(_AGAIN, "on", False):
            # state some models build lazily on their first call (a rotary table made under a
            # torch.device context dynamo cannot trace): the eager call built it, capture again
            _AGAIN.on = True
            try:
                return capture(model, *args, symbolic_shapes=symbolic_shapes, **kwargs)
            except CaptureError:
                pass
            finally:
                _AGAIN.on = False
        how = "with symbolic shapes" if symbolic_shapes else "as one graph"
        first = first_line(exc)
        raise CaptureError(f"could not capture {type(model).__name__} {how}: {type(exc).__name__}: "
                           f"{first}{where_in_model(exc)}") from exc
    if len(graphs) != 1:
        raise CaptureError(f"{type(model).__name__} was captured as {len(graphs)} graphs, expected 1")
    from .regional import has_calls, inline_calls

    if has_calls(graphs[0].gm):  # a model with marked blocks: the graph an unmarked one gives
        inline_calls(graphs[0].gm)
    return graphs[0]


def refuse_under_dispatch_mode() -> None:
    """Refuse a call of an optimised model under a TorchDispatchMode (``FlopCounterMode``, a debug
    mode): dynamo runs no compiled code there, raises about skipped frames under
    ``fullgraph=True``, and then skips the model's frame for good (every later call fails too).
    The call is refused before dynamo sees it, saying what to do instead."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    if mode is not None:
        raise DitoptError(f"an optimised model cannot run under {type(mode).__name__.lstrip('_')} (a TorchDispatchMode: "
                          f"torch.compile runs no compiled graph there); to count what a plan executes, call the "
                          f"model inside `with ditopt.flops.graph_flops(ditopt.compiled_graph(fast).rewritten) as "
                          f"per_call:`, which enters the counter around the graph, or predict it with "
                          f"ditopt.cost_model(model, **inputs).predict(plan)")
