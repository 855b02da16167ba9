"""The peers: other systems' caching methods, each through its own public API, on a fresh copy
of the same model.

diffusers' cache hooks (``diffusers.hooks``: FirstBlockCache, PyramidAttentionBroadcast,
FasterCache, MagCache, TaylorSeer) and cache-dit's DBCache (``cache_dit``, the optional extra
``ditopt[peers]``). Each method names the module it needs; a peer that cannot be imported or
fails on the model is reported by the harness, not fatal.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any, Callable

import torch

from .method import Applied, Context, Method, Setting


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
    from ditopt import zoo

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


PEERS: list[Method] = [
    Method("diffusers:fbcache", "diffusers", "FirstBlockCache", _diffusers_fbcache, "diffusers.hooks"),
    Method("diffusers:pab", "diffusers", "PyramidAttentionBroadcast", _diffusers_pab, "diffusers.hooks"),
    Method("diffusers:fastercache", "diffusers", "FasterCache", _diffusers_fastercache, "diffusers.hooks"),
    Method("diffusers:magcache", "diffusers", "MagCache", _diffusers_magcache, "diffusers.hooks"),
    Method("diffusers:taylorseer", "diffusers", "TaylorSeer", _diffusers_taylorseer, "diffusers.hooks"),
    Method("cache-dit:dbcache", "cache-dit", "DBCache", _cachedit_dbcache, "cache_dit"),
]
