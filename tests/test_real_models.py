"""ditopt on real diffusers transformer classes (built from config at small sizes)."""

import pytest
import torch

import ditopt
from real_models import MODELS, build, timesteps


def run_steps(model, kwargs, steps, calls_per_step=1):
    outs = []
    with torch.no_grad():
        for t in timesteps(steps, kwargs["timestep"]):
            for _ in range(calls_per_step):
                outs.append(model(**{**kwargs, "timestep": t}, return_dict=False)[0])
    return outs


@pytest.mark.parametrize("name", list(MODELS))
def test_all_compute_plan_is_bit_identical(name):
    model, kwargs = build(name)
    reference = run_steps(model, kwargs, 3)
    fast = ditopt.optimize(model, ditopt.presets.all_compute(steps=3))
    got = run_steps(fast, kwargs, 3)
    for r, g in zip(reference, got):
        assert torch.equal(r, g)
    decisions = ditopt.stats(fast).decisions
    assert decisions and all(row == ["compute"] * 3 for row in decisions.values())


EXPECTED_SITES = {
    "dit": [("transformer_blocks.0", "block", None), ("transformer_blocks.0.attn1", "attention", "self"),
            ("transformer_blocks.0.ff", "feedforward", None), ("stack", "stack", None)],
    "pixart": [("transformer_blocks.1.attn2", "attention", "cross"), ("transformer_blocks.1.ff", "feedforward", None)],
    "cogvideox": [("transformer_blocks.1", "block", None), ("transformer_blocks.1.attn1", "attention", "joint")],
    "wan": [("blocks.1", "block", None), ("blocks.1.attn1", "attention", "self"),
            ("blocks.1.attn2", "attention", "cross"), ("blocks.1.ffn", "feedforward", None)],
    "hunyuan": [("transformer_blocks.0", "block", None), ("single_transformer_blocks.1", "block", None),
                ("transformer_blocks.0.ff_context", "feedforward", None)],
}


@pytest.mark.parametrize("name", list(MODELS))
def test_sites_are_found_from_the_graph(name):
    model, kwargs = build(name)
    table = ditopt.sites(model, **kwargs)
    for site_name, kind, attention in EXPECTED_SITES[name]:
        site = table[site_name]
        assert site.kind == kind
        if attention:
            assert site.attention == attention
    blocks = [s for s in table if s.kind == "block" and s.parent == "stack"]
    assert all(s.live_outs and s.skippable for s in blocks)
    # dual-stream blocks have two live-outs (the last block's text stream is dead)
    if name in ("cogvideox", "hunyuan"):
        assert len(table["transformer_blocks.0"].live_outs) == 2
    else:
        assert all(len(s.live_outs) == 1 for s in blocks)
    assert table["stack"].parent == "output" and table["output"].parent is None
    assert table["output"].kind == "output" and set(table["stack"].nodes) < set(table["output"].nodes)


class HookReference:
    """FORA done by hand with forward hooks: cache each attention / feed-forward output at a
    computing step, return it at a reusing step (independent of ditopt's graph rewrite)."""

    def __init__(self, model, module_names, reuse_steps):
        self.cache, self.step, self.reuse_steps = {}, -1, set(reuse_steps)
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in module_names]

    def _hook(self, name):
        def hook(module, args, output):
            if self.step in self.reuse_steps:
                return self.cache[name]
            self.cache[name] = output
            return output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def assert_matches_hooks(model, kwargs, steps, sites, reuse_steps, got):
    """``got`` equals the model run with :class:`HookReference` reusing ``sites`` at ``reuse_steps``."""
    ref = HookReference(model, sites, reuse_steps)
    try:
        expected = []
        with torch.no_grad():
            for i, t in enumerate(timesteps(steps, kwargs["timestep"])):
                ref.step = i
                expected.append(model(**{**kwargs, "timestep": t}, return_dict=False)[0])
    finally:
        ref.remove()
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _legacy_attention(model):
    from diffusers.models.attention_processor import AttnProcessor

    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())  # baddbmm, softmax, a cast back, bmm: no SDPA
    return model


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_hand_written_attention_gives_the_same_sites_and_fora_matches_hooks(name):
    """diffusers' AttnProcessor computes attention by hand and casts the softmax back to the
    input's dtype before the bmm: the cast hid the softmax from the attention finder, so no site
    at all was found (every plan failed with "matches no site"), and the key of its cross
    attention was not read from the score matmul (PixArt's attn2 came out "joint")."""
    model, kwargs = build(name)
    expected = [(s.name, s.kind, s.attention) for s in ditopt.sites(model, **kwargs)]
    _legacy_attention(model)
    assert [(s.name, s.kind, s.attention) for s in ditopt.sites(model, **kwargs)] == expected
    steps = 4
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=steps))
    got = run_steps(fast, kwargs, steps)
    layer_sites = [n for n, kind, _ in expected if kind in ("attention", "feedforward")]
    decisions = ditopt.stats(fast).decisions
    assert all(decisions[site] == ["compute", "reuse"] * 2 for site in layer_sites)
    assert_matches_hooks(model, kwargs, steps, layer_sites, [1, 3], got)


