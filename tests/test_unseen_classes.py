"""The whole workflow on diffusers classes that no issue names and nothing in ditopt was written
for: SD3 (joint attention over image and text tokens) and Flux (a joint stack followed by a
single-stream stack, timesteps in [0, 1]). Built tiny from their configs, random weights.

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


CLASSES = {"sd3": _sd3, "flux": _flux}


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
    assert any(s.endswith(".attn") for s in sites)


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
