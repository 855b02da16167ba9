"""Collective elision on a zoo model: bytes per generation and fidelity of stale-K/V plans against the
un-elided sequence-parallel run (issue 14 item 3), on 2 gloo ranks spawned here (CPU).

For each mode (Ulysses, ring) it samples ``dit-digits`` (20 steps, CFG batched, labels 0-7, seed 1) with
    full            all-compute under sequence parallelism (the reference; equals one process)
    fixed           presets.distrifusion(steps): stale every other step after step 0 (remote K/V held)
    fixed-linear    the same, the remote K/V extrapolated from the last two exchanges
                    (SequenceParallel(stale_forecast="linear"): one more kept copy, no bytes)
    fixed-quadratic the same through the last three exchanges (stale_forecast="quadratic": two more copies)
    profiled        plan_from_profile(profile_kv(...), comm_budget=B): K/V change map profiled on a
                    calibration generation (other labels, other seed), the least-change pairs elided
    profiled-linear the profiled plan with the linear forecast
    profiled-attn   planned from profile_kv(signal="attention"): the change the K/V of the step before
                    cause in each site's attention output (-lin: with the linear forecast)
    profiled-fcst-lin planned from profile_kv(signal="linear"): the linear forecast's own error, run
                    with the linear forecast
    fixed-reuse     ring only: the fixed plan with SequenceParallel(ring_refresh=0): a stale step
                    reuses the kept partial (output, lse) of every remote hop (DiTango, no hop refreshed)
    fixed-quadratic-int8  the fixed plan whose stale steps send each rank's K/V residual against the
                    quadratic forecast in int8 (SequenceParallel(stale_residual="int8"); CompactFusion)
    profiled-{hold,linear,quadratic}-{fp16,int8}  plan_from_profile(comm_budget=B) on a map profiled
                    under that spec (a stale step's residual bytes counted), run with it
and prints, per plan, the bytes one rank sent per generation (``ditopt.stats().comm_bytes``), their
ratio to ``full``'s, the PSNR against ``full``'s samples, the digit classifier's accuracy, and the
PSNR against a finer reference (one process, full compute, 2x the steps) beside ``full``'s own:
the difference is the PSNR a plan loses against the un-elided run on a finite scale.

    python tools/bench_stale_kv.py [--budget 0.5] [--model dit-digits] [--modes ring] [--plans a,b]
                                   [--heatmap map.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def _rank(rank: int, world: int, init: str, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        import ditopt
        from ditopt import zoo
        from ditopt.metrics import psnr

        m = zoo.load(args["model"])
        steps, labels, cal = m.steps, [0, 1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2]
        single = m.sample(labels, seed=1)
        fine = m.sample(labels, seed=1, steps=2 * steps)
        rows = []
        for mode in args["modes"]:
            plans = _plans(m, mode, steps, cal, args, rank)
            res = {}
            for name, (plan, sp) in plans.items():
                fast = ditopt.optimize(m.model, plan, parallel=sp, regional=False)
                x = m.sample(labels, seed=1, transformer=fast)
                stale = sum(row.count("stale_kv") for row in ditopt.stats(fast).decisions.values())
                res[name] = dict(x=x, sent=dict(ditopt.stats(fast).comm_bytes), stale=stale)
            full = res["full"]
            for name, r in res.items():
                rows.append(dict(mode=mode, plan=name, total=r["sent"].get("total", 0), by_kind=r["sent"],
                                 ratio=r["sent"].get("total", 0) / full["sent"]["total"],
                                 psnr_vs_full=psnr(r["x"], full["x"]), psnr_vs_fine=psnr(r["x"], fine),
                                 accuracy=m.accuracy(r["x"], labels),
                                 full_vs_single=float((full["x"] - single).abs().max()), stale_pairs=r["stale"]))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _plans(m, mode: str, steps: int, cal: list[int], args: dict, rank: int) -> dict:
    """The plans the run compares, by name (``args["plans"]``: a subset, ``full`` always)."""
    import ditopt
    from ditopt.stale_plan import profile_kv

    want = set(args["plans"]) if args.get("plans") else None
    sp = lambda **kw: ditopt.SequenceParallel(mode=mode, **kw)  # noqa: E731
    spec, fixed = sp(), ditopt.presets.distrifusion(steps=steps)

    def profiled(signal: str = "kv", under=None):
        kv_map = profile_kv(m.model, lambda f: m.sample(cal, seed=0, transformer=f), steps, under or spec,
                            signal=signal)
        if rank == 0 and args.get("heatmap") and signal == "kv" and under is None:
            kv_map.heatmap(args["heatmap"].replace(".png", f"-{mode}.png"))
        return ditopt.plan_from_profile(kv_map, comm_budget=args["budget"], max_run=args["max_run"])

    makers = {"fixed": lambda: (fixed, spec), "fixed-linear": lambda: (fixed, sp(stale_forecast="linear")),
              "fixed-quadratic": lambda: (fixed, sp(stale_forecast="quadratic")),
              "profiled": lambda: (profiled(), spec), "profiled-linear": lambda: (profiled(), sp(stale_forecast="linear")),
              "profiled-attn": lambda: (profiled("attention"), spec),
              "profiled-attn-lin": lambda: (profiled("attention"), sp(stale_forecast="linear")),
              "profiled-fcst-lin": lambda: (profiled("linear"), sp(stale_forecast="linear")),
              "fixed-quadratic-int8": lambda: (fixed, sp(stale_forecast="quadratic", stale_residual="int8"))}
    if mode == "ring":
        makers["fixed-reuse"] = lambda: (fixed, sp(ring_refresh=0.0))
    for forecast in ("hold", "linear", "quadratic"):
        for residual in ("fp16", "int8"):
            under = sp(stale_forecast=forecast, stale_residual=residual)
            makers[f"profiled-{forecast}-{residual}"] = lambda under=under: (profiled(under=under), under)
    plans = {"full": (ditopt.presets.all_compute(steps=steps), spec)}
    for name, make in makers.items():
        if (want is None and "-fp16" not in name and "-int8" not in name) or (want and name in want):
            plans[name] = make()
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5, help="comm_budget: fraction of the un-elided generation's bytes sent")
    parser.add_argument("--max-run", type=int, default=None, help="at most this many stale steps of a site in a row")
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--modes", default="ulysses,ring")
    parser.add_argument("--heatmap", default=None, help="save the K/V change map as <path>-<mode>.png")
    parser.add_argument("--plans", default=None, help="comma-separated plan names (default: those without a "
                        "residual; 'full' always runs)")
    a = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        args = dict(budget=a.budget, max_run=a.max_run, model=a.model, modes=a.modes.split(","), heatmap=a.heatmap,
                    plans=a.plans.split(",") if a.plans else None)
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2, join=True)
        rows = json.load(open(out))
    print(f"{'mode':8} {'plan':22} {'stale pairs':>11} {'bytes/gen':>10} {'vs full':>8} {'PSNR vs full':>13} "
          f"{'PSNR vs 2x steps':>17} {'accuracy':>9}")
    for r in rows:
        print(f"{r['mode']:8} {r['plan']:22} {r['stale_pairs']:>11} {r['total']:>10} {r['ratio']:>8.3f} "
              f"{r['psnr_vs_full']:>13.2f} {r['psnr_vs_fine']:>17.2f} {r['accuracy']:>9.3f}   {r['by_kind']}")
    print("full vs single process (max abs):", {r["mode"]: r["full_vs_single"] for r in rows if r["plan"] == "full"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
