"""Per-axis windows (issue 15, item 1): ``window: [frames, height, width]`` (or ``[height, width]``,
or a mapping) on the token grid the patch embedding makes, read from the graph.

The plan field; the kernel against its dense masked reference, full attention where the window
covers the grid, and FLOPs counted proportional to the window volume; on the small DiT, PixArt,
Wan, CogVideoX and HunyuanVideo configs: the grid found in the graph, and the rewritten model
against a hand-written reference that windows SDPA in the eager model with the dense mask over
the grid written here from the model's own shapes and config (not read from a graph).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from ditopt import PlanError
from ditopt.flops import CPU_KERNELS, attention_flops, window_attention_flops
from ditopt.passes.insert_window_branches import sdpa_calls
from ditopt.passes.window_grid import find_token_grids
from ditopt.runtime.window_attention import GridWindow, grid_window_attention, grid_window_mask
from ditopt.small_models import build, timesteps as model_timesteps

STEPS = 4


def plan_of(window, attention="self", sites="*", steps=(1, 2)) -> ditopt.Plan:
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [
        {"sites": sites, "kind": "attention", "attention": attention, "steps": list(steps), "action": "window",
         "window": window}]})


# -- the plan field ---------------------------------------------------------------------------------

def test_per_axis_windows_read_write_and_resample():
    plan = ditopt.Plan.from_yaml("""
version: 1
steps: 8
rules:
  - sites: "*"
    kind: attention
    attention: joint
    steps: "2:8"
    action: window
    window: {frames: 2, height: 4, width: 8}
