"""Capture a model as one torch.fx graph through dynamo.

``torch.fx.symbolic_trace`` fails on every diffusers DiT (data-dependent Python control flow);
dynamo captures each of them whole. Its graphs name modules by the Python expression that
reached them (``L['self'].__dict__['_modules']['blocks'].0.attn1``); :func:`module_path`
turns that into the module path a user writes (``blocks.0.attn1``).
"""

from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .errors import CaptureError

_PATH_RULES = [  # applied in order; each strips one spelling of attribute access
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"^L\[\"self\"\]\.?"), ""),
    (re.compile(r"^self\.?"), ""),
    (re.compile(r"__dict__\['_modules'\]\['([^']+)'\]"), r"\1"),
    (re.compile(r"_modules\['([^']+)'\]"), r"\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
    (re.compile(r"\.{2,}"), "."),
]


def module_path(raw: str) -> str:
    """Normalise a dynamo module path.

    Example:
        >>> module_path("L['self'].__dict__['_modules']['blocks'].0.attn1")
        'blocks.0.attn1'
        >>> module_path("L['self'].transformer_blocks[2].ff")
        'transformer_blocks.2.ff'
    """
    path = raw
    for pattern, repl in _PATH_RULES:
        path = pattern.sub(repl, path)
    return path.strip(".")


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


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list[Any]


def capture(model: torch.nn.Module, *args, **kwargs) -> Captured:
    """Run ``model(*args, **kwargs)`` once under dynamo and return its single graph.

    Example:
        >>> import torch
        >>> cap = capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4))
        >>> any(n.op == "call_function" for n in cap.gm.graph.nodes)
        True
    """
    graphs: list[Captured] = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(Captured(gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad(), gc_paused():
            compiled(*args, **kwargs)
    except Exception as exc:  # dynamo raises many types; the cause is what matters to a user
        raise CaptureError(f"could not capture {type(model).__name__} as one graph: {exc}") from exc
    if len(graphs) != 1:
        raise CaptureError(f"{type(model).__name__} was captured as {len(graphs)} graphs, expected 1")
    return graphs[0]
