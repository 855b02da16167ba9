"""Published feature-reuse methods as plan presets. Each returns an ordinary :class:`Plan`.

The site patterns are generic (``*`` narrowed by ``kind``, positions in the stack such as
``stack[1:]``, attention kinds), so a preset fits any DiT whose sites ditopt finds; edit the
YAML (``plan.to_yaml()``) to narrow it. ``configs/presets/`` holds each preset at 20 steps,
written by ``tools/write_presets.py``.

Presets take the number of denoising ``steps`` the plan is for; a plan for another count is
``plan.resample(n)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ditopt.runtime.forecast import METHODS

from .errors import check_count, check_steps
from .plan import Plan, Rule, When

__all__ = ["fora", "first_block_cache", "delta_dit", "taylorseer", "teacache", "dbcache", "pab", "ditfastattn", "distrifusion",
           "all_compute", "Preset", "REGISTRY", "PRESETS", "SPELLINGS", "lookup"]


def _check_threshold(threshold) -> None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")


def fora(interval: int = 2, steps: int = 50, *, warmup: int = 0, level: str = "layer") -> Plan:
    """FORA: compute every ``interval``-th step, reuse cached layer outputs in between.

    Follows Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer
    Acceleration" (2024): attention and MLP outputs are cached at the computing steps and
    reused at the others. ``level="block"`` reuses whole blocks' residuals instead.
    The first ``warmup`` steps always compute.

    Example:
        >>> fora(interval=3, steps=9).rules[0].step_list(9)
        [1, 2, 4, 5, 7, 8]
    """
    check_count(interval, "interval", minimum=1)
    check_steps(steps)
    if level not in ("layer", "block"):
        raise ValueError(f"level must be 'layer' or 'block', got {level!r}")
    reuse_steps = tuple(s for s in range(max(1, warmup), steps) if (s - warmup) % interval != 0)
    plan_steps = reuse_steps or None
    if level == "block":
        rules = [Rule(sites=("*",), kind="block", steps=plan_steps, action="reuse_residual")]
    else:
        rules = [Rule(sites=("*",), kind="attention", steps=plan_steps, action="reuse"),
                 Rule(sites=("*",), kind="feedforward", steps=plan_steps, action="reuse")]
    if not reuse_steps:
        rules = [Rule(sites=("*",), kind="block", action="compute")]
    plan = Plan(steps=steps, rules=rules, name=f"fora-{interval}")
    plan.check()
    return plan


def first_block_cache(threshold: float = 0.08, steps: int = 50, *, first: str = "stack[0]") -> Plan:
    """First-Block-Cache: the first block always runs; the other blocks reuse their cached
    residuals while the first block's output has changed by less than ``threshold``
    (relative L1, accumulated since the last step that computed).

    Follows the First Block Cache of ParaAttention / diffusers (2024), a simplification of
    TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
    Model", 2024). ``first`` names (or globs) the watched block; the default is the stack's
    first block.

    Example:
        >>> first_block_cache(0.1, steps=20).rules[0].when.below
        0.1
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    plan = Plan(steps=steps, name=f"fbcache-{threshold}", rules=[
        Rule(sites=("stack[:]",), kind="block", action="reuse_residual", when=When(of=first, below=float(threshold))),
    ])
    plan.check()
    return plan


def delta_dit(steps: int = 50, interval: int = 2, k: int = 2, boundary: int | None = None) -> Plan:
    """Δ-DiT: cache the deviation of the rear blocks early in sampling, of the front blocks late.

    Follows Chen et al., "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion
    Transformers" (2024). Its Δ-Cache keeps a span of blocks' deviation (output minus input) and
    adds it to the span's new input; on a contiguous span that is exactly every block reusing
    its own residual, since the residuals telescope. Early steps shape the outline, which the
    front blocks produce, so before step ``boundary`` the last ``k`` blocks of the stack
    (``stack[-k:]``) reuse; from ``boundary`` on the details matter and the first ``k``
    (``stack[:k]``) reuse. The cached blocks are refreshed (computed) every ``interval``-th step.
    ``boundary`` defaults to half the steps; ``k`` counts blocks, so set it for the model's depth
    (the paper caches most of PixArt-α's 28 blocks).

    Example:
        >>> plan = delta_dit(steps=8, interval=2, k=2, boundary=4)
        >>> [(r.sites, r.step_list(8)) for r in plan.rules]
        [(('stack[-2:]',), [1, 3]), (('stack[:2]',), [5, 7])]
    """
    check_steps(steps)
    check_count(interval, "interval", minimum=1)
    check_count(k, "k", minimum=1)
    boundary = steps // 2 if boundary is None else boundary
    check_count(boundary, "boundary", minimum=0)
    if boundary > steps:
        raise ValueError(f"boundary must be at most steps ({steps}), got {boundary}")
    refresh = [s for s in range(steps) if s % interval != 0]
    early = tuple(s for s in refresh if s < boundary)
    late = tuple(s for s in refresh if s >= boundary)
    rules = []
    if early:
        rules.append(Rule(sites=(f"stack[-{k}:]",), kind="block", steps=early, action="reuse_residual"))
    if late:
        rules.append(Rule(sites=(f"stack[:{k}]",), kind="block", steps=late, action="reuse_residual"))
    plan = Plan(steps=steps, rules=rules or [Rule(sites=("*",), kind="block", action="compute")],
                name=f"delta-dit-{interval}-k{k}-b{boundary}")
    plan.check()
    return plan


