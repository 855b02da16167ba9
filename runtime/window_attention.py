"""Window self-attention that costs tokens x window, not tokens squared.

DiTFastAttn replaces full self-attention at some steps by attention to a local window. Here the
window is a neighbourhood at block granularity, as Neighborhood Attention defines it at the
borders: the queries are cut into blocks of ``block`` tokens, and every query of a block attends
to the same ``window`` keys, the ones centred on its block, shifted inward at the ends of the
sequence, so that every query sees exactly ``window`` keys (at least ``(window - block) // 2`` on
either side of it away from the ends). No mask is needed: each block is one dense SDPA call over
a gathered key span, all blocks in one batched call. The work is ``tokens x window`` scores
instead of ``tokens^2`` (8x less at a window of 1/8 of the sequence; measured in
``docs/BENCHMARKS.md``), and :func:`window_mask` gives the dense mask it equals.

Layout is SDPA's: ``[batch, heads, tokens, head_dim]`` (any leading dims: ``[batch, tokens, dim]`` too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "window_attention_flops", "window_mask", "window_block"]


def window_block(window: int) -> int:
    """The default query block of a window: an eighth of it (at least 16 tokens)."""
    return max(16, window // 8)


def _spans(tokens: int, window: int, block: int, device=None) -> torch.Tensor:
    """[blocks]: where each block's key span starts (centred on the block, kept inside)."""
    starts = torch.arange(math.ceil(tokens / block), device=device) * block
    centre = starts + block // 2
    return (centre - window // 2).clamp(0, tokens - window)


def window_mask(tokens: int, window: int, block: int | None = None, device=None) -> torch.Tensor:
    """The dense boolean mask (True = attend) that :func:`window_attention` equals.

    >>> window_mask(6, 4, block=2).int().tolist()
    [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    """
    if window >= tokens:
        return torch.ones(tokens, tokens, dtype=torch.bool, device=device)
    block = block or window_block(window)
    start = _spans(tokens, window, block, device).repeat_interleave(block)[:tokens, None]
    keys = torch.arange(tokens, device=device)[None, :]
    return (keys >= start) & (keys < start + window)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *, block: int | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Self-attention of each query block with the ``window`` keys around it (see the module).

    Equal to SDPA with :func:`window_mask` as the mask (to rounding); a window that covers the
    sequence is full attention.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 100, 8) for _ in range(3))
        >>> dense = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(100, 32, block=8))
        >>> torch.allclose(window_attention(q, k, v, 32, block=8), dense, atol=1e-6)
        True
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    *lead, tokens, dim = q.shape
    if window >= tokens:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    rows = math.prod(lead)
    block = block or window_block(window)
    blocks = math.ceil(tokens / block)
    qb = F.pad(q, (0, 0, 0, blocks * block - tokens)).reshape(rows, blocks, block, dim)
    index = (_spans(tokens, window, block, q.device)[:, None] + torch.arange(window, device=q.device)).reshape(-1)
    kb = k.reshape(rows, tokens, -1).index_select(1, index).reshape(rows, blocks, window, -1)
    vb = v.reshape(rows, tokens, -1).index_select(1, index).reshape(rows, blocks, window, -1)
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    return out.reshape(*lead, blocks * block, -1)[..., :tokens, :]


def window_attention_flops(batch: int, heads: int, tokens: int, dim: int, window: int,
                           block: int | None = None) -> int:
    """FLOPs (2 per multiply-add) of the two matmuls :func:`window_attention` executes.

    >>> full = window_attention_flops(1, 1, 16384, 64, 16384)
    >>> full == 4 * 16384 * 16384 * 64
    True
    >>> full / window_attention_flops(1, 1, 16384, 64, 2048)
    8.0
    """
    if window >= tokens:
        return 4 * batch * heads * tokens * tokens * dim
    block = block or window_block(window)
    return 4 * batch * heads * math.ceil(tokens / block) * block * window * dim
