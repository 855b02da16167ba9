"""The attention kernels a rewritten graph may call in place of SDPA (``passes/attention_backend.py``).

Each takes SDPA's layout, ``(batch, heads, tokens, head dim)``, and a softmax scale (None:
``1/sqrt(head dim)``), and computes SDPA without mask, dropout or causal masking:

- :func:`flash_attention` (``ditopt::flash_attention``): flash-attn's ``flash_attn_func``, which
  takes ``(batch, tokens, heads, head dim)``; the result is transposed back, not copied.
- :func:`sage_attention` (``ditopt::sage_attention``): SageAttention's ``sageattn`` with
  ``tensor_layout="HND"`` (SDPA's layout: no transpose).
- :func:`flex_attention`: torch's ``flex_attention`` without a block mask, a plain function so
  that inductor, which has a kernel for it, compiles it (eagerly it is torch's unfused
  reference implementation).

flash-attn and SageAttention are custom ops with fake kernels: inductor keeps them as opaque
calls, with the output strides the fake kernel promises. Both import their package when they
run, not when this module is imported: ditopt imports without them, and a test can install a
stand-in module in ``sys.modules``.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("ditopt::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """SDPA of ``(B, H, S, D)`` tensors by ``flash_attn.flash_attn_func`` (``(B, S, H, D)``):
    non-causal, no dropout; the output is a ``(B, H, S, D)`` view of flash's contiguous result."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                          softmax_scale=scale, causal=False)
    return out.contiguous().transpose(1, 2)  # contiguous: a no-op for flash, and what the fake promises


@flash_attention.register_fake
def _(q, k, v, scale):
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)


@torch.library.custom_op("ditopt::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """SDPA of ``(B, H, S, D)`` tensors by ``sageattention.sageattn`` (quantised Q·K): non-causal,
    SDPA's layout (``tensor_layout="HND"``); the output is contiguous."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale).contiguous()


@sage_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """SDPA of ``(B, H, S, D)`` tensors by torch's ``flex_attention`` with no block mask."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cpu":  # inductor's CPU flex kernel reads its operands as 4-D buffers, not views
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return flex(q, k, v, scale=scale)


__all__ = ["flash_attention", "flex_attention", "sage_attention"]