def taylorseer(steps: int = 50, interval: int = 4, order: int = 2, *, warmup: int | None = None,
               level: str = "block", method: str = "taylor") -> Plan:
    """TaylorSeer: forecast the blocks' features with a Taylor series between full steps.

    Follows Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with
    TaylorSeers" (2025): instead of reusing a cached feature, extrapolate it from the last
    computed steps (finite differences up to ``order``). With ``level="block"`` every block of
    the stack ``predict``s its residual (or output); with ``level="output"`` the model's
    ``output`` site is forecast as a whole (every block, the final norm and projection skipped),
    as TaylorSeer's lite mode forecasts the final projection. The first ``warmup`` steps compute
    (default ``order + 1``, so the first forecast has a full history), then every
    ``interval``-th step computes and the others forecast. ``order=0`` is plain reuse.
    ``method`` picks the forecaster (``taylor``, ``hermite``, ``foca``, ``freq``:
    :mod:`ditopt.runtime.forecast`).

    Example:
        >>> plan = taylorseer(steps=10, interval=3, order=1)
        >>> plan.rules[0].step_list(10), plan.rules[0].order
        ([3, 4, 6, 7, 9], 1)
        >>> taylorseer(steps=10, interval=2, order=1, level="output").rules[0].sites
        ('output',)
    """
    check_steps(steps)
    check_count(interval, "interval", minimum=1)
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
    if level not in ("block", "output"):
        raise ValueError(f"level must be 'block' or 'output', got {level!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    warmup = order + 1 if warmup is None else warmup
    check_count(warmup, "warmup", minimum=1)
    forecast = tuple(s for s in range(warmup, steps) if (s - warmup) % interval != 0)
    where = dict(sites=("*",), kind="block") if level == "block" else dict(sites=("output",))
    rules = [Rule(**where, steps=forecast, action="predict", order=order,
                  method=None if method == "taylor" else method)] if forecast else [Rule(**where, action="compute")]
    suffix = ("" if level == "block" else "-output") + ("" if method == "taylor" else f"-{method}")
    plan = Plan(steps=steps, rules=rules, name=f"taylorseer-{interval}-o{order}{suffix}")
    plan.check()
    return plan


def teacache(threshold: float = 0.1, steps: int = 50, rescale: list[float] | tuple[float, ...] | None = None) -> Plan:
    """TeaCache: skip the blocks while the first block's modulated input barely changes.

    Follows Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
    Model" (2024). The indicator is the relative L1 change of the first block's *modulated
    input* (its hidden states after the timestep-conditioned norm, where they enter attention:
    ``when.on: input``), mapped through the polynomial ``rescale`` (coefficients highest power
    first, as the paper's fitted ones) and accumulated since the last step that computed; while
    it stays below ``threshold`` every other block of the stack reuses its residual. The first
    step computes (nothing to compare with) and so does the last.

    The rescaling coefficients are fitted per model (TeaCache publishes ones for e.g. FLUX,
    HunyuanVideo and Wan); the default None uses the raw relative L1, so on a new model pick
    ``threshold`` from its indicator's range or fit coefficients first.

    Example:
        >>> w = teacache(0.2, steps=20, rescale=[2.0, 0.0]).rules[0].when
        >>> (w.of, w.on, w.rescale, w.below)
        ('stack[0]', 'input', (2.0, 0.0), 0.2)
    """
    _check_threshold(threshold)
    check_steps(steps)
    if rescale is not None:
        rescale = tuple(rescale)
        if not rescale or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in rescale):
            raise ValueError(f"rescale must be a non-empty list of numbers (polynomial coefficients), got {rescale!r}")
        rescale = tuple(float(c) for c in rescale)
    when = When(of="stack[0]", below=float(threshold), on="input", rescale=rescale)
    rules = [Rule(sites=("stack[1:]",), kind="block", action="reuse_residual", when=when)]
    if steps > 1:
        rules.append(Rule(sites=("stack[1:]",), kind="block", steps=(steps - 1,), action="compute"))
    plan = Plan(steps=steps, rules=rules, name=f"teacache-{threshold}")
    plan.check()
    return plan