""")
    window = plan.rules[0].window
    assert isinstance(window, GridWindow) and window.sizes == (2, 4, 8) and int(window) == 64
    assert "window: [2, 4, 8]" in plan.to_yaml()
    assert ditopt.Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.resample(16).rules[0].window == window
    assert plan_of([4, 8]).rules[0].window == plan_of({"height": 4, "width": 8}).rules[0].window != 32


@pytest.mark.parametrize("window,message", [
    ([2, 0, 4], "sizes of at least 1 token"),
    ([2, True, 4], "sizes of at least 1 token"),
    ([2, 4, 4, 4], r"list is \[frames, height, width\] or \[height, width\], got 4 sizes"),
    ([8], "got 1 sizes"),
    ({"frames": 2, "depth": 4, "width": 4}, "mapping names height and width"),
    ({"frames": 2, "width": 4}, "mapping names height and width"),
    ([4096, 4096, 4096], "product is at most"),
    ({"height": "8", "width": 8}, "sizes of at least 1 token"),
])
def test_malformed_per_axis_windows_are_named(window, message):
    with pytest.raises(PlanError, match=message) as err:
        plan_of(window)
    assert err.value.rule == 0


# -- the kernel -------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, window, before, after", [
    ((3, 4, 4), (2, 2, 3), 0, 0), ((5, 6, 7), (3, 4, 4), 6, 0), ((4, 6), (3, 5), 0, 4), ((3, 4, 4), (2, 3, 2), 4, 6),
    ((8, 9), (1, 1), 0, 0), ((2, 3, 5), (9, 2, 9), 2, 1),
])
def test_equals_sdpa_with_its_dense_mask(grid, window, before, after):
    torch.manual_seed(len(grid) + before)
    tokens = before + math.prod(grid) + after
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    dense = grid_window_mask(tokens, window, grid, before)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(grid_window_attention(q, k, v, window, grid, before), ref, atol=1e-5, rtol=1e-5)
    keys = torch.rand(2, 1, 1, tokens) > 0.3  # a key-padding mask (HunyuanVideo's text mask) is kept
    keys[..., before] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense & keys)
    torch.testing.assert_close(grid_window_attention(q, k, v, window, grid, before, attn_mask=keys), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile", [(2, 4, 4), (1, 2, 8), (4, 8, 8)])
def test_a_query_tile_given_equals_its_dense_mask(tile):
    grid, window = (4, 8, 16), (4, 8, 8)
    q, k, v = (torch.randn(1, 2, 3 + math.prod(grid), 8) for _ in range(3))
    dense = grid_window_mask(q.shape[-2], window, grid, 3, tile=tile)
    assert (dense[3:, 3:].sum(1) == math.prod(window)).all()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(grid_window_attention(q, k, v, window, grid, 3, tile=tile), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a query tile divides the grid and fits in the window"):
        grid_window_attention(q, k, v, window, grid, 3, tile=(3, 8, 8))


def test_the_mask_is_a_box_around_each_query_inside_the_grid():
    grid, window = (6, 8, 10), (3, 4, 5)
    mask = grid_window_mask(math.prod(grid), window, grid)
    assert (mask.sum(1) == math.prod(window)).all()
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    near = ((coords[:, None] - coords[None]).abs() <= torch.tensor([0, 1, 1])).all(-1)  # ±(w - tile) // 2 per axis
    assert mask[near].all()


def test_a_window_covering_the_grid_is_exactly_full_attention():
    q, k, v = (torch.randn(1, 2, 6 + 48, 8) for _ in range(3))
    for window in [(3, 4, 4), (8, 8, 8)]:
        assert torch.equal(grid_window_attention(q, k, v, window, (3, 4, 4), 6), F.scaled_dot_product_attention(q, k, v))
    assert grid_window_mask(54, (3, 4, 4), (3, 4, 4), 6).all()


def test_it_costs_tokens_times_the_window_volume():
    """16 x 32 x 32 tokens: FLOPs counted (FlopCounterMode) proportional to the window volume within
    10%, and equal to the formula the cost model uses."""
    grid, heads, dim = (16, 32, 32), 1, 8
    tokens = math.prod(grid)
    q, k, v = (torch.randn(1, heads, tokens, dim) for _ in range(3))
    full = attention_flops(q.shape, k.shape, v.shape)
    for window in [(2, 4, 4), (4, 8, 8), (8, 8, 16)]:
        with FlopCounterMode(display=False, custom_mapping=CPU_KERNELS) as counter:
            grid_window_attention(q, k, v, window, grid)
        counted = counter.get_total_flops()
        assert counted == window_attention_flops(q.shape, v.shape, GridWindow(window), grid=grid)
        assert abs(counted / (full * math.prod(window) / tokens) - 1) < 0.1, (window, counted)


def test_bad_grids_are_named():
    q = torch.randn(1, 1, 20, 4)
    with pytest.raises(ValueError, match="does not fit"):
        grid_window_attention(q, q, q, (2, 2), (4, 4), offset=5)
    with pytest.raises(ValueError, match="key mask"):
        grid_window_attention(q, q, q, (2, 2), (4, 5), attn_mask=torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="the window has 3 axes, the grid 2"):
        grid_window_attention(q, q, q, (2, 2, 2), (4, 5))


# -- the grid, read from the graph of each small model -------------------------------------------------

def expected_grid(name: str, model, kwargs) -> tuple[tuple[int, ...], int, int]:
    """(grid, text tokens before it, text tokens after it) from the model's inputs and config: the
    reference the graph walk is checked against."""
    x, cfg = kwargs["hidden_states"], model.config
    p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[-1]
    text = kwargs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in kwargs else 0
    if x.ndim == 4:
        return (x.shape[2] // p, x.shape[3] // p), 0, 0
    if name == "cogvideox":  # [B, F, C, H, W], text joined in front
        return (x.shape[1], x.shape[3] // p, x.shape[4] // p), text, 0
    pt = cfg.patch_size[0] if name == "wan" else cfg.patch_size_t
    return (x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p), 0, text if name == "hunyuan" else 0


WINDOWED = {"dit": "self", "pixart": "self", "wan": "self", "cogvideox": "joint", "hunyuan": "joint"}


@pytest.mark.parametrize("name", list(WINDOWED))
def test_the_grid_is_read_from_the_graph(name):
    from ditopt.capture import capture

    model, kwargs = build(name)
    graph = capture(model, **kwargs).gm.graph
    sites = ditopt.find_sites(graph)
    grid, before, after = expected_grid(name, model, kwargs)
    windowed = [s for s in sites if s.kind == "attention" and s.attention == WINDOWED[name]]
    windowed = [s for s in windowed if "refiner" not in s.name]  # HunyuanVideo's text refiner: no grid (below)
    found = find_token_grids(graph, sites, {s.name: sdpa_calls(graph, s.nodes) for s in windowed})
    assert len(found) == len(windowed) >= 2
    for g in found.values():
        assert (g.sizes, g.offset, g.tokens) == (grid, before, before + math.prod(grid) + after)


@contextlib.contextmanager
def hand_grid_window(window, grid, before, tokens, step, window_steps, residuals: dict):
    """Every SDPA call over ``tokens`` queries and keys windowed by hand at ``window_steps`` (the
    dense grid mask, with the call's own key mask) plus the residual of the last full step."""
    real = F.scaled_dot_product_attention
    calls = itertools.count()

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        full = real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
        if q.shape != k.shape or q.shape[-2] != tokens:
            return full
        i = next(calls)
        dense = grid_window_mask(tokens, window, grid, before)
        dense = dense if attn_mask is None else dense & attn_mask
        windowed = real(q, k, v, attn_mask=dense, scale=scale)
        if step in window_steps:
            return windowed + residuals[i]
        residuals[i] = full - windowed
        return full

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@pytest.mark.parametrize("name", list(WINDOWED))
def test_small_models_equal_the_hand_written_residual_sharing(name):
    model, kwargs = build(name)
    grid, before, after = expected_grid(name, model, kwargs)
    window = [max(1, g // 2) for g in grid]
    window_steps = (1, 2)
    fast = ditopt.optimize(model, plan_of(window, WINDOWED[name], steps=window_steps))
    tokens = before + math.prod(grid) + after
    residuals = {}
    with torch.no_grad():
        for step, t in enumerate(model_timesteps(STEPS, kwargs["timestep"])):
            inputs = {**kwargs, "timestep": t}
            out = fast(**inputs, return_dict=False)[0]
            with hand_grid_window(window, grid, before, tokens, step, window_steps, residuals):
                ref = model(**inputs, return_dict=False)[0]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            if step in window_steps:
                assert (out - model(**inputs, return_dict=False)[0]).abs().max() > 1e-5
    decisions = ditopt.stats(fast).decisions
    windowed = [s for s, row in decisions.items() if row == ["compute", "window", "window", "compute"]]
    assert len(windowed) == len(residuals) >= 2  # every windowed site, and the reference windowed as many calls


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_small_models_with_a_window_covering_the_grid_equal_the_model(name):
    model, kwargs = build(name)
    grid, _, _ = expected_grid(name, model, kwargs)
    fast = ditopt.optimize(model, plan_of(list(grid), WINDOWED[name]))
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            inputs = {**kwargs, "timestep": t}
            assert torch.equal(fast(**inputs, return_dict=False)[0], model(**inputs, return_dict=False)[0])


def test_a_site_without_a_grid_is_refused_naming_it_and_what_is_missing():
    """HunyuanVideo's text refiner attends over text tokens only: no grid there (the pass refuses
    it before looking, for its per-query text mask; the grid search alone is asked here)."""
    from ditopt.capture import capture

    model, kwargs = build("hunyuan")
    graph = capture(model, **kwargs).gm.graph
    sites = ditopt.find_sites(graph)
    refiner = next(s for s in sites if s.kind == "attention" and "refiner" in s.name)
    with pytest.raises(PlanError, match="needs the token grid.*this attention is outside the stack") as err:
        find_token_grids(graph, sites, {refiner.name: sdpa_calls(graph, refiner.nodes)})
    assert err.value.site == refiner.name
    fast = ditopt.optimize(model, plan_of([2, 2, 2], "self"))
    with pytest.raises(PlanError, match="refiner_blocks.0.attn.*attn_mask"), torch.no_grad():
        fast(**kwargs)


def test_a_window_of_the_wrong_rank_is_refused_naming_the_site():
    model, kwargs = build("wan")
    fast = ditopt.optimize(model, plan_of([2, 2], sites="blocks.1.attn1"))
    with pytest.raises(PlanError, match=r"has 2 axes; the token grid .* has 3: \[3, 4, 4\] \(frames, height, width\)"
                       ) as err, torch.no_grad():
        fast(**kwargs)
    assert err.value.site == "blocks.1.attn1"
    # the right rank on that one site: block 0 stays a kept block call, which the token flow passes
    fast = ditopt.optimize(model, plan_of([2, 2, 2], sites="blocks.1.attn1"))
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            fast(**{**kwargs, "timestep": t})
    assert ditopt.stats(fast).decisions["blocks.1.attn1"] == ["compute", "window", "window", "compute"]
    assert ditopt.stats(fast).decisions["blocks.0.attn1"] == ["compute"] * STEPS


def test_cross_attention_refuses_a_per_axis_window():
    model, kwargs = build("pixart")
    sites = ditopt.sites(model, **kwargs)
    with pytest.raises(PlanError, match="is cross attention"):
        plan_of([2, 2], "cross").compile(sites)
    from ditopt.capture import capture

    graph = capture(model, **kwargs).gm.graph
    sites = ditopt.find_sites(graph)
    cross = next(s for s in sites if s.kind == "attention" and s.attention == "cross")
    with pytest.raises(PlanError, match="enter the stack at .*, but this attention's queries and keys are not them"):
        find_token_grids(graph, sites, {cross.name: sdpa_calls(graph, cross.nodes)})


def test_the_cost_model_counts_a_per_axis_window_as_executed():
    """Wan at 5 x 8 x 6 tokens, window 2 x 4 x 4 (32 of 240 tokens): the compute fraction the cost
    model predicts equals the FLOPs the rewritten graph executes (FlopCounterMode), a window step's
    attention counted as tokens x window volume (the grid is the whole sequence here)."""
    from test_cost import STEPS as COST_STEPS, executed_flops_per_call, module_flops, resized, run_generation

    model, kwargs = build("wan")
    cost = ditopt.cost_model(model, **kwargs)
    size = resized(kwargs, batch=1, frames=5, height=16, width=12)
    plan = ditopt.Plan.from_dict({"version": 1, "steps": COST_STEPS, "rules": [
        {"sites": "*", "kind": "attention", "attention": "self", "steps": [1, 2, 4], "action": "window",
         "window": [2, 4, 4]}]})
    torch._dynamo.reset()
    fast = ditopt.optimize(model, plan)
    run_generation(fast, size)
    calls = executed_flops_per_call(fast, size)
    ref = module_flops(model, size)
    blocks = sum(ref[b] for b in cost.block_sites())
    measured = (sum(calls) - len(calls) * (ref["Global"] - blocks)) / (len(calls) * blocks)
    assert ditopt.stats(fast).decisions["blocks.0.attn1"][:3] == ["compute", "window", "window"]
    predicted = cost.predict(plan, **cost.dims_for(**size)).compute_fraction
    assert predicted == pytest.approx(measured, rel=1e-9) and measured < 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit", "hunyuan"])
def test_a_per_axis_window_compiles_under_inductor_like_eager(name):
    model, kwargs = build(name)
    grid, _, _ = expected_grid(name, model, kwargs)
    plan = plan_of([max(1, g // 2) for g in grid], WINDOWED[name])
    compiled = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
    fast = ditopt.optimize(model, plan)
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            inputs = {**kwargs, "timestep": t}
            torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], fast(**inputs, return_dict=False)[0],
                                       atol=1e-4, rtol=1e-4)
    assert ditopt.stats(compiled).decisions == ditopt.stats(fast).decisions
    windowed = [s for s, row in ditopt.stats(compiled).decisions.items() if row == ["compute", "window", "window",
                                                                                 "compute"]]
    assert len(windowed) >= 2


def test_the_docstring_examples_run():
    import doctest

    import ditopt.passes.window_grid as window_grid
    import ditopt.plan_fields as plan_fields
    import ditopt.runtime.window_attention as window_attention

    for module in (window_attention, window_grid, plan_fields):
        result = doctest.testmod(module)
        assert result.attempted and not result.failed, module.__name__
