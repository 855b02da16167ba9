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

**Per axis** (video and image DiTs, :class:`GridWindow`): the tokens ``offset .. offset + prod(grid)``
of the sequence are a row-major grid (frames x height x width, or height x width) and the window
is a box in it. The grid is cut into tiles (half the window per axis, a divisor of the grid), and
every query of a tile attends to the same box of ``window`` keys centred on its tile (shifted
inward at the borders), plus every token outside the grid (the text of joint attention); the
queries outside the grid attend to every key. :func:`grid_window_attention` is one batched SDPA
over the tiles, ``grid tokens x (window volume + extra tokens)`` scores; :func:`grid_window_mask`
is the dense mask it equals. A key-padding mask (one row, broadcast over the queries) is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AXES", "GridWindow", "grid_tiles", "grid_window_attention", "grid_window_mask", "window_attention",
           "window_attention_flops", "window_block", "window_mask"]

AXES = ("frames", "height", "width")  # the grid axes a per-axis window names, outermost first


class GridWindow(int):
    """A per-axis window: its sizes along ``AXES[-len(sizes):]`` (frames x height x width, or height
    x width). As an int it is its volume in tokens, so the decision table's window rows, the cost
    model and the checks that compare windows take it as they take a window in tokens; two
    windows are equal when their sizes are.

    >>> w = GridWindow((4, 8, 8))
    >>> int(w), w.sizes, w.named(), w == GridWindow([4, 8, 8]), w == 256
    (256, (4, 8, 8), {'frames': 4, 'height': 8, 'width': 8}, True, False)
    """

    sizes: tuple[int, ...]

    def __new__(cls, sizes):
        sizes = tuple(int(s) for s in sizes)
        if not 2 <= len(sizes) <= len(AXES) or min(sizes) < 1:
            raise ValueError(f"a per-axis window has 2 or 3 sizes >= 1 ({', '.join(AXES)}), got {sizes}")
        self = super().__new__(cls, math.prod(sizes))
        self.sizes = sizes
        return self

    def named(self) -> dict[str, int]:
        return dict(zip(AXES[-len(self.sizes):], self.sizes))

    def __eq__(self, other):
        return isinstance(other, GridWindow) and self.sizes == other.sizes

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(("GridWindow", self.sizes))

    def __repr__(self):
        return f"GridWindow({self.sizes})"

    def __reduce__(self):
        return GridWindow, (self.sizes,)


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


# -- per-axis windows in a token grid -----------------------------------------------------------------