def dbcache(threshold: float = 0.08, steps: int = 50, fn: int = 1, bn: int = 0, *, warmup: int = 2) -> Plan:
    """DBCache: the first ``fn`` and last ``bn`` blocks always compute; the middle blocks reuse
    their residuals while the output of the first ``fn`` has changed by less than ``threshold``.

    Follows cache-dit's DBCache ("Dual Block Cache", vipshop/cache-dit, 2025). The front
    blocks ``stack[:fn]`` compute and their output is the indicator (relative L1, accumulated
    since the last computing step); the middle ``stack[fn:-bn]`` reuse residuals below the
    threshold; the back ``stack[-bn:]`` compute on the approximated hidden states, correcting
    them. The first ``warmup`` steps always compute (cache-dit's ``max_warmup_steps``, 8 by
    default there for 28-50-step runs). cache-dit watches the front blocks' residual rather
    than their output, and compares with the last computed step rather than accumulating.

    Example:
        >>> rule = dbcache(0.1, steps=20, fn=2, bn=1).rules[0]
        >>> rule.sites, rule.when.of, rule.step_list(20)[:3]
        (('stack[2:-1]',), 'stack[1]', [2, 3, 4])
    """
    _check_threshold(threshold)
    check_steps(steps)
    check_count(fn, "fn", minimum=1)
    check_count(bn, "bn", minimum=0)
    check_count(warmup, "warmup", minimum=0)
    if warmup >= steps:
        raise ValueError(f"warmup must be less than steps ({steps}), got {warmup}")
    middle = f"stack[{fn}:-{bn}]" if bn else f"stack[{fn}:]"
    rule = Rule(sites=(middle,), kind="block", action="reuse_residual", steps=f"{warmup}:" if warmup else None,
                when=When(of=f"stack[{fn - 1}]", below=float(threshold)))
    plan = Plan(steps=steps, rules=[rule], name=f"dbcache-F{fn}B{bn}-{threshold}")
    plan.check()
    return plan


def pab(steps: int = 50, self_range: int | None = 2, cross_range: int | None = 6, joint_range: int | None = 2,
        window: tuple[int, int] | None = None) -> Plan:
    """Pyramid Attention Broadcast: reuse attention outputs, less often for the attention kinds
    that change more, in the middle of sampling.

    Follows Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast" (2024).
    Attention outputs change little in the middle of sampling, and by kind: cross attention
    least, then temporal, then spatial (self). Each kind computes once every ``*_range`` steps
    inside ``window = (start, stop)`` and broadcasts (reuses) its output in between; outside
    the window everything computes. The window defaults to the steps where the timestep is in
    PAB's (100, 800) of 1000 on a linear schedule: ``(round(0.2 * steps), round(0.9 * steps))``.
    A range of None or 1 leaves that kind computing; a kind the model lacks is skipped
    (DiT has only self attention; MM-DiTs such as CogVideoX have joint attention). ditopt does
    not tell spatial from temporal self attention, so both take ``self_range``.

    Example:
        >>> plan = pab(steps=20, self_range=2, cross_range=4, joint_range=None, window=(4, 12))
        >>> [(r.attention, r.step_list(20)) for r in plan.rules]
        [('self', [5, 7, 9, 11]), ('cross', [5, 6, 7, 9, 10, 11])]
    """
    check_steps(steps)
    ranges = {"self": self_range, "cross": cross_range, "joint": joint_range}
    for kind, r in ranges.items():
        if r is not None:
            check_count(r, f"{kind}_range", minimum=1)
    if window is None:
        window = (round(0.2 * steps), round(0.9 * steps))
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
            or not 0 <= window[0] <= window[1] <= steps):
        raise ValueError(f"window must be (start, stop) with 0 <= start <= stop <= steps ({steps}), got {window!r}")
    start, stop = window
    rules = []
    for kind, r in ranges.items():
        broadcast = tuple(s for s in range(start, stop) if r is not None and (s - start) % r != 0)
        if broadcast:
            rules.append(Rule(sites=("*",), kind="attention", attention=kind, steps=broadcast, action="reuse"))
    plan = Plan(steps=steps, rules=rules or [Rule(sites=("*",), kind="block", action="compute")],
                name=f"pab-{self_range}-{cross_range}-{joint_range}")
    plan.check()
    return plan


