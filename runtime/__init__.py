"""ditopt's runtime: decision tables, step state, cache store and the custom ops rewritten graphs call.

It imports nothing from the passes, the public API or the harnesses.
"""

from . import observe, ops
from .cache_store import CacheStore
from .decisions import PLAN_ACTIONS, SLOTS, Action, DecisionTable, Indicator
from .session import ConcurrentCallError, Runtime, get_runtime, taylor_forecast
from .step_state import StepState

__all__ = [
    "PLAN_ACTIONS", "SLOTS", "Action", "CacheStore", "DecisionTable", "Indicator", "Runtime", "StepState",
    "ConcurrentCallError", "get_runtime", "observe", "ops", "taylor_forecast",
]
