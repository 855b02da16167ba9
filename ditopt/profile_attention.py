"""What the attention actions need from a calibration run: each attention site's SDPA output per
step and CFG lane, and for self-attention the window residual ``R = full - window(W)``.

``ditopt.profile(..., attention_window=W)`` calls :func:`record_attention` after its own
calibration run and keeps the result as ``RedundancyMap.attention`` (an :class:`AttentionSamples`).
From it a planner replays, per (step, attention site), what each attention action would have
missed against what the site really produced (``ditopt.attention_plan``):

- ``reuse`` (DiTFastAttn's AST): the output of the last full step instead of this one's;
- ``window`` (WA-RS): ``W_t + R_b`` instead of ``W_t + R_t``, so it misses ``R_b - R_t``;
- ``share_cfg`` (ASC): the uncond lane gets ``cond_t + (uncond_b - cond_b)``, missing the change
  of the cond/uncond offset since step ``b``.

Where it is measured: at the SDPA call's output (before the output projection), which is where
the ``window`` action swaps the kernel; the output projection is linear, so an error there maps to
the site's output by one fixed matrix. Every sample is the same fixed random subset of ``keep``
elements at every step (one subset per site); with CFG batched into one call the subset is taken
within one half of the batch and read in both halves, so the lanes line up element by element.

How: a second, eager run of the unmodified model (the profiler's own run goes through a dynamo
graph, where a Python hook on the SDPA call would be traced rather than run). An all-compute
ditopt model gives outputs bit-identical to eager, so both runs see the same trajectory. Module
hooks tell which attention site is running; a ``TorchFunctionMode`` sees each SDPA call's q, k
and v and runs the ``window`` action's own kernel on them
(:func:`ditopt.runtime.window_attention.window_attention`).

Example::

    >>> import ditopt
    >>> from ditopt import zoo
    >>> m = zoo.load("dit-digits")
    >>> rmap = ditopt.profile(m.model, lambda tr: m.sample([1, 7], seed=0, steps=4, transformer=tr), steps=4,
    ...                       progress=False, cfg="batched", attention_window=16)
    >>> a = rmap.attention
    >>> a.window, a.layout, a.lanes, tuple(a.outputs["transformer_blocks.0.attn1"].shape)
    (16, 'batched', 2, (4, 2, 4096))
    >>> tuple(a.residuals["transformer_blocks.0.attn1"].shape), a.kinds["transformer_blocks.0.attn1"]
    ((4, 2, 4096), 'self')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import check_count
from .flops import attention_flops, window_attention_flops
from .runtime.observe import ShapeChangeError
from .runtime.window_attention import window_attention

__all__ = ["AttentionSamples", "record_attention"]

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
LAYOUTS = (None, "batched", "calls")  # one lane; two halves of one call's batch; two calls per step


@dataclass
class AttentionSamples:
    """Per attention site: ``outputs[site]`` ``[steps, lanes, keep]``, a subsample of its SDPA
    output; ``residuals[site]`` (self-attention sites whose calls the window kernel takes)
    ``[steps, lanes, keep]`` of ``full - window_attention(W)`` on the same elements;
    ``calls[site]``: the (q, k, v) shapes of its SDPA calls in one model call; ``kinds[site]``:
    self | cross | joint. Lanes are the CFG branches in the caller's order (``layout``)."""

    window: int
    layout: str | None
    kinds: dict[str, str | None]
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]
    outputs: dict[str, torch.Tensor] = field(repr=False)
    residuals: dict[str, torch.Tensor] = field(repr=False)

    @property
    def lanes(self) -> int:
        return next(iter(self.outputs.values())).shape[1] if self.outputs else 1

    def sdpa_flops(self, site: str, window: int | None = None) -> float:
        """FLOPs of the site's SDPA calls in one model call: full attention, or with ``window``
        the window kernel's (:func:`ditopt.flops.window_attention_flops`)."""
        total = 0.0
        for q, k, v in self.calls[site]:
            full = window is None or window >= q[-2] or q[-2] != k[-2]
            total += float(attention_flops(q, k, v) if full else window_attention_flops(q, v, window))
        return total

    # -- files (RedundancyMap.save / load) --------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"attention/out/{s}": t.contiguous() for s, t in self.outputs.items()}
        out.update({f"attention/residual/{s}": t.contiguous() for s, t in self.residuals.items()})
        return out

    def meta(self) -> dict[str, Any]:
        return {"window": self.window, "layout": self.layout,
                "sites": {s: {"attention": self.kinds.get(s), "calls": [[list(x) for x in c] for c in self.calls[s]]}
                          for s in self.outputs}}

    @classmethod
    def from_saved(cls, meta: Any, tensors: dict[str, torch.Tensor], where: Any, steps: int) -> "AttentionSamples | None":
        """The samples a map saved (None for a map saved without them); ProfileError naming the
        file and the key or tensor at fault."""
        from .profile import ProfileError

        if meta is None:
            return None
        try:
            window = check_count(meta["window"], "window", error=ProfileError)
            layout = meta["layout"]
            if layout not in LAYOUTS:
                raise ProfileError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
            sites = meta["sites"]
            kinds = {s: e["attention"] for s, e in sites.items()}
            calls = {s: [tuple(tuple(int(d) for d in x) for x in c) for c in e["calls"]] for s, e in sites.items()}
        except (KeyError, TypeError, AttributeError, ValueError, ProfileError) as exc:
            raise ProfileError(f"{where}: 'attention' is malformed: {exc}") from None
        outputs, residuals = {}, {}
        for name, t in tensors.items():
            parts = name.split("/", 2)
            if parts[0] != "attention":
                continue
            if len(parts) != 3 or parts[1] not in ("out", "residual") or parts[2] not in sites:
                raise ProfileError(f"{where}: tensor {name!r} names no attention site of the map")
            if t.dim() != 3 or t.shape[0] != steps or not t.is_floating_point():
                raise ProfileError(f"{where}: tensor {name!r} must be float [steps={steps}, lanes, keep], "
                                   f"got {tuple(t.shape)}")
            (outputs if parts[1] == "out" else residuals)[parts[2]] = t
        missing = [s for s in sites if s not in outputs]
        if missing:
            raise ProfileError(f"{where}: attention outputs of site {missing[0]!r} are missing")
        return cls(window, layout, kinds, calls, outputs, residuals)


