"""ditopt: a compiler that makes Diffusion Transformer inference fast by reusing features.

    import ditopt
    plan = ditopt.presets.fora(interval=2, steps=50)
    pipe.transformer = ditopt.optimize(pipe.transformer, plan)
    ditopt.stats(pipe.transformer).decisions
"""

from . import presets
from .backend import DitoptBackend, Stats, optimize, reset, set_plan, set_step, sites, stats
from .cost import CostModel, Prediction, cost_model
from .errors import CaptureError, DitoptError, PlanError
from .plan import CompiledPlan, Plan, Rule, When
from .profile import ProfileError, RedundancyMap, profile, profile_pipeline
from . import planner
from .planner import plan_from_profile
from .tune import Tuned, tune, tune_pipeline
from .sites import Site, SiteTable, find_sites

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CompiledPlan", "DitoptBackend", "DitoptError", "Plan", "PlanError", "Rule", "Site",
    "SiteTable", "Stats", "When", "find_sites", "optimize", "presets", "profile", "profile_pipeline", "plan_from_profile", "planner", "ProfileError", "RedundancyMap", "reset", "set_plan", "set_step", "sites", "stats", "tune", "tune_pipeline", "Tuned",
]