def ditfastattn(steps: int = 50, *, window: int | None = None, interval: int = 4, warmup: int = 2,
                share_cross: bool = True, threshold: float | None = None, rmap=None, cfg=None) -> Plan:
    """DiTFastAttn as a static schedule: window attention with residual sharing on self-attention,
    full attention at a refresh interval, cross-attention outputs shared across steps.

    Follows Yuan et al., "DiTFastAttn: Attention Compression for Diffusion Transformer Models"
    (2024). Its WA-RS (window attention with residual sharing) is the ``window`` action: at the
    steps that refresh, a self-attention site computes full attention and caches the residual
    full - window; at the steps between it computes window attention over ``window`` tokens of its
    sequence and adds the residual. Its AST (attention sharing across timesteps) is ``reuse``; here
    on cross-attention sites (``share_cross``), at the same steps, as PAB finds cross attention the
    most stable across steps. The first ``warmup`` steps compute everything; after them, every
    ``interval``-th step refreshes (full attention everywhere).

    ``window`` defaults to 256 tokens of the sequence; a list (``[frames, height, width]`` or
    ``[height, width]``) or mapping is a window per axis of the token grid, which the pass reads
    from the graph (joint attention takes per-axis windows too, through a plan's own rule).

    With ``threshold`` (and ``rmap``, a map from ``ditopt.profile(..., attention_window=W)`` at
    ``steps`` steps) the schedule is the paper's greedy per-(step, layer) calibration instead
    (:func:`ditopt.attention_plan.greedy_calibration`): after ``warmup`` steps, each attention
    layer at each step takes the first of AST (``reuse``), WA-RS (``window``) and ASC
    (``share_cfg``, with ``cfg`` the caller's CFG layout), most compressive first, whose error is
    below ``threshold``, else full attention. The paper measures the error on the model's output
    with the earlier choices applied, one forward per candidate; here it is the replayed relative
    error of that layer's attention output (its SDPA output, on the map's samples, against the
    cache of the layer's last full step, so earlier choices age the cache): no forward per
    candidate, but blind to how an error at one layer moves the next. One kind per layer (a plan
    gives a site one kind of reuse), and no WA-RS + ASC at one (layer, step).

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> plan = ditfastattn(steps=10, window=8, interval=4, warmup=2)
        >>> [(r.attention, r.action, r.step_list(10)) for r in plan.rules]
        [('self', 'window', [3, 4, 5, 7, 8, 9]), ('cross', 'reuse', [3, 4, 5, 7, 8, 9])]
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> fast = ditopt.optimize(model, plan)
        >>> with torch.no_grad():
        ...     for t in range(999, 0, -100):
        ...         _ = fast(torch.randn(1, 4, 8, 8), timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
        >>> ditopt.stats(fast).decisions["transformer_blocks.0.attn1"][:6]
        ['compute', 'compute', 'compute', 'window', 'window', 'window']
    """
    check_steps(steps)
    if isinstance(window, (list, tuple, dict)):  # per axis: checked as a plan's window field is
        from .plan_fields import window_field

        window = window_field(list(window) if isinstance(window, tuple) else window, "window", {})
    else:
        check_count(window if window is not None else 1, "window", minimum=1)
    check_count(interval, "interval", minimum=1)
    check_count(warmup, "warmup", minimum=1)
    if warmup >= steps:
        raise ValueError(f"warmup must be less than steps ({steps}), got {warmup}")
    if threshold is not None or rmap is not None:
        from .attention_plan import calibrated_plan

        return calibrated_plan(rmap, steps, threshold, window=window, warmup=warmup, cfg=cfg)
    window = 256 if window is None else window
    shared = tuple(s for s in range(warmup, steps) if (s - warmup) % interval != 0)
    rules = [Rule(sites=("*",), kind="attention", attention="self", steps=shared, action="window", window=window)]
    if share_cross:
        rules.append(Rule(sites=("*",), kind="attention", attention="cross", steps=shared, action="reuse"))
    if not shared:
        rules = [Rule(sites=("*",), kind="block", action="compute")]
    label = "x".join(map(str, window.sizes)) if hasattr(window, "sizes") else window
    plan = Plan(steps=steps, rules=rules, name=f"ditfastattn-{label}")
    plan.check()
    return plan


