"""Fidelity and speed of every caching method on a trained zoo model, in one process.

For a zoo model and N fixed seeds, the harness samples a full-compute reference, then runs each
method at each of its settings and records, against that reference:

- ``compute``: the fraction of block compute executed (FLOPs inside the block stack, summed over
  the generation, divided by full compute's). Peers run eagerly, so their block FLOPs are counted
  with ``torch.utils.flop_counter.FlopCounterMode`` and forward hooks on the stack's blocks
  (a block a peer skips contributes nothing). A ditopt model's blocks are not modules that run
  (they are regions of one rewritten graph), so its fraction is computed from the decisions the
  runtime took (``ditopt.stats(model).decisions``) times each site's FLOPs counted the same way
  on the unoptimised model; ``tests/test_cost.py`` checks that such a figure equals the FLOPs the
  rewritten graph executes, counted with FlopCounterMode around the graph module;
- ``speedup``: wall time of full compute / wall time of the method, the two interleaved per seed
  in the same process, summed over seeds;
- ``psnr`` and ``ssim`` of the final samples against full compute (data range 2, per image or
  per video frame, SSIM from scikit-image), averaged over seeds;
- ``accuracy``: the share of samples (or video frames) the zoo's digit classifier labels as the
  digit asked for.

Rows whose ``overhead`` flag is set run a method at a setting that caches nothing: their speedup
is the method's overhead.

Peers run through their own public APIs on a fresh copy of the same model: diffusers' cache
hooks (``ModelMixin.enable_cache``) and cache-dit (``cache_dit.enable_cache``, the optional
extra ``ditopt[peers]``). A peer that cannot be imported or fails on the model is reported, not
fatal.

Example (one seed, one method, two steps; a few seconds)::

    >>> from ditopt.bench import run_bench, format_table
    >>> result = run_bench("dit-digits", seeds=1, steps=2, methods=["ditopt:all-compute"], progress=False)
    >>> [r.method for r in result.rows]
    ['full', 'ditopt all-compute']
    >>> result.rows[-1].psnr == float("inf") and result.rows[-1].compute == 1.0
    True
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import presets
from .backend import optimize, reset, sites, stats
from .errors import DitoptError
from .flops import ModuleCost

__all__ = ["Row", "BenchResult", "Method", "METHODS", "run_bench", "format_table", "plot_pareto",
           "method_names"]


# ----------------------------------------------------------------------------------------------
# What a method is


@dataclass
class Applied:
    """A method applied to a fresh model: the callable the sampling loop calls, and its hooks."""

    transformer: Callable
    before_generation: Callable[[], None] = lambda: None
    decisions: Callable[[], dict] | None = None  # ditopt: the runtime's decisions of the last run
    # (None: an eager peer, whose block FLOPs are counted with FlopCounterMode instead)


@dataclass
class Setting:
    label: str  # "interval=2"
    apply: Callable[[Any, "Context"], Applied]
    overhead: bool = False  # a setting that caches nothing


@dataclass
class Method:
    key: str  # "ditopt:fora"
    family: str  # ditopt | diffusers | cache-dit
    name: str  # "FORA"
    settings: Callable[[int], list[Setting]]  # steps -> settings
    requires: str | None = None  # module to import; missing = the peer is reported and skipped


@dataclass
class Context:
    """What a method may know about the model: the zoo entry and the run's step count."""

    zoo: Any
    steps: int
    site_table: Any


@dataclass
class Row:
    method: str
    family: str
    setting: str
    compute: float
    speedup: float
    psnr: float
    ssim: float
    accuracy: float
    overhead: bool = False


@dataclass
class BenchResult:
    model: str
    steps: int
    seeds: int
    rows: list[Row]
    failed: dict[str, str] = field(default_factory=dict)  # method -> one-line reason
    date: str = ""
    command: str = ""


# ----------------------------------------------------------------------------------------------
# ditopt methods


def _optimized(model, plan) -> Applied:
    fast = optimize(model, plan)
    return Applied(fast, before_generation=lambda: reset(fast), decisions=lambda: stats(fast).decisions)


