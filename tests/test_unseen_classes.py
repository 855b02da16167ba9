"""The whole workflow on diffusers classes that no issue names and nothing in ditopt was written
for: SD3 (joint attention over image and text tokens), Flux (a joint stack followed by a
single-stream stack, timesteps in [0, 1]), Mochi (its text mask selects tokens: a size known
only at run time) and Z-Image (lists of images in, ``t`` counting up from 0 to 1). Built tiny
from their configs, random weights.

Sites, plans and caches must come from the graph alone: all-compute is bit-identical to the
model, the sites are found, and profile -> plan -> optimize -> tune runs on a sampling loop.
"""

import pytest
import torch

import ditopt


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 32),
                  pooled_projections=torch.randn(1, 16))
    return model, kwargs, 1000.0, ("transformer_blocks",)


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    kwargs = dict(hidden_states=torch.randn(1, h * w, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                  pooled_projections=torch.randn(1, 16), img_ids=img_ids.reshape(h * w, 3), txt_ids=torch.zeros(6, 3))
    return model, kwargs, 1.0, ("transformer_blocks", "single_transformer_blocks")


def _mochi():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                    max_sequence_length=16).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 2, 4, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                  encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))
    return model, kwargs, 1000.0, ("transformer_blocks",)


CLASSES = {"sd3": _sd3, "flux": _flux, "mochi": _mochi}


def _timesteps(n: int, scale: float) -> list[torch.Tensor]:
    return [torch.tensor([scale * (1 - i / n)]) for i in range(n)]


@pytest.mark.parametrize("name", list(CLASSES))
def test_all_compute_is_bit_identical_and_sites_come_from_the_graph(name):
    model, kwargs, scale, stacks = CLASSES[name]()
    fast = ditopt.optimize(model, ditopt.presets.all_compute(steps=4))
    with torch.no_grad():
        for t in _timesteps(4, scale):
            ref = model(timestep=t, **kwargs, return_dict=False)[0]
            assert torch.equal(fast(timestep=t, **kwargs, return_dict=False)[0], ref)
    sites = ditopt.stats(fast).decisions
    assert {"stack", "output"} <= set(sites)
    for stack in stacks:  # every block of every stack is a site
        assert {f"{stack}.0", f"{stack}.1"} <= set(sites), stack
    assert any(".attn" in s for s in sites)


@pytest.mark.parametrize("name", list(CLASSES))
def test_profile_plan_and_tune_on_a_sampling_loop(name):
    model, kwargs, scale, _ = CLASSES[name]()
    x0 = kwargs.pop("hidden_states")

    def run(transformer):
        x = x0.clone()
        with torch.no_grad():
            for t in _timesteps(6, scale):
                x = x - 0.1 * transformer(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        return x

    rmap = ditopt.profile(model, run, steps=6, progress=False)
    assert rmap.stack and "output" in rmap.sites
    plan = ditopt.plan_from_profile(rmap, budget=0.5)
    fast = ditopt.optimize(model, plan)
    out = run(fast)
    decisions = ditopt.stats(fast).decisions
    computed = sum(a == "compute" for a in decisions[rmap.stack[0]])
    assert computed <= 3 and torch.isfinite(out).all()
    tuned = ditopt.tune(model, run, rmap, budget=0.5, progress=False)
    assert tuned.best.compute_fraction <= 0.5 and tuned.best.psnr >= max(c.psnr for c in tuned.candidates)


def _zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
                                     axes_lens=[256, 32, 32]).eval()
    return model  # never called: its first call builds a rotary table under a torch.device context


def test_a_sampler_counting_up_reuses_and_profiles():
    """Z-Image's pipeline passes ``t`` rising from 0 to 1, by position, to a ``forward`` wrapped in
    a ``(*args, **kwargs)`` decorator, and its first call builds state under a context dynamo
    cannot trace: FORA reuses from the third step (it used to read every call as a new
    generation and reuse nothing), and profiling counts the steps."""
    model = _zimage()
    x, caps = [torch.randn(4, 1, 8, 8)], [torch.randn(6, 16)]
    ts = [torch.tensor([i / 4]) for i in range(4)]
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4), timestep_arg="t")
    with torch.no_grad():
        outs = [fast(x, t, caps, return_dict=False)[0][0] for t in ts]
        own = [model(x, t, caps, return_dict=False)[0][0] for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(outs[:3], own[:3]))
    assert not torch.equal(outs[3], own[3])  # reused step 2
    assert "reuse" in {a for row in ditopt.stats(fast).decisions.values() for a in row}

    def run(transformer):
        with torch.no_grad():
            for t in ts:
                transformer(x, t, caps, return_dict=False)

    rmap = ditopt.profile(model, run, steps=4, progress=False, timestep_arg="t")
    assert rmap.steps == 4 and rmap.stack


