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

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from .errors import PlanError
from .sites import SITE_KINDS, SiteTable, is_positional, parse_position

VERSION = 1
COMPUTE = "compute"
REUSE = "reuse"
REUSE_RESIDUAL = "reuse_residual"
PREDICT = "predict"
ACTIONS = (COMPUTE, REUSE, REUSE_RESIDUAL, PREDICT)
SLOTS = {REUSE: "output", REUSE_RESIDUAL: "residual"}
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

    def step_list(self, total: int) -> list[int]:
        """The steps this rule covers, for a plan of ``total`` steps."""
        if self.steps is None:
            return list(range(total))
        if isinstance(self.steps, str):
            return list(range(total))[_parse_slice(self.steps)]
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


def _parse_slice(text: str) -> slice:
    parts = text.split(":")
    if len(parts) > 3:
        raise ValueError(f"not a slice: {text!r}")
    try:
        nums = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"not a slice: {text!r}") from None
    if len(nums) == 1:
        return slice(nums[0], nums[0] + 1 if nums[0] is not None else None)
    return slice(*nums)


@dataclass(frozen=True)
class Indicator:
    """What a ``when`` rule's indicator watches once resolved against a model: the graph node
    (``of``'s first live-out or its modulated input) and the polynomial its change goes through."""

    node: str
    rescale: tuple[float, ...] | None = None


