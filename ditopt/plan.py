"""Plans: which action each site takes at each step, as a versioned YAML document.

A plan is a list of rules; a later rule overrides an earlier one on the same (site, step).
It is checked twice: on its own when it is read (schema, actions, step ranges, reuse before
anything was computed), and against a model's sites before any rewrite (patterns that match
nothing, actions a site cannot take). Every error names the rule, its YAML line and the site.

Beyond globs, a rule can address the stack's blocks by position (``sites: "stack[2:]"``,
``"stack[-1]"``, ``"!stack[0]"``: Python index or slice over the blocks whose parent is the
stack, in graph order), narrow attention sites by their kind (``attention: cross``), and make
its ``when`` indicator watch a site's modulated input instead of its output, mapped through a
polynomial before it accumulates (``when: {of: "stack[0]", on: input, rescale: [...]}``,
TeaCache).

Example:
    >>> plan = Plan.from_yaml('''
    ... version: 1
    ... steps: 10
    ... rules:
    ...   - sites: "blocks.*"
    ...     kind: block
    ...     steps: "1:10:2"
    ...     action: reuse_residual
    ... ''')
    >>> plan.rules[0].step_list(plan.steps)
    [1, 3, 5, 7, 9]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from ditopt.runtime.decisions import PLAN_ACTIONS, Action, DecisionTable

from .errors import PlanError, check_count
from .sites import SITE_KINDS, SiteTable, is_positional, parse_position, parse_slice

VERSION = 1
COMPUTE, REUSE, REUSE_RESIDUAL, PREDICT = (Action.COMPUTE, Action.REUSE, Action.REUSE_RESIDUAL, Action.PREDICT)
ACTIONS = tuple(a.value for a in PLAN_ACTIONS)
ORDERS = (0, 1, 2)
INDICATORS = ("rel_l1",)
WATCHED = ("output", "input")  # when.on: a site's first live-out, or its modulated input
ATTENTION_KINDS = ("self", "cross", "joint")
_RULE_KEYS = {"sites", "kind", "attention", "steps", "action", "when", "order"}
_WHEN_KEYS = {"indicator", "of", "below", "on", "rescale"}
_PLAN_KEYS = {"version", "steps", "rules", "model", "name", "description"}


@dataclass(frozen=True)
class When:
    """Adaptive condition: the rule applies only where ``of``'s accumulated change is below.

    ``on`` picks what of ``of`` is watched: its first live-out (``output``, the default) or its
    modulated input (``input``: the tensor after the norm and modulation that feeds its first
    attention; see :mod:`ditopt.sites`). ``rescale`` maps each step's relative L1 change through
    the polynomial with these coefficients, highest power first (``numpy.polyval`` order, as
    TeaCache's fitted coefficients are given) before it is accumulated; None is the identity.
    """

    of: str
    below: float
    indicator: str = "rel_l1"
    on: str = "output"
    rescale: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"indicator": self.indicator, "of": self.of, "below": self.below}
        if self.on != "output":
            d["on"] = self.on
        if self.rescale is not None:
            d["rescale"] = list(self.rescale)
        return d


@dataclass(frozen=True)
class Rule:
    sites: tuple[str, ...]
    action: str
    steps: str | tuple[int, ...] | None = None
    kind: str | None = None
    when: When | None = None
    order: int | None = None  # predict: Taylor order (default 1)
    attention: str | None = None  # only attention sites of this kind: self | cross | joint
    line: int | None = field(default=None, compare=False)
    step_line: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.action, Action):  # the plain YAML spelling, so that plans dump as YAML
            object.__setattr__(self, "action", self.action.value)

    def step_list(self, total: int) -> list[int]:
        """The steps this rule covers, for a plan of ``total`` steps."""
        if self.steps is None:
            return list(range(total))
        if isinstance(self.steps, str):
            return list(range(total))[parse_slice(self.steps)]
        return list(self.steps)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sites": self.sites[0] if len(self.sites) == 1 else list(self.sites)}
        if self.kind:
            d["kind"] = self.kind
        if self.attention:
            d["attention"] = self.attention
        if self.steps is not None:
            d["steps"] = self.steps if isinstance(self.steps, str) else list(self.steps)
        d["action"] = self.action
        if self.order is not None:
            d["order"] = self.order
        if self.when:
            d["when"] = self.when.to_dict()
        return d


CompiledPlan = DecisionTable  # the name before the redesign: Plan.compile returns a DecisionTable


@dataclass
class Plan:
    """A versioned decision plan (see the module docstring and ``configs/plans``)."""

    steps: int
    rules: list[Rule]
    version: int = VERSION
    model: str | None = None
    name: str | None = None

    # -- reading and writing ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file. Errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            return cls.from_yaml(path.read_text())
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from exc

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise PlanError(f"malformed YAML: {getattr(exc, 'problem', exc)}", line=line) from None
        lines = _rule_lines(root)
        return cls.from_dict(data, lines=lines)

    @classmethod
    def from_dict(cls, data: Any, lines: list[int] | None = None) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError("a plan must be a mapping with version, steps and rules")
        unknown = set(data) - _PLAN_KEYS
        if unknown:
            raise PlanError(f"unknown plan field(s) {sorted(unknown)}; known: {sorted(_PLAN_KEYS)}")
        version = data.get("version")
        if version != VERSION:
            raise PlanError(f"unknown plan version {version!r}; this ditopt reads version {VERSION}")
        steps = check_count(data.get("steps"), "'steps'", error=PlanError)
        raw_rules = data.get("rules")
        if not isinstance(raw_rules, list):
            raise PlanError("'rules' must be a list of rules")
        rules = [_rule_from_dict(r, i, lines[i] if lines and i < len(lines) else None)
                 for i, r in enumerate(raw_rules)]
        plan = cls(steps=steps, rules=rules, version=version, model=data.get("model"), name=data.get("name"))
        plan.check()
        return plan

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version}
        if self.name:
            d["name"] = self.name
        if self.model:
            d["model"] = self.model
        d["steps"] = self.steps
        d["rules"] = [r.to_dict() for r in self.rules]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def resample(self, steps: int) -> "Plan":
        """The same plan for ``steps`` denoising steps: the schedule's warm-up and runs of skipped
        steps kept in length (see :func:`ditopt.resample.resample_plan`). A plan the planner made
        from a redundancy map is better re-planned from it: ``plan_from_profile(rmap, steps=M)``.

        Example:
            >>> plan = Plan(steps=4, rules=[Rule(sites=("*",), kind="block", steps=(1, 3), action="reuse_residual")])
            >>> plan.resample(8).rules[0].steps
            (1, 3, 5, 7)
        """
        from .resample import resample_plan

        return resample_plan(self, steps)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> None:
        """Checks that need no model: step ranges, and no reuse before a compute."""
        for i, rule in enumerate(self.rules):
            for s in rule.step_list(self.steps):
                if not 0 <= s < self.steps:
                    raise PlanError(f"step {s} is out of range 0..{self.steps - 1}", rule=i, line=rule.step_line or rule.line,
                                    site=",".join(rule.sites))
            if isinstance(rule.steps, str) and not rule.step_list(self.steps):
                raise PlanError(f"steps {rule.steps!r} select no step of 0..{self.steps - 1}", rule=i,
                                line=rule.line, site=",".join(rule.sites))
            if rule.action != COMPUTE and rule.when is None and 0 in rule.step_list(self.steps):
                raise PlanError(f"{rule.action} at step 0: nothing has been computed yet to reuse", rule=i,
                                line=rule.line, site=",".join(rule.sites))

    def check_patterns(self, names: list[str]) -> None:
        """Every include pattern must match some name (a cheap check before capture)."""
        for i, rule in enumerate(self.rules):
            for pattern in rule.sites:
                if pattern.startswith("!") or is_positional(pattern):  # positions need the graph
                    continue
                if not any(fnmatchcase(n, pattern) for n in names):
                    raise PlanError(f"pattern {pattern!r} matches no site of this model", rule=i, line=rule.line,
                                    site=pattern)

    # -- resolving against a model --------------------------------------------------------------
    def compile(self, sites: SiteTable) -> DecisionTable:
        """Resolve the rules against ``sites`` (see :mod:`ditopt.resolve`); raise PlanError naming
        rule and site on misuse."""
        from .resolve import compile_plan

        return compile_plan(self, sites)


def _rule_lines(root) -> list[dict[str, int]]:
    """1-based line of each rule in the YAML text (best effort)."""
    if root is None or not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if getattr(key, "value", None) == "rules" and isinstance(value, yaml.SequenceNode):
            return [_field_lines(item) for item in value.value]
    return []


def _field_lines(item) -> dict[str, int]:
    """``{"": the rule's first line, field: that field's line}``."""
    lines = {"": item.start_mark.line + 1}
    if isinstance(item, yaml.MappingNode):
        for key, _ in item.value:
            lines[str(getattr(key, "value", ""))] = key.start_mark.line + 1
    return lines


def _rule_from_dict(raw: Any, index: int, lines: dict[str, int] | None) -> Rule:
    lines = lines or {}
    line = lines.get("")
    where = dict(rule=index, line=line)

    def at(field: str) -> dict[str, Any]:
        return dict(rule=index, line=lines.get(field, line))

    if not isinstance(raw, dict):
        raise PlanError(f"a rule must be a mapping, got {type(raw).__name__}", **where)
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PlanError(f"unknown rule field(s) {sorted(unknown)}; known: {sorted(_RULE_KEYS)}", **where)
    sites = _sites_field(raw.get("sites"), at("sites"))
    label = ",".join(sites)
    action = raw.get("action")
    if action not in ACTIONS:
        raise PlanError(f"unknown action {action!r}; known: {list(ACTIONS)}", site=label, **at("action"))
    kind = raw.get("kind")
    if kind is not None and kind not in SITE_KINDS:
        raise PlanError(f"unknown kind {kind!r}; known: {list(SITE_KINDS)}", site=label, **at("kind"))
    attention = raw.get("attention")
    if attention is not None:
        if attention not in ATTENTION_KINDS:
            raise PlanError(f"unknown attention kind {attention!r}; known: {list(ATTENTION_KINDS)}", site=label,
                            **at("attention"))
        if kind not in (None, "attention"):
            raise PlanError(f"'attention' narrows attention sites, but the rule's kind is {kind!r}", site=label,
                            **at("attention"))
    steps = _steps_field(raw.get("steps"), dict(site=label, **at("steps")))
    order = raw.get("order")
    if order is not None:
        if action != PREDICT:
            raise PlanError(f"'order' applies to action predict, not {action!r}", site=label, **at("order"))
        if not isinstance(order, int) or isinstance(order, bool) or order not in ORDERS:
            raise PlanError(f"'order' must be one of {list(ORDERS)}, got {order!r}", site=label, **at("order"))
    when = _when_field(raw.get("when"), dict(site=label, **at("when")))  # its errors name the line of 'when'
    return Rule(sites=sites, action=action, steps=steps, kind=kind, when=when, order=order, attention=attention,
                line=line, step_line=lines.get("steps", line))


def _sites_field(sites: Any, where: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = (sites,)
    elif isinstance(sites, list) and sites and all(isinstance(s, str) for s in sites):
        sites = tuple(sites)
    else:
        raise PlanError(f"'sites' must be a glob or a list of globs, got {sites!r}", **where)
    for pattern in sites:
        if pattern.removeprefix("!").startswith("stack["):
            try:
                parse_position(pattern)
            except ValueError as exc:
                raise PlanError(str(exc), site=",".join(sites), **where) from None
    return sites


def _steps_field(steps: Any, where: dict[str, Any]) -> str | tuple[int, ...] | None:
    if steps is None:
        return None
    if isinstance(steps, str):
        try:
            parse_slice(steps)
        except ValueError as exc:
            raise PlanError(str(exc), **where) from None
        return steps
    if isinstance(steps, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        return tuple(steps)
    if isinstance(steps, int) and not isinstance(steps, bool):
        return (steps,)
    raise PlanError(f"'steps' must be a slice string like '2:48:2' or a list of ints, got {steps!r}", **where)


def _when_field(when: Any, where: dict[str, Any]) -> When | None:
    if isinstance(when, dict) and True in when and "on" not in when:
        when = {("on" if k is True else k): v for k, v in when.items()}  # YAML 1.1 reads a bare `on:` as True
    if when is None:
        return None
    if not isinstance(when, dict) or set(when) - _WHEN_KEYS or "of" not in when or "below" not in when:
        raise PlanError("'when' must be {indicator: rel_l1, of: SITE, below: NUMBER} with optional "
                        "on: output|input and rescale: [NUMBER, ...]", **where)
    indicator = when.get("indicator", "rel_l1")
    if indicator not in INDICATORS:
        raise PlanError(f"unknown indicator {indicator!r}; known: {list(INDICATORS)}", **where)
    below = when["below"]
    if not isinstance(below, (int, float)) or isinstance(below, bool) or below <= 0:
        raise PlanError(f"'when.below' must be a positive number, got {below!r}", **where)
    on = when.get("on", "output")
    if on not in WATCHED:
        raise PlanError(f"'when.on' must be one of {list(WATCHED)}, got {on!r}", **where)
    rescale = when.get("rescale")
    if rescale is not None:
        if not isinstance(rescale, list) or not rescale or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in rescale):
            raise PlanError(f"'when.rescale' must be a non-empty list of polynomial coefficients, highest "
                            f"power first, got {rescale!r}", **where)
        rescale = tuple(float(c) for c in rescale)
    of = when["of"]
    if isinstance(of, str) and of.startswith("stack["):
        try:
            parse_position(of)
        except ValueError as exc:
            raise PlanError(f"'when.of': {exc}", **where) from None
    return When(of=str(of), below=float(below), indicator=indicator, on=on, rescale=rescale)