def _ditopt_setting(label: str, make_plan: Callable[[int], Any], overhead: bool = False) -> Setting:
    def apply(model, ctx: Context) -> Applied:
        return _optimized(model, make_plan(ctx.steps))

    return Setting(label, apply, overhead)


def _fora_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"interval={k}", lambda n, k=k: presets.fora(interval=k, steps=n, level="block"))
            for k in (2, 3, 4)]


def _fora_layer_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"interval={k}", lambda n, k=k: presets.fora(interval=k, steps=n, level="layer"))
            for k in (2, 3)]


def _fbcache_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"threshold={t}", lambda n, t=t: presets.first_block_cache(t, steps=n))
            for t in (0.05, 0.1, 0.2, 0.3)]


def _taylorseer_output_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"output, interval={k}, order={o}",
                            lambda n, k=k, o=o: presets.taylorseer(n, interval=k, order=o, level="output"))
            for k, o in ((2, 1), (2, 2), (3, 1), (3, 2), (4, 2))]


def _taylorseer_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"interval={k}, order={o}", lambda n, k=k, o=o: presets.taylorseer(n, interval=k, order=o))
            for k, o in ((2, 1), (3, 1), (3, 2), (4, 2))]


def _delta_dit_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"interval={i}, k={k}", lambda n, i=i, k=k: presets.delta_dit(n, interval=i, k=k))
            for i, k in ((2, 2), (2, 3), (3, 3), (4, 3))]


def _teacache_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"threshold={t}", lambda n, t=t: presets.teacache(t, steps=n))
            for t in (0.1, 0.15, 0.2, 0.3)]


def _dbcache_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting(f"F{f}B{b}, threshold={t}", lambda n, f=f, b=b, t=t: presets.dbcache(t, n, fn=f, bn=b))
            for f, b, t in ((1, 0, 0.08), (1, 0, 0.12), (1, 0, 0.2), (2, 1, 0.2))]


def _pab_settings(steps: int) -> list[Setting]:
    def pab(k: int, whole: bool):
        return lambda n: presets.pab(n, self_range=k, cross_range=k + 2, joint_range=k, window=(0, n) if whole else None)

    return [_ditopt_setting(f"self={k}, cross={k + 2}, {'all steps' if whole else 'steps 20%-90%'}", pab(k, whole))
            for k, whole in ((2, False), (3, False), (2, True))]


def _all_compute_settings(steps: int) -> list[Setting]:
    return [_ditopt_setting("-", lambda n: presets.all_compute(steps=n), overhead=True)]


# ----------------------------------------------------------------------------------------------
# diffusers' cache hooks


class _CacheContextCaller:
    """Calls a diffusers model inside ``model.cache_context(name)`` as its pipelines do, and
    remembers the current timestep for hooks that ask for it. With CFG as two calls per step
    the first call at a timestep is "cond", the second "uncond"; batched CFG is one context."""

    def __init__(self, model, separate_cfg: bool):
        self.model = model
        self.separate_cfg = separate_cfg
        self.timestep = 1000
        self._last = None
        self._branch = 0

    def reset(self):
        from diffusers.hooks import HookRegistry

        self._last = None
        self._branch = 0
        self.timestep = 1000
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)

    def __call__(self, *args, timestep, **kwargs):
        t = float(timestep.reshape(-1)[0])
        self._branch = self._branch + 1 if (t == self._last and self.separate_cfg) else 0
        self._last = t
        self.timestep = t
        name = ("cond", "uncond")[self._branch % 2] if self.separate_cfg else "cond_uncond"
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.model, CacheContext(name))
        try:
            return self.model(*args, timestep=timestep, **kwargs)
        finally:
            _set_cache_context(self.model, None)


def _diffusers_setting(label: str, make_config: Callable[["_CacheContextCaller", Context], Any],
                       overhead: bool = False) -> Setting:
    def apply(model, ctx: Context) -> Applied:
        caller = _CacheContextCaller(model, separate_cfg=ctx.zoo.cfg_mode == "separate")
        _enable_diffusers_cache(model, make_config(caller, ctx))
        return Applied(caller, before_generation=caller.reset)

    return Setting(label, apply, overhead)


