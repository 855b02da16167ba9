"""Attention actions from a redundancy map: DiTFastAttn's greedy calibration and a planner for a
compute budget (issue 15 item 6).

Both choose, per (step, attention site), among ``compute`` (full attention), ``reuse`` (DiTFastAttn's
AST: the output of the site's last full step), ``window`` (WA-RS: window attention plus the residual
``full - window`` of the last full step; self-attention only) and ``share_cfg`` (ASC: the
unconditional branch takes the conditional output plus the offset of the last full step), from
the samples ``ditopt.profile(..., attention_window=W)`` keeps (``ditopt/profile_attention.py``).

**The replayed error.** The error of an action at step ``t``, with ``b`` the site's last full
step before ``t``, is the relative squared error of the site's SDPA output, on the sampled
elements, summed over the CFG lanes: ``|F_b - F_t|^2 / |F_t|^2`` for reuse, ``|R_b - R_t|^2 / |F_t|^2``
for window, ``|(U_b - C_b) - (U_t - C_t)|^2 / |F_t|^2`` for share_cfg (``F`` the output, ``R`` the
window residual, ``U``/``C`` the uncond/cond lanes). ``b`` follows the choices already made, so a
run of steps that do not compute ages the cache, and a step at which the enclosing block does
not run (``skipped``) does not refresh it. It is measured on the clean calibration trajectory: how
an error at one step changes what the model sees later is not replayed.

**Costs** (per step, in FLOPs, with CFG's calls counted): ``rmap.flops`` per site call; reuse
saves the whole site, share_cfg half of it (the uncond half or call), window the difference of
full and window attention of its SDPA calls (:func:`ditopt.flops.window_attention_flops`), less
the window attention a full step runs to keep the residual when a window step follows. A plan's
``compute_fraction`` is of the block FLOPs of the stack, as ``plan_from_profile``'s.

**One kind per site.** A plan gives a site one kind of non-compute action
(``resolve._assign_slots``), so both the greedy calibration and the planner keep, per site, the
first kind they choose; later steps choose between it and compute. DiTFastAttn's combined
``WA-RS + ASC`` candidate (window on the cond branch, sharing on the uncond) is two kinds at one
(site, step) and is not offered.

Example (a made-up map: one self-attention site whose window residual never changes, so window
costs nothing; reuse misses a change of the output)::

    >>> import torch
    >>> rmap = synthetic_map(steps=5, outputs=torch.arange(5.0)[:, None, None] + torch.ones(5, 1, 8),
    ...                      residuals=torch.ones(5, 1, 8))
    >>> sch = schedule_attention(rmap, budget=0.9)
    >>> sch.actions["b0.attn1"], sch.compute_fraction
    (['compute', 'window', 'window', 'window', 'compute'], 0.9)
    >>> greedy_calibration(rmap, threshold=0.1).actions["b0.attn1"]
    ['compute', 'window', 'window', 'window', 'window']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditopt.runtime.cfg_sharing import CfgLayout
from ditopt.runtime.decisions import Action

from .errors import check_count, check_number
from .plan import Plan, Rule
from .profile import ProfileError, RedundancyMap

COMPUTE, REUSE, WINDOW, SHARE = Action.COMPUTE.value, Action.REUSE.value, Action.WINDOW.value, Action.SHARE_CFG.value
SKIPPED = "skipped"  # the enclosing block does not run at this step (a block schedule's reuse)

__all__ = ["AttentionSchedule", "AttentionReplay", "greedy_calibration", "calibrated_plan", "schedule_attention", "plan_attention",
           "attention_for_schedule", "synthetic_map"]


@dataclass
class AttentionSchedule:
    """An action per (attention site, step), with what the replay predicts of it."""

    steps: int
    actions: dict[str, list[str]]  # site -> compute | reuse | window | share_cfg | skipped per step
    window: int
    cfg: CfgLayout | None
    compute_fraction: float  # of the stack's block FLOPs (a block schedule's skipped steps included)
    predicted_error: float  # RMS over (step, site) of the replayed relative error (0 where computing)

    def rules(self) -> list[Rule]:
        """One rule per (action, steps), naming the sites that share them (none for compute)."""
        groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for site, row in self.actions.items():
            for action in (REUSE, WINDOW, SHARE):
                steps = tuple(t for t, a in enumerate(row) if a == action)
                if steps:
                    groups.setdefault((action, steps), []).append(site)
        return [Rule(sites=tuple(sites), kind="attention", action=action, steps=steps,
                     window=self.window if action == WINDOW else None, cfg=self.cfg if action == SHARE else None)
                for (action, steps), sites in groups.items()]

    def to_plan(self, model: str | None, name: str) -> Plan:
        plan = Plan(steps=self.steps, rules=self.rules() or [Rule(sites=("*",), kind="block", action=COMPUTE)],
                    model=model, name=name)
        plan.check()
        return plan


class AttentionReplay:
    """The replayed errors and FLOPs of the attention actions on a map's sites (module docstring).

    ``error(site, kind, t, b)``: relative squared error of ``kind`` at step ``t`` with the cache
    of full step ``b``; ``row_error`` / ``row_cost`` price a site's whole row of actions.
    """

    def __init__(self, rmap: RedundancyMap, sites: list[str] | None = None, cfg=None):
        a = rmap.attention
        if a is None:
            raise ProfileError("the redundancy map has no attention samples: profile with "
                               "ditopt.profile(..., attention_window=W) (a resampled map drops them)")
        self.rmap, self.samples, self.steps, self.window = rmap, a, rmap.steps, a.window
        self.block_of = {s: _block_of(rmap, s) for s in a.outputs}
        names = list(sites) if sites is not None else [s for s in a.outputs if self.block_of[s] is not None]
        unknown = [s for s in names if s not in a.outputs]
        if unknown:
            raise ProfileError(f"site {unknown[0]!r} has no attention samples; sampled: {list(a.outputs)[:4]}")
        if not names:
            raise ProfileError("no attention site of the map lies inside a block of the stack")
        self.sites = names
        self.cfg = _layout(a.layout, cfg)
        calls = max(1, rmap.branches)  # FLOPs per step: every CFG call
        self.block_step = sum(rmap.flops[b] for b in rmap.stack) * calls
        self.full = {s: rmap.flops[s] * calls for s in names}
        self.window_cost = {s: (a.sdpa_flops(s) - a.sdpa_flops(s, a.window)) * calls for s in names}
        self.window_run = {s: a.sdpa_flops(s, a.window) * calls for s in names}
        self.saving = {s: self._savings(s) for s in names}
        self.tables = {s: self._tables(s) for s in names}

    def _savings(self, s: str) -> dict[str, float]:
        """Per-step FLOPs each kind saves at ``s``, most compressive first; kinds that save nothing
        or that the site cannot take are left out."""
        out = {REUSE: self.full[s]}
        if s in self.samples.residuals and self.window_cost[s] > 0:
            out[WINDOW] = self.window_cost[s]
        if self.samples.lanes == 2 and self.cfg is not None:
            out[SHARE] = self.full[s] / 2
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _tables(self, s: str) -> dict[str, torch.Tensor]:
        """``[t, b]`` relative squared errors of each kind (full step ``b`` stands in at ``t``)."""
        f = self.samples.outputs[s].double()
        energy = (f ** 2).sum(dim=(1, 2)).clamp_min(1e-30)[:, None]
        flat = f.reshape(self.steps, -1)
        out = {REUSE: torch.cdist(flat, flat) ** 2 / energy}
        if WINDOW in self.saving[s]:
            r = self.samples.residuals[s].double().reshape(self.steps, -1)
            out[WINDOW] = torch.cdist(r, r) ** 2 / energy
        if SHARE in self.saving[s]:
            off = f[:, 1] - f[:, 0]
            out[SHARE] = torch.cdist(off, off) ** 2 / energy
        return {k: v.tolist() for k, v in out.items()}

    def error(self, site: str, kind: str, t: int, b: int) -> float:
        return self.tables[site][kind][t][b]

    def step_errors(self, kind: str) -> torch.Tensor:
        """``[steps, sites]``: the relative error of ``kind`` at each step with the step before
        computed (NaN at step 0 and where the site cannot take it): the per-(step, site) score."""
        out = torch.full((self.steps, len(self.sites)), math.nan)
        for i, s in enumerate(self.sites):
            if kind in self.tables[s]:
                for t in range(1, self.steps):
                    out[t, i] = math.sqrt(self.tables[s][kind][t][t - 1])
        return out

    def row_error(self, site: str, row: list[str]) -> float:
        """Sum over steps of the replayed relative squared error (inf if a step has no full step before)."""
        total, b = 0.0, -1
        for t, action in enumerate(row):
            if action == COMPUTE:
                b = t
            elif action != SKIPPED:
                if b < 0:
                    return math.inf
                total += self.tables[site][action][t][b]
        return total

    def row_cost(self, site: str, row: list[str]) -> float:
        """FLOPs the site executes over the row (skipped steps: none)."""
        total = 0.0
        for t, action in enumerate(row):
            if action == COMPUTE:
                total += self.full[site]
                nxt = next((a for a in row[t + 1:] if a not in (SKIPPED,)), COMPUTE)
                if nxt == WINDOW:  # this full step keeps the residual: it runs window attention too
                    total += self.window_run[site]
            elif action == WINDOW:
                total += self.full[site] - self.window_cost[site]
            elif action == SHARE:
                total += self.full[site] / 2
        return total

    def schedule(self, rows: dict[str, list[str]], block_flops: float) -> AttentionSchedule:
        """``rows`` priced: ``block_flops`` is what the blocks execute with every attention site computing."""
        saved = sum(self.row_cost(s, [COMPUTE if a != SKIPPED else SKIPPED for a in r]) - self.row_cost(s, r)
                    for s, r in rows.items())
        pairs = sum(1 for r in rows.values() for a in r if a != SKIPPED)
        error = sum(self.row_error(s, r) for s, r in rows.items())
        return AttentionSchedule(self.steps, {s: list(r) for s, r in rows.items()}, self.window, self.cfg,
                                 (block_flops - saved) / (self.block_step * self.steps),
                                 math.sqrt(error / max(pairs, 1)))


def _block_of(rmap: RedundancyMap, site: str) -> str | None:
    """The block of the stack that contains ``site`` (None: outside the stack)."""
    seen, p = set(), rmap.parents.get(site)
    while p is not None and p not in seen:
        if p in rmap.stack:
            return p
        seen.add(p)
        p = rmap.parents.get(p)
    return None


def _layout(recorded: str | None, cfg) -> CfgLayout | None:
    """The CFG layout share_cfg rules carry: ``cfg`` (a CfgLayout, mapping or layout name) if
    given, else the recorded layout with diffusers' order; None without two CFG lanes."""
    if recorded is None:
        return None
    try:
        layout = CfgLayout.read(cfg) if cfg is not None else CfgLayout(recorded)
    except ValueError as exc:
        raise ProfileError(f"cfg: {exc}") from None
    if layout.layout != recorded:
        raise ProfileError(f"cfg says {layout.layout!r} but the calibration run had CFG as {recorded!r}")
    return layout


