"""Sharing across CFG branches (``share_cfg``): the unconditional branch takes the conditional
branch's output plus an offset (uncond - cond) cached at the last step where both were computed
(DiTFastAttn's ASC at attention sites; FasterCache's CFG reuse at block level).

Two CFG layouts, told by the plan (a ``share_cfg`` rule's ``cfg: {layout, uncond}``, resolved into
``DecisionTable.cfg``):

- ``batched``: one call per step on a batch of two halves, ``[uncond; cond]`` by default (diffusers'
  pipelines put the unconditional half first). At a ``share_cfg`` step the site computes the
  conditional half only and rebuilds the batch as ``[cond + offset; cond]`` in the caller's order
  (``passes/insert_cfg_sharing.py`` builds that branch); at a step where it computes both halves and
  a later ``share_cfg`` step reads it, it stores ``offset = out[uncond half] - out[cond half]``.
- ``calls``: two calls per step, the conditional one first (diffusers' Wan and HunyuanVideo
  pipelines; the runtime tells the calls of a step apart by ``StepState.branch``, in call order).
  The site is rewritten like a ``reuse`` site (slot ``share_cfg<i>``, the graph stores its
  output): the conditional call computes and its output is kept for this step; the unconditional
  call of a ``share_cfg`` step skips the site and loads ``cond output of this step + offset``; an
  unconditional call that computes stores ``offset = its output - the cond output of this step``
  where a later ``share_cfg`` step reads it.

A plan (YAML) that shares every block at every other step after the first, for a pipeline that
batches CFG with the unconditional half first (``cfg`` may be left out: it is the default)::

    version: 1
    steps: 20
    rules:
      - sites: "*"
        kind: block
        steps: "1:20:2"
        action: share_cfg
        cfg: {layout: batched, uncond: first}

Example:
    >>> CfgLayout(), CfgLayout("calls").uncond, CfgLayout().cond_half, CfgLayout("batched", "second").cond_half
    (CfgLayout(layout='batched', uncond='first'), 'second', 1, 0)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .decisions import DecisionTable
    from .session import Runtime

LAYOUTS = ("batched", "calls")
ORDERS = ("first", "second")
SLOT = "share_cfg"  # the cache slot of a share_cfg site (one per live-out: share_cfg0, share_cfg1, ...)
_COND = ":cond"  # calls layout: the slot suffix under which the conditional call's output of a step is kept
_DEFAULT_UNCOND = {"batched": "first", "calls": "second"}  # diffusers' pipelines


@dataclass(frozen=True)
class CfgLayout:
    """How the caller runs classifier-free guidance: ``layout`` batched (one call, the batch is two
    halves) or calls (two calls per step), and whether the unconditional half / call is the
    ``first`` or the ``second``. The default ``uncond`` is diffusers': first in a batch, second
    (after the conditional call) with two calls. CFG as two calls with the unconditional call
    first cannot share (the conditional output of the step does not exist yet): ValueError."""

    layout: str = "batched"
    uncond: str = ""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"cfg layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if not self.uncond:
            object.__setattr__(self, "uncond", _DEFAULT_UNCOND[self.layout])
        if self.uncond not in ORDERS:
            raise ValueError(f"cfg uncond must be one of {list(ORDERS)}, got {self.uncond!r}")
        if self.layout == "calls" and self.uncond == "first":
            raise ValueError("with CFG as two calls the conditional call must come first (uncond: second): the "
                             "unconditional call shares the conditional call's output of the same step")

    @classmethod
    def read(cls, cfg) -> "CfgLayout":
        """A layout from a plan's ``cfg:`` (a mapping ``{layout, uncond}``, or the layout alone);
        ValueError saying what is wrong.

        >>> CfgLayout.read({"layout": "calls"}), CfgLayout.read("batched")
        (CfgLayout(layout='calls', uncond='second'), CfgLayout(layout='batched', uncond='first'))
        """
        if isinstance(cfg, CfgLayout):
            return cfg
        if isinstance(cfg, str):
            cfg = {"layout": cfg}
        if not isinstance(cfg, dict) or set(cfg) - {"layout", "uncond"} or not all(
                isinstance(v, str) for v in cfg.values()):
            raise ValueError(f"'cfg' must be {{layout: batched | calls, uncond: first | second}}, got {cfg!r}"[:300])
        return cls(cfg.get("layout", "batched"), cfg.get("uncond", ""))

    @property
    def cond_half(self) -> int:
        """Index (0 or 1) of the conditional half of a batch, or of the conditional call of a step."""
        return 1 if self.uncond == "first" else 0

    @property
    def uncond_half(self) -> int:
        return 1 - self.cond_half

    def to_dict(self) -> dict[str, str]:
        return {"layout": self.layout, "uncond": self.uncond}


def offset_needed(table: "DecisionTable", site: str, step: int) -> bool:
    """Whether a step at which ``site`` computes both branches must keep its offset: a later
    ``share_cfg`` step of the site comes before the next step at which it surely computes both
    branches again (itself computing, inside sites that compute)."""
    from .decisions import RUNNING, Action

    for later in range(step + 1, table.steps):
        action = table.action(site, later)
        if action == Action.SHARE_CFG:
            return True
        if action == Action.COMPUTE and all(table.action(p, later) in RUNNING for p in table.parents.get(site, ())):
            return False
    return False


def decide(rt: "Runtime", graph: int, site: str, shape: tuple[int, ...]) -> bool:
    """The host decision of a ``share_cfg`` (site, step): True = compute (both halves, or this
    call), False = share. Batched: share where an offset of ``shape`` (half the batch) is cached.
    Calls: the conditional call computes; the unconditional one shares where the conditional call
    of this step kept its output and an offset of that shape is cached."""
    table = rt.graphs[graph]
    layout = table.cfg or CfgLayout()
    if not _check_layout(rt, layout):
        return True  # calls that do not fit the layout: compute (each batch is not one [uncond; cond])
    offset = rt.store.latest(_key(rt, graph, site, SLOT + "0", branch=0 if layout.layout == "batched" else None))
    if layout.layout == "batched":
        return not (offset is not None and tuple(offset.value.shape) == tuple(shape))
    if rt.state.branch == layout.cond_half:
        return True
    cond = rt.store.latest(_key(rt, graph, site, SLOT + "0" + _COND, branch=0))
    return not (cond is not None and cond.step == rt.state.step and offset is not None
                and tuple(cond.value.shape) == tuple(offset.value.shape) == tuple(shape))


def _check_layout(rt: "Runtime", layout: CfgLayout) -> bool:
    """Whether the calls fit the plan's layout; warn once per runtime where they do not (nothing
    is shared): two calls per step under ``batched`` (each call's batch is not one [uncond; cond]
    pair: those calls compute), one call per step under ``calls``."""
    now = rt.records[-1] if rt.records else None
    before = rt.records[-2] if len(rt.records) > 1 else None
    if layout.layout == "batched" and now is not None and (now.branch > 0 or (before is not None and before.branch > 0)):
        found = "two or more calls per step"
    elif layout.layout == "calls" and before is not None and now.branch == 0 and before.step == now.step - 1 \
            and before.branch == 0:
        found = f"one call at step {before.step}"
    else:
        return True
    if getattr(rt, "_cfg_layout_warned", False):
        return False
    rt._cfg_layout_warned = True
    other = "calls" if layout.layout == "batched" else "batched"
    warnings.warn(f"ditopt: share_cfg is planned for CFG {layout.layout}, but the caller made {found}: nothing is "
                  f"shared; give the rule cfg: {{layout: {other}}}", RuntimeWarning, stacklevel=3)
    return False


def load(rt: "Runtime", graph: int, site: str, slot: str) -> torch.Tensor | None:
    """What a ``share_cfg`` slot loads: batched, the cached offset; calls, at the unconditional
    call, the conditional call's output of this step plus the cached offset (None elsewhere)."""
    table = rt.graphs[graph]
    layout = table.cfg or CfgLayout()
    if layout.layout == "batched":
        entry = rt.store.latest(_key(rt, graph, site, slot, branch=0))
        return None if entry is None else entry.value
    if rt.state.branch == layout.cond_half:
        return None
    cond = rt.store.latest(_key(rt, graph, site, slot + _COND, branch=0))
    offset = rt.store.latest(_key(rt, graph, site, slot))
    if cond is None or offset is None or cond.step != rt.state.step or cond.value.shape != offset.value.shape:
        return None
    return cond.value + offset.value


