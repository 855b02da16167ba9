"""Step-indexed cache buffers, keyed by site and slot, with byte accounting.

A key is ``(graph, site, slot, branch)``: ``graph`` tells apart the graphs compiled for
different input shapes (so a cached tensor never meets a graph of another shape), ``branch``
the CFG branches of one step. Each key keeps its last ``depth`` computed steps, newest last,
which forecasting actions need; plain reuse needs one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

CacheKey = tuple[int, str, str, int]


@dataclass(frozen=True)
class CacheEntry:
    step: int
    value: torch.Tensor


class CacheStore:
    """Holds cached tensors for one optimised model on one rank.

    Example:
        >>> store = CacheStore()
        >>> store.put((0, "blocks.1", "residual", 0), step=0, value=torch.ones(2, 3))
        >>> store.latest((0, "blocks.1", "residual", 0)).step, store.nbytes
        (0, 24)
    """

    def __init__(self, depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._entries: dict[CacheKey, deque[CacheEntry]] = {}

    def ensure_depth(self, depth: int) -> None:
        """Keep at least ``depth`` steps per key from now on (existing history is kept)."""
        if depth > self.depth:
            self.depth = depth
            self._entries = {k: deque(h, maxlen=depth) for k, h in self._entries.items()}

    def put(self, key: CacheKey, step: int, value: torch.Tensor) -> None:
        history = self._entries.get(key)
        if history is not None and history and history[-1].value.shape != value.shape:
            history.clear()  # a shape change invalidates what was cached
        if history is None:
            history = self._entries[key] = deque(maxlen=self.depth)
        if history and history[-1].step == step:
            history.pop()
        history.append(CacheEntry(step, value.detach()))

    def latest(self, key: CacheKey) -> CacheEntry | None:
        history = self._entries.get(key)
        return history[-1] if history else None

    def history(self, key: CacheKey) -> list[CacheEntry]:
        return list(self._entries.get(key, ()))

    def has(self, key: CacheKey, shape: torch.Size | tuple[int, ...] | None = None) -> bool:
        entry = self.latest(key)
        return entry is not None and (shape is None or tuple(entry.value.shape) == tuple(shape))

    def clear(self) -> None:
        self._entries.clear()

    @property
    def nbytes(self) -> int:
        return sum(e.value.numel() * e.value.element_size() for h in self._entries.values() for e in h)

    def __len__(self) -> int:
        return len(self._entries)
