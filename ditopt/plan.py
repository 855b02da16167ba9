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
TeaCache). A ``predict`` rule names its forecaster with ``method`` (``taylor``, the default,
``hermite``, ``foca`` or ``freq``; :mod:`ditopt.runtime.forecast` says what each computes).
A ``window`` rule (self-attention sites only) gives its window in tokens along the attention's
sequence (``window: 256``): at those steps the site computes window attention and adds the residual
(full - window attention) cached at its last full step (DiTFastAttn's WA-RS).
A ``partial`` rule gives the share of the site's tokens it recomputes (``ratio: 0.2``, ToCa/DuCa):
the tokens whose input changed most since they were last computed; the others keep their cached output.
A ``share_cfg`` rule (attention and block sites) gives the unconditional CFG branch the conditional
one's output plus a cached offset; ``cfg: {layout: batched | calls, uncond: first | second}`` says how
the caller runs CFG (default: batched, uncond first, as diffusers; :mod:`ditopt.runtime.cfg_sharing`).

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

import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from ditopt.runtime.cfg_sharing import CfgLayout
from ditopt.runtime.decisions import PLAN_ACTIONS, Action, DecisionTable
from ditopt.runtime.forecast import METHODS

from .errors import PlanError, check_number, check_steps, short
from .plan_fields import MAX_NAME, cfg_field, ratio_field, sites_field, steps_field, window_field, window_yaml
from .sites import SITE_KINDS, SiteTable, is_positional, parse_position, parse_slice
from .validate import load_yaml, read_text

VERSION = 1
COMPUTE, REUSE, REUSE_RESIDUAL, PREDICT, WINDOW = (Action.COMPUTE, Action.REUSE, Action.REUSE_RESIDUAL, Action.PREDICT,
                                                   Action.WINDOW)
ACTIONS = tuple(a.value for a in PLAN_ACTIONS)
ORDERS = (0, 1, 2)
INDICATORS = ("rel_l1",)
WATCHED = ("output", "input")  # when.on: a site's first live-out, or its modulated input
ATTENTION_KINDS = ("self", "cross", "joint")
_RULE_KEYS = {"sites", "kind", "attention", "steps", "action", "when", "order", "method", "window", "cfg"}
_RULE_KEYS.add("ratio")  # partial: share of the tokens recomputed
_WHEN_KEYS = {"indicator", "of", "below", "on", "rescale"}
_PLAN_KEYS = {"version", "steps", "rules", "model", "name", "description"}
# Bounds every plan is checked against, besides MAX_STEPS (ditopt.errors: 'steps' in
# [1, MAX_STEPS]) and the YAML bounds of ditopt.validate (MAX_TEXT_BYTES of text, aliases
# expanded to at most MAX_YAML_NODES nodes). Numbers must be finite: when.below > 0.
MAX_RULES = 4096  # rules in one plan (MAX_NAME and MAX_WINDOW: ditopt.plan_fields)
MAX_RESCALE = 16  # coefficients of a when.rescale polynomial
PLAN_SUFFIXES = (".yaml", ".yml")


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
    order: int | None = None  # predict: forecast order (default 1)
    attention: str | None = None  # only attention sites of this kind: self | cross | joint
    method: str | None = None  # predict: taylor (default) | hermite | foca | freq (ditopt.runtime.forecast)
    window: int | None = None  # window: tokens of the attention window, or a GridWindow per axis (window only)
    cfg: CfgLayout | None = None  # share_cfg: how the caller runs CFG (None: batched, uncond first)
    ratio: float | None = None  # partial: share of the site's tokens recomputed, in (0, 1] (required there only)
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
        if self.method is not None:
            d["method"] = self.method
        if self.window is not None:
            d["window"] = window_yaml(self.window)
        if self.cfg is not None:
            d["cfg"] = self.cfg.to_dict()
        if self.ratio is not None:
            d["ratio"] = self.ratio
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
    def coerce(cls, plan: Any) -> "Plan":
        """A checked Plan from a Plan, a plan file (a path ending in ``.yaml``/``.yml``, as ``str``
        or ``os.PathLike``), YAML text or a dict. A one-line string that is not a flow mapping
        (``{...}``) is a path; the error says which of these ``plan`` was read as and what is wrong.

        Example:
            >>> Plan.coerce(".")
            Traceback (most recent call last):
            ...
            ditopt.errors.PlanError: plan path is a directory, not a plan file: .
        """
        if isinstance(plan, Plan):
            plan.check()
            return plan
        if isinstance(plan, dict):
            return cls.from_dict(plan)
        if isinstance(plan, os.PathLike):
            return cls.load(plan)
        if isinstance(plan, str):
            if not plan.strip():
                raise PlanError("empty plan text: expected a plan file path or YAML text")
            if "\n" not in plan.strip() and not plan.lstrip().startswith("{"):
                try:
                    return cls.load(plan)
                except PlanError as exc:
                    hint = None if os.path.exists(plan.strip()) else preset_hint(plan.strip())
                    if hint is None:
                        raise
                    raise PlanError(f"{exc}; {plan.strip()!r} names a preset, made in Python as {hint}") from None
            return cls.from_yaml(plan)
        raise PlanError(f"expected a Plan, a plan file path, YAML text or a dict, got {type(plan).__name__}")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file (``.yaml`` or ``.yml``, at most ``MAX_TEXT_BYTES``). Errors name the file."""
        if not isinstance(path, (str, os.PathLike)):
            raise PlanError(f"expected a plan file path, got {type(path).__name__}")
        path = Path(path)
        if len(str(path)) > 4096:
            raise PlanError(f"plan path of {len(str(path))} characters is not a file name")
        try:
            if path.is_dir():
                raise PlanError(f"plan path is a directory, not a plan file: {path}")
            if not path.is_file():
                raise PlanError(f"plan file not found: {path}")
        except OSError as exc:
            raise PlanError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
        if path.suffix.lower() not in PLAN_SUFFIXES:
            raise PlanError(f"plan file must end in .yaml or .yml: {path}")
        text = read_text(path, "plan file", PlanError)
        try:
            return cls.from_yaml(text)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from exc

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        """A plan from YAML text; the text and its aliases are bounded (:mod:`ditopt.validate`)."""
        data, root = load_yaml(text, error=lambda message, line: PlanError(message, line=line))
        return cls.from_dict(data, lines=_rule_lines(root))

    @classmethod
    def from_dict(cls, data: Any, lines: list[int] | None = None) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError("a plan must be a mapping with version, steps and rules")
        unknown = [k for k in data if k not in _PLAN_KEYS]
        if unknown:
            raise PlanError(f"unknown plan field(s) {short(sorted(unknown, key=str))}; known: {sorted(_PLAN_KEYS)}")
        version = data.get("version")
        if isinstance(version, bool) or version != VERSION:
            raise PlanError(f"unknown plan version {short(version)}; this ditopt reads version {VERSION}")
        steps = check_steps(data.get("steps"), "'steps'", error=PlanError)
        raw_rules = data.get("rules")
        if not isinstance(raw_rules, list):
            raise PlanError(f"'rules' must be a list of rules, got {short(raw_rules)}")
        if len(raw_rules) > MAX_RULES:
            raise PlanError(f"'rules' holds {len(raw_rules)} rules, more than the {MAX_RULES} a plan may have")
        for key in ("model", "name", "description"):
            _text_field(data.get(key), f"'{key}'", {}, limit=None if key == "description" else MAX_NAME)
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
        try:
            Path(path).write_text(self.to_yaml())
        except OSError as exc:
            raise PlanError(f"cannot write plan file {path}: {exc.strerror or exc}") from None

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> None:
        """Checks that need no model: every field typed and bounded (of a plan built in Python
        too), step ranges, and no reuse before a compute."""
        steps = check_steps(self.steps, "'steps'", error=PlanError)
        if isinstance(self.version, bool) or self.version != VERSION:
            raise PlanError(f"unknown plan version {short(self.version)}; this ditopt reads version {VERSION}")
        _text_field(self.model, "'model'", {})
        _text_field(self.name, "'name'", {})
        if not isinstance(self.rules, list) or len(self.rules) > MAX_RULES:
            raise PlanError(f"'rules' must be a list of at most {MAX_RULES} rules, got {short(self.rules)}")
        for i, rule in enumerate(self.rules):
            _check_rule(rule, i)
            covered = rule.step_list(steps)
            where = dict(rule=i, line=rule.line, site=",".join(rule.sites))
            for s in covered:
                if not 0 <= s < steps:
                    raise PlanError(f"step {s} is out of range 0..{steps - 1}", rule=i,
                                    line=rule.step_line or rule.line, site=where["site"])
            if isinstance(rule.steps, str) and not covered:
                raise PlanError(f"steps {rule.steps!r} select no step of 0..{steps - 1}", **where)
            if rule.action != COMPUTE and rule.when is None and 0 in covered:
                raise PlanError(f"{rule.action} at step 0: nothing has been computed yet to reuse", **where)

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


def _check_rule(rule: Any, index: int) -> None:
    """Check a rule as if it had been read from YAML (a rule built in Python skips the reader)."""
    if not isinstance(rule, Rule):
        raise PlanError(f"a rule must be a Rule, got {type(rule).__name__}", rule=index)
    where = dict(rule=index, line=rule.line)
    if not isinstance(rule.sites, tuple):
        raise PlanError(f"Rule.sites must be a tuple of globs, got {short(rule.sites)}", **where)
    if rule.steps is not None and not isinstance(rule.steps, (str, tuple, list)):
        raise PlanError(f"Rule.steps must be a slice string or a tuple of ints, got {short(rule.steps)}", **where)
    if rule.when is not None and not isinstance(rule.when, When):
        raise PlanError(f"Rule.when must be a When, got {short(rule.when)}", **where)
    _rule_from_dict(rule.to_dict(), index, {"": rule.line, "steps": rule.step_line})


def _text_field(value: Any, name: str, where: dict[str, Any], *, limit: int | None = MAX_NAME) -> None:
    """None or a string of at most ``limit`` characters."""
    if value is not None and (not isinstance(value, str) or (limit is not None and len(value) > limit)):
        bound = f" of at most {limit} characters" if limit is not None else ""
        raise PlanError(f"{name} must be a string{bound}, got {short(value)}", **where)


def _rule_from_dict(raw: Any, index: int, lines: dict[str, int] | None) -> Rule:
    lines = lines or {}
    line = lines.get("")
    where = dict(rule=index, line=line)

    def at(field: str) -> dict[str, Any]:
        return dict(rule=index, line=lines.get(field, line))

    if not isinstance(raw, dict):
        raise PlanError(f"a rule must be a mapping, got {type(raw).__name__}", **where)
    unknown = [k for k in raw if k not in _RULE_KEYS]
    if unknown:
        raise PlanError(f"unknown rule field(s) {short(sorted(unknown, key=str))}; known: {sorted(_RULE_KEYS)}",
                        **where)
    sites = sites_field(raw.get("sites"), at("sites"))
    label = ",".join(sites)
    action = raw.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise PlanError(f"unknown action {short(action)}; known: {list(ACTIONS)}", site=label, **at("action"))
    kind = raw.get("kind")
    if kind is not None and (not isinstance(kind, str) or kind not in SITE_KINDS):
        raise PlanError(f"unknown kind {short(kind)}; known: {list(SITE_KINDS)}", site=label, **at("kind"))
    attention = raw.get("attention")
    if attention is not None:
        if not isinstance(attention, str) or attention not in ATTENTION_KINDS:
            raise PlanError(f"unknown attention kind {short(attention)}; known: {list(ATTENTION_KINDS)}", site=label,
                            **at("attention"))
        if kind not in (None, "attention"):
            raise PlanError(f"'attention' narrows attention sites, but the rule's kind is {kind!r}", site=label,
                            **at("attention"))
    steps = steps_field(raw.get("steps"), dict(site=label, **at("steps")))
    order = raw.get("order")
    if order is not None:
        if action != PREDICT:
            raise PlanError(f"'order' applies to action predict, not {action!r}", site=label, **at("order"))
        if not isinstance(order, int) or isinstance(order, bool) or order not in ORDERS:
            raise PlanError(f"'order' must be one of {list(ORDERS)}, got {short(order)}", site=label, **at("order"))
    method = raw.get("method")
    if method is not None:
        if action != PREDICT:
            raise PlanError(f"'method' applies to action predict, not {action!r}", site=label, **at("method"))
        if not isinstance(method, str) or method not in METHODS:
            raise PlanError(f"unknown forecast method {short(method)}; known: {list(METHODS)}", site=label,
                            **at("method"))
    window = window_field(raw.get("window"), action, dict(site=label, **at("window")))
    cfg = cfg_field(raw.get("cfg"), action, raw.get("when"), dict(site=label, **at("cfg")))
    when = _when_field(raw.get("when"), dict(site=label, **at("when")))  # its errors name the line of 'when'
    if when is not None and action == Action.STALE_KV:
        raise PlanError("'stale_kv' cannot be adaptive ('when'): every rank must skip the same exchanges, and the "
                        "exchange before a stale step must know it will be needed", site=label, **at("when"))
    ratio = ratio_field(raw.get("ratio"), action, when, dict(site=label, **at("ratio")))
    if when is not None and action == WINDOW:
        raise PlanError("'window' cannot be adaptive ('when'): the residual it adds needs a fixed step table",
                        site=label, **at("when"))
    return Rule(sites=sites, action=action, steps=steps, kind=kind, when=when, order=order, attention=attention,
                method=method, window=window, cfg=cfg, ratio=ratio, line=line, step_line=lines.get("steps", line))


def _when_field(when: Any, where: dict[str, Any]) -> When | None:
    if isinstance(when, dict) and True in when and "on" not in when:
        when = {("on" if k is True else k): v for k, v in when.items()}  # YAML 1.1 reads a bare `on:` as True
    if when is None:
        return None
    if not isinstance(when, dict) or set(when) - _WHEN_KEYS or "of" not in when or "below" not in when:
        raise PlanError("'when' must be {indicator: rel_l1, of: SITE, below: NUMBER} with optional "
                        "on: output|input and rescale: [NUMBER, ...]", **where)
    indicator = when.get("indicator", "rel_l1")
    if not isinstance(indicator, str) or indicator not in INDICATORS:
        raise PlanError(f"unknown indicator {short(indicator)}; known: {list(INDICATORS)}", **where)
    below = check_number(when["below"], "'when.below'", positive=True, error=lambda m: PlanError(m, **where))
    on = when.get("on", "output")
    if not isinstance(on, str) or on not in WATCHED:
        raise PlanError(f"'when.on' must be one of {list(WATCHED)}, got {short(on)}", **where)
    rescale = when.get("rescale")
    if rescale is not None:
        if not isinstance(rescale, (list, tuple)) or not 0 < len(rescale) <= MAX_RESCALE:
            raise PlanError(f"'when.rescale' must be a non-empty list of at most {MAX_RESCALE} polynomial "
                            f"coefficients, highest power first, got {short(rescale)}", **where)
        rescale = tuple(check_number(c, f"'when.rescale' coefficient {k}", error=lambda m: PlanError(m, **where))
                        for k, c in enumerate(rescale))
    of = when["of"]
    if not isinstance(of, str) or not of or len(of) > MAX_NAME:
        raise PlanError(f"'when.of' must name a site (a string of 1 to {MAX_NAME} characters), got {short(of)}",
                        **where)
    if of.startswith("stack["):
        try:
            parse_position(of)
        except ValueError as exc:
            raise PlanError(f"'when.of': {exc}", **where) from None
    return When(of=of, below=below, indicator=indicator, on=on, rescale=rescale)


def preset_hint(spelled: str) -> str | None:
    """How to make the plan a preset's name stands for in Python, or None if it names none (the
    hint an error gives for ``ditopt.optimize(model, "fora-2")``).

    Example:
        >>> print(preset_hint("fora-2"))
        ditopt.presets.fora(steps=N, interval=2), N the sampler's step count
        >>> preset_hint("fora.yaml") is None
        True
    """
    from .presets import REGISTRY, lookup

    try:
        preset, knobs = lookup(spelled)
    except KeyError:
        preset, knobs = REGISTRY.get(spelled), {}
    if preset is None:
        return None
    fixed = dict(getattr(preset.make, "keywords", None) or {}, **knobs)  # a functools.partial's own knobs first
    func = getattr(preset.make, "func", preset.make).__name__
    args = "".join(f", {k}={v!r}" for k, v in fixed.items())
    return f"ditopt.presets.{func}(steps=N{args}), N the sampler's step count"
