"""Where to elide K/V exchanges, from a profile: the K/V change map and its planner (issue 14 item 3).

:func:`profile_kv` runs a calibration call (every step exchanging) of a sequence-parallel model and
records, per (step, self-attention site), the relative L1 change of its K and V since the step
before, ``sum |kv_t - kv_{t-1}| / sum |kv_{t-1}|`` over every rank's tokens (each rank's sums are
all-reduced at the end, so every rank holds the same map and plans the same schedule).
:func:`plan_stale` (also ``ditopt.plan_from_profile(kv_map, comm_budget=...)``) then picks the
(step, site) pairs that take ``stale_kv``: greedily, the pair whose predicted error is least, where
the predicted error of a stale step is the change accumulated since the site's last exchange (the
staleness of the K/V it reads, steps before included), until a generation sends at most
``comm_budget`` of the bytes the un-elided one sends: its exchanges, the collectives no plan elides
(the output gather) and what stale steps still send (``SequenceParallel(stale_residual=)``), as
the profile run counted them. Step 0 and the first ``warmup`` steps exchange.

``profile_kv(..., signal="attention")`` records instead the change the K/V of the step before cause
in each site's attention output (each rank over its own tokens), the same planner then reads it.

Simple by design: the prediction is a per-site change, not the output error it causes, and every
exchange of a site is taken to cost the same bytes (ring; at 2 ranks Ulysses too: its keeping
steps all-gather K/V, which costs ``world / 2`` times its all-to-alls, see ``runtime/stale_kv.py``).

Example (a made-up map of 2 sites over 4 steps):
    >>> import torch
    >>> m = KVChangeMap("M", 4, ["a.attn1", "b.attn1"], torch.tensor([[float("nan")] * 2, [.1, .3], [.2, .01],
    ...     [.05, .02]]), {"a.attn1": 100, "b.attn1": 100})
    >>> [(r.sites, r.step_list(4)) for r in plan_stale(m, comm_budget=0.5).rules]
    [(('a.attn1',), [1, 3]), (('b.attn1',), [2, 3])]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import PlanError, check_number
from .plan import Plan, Rule
from .runtime import distributed, stale_kv


@dataclass
class KVChangeMap:
    """``change[step, i]``: relative L1 change of site ``sites[i]``'s K/V since the step before
    (NaN at step 0); ``nbytes[site]``: bytes of its K and V over all tokens (one call).
    What one rank sends per generation, as the profile run measured it: ``sent[site]`` per
    exchanging step of the site, ``stale_sent[site]`` per stale step (``stale_residual``: the
    encoded residual; 0 without), ``other_sent`` the collectives no plan elides (the output
    gather). Without them (one rank, a map made by hand) the planner weighs sites by ``nbytes``."""

    model: str
    steps: int
    sites: list[str]
    change: torch.Tensor
    nbytes: dict[str, int]
    sent: dict[str, int] = field(default_factory=dict)
    stale_sent: dict[str, int] = field(default_factory=dict)
    other_sent: int = 0

    def heatmap(self, path: str) -> None:
        """Save the map as a heatmap image (steps across, sites down)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1 + 0.35 * self.steps, 1 + 0.3 * len(self.sites)))
        im = ax.imshow(self.change.T.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(self.sites)), self.sites, fontsize=6)
        ax.set_xlabel("step")
        fig.colorbar(im, label="relative K/V change")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


SIGNALS = ("kv", "attention", "linear")  # what profile_kv records per (step, site)


