"""Window attention against full SDPA at one long sequence, in one process (issue 15's bar:
one attention layer, 16,384 tokens, a window of 1/8 of the sequence, >= 4x less time).

    python tools/bench_window_attention.py --tokens 16384 --heads 4 --dim 64 --fraction 8

Prints the best-of-``--repeats`` seconds of each, their ratio, the FLOP ratio, and the largest
difference from SDPA with the dense window mask (on a 2,048-token slice, to keep the dense
reference's memory small).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ditopt.runtime.window_attention import window_attention, window_attention_flops, window_mask


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
    args = parser.parse_args(argv)
    if min(args.tokens, args.heads, args.dim, args.fraction, args.repeats) < 1:
        parser.error("every argument must be >= 1")
    torch.manual_seed(0)
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


if __name__ == "__main__":
    main()
