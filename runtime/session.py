"""The per-model runtime: step state, cache store, decision tables and what was decided.

One :class:`Runtime` exists per optimised model. The custom ops of :mod:`ditopt.runtime.ops`
find it by its integer id (ops can only take plain values), and each graph compiled for the
model (one per input shape) registers its decision table here under a graph id.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache_store import CacheStore
from .step_state import StepState

_RUNTIMES: dict[int, "Runtime"] = {}
_IDS = itertools.count(1)

COMPUTE = "compute"
SKIPPED = "skipped"


@dataclass
class GraphDecisions:
    """What one compiled graph needs from its plan.

    ``actions[site][step]`` is the action, ``adaptive[site][step]`` the index of the ``when``
    rule that governs that (site, step) or None, ``when_rules[i]`` the rule's ``(of, below)``.
    ``slots[site]`` names the cache slot a reusing site reads ("output" or "residual").
    ``parents[site]`` lists the sites that contain it (for "skipped" in the stats).
    """

    steps: int
    actions: dict[str, list[str]]
    adaptive: dict[str, list[int | None]]
    when_rules: list[tuple[str, float]]
    slots: dict[str, str]
    parents: dict[str, list[str]]
    site_order: list[str]


@dataclass
class CallRecord:
    step: int
    branch: int
    graph: int
    decisions: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """Step-indexed caches and decisions for one optimised model.

    Example:
        >>> rt = Runtime()
        >>> rt.begin(999.0); (rt.state.step, rt.state.branch)
        (0, 0)
    """

    def __init__(self, depth: int = 1):
        self.id = next(_IDS)
        self.state = StepState()
        self.store = CacheStore(depth=depth)
        self.graphs: dict[int, GraphDecisions] = {}
        self.records: list[CallRecord] = []
        self.param_ids: set[int] = set()
        self._graph_ids = itertools.count()
        self._accumulated: dict[tuple[int, int, int], torch.Tensor] = {}
        self._reuse_ok: dict[tuple[int, int, int], torch.Tensor] = {}
        self._module_ref: weakref.ref | None = None
        _RUNTIMES[self.id] = self

    # -- set-up ---------------------------------------------------------------------------
    def add_graph(self, decisions: GraphDecisions) -> int:
        graph = next(self._graph_ids)
        self.graphs[graph] = decisions
        return graph

    def reset(self) -> None:
        """Forget caches, step state and records (the next call starts a new generation)."""
        self.state.reset()
        self.store.clear()
        self.records.clear()
        self._accumulated.clear()
        self._reuse_ok.clear()

    # -- called by the ops ----------------------------------------------------------------
    def begin(self, t: float, graph: int = -1) -> None:
        step, branch, new_generation = self.state.observe(t)
        if new_generation:
            self.store.clear()
            self.records.clear()
            self._accumulated.clear()
            self._reuse_ok.clear()
        self.records.append(CallRecord(step, branch, graph))

    def key(self, graph: int, site: str, slot: str) -> tuple[int, str, str, int]:
        return (graph, site, slot, self.state.branch)

    def decide(self, graph: int, site: str, shape: tuple[int, ...]) -> bool | None:
        """True to compute, False to reuse, None when a ``when`` rule decides (see below)."""
        table = self.graphs[graph]
        step = self.state.step
        decision: bool | None = True
        if 0 <= step < table.steps and table.actions[site][step] != COMPUTE:
            if self.store.has(self.key(graph, site, table.slots[site] + "0"), shape):
                decision = None if table.adaptive[site][step] is not None else False
        self._record(site, COMPUTE if decision is True else table.actions[site][step] if decision is False else None)
        return decision

    def decide_adaptive(self, graph: int, site: str) -> torch.Tensor:
        """The compute predicate of an adaptive (site, step): a device tensor, never read here."""
        table = self.graphs[graph]
        rule = table.adaptive[site][self.state.step]
        reuse_ok = self._reuse_ok.get((graph, rule, self.state.branch))
        if reuse_ok is None:  # the rule's indicator has no history yet
            self.records[-1].decisions[site] = COMPUTE
            return torch.ones((), dtype=torch.bool)
        self.records[-1].decisions[site] = (reuse_ok, table.actions[site][self.state.step])
        return ~reuse_ok

    def update_indicator(self, graph: int, rule: int, value: torch.Tensor) -> None:
        """Accumulate the relative L1 change of a ``when`` rule's ``of`` output, on device."""
        table = self.graphs[graph]
        _, below = table.when_rules[rule]
        key = (graph, rule, self.state.branch)
        prev_key = self.key(graph, f"when{rule}", "previous")
        previous = self.store.latest(prev_key)
        self.store.put(prev_key, self.state.step, value)
        if previous is None or previous.value.shape != value.shape:
            self._accumulated[key] = torch.zeros((), device=value.device)
            self._reuse_ok.pop(key, None)
            return
        prev = previous.value
        change = (value - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
        accumulated = self._accumulated.get(key, torch.zeros((), device=value.device)) + change
        reuse_ok = accumulated < below
        # A step that computes starts the accumulation again.
        self._accumulated[key] = torch.where(reuse_ok, accumulated, torch.zeros_like(accumulated))
        self._reuse_ok[key] = reuse_ok

    def _record(self, site: str, decision: str | None) -> None:
        if decision is not None and self.records:
            self.records[-1].decisions[site] = decision

    # -- reading back -----------------------------------------------------------------------
    def decisions(self) -> dict[str, list[str]]:
        """One entry per call of the current (last) generation, for every site of the graph."""
        if not self.records:
            return {}
        table = self.graphs.get(self.records[-1].graph)
        sites = table.site_order if table else sorted({s for r in self.records for s in r.decisions})
        out: dict[str, list[str]] = {s: [] for s in sites}
        for record in self.records:
            resolved = {}
            for site in sites:
                d = record.decisions.get(site, COMPUTE)
                if isinstance(d, tuple):  # (reuse_ok tensor, action), read only now
                    d = d[1] if bool(d[0]) else COMPUTE
                resolved[site] = d
            for site in sites:
                parents = table.parents.get(site, []) if table else []
                if any(resolved[p] != COMPUTE for p in parents if p in resolved):
                    out[site].append(SKIPPED)
                else:
                    out[site].append(resolved[site])
        return out


def get_runtime(rid: int) -> Runtime:
    try:
        return _RUNTIMES[rid]
    except KeyError:
        raise RuntimeError(f"ditopt runtime {rid} no longer exists (was the model released?)") from None


def find_runtime(params: set[int]) -> Runtime | None:
    """The runtime whose captured parameters include any of ``params``, newest first."""
    for rt in reversed(list(_RUNTIMES.values())):
        if rt.param_ids & params:
            return rt
    return None
