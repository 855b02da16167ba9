"""ditopt's runtime: step state, cache store and the custom ops rewritten graphs call."""

from . import observe, ops
from .cache_store import CacheStore
from .session import COMPUTE, SKIPPED, GraphDecisions, Runtime, find_runtime, get_runtime, taylor_forecast
from .step_state import StepState

__all__ = [
    "taylor_forecast",
    "COMPUTE", "SKIPPED", "CacheStore", "GraphDecisions", "Runtime", "StepState",
    "find_runtime", "get_runtime", "observe", "ops",
]
