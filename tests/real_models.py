"""The small real diffusers models the tests run on (see ditopt.small_models)."""

from ditopt.small_models import MODELS, build, timesteps  # noqa: F401