def duca(steps: int = 50, interval: int = 4, ratio: float = 0.2, *, warmup: int = 1) -> Plan:
    """DuCa: between full steps (every ``interval``-th), conservative steps, where each block
    recomputes the ``ratio`` of its tokens whose input changed most (``partial``, ToCa's token-wise
    caching), alternate with aggressive steps, where the whole stack reuses its cached output.

    Follows Zou et al., "Accelerating Diffusion Transformers with Dual Feature Caching" (DuCa, 2024)
    and "... with Token-wise Feature Caching" (ToCa, 2024). As read here: after each full step the
    steps go conservative, aggressive, conservative, ...; tokens are scored by the relative change of
    their input (no attention map, as DuCa's), one selection per batch. The first ``warmup`` steps
    compute. Not built: ToCa's per-layer ratios and its cross-attention / spatial-spread scores.

    Example:
        >>> [(r.action, r.step_list(9)) for r in duca(steps=9, interval=4, ratio=0.25).rules]
        [('partial', [2, 4, 6, 8]), ('reuse', [3, 7])]
    """
    check_steps(steps)
    check_count(interval, "interval", minimum=1)
    check_count(warmup, "warmup", minimum=1)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a share of the tokens in (0, 1], got {ratio!r}")
    offsets = {s: (s - warmup) % interval for s in range(warmup, steps)}
    conservative = tuple(s for s, o in offsets.items() if o and o % 2 == 1)
    aggressive = tuple(s for s, o in offsets.items() if o and o % 2 == 0)
    rules = [Rule(sites=("*",), kind="block", steps=conservative, action="partial", ratio=float(ratio))] \
        if conservative else [Rule(sites=("*",), kind="block", action="compute")]
    if aggressive:
        rules.append(Rule(sites=("stack",), steps=aggressive, action="reuse"))
    plan = Plan(steps=steps, rules=rules, name=f"duca-{interval}-{ratio}")
    plan.check()
    return plan


def distrifusion(steps: int = 50, *, warmup: int = 1, interval: int = 2) -> Plan:
    """DistriFusion as a static schedule (sequence parallelism only): self- and joint attention
    reuse the remote K/V of their last exchange (``stale_kv``) at the steps between exchanges.

    Follows Li et al., "DistriFusion: Distributed Parallel Inference for High-Resolution Diffusion
    Models" (CVPR 2024): each rank attends with its fresh local K/V and the other ranks' stale K/V,
    so the exchange can be skipped (the paper overlaps it with compute instead; ditopt elides it at
    the stale steps). The first ``warmup`` steps exchange; after them, in each cycle of ``interval``
    steps the first ``interval - 1`` are stale and the last exchanges: ``interval=2`` is "stale
    every other step". Run it with ``optimize(model, plan, parallel=ditopt.SequenceParallel(...))``;
    without sequence parallelism the first call raises PlanError.

    Example:
        >>> plan = distrifusion(steps=8)
        >>> [(r.attention, r.action, r.step_list(8)) for r in plan.rules]
        [('self', 'stale_kv', [1, 3, 5, 7]), ('joint', 'stale_kv', [1, 3, 5, 7])]
    """
    check_steps(steps)
    check_count(warmup, "warmup", minimum=1)
    check_count(interval, "interval", minimum=2)
    stale = tuple(s for s in range(warmup, steps) if (s - warmup) % interval != interval - 1)
    # joint attention (image and text tokens in one attention: SD3, Flux, HunyuanVideo) exchanges its
    # image K/V across ranks as self-attention does; its text K/V are on every rank and stay fresh
    rules = [Rule(sites=("*",), kind="attention", attention=kind, steps=stale, action="stale_kv")
             for kind in ("self", "joint")]
    if not stale:
        rules = [Rule(sites=("*",), kind="block", action="compute")]
    plan = Plan(steps=steps, rules=rules, name=f"distrifusion-{interval}")
    plan.check()
    return plan


