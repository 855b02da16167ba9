"""Real diffusers transformer classes built from config at small sizes, with example inputs.

Used by the command line (``ditopt sites wan``) and the tests; weights are random.

Each builder returns ``(model, kwargs)``; kwargs are the forward's keyword inputs, with the
timestep under ``timestep``.
"""

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    PixArtTransformer2DModel,
    WanTransformer3DModel,
)


def dit():
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m.eval(), dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                          class_labels=torch.tensor([1, 2]))


def pixart():
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                 caption_channels=24)
    return m.eval(), dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                          encoder_hidden_states=torch.randn(2, 5, 24),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def cogvideox():
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                    text_embed_dim=32, time_embed_dim=16, max_text_seq_length=6)
    return m.eval(), dict(hidden_states=torch.randn(1, 3, 4, 8, 8), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 6, 32))


def wan():
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                              rope_max_seq_len=32)
    return m.eval(), dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 6, 32))


def hunyuan():
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                       patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                       rope_axes_dim=(4, 6, 6))
    return m.eval(), dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 6, 32), encoder_attention_mask=torch.ones(1, 6),
                          pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3000.0]))


MODELS = {"dit": dit, "pixart": pixart, "cogvideox": cogvideox, "wan": wan, "hunyuan": hunyuan}


def build(name: str, seed: int = 0):
    """``(model in eval mode, example kwargs)`` for one of :data:`MODELS`.

    Example:
        >>> model, kwargs = build("wan")
        >>> type(model).__name__, sorted(kwargs)
        ('WanTransformer3DModel', ['encoder_hidden_states', 'hidden_states', 'timestep'])
    """
    if name not in MODELS:
        from .errors import DitoptError

        raise DitoptError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name]()


def timesteps(n, like):
    """``n`` decreasing timesteps shaped like ``like``."""
    return [torch.full_like(like, int(999 - i * (999 / n))) for i in range(n)]
