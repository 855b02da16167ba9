"""The per-model runtime: step state, cache store, decision tables and what was decided.

One :class:`Runtime` exists per optimised model. The custom ops of :mod:`ditopt.runtime.ops`
find it by its integer id (ops can only take plain values), and each graph compiled for the
model (one per input shape) registers its decision table here under a graph id.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import cfg_sharing
from .cache_store import CacheStore
from .decisions import Action, DecisionTable
from .forecast import forecast_by, taylor_forecast  # noqa: F401 - taylor_forecast re-exported (it lived here)
from .step_state import StepState

if TYPE_CHECKING:
    from .observe import Recorder

# The ops find a runtime by id; the wrapper that owns it (and the graphs compiled for it) keep it
# alive, so it goes with them.
_RUNTIMES: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


class ConcurrentCallError(RuntimeError):
    """A second thread called an optimised model while a call was in flight."""

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
        self.graphs: dict[int, DecisionTable] = {}  # graph id -> its decision table (set by the backend)
        self.signatures: dict[int, tuple] = {}  # graph id -> the shapes it was compiled for (set by the backend)
        self.records: list[CallRecord] = []  # one per call of the current generation
        self.backend: Any = None  # the DitoptBackend that compiles graphs for this runtime
        self.recorder: Recorder | None = None  # profiling: what ditopt::observe feeds
        self._accumulated: dict[tuple[int, int, int], torch.Tensor] = {}
        self._reuse_ok: dict[tuple[int, int, int], torch.Tensor] = {}
        # (site, branch) -> the last step it computed in any graph: another graph's cache older than that is not read
        self._computed_at: dict[tuple[str, int], int] = {}
        self._in_flight = threading.Lock()
        self._overran = False  # this generation has run past the plan's steps (warned once)
        self._ran = 0  # the steps the current generation has run
        self._short_warned = False  # a generation shorter than the plan was warned of (once per runtime)
        self._flags: dict[tuple[bool, torch.device], torch.Tensor] = {}  # decision constants per device
        self.comm_bytes: dict[str, int] = {}  # bytes sent by collective kind (and "total") this generation
        _RUNTIMES[self.id] = self

    # -- set-up ---------------------------------------------------------------------------
    def add_graph(self, decisions: DecisionTable) -> int:
        """Register a decision table under the next graph id, and return the id."""
        graph = len(self.graphs)
        self.set_graph(graph, decisions)
        return graph

    def set_graph(self, graph: int, decisions: DecisionTable) -> None:
        """Register the decision table of the graph compiled under id ``graph``; keep as many
        computed steps per cache key as its highest Taylor order needs (order + 1)."""
        self.graphs[graph] = decisions
        self.store.ensure_depth(decisions.depth)

    def reset(self) -> None:
        """Forget caches, step state and records (the next call starts a new generation)."""
        self.end_generation()
        self.records.clear()
        self.comm_bytes.clear()

    def end_generation(self) -> None:
        """Free the caches and make the next call start a new generation; keep the records of
        this one (what ``stats`` reports) until then."""
        self.state.reset()
        self.store.clear()
        self._ran = 0  # ended on purpose: not a generation shorter than the plan
        self._accumulated.clear()
        self._reuse_ok.clear()
        self._computed_at.clear()

    def guarded(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """``run`` (a compiled graph) made safe to call: one call at a time (a call from another
        thread while one is in flight raises :class:`ConcurrentCallError`; the state is per
        model, not per thread), and a call that raises (a bad input, an interrupt) ends the
        generation, so that no later call reuses what it half-computed or reads its caches under
        a shifted CFG branch: the next call starts a new generation.

        The graph holds its runtime weakly: the wrapper that owns the runtime decides its life
        (dynamo keeps compiled graphs of a class's ``forward`` after the model is gone).
        """
        ref = weakref.ref(self)

        def call(*args):
            runtime = ref()
            if runtime is None:
                raise RuntimeError("ditopt: this graph's runtime was released with the model that owned it")
            if not runtime._in_flight.acquire(blocking=False):
                raise ConcurrentCallError(
                    "ditopt: this optimised model is already running a call in another thread; its step state "
                    "and caches belong to one sampling loop at a time. Optimise one copy of the model per thread")
            try:
                return run(*args)
            except BaseException:
                runtime.reset()
                raise
            finally:
                runtime._in_flight.release()

        return call

    # -- called by the ops ----------------------------------------------------------------
    def begin(self, t: float | Callable[[], float], graph: int = -1,
              fingerprint: Callable[[], float] | None = None) -> None:
        """Start a call: advance the step state (``t()`` and ``fingerprint()`` are read only when
        the step is not told; see :meth:`StepState.observe`)."""
        ran, told = self._ran, self.state.told is not None
        step, branch, new_generation = self.state.observe(t, fingerprint)
        if new_generation:
            self._ran = 0
            self._warn_short(ran, told, self.graphs.get(graph))
            self.store.clear()
            self.records.clear()
            self.comm_bytes.clear()
            self._accumulated.clear()
            self._reuse_ok.clear()
            self._computed_at.clear()
            self._overran = False
        self._ran = max(self._ran, step + 1)
        self.records.append(CallRecord(step, branch, graph))
        table = self.graphs.get(graph)
        if table is not None and step >= table.steps and not self._overran:
            self._overran = True  # once per generation
            warnings.warn(f"ditopt: denoising step {step} is past the plan's {table.steps} steps, so it and every later "
                          f"step compute; make the plan for this sampler's step count (Plan.resample, or "
                          f"plan_from_profile(..., steps=N))", RuntimeWarning, stacklevel=2)

    def _warn_short(self, ran: int, told: bool, table: DecisionTable | None) -> None:
        """Once per runtime: the generation that just ended (found from the timestep, not ended by
        a reset) ran fewer steps than the plan has, so it followed only the plan's first steps."""
        if table is None or told or self._short_warned or not 1 < ran < table.steps:
            return
        self._short_warned = True
        warnings.warn(f"ditopt: the last generation ran {ran} steps of the plan's {table.steps}, so it followed only "
                      f"the plan's first {ran}; if the sampler runs {ran} steps, make the plan for {ran} "
                      f"(plan.resample({ran}), or plan_from_profile(..., steps={ran}))", RuntimeWarning, stacklevel=3)

    def key(self, graph: int, site: str, slot: str) -> tuple[int, str, str, int]:
        return (graph, site, slot, self.state.branch)

    def decide(self, graph: int, site: str, shape: tuple[int, ...]) -> bool | None:
        """True to compute, False to reuse, None when a ``when`` rule decides (see below)."""
        table = self.graphs[graph]
        step = self.state.step
        if table.action(site, step) == Action.SHARE_CFG:  # host-decided from the CFG branch (runtime/cfg_sharing.py)
            decision = cfg_sharing.decide(self, graph, site, shape)
            for member in table.members(site):
                self._record(member, Action.COMPUTE if decision else Action.SHARE_CFG)
            return decision
        decision: bool | None = True
        if table.action(site, step) != Action.COMPUTE:
            key = self.key(graph, site, table.slots[site] + "0")
            if self.store.has(key, shape) and self._current(key, table.members(site)):
                decision = None if table.adaptive[site][step] is not None else False
        if decision is not None:  # an adaptive decision is recorded by decide_adaptive
            for member in table.members(site):
                self._record(member, Action.COMPUTE if decision else table.action(site, step))
                if decision:
                    self._computed_at[(member, self.state.branch)] = step
        return decision

    def _current(self, key: tuple, sites) -> bool:
        """Whether the newest cached step of ``key`` is at least the last step any of ``sites``
        computed in any graph: after a call of another shape (a batch of another size) computed
        them, this graph's older cache is not what the plan's reuse means, and they compute."""
        newest = self.store.latest(key).step
        return all(newest >= self._computed_at.get((s, self.state.branch), -1) for s in sites)

    def decide_adaptive(self, graph: int, site: str, device: torch.device) -> torch.Tensor:
        """The compute predicate of an adaptive (site, step): a device tensor, never read here."""
        table = self.graphs[graph]
        rule = table.adaptive[site][self.state.step]
        reuse_ok = self._reuse_ok.get((graph, rule, self.state.branch))
        decided = Action.COMPUTE if reuse_ok is None else (reuse_ok, table.actions[site][self.state.step])
        for member in table.members(site):
            self.records[-1].decisions[member] = decided
        if reuse_ok is None:  # the rule's indicator has no history yet
            return self.flag(True, device)
        return (~reuse_ok).to(device)

    def flag(self, value: bool, device: torch.device) -> torch.Tensor:
        """A fresh bool scalar on ``device``: a device copy of a constant made once per device, so
        that a static decision costs no host-to-device transfer (and no stream sync) per call."""
        key = (bool(value), torch.device(device))
        constant = self._flags.get(key)
        if constant is None:
            constant = self._flags[key] = torch.tensor(bool(value), device=device)
        return constant.clone()

    def computed(self, site: str) -> bool | None:
        """Whether ``site`` computed at this call, as known on the host: None when a ``when`` rule
        decided it on the device; False when it was not decided at all (a site inside a region
        that did not compute is not reached)."""
        decision = self.records[-1].decisions.get(site) if self.records else None
        if isinstance(decision, tuple):
            return None
        return decision == Action.COMPUTE

    def update_indicator(self, graph: int, rule: int, value: torch.Tensor,
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Accumulate the relative L1 change of a ``when`` rule's watched tensor (its ``of``
        site's output or modulated input), rescaled if the rule says so, on device. ``reduce``
        (sequence parallelism) maps this rank's ``[mean |change|, mean |previous|]`` to their
        mean over the ranks, so that every rank decides from the same number."""
        indicator = self.graphs[graph].indicators[rule]
        key = (graph, rule, self.state.branch)
        prev_key = self.key(graph, f"when{rule}", "previous")
        previous = self.store.latest(prev_key)
        self.store.put(prev_key, self.state.step, value)
        if previous is None or previous.value.shape != value.shape:
            self._accumulated[key] = torch.zeros((), device=value.device)
            self._reuse_ok.pop(key, None)
            return
        prev = previous.value
        parts = torch.stack([(value - prev).abs().mean(), prev.abs().mean()])
        if reduce is not None:
            parts = reduce(parts)
        change = parts[0] / parts[1].clamp_min(1e-12)
        if indicator.rescale is not None:
            change = polyval(indicator.rescale, change)
        accumulated = self._accumulated.get(key, torch.zeros((), device=value.device)) + change
        reuse_ok = accumulated < indicator.below
        # A step that computes starts the accumulation again.
        self._accumulated[key] = torch.where(reuse_ok, accumulated, torch.zeros_like(accumulated))
        self._reuse_ok[key] = reuse_ok

    def load(self, graph: int, site: str, slot: str) -> torch.Tensor | None:
        """What a skipped site reads back at this call: the newest cached value, or for a
        ``predict`` step its forecast from the last ``order + 1`` computed steps by the step's
        ``method`` (taylor, hermite, foca or freq: :mod:`ditopt.runtime.forecast`; fewer cached
        steps lower the order, one is plain reuse)."""
        key = self.key(graph, site, slot)
        table = self.graphs.get(graph)
        if table is not None and slot.startswith(cfg_sharing.SLOT):  # the offset (+ the cond output, two calls)
            return cfg_sharing.load(self, graph, site, slot)
        step = self.state.step
        order = table.order(site, step) if table is not None else 0
        if order == 0:
            entry = self.store.latest(key)
            return None if entry is None else entry.value
        history = self.store.history(key)[-(order + 1):]
        if not history:
            return None
        return forecast_by(table.method(site, step), [e.step for e in history], [e.value for e in history], step)

    def _record(self, site: str, decision: Action) -> None:
        if self.records:
            self.records[-1].decisions[site] = decision

    # -- reading back -----------------------------------------------------------------------
    def decisions(self) -> dict[str, list[str]]:
        """One entry per call of the current (last) generation, for every site of the graph:
        compute, the reuse action taken, or skipped (inside a site that did not compute)."""
        if not self.records:
            return {}
        table = self.graphs.get(self.records[-1].graph) or DecisionTable(steps=0, actions={}, adaptive={}, slots={})
        sites = table.site_order or sorted({s for r in self.records for s in r.decisions})
        out: dict[str, list[str]] = {s: [] for s in sites}
        for record in self.records:
            call = {}
            for site in sites:
                d = record.decisions.get(site, Action.COMPUTE)
                if isinstance(d, tuple):  # (reuse_ok tensor, action), read only now
                    d = d[1] if bool(d[0]) else Action.COMPUTE
                call[site] = str(d)
            for site, d in table.with_nested_skips(call).items():
                out[site].append(d)
        return out


def polyval(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """``numpy.polyval`` on a tensor (Horner's rule, highest power first), staying on its device.

    >>> float(polyval((2.0, 0.0, 1.0), torch.tensor(3.0)))
    19.0
    """
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


def get_runtime(rid: int) -> Runtime:
    try:
        return _RUNTIMES[rid]
    except KeyError:
        raise RuntimeError(f"ditopt runtime {rid} no longer exists (was the model released?)") from None
