"""Replayed errors of a schedule, and the dynamic program over them (the planner's inner loop).

A site that does not compute at step t stands in with one of its *forecasts*: reuse (order 0:
its value at the last computed step) or a ``predict`` of some forecaster and order from its last
computed steps (:mod:`ditopt.runtime.forecast`, the very functions the runtime calls). Its miss
at t is what the stand-in differs from what the site really produced at t on the calibration run,
replayed on the map's subsamples, so a forecaster is scored exactly as it will run.

A schedule is the set of computed steps; the state of the dynamic program is the tuple of the
last ``history`` computed steps (the points a forecast of the highest order reads). Errors are
cached per (step, history) and do not depend on the multiplier ``lam`` the planner bisects on.

Example:
    >>> import torch
    >>> from ditopt.replay import Forecast, SiteReplay, solve
    >>> y = torch.arange(6.0).reshape(6, 1, 1) ** 2              # a parabola in the step
    >>> cands = (Forecast("reuse"), Forecast("predict", "taylor", 1), Forecast("predict", "taylor", 2))
    >>> site = SiteReplay(y, torch.full((6,), 1 / 6), cands, max_gap=2)
    >>> site.miss(4, (1, 2, 3))[1]                              # three points: the parabola is exact
    Forecast(action='predict', method='taylor', order=2)
    >>> row, error, computed = solve(site, lam=1.0, cost=1.0, reuse="reuse")
    >>> ["compute" if c == "compute" else f"{c.action}{c.order}" for c in row], computed
    (['compute', 'reuse0', 'compute', 'compute', 'predict2', 'predict2'], 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditopt.runtime.forecast import forecast_by

__all__ = ["Forecast", "SiteReplay", "GroupReplay", "solve", "forecasts"]


@dataclass(frozen=True)
class Forecast:
    """One stand-in for a skipped step: ``reuse`` (the reuse action the site takes), or ``predict``
    with a forecaster ``method`` and ``order`` (points read: order + 1)."""

    action: str
    method: str | None = None
    order: int = 0

    def points(self) -> int:
        return self.order + 1


def forecasts(orders, methods) -> tuple[Forecast, ...]:
    """The distinct stand-ins of these orders and forecasters. At order 1 every forecaster here is
    the line through the last two points (hermite at its default scale and foca reduce to it), so
    order 1 is Taylor's alone; freq is not replayable on subsamples (it reads whole token rows).

    Example:
        >>> [f"{f.method}{f.order}" for f in forecasts((0, 1, 2), ("taylor", "foca"))]
        ['None0', 'taylor1', 'taylor2', 'foca2']
    """
    out = []
    if 0 in orders:
        out.append(Forecast("reuse"))
    if 1 in orders:
        out.append(Forecast("predict", "taylor", 1))
    for order in sorted(o for o in orders if o >= 2):
        out.extend(Forecast("predict", m, order) for m in methods)
    return tuple(out)


class SiteReplay:
    """Replayed misses of one site: ``samples`` ``[steps, branches, keep]``, step ``weights``."""

    def __init__(self, samples: torch.Tensor, weights: torch.Tensor, candidates: tuple[Forecast, ...], *,
                 max_gap: int, accumulation: float = 0.0, compute_last: bool = False, warmup: int | None = None):
        self.y = samples.double()
        self.n = self.y.shape[0]
        self.w = weights
        self.candidates = candidates
        self.history = max(2, max(c.points() for c in candidates))
        self.max_gap, self.accumulation = max_gap, float(accumulation)
        self.compute_last, self.warmup = compute_last, warmup
        self.energy = float((self.w[:, None] * (self.y ** 2).mean(dim=(1, 2))[:, None]).sum())
        self._miss: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, Forecast]] = {}
        self._err: dict[tuple[int, tuple[int, ...]], tuple[float, object]] = {}

    def miss(self, t: int, hist: tuple[int, ...]) -> tuple[torch.Tensor, Forecast]:
        """What the best stand-in misses at step t after the computed steps ``hist``."""
        key = (t, hist)
        hit = self._miss.get(key)
        if hit is None:
            yt, best = self.y[t], None
            for cand in self.candidates:
                if cand.action != "predict":
                    guess = self.y[hist[-1]]
                else:
                    if len(hist) < min(cand.points(), 2):  # one point: the runtime reuses; take reuse's entry
                        continue
                    pts = list(hist[-cand.points():])
                    guess = forecast_by(cand.method, pts, [self.y[p] for p in pts], t)
                d = yt - guess
                e = float((d ** 2).mean())
                if best is None or e < best[0]:
                    best = (e, d, cand)
            if best is None:  # only forecasts were allowed and one point is known: the runtime reuses
                best = (0.0, yt - self.y[hist[-1]], Forecast("reuse"))
            hit = self._miss[key] = (best[1], best[2])
        return hit

    def weight(self, t: int, hist: tuple[int, ...]) -> float:
        return float(self.w[t]) * (1.0 + self.accumulation) ** (t - hist[-1] - 1)

    def err(self, t: int, hist: tuple[int, ...]) -> tuple[float, object]:
        key = (t, hist)
        hit = self._err.get(key)
        if hit is None:
            d, cand = self.miss(t, hist)
            hit = self._err[key] = (float((d ** 2).mean()) * self.weight(t, hist), cand)
        return hit


class GroupReplay(SiteReplay):
    """Several sites computing at the same steps (the stack); at a skipped step each takes its own
    best stand-in. Aligned members (one shape): the stack's output misses the *sum* of what its
    blocks miss, element by element; otherwise the sizes add."""

    def __init__(self, members: dict[str, SiteReplay], aligned: bool = True):
        self.members = members
        first = next(iter(members.values()))
        self.n, self.w, self.history = first.n, first.w, max(m.history for m in members.values())
        self.max_gap, self.accumulation = first.max_gap, first.accumulation
        self.compute_last, self.warmup = first.compute_last, first.warmup
        self.energy = sum(m.energy for m in members.values())
        self.aligned = aligned and len({tuple(m.y.shape) for m in members.values()}) == 1
        self._err = {}

    def err(self, t: int, hist: tuple[int, ...]) -> tuple[float, object]:
        key = (t, hist)
        hit = self._err.get(key)
        if hit is None:
            parts = {s: m.miss(t, hist) for s, m in self.members.items()}
            if self.aligned:
                e = float((sum(d for d, _ in parts.values()) ** 2).mean())
            else:
                e = sum(float((d ** 2).mean()) for d, _ in parts.values())
            hit = self._err[key] = (e * self.weight(t, hist), {s: c for s, (_, c) in parts.items()})
        return hit


def _next_steps(costs: SiteReplay, b: int) -> range:
    """The steps that may compute next after computing at b (warm-up, longest gap)."""
    n, warm = costs.n, costs.warmup
    last = b + 1 if warm is not None and b + 1 < warm else min(b + costs.max_gap + 1, n - 1)
    first = b + 2 if warm is not None and b == warm - 1 else b + 1
    return range(first, last + 1)


def solve(costs: SiteReplay, lam: float, cost: float, reuse: str) -> tuple[list, float, int]:
    """The schedule minimising replayed error + ``lam * cost`` per computed step: per step
    ``"compute"`` or the stand-in chosen (a :class:`Forecast`, or a dict of them per member of a
    group; ``reuse`` names the reuse action of a lone site), its error, and the computed count."""
    n, keep = costs.n, costs.history
    if n == 1:
        return ["compute"], 0.0, 1
    f: dict[tuple[int, ...], float] = {(0,): lam * cost}
    back: dict[tuple[int, ...], tuple[int, ...] | None] = {(0,): None}
    for b in range(n - 1):
        for hist, value in [(k, v) for k, v in f.items() if k[-1] == b]:
            seg = 0.0
            for c in _next_steps(costs, b):
                total = value + seg + lam * cost
                key = (hist + (c,))[-keep:]
                if total < f.get(key, math.inf):
                    f[key], back[key] = total, hist
                if c < n - 1:
                    seg += costs.err(c, hist)[0]
    finals = {k: v for k, v in f.items() if k[-1] == n - 1}
    if not costs.compute_last:  # or end on a computed step b and skip the last steps
        for hist, v in f.items():
            b = hist[-1]
            if (costs.warmup is None or b >= costs.warmup - 1) and b < n - 1 and n - 1 - b <= costs.max_gap:
                finals[hist] = v + sum(costs.err(t, hist)[0] for t in range(b + 1, n))
    end = min(finals, key=finals.__getitem__)
    chain, k = [], end
    while k is not None:
        chain.append(k)
        k = back[k]
    chain.reverse()
    row: list = ["compute"] * n
    error = 0.0
    for i, hist in enumerate(chain):
        nxt = chain[i + 1][-1] if i + 1 < len(chain) else n
        for t in range(hist[-1] + 1, nxt):
            e, choice = costs.err(t, hist)
            row[t] = _named(choice, reuse)
            error += e
    return row, error, len(chain)


def _named(choice, reuse: str):
    if isinstance(choice, Forecast) and choice.action == "reuse":
        return Forecast(reuse)
    return choice
