#!/usr/bin/env python
"""Train a tiny class-conditional ``diffusers.WanTransformer3DModel`` on moving-digit clips.

Data: each clip is ``--frames`` (8) frames of a 16x16 canvas (background -1)
on which one sklearn digit (its native 8x8, values scaled to [-1, 1]) moves in
a straight line at constant velocity from a random start to a random end
position (sub-pixel, bilinear), staying fully inside the canvas.  Clips are
generated on the fly from a seeded generator, so training is deterministic
given ``--seed`` and ``--steps``.

Model input is [B, 1, T, 16, 16]; ``patch_size=(1, 2, 2)`` gives 64 tokens per
frame.  Conditioning goes through ``encoder_hidden_states`` of shape
[B, L, text_dim] produced by a learned per-class embedding table with 11 rows
(digits 0..9 plus the null class 10 for classifier-free guidance); it is
trained jointly and saved in the same safetensors file under the key
``class_embedding.weight`` (shape [11, L * text_dim]).  Labels are replaced by
the null class with probability ``--p-uncond`` (0.1).

Objective: flow matching, the convention of ``FlowMatchEulerDiscreteScheduler``
(Wan's native scheduler family):

    x_t = (1 - s) * x0 + s * noise,   target = noise - x0,   timestep = 1000 * s

The loop (AdamW, warm-up and cosine learning rate, EMA) is ``ditopt/zoo/training.py``, shared
with ``tools/train_dit_digits.py``; the digits and their pasting are ``ditopt/zoo/digits.py``.

``--minutes`` is only a wall-clock safety cap.

Example::

    python tools/train_wan_digits.py --steps 1500 --seed 0 \
        --out ditopt/zoo/weights/wan-digits
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ditopt.zoo.digits import CANVAS, digits_sized, place
from ditopt.zoo.training import NULL_CLASS, TrainConfig, drop_labels, flow_matching, parameter_count, train


def make_clips(digits01: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """[N,1,8,8] digits in [0,1] -> clips [N,1,T,16,16] in [-1,1], straight-line motion."""
    n = digits01.shape[0]
    span = CANVAS - digits01.shape[-1]
    start = torch.rand(n, 2, generator=gen) * span
    end = torch.rand(n, 2, generator=gen) * span
    out = []
    for f in range(frames):
        a = f / (frames - 1)
        out.append(place(digits01, start + (end - start) * a))
    return torch.stack(out, dim=2) * 2 - 1


class ClassEmbedding(torch.nn.Module):
    def __init__(self, num_classes: int, seq_len: int, text_dim: int):
        super().__init__()
        self.seq_len, self.text_dim = seq_len, text_dim
        self.weight = torch.nn.Parameter(torch.randn(num_classes, seq_len * text_dim))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.weight[labels].view(-1, self.seq_len, self.text_dim)


def build_model(args):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=1,
        out_channels=1,
        text_dim=args.text_dim,
        freq_dim=args.freq_dim,
        ffn_dim=args.ffn_mult * args.heads * args.head_dim,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock safety cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ditopt/zoo/weights/wan-digits", help="output path without extension")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--digit-size", type=int, default=12, help="digit side on the 16x16 canvas (8 = native)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--ffn-mult", type=int, default=4)
    p.add_argument("--text-dim", type=int, default=32)
    p.add_argument("--text-len", type=int, default=4)
    p.add_argument("--freq-dim", type=int, default=64)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (fast on AMX CPUs)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_all, y_all = digits_sized(args.digit_size)
    n = x_all.shape[0]
    model = build_model(args).train()
    cemb = ClassEmbedding(NULL_CLASS + 1, args.text_len, args.text_dim).train()
    nparams = parameter_count([model, cemb])
    print(f"params: {nparams / 1e6:.3f}M, tokens/clip: {args.frames * 64}")

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x0 = make_clips(x_all[idx], args.frames, gen)
        b = x0.shape[0]
        y = drop_labels(y_all[idx], args.p_uncond, gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(b, generator=gen))
        s = torch.where(torch.rand(b, generator=gen) < 0.2, torch.rand(b, generator=gen), s)
        xt, target = flow_matching(x0, noise, s)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(hidden_states=xt, timestep=s * 1000.0, encoder_hidden_states=cemb(y), return_dict=False)[0]
        return F.mse_loss(pred.float(), target)

    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
                      minutes=args.minutes, log_every=20, loss_window=100, name="wan-digits")
    run = train([model, cemb], loss_of, n, gen, cfg)
    save(*run.ema, args, run.steps_done, run.seconds, run.final_loss, run.stopped_early, nparams)


def save(ema, ema_c, args, steps_done, elapsed, final_loss, stopped_early, nparams) -> None:
    import diffusers
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    sd["class_embedding.weight"] = ema_c.weight.detach().contiguous()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, args.out + ".safetensors")
    cfg = {k: v for k, v in dict(ema.config).items() if not k.startswith("_")}
    cfg["patch_size"] = list(cfg["patch_size"])
    meta = {
        "name": "wan-digits",
        "class": "WanTransformer3DModel",
        "model_config": cfg,
        "class_embedding": {
            "key": "class_embedding.weight",
            "num_classes": NULL_CLASS + 1,
            "seq_len": args.text_len,
            "text_dim": args.text_dim,
        },
        "scheduler": {
            "class": "FlowMatchEulerDiscreteScheduler",
            "config": {"num_train_timesteps": 1000, "shift": 1.0},
        },
        "objective": "flow matching (x_t=(1-s)x0+s*eps, target eps-x0, timestep=1000*s)",
        "null_class": NULL_CLASS,
        "num_classes": 10,
        "default_steps": 20,
        "default_guidance_scale": 4.0,
        "frames": args.frames,
        "canvas": CANVAS,
        "digit_size": args.digit_size,
        "data": f"sklearn digit (8x8, bilinear-resized to {args.digit_size}x{args.digit_size}) in [-1,1] moving in a straight line on a 16x16 canvas (bg -1)",
        "training": {
            "script": "tools/train_wan_digits.py",
            "args": vars(args),
            "steps_done": steps_done,
            "stopped_early_by_time_cap": stopped_early,
            "minutes": round(elapsed / 60, 2),
            "final_loss_mean_last100": round(final_loss, 5),
            "weights": "EMA",
            "params": nparams,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    print("saved", args.out + ".safetensors", args.out + ".json")


if __name__ == "__main__":
    main()
