"""The decision table: which action every site takes at every step of one compiled graph.

``Plan.compile(sites)`` builds it, the backend hands it to :meth:`Runtime.set_graph`, and the
runtime only indexes it. It is the one owner of the action names (:class:`Action`), of the
cache slot each reusing site reads, and of the nested-skip rule: a site inside a region that
does not compute at a call is not executed there, whatever its own row says.

Example:
    >>> table = DecisionTable(steps=2, actions={"blocks.0": [Action.COMPUTE, Action.REUSE_RESIDUAL]},
    ...     adaptive={"blocks.0": [None, None]}, slots={"blocks.0": "residual"},
    ...     parents={"blocks.0": ["stack"], "blocks.0.attn1": ["blocks.0", "stack"]},
    ...     site_order=["stack", "blocks.0", "blocks.0.attn1"])
    >>> table.action("blocks.0", 1), table.action("blocks.0.attn1", 1)
    ('reuse_residual', 'compute')
    >>> table.with_nested_skips({"stack": "compute", "blocks.0": "reuse_residual", "blocks.0.attn1": "compute"})
    {'stack': 'compute', 'blocks.0': 'reuse_residual', 'blocks.0.attn1': 'skipped'}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .cfg_sharing import CfgLayout


class Action(str, Enum):
    """What a site does at a step. The values are the plan's YAML spellings."""

    COMPUTE = "compute"  # run the site
    REUSE = "reuse"  # return its cached output
    REUSE_RESIDUAL = "reuse_residual"  # add its cached residual (output - input) to its input; an output
    # that no input is shaped like (a broadcast stream) is cached and reused as it is
    PREDICT = "predict"  # forecast of its residual (or output) from its last computed steps (by a method)
    WINDOW = "window"  # self-attention: window attention plus the residual (full - window) of its last full step
    SHARE_CFG = "share_cfg"  # the unconditional CFG branch: the conditional branch's output plus a cached offset
    STALE_KV = "stale_kv"  # sequence parallelism: self-attention over fresh local and kept remote K/V (no exchange)
    PARTIAL = "partial"  # token-wise: recompute the tokens whose input changed most, the others from the cache
    SKIPPED = "skipped"  # stats only: an enclosing site did not compute, so this one did not run

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # as the plain string prints, so that tables and stats read as YAML does
        return repr(self.value)

    def __hash__(self) -> int:  # as the plain string's, so that either finds the other in a dict
        return str.__hash__(self)


# what a rule may say
PLAN_ACTIONS = (Action.COMPUTE, Action.REUSE, Action.REUSE_RESIDUAL, Action.PREDICT, Action.WINDOW, Action.SHARE_CFG)
PLAN_ACTIONS += (Action.STALE_KV,)  # runtime/stale_kv.py
# the cache slot a reusing action reads (``window``: the residual full - window at each SDPA call of the site)
# ``share_cfg``: the offset uncond - cond (runtime/cfg_sharing.py)
SLOTS = {Action.REUSE: "output", Action.REUSE_RESIDUAL: "residual", Action.WINDOW: "window",
         Action.SHARE_CFG: "share_cfg"}
# stale_kv keeps the remote K/V under its own keys (runtime/stale_kv.py); the cost model counts them output-sized
# (exact at 2 ranks for an attention site whose output is [B, N, heads x dim]: remote K + V = 2 x N/2 tokens)
SLOTS[Action.STALE_KV] = "output"
PLAN_ACTIONS += (Action.PARTIAL,)  # runtime/partial.py, passes/insert_partial.py
SLOTS[Action.PARTIAL] = "partial"  # partial0: the site's output, partial1: the input it was computed from
RUNNING = (Action.COMPUTE, Action.WINDOW, Action.STALE_KV)  # actions at which a site runs (the sites inside it run too)


@dataclass(frozen=True)
class Indicator:
    """A ``when`` rule resolved against a graph: the rule's ``of`` site and bound, the graph node
    whose change is accumulated (``of``'s first live-out, or its modulated input), and the
    polynomial the change goes through first (highest power first; None is the identity)."""

    of: str
    below: float
    node: str
    rescale: tuple[float, ...] | None = None