def profile_kv(model: torch.nn.Module, run, steps: int, parallel, signal: str = "kv") -> KVChangeMap:
    """Optimise ``model`` with an all-compute plan under ``parallel`` (a SequenceParallel; an
    initialised process group), call ``run(optimised)`` (one generation of ``steps`` steps) and
    return the K/V change of every self-attention site that became distributed attention.

    ``signal="attention"``: instead of the K/V change, the relative L1 change the K/V of the step
    before cause in the attention output, ``attn(q_t, kv_{t-1})`` against ``attn(q_t, kv_t)``, each
    rank over its own tokens (what a stale step does to the remote part, measured where all is
    local; one more attention per call at profile time, nothing sent). ``signal="linear"``: the
    error of the linear forecast (``SequenceParallel(stale_forecast="linear")``) one step ahead,
    ``sum |kv_t - (2 kv_{t-1} - kv_{t-2})| / sum |kv_{t-1}|`` (the K/V change at step 1)."""
    if signal not in SIGNALS:
        raise PlanError(f"profile_kv: signal {signal!r}: use one of {', '.join(map(repr, SIGNALS))}")
    import ditopt
    import torch.distributed as dist

    fast = ditopt.optimize(model, ditopt.presets.all_compute(steps=steps), parallel=parallel, regional=False)
    rt = ditopt.api.runtime_of(fast)
    sums: dict[tuple[int, str], torch.Tensor] = {}  # (step, site) -> [sum |change|, sum |previous|]
    sent: dict[str, int] = {}
    stale_sent: dict[str, int] = {}
    last: dict[str, torch.Tensor] = {}
    nbytes: dict[str, int] = {}
    world = dist.get_world_size(parallel.group) if dist.is_initialized() else 1

    def record(site: str, call: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv = torch.stack([k, v]).detach().float()
        step, key = rt.state.step, (site, call, rt.state.branch)
        if key not in last:  # K and V of every rank's tokens, once per call of the site
            nbytes[site] = nbytes.get(site, 0) + kv.numel() * k.element_size() * world
            exchange, stale = distributed.attention_bytes(parallel.mode, k, world, parallel.stale_residual)
            sent[site], stale_sent[site] = sent.get(site, 0) + exchange, stale_sent.get(site, 0) + stale
        prev, before = last.get(key), last.get(("before", *key))
        last[key] = kv
        if prev is not None:
            last[("before", *key)] = prev
        if prev is not None and prev.shape == kv.shape:
            if signal == "linear" and before is not None and before.shape == kv.shape:
                part = torch.stack([(kv - 2 * prev + before).abs().sum(), prev.abs().sum()])
            elif signal == "attention":
                sdpa, qf = torch.nn.functional.scaled_dot_product_attention, q.detach().float()
                fresh, stale = sdpa(qf, kv[0], kv[1]), sdpa(qf, prev[0], prev[1])
                part = torch.stack([(stale - fresh).abs().sum(), fresh.abs().sum()])
            else:
                part = torch.stack([(kv - prev).abs().sum(), prev.abs().sum()])
            sums[(step, site)] = sums.get((step, site), 0) + part

    stale_kv.RECORDERS[rt.id] = record
    try:
        run(fast)
    finally:
        stale_kv.RECORDERS.pop(rt.id, None)
    sites = sorted(nbytes, key=lambda s: [int(p) if p.isdigit() else p for p in s.split(".")])
    table = torch.zeros(steps, len(sites), 2)
    for (step, site), part in sums.items():
        if step < steps:
            table[step, sites.index(site)] += part
    if dist.is_initialized() and world > 1:
        dist.all_reduce(table, group=parallel.group)
    change = table[..., 0] / table[..., 1].clamp_min(1e-12)
    change[0] = float("nan")
    other = ditopt.stats(fast).comm_bytes.get("total", 0) - sum(sent.values()) * steps
    return KVChangeMap(type(model).__name__, steps, sites, change, nbytes, sent, stale_sent, max(0, other))


def plan_stale(rmap: KVChangeMap, comm_budget: float = 0.5, *, warmup: int = 1, max_run: int | None = None) -> Plan:
    """The ``stale_kv`` plan that sends at most ``comm_budget`` (a fraction in [0, 1]) of the
    un-elided attention bytes with the least predicted error (see the module docstring).
    ``max_run``: at most that many stale steps of a site in a row (None: no limit)."""
    check_number(comm_budget, "comm_budget", minimum=0.0, maximum=1.0, error=PlanError)
    if warmup < 1 or warmup > rmap.steps:
        raise PlanError(f"plan_stale: warmup must be in 1..{rmap.steps} (step 0 always exchanges), got {warmup}")
    change = torch.nan_to_num(rmap.change, nan=0.0).tolist()
    measured = sum(rmap.sent.values()) > 0
    cost = rmap.sent if measured else rmap.nbytes
    saved = {site: cost[site] - (rmap.stale_sent.get(site, 0) if measured else 0) for site in rmap.sites}
    total = sum(cost.values()) * rmap.steps + (rmap.other_sent if measured else 0)
    stale = [[False] * len(rmap.sites) for _ in range(rmap.steps)]
    sent = total

    def error(t: int, i: int) -> float:
        """The predicted error making (t, site i) stale adds, in the run of stale steps it joins."""
        start, end = t, t + 1
        while start > 0 and stale[start - 1][i]:
            start -= 1
        while end < rmap.steps and stale[end][i]:
            end += 1
        return _run_error(change, i, start, end, t)

    while sent > comm_budget * total + 1e-9:
        candidates = [(error(t, i), t, i) for t in range(warmup, rmap.steps) for i in range(len(rmap.sites))
                      if not stale[t][i] and (max_run is None or _run_length(stale, i, t) <= max_run)]
        if not candidates:
            break
        _, t, i = min(candidates)
        stale[t][i] = True
        sent -= saved[rmap.sites[i]]
    rules = [Rule(sites=(site,), kind="attention", steps=tuple(t for t in range(rmap.steps) if stale[t][i]),
                  action="stale_kv") for i, site in enumerate(rmap.sites) if any(stale[t][i] for t in range(rmap.steps))]
    if not rules:
        rules = [Rule(sites=("*",), kind="block", action="compute")]
    plan = Plan(steps=rmap.steps, rules=rules, name=f"stale-kv comm_budget={comm_budget:g}")
    plan.check()
    return plan


def _run_length(stale, i: int, t: int) -> int:
    """The length of the run of stale steps of site ``i`` that making ``t`` stale would give."""
    start, end = t, t + 1
    while start > 0 and stale[start - 1][i]:
        start -= 1
    while end < len(stale) and stale[end][i]:
        end += 1
    return end - start


def _run_error(change, i: int, start: int, end: int, t: int) -> float:
    """Predicted error added by making step ``t`` of site ``i`` stale, in the run ``start..end-1``
    of stale steps it joins: each stale step ``s`` reads K/V stale by ``change[start..s]``."""
    def run_cost(steps):
        cost, acc = 0.0, 0.0
        for s in steps:
            acc += change[s][i]
            cost += acc
        return cost

    before = run_cost([s for s in range(start, t)]) + run_cost([s for s in range(t + 1, end)])
    return run_cost(range(start, end)) - before


__all__ = ["KVChangeMap", "SIGNALS", "plan_stale", "profile_kv"]
