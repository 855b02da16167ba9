"""The custom ops the rewritten graph calls.

Every runtime effect is a ``torch.library.custom_op`` with a fake implementation, so that the
same rewritten graph runs eagerly and under inductor. Ops with a side effect (advancing the
step, storing into the cache, accumulating an indicator) declare that they mutate ``token``:
a one-element tensor every rewritten graph takes as an extra input. The declared mutation
keeps inductor from deleting them and orders them; the ops that read the runtime take the
token too, so they run after the step has advanced.

Decisions never read a tensor on the host: a static plan's decision is known from the step
index, and an adaptive one is a device tensor computed from the indicator.
"""

from __future__ import annotations


import torch

from . import cfg_sharing, partial
from .decisions import SLOTS, Action
from .session import get_runtime

WINDOW_SLOT = SLOTS[Action.WINDOW]


@torch.library.custom_op("ditopt::begin_step", mutates_args=("token",))
def begin_step(token: torch.Tensor, timestep: torch.Tensor, rid: int, graph: int,
               sample: torch.Tensor | None = None) -> None:
    """Advance the runtime's step state from this call's timestep: its maximum, so that per-sample
    and per-token timesteps (a first frame at 0) read as the step they belong to. ``sample`` (the
    latents, given where the timestep is half precision): its first sample's sum tells a step whose
    timestep rounds to the last step's from one more CFG branch of that step."""
    token.add_(1)
    fingerprint = None if sample is None else (lambda: float(sample[0].float().sum()))
    get_runtime(rid).begin(lambda: float(timestep.max()), graph, fingerprint)  # read only if not told


@begin_step.register_fake
def _(token, timestep, rid, graph, sample=None):
    return None


@torch.library.custom_op("ditopt::decide", mutates_args=())
def decide(token: torch.Tensor, rid: int, graph: int, site: str, shape: list[int], device: torch.device) -> torch.Tensor:
    """Whether ``site`` computes at this call: a bool scalar on ``device``, True = compute.

    A site whose every decision is static gets its predicate on the CPU, whatever the model's
    device: the branch is taken on the host (eagerly, and by inductor's ``cond``), so a device
    predicate would cost a device-to-host sync per site and call. A ``when`` rule's predicate
    is computed on the model's device and stays there."""
    rt = get_runtime(rid)
    decision = rt.decide(graph, site, tuple(shape))
    if decision is None:
        return rt.decide_adaptive(graph, site, device)
    return rt.flag(decision, device)


@decide.register_fake
def _(token, rid, graph, site, shape, device):
    return torch.empty((), dtype=torch.bool, device=device)


@torch.library.custom_op("ditopt::window_residual", mutates_args=())
def window_residual(token: torch.Tensor, rid: int, graph: int, site: str) -> torch.Tensor:
    """Whether a ``window`` site computes its residual (full - window attention) at this call: a
    bool scalar on the CPU (the plan is static, the branch is taken on the host). True when the
    site runs full attention here and a later ``window`` step will read the residual
    (:meth:`DecisionTable.residual_needed`); elsewhere the window part is not run."""
    return torch.tensor(_keeps_window_residual(get_runtime(rid), graph, site))


@window_residual.register_fake
def _(token, rid, graph, site):
    return torch.empty((), dtype=torch.bool)


def _keeps_window_residual(rt, graph: int, site: str) -> bool:
    table = rt.graphs.get(graph)
    return bool(rt.computed(site)) and table is not None and table.residual_needed(site, rt.state.step)


@torch.library.custom_op("ditopt::update_indicator", mutates_args=("token",))
def update_indicator(token: torch.Tensor, value: torch.Tensor, rid: int, graph: int, rule: int) -> None:
    """Accumulate the relative L1 change of ``value`` for ``when`` rule ``rule``."""
    token.add_(1)
    get_runtime(rid).update_indicator(graph, rule, value.detach())


@update_indicator.register_fake
def _(token, value, rid, graph, rule):
    return None


@torch.library.custom_op("ditopt::cache_load", mutates_args=())
def cache_load(
    token: torch.Tensor, rid: int, graph: int, site: str, slot: str, shape: list[int], dtype: torch.dtype, copy: bool
) -> torch.Tensor:
    """The newest cached tensor of (site, slot) for this CFG branch (at a ``predict`` step, its
    Taylor forecast), or zeros if there is none.

    Zeros are only ever returned on a call that computes, where the value is not used. The
    result is always contiguous, as the fake kernel says.
    """
    value = get_runtime(rid).load(graph, site, slot)
    if value is None or tuple(value.shape) != tuple(shape):
        return torch.zeros(shape, dtype=dtype, device=token.device)
    # contiguous, as the fake kernel promises: a cached residual keeps the layout it was computed in
    return value.clone(memory_format=torch.contiguous_format) if copy else value.contiguous()


@cache_load.register_fake
def _(token, rid, graph, site, slot, shape, dtype, copy):
    return torch.empty(shape, dtype=dtype, device=token.device)


@torch.library.custom_op("ditopt::cache_store", mutates_args=("token",))
def cache_store(
    token: torch.Tensor, value: torch.Tensor, computed: torch.Tensor, rid: int, graph: int, site: str, slot: str, copy: bool
) -> None:
    """Store ``value`` as (site, slot) of this step if the site ``computed`` at this call.

    Whether it did is known on the host for a static decision; for one a ``when`` rule made on
    the device, the store selects between ``value`` and the cached tensor there (no sync)."""
    token.add_(1)
    rt = get_runtime(rid)
    known = rt.computed(site)  # static decisions are known on the host: no read of ``computed``
    if known is False and slot.startswith(partial.SLOT):  # a partial step recomputed some tokens: stored too
        known = partial.ran(rt, site)
    if known and slot.startswith(WINDOW_SLOT):  # a window residual is computed at some full steps only
        known = _keeps_window_residual(rt, graph, site)
    if known is False:
        return
    if slot.startswith(cfg_sharing.SLOT):  # share_cfg: the offset, or the cond call's output (runtime/cfg_sharing.py)
        cfg_sharing.store(rt, graph, site, slot, value, copy)
        return
    value = value.detach().clone() if copy else value.detach()
    key = rt.key(graph, site, slot)
    previous = rt.store.latest(key)
    if known is None and previous is not None and previous.value.shape == value.shape:
        # decided on the device: keep the cached value where the site reused, without a sync
        value = torch.where(computed, value, previous.value)
    rt.store.put(key, rt.state.step, value)


@cache_store.register_fake
def _(token, value, computed, rid, graph, site, slot, copy):
    return None


@torch.library.custom_op("ditopt::dense_copy", mutates_args=())
def dense_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` that the compiler cannot elide: what a compiled skip branch
    returns for an output that is a view (inductor removes a ``clone`` of a slice and then
    refuses two branch outputs that are views of one buffer)."""
    return x.clone(memory_format=torch.contiguous_format)


@dense_copy.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def run_branch(pred, compute_fn, reuse_fn, operands):
    """The eager lowering of ``torch.cond``: a plain Python branch (no dynamo re-entry)."""
    return compute_fn(*operands) if pred else reuse_fn(*operands)


__all__ = ["begin_step", "decide", "window_residual", "update_indicator", "cache_load", "cache_store", "dense_copy",
           "run_branch"]
