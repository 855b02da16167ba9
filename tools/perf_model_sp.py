"""A latency-bandwidth model of sequence parallelism (and SP with collective elision) for a Wan-shaped DiT.

Predicts the time of one generation on ``--gpus`` GPUs from (1) the FLOPs of one block, counted from
its shape, (2) a compute rate calibrated on a measured single-GPU run (by default the H200
measurement in docs/BENCHMARKS.md: Wan2.1-1.3B shape, 14,040 tokens, 7.053 s per 20-step generation
with CFG as two calls, the blocks 99.5% of it) and (3) a latency-bandwidth cost per collective
(``alpha + bytes / beta``). Every input is an argument; the defaults and where they come from are
printed with the table.

Per block and call, with S tokens, T text tokens, width D, feed-forward width F, N ranks, 2 bytes
per element (bf16):

    FLOPs(S)      = 8 S D^2 (self-attn q,k,v,o) + 4 S^2 D (self-attn scores and values)
                  + 4 S D^2 + 4 T D^2 (cross-attn q,o and k,v) + 4 S T D (cross-attn) + 4 S D F (FFN)
    compute       = FLOPs(S) / N / rate
    Ulysses comm  = 4 all-to-alls (q, k, v in; output back), each alpha + (S/N) D 2 (N-1)/N / beta
    ring comm     = N-1 hops of K and V, each alpha + 2 (S/N) D 2 / beta, overlapped with the
                    attention of the hop: time = non-attention compute + (N-1) max(hop attention, hop comm)
                    + the local hop's attention
    elision e     = a fraction e of the calls attends to stale remote K/V (DistriFusion): ring sends
                    nothing at those calls; Ulysses still moves q and the output (2 of 4 all-to-alls)
    residual r    = a stale call also all-gathers each rank's K/V residual at r of an exchange's
                    bytes (SequenceParallel(stale_residual=); int8 against bf16 K/V: r = (d+2)/(2d)),
                    not overlapped: alpha + r 2 (S/N) D 2 (N-1) / beta

    generation    = steps * calls_per_step * (blocks * block time + rest(S) / N)

    python tools/perf_model_sp.py                       # Wan2.1-1.3B, 480p x 81 frames, 8 GPUs
    python tools/perf_model_sp.py --tokens 14040 --gpus 1   # the calibration point itself
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class Shape:
    tokens: int = 32_760  # 480p x 81 frames after the VAE (21 latent frames x 30 x 52) and 1x2x2 patches
    text: int = 512
    width: int = 1536
    ffn: int = 8960
    blocks: int = 30
    steps: int = 20
    calls: int = 2  # CFG as two calls per step


def block_flops(s: Shape, tokens: int | None = None) -> dict[str, float]:
    """FLOPs of one block call at ``tokens`` (default ``s.tokens``), by part (multiply-adds count 2)."""
    S, T, D, F = tokens or s.tokens, s.text, s.width, s.ffn
    return {"self-attn projections": 8 * S * D * D, "self-attn": 4 * S * S * D,
            "cross-attn": 4 * S * D * D + 4 * T * D * D + 4 * S * T * D, "ffn": 4 * S * D * F}


def calibrate(s: Shape, tokens: int, seconds: float, block_share: float) -> float:
    """The compute rate (FLOP/s) a measured single-GPU generation implies for the blocks."""
    per_block_call = seconds * block_share / (s.steps * s.calls * s.blocks)
    return sum(block_flops(s, tokens).values()) / per_block_call


def collective(alpha: float, beta: float, nbytes: float) -> float:
    return alpha + nbytes / beta


def block_time(s: Shape, n: int, mode: str, rate: float, alpha: float, beta: float, elide: float,
               residual: float = 0.0) -> dict[str, float]:
    """Seconds of one block call on each of ``n`` ranks: compute, communication, total."""
    parts = block_flops(s)
    attn = parts["self-attn"] / n / rate
    other = (sum(parts.values()) - parts["self-attn"]) / n / rate
    if n == 1:
        return {"compute": attn + other, "comm": 0.0, "total": attn + other}
    shard = s.tokens / n * s.width * 2  # bytes of one rank's slice of a (tokens, width) bf16 tensor
    sent = collective(alpha, beta, residual * 2 * shard * (n - 1)) if residual else 0.0  # a stale call's residual
    if mode == "ulysses":
        a2a = collective(alpha, beta, shard * (n - 1) / n)
        comm = (1 - elide) * 4 * a2a + elide * (2 * a2a + sent)
        return {"compute": attn + other, "comm": comm, "total": attn + other + comm}
    hop = collective(alpha, beta, 2 * shard)  # K and V of one slice to the next rank
    hop_attn = attn / n
    fresh = other + hop_attn + (n - 1) * max(hop_attn, hop)
    stale = other + attn + sent  # remote K/V from the cache (and the residual): no hop
    total = (1 - elide) * fresh + elide * stale
    return {"compute": attn + other, "comm": (1 - elide) * (n - 1) * hop + elide * sent, "total": total}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=Shape.tokens)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--measured-seconds", type=float, default=7.053, help="one generation on one GPU (calibration)")
    p.add_argument("--measured-tokens", type=int, default=14_040)
    p.add_argument("--block-share", type=float, default=0.995, help="the blocks' share of that time")
    p.add_argument("--alpha", type=float, default=15e-6, help="seconds of latency per collective (NCCL, one node)")
    p.add_argument("--beta", type=float, default=350e9, help="bytes/s a rank sends (NVLink 4: 450 GB/s a direction)")
    p.add_argument("--elide", type=float, default=0.5, help="fraction of calls on stale remote K/V")
    p.add_argument("--residual", type=float, default=None,
                   help="also: stale calls sending residuals at this fraction of an exchange's bytes, "
                        "at --residual-elide of the calls")
    p.add_argument("--residual-elide", type=float, default=0.7)
    args = p.parse_args(argv)
    if args.gpus < 1 or args.tokens < 1 or not 0 <= args.elide <= 1:
        p.error("--gpus and --tokens must be >= 1 and --elide in [0, 1]")
    s = Shape(tokens=args.tokens)
    rate = calibrate(s, args.measured_tokens, args.measured_seconds, args.block_share)
    rest = args.measured_seconds * (1 - args.block_share) * args.tokens / args.measured_tokens  # outside the blocks
    calls = s.steps * s.calls
    print(f"inputs: {s}, calibrated rate {rate / 1e12:.0f} TFLOP/s (from {args.measured_seconds} s at "
          f"{args.measured_tokens} tokens, blocks {args.block_share:.1%}), alpha {args.alpha * 1e6:.0f} us, "
          f"beta {args.beta / 1e9:.0f} GB/s, {args.gpus} GPUs")
    one = block_time(s, 1, "ulysses", rate, args.alpha, args.beta, 0.0)["total"] * s.blocks * calls + rest
    print("| variant | block compute (ms) | block comm (ms) | block total (ms) | generation (s) | speedup vs 1 GPU |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 GPU | {one / calls / s.blocks * 1e3:.2f} | 0 | {one / calls / s.blocks * 1e3:.2f} | {one:.2f} | 1.00 |")
    for mode in ("ulysses", "ring") if args.gpus > 1 else ():
        variants = [(0.0, 0.0), (args.elide, 0.0)] + ([(args.residual_elide, args.residual)] if args.residual else [])
        for elide, residual in variants:
            t = block_time(s, args.gpus, mode, rate, args.alpha, args.beta, elide, residual)
            gen = t["total"] * s.blocks * calls + rest / args.gpus
            name = f"SP {mode}" + (f" + elision {elide:.0%}" if elide else "") + (
                f", residuals at {residual:.2f} of an exchange" if residual else "")
            print(f"| {name} | {t['compute'] * 1e3:.2f} | {t['comm'] * 1e3:.2f} | {t['total'] * 1e3:.2f} | "
                  f"{gen:.2f} | {one / gen:.2f} |")


if __name__ == "__main__":
    main()