def _check_warmup(warmup, steps: int) -> int:
    check_count(warmup, "warmup", minimum=1, error=ProfileError)
    if warmup >= steps:
        raise ProfileError(f"warmup must be less than the map's {steps} steps, got {warmup}")
    return warmup


def greedy_calibration(rmap: RedundancyMap, threshold: float, *, warmup: int = 1, cfg=None,
                       sites: list[str] | None = None) -> AttentionSchedule:
    """DiTFastAttn's greedy calibration on the replay: for each step from ``warmup`` on, for each
    attention site in order, the first candidate, most compressive first (reuse, window,
    share_cfg, ordered by the FLOPs they save here), whose replayed relative error
    (``sqrt`` of :meth:`AttentionReplay.error`) is below ``threshold``; else full attention. The
    first kind a site takes is its only one (module docstring). ``threshold=0`` computes everything.
    """
    check_number(threshold, "threshold", minimum=0, error=ProfileError)
    replay = AttentionReplay(rmap, sites, cfg)
    _check_warmup(warmup, rmap.steps)
    rows = {s: [COMPUTE] * rmap.steps for s in replay.sites}
    lock: dict[str, str] = {}
    for t in range(warmup, rmap.steps):
        for s in replay.sites:
            b = max(i for i in range(t) if rows[s][i] == COMPUTE)
            for kind in replay.saving[s]:
                if lock.get(s, kind) == kind and math.sqrt(replay.error(s, kind, t, b)) < threshold:
                    rows[s][t] = lock[s] = kind
                    break
    return replay.schedule(rows, replay.block_step * rmap.steps)