class _Lanes:
    """Fixed subsamples of a site's SDPA outputs, one row per CFG lane."""

    def __init__(self, keep: int, seed: int, batched: bool):
        self.keep, self.seed, self.batched = keep, seed, batched
        self.index: dict[str, torch.Tensor] = {}

    def take(self, site: str, t: torch.Tensor) -> torch.Tensor:
        if self.batched and t.shape[0] % 2:
            from .profile import ProfileError

            raise ProfileError(f"cfg='batched', but {site.split('#')[0]}'s attention ran on a batch of {t.shape[0]}")
        rows = t.detach().reshape(2 if self.batched else 1, -1)
        if site not in self.index:
            g = torch.Generator().manual_seed(self.seed)
            n = rows.shape[1]
            self.index[site] = torch.randperm(n, generator=g)[: min(self.keep, n)].sort().values
        return rows[:, self.index[site]].float()


class _Watch(TorchFunctionMode):
    """Sees every SDPA call; hands the ones made inside an attention site to ``record``."""

    def __init__(self, record: Callable[[dict], None]):
        super().__init__()
        self.record = record
        self.site: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SDPA and self.site:
            bound = dict(zip(_ARGS, args))
            bound.update(kwargs)
            bound["out"] = out
            self.record(bound)
        return out


def _window_ok(call: dict) -> bool:
    """The window kernel takes this call (as the ``window`` pass requires): no mask, causal
    masking, dropout or GQA, and as many keys as queries."""
    q, k = call["query"], call["key"]
    return (call.get("attn_mask") is None and not call.get("is_causal") and not call.get("dropout_p")
            and not call.get("enable_gqa") and q.shape == k.shape)


