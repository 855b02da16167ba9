"""The whole workflow on diffusers classes that no issue names and nothing in ditopt was written
for: SD3 (joint attention over image and text tokens), Flux (a joint stack followed by a
single-stream stack, timesteps in [0, 1]), Mochi (its text mask selects tokens: a size known
only at run time), Z-Image (lists of images in, ``t`` counting up from 0 to 1), and LTX-Video,
CogView4, AuraFlow, Chroma, Qwen-Image, SkyReels-V2, Wan-VACE, HunyuanDiT (long skips), Allegro,
Cosmos, EasyAnimate, Sana-Video, HunyuanImage, Kandinsky 5, LTX-2 (video and audio streams),
CogView3-Plus, Lumina-Next, Latte, ConsisID, Stable Audio, Flux.2, Bria, ChronoEdit, GLM-Image,
Ovis-Image and LongCat-Image; HiDream (experts routed on the host), Lumina 2 (text lengths read
with ``.tolist()``), HunyuanVideo 1.5 and OmniGen (branches on a tensor's value) cannot be one
graph. Built tiny from their configs, random weights.

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
    return model, dict(_flux_inputs(), pooled_projections=torch.randn(1, 16)), 1.0, \
        ("transformer_blocks", "single_transformer_blocks")


def _flux_inputs(h: int = 4, w: int = 4) -> dict:
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                img_ids=img_ids.reshape(h * w, 3), txt_ids=torch.zeros(6, 3))


def _mochi():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                    max_sequence_length=16).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 2, 4, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                  encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))
    return model, kwargs, 1000.0, ("transformer_blocks",)


def _r(*shape):
    return torch.randn(*shape)


def _ltx():  # tokens in flat, the video grid given as ints
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                                       cross_attention_dim=24, num_layers=2, caption_channels=16)
    return model, dict(hidden_states=_r(1, 32, 8), encoder_hidden_states=_r(1, 6, 16),
                       encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=4, width=4), 1000.0, ("transformer_blocks",)


def _cogview4():
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                       num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
                                       pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4))
    size = torch.tensor([[64.0, 64.0]])
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16), original_size=size,
                       target_size=size, crop_coords=torch.zeros(1, 2)), 1000.0, ("transformer_blocks",)


def _auraflow():  # a joint stack, then a single-stream one
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                       num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=64)
    return (model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16)), 1000.0,
            ("joint_transformer_blocks", "single_transformer_blocks"))


def _chroma():  # Flux's layout, the modulation from an approximator network
    from diffusers import ChromaTransformer2DModel

    model = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=16,
                                     approximator_layers=1)
    return model, _flux_inputs(), 1.0, ("transformer_blocks", "single_transformer_blocks")


def _qwen():  # the image grid given as a list of shapes
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=_r(1, 16, 16), encoder_hidden_states=_r(1, 6, 16),
                       encoder_hidden_states_mask=torch.ones(1, 6), img_shapes=[(1, 4, 4)]), 1.0, ("transformer_blocks",)


def _wan_like(cls, **extra):
    return cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **extra)


def _skyreels():
    from diffusers import SkyReelsV2Transformer3DModel

    return (_wan_like(SkyReelsV2Transformer3DModel), dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16)),
            1000.0, ("blocks",))


def _wan_vace():  # control blocks whose hints are added into the main blocks
    from diffusers import WanVACETransformer3DModel

    model = _wan_like(WanVACETransformer3DModel, vace_layers=[0, 1], vace_in_channels=8)
    return model, dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16),
                       control_hidden_states=_r(1, 8, 2, 8, 8), control_hidden_states_scale=torch.ones(2)), 1000.0, \
        ("vace_blocks", "blocks")


def _hunyuan_dit():  # long skips: block 3 takes block 0's output besides block 2's
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    model = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                              hidden_size=16, num_layers=4, learn_sigma=False, cross_attention_dim=16,
                              cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=6, text_len_t5=6,
                              use_style_cond_and_image_meta_size=False)
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16), text_embedding_mask=torch.ones(1, 6),
                       encoder_hidden_states_t5=_r(1, 6, 16), text_embedding_mask_t5=torch.ones(1, 6),
                       image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))), 1000.0, ("blocks",)


def _allegro():
    from diffusers import AllegroTransformer3DModel

    model = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
                                      in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=16, sample_height=8,
                                      sample_width=8, sample_frames=2, caption_channels=16)
    return model, dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16)), 1000.0, ("transformer_blocks",)


def _cosmos():  # concat_padding_mask needs torchvision, which the model imports only if installed
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                     num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32),
                                     patch_size=(1, 2, 2), concat_padding_mask=False)
    return model, dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16), attention_mask=torch.ones(1, 6),
                       fps=30), 1.0, ("transformer_blocks",)


def _easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2,
                                          num_layers=2, out_channels=4, patch_size=2, text_embed_dim=16, time_embed_dim=8)
    return model, dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16)), 1000.0, ("transformer_blocks",)


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(8, 4, 4), axes_lens=(32, 16, 16), cap_feat_dim=16)
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16),
                       encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool)), 1.0, ("layers",)


def _sana_video():
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                        cross_attention_dim=32, caption_channels=16, sample_size=8, rope_max_seq_len=32)
    return model, dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16)), 1000.0, ("transformer_blocks",)


def _hunyuan_video15():
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                             num_layers=2, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8,
                                             image_embed_dim=8, rope_axes_dim=(4, 6, 6))
    return model, dict(hidden_states=_r(1, 4, 2, 4, 4), encoder_hidden_states=_r(1, 6, 16),
                       encoder_attention_mask=torch.ones(1, 6), encoder_hidden_states_2=_r(1, 4, 8),
                       encoder_attention_mask_2=torch.ones(1, 4), image_embeds=_r(1, 3, 8)), 1000.0, ("transformer_blocks",)


def _hunyuan_image():  # a joint stack, then a single-stream one; no second (ByT5) text encoder
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=(2, 2),
                                           text_embed_dim=16, rope_axes_dim=(8, 8))
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16),
                       encoder_attention_mask=torch.ones(1, 6)), 1000.0, ("transformer_blocks", "single_transformer_blocks")


def _fill_zeros(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape) * 0.1)


def _kandinsky5():  # latents channels-last, rotary positions given as index tensors
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                         model_dim=32, ff_dim=64, num_text_blocks=2, num_visual_blocks=2,
                                         axes_dims=(4, 6, 6))
    _fill_zeros(model)  # its modulations start at zero (every block an identity, the output blind to t)
    return model, dict(hidden_states=_r(1, 2, 8, 8, 4), encoder_hidden_states=_r(1, 6, 16), pooled_projections=_r(1, 8),
                       visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                       text_rope_pos=torch.arange(6)), 1000.0, ("text_transformer_blocks", "visual_transformer_blocks")


def _ltx2():  # video and audio streams in every block, crossing each other; returns (video, audio)
    from diffusers import LTX2VideoTransformer3DModel

    model = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                                        cross_attention_dim=24, audio_in_channels=8, audio_out_channels=8,
                                        audio_num_attention_heads=2, audio_attention_head_dim=12,
                                        audio_cross_attention_dim=24, num_layers=2, caption_channels=16)
    return model, dict(hidden_states=_r(1, 32, 8), audio_hidden_states=_r(1, 5, 8), encoder_hidden_states=_r(1, 6, 16),
                       audio_encoder_hidden_states=_r(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                       audio_encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=4, width=4,
                       audio_num_frames=5), 1000.0, ("transformer_blocks",)


def _cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    model = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                           num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8,
                                           condition_dim=4, pos_embed_max_size=16, sample_size=8)
    size = torch.tensor([[64.0, 64.0]])
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16), original_size=size,
                       target_size=size, crop_coords=torch.zeros(1, 2)), 1000.0, ("transformer_blocks",)


def _lumina_next():  # the rotary table given as an input
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                 num_attention_heads=2, num_kv_heads=2, multiple_of=16, learn_sigma=False,
                                 cross_attention_dim=16)
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16), encoder_mask=torch.ones(1, 6),
                       image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 8, 8),
                       cross_attention_kwargs={}), 1.0, ("layers",)  # its default, None, is spread with **


def _omnigen():  # text-only conditioning: token ids, no input images
    from diffusers import OmniGenTransformer2DModel

    model = OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, num_layers=2, pad_token_id=0,
                                      vocab_size=64, pos_embed_max_size=16, time_step_dim=16,
                                      rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8})
    seq = 6 + 1 + 16  # text, the time token, the image
    return model, dict(hidden_states=_r(1, 4, 8, 8), input_ids=torch.arange(1, 7)[None], input_img_latents=[],
                       input_image_sizes={}, attention_mask=torch.ones(1, seq, seq),
                       position_ids=torch.arange(seq)[None]), 1.0, ("layers",)


def _latte():  # spatial and temporal blocks alternating, two stacks interleaved
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                    num_embeds_ada_norm=1000, norm_type="ada_norm_single", caption_channels=16,
                                    video_length=2)
    return model, dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16)), 1000.0, \
        ("transformer_blocks", "temporal_transformer_blocks")


def _consisid():  # CogVideoX's layout; no face adapter (is_train_face=False)
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
                                       sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6)
    return model, dict(hidden_states=_r(1, 2, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16)), 1000.0, \
        ("transformer_blocks",)


def _stable_audio():  # a 1-d latent; the global embedding prepended as a token; the rotary table an input
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    model = StableAudioDiTModel(sample_size=16, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
                                global_states_input_dim=16, cross_attention_input_dim=16)
    rotary = get_1d_rotary_pos_embed(8, 16 + 1, use_real=True, repeat_interleave_real=False)
    return model, dict(hidden_states=_r(1, 4, 16), encoder_hidden_states=_r(1, 6, 16), global_hidden_states=_r(1, 1, 16),
                       rotary_embedding=rotary), 1.0, ("transformer_blocks",)


def _flux2():  # four rotary axes; modulation shared by every block of a stack
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                                    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    inputs = _flux_inputs()
    img_ids = torch.cat([torch.zeros(16, 1), inputs["img_ids"]], dim=1)
    return model, dict(inputs, img_ids=img_ids[None], txt_ids=torch.zeros(1, 6, 4)), 1.0, \
        ("transformer_blocks", "single_transformer_blocks")


def _bria():  # Flux's layout without pooled projections
    from diffusers import BriaTransformer2DModel

    model = BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6])
    return model, _flux_inputs(), 1000.0, ("transformer_blocks", "single_transformer_blocks")


def _chronoedit():  # Wan's layout, its temporal rotary positions skipping frames
    from diffusers import ChronoEditTransformer3DModel

    return (_wan_like(ChronoEditTransformer3DModel), dict(hidden_states=_r(1, 4, 2, 8, 8), encoder_hidden_states=_r(1, 6, 16)),
            1000.0, ("blocks",))


def _glm_image():  # prior tokens (from its autoregressive stage) added to the image tokens, dropped by a mask
    from diffusers import GlmImageTransformer2DModel

    model = GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                       num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
                                       prior_vq_quantizer_codebook_size=64)
    size = torch.tensor([[64.0, 64.0]])
    return model, dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states=_r(1, 6, 16),
                       prior_token_id=torch.randint(0, 64, (1, 16)), prior_token_drop=torch.zeros(1, 16, dtype=torch.bool),
                       target_size=size, crop_coords=torch.zeros(1, 2)), 1000.0, ("transformer_blocks",)


def _ovis_image():  # Flux's layout, no pooled projections, t in [0, 1]
    from diffusers import OvisImageTransformer2DModel

    model = OvisImageTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(4, 6, 6))
    return model, _flux_inputs(), 1.0, ("transformer_blocks", "single_transformer_blocks")


def _longcat_image():  # Flux's layout, the modulation from the timestep alone; t in [0, 1]
    from diffusers import LongCatImageTransformer2DModel

    model = LongCatImageTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=[4, 6, 6])
    return model, _flux_inputs(), 1.0, ("transformer_blocks", "single_transformer_blocks")


def _seeded(build):
    def seeded():
        torch.manual_seed(0)
        model, kwargs, scale, stacks = build()
        return model.eval(), kwargs, scale, stacks
    return seeded


CLASSES = {"sd3": _sd3, "flux": _flux, "mochi": _mochi, **{name: _seeded(build) for name, build in {
    "ltx": _ltx, "cogview4": _cogview4, "auraflow": _auraflow, "chroma": _chroma, "qwen": _qwen, "skyreels": _skyreels,
    "wan_vace": _wan_vace, "hunyuan_dit": _hunyuan_dit, "allegro": _allegro, "cosmos": _cosmos,
    "easyanimate": _easyanimate, "sana_video": _sana_video, "hunyuan_image": _hunyuan_image, "kandinsky5": _kandinsky5,
    "ltx2": _ltx2, "cogview3plus": _cogview3plus, "lumina_next": _lumina_next, "latte": _latte, "consisid": _consisid,
    "stable_audio": _stable_audio, "flux2": _flux2, "bria": _bria, "chronoedit": _chronoedit,
    "glm_image": _glm_image, "ovis_image": _ovis_image, "longcat_image": _longcat_image}.items()}}


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
    assert any(".attn" in s or s.endswith("_attention") for s in sites)  # Kandinsky 5: self_attention


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


@pytest.mark.parametrize("name", list(CLASSES))
def test_fora_reuses_and_taylorseer_forecasts_at_their_steps_in_one_graph(name):
    """At the steps a plan computes the model's output is exact; at the others the planned sites
    reuse or forecast (so the output differs); one graph serves every step, without a break."""
    model, kwargs, scale, stacks = CLASSES[name]()
    for plan, action, computed in ((ditopt.presets.fora(interval=2, steps=4), "reuse", {0, 2}),
                                   (ditopt.presets.taylorseer(steps=6, interval=2, order=1), "predict", {0, 1, 2, 4})):
        torch._dynamo.utils.counters.clear()
        fast = ditopt.optimize(model, plan)
        with torch.no_grad():
            for i, t in enumerate(_timesteps(plan.steps, scale)):
                ref = model(timestep=t, **kwargs, return_dict=False)[0]
                assert torch.equal(fast(timestep=t, **kwargs, return_dict=False)[0], ref) == (i in computed), (plan.name, i)
        decisions = ditopt.stats(fast).decisions
        planned = {i for row in decisions.values() for i, a in enumerate(row) if a == action}
        assert planned == set(range(plan.steps)) - computed, plan.name
        assert any(s.startswith(f"{stacks[-1]}.") and action in row for s, row in decisions.items())
        assert ditopt.stats(fast).graphs == 1 and not sum(torch._dynamo.utils.counters["graph_break"].values())


def test_blocks_with_a_long_skip_reuse_the_residual_of_the_stream_they_carry():
    """HunyuanDiT's later blocks take an earlier block's output (a long skip) besides the previous
    block's, and mix both through a linear before their residual adds: neither input is on an add
    chain to the output, so the block's residual is taken against the stream the previous block
    handed on (it used to be refused: "reuse_residual needs an input shaped like each output")."""
    model, kwargs, scale, _ = CLASSES["hunyuan_dit"]()
    sites = ditopt.sites(model, timestep=torch.tensor([scale]), **kwargs)
    assert sites["blocks.3"].residual_inputs == sites["blocks.2"].live_outs
    assert sites["blocks.0"].live_outs[0] in sites["blocks.3"].inputs  # the long skip
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4, level="block"))
    with torch.no_grad():
        outs = [fast(timestep=t, **kwargs, return_dict=False)[0] for t in _timesteps(4, scale)]
        own = [model(timestep=t, **kwargs, return_dict=False)[0] for t in _timesteps(4, scale)]
    assert [torch.equal(a, b) for a, b in zip(outs, own)] == [True, False, True, False]
    assert ditopt.stats(fast).decisions["blocks.3"] == ["compute", "reuse_residual"] * 2


@pytest.mark.parametrize("build,line", [
    (_lumina2, r"transformer_lumina2\.py:\d+ in forward: `use_mask = len\(set\(seq_lengths\)\) > 1`"),
    (_hunyuan_video15, r"transformer_hunyuan_video15\.py:\d+ in forward: `if is_t2v:`"),
    (_omnigen, r"transformer_omnigen\.py:\d+ in forward: `if seq_len > self\.original_max_position_embeddings:`")])
def test_a_value_read_from_a_tensor_on_the_host_refuses_capture_naming_the_line(build, line):
    """Lumina 2 reads its text lengths from the mask into Python ints (``.tolist()``) and branches
    on whether they differ; HunyuanVideo 1.5 branches on whether the image embeddings are all
    zero; OmniGen's rotary embedding on whether the largest position id passes a bound: no single
    graph exists. The first call raises CaptureError naming the class and the
    model's line, and the model itself still runs."""
    model, kwargs, scale, _ = _seeded(build)()
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
    with torch.no_grad(), pytest.raises(ditopt.CaptureError, match=rf"could not capture {type(model).__name__} as one "
                                        rf"graph: .* \(at {line}\)"):
        fast(timestep=torch.tensor([scale]), **kwargs, return_dict=False)
    with torch.no_grad():
        assert model(timestep=torch.tensor([scale]), **kwargs, return_dict=False)[0].shape == kwargs["hidden_states"].shape


