"""A real diffusers pipeline, end to end, with only `pipe.transformer = ditopt.optimize(...)`."""

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import ditopt


def _pipe():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                       out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                       num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_pipeline_runs_with_an_optimized_transformer():
    pipe = _pipe()
    steps = 6
    generator = torch.Generator().manual_seed(0)
    reference = pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0, generator=generator,
                     output_type="np").images
    original = pipe.transformer
    pipe.transformer = ditopt.optimize(pipe.transformer, ditopt.presets.all_compute(steps=steps))
    generator = torch.Generator().manual_seed(0)
    same = pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0, generator=generator,
                output_type="np").images
    assert (same == reference).all()

    pipe.transformer = ditopt.optimize(original, ditopt.presets.fora(interval=2, steps=steps, level="block"))
    generator = torch.Generator().manual_seed(0)
    fast = pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0, generator=generator,
                output_type="np").images
    assert fast.shape == reference.shape
    decisions = ditopt.stats(pipe.transformer).decisions["transformer_blocks.1"]
    assert decisions == ["compute", "reuse_residual"] * (steps // 2)
    assert abs(fast - reference).max() > 0  # reuse really changed something


def test_profile_a_pipeline_then_run_it_with_the_planned_plan():
    pipe = _pipe()
    steps = 8
    rmap = ditopt.profile_pipeline(pipe, steps=steps, cfg="batched", progress=False, class_labels=[1, 2],
                                   guidance_scale=4.0, output_type="np")
    assert isinstance(pipe.transformer, DiTTransformer2DModel)  # restored
    assert (rmap.metric("cfg_diff")[:, rmap.index("transformer_blocks.1"), 0] > 0).all()
    plan = ditopt.plan_from_profile(rmap, budget=0.75)
    pipe.transformer = ditopt.optimize(pipe.transformer, plan)
    out = pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape[0] == 2
    d = ditopt.stats(pipe.transformer).decisions
    assert sum(a == "compute" for b in rmap.stack for a in d[b]) <= 0.75 * steps * len(rmap.stack)


def test_tune_a_pipeline_measures_each_candidate_on_the_same_noise():
    import math

    import pytest

    from ditopt.profile import ProfileError

    pipe = _pipe()
    steps = 6
    call = dict(class_labels=[1, 2], guidance_scale=4.0, output_type="np")
    rmap = ditopt.profile_pipeline(pipe, steps=steps, cfg="batched", progress=False, **call)
    tuned = ditopt.tune_pipeline(pipe, rmap, budget=0.5, seed=3, progress=False, **call)
    assert isinstance(pipe.transformer, DiTTransformer2DModel)  # restored
    reference = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(3), **call).images
    pipe.transformer = ditopt.optimize(pipe.transformer, tuned.plan)
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(3), **call).images
    mse = float(((out.astype("float64") - reference) ** 2).mean())
    assert 10 * math.log10(1 / mse) == pytest.approx(tuned.best.psnr, abs=1e-6)
    with pytest.raises(ProfileError, match="generator"):
        ditopt.tune_pipeline(pipe, rmap, budget=0.5, generator=torch.Generator(), **call)


def test_a_pipeline_run_after_an_interrupted_one_inside_a_generation_block():
    """The scheduler fails after step 2 (outside the model: nothing tells the runtime); the next
    run, inside ``ditopt.generation``, gives the images of a freshly optimised transformer."""
    steps = 6
    pipe = _pipe()
    original = pipe.transformer
    plan = ditopt.presets.fora(interval=2, steps=steps, level="block")

    def run():
        return pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    pipe.transformer = ditopt.optimize(original, plan)
    reference = run()  # freshly optimised
    pipe.transformer = ditopt.optimize(original, plan)
    step, calls = pipe.scheduler.step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return step(*args, **kwargs)

    pipe.scheduler.step = failing_step
    try:
        run()
    except RuntimeError:
        pass
    pipe.scheduler.step = step
    with ditopt.generation(pipe.transformer):
        images = run()
    assert (images == reference).all()
    assert ditopt.stats(pipe.transformer).decisions["transformer_blocks.1"] == ["compute", "reuse_residual"] * 3


def _wan_pipe():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    from ditopt.small_models import MODELS

    torch.manual_seed(0)
    transformer, kwargs = MODELS["wan"]()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    text = kwargs["encoder_hidden_states"]

    def run(**extra):  # one frame: an image, CFG as two calls per step
        return pipe(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), height=16, width=16,
                    num_frames=1, num_inference_steps=6, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **extra).frames

    return pipe, run