@dataclass
class CompiledPlan:
    """A plan resolved against a model's sites: one action per (site, step).

    ``actions[site][step]``; ``adaptive[site][step]`` is the index into ``when_rules`` of the
    ``when`` rule deciding that (site, step), else None; ``when_rules[i] = (of, below)`` and
    ``indicators[i]`` the node it watches (empty: each ``of``'s first live-out, no rescale).
    Only sites with some non-compute step appear.
    """

    steps: int
    actions: dict[str, list[str]]
    adaptive: dict[str, list[int | None]]
    when_rules: list[tuple[str, float]]
    slots: dict[str, str]
    orders: dict[str, list[int]] = field(default_factory=dict)  # predict's Taylor order per step
    indicators: list[Indicator] = field(default_factory=list)

    def action_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.actions.values():
            for a in row:
                counts[a] = counts.get(a, 0) + 1
        return counts


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
        steps = data.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise PlanError(f"'steps' must be a positive integer, got {steps!r}")
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
        """The same plan for ``steps`` denoising steps instead of ``self.steps``.

        The static rules that skip a site (reuse, forecast) are resampled together, as one
        schedule of computed and skipped steps per site, which keeps the schedule's shape
        in steps rather than stretching it:

        - the warm-up (the computed steps before the first skipped one) keeps its length;
        - after it, the new schedule is walked from computed step to computed step, and each
          run of skipped steps is as long as the run the old plan had at the same relative
          position of the schedule. "Compute, forecast" stays an alternation, and the longest
          run of consecutive skips (the plan's bound on consecutive reuse) is kept.
          Stretching runs by ``steps / self.steps`` instead measured 1.5-1.9 dB worse on
          wan-digits and the same on dit-digits (20 to 30 steps, ``docs/BENCHMARKS.md``);
        - the number of skipped steps is then brought to within one step of the old share of
          the schedule, by breaking the longest run or lengthening the shortest, latest first;
        - each new skipped step takes the rule (action, order) of the nearest old skipped step.

        Other rules with steps (compute rules) are spread as a density along the schedule;
        ``when`` rules without steps apply to every step, as before.

        A plan made by the planner from a redundancy map is better re-planned from that map:
        ``plan_from_profile(rmap, budget=..., steps=M)`` lays the skipped steps out for M steps
        where this walk keeps their positions (measured 20 to 30 steps on wan-digits: 48.00 dB
        against 45.22 for this method; ``docs/BENCHMARKS.md``).

        Example:
            >>> plan = Plan(steps=4, rules=[Rule(sites=("*",), kind="block", steps=(1, 3), action="reuse_residual")])
            >>> plan.resample(8).rules[0].steps
            (1, 3, 5, 7)
            >>> Plan(steps=10, rules=[Rule(sites=("b",), steps=(3, 4, 6, 7, 9), action="predict")]).resample(15).rules[0].steps
            (3, 4, 6, 7, 9, 10, 12, 13)
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise PlanError(f"can only resample to a positive number of steps, got {steps!r}")
        old = self.steps
        scale = old / steps

        def spread(covered: set[int]) -> tuple[int, ...]:
            chosen, carry = [], 0.0
            for i in range(steps):
                centre = (i + 0.5) * scale  # the rule's local density: its share of 2 old steps around
                lo, hi = centre - 1.0, centre + 1.0
                share = sum(max(0.0, min(hi, s + 1) - max(lo, s)) for s in covered if s + 1 > lo and s < hi) / 2.0
                carry += share
                if carry >= 0.5:
                    chosen.append(i)
                    carry -= 1.0
            return tuple(chosen)

        # Static non-compute rules on the same sites are resampled together, as one schedule
        # (so two rules that share it, e.g. forecasts of order 1 and 2, neither collide nor leave
        # gaps), each new skipped step then taking the rule of the nearest old step.
        def target(rule: Rule):
            return (rule.sites, rule.kind, rule.attention) if rule.action != COMPUTE and rule.when is None \
                and rule.steps is not None else None

        assigned: dict[int, tuple[int, ...]] = {}
        groups: dict[tuple, list[int]] = {}
        for index, rule in enumerate(self.rules):
            key = target(rule)
            if key is not None:
                groups.setdefault(key, []).append(index)
        for members in groups.values():
            owner: dict[int, int] = {}
            for index in members:  # a later rule overrides an earlier one on the same step
                for st in self.rules[index].step_list(old):
                    owner[st] = index
            picked: dict[int, list[int]] = {index: [] for index in members}
            for i in _walk(set(owner), old, steps):
                position = (i + 0.5) * scale - 0.5
                nearest = min(owner, key=lambda st: (abs(st - position), -st))
                picked[owner[nearest]].append(i)
            assigned.update({index: tuple(v) for index, v in picked.items()})

        rules = []
        for index, rule in enumerate(self.rules):
            if rule.steps is None:
                rules.append(rule)
                continue
            if index in assigned:
                new_steps = assigned[index]
            else:
                new_steps = spread(set(rule.step_list(old)))
                if rule.action != COMPUTE and rule.when is None:
                    new_steps = tuple(s for s in new_steps if s > 0)
            if new_steps:
                rules.append(Rule(sites=rule.sites, action=rule.action, steps=new_steps, kind=rule.kind,
                                  when=rule.when, order=rule.order, attention=rule.attention))
        plan = Plan(steps=steps, rules=rules, version=self.version, model=self.model,
                    name=f"{self.name or 'plan'}@{steps}")
        plan.check()
        return plan

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
    def compile(self, sites: SiteTable) -> CompiledPlan:
        """Resolve the rules against ``sites``; raise PlanError naming rule and site on misuse."""
        if self.model and sites.sites and getattr(sites, "model", None) not in (None, self.model):
            raise PlanError(f"plan was made for {self.model}, not {sites.model}")
        actions: dict[str, list[str]] = {}
        adaptive: dict[str, list[int | None]] = {}
        when_rules: list[tuple[str, float]] = []
        indicators: list[Indicator] = []
        origin: dict[tuple[str, int], int] = {}
        orders: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            where = dict(rule=i, line=rule.line)
            for pattern in rule.sites:
                if not pattern.startswith("!") and is_positional(pattern) and not sites.match([pattern]):
                    raise PlanError(f"pattern {pattern!r} selects none of the stack's {len(sites.stack_blocks())} "
                                    f"blocks", site=pattern, **where)
                if not pattern.startswith("!") and not sites.match([pattern]):
                    raise PlanError(f"pattern {pattern!r} matches no site; sites are e.g. {sites.names()[:6]}",
                                    site=pattern, **where)
            matched = sites.match(list(rule.sites), kind=rule.kind)
            if not matched:
                raise PlanError(f"no site of kind {rule.kind!r} matches {list(rule.sites)}",
                                site=",".join(rule.sites), **where)
            if rule.attention is not None:
                # A model without attention of this kind (DiT has no cross attention) leaves
                # the rule without effect: PAB's per-kind ranges apply to the kinds it has.
                matched = [s for s in matched if s.attention == rule.attention]
            when_index = None
            if rule.when is not None:
                of = resolve_of(rule.when.of, rule.kind, sites)
                if of is None:
                    raise PlanError(f"'when.of' names no site: {rule.when.of!r}", site=rule.when.of, **where)
                watched = sites[of].live_outs[0] if rule.when.on == "output" else sites[of].modulated_input
                if watched is None:
                    raise PlanError(f"'when.on: {rule.when.on}': site {of!r} has none that ditopt can find "
                                    f"(use on: output)", site=of, **where)
                when_index = len(when_rules)
                when_rules.append((of, rule.when.below))
                indicators.append(Indicator(watched, rule.when.rescale))
                # A site is never decided by its own output, nor by one inside or around it.
                matched = [s for s in matched if s.name != of and of not in sites.ancestors(s.name)
                           and s.name not in sites.ancestors(of)]
            for site in matched:
                if rule.action != COMPUTE and not site.skippable:
                    raise PlanError(f"site cannot be skipped: {site.why_not_skippable}", site=site.name, **where)
                if rule.action == REUSE_RESIDUAL and any(r is None for r in site.residual_inputs):
                    raise PlanError("reuse_residual needs an input shaped like each output; this site has none "
                                    "(use 'reuse')", site=site.name, **where)
                row = actions.setdefault(site.name, [COMPUTE] * self.steps)
                arow = adaptive.setdefault(site.name, [None] * self.steps)
                orow = orders.setdefault(site.name, [0] * self.steps)
                for s in rule.step_list(self.steps):
                    row[s] = rule.action
                    arow[s] = when_index if rule.action != COMPUTE else None
                    orow[s] = (1 if rule.order is None else rule.order) if rule.action == PREDICT else 0
                    origin[(site.name, s)] = i
        slots: dict[str, str] = {}
        for name, row in list(actions.items()):
            used = {a for a in row if a != COMPUTE}
            if not used:
                del actions[name], adaptive[name]
                continue
            kinds = used - {PREDICT}
            if len(kinds) > 1:
                raise PlanError(f"a site takes one kind of reuse per plan, got {sorted(used)}", site=name)
            if kinds:
                slots[name] = SLOTS[kinds.pop()]
            else:  # predict alone forecasts the residual where the site has one, else its output
                residual = all(r is not None for r in sites[name].residual_inputs) and sites[name].residual_inputs
                slots[name] = "residual" if residual else "output"
            static = [s for s, a in enumerate(row) if a != COMPUTE and adaptive[name][s] is None]
            first = static[0] if static else None  # adaptive steps compute by themselves while nothing is cached
            if first is not None and COMPUTE not in row[:first]:
                i = origin[(name, first)]
                raise PlanError(f"{row[first]} at step {first} before the site computed at any step",
                                rule=i, line=self.rules[i].line, site=name)
        self._check_when(sites, actions, adaptive, when_rules)
        for name, row in actions.items():
            for st, a in enumerate(row):
                if a == PREDICT and adaptive[name][st] is not None:
                    i = origin[(name, st)]
                    raise PlanError("predict cannot be adaptive ('when'): a forecast needs a fixed step table",
                                    rule=i, line=self.rules[i].line, site=name)
        orders = {name: orders[name] for name in actions}
        return CompiledPlan(self.steps, actions, adaptive, when_rules, slots, orders, indicators)

    def _check_when(self, sites, actions, adaptive, when_rules) -> None:
        order = {n: i for i, n in enumerate(sites.names())}
        for index, (of, _) in enumerate(when_rules):
            governed = [s for s, row in adaptive.items() if index in row]
            rule_i = [i for i, r in enumerate(self.rules) if r.when is not None][index]
            where = dict(rule=rule_i, line=self.rules[rule_i].line)
            for s in governed:
                if s == of or of in sites.ancestors(s) or s in sites.ancestors(of):
                    raise PlanError(f"'when.of' site {of!r} cannot be {s!r}, inside it or contain it",
                                    site=s, **where)
                if order[s] <= order[of]:
                    raise PlanError(f"site {s!r} runs before its 'when.of' site {of!r}", site=s, **where)
            steps = {st for s in governed for st, r in enumerate(adaptive[s]) if r == index}
            for anc in [of, *sites.ancestors(of)]:
                row = actions.get(anc)
                if row and any(row[st] != COMPUTE for st in steps):
                    raise PlanError(f"the 'when.of' site must compute at every step the rule decides, but "
                                    f"{anc!r} reuses", site=of, **where)


def resolve_of(pattern: str, kind: str | None, sites: SiteTable) -> str | None:
    """The site a ``when.of`` names: the site itself, for ``stack[...]`` the first block it
    selects, or for a glob the first match in graph order (of the rule's kind), preferring the
    blocks of the stack."""
    if pattern in sites:
        return pattern
    if is_positional(pattern):
        blocks = sites.match([pattern], kind="block")
        return blocks[0].name if blocks else None
    found = sites.match([pattern], kind=kind)
    in_stack = [s for s in found if s.parent == "stack"]
    pick = (in_stack or found)
    return pick[0].name if pick else None


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
    sites = raw.get("sites")
    if isinstance(sites, str):
        sites = (sites,)
    elif isinstance(sites, list) and sites and all(isinstance(s, str) for s in sites):
        sites = tuple(sites)
    else:
        raise PlanError(f"'sites' must be a glob or a list of globs, got {sites!r}", **at("sites"))
    label = ",".join(sites)
    for pattern in sites:
        if pattern.removeprefix("!").startswith("stack["):
            try:
                parse_position(pattern)
            except ValueError as exc:
                raise PlanError(str(exc), site=label, **at("sites")) from None
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
    steps = raw.get("steps")
    if steps is not None:
        if isinstance(steps, str):
            try:
                _parse_slice(steps)
            except ValueError as exc:
                raise PlanError(str(exc), site=label, **at("steps")) from None
        elif isinstance(steps, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            steps = tuple(steps)
        elif isinstance(steps, int) and not isinstance(steps, bool):
            steps = (steps,)
        else:
            raise PlanError(f"'steps' must be a slice string like '2:48:2' or a list of ints, got {steps!r}",
                            site=label, **at("steps"))
    order = raw.get("order")
    if order is not None:
        if action != PREDICT:
            raise PlanError(f"'order' applies to action predict, not {action!r}", site=label, **at("order"))
        if not isinstance(order, int) or isinstance(order, bool) or order not in ORDERS:
            raise PlanError(f"'order' must be one of {list(ORDERS)}, got {order!r}", site=label, **at("order"))
    when = raw.get("when")
    if isinstance(when, dict) and True in when and "on" not in when:
        when = {("on" if k is True else k): v for k, v in when.items()}  # YAML 1.1 reads a bare `on:` as True
    if when is not None:
        where = at("when")  # the errors below name the line of 'when'
        if not isinstance(when, dict) or set(when) - _WHEN_KEYS or "of" not in when or "below" not in when:
            raise PlanError("'when' must be {indicator: rel_l1, of: SITE, below: NUMBER} with optional "
                            "on: output|input and rescale: [NUMBER, ...]", site=label, **where)
        indicator = when.get("indicator", "rel_l1")
        if indicator not in INDICATORS:
            raise PlanError(f"unknown indicator {indicator!r}; known: {list(INDICATORS)}", site=label, **where)
        below = when["below"]
        if not isinstance(below, (int, float)) or isinstance(below, bool) or below <= 0:
            raise PlanError(f"'when.below' must be a positive number, got {below!r}", site=label, **where)
        on = when.get("on", "output")
        if on not in WATCHED:
            raise PlanError(f"'when.on' must be one of {list(WATCHED)}, got {on!r}", site=label, **where)
        rescale = when.get("rescale")
        if rescale is not None:
            if not isinstance(rescale, list) or not rescale or not all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) for c in rescale):
                raise PlanError(f"'when.rescale' must be a non-empty list of polynomial coefficients, highest "
                                f"power first, got {rescale!r}", site=label, **where)
            rescale = tuple(float(c) for c in rescale)
        of = when["of"]
        if isinstance(of, str) and of.startswith("stack["):
            try:
                parse_position(of)
            except ValueError as exc:
                raise PlanError(f"'when.of': {exc}", site=label, **where) from None
        when = When(of=str(of), below=float(below), indicator=indicator, on=on, rescale=rescale)
    return Rule(sites=sites, action=action, steps=steps, kind=kind, when=when, order=order, attention=attention,
                line=line, step_line=lines.get("steps", line))


def _walk(skipped: set[int], old: int, steps: int) -> list[int]:
    """The skipped steps of a schedule of ``old`` steps resampled to ``steps`` (see
    :meth:`Plan.resample`): the warm-up kept, the runs of skips kept in length along the
    schedule, the share of skipped steps kept.

    Example:
        >>> _walk({1, 3, 5, 7, 9}, 10, 15)
        [1, 3, 5, 7, 9, 11, 13]
        >>> _walk({3, 5, 7, 9, 11, 13, 14, 16, 18, 19}, 20, 30)
        [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 22, 24, 26, 28, 29]
    """
    skipped = {s for s in skipped if 0 < s < old}
    if not skipped or steps < 2:
        return []
    computed = [s for s in range(old) if s not in skipped]
    warmup = min(skipped)  # steps 0 .. warmup-1 compute
    run_after = {a: b - a - 1 for a, b in zip(computed, computed[1:] + [old])}
    anchors = [c for c in computed if c >= warmup - 1]
    new_computed = list(range(min(warmup, steps - 1)))
    p = len(new_computed) - 1
    while True:
        q = p * (old - 1) / (steps - 1)
        anchor = max((c for c in anchors if c <= q + 1e-9), default=anchors[0])
        p += run_after[anchor] + 1
        if p > steps - 1:
            break
        new_computed.append(p)
    done = set(new_computed)
    out = [i for i in range(steps) if i not in done]
    exact = len(skipped) * steps / old  # the old share of skipped steps, kept to within one step
    most, least = min(steps - 1, math.ceil(exact - 1e-9)), max(1, math.floor(exact + 1e-9))

    def runs() -> list[tuple[int, int]]:  # (start, length) of each run of skips
        found, start = [], None
        for i in range(1, steps + 1):
            if i < steps and i not in done:
                start = i if start is None else start
            elif start is not None:
                found.append((start, i - start))
                start = None
        return found

    while len(out) > most:  # break the longest run (latest first) in its middle
        start, length = max(runs(), key=lambda r: (r[1], r[0]))
        done.add(start + length // 2)
        out = [i for i in range(steps) if i not in done]
    while len(out) < least:  # skip a computed step after the warm-up, where the run it makes is shortest
        def made(c: int) -> int:
            lo, hi = c - 1, c + 1
            while lo > 0 and lo not in done:
                lo -= 1
            while hi < steps and hi not in done:
                hi += 1
            return hi - lo - 1
        free = [c for c in done if c >= max(1, warmup)]
        if not free:
            break
        done.discard(min(free, key=lambda c: (made(c), -c)))
        out = [i for i in range(steps) if i not in done]
    return out
