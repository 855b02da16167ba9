"""The parsers of a plan rule's fields (``sites``, ``steps``, ``window``, ``ratio``, ``cfg``): each
takes the raw YAML value and the rule's location, returns the checked value, and raises a
:class:`~ditopt.errors.PlanError` naming the rule, its line and the site otherwise.
:func:`ditopt.plan._rule_from_dict` calls them; the plan's bounds on names and windows live here.

Example:
    >>> steps_field("1:10:2", {}), window_field(256, "window", {}), ratio_field(0.2, "partial", None, {})
    ('1:10:2', 256, 0.2)
    >>> sites_field("blocks.*", {})
    ('blocks.*',)
"""

from __future__ import annotations

import math
from typing import Any

from ditopt.runtime.cfg_sharing import CfgLayout
from ditopt.runtime.decisions import Action
from ditopt.runtime.window_attention import AXES, GridWindow

from .errors import MAX_STEPS, PlanError, short
from .sites import parse_position, parse_slice

MAX_NAME = 1000  # characters of a name, a model, a site pattern, a slice or when.of
MAX_WINDOW = 1 << 24  # tokens of a window attention's window
WINDOW = Action.WINDOW


def cfg_field(cfg: Any, action: str, when: Any, where: dict[str, Any]) -> CfgLayout | None:
    """``cfg:`` of a share_cfg rule (:meth:`CfgLayout.read`), refused on every other action; and
    share_cfg is never adaptive."""
    if when is not None and action == Action.SHARE_CFG:
        raise PlanError("'share_cfg' cannot be adaptive ('when'): the offset it adds needs a fixed step table", **where)
    if cfg is not None and action != Action.SHARE_CFG:
        raise PlanError(f"'cfg' applies to action share_cfg, not {action!r}", **where)
    try:
        return None if cfg is None else CfgLayout.read(cfg)
    except ValueError as exc:
        raise PlanError(f"'cfg': {exc}", **where) from None


def ratio_field(ratio: Any, action: str, when: Any, where: dict[str, Any]) -> float | None:
    """``ratio: <share of tokens>``: required by action partial (0 < ratio <= 1, never adaptive), refused elsewhere."""
    if action != Action.PARTIAL:
        if ratio is not None:
            raise PlanError(f"'ratio' applies to action partial, not {action!r}", **where)
        return None
    if when is not None:
        raise PlanError("'partial' cannot be adaptive ('when'): its graph recomputes a fixed number of tokens", **where)
    if ratio is None:
        raise PlanError("action partial needs 'ratio: <share of tokens recomputed>', e.g. ratio: 0.2", **where)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise PlanError(f"'ratio' must be a share of the tokens in (0, 1], got {short(ratio)}", **where)
    return float(ratio)


def window_field(window: Any, action: str, where: dict[str, Any]) -> int | None:
    """``window:`` required by action window, refused by every other action: tokens along the
    attention's sequence (``256``), or per axis of the token grid (a :class:`GridWindow`):
    ``[frames, height, width]``, ``[height, width]``, or a mapping of those names
    (``{frames: 4, height: 8, width: 8}``; ``frames`` may be left out for an image grid).

    >>> window_field([4, 8, 8], "window", {}), window_field({"height": 8, "width": 16}, "window", {})
    (GridWindow((4, 8, 8)), GridWindow((8, 16)))
    >>> window_field([4, 8], "reuse", {})
    Traceback (most recent call last):
    ditopt.errors.PlanError: 'window' applies to action window, not 'reuse'
    """
    if action != WINDOW:
        if window is not None:
            raise PlanError(f"'window' applies to action window, not {action!r}", **where)
        return None
    if window is None:
        raise PlanError("action window needs 'window: <tokens>' (along the attention's sequence) or a window per "
                        "axis of the token grid, 'window: [frames, height, width]' or '[height, width]'", **where)
    if isinstance(window, (list, dict)):
        return GridWindow(_window_sizes(window, where))
    if not isinstance(window, int) or isinstance(window, bool) or not 0 < window <= MAX_WINDOW:
        raise PlanError(f"'window' must be a number of tokens in 1..{MAX_WINDOW}, or a list or mapping per axis "
                        f"({', '.join(AXES)}), got {short(window)}", **where)
    return window


def _window_sizes(window: list | dict, where: dict[str, Any]) -> list[int]:
    """The sizes of a per-axis window, outermost axis first, each in 1..MAX_WINDOW, volume too."""
    if isinstance(window, dict):
        names = list(window)
        if not set(names) <= set(AXES) or not {"height", "width"} <= set(names):
            raise PlanError(f"a per-axis 'window' mapping names height and width, and frames for video (axes "
                            f"{', '.join(AXES)}), got keys {short(names)}", **where)
        window = [window[a] for a in AXES if a in window]
    elif not 2 <= len(window) <= len(AXES):
        raise PlanError(f"a per-axis 'window' list is [frames, height, width] or [height, width], got "
                        f"{len(window)} sizes: {short(window)}", **where)
    if not all(isinstance(w, int) and not isinstance(w, bool) and 0 < w <= MAX_WINDOW for w in window) or (
            math.prod(window) > MAX_WINDOW):
        raise PlanError(f"a per-axis 'window' takes sizes of at least 1 token whose product is at most "
                        f"{MAX_WINDOW}, got {short(window)}", **where)
    return window


def window_yaml(window: int) -> int | list[int]:
    """A rule's window as YAML writes it: tokens, or the list of sizes of a per-axis window."""
    return list(window.sizes) if isinstance(window, GridWindow) else window


def sites_field(sites: Any, where: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    elif isinstance(sites, list) and sites and all(isinstance(s, str) for s in sites):
        sites = tuple(sites)
    else:
        raise PlanError(f"'sites' must be a glob or a non-empty list of globs, got {short(sites)}", **where)
    for pattern in sites:
        if not pattern.removeprefix("!") or len(pattern) > MAX_NAME:
            raise PlanError(f"'sites': a glob must be a non-empty string of at most {MAX_NAME} characters, "
                            f"got {short(pattern)}", **where)
        if pattern.removeprefix("!").startswith("stack["):
            try:
                parse_position(pattern)
            except ValueError as exc:
                raise PlanError(str(exc), site=",".join(sites), **where) from None
    return sites


def steps_field(steps: Any, where: dict[str, Any]) -> str | tuple[int, ...] | None:
    """A slice string, a non-empty list of ints or one int; ranges are checked by Plan.check."""
    if steps is None:
        return None
    if isinstance(steps, str):
        if len(steps) > MAX_NAME:
            raise PlanError(f"'steps': a slice of {len(steps)} characters is not a slice", **where)
        try:
            parse_slice(steps)
        except ValueError as exc:
            raise PlanError(f"'steps': {exc}", **where) from None
        return steps
    if isinstance(steps, list) and not steps:
        raise PlanError("'steps' is an empty list: omit it for every step, or name at least one step", **where)
    if isinstance(steps, list) and len(steps) <= MAX_STEPS and all(
            isinstance(s, int) and not isinstance(s, bool) for s in steps):
        return tuple(steps)
    if isinstance(steps, int) and not isinstance(steps, bool):
        return (steps,)
    raise PlanError(f"'steps' must be a slice string like '2:48:2' or a list of at most {MAX_STEPS} ints, "
                    f"got {short(steps)}", **where)
