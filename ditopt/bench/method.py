"""What a benchmarked method is: a family of settings, each of which applies the method to a
fresh copy of the model and says how to drive it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Applied:
    """A method applied to a fresh model: the callable the sampling loop calls, and its hooks."""

    transformer: Callable
    before_generation: Callable[[], None] = lambda: None
    decisions: Callable[[], dict] | None = None  # ditopt: the runtime's decisions of the last run
    # (None: an eager peer, whose block FLOPs are counted with FlopCounterMode instead)


@dataclass
class Setting:
    label: str  # "interval=2"
    apply: Callable[[Any, "Context"], Applied]
    overhead: bool = False  # a setting that caches nothing


@dataclass
class Method:
    key: str  # "ditopt:fora"
    family: str  # ditopt | diffusers | cache-dit
    name: str  # "FORA"
    settings: Callable[[int], list[Setting]]  # steps -> settings
    requires: str | None = None  # module to import; missing = the peer is reported and skipped


@dataclass
class Context:
    """What a method may know about the model: the zoo entry and the run's step count."""

    zoo: Any
    steps: int
    site_table: Any