def calibrated_plan(rmap: RedundancyMap | None, steps: int, threshold: float | None, *, window: int | None = None,
                    warmup: int = 1, cfg=None) -> Plan:
    """``presets.ditfastattn(steps, threshold=..., rmap=...)``: :func:`greedy_calibration` as a plan,
    after checking that the map fits (``steps``, and ``window`` if given)."""
    if rmap is None or threshold is None:
        raise ProfileError("ditfastattn's greedy calibration needs both threshold= and rmap= (a redundancy map "
                           "from ditopt.profile(..., attention_window=W)); without them it is the static schedule")
    rmap.check_fits(steps=steps)
    if rmap.attention is not None and window is not None and window != rmap.attention.window:
        raise ProfileError(f"window={window}, but the map sampled the residual of a {rmap.attention.window}-token "
                           f"window: profile with attention_window={window}")
    sch = greedy_calibration(rmap, threshold, warmup=warmup, cfg=cfg)
    return sch.to_plan(rmap.model, f"ditfastattn-{sch.window}-t{threshold}")


def schedule_attention(rmap: RedundancyMap, budget: float, *, warmup: int = 1, cfg=None,
                       sites: list[str] | None = None,
                       block_actions: dict[str, list[str]] | None = None) -> AttentionSchedule:
    """The attention actions that bring the stack's block FLOPs to ``budget`` (a fraction of
    all-compute in (0, 1]) at the least replayed error: greedily, the (site, step, action) with the
    least added error per FLOP saved, until the budget is met (ProfileError if these actions
    cannot reach it). ``block_actions`` (a block Schedule's ``actions``: block -> action per step)
    marks the steps at which a block does not compute: its attention sites are ``skipped`` there,
    cost nothing more and keep no cache; the budget counts the blocks' own savings too."""
    from .planner import check_budget

    check_budget(budget)
    replay = AttentionReplay(rmap, sites, cfg)
    _check_warmup(warmup, rmap.steps)
    n = rmap.steps
    runs = {b: [True] * n for b in rmap.stack}
    for b, row in (block_actions or {}).items():
        if b not in runs or len(row) != n:
            raise ProfileError(f"block_actions: {b!r} must be a block of the map's stack with {n} actions")
        runs[b] = [a == COMPUTE for a in row]
    rows = {s: [COMPUTE if runs[replay.block_of[s]][t] else SKIPPED for t in range(n)] for s in replay.sites}
    executed = sum(rmap.flops[b] * max(1, rmap.branches) * sum(runs[b]) for b in rmap.stack)
    target = budget * replay.block_step * n
    lock: dict[str, str] = {}
    best = {s: _best_move(replay, s, rows[s], lock.get(s), warmup) for s in replay.sites}
    while executed > target + 1e-9 * target:
        moves = [(m[0], i, s) for i, (s, m) in enumerate(best.items()) if m is not None]
        if not moves:
            least = (executed) / (replay.block_step * n)
            raise ProfileError(f"budget {budget} is below the least these attention actions reach ({least:.3f}, "
                               f"steps 0-{warmup - 1} computed, one kind of action per site)")
        _, _, s = min(moves)
        _, rows[s], lock[s], saved = best[s]
        executed -= saved
        best[s] = _best_move(replay, s, rows[s], lock[s], warmup)
    return replay.schedule(rows, sum(rmap.flops[b] * max(1, rmap.branches) * sum(runs[b]) for b in rmap.stack))