def test_experts_routed_by_a_count_read_on_the_host_refuse_capture_naming_the_line():
    """HiDream's mixture-of-experts loops over per-expert token counts read from the router's
    output (a size known only at run time, in Python): no single graph exists. The first call
    raises CaptureError naming the class, dynamo's reason and the model's line, not a traceback."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4],
                                           text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
                                           axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=[0, 1]).eval()
    kwargs = dict(hidden_states=_r(1, 4, 8, 8), encoder_hidden_states_t5=_r(1, 6, 8),
                  encoder_hidden_states_llama3=_r(2, 1, 6, 4), pooled_embeds=_r(1, 8))
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4), timestep_arg="timesteps")
    with torch.no_grad(), pytest.raises(ditopt.CaptureError, match=r"could not capture HiDreamImageTransformer2DModel "
                                        r"as one graph: .* \(at transformer_hidream_image\.py:\d+ in moe_infer: `"):
        fast(timesteps=torch.tensor([999.0]), **kwargs, return_dict=False)
    with torch.no_grad():  # the model itself is untouched
        assert model(timesteps=torch.tensor([999.0]), **kwargs, return_dict=False)[0].shape == (1, 4, 8, 8)


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


@pytest.mark.parametrize("name,site", [("kandinsky5", "visual_transformer_blocks.0.self_attention"),
                                       ("ltx", "transformer_blocks.0.attn1")])
def test_a_rotary_table_made_outside_the_attention_is_not_a_second_token_stream(name, site):
    """Kandinsky 5 and LTX-Video build their rotary tables outside the attention (from position
    indices, from the grid) and apply them to the projected query: the query reads one token
    stream through its projection, so the attention is self-attention (it came out "joint": the
    table, a tensor of three or more dims, was counted as a second stream)."""
    model, kwargs, scale, _ = CLASSES[name]()
    sites = ditopt.sites(model, timestep=torch.tensor([scale]), **kwargs)
    assert sites[site].attention == "self"


def test_blocks_in_a_container_of_lists_belong_to_the_stack():
    """Flux 3 keeps its image blocks in ``mode_blocks.image`` (a ModuleDict of lists), one level
    deeper than its other lists: the stack was taken to be the shallowest lists only, so the
    profiler left those blocks out and every profiled plan computed them at every step, silently.
    Blocks held by no module the forward calls are the stack; a refiner inside a text embedder
    (HunyuanVideo) is still not."""
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(0)
    model = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()
    ids = torch.zeros(4, 4, 4)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    table = ditopt.sites(model, hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                         img_ids=ids.reshape(16, 4), txt_ids=torch.zeros(6, 4), timestep=torch.tensor([1.0]))
    assert table.stack_blocks() == ["txt_mode_blocks.0", "mode_blocks.image.0", "single_transformer_blocks.0"]


class _UViT(torch.nn.Module):  # a user's own model: blocks in, one mid block, blocks out
    def __init__(self, dim: int = 16):
        super().__init__()
        from synthetic import Block, TimestepEmbedding

        self.t_embed = TimestepEmbedding(dim)
        self.in_blocks = torch.nn.ModuleList([Block(dim), Block(dim)])
        self.mid_block = Block(dim)
        self.out_blocks = torch.nn.ModuleList([Block(dim), Block(dim)])

    def forward(self, x, timestep):
        temb = self.t_embed(timestep)
        for block in self.in_blocks:
            x = block(x, temb)
        x = self.mid_block(x, temb)
        for block in self.out_blocks:
            x = block(x, temb)
        return x


def test_a_lone_block_of_a_listed_blocks_class_is_a_block_of_the_stack():
    """A U-ViT's mid block is no list's item: it was no block, so profiled plans never planned it
    and the budget did not count it (the blocks ran 0.59 of their compute at budget 0.5)."""
    torch.manual_seed(0)
    table = ditopt.sites(_UViT().eval(), x=torch.randn(1, 8, 16), timestep=torch.tensor([999.0]))
    assert table.stack_blocks() == ["in_blocks.0", "in_blocks.1", "mid_block", "out_blocks.0", "out_blocks.1"]
    assert table["mid_block"].kind == "block" and table["mid_block.attn"].kind == "attention"