def _enable_diffusers_cache(model, config) -> None:
    """diffusers' ``apply_*`` functions, which ``CacheMixin.enable_cache`` dispatches to; called
    directly because some transformer classes (DiT) do not inherit CacheMixin."""
    h = _hooks()
    appliers = {h.FirstBlockCacheConfig: h.apply_first_block_cache,
                h.PyramidAttentionBroadcastConfig: h.apply_pyramid_attention_broadcast,
                h.FasterCacheConfig: h.apply_faster_cache, h.MagCacheConfig: h.apply_mag_cache,
                h.TaylorSeerCacheConfig: h.apply_taylorseer_cache}
    appliers[type(config)](model, config)


def _hooks():
    import diffusers.hooks as hooks

    return hooks


def _diffusers_fbcache(steps: int) -> list[Setting]:
    h = _hooks()
    out = [_diffusers_setting("threshold=0", lambda c, x: h.FirstBlockCacheConfig(threshold=0.0), overhead=True)]
    out += [_diffusers_setting(f"threshold={t}", lambda c, x, t=t: h.FirstBlockCacheConfig(threshold=t))
            for t in (0.05, 0.1, 0.2, 0.3)]
    return out


def _diffusers_pab(steps: int) -> list[Setting]:
    h = _hooks()

    def config(skip: int | None, rng: tuple[int, int]):
        def make(c: _CacheContextCaller, x):
            return h.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=rng,
                cross_attention_block_skip_range=None if skip is None else skip + 2,
                cross_attention_timestep_skip_range=rng, current_timestep_callback=lambda: c.timestep)
        return make

    out = [_diffusers_setting("skip=2, t in (0, 0)", config(2, (0, 0)), overhead=True)]
    out += [_diffusers_setting(f"skip={k}, t in (100, 800)", config(k, (100, 800))) for k in (2, 3)]
    out += [_diffusers_setting("skip=2, t in (0, 1000)", config(2, (0, 1000)))]
    return out


def _diffusers_fastercache(steps: int) -> list[Setting]:
    h = _hooks()

    def config(skip: int, rng: tuple[int, int]):
        # CFG-branch reuse is off (is_guidance_distilled): it assumes the pipelines' own batch
        # layout [uncond, cond], which the zoo's sampling loops do not use.
        def make(c: _CacheContextCaller, x):
            return h.FasterCacheConfig(spatial_attention_block_skip_range=skip,
                                       spatial_attention_timestep_skip_range=rng,
                                       current_timestep_callback=lambda: c.timestep,
                                       is_guidance_distilled=True,
                                       attention_weight_callback=lambda _: 0.5)
        return make

    return [_diffusers_setting("skip=2, t in (-1, -1)", config(2, (-1, -1)), overhead=True),
            _diffusers_setting("skip=2, t in (-1, 681)", config(2, (-1, 681))),
            _diffusers_setting("skip=2, t in (-1, 1000)", config(2, (-1, 1000)))]


def _diffusers_taylorseer(steps: int) -> list[Setting]:
    h = _hooks()
    # diffusers' default patterns ("^blocks.*attn" under re.fullmatch) match no module named
    # attn1/attn2, so its default hooks nothing on DiT and Wan; name the attention and
    # feed-forward modules of the blocks, as the TaylorSeer paper caches them.
    layers = [r"[^.]*blocks\.\d+\.(attn\d*|ff|ffn)"]

    def config(interval: int, order: int, before: int, lite: bool = False):
        def make(c, x):
            return h.TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before,
                                           max_order=order, taylor_factors_dtype=torch.float32,
                                           cache_identifiers=None if lite else layers, use_lite_mode=lite)
        return make

    out = [_diffusers_setting("disabled for all steps", config(2, 1, 10 ** 6), overhead=True)]
    out += [_diffusers_setting(f"interval={k}, order={o}", config(k, o, 3)) for k, o in ((2, 1), (3, 1), (4, 2))]
    out += [_diffusers_setting(f"lite, interval={k}, order=1", config(k, 1, 3, lite=True)) for k in (2, 3)]
    return out


