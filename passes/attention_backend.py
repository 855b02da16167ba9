"""Run attention on another kernel: flash-attn, SageAttention or flex_attention in place of SDPA.

Matches: every ``torch.nn.functional.scaled_dot_product_attention`` call, in the graph and in its
subgraphs (the shared subgraph of marked blocks), when ``ctx.attention_backend`` is not "sdpa".
Rewrite to (the same node: its name, users and metadata stay, so sites and annotations hold):
    before                                           after ("flash")
    o = scaled_dot_product_attention(q, k, v,        o = ditopt.flash_attention(q, k, v, 0.25)
            attn_mask=None, dropout_p=0.0,               (q, k, v: (batch, heads, tokens, head dim);
            is_causal=False, scale=0.25)                  flash_attn_func takes them transposed)
"sage" calls ``ditopt.sage_attention`` and "flex" ``ditopt.runtime.attention_backends.flex_attention``
(:mod:`ditopt.runtime.attention_backends`); "auto" is flash-attn where it applies, else SDPA.

Must not fire (the call stays SDPA, whatever the choice): an ``attn_mask``, dropout, ``is_causal``
(SDPA aligns a causal mask top-left, flash-attn ≥ 2.1 bottom-right: they differ when queries and
keys differ in number; DiTs have no causal attention), ``enable_gqa``, and operands that are not
4-D ``(batch, heads, tokens, head dim)`` with the same batch, heads and dtype. A call the kernel
cannot take (flash-attn and SageAttention: float16 or bfloat16 on CUDA; flash-attn: head dim up
to 256, the value's equal to the query's): "auto" keeps SDPA, an explicit name raises
:class:`~ditopt.errors.InputError` naming the node. A package that does not import: "auto" keeps
SDPA; "flash" and "sage" raise InputError with the install command before any node changes
(:func:`check_attention_backend`, which the backend also calls when it is made). Every fallback
is said once per process (``warnings.warn``). ``run_pipeline`` runs this pass first (after
``sequence_parallel``) when ``ctx.attention_backend`` is not "sdpa".

Example:
    >>> import torch, torch.fx as fx
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> from ditopt.passes import PassContext, attention_backend
    >>> from ditopt.sites import SiteTable
    >>> class Attention(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    >>> gm = fx.symbolic_trace(Attention())
    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> _ = ShapeProp(gm).propagate(q, k, v)
    >>> ctx = PassContext(sites=SiteTable([]), runtime_id=0, graph_id=0, attention_backend="flex")
    >>> attention_backend(gm, ctx).modified, [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    (True, ['flex_attention'])
    >>> _ = gm.recompile()
    >>> torch.allclose(gm(q, k, v), Attention()(q, k, v), atol=1e-6)
    True
    >>> attention_backend(gm, ctx).modified   # idempotent
    False
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ditopt.capture import module_stack
from ditopt.errors import InputError
from ditopt.regions import tensor_meta
from ditopt.runtime import attention_backends

from .pass_base import PassContext, PassResult

SDPA = torch.nn.functional.scaled_dot_product_attention
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage", "flex")


@dataclass(frozen=True)
class Kernel:
    """An attention kernel SDPA calls can move to, and what it takes.

    ``call`` is the graph's new target, ``(q, k, v, scale)``; ``package`` is imported when the
    kernel is chosen and ``install`` says how to get it; ``dtypes`` and ``devices`` (device
    types) are what it runs on (None: any); ``max_head_dim`` bounds the head dim; ``same_head_dim``
    asks the value's head dim to equal the query's.
    """

    title: str
    call: Callable
    package: str
    install: str
    dtypes: tuple[torch.dtype, ...] | None = None
    devices: tuple[str, ...] | None = None
    max_head_dim: int | None = None
    same_head_dim: bool = False


_HALF = (torch.float16, torch.bfloat16)
KERNELS = {
    "flash": Kernel("flash-attn", torch.ops.ditopt.flash_attention.default, "flash_attn",
                    "pip install flash-attn --no-build-isolation", _HALF, ("cuda",), 256, True),
    "sage": Kernel("SageAttention", torch.ops.ditopt.sage_attention.default, "sageattention",
                   "pip install sageattention", _HALF, ("cuda",)),
    "flex": Kernel("flex_attention", attention_backends.flex_attention, "torch.nn.attention.flex_attention",
                   "torch >= 2.5"),
}
AUTO = "flash"  # what "auto" tries; SDPA where it does not apply

_SAID: set[tuple] = set()  # the fallbacks already announced in this process


def check_attention_backend(name: Any) -> str:
    """``name`` if it is an attention backend and, for "flash" and "sage", its package imports;
    InputError listing the names, or saying how to install the package, otherwise.

    >>> check_attention_backend("auto")
    'auto'
    >>> check_attention_backend("flsh")
    Traceback (most recent call last):
    ...
    ditopt.errors.InputError: attention_backend must be one of auto, sdpa, flash, sage, flex; got 'flsh'
    """
    if not isinstance(name, str) or name not in ATTENTION_BACKENDS:
        raise InputError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    if name in KERNELS:
        missing = _import_error(KERNELS[name])
        if missing is not None:
            raise InputError(f"attention_backend={name!r} needs {missing}; or use attention_backend='auto', "
                             f"which keeps SDPA where {KERNELS[name].title} is missing")
    return name


def _import_error(kernel: Kernel) -> str | None:
    """Why ``kernel``'s package does not import (None when it does)."""
    try:
        importlib.import_module(kernel.package)
    except Exception as exc:  # a broken build raises OSError or a RuntimeError as well as ImportError
        why = f"{type(exc).__name__}: {exc}"
        return f"the {kernel.package} package, which does not import here ({why}): {kernel.install}"
    return None


