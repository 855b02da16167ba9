"""A real diffusers pipeline, end to end, with only `pipe.transformer = ditopt.optimize(...)`."""

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
