"""What each rank runs in the sequence-parallel tests (spawned processes import it from here).

``spawn(jobs, world)`` starts ``world`` processes with a gloo group; each runs every job and
rank 0's results come back as a list of dicts. A job compares one model (a small config of
:mod:`ditopt.small_models`, or ``dit3`` / ``dit4``: a DiT with 3 / 4 heads) under one plan and mode against the
single-process eager run (``compile``: the parallel one through ``torch.compile(backend="ditopt")``),
over ``steps`` denoising steps:

    {"model": "dit", "mode": "ring", "plan": "all" | "fora2", "steps": 1, "compile": False}

and reports the largest absolute difference of every step's output, the decisions and the
bytes sent (``ditopt.stats(...).comm_bytes``), or the error raised (``error``).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback

import torch
import torch.distributed as dist


def build(name: str):
    from ditopt.small_models import build as build_small

    if name in ("dit3", "dit4"):  # 3 heads: not divisible among 2 ranks; 4: Ulysses on 4 ranks
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        m = DiTTransformer2DModel(num_attention_heads=int(name[-1]), attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        return m.eval(), dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                              class_labels=torch.tensor([1, 2]))
    return build_small(name, seed=0)


def plan_for(name: str, steps: int):
    import ditopt

    if name == "fora2":
        return ditopt.presets.fora(interval=2, steps=steps, level="block")
    return ditopt.presets.all_compute(steps=steps)


def _outputs(model, kwargs: dict, steps: int) -> list[torch.Tensor]:
    from ditopt.small_models import timesteps

    outs = []
    with torch.no_grad():
        for t in timesteps(steps, kwargs["timestep"]):
            out = model(**{**kwargs, "timestep": t})
            outs.append((out[0] if isinstance(out, (tuple, list)) else out.sample).clone())
    return outs


def run_job(job: dict) -> dict:
    import ditopt

    steps = job.get("steps", 1)
    model, kwargs = build(job["model"])
    single = ditopt.optimize(model, plan_for(job.get("plan", "all"), steps))
    reference = _outputs(single, kwargs, steps)
    result = {**job, "reference_decisions": ditopt.stats(single).decisions}
    try:
        spec, plan = ditopt.SequenceParallel(mode=job["mode"]), plan_for(job.get("plan", "all"), steps)
        if job.get("compile"):  # the backend under inductor
            parallel = torch.compile(model, backend="ditopt", options={"plan": plan, "parallel": spec})
        else:
            parallel = ditopt.optimize(model, plan, parallel=spec)
        outs = _outputs(parallel, kwargs, steps)
    except Exception as exc:  # reported to the test, which may expect it
        return {**result, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    stats = ditopt.stats(parallel)
    graph = ditopt.compiled_graph(parallel).rewritten
    shapes = [[list(a.meta["example_value"].shape) for a in n.args[:3]] for n in graph.graph.nodes
              if getattr(n.target, "__name__", "") == "sp_attention"]
    return {**result, "max_diff": max(float((a - b).abs().max()) for a, b in zip(outs, reference)),
            "comm_bytes": stats.comm_bytes, "decisions": stats.decisions, "attention_shapes": shapes,
            "itemsize": reference[0].element_size(), "out_shape": list(reference[0].shape)}


def _worker(rank: int, world: int, init_file: str, jobs: list[dict], out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [run_job(job) for job in jobs]
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def spawn(jobs: list[dict], world: int = 2) -> list[dict]:
    """Run ``jobs`` on ``world`` spawned ranks; rank 0's results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_path = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(world, init_file, jobs, out_path), nprocs=world, join=True)
        with open(out_path) as f:
            return json.load(f)


if __name__ == "__main__":  # python tests/parallel_worker.py dit ring [world]
    import sys

    found = spawn([{"model": sys.argv[1], "mode": sys.argv[2]}], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    print(json.dumps([{k: v for k, v in r.items() if "decisions" not in k} for r in found]))
