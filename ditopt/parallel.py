"""Sequence parallelism: the public spec (:class:`SequenceParallel`).

``ditopt.optimize(model, plan, parallel=SequenceParallel(mode="ulysses" | "ring"))``, under an
initialised process group, shards the token dimension over the ranks: each rank runs the blocks
on ``tokens / world`` of them and only self-attention talks to the other ranks
(``passes/sequence_parallel.py`` rewrites the graph, :mod:`ditopt.runtime.distributed` runs it).

The token-flow rules the pass rewrites from live in :mod:`ditopt.token_flow` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DivergenceError, PlanError, RankFailureError, check_number
from .runtime import distributed
from .token_flow import Tok, TokenFlow, TokenMixing, walker

distributed.ERRORS.update(divergence=DivergenceError, failure=RankFailureError)  # what the runtime raises

MODES = ("ulysses", "ring")
FORECASTS = ("hold", "linear", "quadratic")  # stale_kv: the remote K/V as kept, or extrapolated
RESIDUALS = ("none", "fp16", "int8")  # stale_kv: what a stale step sends of the K/V's miss of that forecast


@dataclass(frozen=True)
class SequenceParallel:
    """Shard the token dimension over the ranks of ``group`` (the default group when None).

    ``mode="ulysses"``: each self-attention does an all-to-all that trades tokens for heads
    (the head count must divide the world size); ``mode="ring"``: keys and values go around the
    ring and partial attentions merge by log-sum-exp (any head count). ``timeout``: seconds a collective
    waits for a peer, else ``RankFailureError`` (None: ``group``'s own); ``check``: all-gather a
    checksum of each call's decisions and inputs, ``DivergenceError`` if they differ (``runtime.distributed``).
    ``ring_refresh`` (ring only; None: DistriFusion's stale K/V): at a plan's ``stale_kv`` steps,
    refresh that share of the ring hops (in turn) and reuse the kept partial attention of the
    others (DiTango's selective fresh K/V; ``runtime.stale_kv.refreshed_attention``).
    ``stale_forecast``: what a ``stale_kv`` step attends with for the remote K/V: ``"hold"`` (as
    last exchanged), ``"linear"`` or ``"quadratic"`` (extrapolated from the last two or three
    exchanges; one or two more kept copies). ``stale_residual``: what a ``stale_kv`` step sends:
    ``"none"`` (nothing: DistriFusion), or each rank's K/V minus the forecast every rank makes of
    them, in ``"fp16"`` (half the bytes of an fp32 exchange) or ``"int8"`` with a scale per token
    and head (about a quarter): the residual compression of CompactFusion; the others add it to
    their forecast (``runtime.stale_kv.residual_attention``).

    Example:
        >>> SequenceParallel(mode="ring")  # doctest: +NORMALIZE_WHITESPACE
        SequenceParallel(mode='ring', group=None, timeout=300.0, check=False, ring_refresh=None,
        stale_forecast='hold', stale_residual='none')
        >>> SequenceParallel(mode="tensor")
        Traceback (most recent call last):
        ditopt.errors.PlanError: SequenceParallel mode 'tensor': use one of ulysses, ring
    """

    mode: str = "ulysses"
    group: Any = None
    timeout: float | None = 300.0
    check: bool = False
    ring_refresh: float | None = None
    stale_forecast: str = "hold"
    stale_residual: str = "none"

    def __post_init__(self):
        if self.mode not in MODES:
            raise PlanError(f"SequenceParallel mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.ring_refresh is not None:
            check_number(self.ring_refresh, "SequenceParallel ring_refresh (share of hops)", minimum=0.0, maximum=1.0,
                         error=PlanError)
            if self.mode != "ring":
                raise PlanError(f"SequenceParallel ring_refresh applies to mode='ring', not {self.mode!r}")
        if self.stale_forecast not in FORECASTS:
            raise PlanError(f"SequenceParallel stale_forecast {self.stale_forecast!r}: use one of {', '.join(FORECASTS)}")
        if self.stale_residual not in RESIDUALS:
            raise PlanError(f"SequenceParallel stale_residual {self.stale_residual!r}: use one of {', '.join(RESIDUALS)}")
        if self.stale_residual != "none" and self.ring_refresh is not None:
            raise PlanError("SequenceParallel: stale_residual and ring_refresh are two answers to one stale step; "
                            "set one of them")
        if self.timeout is not None:
            check_number(self.timeout, "SequenceParallel timeout (seconds)", positive=True, error=PlanError)

    def resolve(self) -> tuple[int, int, str]:
        """``(rank, world size, group name)``; PlanError without an initialised process group."""
        if not distributed.dist.is_available() or not distributed.dist.is_initialized():
            raise PlanError("SequenceParallel needs an initialised process group "
                            "(torch.distributed.init_process_group, e.g. under torchrun)")
        return distributed.world_of(self.group if self.timeout is None else distributed.timed_group(self.group,
                                                                                                     self.timeout))


__all__ = ["FORECASTS", "MODES", "RESIDUALS", "SequenceParallel", "Tok", "TokenFlow", "TokenMixing", "walker"]
