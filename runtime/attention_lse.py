"""Attention with its log-sum-exp, and the merge of partial attentions over disjoint key sets by
it: what ring attention (``runtime.distributed``) and selective ring refresh (``runtime.stale_kv``)
compute with. Re-exported by ``runtime.distributed``.
"""

from __future__ import annotations

import math

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T scale + mask) v`` and the log-sum-exp of each query row (``[..., Lq]``).

    CUDA: flash (half precision, no mask), else the memory-efficient kernel (fp32 lse). CPU: the
    formula, ``lse = max + log(sum exp(s - max))`` formed in float64 (an fp32 lse is off by ~1e-6
    at scores ~10, a relative error of the merged output; float64 keeps it at SDPA's precision).

    >>> q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    >>> out, lse = attention_with_lse(q, k, v, None, None)
    >>> lse.dtype, bool(torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6))
    (torch.float64, True)
    """
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    try:
        if q.device.type == "cuda" and mask is None and q.dtype in (torch.float16, torch.bfloat16):
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return out[0], out[1]
        if q.device.type == "cuda":
            bias = None if mask is None else mask.expand(*q.shape[:-1], k.shape[-2])
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)
            return out[0], out[1][..., : q.shape[-2]]
    except RuntimeError:
        pass
    wide = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(wide) @ k.to(wide).transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s + mask.to(wide)
    top = s.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row that sees no key: lse -inf
    p = torch.exp(s - top)
    total = p.sum(dim=-1, keepdim=True)
    out = (p @ v.to(wide)) / total
    return out.to(q.dtype), top.squeeze(-1).double() + torch.log(total.squeeze(-1).double())


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of key sets from the attention over each set and its
    log-sum-exp: ``sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``, in the
    precision of the lse (float64 from :func:`attention_with_lse` on CPU, else fp32). A row that
    sees no key of a set (lse -inf) takes nothing from it."""
    if len(parts) == 1:
        return parts[0][0]
    wide = torch.float64 if any(lse.dtype == torch.float64 for _, lse in parts) else torch.float32
    lses = torch.stack([lse.to(wide) for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    weights = torch.where(torch.isfinite(lses), torch.exp(lses - total), torch.zeros_like(lses))
    out = sum(w.unsqueeze(-1) * torch.nan_to_num(o.to(wide)) for w, (o, _) in zip(weights.unbind(0), parts))
    return out.to(parts[0][0].dtype)


__all__ = ["attention_with_lse", "merge_partials"]
