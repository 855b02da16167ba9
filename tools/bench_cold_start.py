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

    python tools/bench_cold_start.py --layers 40
"""

from __future__ import annotations

import argparse
import time

import torch

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


def measure(kind: str, layers: int, inductor: bool) -> dict[str, float]:
    model, inputs, t = build(kind, layers)
    plan = ditopt.presets.fora(interval=2, steps=4, level="block")
    with torch.no_grad():
        model(**inputs, timestep=t)  # warm the eager kernels
        start = time.perf_counter()
        model(**inputs, timestep=t)
        forward = time.perf_counter() - start
        torch._dynamo.reset()
        fast = ditopt.optimize(model, plan)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["dit", "wan"], choices=["dit", "wan"])
    parser.add_argument("--inductor", action="store_true", help="also time the cold inductor compile (slow)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1:
        parser.error("--layers and --repeats must be >= 1")
    for kind in args.models:
        rows = [measure(kind, args.layers, args.inductor and i == 0) for i in range(args.repeats)]
        best = min(rows, key=lambda r: r["capture + passes"])
        extra = {k: v for k, v in rows[0].items() if k.startswith(("compiled", "inductor"))}
        cells = ", ".join(f"{k} {v:.3f} s" for k, v in {**best, **extra}.items())
        print(f"{kind} ({args.layers} blocks, best of {args.repeats}): {cells}")


if __name__ == "__main__":
    main()
