#!/usr/bin/env python
"""Train a tiny class-conditional ``diffusers.DiTTransformer2DModel`` on sklearn digits.

The model works directly on pixels (no VAE): the 8x8 digits are upsampled
bilinearly to 16x16, scaled to [-1, 1] and used as 1-channel images.  With
``patch_size=2`` that is 64 tokens per image.

Objective: rectified flow / flow matching (the convention of diffusers'
``FlowMatchEulerDiscreteScheduler``):

    x_t = (1 - s) * x0 + s * noise,   target = noise - x0,   timestep = 1000 * s

Class conditioning uses ``num_embeds_ada_norm=11``: labels 0..9 are the digits
and label 10 is the *null* class used for classifier-free guidance; labels are
replaced by 10 with probability ``--p-uncond`` (0.1) during training.

Note: diffusers' ``LabelEmbedding`` allocates one extra row (index 11) and, in
``train()`` mode, would drop labels to index 11 on its own, independently in
every block.  We disable that (``dropout_prob = 0``) and do the dropping
ourselves so the null class is 10 everywhere; row 11 is never used.

Training is deterministic given ``--seed`` and ``--steps`` (single thread).
``--minutes`` is only a safety cap: if it triggers, the run stops early (and
the result then depends on machine speed; the metadata records it).

Example::

    python tools/train_dit_digits.py --steps 3000 --seed 0 \
        --out ditopt/zoo/weights/dit-digits
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

NULL_CLASS = 10


def load_digits_16(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as float32 [N,1,size,size] in [-1,1] plus int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def build_model(args) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=args.layers,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=NULL_CLASS + 1,
        norm_num_groups=1,
    )
    # DiT-paper style init: adaLN-zero modulation and the output layer start at 0.
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    torch.nn.init.zeros_(model.proj_out_1.weight)
    torch.nn.init.zeros_(model.proj_out_1.bias)
    torch.nn.init.zeros_(model.proj_out_2.weight)
    torch.nn.init.zeros_(model.proj_out_2.bias)
    # We do the CFG label dropping ourselves (to class 10), see module docstring.
    for m in model.modules():
        if m.__class__.__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock safety cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ditopt/zoo/weights/dit-digits", help="output path without extension")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp16", action="store_true", default=True, help="store weights as float16")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_all, y_all = load_digits_16()
    n = x_all.shape[0]
    model = build_model(args)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params: {nparams / 1e6:.3f}M, data: {n} images")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    t0 = time.time()
    losses: list[float] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    step = 0
    stopped_early = False
    bar = tqdm(range(args.steps), desc="dit-digits", mininterval=5.0)
    for step in bar:
        if pos + args.batch > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        x0 = x_all[idx]
        y = y_all[idx].clone()
        b = x0.shape[0]
        drop = torch.rand(b, generator=gen) < args.p_uncond
        y[drop] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        # logit-normal sigma sampling (SD3 style), mixed with uniform for coverage
        s = torch.sigmoid(torch.randn(b, generator=gen))
        u = torch.rand(b, generator=gen)
        s = torch.where(torch.rand(b, generator=gen) < 0.2, u, s)
        sv = s.view(-1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * noise
        target = noise - x0

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        pred = model(hidden_states=xt, timestep=s * 1000.0, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}", lr=f"{lr_at(step):.2e}")
        if (time.time() - t0) > args.minutes * 60:
            stopped_early = True
            print(f"time cap reached at step {step + 1}")
            break
    elapsed = time.time() - t0
    final_loss = float(np.mean(losses[-200:]))
    print(f"done: {step + 1} steps in {elapsed / 60:.1f} min, final loss (mean last 200) {final_loss:.4f}")

    save(ema, args, step + 1, elapsed, final_loss, stopped_early, nparams)


def save(ema, args, steps_done, elapsed, final_loss, stopped_early, nparams) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    if args.fp16:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, args.out + ".safetensors")
    meta = {
        "name": "dit-digits",
        "class": "DiTTransformer2DModel",
        "model_config": {k: v for k, v in dict(ema.config).items() if not k.startswith("_")},
        "scheduler": {
            "class": "FlowMatchEulerDiscreteScheduler",
            "config": {"num_train_timesteps": 1000, "shift": 1.0},
        },
        "objective": "flow matching (x_t=(1-s)x0+s*eps, target eps-x0, timestep=1000*s)",
        "null_class": NULL_CLASS,
        "num_classes": 10,
        "default_steps": 20,
        "default_guidance_scale": 4.0,
        "sample_size": 16,
        "data": "sklearn digits 8x8 -> bilinear 16x16, [-1,1]",
        "training": {
            "script": "tools/train_dit_digits.py",
            "args": vars(args),
            "steps_done": steps_done,
            "stopped_early_by_time_cap": stopped_early,
            "minutes": round(elapsed / 60, 2),
            "final_loss_mean_last200": round(final_loss, 5),
            "weights": "EMA",
            "params": nparams,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    import diffusers

    meta["training"]["diffusers"] = diffusers.__version__
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    print("saved", args.out + ".safetensors", args.out + ".json")


if __name__ == "__main__":
    main()