def test_compiled_with_the_timestep_by_position_to_a_wrapped_forward():
    """Under ``torch.compile(backend="ditopt")`` the pipeline's positional ``t`` is found by its
    position in the wrapped ``forward``'s signature; the outputs equal ``ditopt.optimize``'s."""
    model = _zimage()
    x, caps = [torch.randn(4, 1, 8, 8)], [torch.randn(6, 16)]
    plan = ditopt.presets.fora(interval=2, steps=4)
    with torch.no_grad():
        model(x, torch.tensor([0.0]), caps, return_dict=False)  # dynamo cannot trace its first call
        compiled = torch.compile(model, backend="ditopt", options={"plan": plan, "timestep_arg": "t",
                                                                    "inductor": False}, fullgraph=True)
        eager = ditopt.optimize(model, plan, timestep_arg="t")
        for i in range(4):
            t = torch.tensor([i / 4])
            assert torch.equal(compiled(x, t, caps, return_dict=False)[0][0], eager(x, t, caps, return_dict=False)[0][0])
    assert ditopt.stats(compiled).decisions == ditopt.stats(eager).decisions


def test_a_text_length_read_from_a_mask_captures_and_refuses_caching_by_name():
    """HunyuanVideo-Framepack cuts its text to the mask's count (a size known only at run time,
    read inside every block): captured as one graph, all-compute bit-identical, and a plan that
    would skip its blocks refused naming the live-out whose cache could not be sized."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True).eval()
    f, h, w = 3, 4, 4
    r = lambda *shape: torch.randn(*shape)  # noqa: E731
    kwargs = dict(hidden_states=r(1, 4, f, h, w), encoder_hidden_states=r(1, 6, 16), pooled_projections=r(1, 8),
                  encoder_attention_mask=torch.ones(1, 6), guidance=torch.tensor([6000.0]), image_embeds=r(1, 6, 16),
                  indices_latents=torch.arange(f), latents_clean=r(1, 4, f - 1, h, w),
                  indices_latents_clean=torch.arange(f - 1), latents_history_2x=r(1, 4, f - 1, h, w),
                  indices_latents_history_2x=torch.arange(f - 1), latents_history_4x=r(1, 4, (f - 1) * 4, h, w),
                  indices_latents_history_4x=torch.arange((f - 1) * 4))
    fast = ditopt.optimize(model, ditopt.presets.all_compute(steps=2))
    with torch.no_grad():
        for t in (999.0, 500.0):
            out = fast(timestep=torch.tensor([t]), **kwargs, return_dict=False)[0]
            assert torch.equal(out, model(timestep=torch.tensor([t]), **kwargs, return_dict=False)[0])
    fora = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=2, level="block"))
    with pytest.raises(ditopt.PlanError, match="has a size known only at run time"), torch.no_grad():
        fora(timestep=torch.tensor([999.0]), **kwargs, return_dict=False)


def test_fora_on_blocks_that_hold_their_mlp_inline():
    """PRX's blocks hold their MLP layers directly (no feed-forward module, so no feed-forward
    site): FORA's layer-level plan reuses the attention sites and its feed-forward rule has no
    effect, as a plan's rule for an attention kind the model lacks has none."""
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(0)
    model = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0,
                                  num_heads=2, depth=2, axes_dim=[8, 8]).eval()
    with torch.no_grad():  # its modulation starts at zero (every block an identity): give it weights
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape) * 0.1)
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16))
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=2))
    with torch.no_grad():
        outs = [fast(timestep=torch.tensor([t]), **kwargs, return_dict=False)[0] for t in (1.0, 0.5)]
        own = [model(timestep=torch.tensor([t]), **kwargs, return_dict=False)[0] for t in (1.0, 0.5)]
    assert torch.equal(outs[0], own[0]) and not torch.equal(outs[1], own[1])
    decisions = ditopt.stats(fast).decisions
    assert {k for k, row in decisions.items() if row[1] == "reuse"} and not any(".mlp" in k for k in decisions)