def grid_tiles(grid, window, tile=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(window, tile)`` per axis: the window clamped to the grid, and the query tile, by default
    the largest divisor of the axis at most half the window (at least 1), so that every query sees
    at least a quarter of the window on either side (away from the borders). A ``tile`` given must
    divide the grid and fit in the window; larger tiles run faster (fewer, larger matmuls) and see
    less around the queries at their edges (a tile equal to the window is a block window).

    >>> grid_tiles((16, 32, 32), (4, 8, 8)), grid_tiles((3, 4, 4), (8, 2, 3))
    (((4, 8, 8), (2, 4, 4)), ((3, 2, 3), (1, 1, 1)))
    """
    if len(grid) != len(window):
        raise ValueError(f"the window has {len(window)} axes, the grid {len(grid)}: {tuple(window)} vs {tuple(grid)}")
    window = tuple(min(int(w), int(g)) for w, g in zip(window, grid))
    if tile is None:
        return window, tuple(max(d for d in range(1, max(1, w // 2) + 1) if g % d == 0) for w, g in zip(window, grid))
    tile = tuple(int(t) for t in tile)
    if len(tile) != len(grid) or any(t < 1 or g % t or t > w for t, g, w in zip(tile, grid, window)):
        raise ValueError(f"a query tile divides the grid and fits in the window per axis; got tile {tile}, grid "
                         f"{tuple(grid)}, window {window}")
    return window, tile


def _box_keys(grid, window, tile, device=None) -> torch.Tensor:
    """[tiles, window volume]: the grid positions (row-major) of each tile's key box."""
    flat = torch.zeros((), dtype=torch.long, device=device)
    k = len(grid)
    for a, (g, w, t) in enumerate(zip(grid, window, tile)):
        centre = torch.arange(g // t, device=device) * t + t // 2
        coords = (centre - w // 2).clamp(0, g - w)[:, None] + torch.arange(w, device=device)  # [tiles_a, w_a]
        shape = [1] * (2 * k)
        shape[a], shape[k + a] = g // t, w
        flat = flat * g + coords.reshape(shape)
    return flat.reshape(math.prod(g // t for g, t in zip(grid, tile)), math.prod(window))


def _to_tiles(x: torch.Tensor, grid, tile) -> torch.Tensor:
    """``[*lead, T, d]`` grid tokens -> ``[*lead, tiles, tile volume, d]``."""
    lead, k = x.shape[:-2], len(grid)
    split = [s for g, t in zip(grid, tile) for s in (g // t, t)]
    x = x.reshape(*lead, *split, x.shape[-1])
    n = len(lead)
    order = [*range(n), *(n + 2 * a for a in range(k)), *(n + 2 * a + 1 for a in range(k)), n + 2 * k]
    return x.permute(order).reshape(*lead, -1, math.prod(tile), x.shape[-1])


def _from_tiles(x: torch.Tensor, grid, tile) -> torch.Tensor:
    """The inverse of :func:`_to_tiles`."""
    lead, k, n = x.shape[:-3], len(grid), x.ndim - 3
    x = x.reshape(*lead, *(g // t for g, t in zip(grid, tile)), *tile, x.shape[-1])
    order = [*range(n), *(i for a in range(k) for i in (n + a, n + k + a)), n + 2 * k]
    return x.permute(order).reshape(*lead, math.prod(grid), x.shape[-1])


def grid_window_mask(tokens: int, window, grid, offset: int = 0, device=None, *, tile=None) -> torch.Tensor:
    """The dense boolean mask (True = attend) :func:`grid_window_attention` equals: grid token rows
    see their tile's key box and every token outside the grid; other rows see everything.

    >>> m = grid_window_mask(2 + 16, (2, 2), (4, 4), offset=2)
    >>> m[:2].all().item(), m[2:, :2].all().item(), m[2:, 2:].sum(1).tolist() == [4] * 16
    (True, True, True)
    """
    count = math.prod(grid)
    if not 0 <= offset <= tokens - count:
        raise ValueError(f"a grid of {count} tokens at offset {offset} does not fit a sequence of {tokens}")
    window, tile = grid_tiles(grid, window, tile)
    mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device)
    keys = _box_keys(grid, window, tile, device)  # [tiles, volume]
    tile_of = _to_tiles(torch.arange(count, device=device)[:, None], grid, tile)[..., 0]  # [tiles, tile volume]
    inside = torch.zeros(count, count, dtype=torch.bool, device=device)
    rows = tile_of[:, :, None].expand(-1, -1, keys.shape[1])
    inside[rows.reshape(-1), keys[:, None, :].expand_as(rows).reshape(-1)] = True
    mask[offset:offset + count, offset:offset + count] = inside
    return mask


def grid_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, grid, offset: int = 0, *,
                          attn_mask: torch.Tensor | None = None, scale: float | None = None,
                          tile=None) -> torch.Tensor:
    """Attention with a per-axis window in the token grid at ``offset`` (see the module): SDPA with
    :func:`grid_window_mask` (and ``attn_mask``, a key mask ``[..., 1, tokens]``) to rounding;
    exactly SDPA where the window covers the grid. ``tile``: the query tile (:func:`grid_tiles`).

    Example:
        >>> q, k, v = (torch.randn(1, 2, 3 + 4 * 6 * 6, 8) for _ in range(3))
        >>> dense = F.scaled_dot_product_attention(q, k, v, attn_mask=grid_window_mask(147, (2, 4, 4), (4, 6, 6), 3))
        >>> torch.allclose(grid_window_attention(q, k, v, (2, 4, 4), (4, 6, 6), offset=3), dense, atol=1e-6)
        True
    """
    tokens, count = q.shape[-2], math.prod(grid)
    if not 0 <= offset <= tokens - count or k.shape[-2] != tokens:
        raise ValueError(f"a grid of {count} tokens at offset {offset} does not fit queries and keys of "
                         f"{tokens} and {k.shape[-2]} tokens")
    if attn_mask is not None and (attn_mask.ndim < 2 or attn_mask.shape[-2] != 1):
        raise ValueError(f"grid window attention keeps a key mask [..., 1, tokens] only, got {tuple(attn_mask.shape)}")
    window, tile = grid_tiles(grid, window, tile)
    if tuple(window) == tuple(grid):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    end = offset + count
    keys = _box_keys(grid, window, tile, q.device).reshape(-1) + offset  # every tile's box, as sequence positions
    extra = torch.cat([torch.arange(offset, device=q.device), torch.arange(end, tokens, device=q.device)])
    tiles, volume = math.prod(g // t for g, t in zip(grid, tile)), math.prod(window)

    def gathered(x: torch.Tensor) -> torch.Tensor:  # [*lead, tiles, volume + extra, d]
        box = x.index_select(-2, keys).unflatten(-2, (tiles, volume))
        rest = x.index_select(-2, extra).unsqueeze(-3).expand(*x.shape[:-2], tiles, len(extra), x.shape[-1])
        return torch.cat([box, rest], dim=-2)

    mask = None if attn_mask is None else gathered(attn_mask.transpose(-1, -2)).transpose(-1, -2)
    out = F.scaled_dot_product_attention(_to_tiles(q[..., offset:end, :], grid, tile), gathered(k), gathered(v),
                                         attn_mask=mask, scale=scale)
    parts = [_from_tiles(out, grid, tile)]
    if len(extra):
        rest = F.scaled_dot_product_attention(q.index_select(-2, extra), k, v, attn_mask=attn_mask, scale=scale)
        parts = [rest[..., :offset, :], parts[0], rest[..., offset:, :]]
    return torch.cat(parts, dim=-2)
