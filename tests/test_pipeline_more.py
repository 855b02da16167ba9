"""More real diffusers pipelines end to end, as tests/test_pipeline.py runs Flux, SD3, Qwen-Image and
PixArt-Sigma: each built tiny from its config, prompt embeddings given (no text encoder, no hub), only
``pipe.transformer = ditopt.optimize(...)`` changed. Checked: an all-compute plan gives the bare
pipeline's output exactly; FORA every other step is captured once, takes the plan's decisions, and gives
the same output bare, told by ``ditopt.step_callback`` and bare again after a told run."""

import pytest
import torch

import ditopt
from test_pipeline import _sd3, _tiny_vae


def _mask(n=6):
    return torch.ones(1, n, dtype=torch.long)


def _sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                                         attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=16, sample_size=16).eval()
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    text = torch.randn(1, 6, 16)
    return pipe, dict(prompt_embeds=text, prompt_attention_mask=_mask(), negative_prompt=None,
                      negative_prompt_embeds=torch.zeros_like(text), negative_prompt_attention_mask=_mask(),
                      height=32, width=32, guidance_scale=4.5, use_resolution_binning=False), "images", 1


def _auraflow():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                             num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                             caption_projection_dim=16, joint_attention_dim=16, out_channels=4,
                                             pos_embed_max_size=64).eval()
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    text = torch.randn(1, 6, 16)
    return pipe, dict(prompt_embeds=text, prompt_attention_mask=_mask(), negative_prompt_embeds=torch.zeros_like(text),
                      negative_prompt_attention_mask=_mask(), height=32, width=32, guidance_scale=3.5), "images", 1


def _cogview4():  # CFG as two calls per step
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                             num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8,
                                             condition_dim=4, sample_size=16, rope_axes_dim=(4, 4)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=transformer,
                            scheduler=scheduler)
    text = torch.randn(1, 16, 16)
    return pipe, dict(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), height=32, width=32,
                      guidance_scale=5.0), "images", 2


def _chroma():  # CFG as two calls per step, a boolean text mask
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 6, 6), approximator_hidden_dim=32, approximator_layers=1,
                                           approximator_num_channels=16).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
                          tokenizer=None, transformer=transformer)
    text, mask = torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.bool)
    return pipe, dict(prompt_embeds=text, prompt_attention_mask=mask, negative_prompt_embeds=torch.zeros_like(text),
                      negative_prompt_attention_mask=mask, height=32, width=32, guidance_scale=4.0), "images", 2


def _sd3_no_cfg_latent():  # guidance_scale 1: one batch-1 call per step; latents out
    pipe, kwargs, *_ = _sd3()
    return pipe, {**kwargs, "guidance_scale": 1.0, "output_type": "latent"}, "images", 1


def _latte():  # spatial and temporal blocks interleaved
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel

    transformer = LatteTransformer3DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                          num_attention_heads=2, caption_channels=16, in_channels=4,
                                          cross_attention_dim=16, out_channels=8, attention_bias=True,
                                          activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                          norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                          video_length=2).eval()
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        sample_size=8).eval()
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler())
    text = torch.randn(1, 6, 16)
    return pipe, dict(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), negative_prompt=None,
                      height=8, width=8, video_length=2, guidance_scale=7.5, mask_feature=False), "frames", 1


def _ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=2, caption_channels=16).eval()
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer)
    text = torch.randn(1, 6, 16)
    return pipe, dict(prompt_embeds=text, prompt_attention_mask=_mask(), negative_prompt_embeds=torch.zeros_like(text),
                      negative_prompt_attention_mask=_mask(), height=32, width=32, num_frames=9, guidance_scale=3.0,
                      output_type="latent"), "frames", 1


def _allegro():
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    transformer = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                            num_layers=2, cross_attention_dim=24, sample_width=8, sample_height=8,
                                            sample_frames=8, caption_channels=16).eval()
    vae = AutoencoderKLAllegro(down_block_types=("AllegroDownBlock3D",) * 4, up_block_types=("AllegroUpBlock3D",) * 4,
                               block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                               norm_num_groups=2, temporal_compression_ratio=4).eval()
    pipe = AllegroPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler())
    text = torch.randn(1, 6, 16)
    return pipe, dict(prompt_embeds=text, prompt_attention_mask=_mask(), negative_prompt_embeds=torch.zeros_like(text),
                      negative_prompt_attention_mask=_mask(), negative_prompt=None, height=64, width=64, num_frames=9,
                      guidance_scale=7.5, output_type="latent"), "frames", 1


# HunyuanDiT, Flux with a negative prompt (true_cfg_scale) and Mochi pass the same checks, in ~3.4 s each
BUILDS = [_sana, _auraflow, _cogview4, _chroma, _sd3_no_cfg_latent, _latte, _ltx, _allegro]


@pytest.mark.parametrize("build", BUILDS, ids=lambda f: f.__name__[1:])
def test_more_pipelines_follow_the_plan_bare_and_told_in_one_graph(build):
    torch.manual_seed(0)
    pipe, kwargs, attr, calls_per_step = build()
    pipe.set_progress_bar_config(disable=True)
    steps = 4

    def run(**extra):
        out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   **{"output_type": "pt", **kwargs, **extra})
        return getattr(out, attr)

    reference = run()
    original = pipe.transformer
    pipe.transformer = ditopt.optimize(original, ditopt.presets.all_compute(steps=steps))
    assert torch.equal(run(), reference)

    pipe.transformer = fast = ditopt.optimize(original, ditopt.presets.fora(interval=2, steps=steps, level="block"))
    bare = run()
    fora = [a for a in ("compute", "reuse_residual") for _ in range(calls_per_step)] * (steps // 2)
    blocks = [s.name for s in ditopt.compiled_graph(fast).sites if s.kind == "block"]
    assert len(blocks) >= 2
    assert all(ditopt.stats(fast).decisions[b] == fora for b in blocks) and ditopt.stats(fast).graphs == 1
    assert not torch.equal(bare, reference)
    assert torch.equal(run(callback_on_step_end=ditopt.step_callback(fast)), bare)
    assert torch.equal(run(), bare)
    assert all(ditopt.stats(fast).decisions[b] == fora for b in blocks) and ditopt.stats(fast).graphs == 1
