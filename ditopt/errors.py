"""The errors ditopt raises for bad input. Each names the thing at fault, on one line.

The bounds every input is checked against live here: :data:`MAX_STEPS` (denoising steps of a
plan, a map, a resampling or a command) and the checks of counts and numbers
(:func:`check_count`, :func:`check_number`); :func:`short` shows a value in a message.
"""

import math
import reprlib

MAX_STEPS = 10_000  # the most denoising steps a plan, a redundancy map or a command may name


class DitoptError(Exception):
    """Base class of ditopt's errors."""


class PlanError(DitoptError, ValueError):
    """A plan that cannot be applied: malformed, or not made for this model.

    ``rule`` is the 0-based index of the offending rule and ``line`` its line in the YAML
    text (when the plan came from YAML), ``site`` the site pattern or name concerned.
    """

    def __init__(self, message: str, *, rule: int | None = None, line: int | None = None, site: str | None = None):
        where = []
        if line is not None:
            where.append(f"line {line}")
        if rule is not None:
            where.append(f"rule {rule}")
        if site is not None:
            where.append(f"site {site!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.rule, self.line, self.site = rule, line, site


class CaptureError(DitoptError, RuntimeError):
    """The model could not be captured as a single graph."""


class TimestepNotFound(CaptureError):
    """The captured graph has no timestep input of the name ditopt was told (``timestep_arg``)."""


class InputError(DitoptError, ValueError):
    """A bad argument to a ditopt function or command (a count, a number, a path)."""


class DivergenceError(DitoptError, RuntimeError):
    """Sequence-parallel ranks about to take different decisions (``SequenceParallel(check=True)``):
    the message names the step, the sites and the ranks that disagree. Raised on every rank."""


class RankFailureError(DitoptError, RuntimeError):
    """A sequence-parallel peer rank died, raised or stopped answering mid-generation: the message
    names that rank (or says why it cannot) and the step this rank was at."""


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 3
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def short(value) -> str:
    """``repr(value)`` cut short (bounded in length and nesting), for error messages.

    >>> len(short("x" * 10**6))
    60
    >>> short([[[[1]]]])
    '[[[[...]]]]'
    """
    return _SHORT.repr(value)


def check_count(value, name: str, *, minimum: int = 1, maximum: int | None = None,
                error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) in [``minimum``, ``maximum``]; else ``error`` naming
    ``name``. The one check of step counts, intervals and the like.

    >>> check_count(20, "steps")
    20
    >>> check_count(True, "steps")
    Traceback (most recent call last):
    ...
    ValueError: steps must be an integer >= 1, got True
    >>> check_count(10**7, "steps", maximum=MAX_STEPS)
    Traceback (most recent call last):
    ...
    ValueError: steps must be an integer in [1, 10000], got 10000000
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise error(f"{name} must be an integer {bound}, got {short(value)}")
    return value


def check_steps(value, name: str = "steps", *, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """A step count: an int in [``minimum``, :data:`MAX_STEPS`] (see :func:`check_count`)."""
    return check_count(value, name, minimum=minimum, maximum=MAX_STEPS, error=error)


def check_number(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 positive: bool = False, error: type[Exception] = ValueError) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) in [``minimum``,
    ``maximum``] (and > 0 when ``positive``); else ``error`` naming ``name``.

    >>> check_number(0.5, "budget", maximum=1, positive=True)
    0.5
    >>> check_number(float("nan"), "when.below", positive=True)
    Traceback (most recent call last):
    ...
    ValueError: when.below must be a finite number > 0, got nan
    """
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        ok = False
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and (not positive or value > 0)
    if not ok:
        bounds = ["> 0" if positive else "", f">= {minimum}" if minimum is not None and not positive else "",
                  f"<= {maximum}" if maximum is not None else ""]
        bound = " and ".join(b for b in bounds if b)
        raise error(f"{name} must be a finite number{' ' + bound if bound else ''}, got {short(value)}")
    return float(value)
