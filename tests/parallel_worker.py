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


def build(name: str, heads: int | None = None):
    """``(model, kwargs)``; ``heads``: the same config with that many attention heads (same head
    dimension; fresh weights of seed 0), e.g. 4 so that Ulysses divides 4 ranks."""
    from ditopt.small_models import build as build_small

    if heads is not None:
        model, kwargs = build(name)
        c = model.config
        width = {"num_attention_heads": heads}
        if c.get("cross_attention_dim") == c["num_attention_heads"] * c["attention_head_dim"]:  # PixArt: the width
            width["cross_attention_dim"] = heads * c["attention_head_dim"]
        torch.manual_seed(0)
        return type(model).from_config({**c, **width}).eval(), kwargs
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

    if job.get("stale"):  # tests/test_stale_kv.py
        return joint_stale_job(job) if job.get("joint") else stale_job(job)
    if job["model"].endswith("-digits"):
        return zoo_job(job)
    steps = job.get("steps", 1)
    model, kwargs = build(job["model"], job.get("heads"))
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


def zoo_job(job: dict) -> dict:
    """A zoo model (``ditopt.zoo``) sampled for ``steps`` steps with CFG (labels 3 and 7, seed 0),
    all-compute under sequence parallelism, against the plain model in this process: the largest
    difference of any transformer call's output (``max_diff``) and of the final samples. ``dtype``
    "float64": both run in float64 (inputs cast at each call). ``floor``: the plain fp32 model's own
    rounding error, the largest difference of its calls' outputs from the float64 model's on the
    same inputs (what any reordering of fp32 sums may move the output by)."""
    import copy

    import ditopt
    from ditopt import zoo

    m, steps = zoo.load(job["model"]), job.get("steps", 2)
    dtype = getattr(torch, job.get("dtype", "float32"))
    net = m.model if dtype == torch.float32 else copy.deepcopy(m.model).to(dtype)

    def recorded(fn, outs: list, inputs: list | None = None):
        def call(**kw):
            kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
            if inputs is not None:
                inputs.append(kw)
            out = fn(**kw)
            outs.append(out[0].clone())
            return (out[0].float(), *out[1:])
        return call

    reference: list = []
    inputs: list = []
    with torch.no_grad():
        single = m.sample([3, 7], seed=0, steps=steps, transformer=recorded(net, reference, inputs))
        wide = copy.deepcopy(m.model).double()
        floor = max(float((wide(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                    for k, v in kw.items()})[0] - out).abs().max()) for kw, out in zip(inputs, reference))
    result = {**job, "calls": len(reference), "floor": floor}
    try:
        parallel = ditopt.optimize(net, ditopt.presets.all_compute(steps=steps),
                                   parallel=ditopt.SequenceParallel(mode=job["mode"]), regional=False)
        with torch.no_grad():  # the single run's calls, on the same inputs
            outs = [parallel(**kw)[0] for kw in inputs]
            sent = dict(ditopt.stats(parallel).comm_bytes)
            x = m.sample([3, 7], seed=0, steps=steps, transformer=recorded(parallel, []))
    except Exception as exc:
        return {**result, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    # the samples differ by more than the calls: each step's input carries the difference of the steps before
    return {**result, "max_diff": max(float((a - b).abs().max()) for a, b in zip(outs, reference)),
            "sample_diff": float((x - single).abs().max()), "comm_bytes": sent}


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


# -- across ranks: decisions, divergence, failures (tests/test_parallel_failure.py) -------------
#
# ``spawn_each(scenario, arg)`` runs ``scenario(rank, world, arg)`` on every rank and returns every
# rank's result (None for a rank that died), without join=True's killing of the others when one dies.

# Captured whole, as these scenarios were written; under regional capture (the default) sequence
# parallelism inlines the block calls too, for it rewrites inside every block (ditopt/backend.py).
WHOLE = {"regional": False}

def _dit_inputs(rank: int):
    """The small DiT and inputs that differ per rank: rank r's hidden states are noise of seed r,
    scaled by 1 + 29 r (the first block's relative change is then much smaller on rank 1)."""
    model, kwargs = build("dit")
    g = torch.Generator().manual_seed(rank)
    return model, {**kwargs, "hidden_states": torch.randn(kwargs["hidden_states"].shape, generator=g) * (1 + 29 * rank)}


def adaptive_run(rank: int, world: int, job: dict) -> dict:
    """First-Block-Cache under sequence parallelism on per-rank data: the decisions taken, and the
    indicator's ``[mean |change|, mean |previous|]`` before (``local``) and after (``mean``) the
    average over the ranks (a spy on ``runtime.distributed.mean_over_ranks``)."""
    import ditopt
    from ditopt.runtime import distributed

    local, mean, real = [], [], distributed.mean_over_ranks

    def spy(x, *args):
        out = real(x, *args)
        local.append(x.tolist())
        mean.append(out.tolist())
        return out

    distributed.mean_over_ranks = spy
    try:
        model, kwargs = _dit_inputs(rank)
        spec = ditopt.SequenceParallel(mode=job["mode"], timeout=30, check=job.get("check", False))
        fast = ditopt.optimize(model, ditopt.presets.first_block_cache(job["threshold"], steps=job["steps"]),
                               parallel=spec, **WHOLE)
        _outputs(fast, kwargs, job["steps"])
    finally:
        distributed.mean_over_ranks = real
    stats = ditopt.stats(fast)
    return {"decisions": stats.decisions, "local": local, "mean": mean, "comm_bytes": stats.comm_bytes}


def diverged_run(rank: int, world: int, hows: list[str]) -> dict:
    """For each way in ``hows``, three FORA-2 steps with ``check=True`` where rank 1 runs another
    schedule: ``plan`` (it computes everything) or ``step`` (it is told step 2 where rank 0 is at
    step 1), or other latents (``inputs``); ``same``: no divergence. What each raised, after how many calls."""
    import ditopt
    from ditopt.small_models import timesteps

    found = {}
    for how in hows:
        model, kwargs = build("dit")
        plan = "all" if how == "plan" and rank == 1 else "fora2"
        fast = ditopt.optimize(model, plan_for(plan, 3), parallel=ditopt.SequenceParallel(mode="ring", timeout=30,
                                                                                          check=True), **WHOLE)
        found[how] = {"calls": 0}
        try:
            with torch.no_grad():
                for i, t in enumerate(timesteps(3, kwargs["timestep"])):
                    if how == "step" and rank == 1 and i == 1:
                        ditopt.set_step(fast, 2)
                    other = how == "inputs" and rank == 1  # latents drawn with another seed on rank 1
                    fast(**{**kwargs, "timestep": t, "hidden_states": kwargs["hidden_states"] + other})
                    found[how]["calls"] += 1
        except Exception as exc:
            found[how]["error"] = f"{type(exc).__name__}: {exc}"
        found[how]["comm_bytes"] = ditopt.stats(fast).comm_bytes
    return found


def failing_run(rank: int, world: int, job: dict) -> dict:
    """Ring attention over ``job["steps"]`` steps; at step 2 rank 1's attention kills its process
    (``how="kill"``) or raises and the process lives on (``how="raise"``). What the other rank
    raises, and how long after its step-2 call began."""
    import signal
    import time

    import ditopt
    from ditopt.runtime import distributed
    from ditopt.small_models import timesteps

    model, kwargs = build("dit")
    fast = ditopt.optimize(model, plan_for("all", job["steps"]),
                           parallel=ditopt.SequenceParallel(mode="ring", timeout=job["timeout"]), **WHOLE)
    real, now = distributed.attention_with_lse, {"step": -1}

    def failing(*args):
        if rank == 1 and now["step"] == 2:
            if job["how"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return real(*args)

    distributed.attention_with_lse = failing
    start = time.monotonic()
    try:
        with torch.no_grad():
            for i, t in enumerate(timesteps(job["steps"], kwargs["timestep"])):
                now["step"], start = i, time.monotonic()
                fast(**{**kwargs, "timestep": t})
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "step": now["step"], "elapsed": time.monotonic() - start}
    finally:
        distributed.attention_with_lse = real
    return {"step": now["step"]}


def in_turn(rank: int, world: int, scenarios: list) -> list[dict]:
    """Several ``(scenario, arg)`` in one spawn (their groups stay usable: each ends alike on every rank)."""
    return [globals()[name](rank, world, arg) for name, arg in scenarios]


def _each_worker(rank: int, world: int, init_file: str, scenario: str, arg, out_dir: str) -> None:
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = globals()[scenario](rank, world, arg)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    with open(os.path.join(out_dir, f"{rank}.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(out_dir, f"{rank}.tmp"), os.path.join(out_dir, f"{rank}.json"))
    # A rank that raised stays alive until every rank has reported or died (spawn_each says so):
    # its peers must find it silent, not gone.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not os.path.exists(os.path.join(out_dir, "done")):
        time.sleep(0.1)
    os._exit(0)  # no destroy_process_group: a peer may be gone


def spawn_each(scenario: str, arg, world: int = 2, deadline: float = 240.0) -> list[dict | None]:
    """``scenario(rank, world, arg)`` on ``world`` spawned ranks: every rank's result (None for a
    rank that wrote none: it died); ranks still running after ``deadline`` seconds are killed."""
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_each_worker, args=(world, os.path.join(tmp, "init"), scenario, arg, tmp),
                                 nprocs=world, join=False, start_method="spawn")
        end = time.monotonic() + deadline
        while time.monotonic() < end and not all(os.path.exists(os.path.join(tmp, f"{r}.json")) or not p.is_alive()
                                                 for r, p in enumerate(ctx.processes)):
            time.sleep(0.1)
        open(os.path.join(tmp, "done"), "w").close()
        for p in ctx.processes:
            p.join(max(0.0, min(10.0, end - time.monotonic())))
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
        found = []
        for r in range(world):
            path = os.path.join(tmp, f"{r}.json")
            found.append(json.load(open(path)) if os.path.exists(path) else None)
        return found


if __name__ == "__main__":  # python tests/parallel_worker.py dit ring [world]
    import sys

    found = spawn([{"model": sys.argv[1], "mode": sys.argv[2]}], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    print(json.dumps([{k: v for k, v in r.items() if "decisions" not in k} for r in found]))


# -- stale K/V (tests/test_stale_kv.py) --------------------------------------------------------

def build_dit(layers: int):
    """The small DiT (2 heads of 8, 16 tokens, batch 2) with ``layers`` blocks."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                              num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m.eval(), dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                          class_labels=torch.tensor([1, 2]))


def joint_stale_job(job: dict) -> dict:
    """``presets.distrifusion`` on a small config whose blocks use joint attention (image and text
    tokens in one attention): the un-elided run, held K/V, and int8 residuals against the linear
    forecast; per step the output difference to the un-elided run and the bytes sent by kind."""
    import ditopt
    from ditopt.small_models import timesteps

    steps = 4
    model, kwargs = build(job["model"])
    ts = timesteps(steps, kwargs["timestep"])
    sp = lambda **kw: ditopt.SequenceParallel(mode=job["mode"], **kw)  # noqa: E731
    variants = (("full", ditopt.presets.all_compute(steps=steps), sp()),
                ("held", ditopt.presets.distrifusion(steps=steps), sp()),
                ("int8", ditopt.presets.distrifusion(steps=steps), sp(stale_forecast="linear", stale_residual="int8")))
    runs = {}
    try:
        for name, plan, spec in variants:
            fast = ditopt.optimize(model, plan, parallel=spec)
            outs, sent = [], []
            with torch.no_grad():
                for t in ts:
                    before = dict(ditopt.stats(fast).comm_bytes)
                    out = fast(**{**kwargs, "timestep": t})
                    outs.append((out[0] if isinstance(out, (tuple, list)) else out.sample).clone())
                    after = ditopt.stats(fast).comm_bytes
                    sent.append({k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)})
            runs[name] = dict(outs=outs, bytes=sent, stale=sorted(s for s, d in ditopt.stats(fast).decisions.items()
                                                                 if "stale_kv" in d))
    except Exception as exc:
        return {**job, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    full = runs["full"]["outs"]
    return {**job, **{f"diff_{n}": [float((a - b).abs().max()) for a, b in zip(runs[n]["outs"], full)]
                      for n in ("held", "int8")},
            **{f"bytes_{n}": runs[n]["bytes"] for n in runs}, "stale_sites": runs["held"]["stale"],
            "stale_sites_int8": runs["int8"]["stale"]}


def hand_reference(model, kwargs: dict, ts: list, stale: set, world: int,
                   order: int = 0, residual: str | None = None) -> tuple[list[torch.Tensor], int]:
    """The model's outputs, in one process, where each self-attention call of a ``stale`` step
    attends, for the queries of rank r's tokens, with this step's K/V of rank r's tokens and the K/V
    of the other tokens from the step the call last ran fresh (``order`` 1 / 2: extrapolated in
    steps through the last two / three steps it ran fresh, as a line / parabola). ``residual``
    (``"fp16"`` / ``"int8"``): the other tokens' K/V are that forecast plus this step's miss of it
    rounded to fp16, or to int8 steps of ``amax / 127`` per row (the scale rounded to bf16); the
    result is what the next forecast extrapolates from. Also the number of patched calls."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    kept: dict[int, tuple] = {}
    state = {"step": 0, "call": 0, "patched": 0}

    def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        index, state["call"] = state["call"], state["call"] + 1
        n = q.shape[-2]
        if k.shape[-2] != n:  # cross-attention: local
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        assert attn_mask is None and not is_causal
        state["patched"] += 1
        if state["step"] not in stale:
            kept[index] = [*kept.get(index, [])[len(kept.get(index, [])) - order:], (state["step"], k.clone(), v.clone())]
            return real(q, k, v, scale=scale, **kw)
        points, t = kept[index][-(order + 1):], state["step"]
        k0 = v0 = 0
        for i, (si, ki, vi) in enumerate(points):  # Lagrange: sum_i prod_{j != i} (t - s_j) / (s_i - s_j) kv_i
            w = 1.0
            for j, (sj, _, _) in enumerate(points):
                w = w * (t - sj) / (si - sj) if j != i else w
            k0, v0 = k0 + w * ki, v0 + w * vi
        if residual:
            k0, v0 = k0 + _rounded(k - k0, residual), v0 + _rounded(v - v0, residual)
            kept[index] = [*kept[index][len(kept[index]) - order:], (state["step"], k0, v0)]
        m, rows = n // world, []
        for r in range(world):
            own = slice(r * m, (r + 1) * m)
            kr, vr = k0.clone(), v0.clone()
            kr[..., own, :], vr[..., own, :] = k[..., own, :], v[..., own, :]
            rows.append(real(q[..., own, :], kr, vr, scale=scale, **kw))
        return torch.cat(rows, dim=-2)

    return _sampled_with(patched, model, kwargs, ts, state), state["patched"]


def _rounded(r: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "fp16":
        return r.half().float()
    step = (r.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30).bfloat16().float()
    return torch.round(r / step).clamp(-127, 127) * step


def _sampled_with(patched, model, kwargs: dict, ts: list, state: dict) -> list[torch.Tensor]:
    """The model's output at each timestep with ``F.scaled_dot_product_attention`` replaced by
    ``patched`` (``state`` gets the step and resets the call count at each)."""
    import torch.nn.functional as F

    real, outs = F.scaled_dot_product_attention, []
    F.scaled_dot_product_attention = patched
    try:
        with torch.no_grad():
            for step, t in enumerate(ts):
                state["step"], state["call"] = step, 0
                outs.append(model(**{**kwargs, "timestep": t}).sample.clone())
    finally:
        F.scaled_dot_product_attention = real
    return outs


def hand_refresh_reference(model, kwargs: dict, ts: list, stale: set, world: int, hops_at) -> list[torch.Tensor]:
    """DiTango's selective refresh in one process, by the formula (float64): at a ``stale`` step
    each self-attention call gives rank r's query rows the merge, by log-sum-exp, of their fresh
    attention over rank r's K/V, over the K/V of rank ``r - h`` for each hop ``h`` in
    ``hops_at(step)``, and the partial (output, lse) kept from the step each other hop was last
    refreshed (every hop at the other steps)."""
    import torch.nn.functional as F

    real, kept, state = F.scaled_dot_product_attention, {}, {"step": 0, "call": 0}

    def partial(q, k, v, scale):
        s = (q.double() @ k.double().transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)

    def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        index, state["call"] = state["call"], state["call"] + 1
        n = q.shape[-2]
        if k.shape[-2] != n:  # cross-attention: local
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        m, rows = n // world, []
        fresh = range(1, world) if state["step"] not in stale else hops_at(state["step"])
        for r in range(world):
            block = lambda t, src: t[..., src * m:(src + 1) * m, :]  # noqa: E731
            parts = [partial(block(q, r), block(k, r), block(v, r), scale)]
            for h in range(1, world):
                if h in fresh:
                    kept[(index, r, h)] = partial(block(q, r), block(k, (r - h) % world), block(v, (r - h) % world), scale)
                parts.append(kept[(index, r, h)])
            lses = torch.stack([lse for _, lse in parts])
            weights = torch.exp(lses - torch.logsumexp(lses, 0))
            rows.append(sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts)).to(q.dtype))
        return torch.cat(rows, dim=-2)

    return _sampled_with(patched, model, kwargs, ts, state)


def stale_job(job: dict) -> dict:
    """DistriFusion's stale-every-other-step plan (``presets.distrifusion``) on the small DiT with
    ``layers`` blocks, against the hand reference and the un-elided parallel run: per step the
    output difference, the bytes sent by kind and the cache bytes held."""
    import ditopt
    from ditopt.small_models import timesteps

    steps, world = job.get("steps", 4), dist.get_world_size()
    model, kwargs = build_dit(job.get("layers", 6))
    ts = timesteps(steps, kwargs["timestep"])
    plan = job.get("plan_yaml")
    plan = ditopt.Plan.from_yaml(plan) if plan else ditopt.presets.distrifusion(steps=steps)
    stale = {s for r in plan.rules if r.action == "stale_kv" for s in r.step_list(steps)}
    order = {"linear": 1, "quadratic": 2}.get(job.get("forecast"), 0)
    reference, patched = hand_reference(model, kwargs, ts, stale, world, order=order, residual=job.get("residual"))
    spec = ditopt.SequenceParallel(mode=job["mode"], ring_refresh=job.get("refresh"),
                                   stale_forecast=job.get("forecast", "hold"),
                                   stale_residual=job.get("residual", "none"))
    if job.get("refresh") is not None:  # DiTango: the hand reference reuses partial attentions
        from ditopt.runtime.stale_kv import refresh_hops

        reference = hand_refresh_reference(model, kwargs, ts, stale, world,
                                           lambda step: refresh_hops(job["refresh"], step, world))
    result = {**job, "stale_steps": sorted(stale), "patched_calls": patched}
    try:
        runs = {}
        for name, p in (("stale", plan), ("full", ditopt.presets.all_compute(steps=steps))):
            fast = ditopt.optimize(model, p, parallel=spec, **job.get("options", {}))
            outs, bytes_per_step, cache = [], [], []
            with torch.no_grad():
                for t in ts:
                    before = dict(ditopt.stats(fast).comm_bytes)
                    outs.append(fast(**{**kwargs, "timestep": t}).sample.clone())
                    after = ditopt.stats(fast).comm_bytes
                    bytes_per_step.append({k: after[k] - before.get(k, 0) for k in after})
                    cache.append(ditopt.stats(fast).cache_bytes)
            runs[name] = dict(outs=outs, bytes=bytes_per_step, cache=cache, total=dict(ditopt.stats(fast).comm_bytes),
                              decisions=ditopt.stats(fast).decisions)
    except Exception as exc:
        return {**result, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    stale_run, full = runs["stale"], runs["full"]
    return {**result,
            "diff_hand": [float((a - b).abs().max()) for a, b in zip(stale_run["outs"], reference)],
            "diff_full": [float((a - b).abs().max()) for a, b in zip(stale_run["outs"], full["outs"])],
            "bytes": stale_run["bytes"], "full_bytes": full["bytes"], "cache_bytes": stale_run["cache"],
            "total": stale_run["total"], "full_total": full["total"],
            "decisions": {s: d for s, d in stale_run["decisions"].items() if s.endswith("attn1")}}
