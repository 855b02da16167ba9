"""Speed on an accelerator: ditopt eager and compiled against the unoptimised model and the peers.

One process, one model shape, one sampling loop (``steps`` steps, CFG as two calls per step with
different text states, timesteps on the device), for each variant:

- ``eager``: the unoptimised model; ``inductor``: ``torch.compile`` of it;
- ``ditopt <plan>`` (``ditopt.optimize``) and ``ditopt compiled <plan>``
  (``torch.compile(backend="ditopt")``) for all-compute, FORA-2 (block level), TaylorSeer
  (interval 2, order 1) and First-Block-Cache (0.1);
- ``diffusers FBCache`` / ``diffusers TaylorSeer``: diffusers' own hooks, where importable.

Columns: seconds per generation (best of ``repeats`` after the first), speedup over eager,
realised/ideal speedup (ideal = eager / (no-blocks + computed block fraction x (eager - no-blocks)),
where no-blocks is the measured time of the model with its blocks replaced by identities), peak
memory (GPU), cache bytes, and the first generation's time (capture and compile included).

    python tools/bench_gpu.py --device cuda --shape wan-1.3b     # one H200: about 6 minutes
    python tools/bench_gpu.py --device cpu --shape tiny --steps 4 --repeats 1   # a smoke run
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import ditopt

SHAPES = {
    # Wan2.1-1.3B: 30 blocks, 12 heads x 128, 480x832 at 9 latent frames = 14,040 tokens
    "wan-1.3b": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
                     latents=(1, 16, 9, 60, 104), text=(1, 512, 4096)),
    "tiny": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                             out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=32),
                 latents=(1, 4, 3, 8, 8), text=(1, 6, 32)),
}
PLANS: dict[str, Callable[[int], ditopt.Plan]] = {
    "all-compute": lambda steps: ditopt.presets.all_compute(steps),
    "FORA-2": lambda steps: ditopt.presets.fora(interval=2, steps=steps, level="block"),
    "TaylorSeer-2": lambda steps: ditopt.presets.taylorseer(steps=steps, interval=2, order=1),
    "FBCache-0.1": lambda steps: ditopt.presets.first_block_cache(0.1, steps=steps),
}


# The order variants run in by default: what the acceptance reads first, so that a deadline cuts the rest.
PRIORITY = ["ditopt compiled FORA-2", "ditopt compiled TaylorSeer-2", "ditopt FORA-2", "ditopt TaylorSeer-2",
            "inductor", "ditopt all-compute", "ditopt compiled all-compute", "diffusers TaylorSeer",
            "ditopt FBCache-0.1", "ditopt compiled FBCache-0.1", "diffusers FBCache"]


@dataclass
class GpuRow:
    variant: str
    seconds: float
    speedup: float = float("nan")
    realised_over_ideal: float = float("nan")
    peak_gb: float = float("nan")
    cache_bytes: int = 0
    first_seconds: float = float("nan")
    block_fraction: float = 1.0


class _Loop:
    """The sampling loop every variant runs: same inputs, timesteps on the device."""

    def __init__(self, shape: str, steps: int, device: torch.device, dtype: torch.dtype):
        spec = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(spec["latents"], generator=g).to(device, dtype)
        self.texts = [torch.randn(spec["text"], generator=g).to(device, dtype) for _ in range(2)]
        self.timesteps = torch.linspace(999, 0, steps, device=device)
        self.device = device

    def __call__(self, model, callback: Callable[[int], None] | None = None) -> None:
        with torch.no_grad():
            for i, t in enumerate(self.timesteps):
                for text in self.texts:  # CFG: conditional, then unconditional
                    model(hidden_states=self.x, timestep=t.reshape(1), encoder_hidden_states=text, return_dict=False)
                if callback is not None:
                    callback(i)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(loop: _Loop, model, repeats: int, callback=None) -> tuple[float, float]:
    """(first generation's seconds, best of the next ``repeats``)."""
    times = []
    for _ in range(repeats + 1):
        _sync(loop.device)
        start = time.perf_counter()
        loop(model, callback)
        _sync(loop.device)
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


@contextlib.contextmanager
def _blocks_removed(model):
    """The model with every block an identity (for the ideal speedup's fixed cost)."""
    originals = [b.forward for b in model.blocks]
    for b in model.blocks:
        b.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        yield model
    finally:
        for b, f in zip(model.blocks, originals):
            b.forward = f


def _block_fraction(model) -> float:
    decisions = ditopt.stats(model).decisions
    blocks = [s for s in decisions if s.startswith("blocks.") and s.count(".") == 1]
    calls = [d for s in blocks for d in decisions[s]]
    return sum(d == "compute" for d in calls) / len(calls) if calls else 1.0


def run(shape: str = "tiny", *, device: str = "cpu", steps: int = 20, repeats: int = 2,
        variants: list[str] | None = None, deadline_s: float | None = None,
        log: Callable[[str], None] = print) -> list[GpuRow]:
    """Measure each variant (see the module docstring); variants past ``deadline_s`` are skipped
    (said in the log), so a run fits a time limit."""
    from diffusers import WanTransformer3DModel

    if shape not in SHAPES:
        raise ditopt.DitoptError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    ditopt.errors.check_count(steps, "steps", minimum=2)
    ditopt.errors.check_count(repeats, "repeats")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = WanTransformer3DModel(**SHAPES[shape]["config"]).to(dev, dtype).eval()
    loop = _Loop(shape, steps, dev, dtype)
    all_variants = _variants(model, steps)
    chosen = variants or sorted(all_variants, key=lambda v: PRIORITY.index(v) if v in PRIORITY else len(PRIORITY))
    unknown = set(chosen) - set(all_variants) - {"eager"}
    if unknown:
        raise ditopt.DitoptError(f"unknown variant(s) {sorted(unknown)}; known: {['eager', *all_variants]}")
    start = time.perf_counter()
    first, eager = _timed(loop, model, repeats)
    with _blocks_removed(model):
        _, no_blocks = _timed(loop, model, 1)
    rows = [GpuRow("eager", eager, 1.0, float("nan"), _peak_gb(dev), 0, first)]
    log(f"eager {eager:.3f} s/generation, without its blocks {no_blocks:.3f} s")
    for name in chosen:
        if name == "eager":
            continue
        if deadline_s is not None and time.perf_counter() - start > deadline_s:
            log(f"{name}: skipped (past the {deadline_s:.0f} s deadline)")
            continue
        try:
            rows.append(_measure(name, all_variants[name], loop, repeats, eager, no_blocks, dev))
        except ImportError as exc:
            log(f"{name}: skipped ({exc})")
            continue
        log(_format(rows[-1]))
        torch._dynamo.reset()
    return rows


def _variants(model, steps: int) -> dict[str, Callable[[], tuple]]:
    """name -> a maker returning (the callable to run, a step callback or None)."""
    out: dict[str, Callable[[], tuple]] = {
        "inductor": lambda: (torch.compile(model, fullgraph=True, dynamic=False), None)}
    for plan_name, make_plan in PLANS.items():
        def eager_maker(make_plan=make_plan):
            fast = ditopt.optimize(model, make_plan(steps))
            told = ditopt.step_callback(fast, steps=steps)  # the step is told: no host read per call
            return fast, lambda i: told(i, None, None)

        def compiled_maker(make_plan=make_plan):
            fast = torch.compile(model, backend="ditopt", options={"plan": make_plan(steps)}, fullgraph=True,
                                 dynamic=False)
            return fast, None

        out[f"ditopt {plan_name}"] = eager_maker
        out[f"ditopt compiled {plan_name}"] = compiled_maker
    out["diffusers FBCache"] = lambda: _diffusers(model, "fbc")
    out["diffusers TaylorSeer"] = lambda: _diffusers(model, "taylorseer")
    return out


def _diffusers(model, which: str):
    import diffusers.hooks as h

    from .peers import _CacheContextCaller, _enable_diffusers_cache

    hooked = copy.deepcopy(model)  # the hooks stay on the copy
    config = h.FirstBlockCacheConfig(threshold=0.1) if which == "fbc" else \
        h.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                taylor_factors_dtype=torch.float32)
    _enable_diffusers_cache(hooked, config)
    return _CacheContextCaller(hooked, separate_cfg=True), None


