"""Profiling: a calibration run that measures how much every site changes from step to step.

``ditopt.profile(model, run, steps=N)`` compiles ``model`` with an all-compute plan plus the
``insert_observers`` pass, calls ``run(transformer)`` (a function that runs one real sampling
loop with the transformer it is given: a zoo model's ``sample``, a pipeline call), and returns a
:class:`RedundancyMap`: per site, step and CFG branch, the relative L1 change and cosine
similarity of the output and of the residual against the previous step, the cond-vs-uncond
difference, a fixed subsample of each site's residual at every step (what a planner replays to
price reuse and forecasts), and each site's cost: FLOPs per call and measured time per call.

The map saves as two files side by side: ``NAME.yaml`` (metadata, readable) and
``NAME.safetensors`` (the tensors); :meth:`RedundancyMap.heatmap` draws a step x site PNG.

Example::

    >>> import torch, ditopt
    >>> from ditopt import zoo
    >>> m = zoo.load("dit-digits")
    >>> rmap = ditopt.profile(m.model, lambda tr: m.sample([1, 7], seed=0, steps=6, transformer=tr), steps=6,
    ...                       progress=False)
    >>> rmap.steps, rmap.branches, rmap.sites[:2]
    (6, 1, ['output', 'transformer_blocks.0'])
    >>> tuple(rmap.metric("rel_l1_residual").shape)   # [steps, sites, branches]; step 0 is NaN
    (6, 19, 1)
"""

from __future__ import annotations


import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .errors import DitoptError, check_count, check_number, check_steps, short
from .passes.insert_observers import OBSERVED_KINDS
from .flops import ModuleCost
from .profile_attention import AttentionSamples, FirstCall, ModelProxy, record_attention
from .sites import OUTPUT, STACK
from .validate import load_yaml, read_text

__all__ = ["RedundancyMap", "ProfileError", "profile", "profile_pipeline"]

FORMAT = 1
MAX_BRANCHES = 64  # CFG branches a map may record (calls per step)
MAX_KEEP = 1 << 20  # residual elements sampled per site and step
_META_KEYS = ("format", "model", "signature", "steps", "branches", "timesteps", "tensors", "sites")
_SITE_KEYS = ("name", "kind", "parent", "residual", "flops_per_call", "seconds_per_call")


HEATMAP_SUFFIXES = (".png", ".svg", ".pdf")  # what RedundancyMap.heatmap writes


class ProfileError(DitoptError):
    """A redundancy map that does not fit what it is used with, or a calibration run that failed."""


class NotInMap(ProfileError, KeyError):
    """A site or metric the redundancy map does not hold (a KeyError too, as a lookup)."""
    __str__ = Exception.__str__  # KeyError's would quote the message


def signature(model_class: str, sites: list[str], kinds: list[str]) -> str:
    """What identifies a model's site structure: class name, site names and kinds."""
    h = hashlib.sha1("\n".join([model_class, *(f"{s}:{k}" for s, k in zip(sites, kinds))]).encode())
    return h.hexdigest()[:16]


