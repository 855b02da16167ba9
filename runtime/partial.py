"""Token-wise partial recompute (ToCa, DuCa): which tokens a ``partial`` step recomputes.

A site planned ``partial`` with ``ratio`` r keeps two cache slots: ``partial0``, its output, and
``partial1``, the input (its token-carrying input) each token's cached output was computed from.
At a partial step the site recomputes the ``ceil(r * N)`` tokens whose input changed most since
then, by the relative change ``||x_t - x_cached_t|| / ||x_cached_t||``, and scatters them into the
cached output (``passes/insert_partial.py`` builds the graph). Each sample picks its own tokens
(:func:`select_per_sample`, norms over the other dimensions of the sample) where the graph allows
it; else one selection serves the whole batch (:func:`select_tokens`, the batch inside the norms).

Example:
    >>> x_old = torch.ones(2, 4, 3)
    >>> x = x_old.clone(); x[:, 2] += 1.0; x[:, 0] += 0.5
    >>> select_tokens(x, x_old, 1, 2).tolist()
    [0, 2]
    >>> tokens_of(0.25, 10), tokens_of(1.0, 10)
    (3, 10)
"""

from __future__ import annotations

import math

import torch

from .decisions import SLOTS, Action

SLOT = SLOTS[Action.PARTIAL]
EPS = 1e-12


def tokens_of(ratio: float, tokens: int) -> int:
    """How many of ``tokens`` a partial step with ``ratio`` recomputes: ``ceil(ratio * tokens)``, at least 1."""
    return max(1, min(tokens, math.ceil(ratio * tokens - 1e-9)))


def token_change(x: torch.Tensor, x_old: torch.Tensor, dim: int) -> torch.Tensor:
    """Relative change of each token of ``x`` (dimension ``dim``) against ``x_old``: shape ``[N]``."""
    d = (x.float() - x_old.float()).movedim(dim, 0).flatten(1)
    base = x_old.float().movedim(dim, 0).flatten(1)
    return d.norm(dim=1) / (base.norm(dim=1) + EPS)


def select_tokens(x: torch.Tensor, x_old: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """The ``k`` tokens (dimension ``dim``) whose input changed most, in increasing order."""
    score = token_change(x, x_old, dim)
    return torch.topk(score, k, sorted=False).indices.sort().values


def select_per_sample(x: torch.Tensor, x_old: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """The ``k`` tokens (dimension ``dim`` >= 1) whose input changed most in each sample (dimension 0):
    ``[batch, k]``, each row increasing (ToCa's per-sample selection)."""
    d = (x.float() - x_old.float()).movedim(dim, 1).flatten(2)
    base = x_old.float().movedim(dim, 1).flatten(2)
    score = d.norm(dim=2) / (base.norm(dim=2) + EPS)
    return torch.topk(score, k, dim=1, sorted=False).indices.sort(dim=1).values


def _index(t: torch.Tensor, dim: int, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` broadcast to the batch of ``idx`` ([batch, k]) and the gather index for its dimension ``dim``."""
    shape = list(t.shape)
    shape[0] = idx.shape[0]
    t = t.expand(shape)
    view = [idx.shape[0]] + [1] * (t.dim() - 1)
    view[dim] = k
    sizes = list(shape)
    sizes[dim] = k
    return t, idx.view(view).expand(sizes)


def gather_tokens(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """The tokens ``idx`` of ``t`` along ``dim``: ``[k]`` for every sample alike, ``[batch, k]`` per sample
    (``t``'s dimension 0 is then the batch, or 1 for a table every sample shares)."""
    if idx.dim() == 1:
        return t.index_select(dim, idx)
    t, index = _index(t, dim, idx, idx.shape[1])
    return t.gather(dim, index)


def scatter_tokens(cache: torch.Tensor, dim: int, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``cache`` with the tokens ``idx`` along ``dim`` replaced by ``values`` (a new tensor)."""
    if idx.dim() == 1:
        return cache.index_copy(dim, idx, values)
    cache, index = _index(cache, dim, idx, idx.shape[1])
    return cache.scatter(dim, index, values)


def ran(rt, site: str) -> bool:
    """Whether ``site`` took ``partial`` at this call (its caches are then updated too)."""
    return bool(rt.records) and rt.records[-1].decisions.get(site) == Action.PARTIAL


__all__ = ["SLOT", "gather_tokens", "ran", "scatter_tokens", "select_per_sample", "select_tokens", "token_change",
           "tokens_of"]