def store(rt: "Runtime", graph: int, site: str, slot: str, value: torch.Tensor, copy: bool) -> None:
    """``cache_store`` of a ``share_cfg`` slot at a call where the site computed. Batched: the
    graph passes the offset; it is kept where a later share_cfg step reads it. Calls: the
    conditional call keeps its output for this step's unconditional call; the unconditional call
    keeps ``value - cond output`` as the offset where a later share_cfg step reads it."""
    table = rt.graphs[graph]
    layout = table.cfg or CfgLayout()
    step = rt.state.step
    value = value.detach()
    if layout.layout == "batched":
        if offset_needed(table, site, step):
            rt.store.put(_key(rt, graph, site, slot, branch=0), step, value.clone() if copy else value)
        return
    if rt.state.branch == layout.cond_half:
        if table.action(site, step) == _share() or offset_needed(table, site, step):
            rt.store.put(_key(rt, graph, site, slot + _COND, branch=0), step, value.clone())
        return
    cond = rt.store.latest(_key(rt, graph, site, slot + _COND, branch=0))
    if cond is not None and cond.step == step and cond.value.shape == value.shape and offset_needed(table, site, step):
        rt.store.put(_key(rt, graph, site, slot), step, value - cond.value)


def _share():
    from .decisions import Action

    return Action.SHARE_CFG


def _key(rt: "Runtime", graph: int, site: str, slot: str, branch: int | None = None) -> tuple:
    """The cache key: per CFG branch (this call's unless ``branch`` is given)."""
    return (graph, site, slot, rt.state.branch if branch is None else branch)


__all__ = ["CfgLayout", "LAYOUTS", "ORDERS", "SLOT", "decide", "load", "offset_needed", "store"]