@dataclass
class RedundancyMap:
    """What a calibration run measured (see the module docstring).

    ``metrics[name]`` is ``[steps, sites, branches]`` (NaN where undefined: step 0 of a change,
    branches past the first for ``cfg_diff``); ``samples[site]`` is ``[steps, branches, keep]``;
    ``flops[site]`` and ``seconds[site]`` are per call; ``timesteps[step]`` the timestep value.
    """

    model: str
    signature: str
    steps: int
    branches: int
    sites: list[str]
    kinds: list[str]
    parents: dict[str, str | None]
    residual_form: dict[str, bool]
    flops: dict[str, float]
    seconds: dict[str, float]
    timesteps: list[float]
    metrics: dict[str, torch.Tensor] = field(repr=False)
    samples: dict[str, torch.Tensor] = field(repr=False)
    stack: list[str] = field(default_factory=list)  # the blocks of the block stack, in order
    profile_seconds: float = 0.0
    attention: Any = field(default=None, repr=False)  # profile_attention.AttentionSamples (attention_window=)

    # -- reading --------------------------------------------------------------------------------
    def metric(self, name: str) -> torch.Tensor:
        if name not in self.metrics:
            raise NotInMap(f"unknown metric {name!r}; known: {sorted(self.metrics)}")
        return self.metrics[name]

    def index(self, site: str) -> int:
        try:
            return self.sites.index(site)
        except ValueError:
            raise NotInMap(f"site {site!r} is not in this map; sites are e.g. {self.sites[:4]}") from None

    def check_fits(self, *, model: str | None = None, sites: list[str] | None = None,
                   kinds: list[str] | None = None, steps: int | None = None) -> None:
        """Refuse use with another model or step count, with a clear error."""
        if model is not None and model != self.model:
            raise ProfileError(f"redundancy map was profiled on {self.model}, not {model}")
        if sites is not None and kinds is not None and signature(model or self.model, sites, kinds) != self.signature:
            missing = [s for s in self.sites if s not in sites][:3]
            raise ProfileError(f"redundancy map does not match this model's sites (profiled on {self.model}; "
                               f"e.g. not found here: {missing})")
        if steps is not None and steps != self.steps:
            raise ProfileError(f"the redundancy map was profiled at {self.steps} steps, not {steps}: profile at "
                               f"{steps}, plan for {steps} with plan_from_profile(rmap, ..., steps={steps}), "
                               f"or resample a plan with Plan.resample({steps})")

    def resample(self, steps: int) -> "RedundancyMap":
        """The map as if profiled at ``steps`` steps: every per-step quantity interpolated
        (cubic) at the same relative positions of the schedule (step ``i`` of M sits at
        ``i / (M - 1)``); per-step changes are scaled by the step-size ratio. To plan for M steps
        from a map profiled at N, use ``plan_from_profile(rmap, ..., steps=M)``: it plans on
        this resampled map and keeps the warm-up of the N-step plan, which the interpolation
        cannot see (``docs/BENCHMARKS.md``).
        """
        from .resample import resample_map

        return resample_map(self, steps)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (YAML metadata) and the tensors next to it (``.safetensors``)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or not path.name:
            raise ProfileError(f"cannot write redundancy map {path}: a directory; give a file name (map.yaml)")
        if path.suffix and path.suffix not in (".yaml", ".yml"):
            raise ProfileError(f"a redundancy map is written as .yaml (its tensors next to it as .safetensors), "
                               f"got {path.name}")
        path = path.with_suffix(".yaml") if not path.suffix else path
        tensors = {f"metric/{k}": v.contiguous() for k, v in self.metrics.items()}
        tensors.update({f"samples/{k}": v.contiguous() for k, v in self.samples.items()})
        tensors.update(self.attention.tensors() if self.attention is not None else {})
        try:
            save_file(tensors, str(path.with_suffix(".safetensors")))
        except Exception as exc:  # OSError, or safetensors' own error wrapping one
            raise ProfileError(f"cannot write redundancy map {path.with_suffix('.safetensors')}: "
                               f"{getattr(exc, 'strerror', None) or str(exc).splitlines()[0]}") from None
        meta = {"format": FORMAT, "model": self.model, "signature": self.signature, "steps": self.steps,
                "branches": self.branches, "profile_seconds": round(self.profile_seconds, 3),
                "timesteps": [float(t) for t in self.timesteps], "stack": list(self.stack),
                "tensors": path.with_suffix(".safetensors").name,
                "sites": [{"name": s, "kind": k, "parent": self.parents.get(s), "residual": self.residual_form.get(s, False),
                           "flops_per_call": float(self.flops.get(s, 0.0)),
                           "seconds_per_call": float(self.seconds.get(s, 0.0))}
                          for s, k in zip(self.sites, self.kinds)]}
        if self.attention is not None:
            meta["attention"] = self.attention.meta()
        try:
            path.write_text(yaml.safe_dump(meta, sort_keys=False))
        except OSError as exc:
            raise ProfileError(f"cannot write redundancy map {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RedundancyMap":
        """Read a map :meth:`save` wrote. ProfileError naming the file and the key, tensor or site
        at fault, before anything uses it: a missing or mistyped key, truncated or corrupt
        tensors, a site list that disagrees with the map's signature, its tensors' names and
        shapes, or its step and branch counts (an edited map would give sites their neighbours'
        metrics)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = _read_meta(path)
        tensor_path = path.with_name(meta["tensors"])
        if not tensor_path.is_file():
            raise ProfileError(f"{path}: its tensors file {tensor_path.name} is missing")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # safetensors' own error (truncated, corrupt), or OSError
            raise ProfileError(f"{tensor_path}: cannot read the map's tensors (truncated or corrupt?): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        sites = meta["sites"]
        rmap = cls(model=meta["model"], signature=meta["signature"], steps=meta["steps"],
                   branches=meta["branches"], sites=[s["name"] for s in sites], kinds=[s["kind"] for s in sites],
                   parents={s["name"]: s["parent"] for s in sites},
                   residual_form={s["name"]: s["residual"] for s in sites},
                   flops={s["name"]: float(s["flops_per_call"]) for s in sites},
                   seconds={s["name"]: float(s["seconds_per_call"]) for s in sites},
                   timesteps=[float(t) for t in meta["timesteps"]], stack=list(meta.get("stack") or []),
                   metrics={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("metric/")},
                   samples={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("samples/")},
                   profile_seconds=float(meta.get("profile_seconds") or 0.0))
        _check_tensors(rmap, list(tensors), tensor_path)
        rmap.attention = AttentionSamples.from_saved(meta.get("attention"), tensors, tensor_path, rmap.steps)
        return rmap

    # -- pictures -------------------------------------------------------------------------------
    def heatmap(self, path: str | Path, metric: str = "rel_l1_residual", kinds: tuple[str, ...] = ("block",
                "attention", "feedforward")) -> Path:
        """A step x site heatmap of ``metric`` (mean over CFG branches) as PNG (``path`` without a
        suffix gets ``.png``); returns the path written."""
        path = Path(path)
        path = path.with_suffix(".png") if not path.suffix else path
        if path.suffix.lower() not in HEATMAP_SUFFIXES:
            raise ProfileError(f"a heatmap is written as .png, .svg or .pdf, got {path.name}")
        if not path.parent.is_dir():
            raise ProfileError(f"cannot write heatmap {path}: directory {path.parent} does not exist")
        if metric not in self.metrics:
            raise ProfileError(f"unknown metric {metric!r}; this map has {sorted(self.metrics)}")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = [i for i, k in enumerate(self.kinds) if k in kinds]
        values = self.metric(metric)[:, cols, :].nanmean(dim=-1).numpy()
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(cols) + 2), max(3.5, 0.25 * self.steps + 1.5)))
        im = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xticks(range(len(cols)), [self.sites[i] for i in cols], rotation=90, fontsize=6)
        ax.set_yticks(range(0, self.steps, max(1, self.steps // 20)))
        ax.set_ylabel("step (row 0 blank: no previous step)")
        ax.set_title(f"{self.model}: {metric} per step and site ({self.branches} CFG branch(es))", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _read_meta(path: Path) -> dict[str, Any]:
    """A map's YAML, every key present, typed and bounded, and its site list consistent with its
    signature; ProfileError naming the file and the key otherwise."""
    if not path.is_file():
        raise ProfileError(f"redundancy map not found: {path}")
    text = read_text(path, "redundancy map", ProfileError)
    meta, _ = load_yaml(text, error=lambda m, line: ProfileError(f"{path}: {m}" + (f" (line {line})" if line else "")))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ProfileError(f"{path}: not a ditopt redundancy map (format {FORMAT})")

    def fail(key: str, want: str, value: Any = None):
        raise ProfileError(f"{path}: '{key}' must be {want}, got {short(value)}")

    for key in _META_KEYS:
        if key not in meta:
            raise ProfileError(f"{path}: missing key '{key}'")
    for key in ("model", "signature"):
        if not isinstance(meta[key], str):
            fail(key, "a string", meta[key])
    steps = check_steps(meta["steps"], f"{path}: 'steps'", error=ProfileError)
    check_count(meta["branches"], f"{path}: 'branches'", maximum=MAX_BRANCHES, error=ProfileError)
    name = meta["tensors"]
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        fail("tensors", "a file name beside the map", name)
    timesteps = meta["timesteps"]
    if not isinstance(timesteps, list) or len(timesteps) != steps or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in timesteps):
        fail("timesteps", f"a list of {steps} numbers (one per step)", timesteps)
    if not isinstance(meta.get("stack") or [], list) or not all(isinstance(x, str) for x in meta.get("stack") or []):
        fail("stack", "a list of site names", meta.get("stack"))
    if not isinstance(meta["sites"], list) or not meta["sites"]:
        fail("sites", "a non-empty list of sites", meta["sites"])
    names = [_check_site(entry, f"{path}: sites[{i}]") for i, entry in enumerate(meta["sites"])]
    if len(set(names)) != len(names):
        raise ProfileError(f"{path}: 'sites' names a site twice")
    if signature(meta["model"], names, [e["kind"] for e in meta["sites"]]) != meta["signature"]:
        raise ProfileError(f"{path}: its site list does not match its signature (a site added, removed, renamed "
                           f"or reordered since it was profiled?)")
    missing = [x for x in meta.get("stack") or [] if x not in names]
    if missing:
        raise ProfileError(f"{path}: 'stack' names {short(missing[0])}, which is not in its site list")
    return meta


def _check_site(entry: Any, where: str) -> str:
    """One entry of a map's site list, checked; its name."""
    if not isinstance(entry, dict):
        raise ProfileError(f"{where} must be a mapping of {', '.join(_SITE_KEYS)}, got {short(entry)}")
    for key in _SITE_KEYS:
        if key not in entry:
            raise ProfileError(f"{where}: missing key '{key}'")
    if not isinstance(entry["name"], str) or not entry["name"]:
        raise ProfileError(f"{where}.name must be a site name, got {short(entry['name'])}")
    if entry["kind"] not in OBSERVED_KINDS:
        raise ProfileError(f"{where}.kind must be one of {list(OBSERVED_KINDS)}, got {short(entry['kind'])}")
    if entry["parent"] is not None and not isinstance(entry["parent"], str):
        raise ProfileError(f"{where}.parent must be a site name or null, got {short(entry['parent'])}")
    if not isinstance(entry["residual"], bool):
        raise ProfileError(f"{where}.residual must be true or false, got {short(entry['residual'])}")
    for key in ("flops_per_call", "seconds_per_call"):
        check_number(entry[key], f"{where}.{key}", minimum=0, error=ProfileError)
    return entry["name"]


def _check_tensors(rmap: RedundancyMap, names: list[str], where: Path) -> None:
    """The tensors match the site list: a metric ``[steps, sites, branches]`` for each of
    :data:`METRICS`, a sample ``[steps, branches, keep]`` for each site and nothing else."""
    from .runtime.observe import METRICS

    for name in names:
        kind, _, key = name.partition("/")
        if kind != "attention" and kind not in ("metric", "samples") or (kind == "metric" and key not in METRICS) or (
                kind == "samples" and key not in rmap.sites):
            raise ProfileError(f"{where}: tensor {short(name)} names no metric or site of the map")
    want = (rmap.steps, len(rmap.sites), rmap.branches)
    for metric in METRICS:
        t = rmap.metrics.get(metric)
        if t is None or tuple(t.shape) != want or not t.is_floating_point():
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ProfileError(f"{where}: metric {metric!r} must be a float tensor of shape {want} "
                               f"[steps, sites, branches], got {got}")
    for site in rmap.sites:
        t = rmap.samples.get(site)
        if t is None or t.dim() != 3 or tuple(t.shape[:2]) != want[::2] or t.shape[2] < 1:
            got = "missing" if t is None else tuple(t.shape)
            raise ProfileError(f"{where}: samples of site {site!r} must be [steps={rmap.steps}, "
                               f"branches={rmap.branches}, keep], got {got}")


def _site_costs(model: torch.nn.Module, graph: torch.fx.Graph, table, names: list[str], call_args: tuple,
                call_kwargs: dict) -> tuple[dict, dict]:
    """FLOPs and seconds per call of each site module. FLOPs come from the captured graph's
    shapes, node by node with FlopCounterMode's formulas (:func:`ditopt.cost.node_flops`; equal
    to FlopCounterMode's count with attention on SDPA's math kernel, ``tests/test_cost.py``; on
    the CPU flash kernel FlopCounterMode counts attention as 0), so no forward is spent on them,
    except on sites whose sizes are known only at run time (:meth:`ModuleCost.counting`, one more
    forward); seconds from one timed eager forward (noisy on small models)."""
    from .cost import node_flops

    modules = [n for n in names if n not in (STACK, OUTPUT)]
    nodes = {n.name: n for n in graph.nodes}  # the graph the sites were found on, names kept
    flops = {}
    for name in modules:
        try:
            flops[name] = float(sum(int(node_flops(nodes[x], int)) for x in table[name].nodes))
        except GuardOnDataDependentSymNode:  # a size known only at run time (Mochi's text mask)
            pass
    cost = ModuleCost(model, modules)
    with torch.no_grad(), cost.timing():
        model(*call_args, **call_kwargs)
    unknown = [n for n in modules if n not in flops]
    if unknown:  # those sites: counted in one more forward
        counted = ModuleCost(model, unknown)
        with torch.no_grad(), counted.counting():
            model(*call_args, **call_kwargs)
        flops.update({n: float(counted.flops[n]) for n in unknown})
    return flops, dict(cost.seconds)


def profile_pipeline(pipe, *, steps: int, progress: bool = True, cfg: str | None = None, keep: int = 4096,
                     **call_kwargs) -> RedundancyMap:
    """Profile ``pipe.transformer`` over one real call of a diffusers pipeline:
    ``pipe(num_inference_steps=steps, **call_kwargs)``. The pipeline's transformer is restored
    afterwards. ``cfg="batched"`` when the pipeline runs CFG as one call on a doubled batch
    (most diffusers image pipelines; DiTPipeline puts the conditional half first).

    Example::

        >>> import torch, ditopt
        >>> from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
        >>> net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        ...     num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
        >>> vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=8).eval()
        >>> pipe = DiTPipeline(transformer=net, vae=vae, scheduler=DDIMScheduler())
        >>> pipe.set_progress_bar_config(disable=True)
        >>> rmap = ditopt.profile_pipeline(pipe, steps=4, cfg="batched", progress=False, class_labels=[1, 2],
        ...                                output_type="np")
        >>> rmap.steps, rmap.stack, pipe.transformer is net
        (4, ['transformer_blocks.0', 'transformer_blocks.1'], True)
    """
    return profile(pipe.transformer, lambda tr: call_with(pipe, tr, num_inference_steps=steps, **call_kwargs),
                   steps=steps, progress=progress, keep=keep, cfg=cfg)


def call_with(pipe, transformer, **call_kwargs):
    """One call of ``pipe`` with ``transformer`` in place of ``pipe.transformer``, restored after."""
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        return pipe(**call_kwargs)
    finally:
        pipe.transformer = original


def _check_profile_args(run: Any, steps: Any, keep: Any, timestep_arg: Any, cfg: Any) -> None:
    check_steps(steps, "steps", error=ProfileError)
    check_count(keep, "keep", maximum=MAX_KEEP, error=ProfileError)
    if not callable(run):
        raise ProfileError(f"run must be a function of the transformer, got {type(run).__name__}")
    if not isinstance(timestep_arg, str):
        raise ProfileError(f"timestep_arg must be an argument name, got {short(timestep_arg)}")
    if cfg not in (None, "batched", "separate"):
        raise ProfileError(f"cfg must be None, 'batched' or 'separate', got {short(cfg)}")


def profile(model: torch.nn.Module, run: Callable[[Any], Any], *, steps: int, progress: bool = True,
            keep: int = 4096, timestep_arg: str = "timestep", cfg: str | None = None,
            attention_window: int | None = None) -> RedundancyMap:
    """Run one calibration sampling loop and measure every site; see the module docstring.

    ``run(transformer)`` must run one generation of ``steps`` denoising steps calling
    ``transformer`` like the model (CFG as one batched call or as two calls per step are both
    understood). ``keep`` is the number of residual elements sampled per site and step.
    ``cfg="batched"`` says each call carries ``[cond, uncond]`` as the two halves of its batch,
    so ``cfg_diff`` compares them; two calls per step are recognised as CFG branches by
    themselves (``cfg_diff`` compares the calls). ``attention_window=W`` also samples every
    attention site's output and self-attention's window residual (``ditopt/profile_attention.py``).
    """
    from . import presets
    from .api import compiled_graph, wrap
    from .runtime import Runtime
    from .runtime.observe import METRICS, Recorder

    _check_profile_args(run, steps, keep, timestep_arg, cfg)
    start = time.perf_counter()
    recorder = Recorder(keep=keep, batched_cfg=cfg == "batched")
    rt = Runtime()
    # the observer nodes feed the recorder; every new timestep is the next step, whichever way a sampler counts
    rt.recorder, rt.state.one_generation = recorder, True
    fast = wrap(model, presets.all_compute(steps=steps), timestep_arg=timestep_arg, observe=True, runtime=rt)
    probe = FirstCall(fast)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"profile {type(model).__name__}", unit="step")
    timesteps: dict[int, float] = {}

    def call(*args, **kwargs):
        out = probe(*args, **kwargs)
        if rt.state._last_t is not None:  # as the step state read it: by keyword or position, its maximum
            timesteps.setdefault(rt.state.step, float(rt.state._last_t))
        if bar is not None:
            bar.n = rt.state.step + 1
            bar.refresh()
        return out

    tracked = ModelProxy(fast, call)  # looks like the model to a pipeline (config, dtype, ...)
    try:
        with torch.no_grad():
            run(tracked)
    finally:
        if bar is not None:
            bar.close()
    rt.recorder = None
    args, kwargs = probe.args  # a ProfileError if run() never called the transformer
    captured = compiled_graph(fast)
    table = captured.sites
    observed = [s for s in table if s.kind in OBSERVED_KINDS]
    names = [s.name for s in observed]
    kinds = [s.kind for s in observed]
    n_steps = recorder.max_step + 1
    if n_steps != steps:
        raise ProfileError(f"the calibration run made {n_steps} denoising steps, not the {steps} asked for "
                           f"(does run() pass steps to its sampler?)")
    branches = recorder.max_branch + 1
    metrics = {}
    for name in METRICS:
        t = torch.full((steps, len(names), branches), math.nan)
        for (metric, site, step, branch), v in recorder.values.items():
            if metric == name and site in names:
                t[step, names.index(site), branch] = v
        metrics[name] = t
    samples = {}
    for site in names:
        first = recorder.samples.get((site, 0, 0))
        if first is None:
            raise ProfileError(f"site {site} was never observed in the calibration run")
        t = torch.zeros(steps, branches, first.numel())
        for step in range(steps):
            for branch in range(branches):
                v = recorder.samples.get((site, step, branch))
                if v is not None:
                    t[step, branch] = v
        samples[site] = t
    flops, seconds = _site_costs(model, captured.original.graph, table, names, args, kwargs)
    timesteps = [timesteps.get(i, math.nan) for i in range(steps)]
    model_class = type(model).__name__
    rmap = RedundancyMap(model=model_class, signature=signature(model_class, names, kinds), steps=steps,
                         branches=branches, sites=names, kinds=kinds, parents={s.name: s.parent for s in observed},
                         residual_form=dict(recorder.residual_form), flops=flops, seconds=seconds,
                         timesteps=timesteps, metrics=metrics, samples=samples,
                         stack=[s.name for s in table if s.kind == "block" and s.parent == "stack"],
                         profile_seconds=time.perf_counter() - start)
    if attention_window is not None:
        rmap.attention = record_attention(model, run, steps=steps, window=attention_window, keep=keep,
                                          batched=cfg == "batched", timestep_arg=timestep_arg,
                                          kinds={s.name: s.attention for s in observed if s.kind == "attention"})
    return rmap