def _calibrate_mag_ratios(zoo_model, steps: int) -> list[float]:
    """MagCache needs per-step magnitude ratios: one calibration generation, as its docs say."""
    h = _hooks()
    from . import zoo

    fresh = zoo.load(zoo_model.name)
    caller = _CacheContextCaller(fresh.model, separate_cfg=fresh.cfg_mode == "separate")
    _enable_diffusers_cache(fresh.model, h.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fresh.sample(torch.arange(2), seed=12345, steps=steps, transformer=caller)
    found = re.findall(r"\[([-0-9.eE, ]+)\]", buf.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in found[-1].split(",")]


def _diffusers_magcache(steps: int) -> list[Setting]:
    h = _hooks()
    ratios: dict[str, list[float]] = {}

    def config(threshold: float, max_skip: int):
        def make(c, ctx: Context):
            if "r" not in ratios:
                ratios["r"] = _calibrate_mag_ratios(ctx.zoo, ctx.steps)
            return h.MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, num_inference_steps=ctx.steps,
                                    mag_ratios=ratios["r"])
        return make

    return [_diffusers_setting("threshold=0", config(0.0, 1), overhead=True)] + [
        _diffusers_setting(f"threshold={t}, max_skip={m}", config(t, m)) for t, m in ((0.06, 3), (0.12, 3), (0.24, 4))]


# ----------------------------------------------------------------------------------------------
# cache-dit


def _cachedit_setting(label: str, fn: int, bn: int, threshold: float, overhead: bool = False) -> Setting:
    def apply(model, ctx: Context) -> Applied:
        import cache_dit

        config = cache_dit.DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                                         residual_diff_threshold=threshold, max_warmup_steps=2,
                                         num_inference_steps=ctx.steps)
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(model, cache_config=config)

        def before():
            cache_dit.refresh_context(model, cache_config=config, verbose=False)

        return Applied(model, before_generation=before)

    return Setting(label, apply, overhead)


def _cachedit_dbcache(steps: int) -> list[Setting]:
    out = [_cachedit_setting("F1B0, threshold=0", 1, 0, 0.0, overhead=True)]
    out += [_cachedit_setting(f"F1B0, threshold={t}", 1, 0, t) for t in (0.08, 0.12, 0.2, 0.3)]
    out += [_cachedit_setting("F2B1, threshold=0.2", 2, 1, 0.2)]
    return out


_MAPS: dict[tuple[str, int], Any] = {}
CALIBRATION_SEED = 1000  # not one of the benchmark's seeds (0..N-1)


def _calibration_run(ctx: Context):
    """The calibration call (10 digits, a seed the benchmark never scores) and its model."""
    from . import zoo

    calib = zoo.load(ctx.zoo.name)
    labels = torch.arange(10)
    return calib, lambda tr: calib.sample(labels, seed=CALIBRATION_SEED, steps=ctx.steps, transformer=tr)


def _redundancy_map(ctx: Context):
    """One calibration run per zoo model and step count."""
    from .profile import profile

    key = (ctx.zoo.name, ctx.steps)
    if key not in _MAPS:
        calib, run = _calibration_run(ctx)
        _MAPS[key] = profile(calib.model, run, steps=ctx.steps, progress=False,
                             cfg="batched" if calib.cfg_mode == "batched" else None)
    return _MAPS[key]


def _profiled_setting(label: str, make_plan: Callable[[Any], Any]) -> Setting:
    def apply(model, ctx: Context) -> Applied:
        return _optimized(model, make_plan(_redundancy_map(ctx)))

    return Setting(label, apply)


def _profiled_settings(steps: int) -> list[Setting]:
    from .planner import plan_from_profile

    return [_profiled_setting(f"budget={b}", lambda m, b=b: plan_from_profile(m, budget=b)) for b in (0.5, 0.4, 0.35)]


