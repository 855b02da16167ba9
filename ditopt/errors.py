"""The errors ditopt raises for bad input. Each names the thing at fault."""


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


def check_count(value, name: str, *, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else ``error`` naming ``name``.

    The one check of step counts, intervals and the like.

    >>> check_count(20, "steps")
    20
    >>> check_count(True, "steps")
    Traceback (most recent call last):
    ...
    ValueError: steps must be an integer >= 1, got True
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