def test_wan_pipeline_told_bare_and_interrupted_runs_follow_the_plan_in_one_graph():
    """WanPipeline at one frame hands its model latents whose frame dimension (size 1) changes
    stride after the first step: one graph still (no second capture that would find no cache),
    a told run equals a bare one, a run after a told one finds its steps, and an interrupt set by
    a callback before ditopt's (diffusers' MultiPipelineCallbacks) leaves no stale cache."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    pipe, run = _wan_pipe()
    reference = run()
    pipe.transformer = fast = ditopt.optimize(pipe.transformer, ditopt.presets.fora(interval=2, steps=6, level="block"))
    bare = run()
    fora = ["compute", "compute", "reuse_residual", "reuse_residual"] * 3  # cond and uncond per step
    assert ditopt.stats(fast).decisions["blocks.0"] == fora and ditopt.stats(fast).graphs == 1
    assert not torch.equal(bare, reference)
    assert torch.equal(run(callback_on_step_end=ditopt.step_callback(fast)), bare)
    assert torch.equal(run(), bare) and ditopt.stats(fast).decisions["blocks.0"] == fora

    class StopAtStep2(PipelineCallback):
        tensor_inputs = []

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            pipeline._interrupt = step_index == 2
            return callback_kwargs

    run(callback_on_step_end=MultiPipelineCallbacks([StopAtStep2(), ditopt.step_callback(fast)]))
    assert ditopt.stats(fast).cache_bytes == 0
    assert torch.equal(run(), bare)


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=16, shift_factor=0.0, **extra).eval()


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return pipe, dict(prompt_embeds=torch.randn(1, 6, 32), pooled_prompt_embeds=torch.randn(1, 16), height=32,
                      width=32, guidance_scale=3.5), "callback_on_step_end", "transformer_blocks.0", 1


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=16, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    text, pooled = torch.randn(1, 6, 32), torch.randn(1, 16)
    return pipe, dict(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(text),
                      negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=32, width=32,
                      guidance_scale=4.0), "callback_on_step_end", "transformer_blocks.0", 1


def _qwen_image():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    text, mask = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long)
    return pipe, dict(prompt_embeds=text, prompt_embeds_mask=mask, negative_prompt_embeds=torch.zeros_like(text),
                      negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, height=32, width=32), \
        "callback_on_step_end", "transformer_blocks.0", 2


def _pixart_sigma():  # DPM-Solver (a multistep scheduler); the older callback= (no callback_on_step_end)
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                           in_channels=4, out_channels=8, caption_channels=32, cross_attention_dim=32,
                                           norm_type="ada_norm_single", use_additional_conditions=False).eval()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    text, mask = torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.long)
    return pipe, dict(negative_prompt=None, prompt_embeds=text, prompt_attention_mask=mask,
                      negative_prompt_embeds=torch.zeros_like(text), negative_prompt_attention_mask=mask, height=32,
                      width=32, guidance_scale=4.0, use_resolution_binning=False), "callback", "transformer_blocks.0", 1


@pytest.mark.parametrize("build", [_flux, _sd3, _qwen_image, _pixart_sigma], ids=lambda f: f.__name__[1:])
def test_real_pipelines_follow_the_plan_bare_and_told_in_one_graph(build):
    """Each pipeline as a user runs it (embeddings given, a tiny VAE), FORA every other step:
    one graph, the plan's decisions, and the same images bare, told by ditopt's step callback
    (the older ``callback=`` where the pipeline has no other), and bare again after a told run."""
    torch.manual_seed(0)
    pipe, kwargs, how, block, calls_per_step = build()
    pipe.set_progress_bar_config(disable=True)
    steps = 6

    def run(**extra):
        out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
                   **kwargs, **extra)
        return out.images

    reference = run()
    pipe.transformer = fast = ditopt.optimize(pipe.transformer, ditopt.presets.fora(interval=2, steps=steps,
                                                                                    level="block"))
    bare = run()
    fora = [a for a in ("compute", "reuse_residual") for _ in range(calls_per_step)] * (steps // 2)
    assert ditopt.stats(fast).decisions[block] == fora and ditopt.stats(fast).graphs == 1
    assert not torch.equal(bare, reference)
    told = {"callback_on_step_end": ditopt.step_callback(fast)} if how == "callback_on_step_end" else \
        {"callback": ditopt.step_callback(fast, steps=steps), "callback_steps": 1}
    assert torch.equal(run(**told), bare)
    assert torch.equal(run(), bare) and ditopt.stats(fast).decisions[block] == fora


def test_wan_pipeline_under_torch_compile_shares_caches_with_the_graph_dynamo_compiles_again():
    """Under torch.compile dynamo compiles WanPipeline's model twice at one frame (its latents
    change stride in the size-1 frame dimension after the first step, and dynamo makes that
    stride symbolic). The second graph has the first's shapes and decisions: it shares its caches,
    so the run follows the plan and equals optimize's bit for bit."""
    plan = ditopt.presets.fora(interval=2, steps=6, level="block")
    pipe, run = _wan_pipe()
    pipe.transformer = ditopt.optimize(pipe.transformer, plan)
    reference = run()
    pipe, run = _wan_pipe()
    pipe.transformer = fast = torch.compile(pipe.transformer, backend="ditopt", options={"plan": plan, "inductor": False})
    assert torch.equal(run(), reference)
    fora = ["compute", "compute", "reuse_residual", "reuse_residual"] * 3
    assert ditopt.stats(fast).decisions["blocks.0"] == fora and ditopt.stats(fast).graphs == 1
    assert torch.equal(run(), reference)