def _say_once(key: tuple, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(message, stacklevel=3)


# -- reading an SDPA call ------------------------------------------------------------------------

_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an SDPA call by name, defaults filled in."""
    return {name: node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            for i, (name, default) in enumerate(zip(_PARAMS, _DEFAULTS))}


def _inexpressible(args: dict[str, Any]) -> str | None:
    """Why no kernel here computes this call as SDPA does (None: they all can)."""
    if args["attn_mask"] is not None:
        return "an attn_mask"
    if isinstance(args["dropout_p"], fx.Node) or args["dropout_p"] != 0:
        return "dropout"
    if args["is_causal"] is not False:
        return "is_causal"
    if args["enable_gqa"] is not False:
        return "enable_gqa"
    if args["scale"] is not None and (isinstance(args["scale"], bool) or not isinstance(args["scale"], (int, float))):
        return "a scale computed in the graph"
    metas = [tensor_meta(args[n]) if isinstance(args[n], fx.Node) else None for n in ("query", "key", "value")]
    if any(m is None for m in metas):
        return "operands of unknown shape"
    (q, dtype), (k, k_dtype), (v, v_dtype) = metas
    if not len(q) == len(k) == len(v) == 4:
        return "operands that are not 4-D (batch, heads, tokens, head dim)"
    if not (str(q[0]) == str(k[0]) == str(v[0]) and str(q[1]) == str(k[1]) == str(v[1])
            and str(k[2]) == str(v[2]) and str(q[3]) == str(k[3])):
        return "operands whose batch, heads, tokens or head dim disagree (broadcast or grouped heads)"
    if not dtype == k_dtype == v_dtype:
        return "operands of different dtypes"
    return None


def _unsupported(kernel: Kernel, args: dict[str, Any], device: torch.device) -> str | None:
    """Why ``kernel`` does not take this (expressible) call (None: it does)."""
    (q, dtype), (v, _) = tensor_meta(args["query"]), tensor_meta(args["value"])
    if kernel.dtypes is not None and dtype not in kernel.dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in kernel.dtypes)
        return f"{str(dtype).removeprefix('torch.')} tensors ({kernel.title} takes {names})"
    if kernel.devices is not None and device.type not in kernel.devices:
        return f"tensors on {device.type} ({kernel.title} runs on {' or '.join(kernel.devices)})"
    if kernel.max_head_dim is not None and not (isinstance(q[3], int) and q[3] <= kernel.max_head_dim):
        return f"head dim {q[3]} ({kernel.title} takes up to {kernel.max_head_dim})"
    if kernel.same_head_dim and str(v[3]) != str(q[3]):
        return f"a value head dim {v[3]} other than the query's {q[3]} ({kernel.title} takes one head dim)"
    return None


def _where(node: fx.Node) -> str:
    stack = module_stack(node)
    return f"{node.name} (in {stack[-1][0]})" if stack and stack[-1][0] else node.name


# -- the pass ------------------------------------------------------------------------------------

def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and its subgraph modules (a marked block's shared subgraph, a cond's branches)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def attention_backend(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    choice = check_attention_backend(ctx.attention_backend)
    calls = [(owner, node) for owner in _graph_modules(gm)
             for node in owner.graph.find_nodes(op="call_function", target=SDPA)]
    if choice == "sdpa" or not calls:
        return PassResult(gm, False)
    name = AUTO if choice == "auto" else choice
    kernel = KERNELS[name]
    if choice == "auto":
        missing = (f"the model is on {ctx.device.type} ({kernel.title} runs on {' or '.join(kernel.devices)})"
                   if kernel.devices is not None and ctx.device.type not in kernel.devices else _import_error(kernel))
        if missing is not None:
            _say_once(("auto", missing), f"ditopt: attention_backend='auto' keeps SDPA: {missing}")
            return PassResult(gm, False)
    chosen, kept = [], {}
    for owner, node in calls:
        args = sdpa_arguments(node)
        why = _inexpressible(args)
        if why is None:
            why = _unsupported(kernel, args, ctx.device)
            if why is not None and choice != "auto":
                raise InputError(f"attention_backend={choice!r} cannot run attention {_where(node)}: {why}; "
                                 f"attention_backend='auto' keeps SDPA there")
        if why is None:
            chosen.append((owner, node, args))
        else:
            kept.setdefault(why, []).append(node)
    if kept:
        n_kept = sum(len(nodes) for nodes in kept.values())
        reasons = "; ".join(f"{why}: {_where(nodes[0])}{' and more' if len(nodes) > 1 else ''}"
                            for why, nodes in kept.items())
        _say_once((choice, name, frozenset(kept), ctx.runtime_id),  # once per model
                  f"ditopt: attention_backend={choice!r} keeps SDPA for {n_kept} of "
                  f"{len(calls)} attention calls ({reasons})")
    for owner, node, args in chosen:
        node.target = kernel.call
        scale = None if args["scale"] is None else float(args["scale"])
        node.args, node.kwargs = (args["query"], args["key"], args["value"], scale), {}
    for owner in {owner for owner, _, _ in chosen if owner is not gm}:
        owner.recompile()  # a subgraph's code; run_pipeline regenerates the root's once
    return PassResult(gm, bool(chosen))


__all__ = ["ATTENTION_BACKENDS", "KERNELS", "Kernel", "attention_backend", "check_attention_backend", "sdpa_arguments"]
