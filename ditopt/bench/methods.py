"""The methods the benchmark knows, by key: ditopt's (``ditopt:*``, :mod:`.ours`) then the
peers' (``diffusers:*``, ``cache-dit:*``, :mod:`.peers`), in the order the tables list them."""

from __future__ import annotations

from .method import Method
from .ours import OURS
from .peers import PEERS

METHODS: dict[str, Method] = {m.key: m for m in [*OURS, *PEERS]}


def register(method: Method) -> None:
    """Add a method to the harness (e.g. profiled plans, new presets)."""
    METHODS[method.key] = method


def method_names() -> list[str]:
    return list(METHODS)