def _measure(name, maker, loop: _Loop, repeats: int, eager: float, no_blocks: float, dev) -> GpuRow:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    made, callback = maker()
    first, seconds = _timed(loop, made, repeats, callback)
    fraction = _block_fraction(made) if name.startswith("ditopt") else float("nan")
    cache = ditopt.stats(made).cache_bytes if name.startswith("ditopt") else 0
    ideal = eager / (no_blocks + fraction * (eager - no_blocks)) if fraction == fraction else float("nan")
    speedup = eager / seconds
    return GpuRow(name, seconds, speedup, speedup / ideal if ideal == ideal else float("nan"), _peak_gb(dev),
                  cache, first, fraction)


def _peak_gb(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")


def _format(row: GpuRow) -> str:
    return (f"{row.variant}: {row.seconds:.3f} s, x{row.speedup:.2f}, realised/ideal {row.realised_over_ideal:.3f}, "
            f"peak {row.peak_gb:.2f} GB, cache {row.cache_bytes / 2 ** 20:.1f} MB, first {row.first_seconds:.1f} s")


def sync_check(compiled: bool, device: str = "cuda") -> dict[str, list[str]]:
    """A told static plan (FORA-2, block level) on the small Wan config: after a first generation
    (capture, compile, inferred steps), a second one under ``torch.cuda.set_sync_debug_mode("error")``
    must make no synchronising device-to-host copy and give the first one's outputs. Returns the
    decisions. CUDA only (the sync debug mode is CUDA's)."""
    from ditopt.small_models import MODELS

    steps = 4
    model, kwargs = MODELS["wan"]()
    model = model.to(device)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    texts = [kwargs["encoder_hidden_states"], torch.randn_like(kwargs["encoder_hidden_states"])]
    timesteps = [torch.full((1,), v, device=device) for v in (999.0, 700.0, 400.0, 100.0)]
    plan = ditopt.presets.fora(interval=2, steps=steps, level="block")
    fast = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False) \
        if compiled else ditopt.optimize(model, plan)

    def generation(callback):
        outs = []
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                for text in texts:
                    outs.append(fast(**{**kwargs, "timestep": t, "encoder_hidden_states": text}, return_dict=False)[0])
                callback(i, None, None)
        return outs

    first = generation(lambda *a: None)
    told = ditopt.step_callback(fast, steps=steps)
    ditopt.api.runtime_of(fast).state.tell(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steady = generation(told)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for a, b in zip(first, steady):
        torch.testing.assert_close(a, b)
    return ditopt.stats(fast).decisions


def markdown(rows: list[GpuRow]) -> str:
    lines = ["| variant | s / generation | speedup | realised / ideal | peak GB | cache MB | first generation s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant} | {r.seconds:.3f} | {r.speedup:.2f} | {r.realised_over_ideal:.3f} | "
                     f"{r.peak_gb:.2f} | {r.cache_bytes / 2 ** 20:.1f} | {r.first_seconds:.1f} |")
    return "\n".join(lines)


def device_name(text: str) -> str:
    """An argparse ``type``: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import argparse

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    backend = getattr(torch, dev.type, None)
    if not getattr(backend, "is_available", lambda: True)():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) has no {dev.type} device here")
    if dev.index is not None and dev.index >= getattr(backend, "device_count", lambda: dev.index + 1)():
        raise argparse.ArgumentTypeError(f"{text!r}: there is no {dev.type} device {dev.index} on this machine")
    return text


def main(argv=None) -> None:
    import argparse

    from ditopt.cli import count, output_path
    from ditopt.errors import MAX_STEPS

    parser = argparse.ArgumentParser(description="ditopt speed on one device (see ditopt/bench/gpu.py)")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="wan-1.3b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=count(1, MAX_STEPS), default=20)
    parser.add_argument("--repeats", type=count(1, 1000), default=2)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--deadline", type=float, default=None,
                        help="skip variants started after this many seconds")
    parser.add_argument("--json", type=output_path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.shape, device=args.device, steps=args.steps, repeats=args.repeats, variants=args.variants,
               deadline_s=args.deadline)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


__all__ = ["GpuRow", "PLANS", "PRIORITY", "SHAPES", "markdown", "run", "main", "sync_check"]