def _tuned_settings(steps: int) -> list[Setting]:
    """Closed-loop plans (:func:`ditopt.tune`) on the same calibration seed as the profile."""
    from .tune import tune

    def setting(budget: float) -> Setting:
        def apply(model, ctx: Context) -> Applied:
            calib, run = _calibration_run(ctx)
            tuned = tune(calib.model, run, _redundancy_map(ctx), budget=budget, progress=False)
            return _optimized(model, tuned.plan)

        return Setting(f"budget={budget}", apply)

    return [setting(b) for b in (0.5, 0.4, 0.35)]


def _smoothcache_settings(steps: int) -> list[Setting]:
    from .planner import smoothcache

    return [_profiled_setting(f"alpha={a}", lambda m, a=a: smoothcache(m, a)) for a in (0.1, 0.2, 0.4)]


METHODS: dict[str, Method] = {m.key: m for m in [
    Method("ditopt:all-compute", "ditopt", "all-compute", _all_compute_settings),
    Method("ditopt:fora", "ditopt", "FORA", _fora_settings),
    Method("ditopt:fora-layer", "ditopt", "FORA (layer)", _fora_layer_settings),
    Method("ditopt:fbcache", "ditopt", "First-Block-Cache", _fbcache_settings),
    Method("ditopt:taylorseer", "ditopt", "TaylorSeer", _taylorseer_settings),
    Method("ditopt:taylorseer-output", "ditopt", "TaylorSeer (output)", _taylorseer_output_settings),
    Method("ditopt:delta-dit", "ditopt", "Δ-DiT", _delta_dit_settings),
    Method("ditopt:teacache", "ditopt", "TeaCache", _teacache_settings),
    Method("ditopt:dbcache", "ditopt", "DBCache", _dbcache_settings),
    Method("ditopt:pab", "ditopt", "PAB", _pab_settings),
    Method("ditopt:profiled", "ditopt", "profiled plan", _profiled_settings),
    Method("ditopt:smoothcache", "ditopt", "SmoothCache (profiled)", _smoothcache_settings),
    Method("ditopt:tuned", "ditopt", "tuned plan (closed loop)", _tuned_settings),
    Method("diffusers:fbcache", "diffusers", "FirstBlockCache", _diffusers_fbcache, "diffusers.hooks"),
    Method("diffusers:pab", "diffusers", "PyramidAttentionBroadcast", _diffusers_pab, "diffusers.hooks"),
    Method("diffusers:fastercache", "diffusers", "FasterCache", _diffusers_fastercache, "diffusers.hooks"),
    Method("diffusers:magcache", "diffusers", "MagCache", _diffusers_magcache, "diffusers.hooks"),
    Method("diffusers:taylorseer", "diffusers", "TaylorSeer", _diffusers_taylorseer, "diffusers.hooks"),
    Method("cache-dit:dbcache", "cache-dit", "DBCache", _cachedit_dbcache, "cache_dit"),
]}


def register(method: Method) -> None:
    """Add a method to the harness (e.g. profiled plans, new presets)."""
    METHODS[method.key] = method


def method_names() -> list[str]:
    return list(METHODS)