def record_attention(model: torch.nn.Module, run: Callable[[Any], Any], *, steps: int, window: int,
                     kinds: dict[str, str | None], keep: int = 4096, batched: bool = False,
                     timestep_arg: str = "timestep", seed: int = 2) -> AttentionSamples:
    """Run ``run(model)`` once eagerly and sample each attention site in ``kinds`` (site name ->
    self | cross | joint) as the module docstring says. ``batched``: each call carries the CFG
    branches as the two halves of its batch; otherwise the calls of a step are the lanes.
    ``kinds`` names modules of ``model`` (site names are module paths)."""
    from .profile import ProfileError

    check_count(window, "attention_window", error=ProfileError)
    modules = dict(model.named_modules())
    missing = [s for s in kinds if s not in modules]
    if missing:
        raise ProfileError(f"attention site {missing[0]!r} is not a module of {type(model).__name__}")
    lanes = _Lanes(keep, seed, batched)
    state = {"step": -1, "lane": 0, "t": None}
    got: dict[tuple[str, int, int], dict[str, list]] = {}
    calls: dict[str, list] = {}
    windowed = {s: kinds[s] == "self" for s in kinds}

    def record(call: dict) -> None:
        site = watch.site[-1]
        key = (site, state["step"], state["lane"])
        entry = got.setdefault(key, {"out": [], "res": []})
        entry["out"].append(lanes.take(site + f"#{len(entry['out'])}", call["out"]))
        if key[1] == 0 and key[2] == 0:
            calls.setdefault(site, []).append(tuple(tuple(call[x].shape) for x in ("query", "key", "value")))
        windowed[site] = windowed[site] and _window_ok(call)
        if windowed[site]:
            part = window_attention(call["query"], call["key"], call["value"], window, scale=call.get("scale"))
            entry["res"].append(lanes.take(site + f"#{len(entry['res'])}", call["out"] - part))

    watch = _Watch(record)
    hooks = []
    for name in kinds:  # (a hook that returns something replaces the module's input or output)
        hooks.append(modules[name].register_forward_pre_hook(lambda m, a, n=name: watch.site.append(n) and None))
        hooks.append(modules[name].register_forward_hook(lambda m, a, o: watch.site.pop() and None))

    def call(*args, **kwargs):
        t = kwargs.get(timestep_arg, args[1] if len(args) > 1 else None)
        value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else None
        if state["step"] >= 0 and value is not None and value == state["t"]:
            state["lane"] += 1
        else:
            state["step"], state["lane"], state["t"] = state["step"] + 1, 0, value
        with watch:
            return model(*args, **kwargs)

    try:
        with torch.no_grad():
            run(ModelProxy(model, call))
    finally:
        for h in hooks:
            h.remove()
    if state["step"] + 1 != steps:
        raise ProfileError(f"the attention calibration run made {state['step'] + 1} steps, not {steps}")
    return _assemble(got, calls, kinds, windowed, steps, window, batched)


def _assemble(got, calls, kinds, windowed, steps, window, batched) -> AttentionSamples:
    from .profile import ProfileError

    per_call = 2 if batched else 1
    n_lanes = max((k[2] for k in got), default=0) * per_call + per_call
    layout = "batched" if batched else ("calls" if n_lanes == 2 else None)
    if n_lanes > 2:
        raise ProfileError(f"attention samples: {n_lanes} CFG lanes per step; share_cfg knows two")
    outputs, residuals = {}, {}
    for site in kinds:
        if (site, 0, 0) not in got:
            raise ProfileError(f"attention site {site!r} made no scaled_dot_product_attention call in the "
                               f"calibration run (another attention function?)")
        width = sum(x.shape[1] for x in got[(site, 0, 0)]["out"])
        outputs[site] = torch.zeros(steps, n_lanes, width)
        if windowed[site]:
            residuals[site] = torch.zeros(steps, n_lanes, width)
        for (s, step, lane), entry in got.items():
            if s != site:
                continue
            rows = slice(lane * per_call, lane * per_call + per_call)
            outputs[site][step, rows] = torch.cat(entry["out"], dim=1)
            if windowed[site]:
                residuals[site][step, rows] = torch.cat(entry["res"], dim=1)
    return AttentionSamples(window, layout, dict(kinds), {s: calls[s] for s in kinds}, outputs, residuals)


class FirstCall:
    """Wraps the compiled model to keep the arguments of its first call (to price the sites). A call
    of another input shape than the first (the recorder subsamples each site at fixed positions) and
    a run that never calls the model are ProfileErrors."""

    def __init__(self, inner):
        self.inner, self._args = inner, None

    def __call__(self, *args, **kwargs):
        if self._args is None:
            self._args = (args, kwargs)
        try:
            return self.inner(*args, **kwargs)
        except ShapeChangeError as exc:
            from .profile import ProfileError

            raise ProfileError(str(exc)) from None

    @property
    def args(self) -> tuple[tuple, dict]:
        if self._args is None:
            from .profile import ProfileError

            raise ProfileError("the calibration run never called the transformer: run(transformer) must call it")
        return self._args


class ModelProxy:
    """Calls ``call``; every other attribute is the model's (a pipeline reads ``transformer.config``,
    ``dtype`` and so on): what a profiling run hands the user's ``run``."""

    def __init__(self, model, call):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)