def _best_move(replay: AttentionReplay, s: str, row: list[str], lock: str | None, warmup: int):
    """(added error per FLOP saved, new row, its kind, FLOPs saved) of the best change of ``row``:
    one more step takes an action (the site's kind once it has one), or every step of the site's
    kind switches to a kind that saves more (so that a cheap first choice does not cap the site)."""
    base_e, base_c = replay.row_error(s, row), replay.row_cost(s, row)
    candidates = [(row[:t] + [kind] + row[t + 1:], kind) for t in range(warmup, len(row)) if row[t] == COMPUTE
                  for kind in ([lock] if lock else replay.saving[s])]
    if lock:
        candidates += [([kind if a == lock else a for a in row], kind) for kind in replay.saving[s]
                       if replay.saving[s][kind] > replay.saving[s][lock]]
    best = None
    for new, kind in candidates:
        saved = base_c - replay.row_cost(s, new)
        err = replay.row_error(s, new)
        if saved <= 0 or math.isinf(err):
            continue
        score = (err - base_e) / saved
        if best is None or score < best[0]:
            best = (score, new, kind, saved)
    return best


def plan_attention(rmap: RedundancyMap, budget: float, *, warmup: int = 1, cfg=None,
                   sites: list[str] | None = None) -> Plan:
    """:func:`schedule_attention` as a plan (blocks always compute).

    Example::

        >>> import torch
        >>> rmap = synthetic_map(steps=4, outputs=torch.ones(4, 2, 16), residuals=torch.rand(4, 2, 16))
        >>> [(r.action, r.step_list(4)) for r in plan_attention(rmap, budget=0.9).rules]   # outputs never change
        [('reuse', [1])]
    """
    sch = schedule_attention(rmap, budget, warmup=warmup, cfg=cfg, sites=sites)
    return sch.to_plan(rmap.model, f"attention budget={budget}")


