"""ditopt: a compiler that makes Diffusion Transformer inference fast by reusing features.

    import ditopt
    plan = ditopt.presets.fora(interval=2, steps=50)
    pipe.transformer = ditopt.optimize(pipe.transformer, plan)
    ditopt.stats(pipe.transformer).decisions

See docs/ARCHITECTURE.md for how the package is laid out.
"""

from . import presets
from .api import Stats, compiled_graph, generation, optimize, reset, set_plan, set_step, sites, stats, step_callback
from .backend import CompiledGraph, DitoptBackend
from .cost import CostModel, Prediction, cost_model
from .errors import CaptureError, DitoptError, PlanError
from .parallel import SequenceParallel
from .plan import CompiledPlan, Plan, Rule, When
from .regional import mark_repeated_blocks
from .profile import ProfileError, RedundancyMap, profile, profile_pipeline
from . import planner
from .planner import PlannerConfig, plan_from_profile
from .runtime import Action, DecisionTable
from .tune import Tuned, tune, tune_pipeline
from .sites import Site, SiteTable, find_sites

__version__ = "0.1.0"

__all__ = [
    "mark_repeated_blocks",
    "generation",
    "Action", "CaptureError", "CompiledGraph", "CompiledPlan", "CostModel", "DecisionTable", "DitoptBackend",
    "DitoptError", "Plan", "PlanError", "SequenceParallel", "PlannerConfig", "Prediction", "ProfileError", "RedundancyMap", "Rule",
    "Site", "SiteTable", "Stats", "Tuned", "When", "compiled_graph", "cost_model", "find_sites", "optimize",
    "plan_from_profile", "planner", "presets", "profile", "profile_pipeline", "reset", "set_plan", "set_step",
    "sites", "stats", "step_callback", "tune", "tune_pipeline",
]