def test_linear_attention_is_an_attention_site_and_fora_reuses_it():
    """Sana's ReLU linear attention ((v k^T) q: two matmuls of activations, no softmax) was no
    attention site (its module came out a feed-forward), so attention-level plans never reused it."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                  timestep=torch.tensor([500]))
    table = ditopt.sites(model, **kwargs)
    assert (table["transformer_blocks.0.attn1"].kind, table["transformer_blocks.0.attn1"].attention) == \
        ("attention", "self")
    assert table["transformer_blocks.0.attn2"].attention == "cross"
    steps = 4
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=steps))
    got = run_steps(fast, kwargs, steps)
    layer_sites = [s.name for s in table if s.kind in ("attention", "feedforward")]
    assert ditopt.stats(fast).decisions["transformer_blocks.1.attn1"] == ["compute", "reuse"] * 2
    assert_matches_hooks(model, kwargs, steps, layer_sites, [1, 3], got)


@pytest.mark.parametrize("name", ["wan", "dit"])
def test_fora_matches_hand_written_hooks(name):
    steps = 10
    model, kwargs = build(name)
    plan = ditopt.presets.fora(interval=2, steps=steps)
    fast = ditopt.optimize(model, plan)
    got = run_steps(fast, kwargs, steps)
    decisions = ditopt.stats(fast).decisions
    table = ditopt.sites(model, **kwargs)
    layer_sites = [s.name for s in table if s.kind in ("attention", "feedforward")]
    reuse_steps = [s for s in range(steps) if s % 2 == 1]
    for site in layer_sites:
        assert [i for i, d in enumerate(decisions[site]) if d == "reuse"] == reuse_steps, site
    for site in (s.name for s in table if s.kind == "block"):
        assert decisions[site] == ["compute"] * steps

    assert_matches_hooks(model, kwargs, steps, layer_sites, reuse_steps, got)


def test_block_reuse_and_cfg_branches_on_wan():
    """Two calls per step (cond, uncond) keep separate caches; a reused block skips its
    attention (recorded as skipped)."""
    model, kwargs = build("wan")
    plan = ditopt.presets.fora(interval=2, steps=4, level="block")
    fast = ditopt.optimize(model, plan)
    uncond = {**kwargs, "encoder_hidden_states": torch.zeros_like(kwargs["encoder_hidden_states"])}
    cache = {}
    with torch.no_grad():
        for i, t in enumerate(timesteps(4, kwargs["timestep"])):
            for branch, kw in enumerate((kwargs, uncond)):
                got = fast(**{**kw, "timestep": t}, return_dict=False)[0]
                # reference: block residuals by hand, per branch
                residuals = cache.setdefault(branch, {})
                hooks = []
                for b, block in enumerate(model.blocks):
                    def hook(module, args, kw_args, output, b=b):
                        x = kw_args.get("hidden_states", args[0] if args else None)
                        if i % 2 == 1:
                            return x + residuals[b]
                        residuals[b] = output - x
                        return output
                    hooks.append(block.register_forward_hook(hook, with_kwargs=True))
                try:
                    expected = model(**{**kw, "timestep": t}, return_dict=False)[0]
                finally:
                    for h in hooks:
                        h.remove()
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    d = ditopt.stats(fast).decisions
    assert d["blocks.0"] == ["compute", "compute", "reuse_residual", "reuse_residual"] * 2
    assert d["blocks.0.attn1"] == ["compute", "compute", "skipped", "skipped"] * 2


def test_no_recompiles_across_two_generations_eager_path():
    model, kwargs = build("dit")
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=10))
    run_steps(fast, kwargs, 10)
    first = ditopt.stats(fast).decisions
    run_steps(fast, kwargs, 10)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert ditopt.stats(fast).generation == 1
    assert ditopt.stats(fast).decisions == first


def test_new_shape_compiles_a_new_graph_with_its_own_cache():
    model, kwargs = build("dit")
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4, level="block"))
    run_steps(fast, kwargs, 2)
    bigger = {**kwargs, "hidden_states": torch.randn(2, 4, 16, 16)}
    with torch.no_grad():
        expected = model(**{**bigger, "timestep": torch.tensor([999, 999])}, return_dict=False)[0]
        got = fast(**{**bigger, "timestep": torch.tensor([999, 999])}, return_dict=False)[0]
    assert torch.equal(got, expected)  # step 0 of a new generation computes
    assert ditopt.stats(fast).graphs == 2


def test_optimized_model_still_looks_like_the_model():
    model, _ = build("dit")
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
    assert fast.config == model.config
    assert fast.dtype == model.dtype and fast.device == model.device
    assert fast.transformer_blocks is model.transformer_blocks


def test_reset_and_explicit_step_override():
    model, kwargs = build("dit")
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4, level="block"))
    run_steps(fast, kwargs, 2)
    assert ditopt.stats(fast).cache_bytes > 0
    ditopt.reset(fast)
    assert ditopt.stats(fast).cache_bytes == 0
    with torch.no_grad():
        ditopt.set_step(fast, 0)
        fast(**kwargs, return_dict=False)
        ditopt.set_step(fast, 1)
        fast(**kwargs, return_dict=False)  # same timestep, but told it is step 1
    assert ditopt.stats(fast).decisions["transformer_blocks.1"] == ["compute", "reuse_residual"]



@pytest.mark.parametrize("name", list(MODELS))
def test_forecasting_the_output_site_extrapolates_the_models_output(name):
    """On every class, a plan on the ``output`` site skips the whole network at a predict step and
    returns the line (order 1) or parabola (order 2) through the outputs of earlier steps."""
    model, kwargs = build(name)
    full = run_steps(model, kwargs, 5)
    plan = ditopt.Plan(steps=5, rules=[ditopt.Rule(sites=("output",), action="predict", steps=(2,), order=1),
                                       ditopt.Rule(sites=("output",), action="predict", steps=(4,), order=2)])
    fast = ditopt.optimize(model, plan)
    got = run_steps(fast, kwargs, 5)
    for i in (0, 1, 3):
        assert torch.equal(got[i], full[i])
    torch.testing.assert_close(got[2], 2 * full[1] - full[0])
    # through steps 0, 1, 3 (computed): Newton's parabola evaluated at step 4
    y0, y1, y3 = full[0], full[1], full[3]
    d01, d13 = y1 - y0, (y3 - y1) / 2
    torch.testing.assert_close(got[4], y3 + d13 * 1 + (d13 - d01) / 3 * (4 - 3) * (4 - 1))
    decisions = ditopt.stats(fast).decisions
    assert decisions["output"] == ["compute", "compute", "predict", "compute", "predict"]
    blocks = [s for s in decisions if s.startswith(("blocks.", "transformer_blocks."))]
    assert blocks and all(decisions[b][2] == "skipped" and decisions[b][4] == "skipped" for b in blocks)


def test_fora_block_level_on_wan_caches_one_residual_per_cfg_branch():
    """coalesce_regions on a real model: the stack's blocks reuse at the same steps, so they share
    one cached residual per CFG branch; outputs equal the per-block plan's (``coalesce=False``)."""
    model, kwargs = build("wan")
    plan = ditopt.presets.fora(interval=2, steps=4, level="block")
    together, apart = ditopt.optimize(model, plan), ditopt.optimize(model, plan, coalesce=False)
    texts = [kwargs["encoder_hidden_states"], torch.randn_like(kwargs["encoder_hidden_states"])]
    with torch.no_grad():
        for t in timesteps(4, kwargs["timestep"]):
            for text in texts:  # CFG as two calls
                call = {**kwargs, "timestep": t, "encoder_hidden_states": text}
                torch.testing.assert_close(together(**call, return_dict=False)[0], apart(**call, return_dict=False)[0],
                                           rtol=1e-5, atol=1e-5)
    blocks = len(model.blocks)
    frames, height, width = kwargs["hidden_states"].shape[2:]
    residual = frames * (height // 2) * (width // 2) * 32 * 4  # tokens (patch 1x2x2) x hidden 32 x float32
    assert ditopt.stats(together).cache_bytes == 2 * residual  # one residual per branch, not per block
    assert ditopt.stats(apart).cache_bytes == 2 * blocks * residual
    assert ditopt.stats(together).decisions == ditopt.stats(apart).decisions