def attention_for_schedule(rmap: RedundancyMap, schedule, budget: float, **knobs) -> AttentionSchedule:
    """The attention actions at the steps where a block ``schedule`` (``planner.Schedule``)
    computes, to bring the whole plan to ``budget``; ``schedule.to_plan(...)`` rules followed by
    ``.rules()`` of the result make one plan (run on dit-digits in ``tests/test_attention_plan.py``)::

        block = ditopt.planner.schedule_from_profile(rmap, budget=0.7)
        att = attention_for_schedule(rmap, block, budget=0.6, warmup=2)
        plan = block.to_plan(rmap.model, "p")
        plan = Plan(steps=plan.steps, rules=plan.rules + att.rules(), model=plan.model, name="p")

    ``knobs``: ``warmup``, ``cfg``, ``sites``."""
    actions = {b: list(row) for b, row in schedule.actions.items() if b in rmap.stack}
    return schedule_attention(rmap, budget, block_actions=actions, **knobs)


def synthetic_map(steps: int, outputs: torch.Tensor, residuals: torch.Tensor | None = None, *,
                  tokens: int = 64, window: int = 16, layout: str | None = None) -> RedundancyMap:
    """A one-block map with one self-attention site ``b0.attn1`` whose SDPA samples are given
    (``[steps, lanes, keep]``; two lanes are CFG, batched unless ``layout`` says ``calls``), for
    tests and examples. Its SDPA call is ``[1, 1, tokens, 4]`` (``A`` FLOPs full, ``A / 4`` at
    the default window); the site costs ``2 A`` per call, the block ``4 A``."""
    from .profile import signature
    from .profile_attention import AttentionSamples
    from .runtime.observe import METRICS

    lanes = outputs.shape[1]
    layout = layout or ("batched" if lanes == 2 else None)
    shape = (1, 1, tokens, 4)
    a = AttentionSamples(window, layout, {"b0.attn1": "self"}, {"b0.attn1": [(shape, shape, shape)]},
                         {"b0.attn1": outputs.float()}, {} if residuals is None else {"b0.attn1": residuals.float()})
    sdpa = a.sdpa_flops("b0.attn1")
    sites, kinds = ["b0", "b0.attn1"], ["block", "attention"]
    branches = 2 if layout == "calls" else 1
    return RedundancyMap(model="Synthetic", signature=signature("Synthetic", sites, kinds), steps=steps,
                         branches=branches, sites=sites, kinds=kinds, parents={"b0": "stack", "b0.attn1": "b0"},
                         residual_form={"b0": True, "b0.attn1": False},
                         flops={"b0": 4 * sdpa, "b0.attn1": 2 * sdpa}, seconds={"b0": 0.0, "b0.attn1": 0.0},
                         timesteps=[float(999 - t) for t in range(steps)],
                         metrics={m: torch.full((steps, 2, branches), math.nan) for m in METRICS},
                         samples={s: torch.zeros(steps, branches, 1) for s in sites}, stack=["b0"], attention=a)