def all_compute(steps: int = 50) -> Plan:
    """A plan that computes everything: outputs stay bit-identical to the model's."""
    return Plan(steps=steps, rules=[Rule(sites=("*",), action="compute")], name="all-compute")


# -- the registry: every named plan, as the command line, the benchmark and configs/presets name them


@dataclass(frozen=True)
class Preset:
    """A named plan: a published method (or the all-compute baseline), and how to spell it.

    Calling it makes the plan; with no knobs it is the preset at its defaults, which is what
    ``configs/presets/<name>.yaml`` holds (at 20 steps).

    ``spellings`` are the names a command line uses, each with the knobs it fixes; in a spelling,
    ``N`` stands for an integer and ``THRESHOLD`` for a number, and either sets the knob ``knob``.

    Example:
        >>> PRESETS["fora"](steps=20, interval=3).name
        'fora-3'
        >>> preset, knobs = lookup("fora-3-block")
        >>> preset.name, knobs
        ('fora', {'level': 'block', 'interval': 3})
    """

    name: str  # the registry key; configs/presets/<name>.yaml for a published method
    make: Callable[..., Plan]  # the preset function: steps and the knobs as keyword arguments
    spellings: dict[str, dict] = field(default_factory=dict)  # command-line name -> the knobs it fixes
    knob: str | None = None  # what N or THRESHOLD in a spelling sets
    published: bool = True  # a published method, written to configs/presets

    def __call__(self, steps: int = 50, **knobs) -> Plan:
        return self.make(steps=steps, **knobs)


_WILDCARDS = {"N": (r"(\d+)", int), "THRESHOLD": (r"(\d*\.?\d+)", float)}  # in spellings

REGISTRY: dict[str, Preset] = {p.name: p for p in [
    Preset("fora", fora, {"fora-N": {}, "fora-N-block": {"level": "block"}}, "interval"),
    Preset("first-block-cache", first_block_cache, {"fbcache-THRESHOLD": {}}, "threshold"),
    Preset("taylorseer", taylorseer, {"taylorseer-N": {}}, "interval"),
    Preset("taylorseer-output", partial(taylorseer, level="output"), {"taylorseer-N-output": {}}, "interval"),
    Preset("teacache", teacache, {"teacache-THRESHOLD": {}}, "threshold"),
    Preset("dbcache", dbcache, {"dbcache-THRESHOLD": {}}, "threshold"),
    Preset("delta-dit", delta_dit, {"delta-dit": {}}),
    Preset("pab", pab, {"pab": {}}),
    Preset("duca", duca, {"duca-N": {}}, "interval"),  # partial (token-wise) and stack reuse, alternating
    Preset("all-compute", all_compute, {"all-compute": {}}, published=False),
    # not written to configs/presets yet: its window is in tokens, so it fits one resolution
    Preset("ditfastattn", ditfastattn, {"ditfastattn-N": {}}, "window", published=False),
    # not written to configs/presets: it needs sequence parallelism (the bench runs one process)
    Preset("distrifusion", distrifusion, {"distrifusion-N": {}}, "interval", published=False),
]}

# The published methods, each also as ``configs/presets/<name>.yaml`` (tools/write_presets.py).
PRESETS: dict[str, Preset] = {name: p for name, p in REGISTRY.items() if p.published}

# Every spelling, for help texts: "fora-N, fora-N-block, fbcache-THRESHOLD, ..."
SPELLINGS = ", ".join(s for p in REGISTRY.values() for s in p.spellings)


def lookup(spelled: str) -> tuple[Preset, dict]:
    """The preset a command-line name stands for, and the knobs the name sets; ``KeyError`` if
    no spelling matches.

    Example:
        >>> preset, knobs = lookup("fbcache-0.08")
        >>> preset.name, knobs
        ('first-block-cache', {'threshold': 0.08})
        >>> preset(steps=20, **knobs).name
        'fbcache-0.08'
    """
    for preset in REGISTRY.values():
        for spelling, fixed in preset.spellings.items():
            parts = spelling.split("-")
            pattern = "-".join(_WILDCARDS[p][0] if p in _WILDCARDS else re.escape(p) for p in parts)
            m = re.fullmatch(pattern, spelled)
            if m:
                convert = next((_WILDCARDS[p][1] for p in parts if p in _WILDCARDS), None)
                return preset, {**fixed, preset.knob: convert(m[1])} if convert else dict(fixed)
    raise KeyError(spelled)
