"""Cold start: what the first call of an optimised model costs, and where the time goes.

For a small DiT and a small Wan config with many blocks (40 by default; random weights), in one
process, best of ``--repeats`` fresh models each:

- ``first call``: the first call of ``ditopt.optimize(model, FORA-2 block)`` (dynamo's capture, the
  site finding, plan resolution, the passes, one run of the rewritten graph);
- ``forward``: one call of the unoptimised model, to subtract;
- ``capture + passes`` = first call - forward, split into dynamo (the rest), ``find_sites``,
  ``compile_plan`` and ``passes`` as the backend timed them (``ditopt.compiled_graph(m).seconds``);
- with ``--inductor``: the cold ``torch.compile(backend="ditopt")`` of the same model, and inductor's
  share of it (slow: tens of seconds per model).

With ``--regional``, the same model and plan compiled as one graph and with its repeated blocks
marked (``ditopt.mark_repeated_blocks``: the block traced and compiled once, called per block),
each in a fresh dynamo (after a one-block model paid dynamo's and inductor's one-time costs), with
inductor's caches off and its kernels compiled one at a time by this process's children: the first
call of ``optimize`` (dynamo's capture and the passes, no inductor; ``--no-inductor`` stops there,
for 40 blocks) and of the ``torch.compile(backend="ditopt")``'d model, each in wall and CPU seconds
(the CPU time of this process and its compilers: what the first call cost when other processes
share the machine), inductor's share, the blocks kept as calls, the best time of a generation of
four steps afterwards and the largest difference between the two compiled models' outputs.

    python tools/bench_cold_start.py --layers 40
    python tools/bench_cold_start.py --regional --layers 8
    python tools/bench_cold_start.py --regional --layers 40 --no-inductor
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch._inductor.config

import ditopt


def build(kind: str, layers: int):
    torch.manual_seed(0)
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), class_labels=torch.tensor([1, 2]))
        return model.eval(), inputs, torch.tensor([500, 500])
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers,
                                  rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 6, 32))
    return model.eval(), inputs, torch.tensor([500])


def measure(kind: str, layers: int, inductor: bool, regional: bool = True) -> dict[str, float]:
    model, inputs, t = build(kind, layers)
    plan = ditopt.presets.fora(interval=2, steps=4, level="block")
    with torch.no_grad():
        model(**inputs, timestep=t)  # warm the eager kernels
        start = time.perf_counter()
        model(**inputs, timestep=t)
        forward = time.perf_counter() - start
        torch._dynamo.reset()
        fast = ditopt.optimize(model, plan, regional=regional)
        start = time.perf_counter()
        fast(**inputs, timestep=t)
        first = time.perf_counter() - start
    stages = ditopt.compiled_graph(fast).seconds
    row = {"first call": first, "forward": forward, "capture + passes": first - forward, **stages}
    row["dynamo"] = row["capture + passes"] - sum(stages.values())
    if inductor:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(**inputs, timestep=t)
        row["compiled first call"] = time.perf_counter() - start
        row["inductor"] = ditopt.compiled_graph(compiled).seconds.get("inductor", float("nan"))
    return row


PLANS = {
    "fora": lambda: ditopt.presets.fora(interval=2, steps=4, level="block"),
    "taylorseer": lambda: ditopt.presets.taylorseer(steps=4, interval=2, order=1),
    "fbcache": lambda: ditopt.presets.first_block_cache(0.05, steps=4),
}


def _first_call(model, inputs, t, plan, *, inductor: bool, regional: bool = False):
    """A fresh dynamo and the first call of the optimised model: (seconds, CPU seconds, model,
    output). The CPU time (this process and the compilers it ran) is what the compile cost when
    other processes share the machine (the wall time then also counts their turns)."""
    torch._dynamo.reset()
    if inductor:
        fast = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
    else:
        fast = ditopt.optimize(model, plan, regional=regional)
    with torch.no_grad():
        start, cpu = time.perf_counter(), _cpu_seconds()
        out = fast(**inputs, timestep=t, return_dict=False)[0]
        first, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return first, cpu, fast, out


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the C++ compiler inductor runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _generation_time(fast, inputs, t, repeats: int = 5) -> float:
    """The best of ``repeats`` generations of four steps (after one), in seconds."""
    steps = [torch.full_like(t, v) for v in (999, 700, 400, 100)]
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            for step in steps:
                fast(**inputs, timestep=step)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def measure_regional(kind: str, layers: int, plan_name: str, inductor: bool) -> list[str]:
    """Whole graph against marked blocks, same model and plan (see the module docstring)."""
    plan = PLANS[plan_name]()
    small, small_inputs, small_t = build(kind, 1)  # one-time costs (dynamo's, inductor's first use) paid here
    for compiled in (False, True) if inductor else (False,):
        _first_call(small, small_inputs, small_t, plan, inductor=compiled)
    model, inputs, t = build(kind, layers)
    with torch.no_grad():
        model(**inputs, timestep=t)
        start = time.perf_counter()
        model(**inputs, timestep=t)
        forward = time.perf_counter() - start
    lines, outs = [], {}
    for regional in (False, True):
        marks = ditopt.mark_repeated_blocks(model) if regional else None
        first, cpu, fast, _ = _first_call(model, inputs, t, plan, inductor=False, regional=regional)
        stages = ditopt.compiled_graph(fast).seconds
        cells = {"capture + passes": first - forward, "first call CPU": cpu,
                 "dynamo": first - forward - sum(stages.values()), **stages}
        if inductor:
            first, cpu, fast, outs[regional] = _first_call(model, inputs, t, plan, inductor=True)
            graph = ditopt.compiled_graph(fast)
            cells |= {"compiled first call": first, "compiled first call CPU": cpu,
                      "inductor": graph.seconds.get("inductor", float("nan"))}
            cells["generation"] = _generation_time(fast, inputs, t)
            kept = len(graph.rewritten.meta.get("ditopt_regions", ()))
        else:
            kept = len(ditopt.compiled_graph(fast).rewritten.meta.get("ditopt_regions", ()))
        if marks is not None:
            marks.undo()
        text = ", ".join(f"{k} {v:.3f} s" for k, v in cells.items())
        lines.append(f"{kind} ({layers} blocks, {plan_name}) {'regional' if regional else 'whole graph'} "
                     f"({kept} blocks kept as calls): {text}")
    if inductor:
        lines.append(f"{kind}: largest difference between the two compiled outputs: "
                     f"{(outs[False] - outs[True]).abs().max().item():.2e}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["dit", "wan"], choices=["dit", "wan"])
    parser.add_argument("--inductor", action="store_true", help="also time the cold inductor compile (slow)")
    parser.add_argument("--regional", action="store_true",
                        help="whole graph against marked repeated blocks (capture, and the cold inductor compile)")
    parser.add_argument("--no-inductor", action="store_true", help="with --regional: the capture only")
    parser.add_argument("--plan", default="fora", choices=sorted(PLANS), help="with --regional: the plan")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1:
        parser.error("--layers and --repeats must be >= 1")
    if args.regional:
        import warnings

        warnings.filterwarnings("ignore", message=".*force disabled by torch.compiler.config.force_disable_caches")
        torch._inductor.config.force_disable_caches = True  # every compile cold
        torch._inductor.config.compile_threads = 1  # kernels compiled by this process's children: CPU time counts them
        for kind in args.models:
            print("\n".join(measure_regional(kind, args.layers, args.plan, not args.no_inductor)), flush=True)
        return
    for kind in args.models:
        for regional in (False, True):
            rows = [measure(kind, args.layers, args.inductor and i == 0 and not regional, regional)
                    for i in range(args.repeats)]
            best = min(rows, key=lambda r: r["capture + passes"])
            extra = {k: v for k, v in rows[0].items() if k.startswith(("compiled", "inductor"))}
            cells = ", ".join(f"{k} {v:.3f} s" for k, v in {**best, **extra}.items())
            how = "regional" if regional else "whole graph"
            print(f"{kind} ({args.layers} blocks, {how}, best of {args.repeats}): {cells}", flush=True)


if __name__ == "__main__":
    main()