@dataclass
class DecisionTable:
    """Actions per (site, step) for one graph, with what the runtime needs to carry them out.

    ``actions[site][step]``: only sites with some non-compute step appear.
    ``adaptive[site][step]``: the index into ``indicators`` of the ``when`` rule deciding that
    (site, step), else None. ``slots[site]``: the cache slot a reusing site reads ("output" or
    "residual"). ``orders[site][step]``: a ``predict`` step's order (0 elsewhere).
    ``methods[site][step]``: a ``predict`` step's forecaster (``runtime.forecast.METHODS``; "" elsewhere,
    and a site or table without the row forecasts with taylor).
    ``windows[site][step]``: a ``window`` step's window in tokens (0 elsewhere); the rewritten graph
    holds one window per site, so a site's window steps share one size.
    ``parents[site]``: the sites that contain it; ``site_order``: every site in graph order.
    ``runs[lead]``: the sites a coalesced region stands for (the graph decides and caches once
    for the run, under the lead's name; the stats report each member).
    ``cfg``: the CFG layout of a plan with ``share_cfg`` steps (:class:`~ditopt.runtime.cfg_sharing.CfgLayout`).
    """

    steps: int
    actions: dict[str, list[Action]]
    adaptive: dict[str, list[int | None]]
    slots: dict[str, str]
    indicators: list[Indicator] = field(default_factory=list)
    orders: dict[str, list[int]] = field(default_factory=dict)
    methods: dict[str, list[str]] = field(default_factory=dict)  # predict: taylor | hermite | foca | freq
    windows: dict[str, list[int]] = field(default_factory=dict)  # window: tokens of the window (0 elsewhere)
    parents: dict[str, list[str]] = field(default_factory=dict)
    site_order: list[str] = field(default_factory=list)
    runs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a coalesced run's lead -> its sites
    ratios: dict[str, list[float]] = field(default_factory=dict)  # partial: share of tokens recomputed (0 elsewhere)
    cfg: CfgLayout | None = None  # share_cfg: how the caller runs CFG (None: no share_cfg step)

    def members(self, site: str) -> tuple[str, ...]:
        """The sites a decision about ``site`` is for: the run it leads, or itself."""
        return self.runs.get(site, (site,))

    @property
    def when_rules(self) -> list[tuple[str, float]]:
        """``(of, below)`` of each ``when`` rule, in rule order."""
        return [(i.of, i.below) for i in self.indicators]

    @property
    def depth(self) -> int:
        """Computed steps each cache key must keep: the highest Taylor order + 1."""
        return 1 + max((max(row) for row in self.orders.values() if row), default=0)

    def action(self, site: str, step: int) -> Action:
        """The planned action of ``site`` at ``step`` (compute for unplanned sites and steps)."""
        row = self.actions.get(site)
        return row[step] if row is not None and 0 <= step < self.steps else Action.COMPUTE

    def order(self, site: str, step: int) -> int:
        row = self.orders.get(site)
        return row[step] if row is not None and 0 <= step < self.steps else 0

    def method(self, site: str, step: int) -> str:
        """The forecaster of a ``predict`` step (taylor where the table says none)."""
        row = self.methods.get(site)
        return (row[step] if row is not None and 0 <= step < self.steps else "") or "taylor"

    def window(self, site: str, step: int) -> int:
        """The window (tokens) of a ``window`` step, 0 at other steps."""
        row = self.windows.get(site)
        return row[step] if row is not None and 0 <= step < self.steps else 0

    def window_of(self, site: str) -> int:
        """The one window the graph computes for ``site``, 0 if it never takes ``window``."""
        return max(self.windows.get(site, ()), default=0)

    def windowed(self) -> dict[str, int]:
        """``{site: window}`` for every site that takes ``window`` at some step."""
        return {s: w for s in self.actions if (w := self.window_of(s))}

    def residual_needed(self, site: str, step: int) -> bool:
        """Whether a full step of a ``window`` site must also compute its residual (full - window):
        a later ``window`` step comes before the site next runs full attention for sure (a full
        step inside a site that computes at that step). Elsewhere the window part is not run."""
        for later in range(step + 1, self.steps):
            action = self.action(site, later)
            if action == Action.WINDOW:
                return True
            if action == Action.COMPUTE and all(self.action(p, later) in RUNNING for p in self.parents.get(site, ())):
                return False
        return False

    def cfg_shared(self) -> list[str]:
        """The sites that take ``share_cfg`` at some step, with batched CFG (they compute half the
        batch there: ``passes/insert_cfg_sharing.py`` rewrites them); [] for CFG as two calls."""
        if self.cfg is None or self.cfg.layout != "batched":
            return []
        return [s for s, row in self.actions.items() if Action.SHARE_CFG in row]

    def ratio_of(self, site: str) -> float:
        """The one ratio of tokens a ``partial`` site recomputes (the graph holds one), 0 if none."""
        return max(self.ratios.get(site, ()), default=0.0)

    def partials(self) -> dict[str, float]:
        """``{site: ratio}`` for every site that takes ``partial`` at some step."""
        return {s: r for s in self.actions if (r := self.ratio_of(s))}

    def share_cfg_flops(self, decisions: dict[str, list[str]], per_call: dict[str, int],
                        inside: dict[str, list[str]]) -> int:
        """FLOPs the batched ``share_cfg`` sites execute at the calls of ``decisions`` (one row per
        site, one entry per call): half of each site's ``per_call`` FLOPs, at a call where the site
        (a block of ``inside``) shares, or where a site inside a computing block does; the cost
        model counts such a site as not run. 0 for CFG as two calls (the unconditional call skips)."""
        if self.cfg is None or self.cfg.layout != "batched":
            return 0
        total = 0
        for block, members in inside.items():
            for call, action in enumerate(decisions.get(block, ())):
                if action == Action.SHARE_CFG:
                    total += per_call[block] // 2
                elif action == Action.COMPUTE:
                    total += sum(per_call[s] // 2 for s in members
                                 if call < len(decisions.get(s, ())) and decisions[s][call] == Action.SHARE_CFG)
        return total

    def partial_flops(self, decisions, per_call: dict[str, int], blocks: list[str]) -> float:
        """Block FLOPs the ``partial`` steps of ``decisions`` (one row per site, one entry per call)
        execute: ``ratio`` of the site's FLOPs at each (the K/V of all tokens a self-attention site
        recomputes are not counted). The cost model adds these to what the blocks compute."""
        return sum(self.ratio_of(s) * per_call[s] for s, row in decisions.items() for a in row
                   if a == Action.PARTIAL and (s in blocks or set(self.parents.get(s, ())) & set(blocks)))

    def running(self) -> tuple[Action, ...]:
        """The actions at which a site runs (the sites inside it run too): with batched CFG a
        ``share_cfg`` site runs, on half the batch."""
        batched = self.cfg is not None and self.cfg.layout == "batched"
        return RUNNING + (Action.SHARE_CFG,) if batched else RUNNING

    def schedule(self, site: str) -> tuple:
        """What must be equal along a coalesced run: action, ``when`` rule, order, forecaster and
        window at every step (``passes.coalesce_regions`` compares these)."""
        methods = tuple(self.method(site, t) if a == Action.PREDICT else "" for t, a in enumerate(self.actions[site]))
        return (tuple(self.actions[site]), tuple(self.adaptive[site]), tuple(self.orders.get(site, ())), methods,
                tuple(self.windows.get(site, ())))

    def action_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.actions.values():
            for a in row:
                counts[a.value] = counts.get(a.value, 0) + 1
        return counts

    def with_nested_skips(self, call: dict[str, str]) -> dict[str, str]:
        """One call's decisions with every site inside a site that did not run marked skipped (a
        ``window`` site runs: only its attention kernel changes)."""
        running = self.running()
        return {site: Action.SKIPPED.value if any(call.get(p, Action.COMPUTE) not in running
                                                  for p in self.parents.get(site, ())) else str(action)
                for site, action in call.items()}

    def static_decisions(self, step_of_call: list[int], sites: list[str] | None = None) -> dict[str, list[str]]:
        """The decisions a static table makes at these calls (one step per call), nested skips
        included: what ``ditopt.stats(model).decisions`` reports after such a run."""
        names = self.site_order if sites is None else sites
        rows: dict[str, list[str]] = {s: [] for s in names}
        calls_layout = self.cfg is not None and self.cfg.layout == "calls"
        branch, previous = 0, None
        for step in step_of_call:
            branch = branch + 1 if step == previous else 0  # the call's place in its step
            previous = step
            call = {s: str(self.action(s, step)) for s in {*names, *(p for s in names for p in self.parents.get(s, ()))}}
            if calls_layout and branch == self.cfg.cond_half:  # CFG as calls: the conditional call computes
                call = {s: Action.COMPUTE.value if a == Action.SHARE_CFG else a for s, a in call.items()}
            resolved = self.with_nested_skips(call)
            for s in names:
                rows[s].append(resolved[s])
        return rows

    def incompatibility(self, other: "DecisionTable") -> str | None:
        """Why ``other`` cannot replace this table in an already rewritten graph, or None.

        The graph holds a skip branch and cache nodes per planned site (or coalesced run), and
        indicator nodes per ``when`` rule: a static table for the same sites, slots and step
        count, deciding each coalesced run alike, swaps in (and keeps the runs)."""
        if self.indicators or other.indicators:
            return "set_plan() swaps static plans only; this plan or the model's has `when` rules"
        if set(self.actions) != set(other.actions) or self.slots != other.slots:
            return (f"the plan addresses other sites than the compiled graph ({sorted(other.actions)} vs "
                    f"{sorted(self.actions)}); optimise again instead")
        if self.steps != other.steps:
            return f"plan has {other.steps} steps, the compiled graph {self.steps}"
        if self.cfg != other.cfg and (self.cfg_shared() or other.cfg_shared()):
            return (f"the compiled graph shares CFG branches as {self.cfg}, the plan as {other.cfg}; optimise again")
        if self.partials() != other.partials():
            return (f"the compiled graph recomputes tokens of {self.partials()} (site: ratio), the plan "
                    f"{other.partials()}; optimise again")
        if self.windowed() != other.windowed():
            return (f"the compiled graph computes window attention with windows {self.windowed()}, the plan "
                    f"{other.windowed()}; optimise again")
        stale = [{s for s, row in t.actions.items() if Action.STALE_KV in row} for t in (self, other)]
        if stale[0] != stale[1]:  # a stale_kv site keeps its nodes out of every region (runtime/stale_kv.py)
            return (f"the compiled graph has stale_kv sites {sorted(stale[0])}, the plan {sorted(stale[1])}; optimise "
                    f"again")
        for lead, run in self.runs.items():
            rows = {other.schedule(s) for s in run}
            if len(rows) > 1:
                return (f"the compiled graph decides {run[0]}..{run[-1]} as one region (coalesced), but the "
                        f"plan gives them different schedules; optimise again (or with coalesce=False)")
        return None


def keeps_residual(row: list[str], call: int, stride: int = 1) -> bool:
    """Whether a ``window`` site that ran full attention at ``call`` of a decisions row (one entry
    per call, ``stride`` calls per step) also computed its residual: a later call of the same CFG
    branch takes ``window`` before one runs full attention (what :meth:`DecisionTable.residual_needed`
    decides from the plan; the cost model reads it from decisions).

    >>> keeps_residual(["compute", "skipped", "window"], 0), keeps_residual(["compute", "compute", "window"], 0)
    (True, False)
    """
    for later in range(call + stride, len(row), stride):
        if row[later] == Action.WINDOW:
            return True
        if row[later] == Action.COMPUTE:
            return False
    return False


__all__ = ["Action", "DecisionTable", "Indicator", "PLAN_ACTIONS", "RUNNING", "SLOTS", "keeps_residual"]
