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