# ----------------------------------------------------------------------------------------------
# Measurement


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of ``x`` against ``ref`` (inf when equal).

    >>> psnr(torch.zeros(4), torch.zeros(4))
    inf
    >>> round(psnr(torch.full((4,), 0.2), torch.zeros(4)), 2)
    20.0
    """
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over the 2-D images (the last two dims) of ``x`` against ``ref`` (scikit-image)."""
    from skimage.metrics import structural_similarity

    a = x.detach().double().reshape(-1, *x.shape[-2:]).numpy()
    b = ref.detach().double().reshape(-1, *ref.shape[-2:]).numpy()
    win = min(7, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2
    return float(sum(structural_similarity(p, q, data_range=data_range, win_size=win) for p, q in zip(a, b)) / len(a))


def _executed_block_flops(decisions: dict[str, list[str]], blocks: list[str], per_call: dict[str, float],
                          parents: dict[str, str | None]) -> float:
    """Block FLOPs a ditopt run executed, from its decisions: a block that computes costs its
    FLOPs less those of the outermost sub-sites that did not compute."""
    calls = len(decisions[blocks[0]])
    total = 0.0
    for i in range(calls):
        for b in blocks:
            if decisions[b][i] != "compute":
                continue
            cost = per_call[b]
            for site, acts in decisions.items():
                if site in per_call and site.startswith(b + ".") and acts[i] != "compute":
                    parent = parents.get(site)
                    if parent == b or (parent in decisions and decisions[parent][i] == "compute"):
                        cost -= per_call[site]
            total += cost
    return total


def run_bench(model: str = "dit-digits", *, seeds: int = 4, steps: int | None = None,
              methods: Sequence[str] | None = None, progress: bool = True, per_class: int = 1,
              log: Callable[[str], None] | None = None) -> BenchResult:
    """Run the benchmark; see the module docstring for what each column means.

    ``methods``: keys of :data:`METHODS` (default: all). Unknown keys raise a DitoptError naming
    them. A peer that cannot be imported, or fails on this model, lands in ``result.failed``.
    """
    from . import zoo

    if model not in zoo.list():
        raise DitoptError(f"unknown zoo model {model!r}; known: {', '.join(zoo.list())}")
    keys = list(METHODS) if methods is None else list(methods)
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise DitoptError(f"unknown bench method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if seeds < 1:
        raise DitoptError(f"seeds must be >= 1, got {seeds}")
    say = log or (lambda s: None)

    ref_zoo = zoo.load(model)
    n_steps = int(steps or ref_zoo.steps)
    labels = torch.arange(10).repeat_interleave(per_class)
    x0 = torch.zeros(ref_zoo.sample_shape(1))
    example = dict(hidden_states=x0, timestep=torch.ones(1) * 500, **ref_zoo.make_conditioning(labels[:1]))
    table = sites(ref_zoo.model, **example)
    blocks = [s.name for s in table if s.kind == "block" and s.parent == "stack"]
    counted = [s.name for s in table if s.kind in ("block", "attention", "feedforward")]
    parents = {s.name: s.parent for s in table}
    ctx = Context(ref_zoo, n_steps, table)

    # full compute: references, times, and the FLOPs of every site per call
    references, full_times = [], []
    counter = ModuleCost(ref_zoo.model, counted)
    with counter.counting():
        references.append(ref_zoo.sample(labels, seed=0, steps=n_steps))
    per_call = counter.per_call(counter.flops)
    full_block_flops = sum(counter.flops[b] for b in blocks)
    for seed in range(1, seeds):
        references.append(ref_zoo.sample(labels, seed=seed, steps=n_steps))
    acc_full = sum(ref_zoo.accuracy(r, labels) for r in references) / seeds

    rows = [Row("full", "full", "-", 1.0, 1.0, math.inf, 1.0, acc_full)]
    failed: dict[str, str] = {}
    work = []
    for key in keys:
        method = METHODS[key]
        if method.requires:
            try:
                __import__(method.requires)
            except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
                failed[f"{method.family} {method.name}"] = f"cannot import {method.requires}: {exc}"
                continue
        try:
            settings = method.settings(n_steps)
        except Exception as exc:  # noqa: BLE001
            failed[f"{method.family} {method.name}"] = f"{type(exc).__name__}: {exc}"
            continue
        work += [(method, s) for s in settings]

    bar = tqdm(work, disable=not progress, desc=f"bench {model}", unit="setting")
    for method, setting in bar:
        bar.set_postfix_str(f"{method.name} {setting.label}")
        label = f"{method.family} {method.name}" if method.family != "ditopt" else f"ditopt {method.name}"
        try:
            row = _run_setting(model, ctx, method, setting, labels, references, full_block_flops, blocks,
                               per_call, parents, label)
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, the rest still run
            if method.family == "ditopt":
                raise
            failed[f"{label} [{setting.label}]"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            say(f"{label} [{setting.label}] failed: {exc}")
            continue
        finally:
            torch._dynamo.reset()  # this setting's model is gone; drop its compiled code
        rows.append(row)
        say(f"{row.method} [{row.setting}] compute {row.compute:.3f} speedup {row.speedup:.2f} "
            f"psnr {row.psnr:.2f} ssim {row.ssim:.3f} acc {row.accuracy:.2f}")
    return BenchResult(model, n_steps, seeds, rows, failed, date=_dt.date.today().isoformat())


def _run_setting(model_name, ctx, method, setting, labels, references, full_block_flops, blocks, per_call,
                 parents, label) -> Row:
    from . import zoo

    ref_zoo = ctx.zoo
    fresh = zoo.load(model_name)
    applied = setting.apply(fresh.model, ctx)
    seeds = len(references)
    # warm-up (capture and rewrite for ditopt, lazy state for the peers), outside the timing
    applied.before_generation()
    fresh.sample(labels, seed=0, steps=ctx.steps, transformer=applied.transformer)
    t_full = t_method = 0.0
    executed = 0.0
    psnrs, ssims, accs = [], [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        ref_zoo.sample(labels, seed=seed, steps=ctx.steps)
        t_full += time.perf_counter() - t0
        applied.before_generation()
        t0 = time.perf_counter()
        out = fresh.sample(labels, seed=seed, steps=ctx.steps, transformer=applied.transformer)
        t_method += time.perf_counter() - t0
        if applied.decisions is not None:
            executed += _executed_block_flops(applied.decisions(), blocks, per_call, parents)
        else:
            counter = ModuleCost(fresh.model, blocks)
            applied.before_generation()
            with counter.counting():
                counted_out = fresh.sample(labels, seed=seed, steps=ctx.steps, transformer=applied.transformer)
            executed += counter.total()
            if not torch.equal(counted_out, out):
                raise RuntimeError("the method's output changed between two runs of the same seed")
        psnrs.append(psnr(out, references[seed]))
        ssims.append(ssim(out, references[seed]))
        accs.append(ref_zoo.accuracy(out, labels))
    return Row(label, method.family, setting.label, executed / (full_block_flops * seeds), t_full / t_method,
               sum(psnrs) / seeds, sum(ssims) / seeds, sum(accs) / seeds, setting.overhead)


# ----------------------------------------------------------------------------------------------
# Output


def format_table(result: BenchResult) -> str:
    """A markdown table of the rows (overhead rows marked), then the peers that could not run."""
    lines = [f"| method | setting | block compute | speedup (time) | PSNR (dB) | SSIM | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        p = "inf" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
        setting = f"{r.setting} (caches nothing: overhead)" if r.overhead else r.setting
        lines.append(f"| {r.method} | {setting} | {r.compute:.3f} | {r.speedup:.2f}x | {p} | {r.ssim:.3f} | "
                     f"{r.accuracy:.3f} |")
    if result.failed:
        lines.append("")
        lines.append("Could not run:")
        lines += [f"- {k}: {v}" for k, v in result.failed.items()]
    return "\n".join(lines)


def plot_pareto(results: Sequence[BenchResult], path: str) -> str:
    """Block compute fraction vs PSNR, one panel per model: every setting as a point (one marker
    style per method), and the Pareto fronts of all ditopt rows (solid) and all peer rows (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 5.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res.rows if not r.overhead and not math.isinf(r.psnr) and r.family != "full"]
        methods = sorted({r.method for r in rows})
        # no greys or pale tints: every method must stay visible on white
        palette = [c for c in plt.get_cmap("tab20").colors[::2] if max(c) - min(c) > 0.15]
        palette += [c for c in plt.get_cmap("Dark2").colors if max(c) - min(c) > 0.15]
        planned = {"ditopt tuned plan (closed loop)": "tab:red", "ditopt profiled plan": "black"}
        ours_rest = [m for m in methods if m.startswith("ditopt") and m not in planned]
        peers = [m for m in methods if not m.startswith("ditopt")]
        for name in methods:
            pts = [r for r in rows if r.method == name]
            ours = name.startswith("ditopt")
            if name in planned:  # the plans the profiler and tuner make: drawn large, on top
                style = dict(s=90, marker="*", color=planned[name], zorder=4, edgecolors="none")
            else:
                style = dict(s=28 if ours else 22, marker="o" if ours else "s",
                             color=palette[(ours_rest if ours else peers).index(name) % len(palette)],
                             edgecolors="black" if ours else "none", linewidths=0.5)
            ax.scatter([r.compute for r in pts], [r.psnr for r in pts], label=name, **style)
        for family, style, label in ((True, "-", "ditopt front"), (False, "--", "peers front")):
            pts = sorted((r for r in rows if r.method.startswith("ditopt") == family), key=lambda r: r.compute)
            front, best = [], -math.inf
            for r in pts:  # the best PSNR at this compute or less
                if r.psnr > best:
                    front.append(r)
                    best = r.psnr
            if front:
                ax.step([r.compute for r in front], [r.psnr for r in front], style, where="post", color="black",
                        linewidth=1.2, label=label)
        ax.set_xlabel("fraction of block compute executed")
        ax.set_ylabel("PSNR vs full compute (dB)")
        ax.set_title(f"{res.model}: {res.steps} steps, {res.seeds} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BEGIN_MARK = "<!-- bench-fidelity:begin (written by tools/bench_fidelity.py) -->"
END_MARK = "<!-- bench-fidelity:end -->"


def report_markdown(results: Sequence[BenchResult], png: str | None, command: str) -> str:
    """The markdown section: command, date, one table per model, the plot, the peers that failed."""
    date = results[0].date if results else _dt.date.today().isoformat()
    parts = [BEGIN_MARK, f"## Fidelity and compute: ditopt presets and peers on the zoo models ({date})", "",
             "```", command, "```", "",
             "Columns: *block compute* is the fraction of the block stack's FLOPs executed over the generation "
             "(FlopCounterMode on the peers' eager runs; ditopt's from its runtime decisions times per-site "
             "FLOPs counted the same way); *speedup* is full-compute wall time over the method's, interleaved "
             "per seed in one process (on these small models Python overhead is a large share of a step, so "
             "speedups understate the compute saved and are noisy: see the overhead rows, whose work "
             "equals full compute's); PSNR and SSIM are against full compute with the same seed; *accuracy* is the share of samples (video: frames) the digit "
             "classifier labels as the requested digit. Rows marked *overhead* run a method at a setting "
             "that caches nothing.", ""]
    for res in results:
        parts += [f"### {res.model} ({res.steps} steps, {res.seeds} seeds x 10 digits)", "", format_table(res), ""]
    if png:
        parts += [f"![block compute vs PSNR]({png})", ""]
    parts.append(END_MARK)
    return "\n".join(parts) + "\n"


def write_report(results: Sequence[BenchResult], md_path: str, png_path: str | None, command: str) -> None:
    """Replace (or append) the harness's section of ``md_path``; write the Pareto PNG."""
    import os

    rel_png = None
    if png_path:
        plot_pareto(results, png_path)
        rel_png = os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))
    section = report_markdown(results, rel_png, command)
    text = open(md_path).read() if os.path.exists(md_path) else "# Benchmarks\n"
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(md_path, "w") as f:
        f.write(text)


def add_arguments(parser) -> None:
    """The options of ``ditopt bench`` and ``tools/bench_fidelity.py``."""
    from . import zoo

    parser.add_argument("--model", action="append", choices=zoo.list(),
                        help="zoo model (repeatable; default: all zoo models)")
    parser.add_argument("--seeds", type=int, default=4, help="fixed seeds, 10 digits each (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated method keys (default all): {', '.join(METHODS)}")
    parser.add_argument("--markdown", default=None, help="write the table into this markdown file")
    parser.add_argument("--png", default=None, help="write the Pareto plot (block compute vs PSNR) here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stabler ratios)")


def run_from_args(args, command: str) -> list[BenchResult]:
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    from . import zoo

    results = []
    for name in args.model or zoo.list():
        res = run_bench(name, seeds=args.seeds, steps=args.steps, methods=methods,
                        log=lambda s: tqdm.write(s))
        res.command = command
        print(f"\n{name}\n" + format_table(res))
        results.append(res)
    if args.markdown:
        write_report(results, args.markdown, args.png, command)
        print(f"\nwrote {args.markdown}" + (f" and {args.png}" if args.png else ""))
    elif args.png:
        plot_pareto(results, args.png)
        print(f"\nwrote {args.png}")
    return results
