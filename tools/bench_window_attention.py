"""Window attention against full SDPA at one long sequence, in one process (issue 15's bar:
one attention layer, 16,384 tokens, a window of 1/8 of the sequence, >= 4x less time).

    python tools/bench_window_attention.py --tokens 16384 --heads 4 --dim 64 --fraction 8
    python tools/bench_window_attention.py --grid 16x32x32 --window 4x8x8 --heads 4 --dim 64

With ``--grid`` (frames x height x width, or height x width) the window is per axis (``--window``)
and the kernel is ``grid_window_attention``; the dense reference is checked on a grid of at most
4,096 tokens cut from the same shape (each axis halved until it fits), window likewise clamped,
with the timed ``--tile`` where it divides the cut grid (else the default tile).

Prints the best-of-``--repeats`` seconds of each, their ratio, the FLOP ratio, and the largest
difference from SDPA with the dense window mask (on a 2,048-token slice, to keep the dense
reference's memory small).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from ditopt.flops import window_attention_flops as grid_flops
from ditopt.runtime.window_attention import (GridWindow, grid_tiles, grid_window_attention, grid_window_mask,
                                             window_attention, window_attention_flops, window_mask)


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--fraction", type=int, default=8, help="window = tokens // fraction")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", type=sizes, help="token grid, e.g. 16x32x32 (then --window is per axis)")
    parser.add_argument("--window", type=sizes, help="per-axis window, e.g. 4x8x8 (with --grid)")
    parser.add_argument("--tile", type=sizes, help="query tile per axis (default: half the window)")
    args = parser.parse_args(argv)
    if min(args.tokens, args.heads, args.dim, args.fraction, args.repeats) < 1:
        parser.error("every argument must be >= 1")
    if (args.grid is None) != (args.window is None) or args.grid and len(args.grid) != len(args.window):
        parser.error("--grid and --window go together, with as many axes each")
    torch.manual_seed(0)
    if args.grid:
        return per_axis(args)
    window = max(1, args.tokens // args.fraction)
    q, k, v = (torch.randn(1, args.heads, args.tokens, args.dim) for _ in range(3))
    with torch.no_grad():
        full = best(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        windowed = best(lambda: window_attention(q, k, v, window), args.repeats)
        n = min(args.tokens, 2048)
        w = max(1, n // args.fraction)
        ref = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], attn_mask=window_mask(n, w))
        diff = (window_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], w) - ref).abs().max().item()
    flops = (window_attention_flops(1, args.heads, args.tokens, args.dim, args.tokens)
             / window_attention_flops(1, args.heads, args.tokens, args.dim, window))
    print(f"tokens {args.tokens}, heads {args.heads}, dim {args.dim}, window {window}, threads {torch.get_num_threads()}")
    print(f"full SDPA {full:.3f} s | window {windowed:.3f} s | time ratio {full / windowed:.2f}x | "
          f"FLOP ratio {flops:.2f}x | max diff vs dense mask {diff:.1e}")


def sizes(text: str) -> tuple[int, ...]:
    """``"16x32x32"`` -> ``(16, 32, 32)`` (2 or 3 sizes >= 1)."""
    try:
        out = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes like 16x32x32, got {text!r}") from None
    if not 2 <= len(out) <= 3 or min(out) < 1:
        raise argparse.ArgumentTypeError(f"2 or 3 sizes >= 1 like 16x32x32, got {text!r}")
    return out


def per_axis(args) -> None:
    grid, window = args.grid, args.window
    tokens = math.prod(grid)
    q, k, v = (torch.randn(1, args.heads, tokens, args.dim) for _ in range(3))
    small = list(grid)
    while math.prod(small) > 4096:
        i = max(range(len(small)), key=lambda a: small[a])
        small[i] = max(1, small[i] // 2)
    n = math.prod(small)
    with torch.no_grad():
        full = best(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        windowed = best(lambda: grid_window_attention(q, k, v, window, grid, tile=args.tile), args.repeats)
        cut = [x[:, :, :n] for x in (q, k, v)]
        fits = args.tile is not None and all(s % t == 0 and t <= w for s, t, w in zip(small, args.tile, window))
        check = args.tile if fits else None  # the timed tile where it fits the cut grid, else the default
        ref = F.scaled_dot_product_attention(*cut, attn_mask=grid_window_mask(n, window, small, tile=check))
        diff = (grid_window_attention(*cut, window, small, tile=check) - ref).abs().max().item()
    tile = grid_tiles(grid, window, args.tile)[1]
    shape = q.shape
    flops = grid_flops(shape, shape, tokens) / grid_flops(shape, shape, GridWindow(window), grid=grid)
    print(f"grid {'x'.join(map(str, grid))} ({tokens} tokens), heads {args.heads}, dim {args.dim}, window "
          f"{'x'.join(map(str, window))} ({math.prod(window)} tokens), query tile {'x'.join(map(str, tile))}, "
          f"threads {torch.get_num_threads()}")
    print(f"full SDPA {full:.3f} s | window {windowed:.3f} s | time ratio {full / windowed:.2f}x | "
          f"FLOP ratio {flops:.2f}x | max diff vs dense mask ({'x'.join(map(str, small))}) {diff:.1e}")


if __name__ == "__main__":
    main()
